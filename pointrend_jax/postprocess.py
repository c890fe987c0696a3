"""Padded predictions to per-image results at the original image size (host, numpy).

The outputs of :func:`pointrend_jax.modeling.predict.predict` for one image (row ``i`` of the
batch) become:

* :func:`instances` -> :class:`Instances`: detectron2's ``detector_postprocess`` (boxes scaled
  from the resized to the original size with float32 factors, clipped, empty boxes dropped) and
  ``paste_masks_in_image`` (:func:`paste_masks`), then COCO RLE (:func:`encode_rle`);
* :func:`subdivision_stages` -> :class:`SubdivisionStages` (predictions with ``stages=True``);
* :func:`semantic_result` -> :class:`SemanticResult`: crop the padding, PyTorch bilinear resize
  (:func:`resize_bilinear`) to the original size, argmax.

Everything is numpy, so nothing compiles per original image size. The paste uses true float32
division as torch does, which reproduces detectron2's masks exactly (an XLA version may divide
through a reciprocal and flip a pixel within ~1e-6 of the threshold).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

__all__ = ["Instances", "SemanticResult", "SubdivisionStages", "instances", "subdivision_stages",
           "semantic_result", "paste_masks", "encode_rle", "resize_bilinear"]


@dataclasses.dataclass
class Instances:
  """Instance predictions of one image at its original resolution (detectron2 ``Instances``).

  Rows are in descending score order. ``n`` may be 0; shapes stay well-formed.

  Attributes:
    image_size: original ``(height, width)``.
    boxes: ``[n, 4]`` float32 ``(x0, y0, x1, y1)`` original-image pixels.
    scores: ``[n]`` float32.
    classes: ``[n]`` int32 contiguous class ids.
    class_names: ``n`` names.
    masks: ``[n, height, width]`` bool.
    rle: ``n`` COCO RLE dicts ``{"size": [h, w], "counts": str}`` of ``masks``
      (``pycocotools.mask.decode`` reads them back).
  """
  image_size: tuple[int, int]
  boxes: np.ndarray
  scores: np.ndarray
  classes: np.ndarray
  class_names: list[str]
  masks: np.ndarray
  rle: list[dict[str, Any]]

  def __len__(self) -> int:
    return int(self.scores.shape[0])

  def to_json(self) -> dict[str, Any]:
    """JSON-ready dict: ``height``, ``width`` and one entry per instance (box, score, class,
    class name, RLE segmentation)."""
    return {
        "height": int(self.image_size[0]), "width": int(self.image_size[1]),
        "instances": [
            {"box": [float(v) for v in self.boxes[i]], "score": float(self.scores[i]),
             "class": int(self.classes[i]), "class_name": self.class_names[i],
             "segmentation": self.rle[i]}
            for i in range(len(self))],
    }


@dataclasses.dataclass
class SemanticResult:
  """Semantic prediction of one image at its original resolution.

  Attributes:
    image_size: original ``(height, width)``.
    sem_seg: ``[height, width]`` int32 class (train id) per pixel.
    class_names: name of each class id.
    logits: ``[height, width, C]`` float32 (only when asked for), as detectron2's
      ``sem_seg_postprocess`` output (channels last).
  """
  image_size: tuple[int, int]
  sem_seg: np.ndarray
  class_names: list[str]
  logits: np.ndarray | None = None

  def to_json(self) -> dict[str, Any]:
    """JSON-ready summary: size and the fraction of pixels of every predicted class."""
    counts = np.bincount(self.sem_seg.ravel(), minlength=len(self.class_names))
    total = max(1, int(self.sem_seg.size))
    return {"height": int(self.image_size[0]), "width": int(self.image_size[1]),
            "class_names": list(self.class_names),
            "pixel_fraction": {self.class_names[c]: counts[c] / total
                               for c in np.flatnonzero(counts)}}


@dataclasses.dataclass
class SubdivisionStages:
  """The mask head's adaptive subdivision (``pointrend.md`` §3.6) for the rows of an
  :class:`Instances`, in the same order. Logits are of each instance's predicted class, in the
  box frame (row 0 = top of the box).

  Attributes:
    boxes: ``[n, 4]`` original-image boxes (the frame of every map below).
    coarse: ``[n, 7, 7]`` coarse-head logits.
    init: ``[n, 28, 28]`` step-0 logits (point head on the regular 28x28 grid).
    upsampled: per step ``[n, H_s, W_s]``: x2 bilinear upsampling of the previous map, before
      the points are recomputed (56, 112, 224).
    points: per step ``[n, K, 2]`` ``(x, y)`` in ``[0, 1]`` of the box: the ``K`` = 784 most
      uncertain cell centres chosen at that step.
    indices: per step ``[n, K]`` flat row-major cell indices of ``points``.
    refined: per step ``[n, H_s, W_s]``: ``upsampled`` with the point head's logits written at
      ``indices``; the last one is the final mask logits.
  """
  boxes: np.ndarray
  coarse: np.ndarray
  init: np.ndarray
  upsampled: list[np.ndarray]
  points: list[np.ndarray]
  indices: list[np.ndarray]
  refined: list[np.ndarray]

  @property
  def final(self) -> np.ndarray:
    """``[n, S, S]`` final mask logits (``S`` = 224)."""
    return self.refined[-1] if self.refined else self.init


# --- Instance models ---


def instances(outputs: Mapping[str, np.ndarray], orig_size: Sequence[int],
              resized_size: Sequence[int], class_names: Sequence[str], *,
              mask_threshold: float = 0.5, score_threshold: float | None = None,
              mask_key: str = "mask_probs") -> tuple[Instances, np.ndarray]:
  """One image's :class:`Instances` from its row of the predict outputs.

  Args:
    outputs: ``boxes [D, 4]``, ``scores [D]``, ``classes [D]``, ``valid [D]`` and
      ``mask_key [D, S, S]`` box-frame probabilities of one image.
    orig_size: original ``(height, width)``.
    resized_size: ``(h, w)`` the model saw (before padding).
    class_names: name of every class id.
    mask_threshold: pixel = ``probability >= mask_threshold``.
    score_threshold: keep detections with ``score > score_threshold`` (None: all).
    mask_key: ``"mask_probs"`` (PointRend) or ``"coarse_probs"`` (the coarse 7x7 masks).

  Returns:
    ``(instances, rows)``: ``rows`` are the kept rows of ``outputs``, in order.
  """
  f32 = np.float32
  orig = (int(orig_size[0]), int(orig_size[1]))
  scale = np.asarray(orig, f32) / np.asarray(resized_size, f32)  # (y, x)
  sx, sy = scale[1], scale[0]
  boxes = np.asarray(outputs["boxes"], f32) * np.array([sx, sy, sx, sy], f32)
  h, w = f32(orig[0]), f32(orig[1])
  boxes = np.stack([np.clip(boxes[:, 0], 0, w), np.clip(boxes[:, 1], 0, h),
                    np.clip(boxes[:, 2], 0, w), np.clip(boxes[:, 3], 0, h)], axis=1)
  keep = (np.asarray(outputs["valid"], bool) & (boxes[:, 2] - boxes[:, 0] > 0)
          & (boxes[:, 3] - boxes[:, 1] > 0))
  scores = np.asarray(outputs["scores"], f32)
  if score_threshold is not None:
    keep &= scores > score_threshold
  rows = np.flatnonzero(keep)
  masks = paste_masks(np.asarray(outputs[mask_key])[rows], boxes[rows], orig, mask_threshold)
  classes = np.asarray(outputs["classes"], np.int32)[rows]
  inst = Instances(image_size=orig, boxes=boxes[rows], scores=scores[rows], classes=classes,
                   class_names=[class_names[c] for c in classes], masks=masks,
                   rle=encode_rle(masks))
  return inst, rows


def subdivision_stages(outputs: Mapping[str, Any], rows: np.ndarray,
                       boxes: np.ndarray) -> SubdivisionStages:
  """The subdivision steps of ``rows`` of one image's predict outputs (``stages=True``); each
  step's refined map is its upsampled map with the point head's logits written at its cells.

  Args:
    outputs: one image's row of the predict outputs.
    rows: the detections to keep (from :func:`instances`).
    boxes: their original-image boxes.
  """
  upsampled = [np.asarray(u)[rows] for u in outputs["upsampled"]]
  indices = [np.asarray(i)[rows] for i in outputs["indices"]]
  refined = []
  for up, idx, vals in zip(upsampled, indices, outputs["point_logits"]):
    r = np.array(up)
    np.put_along_axis(r.reshape(len(rows), r.shape[1] * r.shape[2]), idx, np.asarray(vals)[rows],
                      axis=1)
    refined.append(r)
  return SubdivisionStages(boxes=boxes, coarse=np.asarray(outputs["coarse_logits"])[rows],
                           init=np.asarray(outputs["init_logits"])[rows], upsampled=upsampled,
                           points=[np.asarray(p)[rows] for p in outputs["points"]],
                           indices=indices, refined=refined)


def _axis_taps(lo: np.float32, hi: np.float32, start: int, stop: int, mask_size: int):
  """Bilinear taps along one axis for the pixel centres ``start..stop-1`` of the box
  ``[lo, hi]``: ``(i0, i1, w0, w1)`` with zero weights outside the mask or for NaN/inf."""
  f32 = np.float32
  centre = np.arange(start, stop, dtype=f32) + f32(0.5)
  with np.errstate(all="ignore"):  # degenerate boxes give inf/NaN positions: zero weights below
    g = (centre - lo) / (hi - lo) * f32(2.0) - f32(1.0)  # detectron2's normalized grid
    # torch's CPU grid_sample unnormalizes as (g + 1) * (S / 2) - 0.5 for align_corners=False.
    pos = (g + f32(1.0)) * f32(mask_size / 2.0) - f32(0.5)
    f = np.floor(pos)
    frac = pos - f
  in0 = (f > -1.0) & (f < mask_size)
  in1 = (f > -2.0) & (f < mask_size - 1)
  w0 = np.where(in0, f32(1.0) - frac, f32(0.0)).astype(f32)
  w1 = np.where(in1, frac, f32(0.0)).astype(f32)
  fc = np.clip(np.where(np.isfinite(f), f, 0.0), -1.0, mask_size - 1.0).astype(np.int64)
  return (np.clip(fc, 0, mask_size - 1), np.clip(fc + 1, 0, mask_size - 1), w0, w1)


def paste_masks(probs: np.ndarray, boxes: np.ndarray, image_hw: Sequence[int],
                threshold: float = 0.5) -> np.ndarray:
  """detectron2 ``paste_masks_in_image`` (CPU path).

  Image pixel ``(i, j)`` (centre ``(j + 0.5, i + 0.5)``) reads the ``S x S`` mask of box
  ``(x0, y0, x1, y1)`` at ``u = ((j + 0.5 - x0) / (x1 - x0) * 2 - 1 + 1) * S/2 - 0.5`` (same for
  ``v``): ``grid_sample(bilinear, align_corners=False, padding_mode="zeros")`` with detectron2's
  float32 operation order, in two separable passes (rows, then columns). Like detectron2 on CPU,
  only the window ``[floor(x0) - 1, ceil(x1) + 1) x [floor(y0) - 1, ceil(y1) + 1)`` is
  evaluated; the rest of the image is False. Degenerate or non-finite boxes give empty masks.

  Args:
    probs: ``[n, S, S]`` probabilities.
    boxes: ``[n, 4]`` float32 boxes in output pixels.
    image_hw: output ``(H, W)``.
    threshold: pixel = ``value >= threshold``.

  Returns:
    ``[n, H, W]`` bool.
  """
  h, w = int(image_hw[0]), int(image_hw[1])
  probs = np.asarray(probs, np.float32)
  boxes = np.asarray(boxes, np.float32)
  out = np.zeros((len(probs), h, w), bool)
  thr = np.float32(threshold)
  for i, (m, b) in enumerate(zip(probs, boxes)):
    if not np.all(np.isfinite(b)):
      continue
    s = m.shape[-1]
    ys = (max(0, int(math.floor(b[1])) - 1), min(h, int(math.ceil(b[3])) + 1))
    xs = (max(0, int(math.floor(b[0])) - 1), min(w, int(math.ceil(b[2])) + 1))
    if ys[1] <= ys[0] or xs[1] <= xs[0]:
      continue
    y0, y1, wy0, wy1 = _axis_taps(b[1], b[3], ys[0], ys[1], s)
    x0, x1, wx0, wx1 = _axis_taps(b[0], b[2], xs[0], xs[1], s)
    rows = m[y0] * wy0[:, None] + m[y1] * wy1[:, None]
    values = rows[:, x0] * wx0[None, :] + rows[:, x1] * wx1[None, :]
    out[i, ys[0]:ys[1], xs[0]:xs[1]] = values >= thr
  return out


def encode_rle(masks: np.ndarray) -> list[dict[str, Any]]:
  """COCO compressed RLE of ``[n, H, W]`` masks, ``counts`` as str (JSON-serializable)."""
  if len(masks) == 0:
    return []
  import pycocotools.mask as mask_util  # only RLE needs it (not installed on device machines)
  rles = mask_util.encode(np.asfortranarray(np.moveaxis(np.asarray(masks), 0, -1)
                                            .astype(np.uint8)))
  for r in rles:
    r["counts"] = r["counts"].decode("ascii")
  return list(rles)


# --- Semantic models ---


def linear_taps(in_size: int, out_size: int
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
  """Source indices and weights ``(i0, i1, l0, l1)`` of PyTorch's ``align_corners=False``
  linear resize.

  Mirrors the CPU kernel's float32 arithmetic: ``scale = float32(in) / float32(out)``, source
  position ``scale * (dst + 0.5) - 0.5`` clamped at 0; ``i0`` its floor (at most ``in - 1``),
  ``i1 = i0 + 1`` except at the last row, ``l1 = pos - i0`` (clamped to [0, 1]), ``l0 = 1 - l1``.
  """
  f32 = np.float32
  scale = f32(in_size) / f32(out_size)
  pos = np.maximum(scale * (np.arange(out_size, dtype=f32) + f32(0.5)) - f32(0.5), f32(0))
  i0 = np.minimum(np.floor(pos).astype(np.int64), in_size - 1)
  l1 = np.clip(pos - i0.astype(f32), f32(0), f32(1)).astype(f32)
  return i0, np.where(i0 < in_size - 1, i0 + 1, i0), (f32(1) - l1).astype(f32), l1


def resize_bilinear(x: np.ndarray, out_hw: Sequence[int]) -> np.ndarray:
  """PyTorch bilinear (align_corners=False, no antialias) ``[H, W, C] -> [h, w, C]``; the width
  pass first, like :func:`pointrend_jax.modeling.semantic.resize_bilinear`."""
  for axis, size in ((1, int(out_hw[1])), (0, int(out_hw[0]))):
    if x.shape[axis] == size:
      continue
    i0, i1, l0, l1 = linear_taps(x.shape[axis], size)
    shape = [1, 1, 1]
    shape[axis] = size
    x = (np.take(x, i0, axis=axis) * l0.reshape(shape)
         + np.take(x, i1, axis=axis) * l1.reshape(shape))
  return x


def semantic_result(logits: np.ndarray, orig_size: Sequence[int], resized_size: Sequence[int],
                    class_names: Sequence[str], *, return_logits: bool = False
                    ) -> SemanticResult:
  """One image's :class:`SemanticResult` from its ``[H, W, C]`` padded logits."""
  orig = (int(orig_size[0]), int(orig_size[1]))
  x = resize_bilinear(np.asarray(logits, np.float32)[:resized_size[0], :resized_size[1]], orig)
  return SemanticResult(image_size=orig, sem_seg=np.argmax(x, axis=-1).astype(np.int32),
                        class_names=list(class_names), logits=x if return_logits else None)
