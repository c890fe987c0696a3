"""Pictures of a model's predictions for the demo (PIL only): overlays and point stages.

For each visualised val image two PNGs are written:

* ``<id>_overlay.png``: ground truth | PointRend masks | coarse 7x7 masks, side by side, drawn
  at ``zoom`` times the image size. Predicted masks are pasted *at the zoomed size* from the
  box-frame probabilities (224x224 PointRend logits vs 7x7 coarse logits, bilinear, threshold
  0.5), so the difference in boundary quality is visible even for small images.
* ``<id>_points.png``: one row per detection (highest scores first): the image crop of the box,
  the coarse 7x7 probabilities (nearest), the 28x28 regular-grid prediction, every subdivision
  step's bilinearly upsampled probabilities with the points selected for the point head (red),
  and the final probabilities. The steps are rebuilt on the host from the logged indices and
  point logits, exactly as the model computes them.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import jax.numpy as jnp
import numpy as np
from PIL import Image, ImageDraw

from pointrend_jax.ops.paste_masks import paste_masks_in_image
from pointrend_jax.ops.point_sample import interpolate_bilinear_x2

__all__ = ["PALETTE", "overlay", "subdivision_stages", "write_pictures"]

PALETTE = np.array([(230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48),
                    (145, 30, 180), (70, 240, 240), (240, 50, 230), (210, 245, 60),
                    (250, 190, 190), (0, 128, 128), (170, 110, 40)], np.uint8)
_PANEL = 192


def _boundary(mask: np.ndarray) -> np.ndarray:
  m = mask.astype(bool)
  inner = m.copy()
  inner[1:] &= m[:-1]
  inner[:-1] &= m[1:]
  inner[:, 1:] &= m[:, :-1]
  inner[:, :-1] &= m[:, 1:]
  return m & ~inner


def overlay(image: np.ndarray, masks: Sequence[np.ndarray], classes: Sequence[int],
            boxes: Sequence[Sequence[float]] | None = None,
            labels: Sequence[str] | None = None, alpha: float = 0.45) -> Image.Image:
  """``image`` with each mask filled (class colour, ``alpha``), outlined, boxed and labelled."""
  out = image.astype(np.float32).copy()
  for m, c in zip(masks, classes):
    m = np.asarray(m, bool)
    colour = PALETTE[int(c) % len(PALETTE)].astype(np.float32)
    out[m] = out[m] * (1 - alpha) + colour * alpha
    out[_boundary(m)] = 255  # white outline: the boundary is what PointRend refines
  pil = Image.fromarray(np.clip(out, 0, 255).astype(np.uint8))
  draw = ImageDraw.Draw(pil)
  for k, c in enumerate(classes):
    colour = tuple(int(v) for v in PALETTE[int(c) % len(PALETTE)])
    if boxes is not None:
      draw.rectangle([float(v) for v in boxes[k]], outline=colour)
    if labels is not None and boxes is not None:
      x0, y0 = float(boxes[k][0]), float(boxes[k][1])
      draw.text((x0 + 2, max(0.0, y0 - 11)), labels[k], fill=colour)
  return pil


def _gt_masks(record: Mapping[str, Any]) -> tuple[list[np.ndarray], list[int], list[Any]]:
  from pointrend_jax.data import coco
  masks, classes, boxes = [], [], []
  for a in record.get("annotations", ()):
    if a.get("iscrowd", 0) or "segmentation" not in a:
      continue
    masks.append(coco.decode_segmentation(a["segmentation"], int(record["height"]),
                                          int(record["width"])))
    classes.append(int(a["category_id"]))
    boxes.append(np.asarray(a["bbox"], np.float64))
  return masks, classes, boxes


def _zoomed_masks(probs: np.ndarray, boxes: np.ndarray, hw: tuple[int, int], zoom: int,
                  threshold: float) -> np.ndarray:
  if len(boxes) == 0:
    return np.zeros((0,) + hw, bool)
  return np.asarray(paste_masks_in_image(jnp.asarray(probs, jnp.float32),
                                         jnp.asarray(boxes, jnp.float32) * zoom,
                                         (hw[0] * zoom, hw[1] * zoom), threshold))


def _labelled(panel: Image.Image, title: str) -> Image.Image:
  out = Image.new("RGB", (panel.width, panel.height + 14), (255, 255, 255))
  out.paste(panel, (0, 14))
  ImageDraw.Draw(out).text((3, 1), title, fill=(0, 0, 0))
  return out


def _hstack(panels: Sequence[Image.Image], gap: int = 4) -> Image.Image:
  w = sum(p.width for p in panels) + gap * (len(panels) - 1)
  h = max(p.height for p in panels)
  out = Image.new("RGB", (w, h), (255, 255, 255))
  x = 0
  for p in panels:
    out.paste(p, (x, 0))
    x += p.width + gap
  return out


def _vstack(rows: Sequence[Image.Image], gap: int = 4) -> Image.Image:
  w = max(r.width for r in rows)
  h = sum(r.height for r in rows) + gap * (len(rows) - 1)
  out = Image.new("RGB", (w, h), (255, 255, 255))
  y = 0
  for r in rows:
    out.paste(r, (0, y))
    y += r.height + gap
  return out


def _sigmoid(x: np.ndarray) -> np.ndarray:
  return 1.0 / (1.0 + np.exp(-np.asarray(x, np.float64)))


def subdivision_stages(init_logits: np.ndarray, indices: np.ndarray | None,
                       point_logits: np.ndarray | None) -> list[dict[str, np.ndarray]]:
  """Rebuilds one detection's subdivision: per step the upsampled logits, the selected cells.

  Args:
    init_logits: ``[R, R]`` step-0 logits on the regular grid.
    indices: ``[steps, P]`` flat indices into each step's upsampled map (or None).
    point_logits: ``[steps, P]`` the point head's logits there.

  Returns:
    Per step ``{"upsampled": [H, W], "points": [P, 2] (row, col), "refined": [H, W]}``.
  """
  mask = np.asarray(init_logits, np.float32)
  stages = []
  for s in range(0 if indices is None else len(indices)):
    up = np.asarray(interpolate_bilinear_x2(jnp.asarray(mask)[None, :, :, None]))[0, :, :, 0]
    h, w = up.shape
    flat = up.reshape(-1).copy()
    idx = np.asarray(indices[s], np.int64)
    flat[idx] = np.asarray(point_logits[s], np.float32)
    mask = flat.reshape(h, w)
    stages.append({"upsampled": up, "points": np.stack([idx // w, idx % w], axis=1),
                   "refined": mask})
  return stages


def _prob_panel(probs: np.ndarray, size: int = _PANEL,
                points: np.ndarray | None = None, map_hw: tuple[int, int] | None = None
                ) -> Image.Image:
  gray = (np.clip(probs, 0, 1) * 255).astype(np.uint8)
  pil = Image.fromarray(gray).convert("RGB").resize((size, size), Image.NEAREST)
  if points is not None:
    h, w = map_hw
    draw = ImageDraw.Draw(pil)
    for r, c in points:
      x, y = (c + 0.5) / w * size, (r + 0.5) / h * size
      draw.point((x, y), fill=(255, 0, 0))
  return pil


def _crop_panel(image: np.ndarray, box: Sequence[float], size: int = _PANEL) -> Image.Image:
  x0, y0, x1, y1 = (float(v) for v in box)
  pil = Image.fromarray(image)
  return pil.resize((size, size), Image.BILINEAR, box=(x0, y0, max(x1, x0 + 1e-3),
                                                      max(y1, y0 + 1e-3)))


def write_pictures(visuals: Sequence[Mapping[str, Any]], class_names: Sequence[str],
                   out_dir: str, *, threshold: float = 0.5, zoom: int | None = None,
                   max_detections: int = 3, min_score: float = 0.5) -> list[str]:
  """Writes ``<id>_overlay.png`` and ``<id>_points.png`` per visual (see the module docstring).

  Args:
    visuals: from :class:`~pointrend_jax.training.loop.Evaluator` (``record``,
      ``image_size``, ``orig_size``, per-image ``outputs`` of the predict function and the
      postprocessed ``results`` per mask variant).
    class_names: contiguous class names.
    out_dir: created.
    threshold: mask threshold.
    zoom: display scale (default: long side about 400 px).
    max_detections: rows of the point-stage picture.
    min_score: detections drawn in the overlays.

  Returns:
    The written paths.
  """
  from pointrend_jax.data import coco
  os.makedirs(out_dir, exist_ok=True)
  paths = []
  for vis in visuals:
    record = vis["record"]
    image = coco.load_image(record)
    h, w = image.shape[:2]
    z = zoom or max(1, int(round(400 / max(h, w))))
    big = np.asarray(Image.fromarray(image).resize((w * z, h * z), Image.BILINEAR))
    stem = f"{int(record.get('image_id', 0)):06d}"

    masks, classes, boxes = _gt_masks(record)
    gt_big = [np.asarray(Image.fromarray(m.astype(np.uint8)).resize((w * z, h * z),
                                                                    Image.NEAREST), bool)
              for m in masks]
    panels = [_labelled(overlay(big, gt_big, classes, [b * z for b in boxes],
                                [class_names[c] for c in classes]), "ground truth")]
    out = vis["outputs"]
    for variant, key, title in (("segm", "mask_probs", "PointRend (224x224 -> pasted)"),
                                ("segm_coarse", "coarse_probs", "coarse 7x7 (bilinear)")):
      if variant not in vis["results"]:
        continue
      r = vis["results"][variant]
      keep = r["scores"] >= min_score
      rows = r["index"][keep]
      zm = _zoomed_masks(out[key][rows], r["boxes"][keep], (h, w), z, threshold)
      labels = [f"{class_names[c]} {s:.2f}" for c, s in zip(r["classes"][keep],
                                                           r["scores"][keep])]
      panels.append(_labelled(overlay(big, list(zm), r["classes"][keep],
                                      r["boxes"][keep] * z, labels), title))
    path = os.path.join(out_dir, f"{stem}_overlay.png")
    _hstack(panels).save(path)
    paths.append(path)

    # Point stages of the top detections (boxes in resized-image pixels, as the model saw them).
    valid = np.asarray(out["valid"], bool)
    order = [d for d in np.argsort(-np.asarray(out["scores"])) if valid[d]][:max_detections]
    if not order:
      continue
    resized = vis.get("image")
    if resized is None:
      resized = image
    rows_img = []
    for d in order:
      c = int(out["classes"][d])
      stages = subdivision_stages(out["init_logits"][d],
                                  out["indices"][d] if "indices" in out else None,
                                  out["point_logits"][d] if "point_logits" in out else None)
      init = out["init_logits"][d]
      row = [_labelled(_crop_panel(resized, out["boxes"][d]),
                       f"{class_names[c]} {float(out['scores'][d]):.2f}"),
             _labelled(_prob_panel(out["coarse_probs"][d]), "coarse 7x7"),
             _labelled(_prob_panel(_sigmoid(init)), f"step 0: {init.shape[0]}x{init.shape[1]}")]
      for s, st in enumerate(stages):
        hs, ws = st["upsampled"].shape
        row.append(_labelled(_prob_panel(_sigmoid(st["upsampled"]), points=st["points"],
                                         map_hw=(hs, ws)),
                             f"step {s + 1}: x2 -> {hs}x{ws}, {len(st['points'])} pts"))
      final = stages[-1]["refined"] if stages else init
      row.append(_labelled(_prob_panel(_sigmoid(final)), f"final {final.shape[0]}x"
                           f"{final.shape[1]}"))
      rows_img.append(_hstack(row))
    path = os.path.join(out_dir, f"{stem}_points.png")
    _vstack(rows_img).save(path)
    paths.append(path)
  return paths
