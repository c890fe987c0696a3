"""The host half of inference: images of any size in, per-image results out.

:class:`ImagePredictor` reads each image (:func:`to_rgb_uint8`), resizes it as detectron2 does at
test time (``ResizeShortestEdge``, PIL bilinear), pads it into a bucket canvas, runs its
:attr:`~ImagePredictor.program` on each batch of one bucket, and turns the padded predictions
into results at the original size (:mod:`pointrend_jax.postprocess`). The program is the
device half: a :class:`~pointrend_jax.modeling.predict.PredictProgram` compiled here
(:class:`pointrend_jax.inference.Predictor`) or deserialized StableHLO
(:class:`pointrend_jax.stablehlo.ExportedPredictor`). This module imports neither flax nor the
model code.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping, Sequence
from typing import Any, Union

import jax
import numpy as np
from PIL import Image

from pointrend_jax import postprocess
from pointrend_jax.data import batching
from pointrend_jax.data.coco import read_image
from pointrend_jax.data.transforms import resize_image, resize_shortest_edge_size
from pointrend_jax.postprocess import Instances, SubdivisionStages

__all__ = ["ImageLike", "ImagePredictor", "to_rgb_uint8"]

ImageLike = Union[np.ndarray, str, os.PathLike, Image.Image]

_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")


def to_rgb_uint8(image: ImageLike) -> np.ndarray:
  """Any supported image -> RGB uint8 ``[H, W, 3]`` (contiguous).

  * paths: :func:`pointrend_jax.data.coco.read_image` (EXIF orientation, grayscale, palette,
    CMYK, RGBA, 16-bit; ``FileNotFoundError`` / ``ValueError`` naming the file);
  * ``PIL.Image``: as a file would be read (without EXIF);
  * arrays: ``[H, W]`` / ``[H, W, 1]`` grayscale, ``[H, W, 3]`` RGB, ``[H, W, 4]`` RGBA (alpha
    dropped, as PIL's ``convert("RGB")``); uint8, uint16 (``round(v / 257)``, as 16-bit files),
    other integer or bool types holding 0..255. Float arrays are refused: their range (0..1 or
    0..255) is ambiguous.
  """
  if isinstance(image, (str, os.PathLike)):
    return read_image(image)
  if isinstance(image, Image.Image):
    if image.mode in _SIXTEEN_BIT_MODES:
      return to_rgb_uint8(np.asarray(image).astype(np.uint16 if image.mode != "I" else np.int64))
    return np.ascontiguousarray(np.asarray(image.convert("RGB"), np.uint8))
  a = np.asarray(image)
  if a.ndim == 3 and a.shape[2] == 1:
    a = a[:, :, 0]
  if a.ndim not in (2, 3) or (a.ndim == 3 and a.shape[2] not in (3, 4)):
    raise ValueError(f"image array must be [H, W], [H, W, 1], [H, W, 3] or [H, W, 4], got "
                     f"shape {a.shape}")
  if a.shape[0] == 0 or a.shape[1] == 0:
    raise ValueError(f"image is empty: shape {a.shape}")
  if a.dtype == np.uint16:
    a = ((a.astype(np.int64) * 255 + 32767) // 65535).astype(np.uint8)
  elif a.dtype == bool:
    a = a.astype(np.uint8) * 255
  elif np.issubdtype(a.dtype, np.integer) and a.dtype != np.uint8:
    if a.size and (a.min() < 0 or a.max() > 255):
      raise ValueError(f"{a.dtype} image values must be in 0..255, got {a.min()}..{a.max()}")
    a = a.astype(np.uint8)
  elif a.dtype != np.uint8:
    raise TypeError(f"image dtype {a.dtype} is not supported; pass uint8 (0..255)")
  if a.ndim == 2:
    a = np.repeat(a[:, :, None], 3, axis=2)
  return np.ascontiguousarray(a[:, :, :3])


class ImagePredictor:
  """Images in, :class:`~pointrend_jax.postprocess.Instances` /
  :class:`~pointrend_jax.postprocess.SemanticResult` out, around a program of padded batches.

  Args:
    class_names: names of the class ids.
    is_semantic: semantic (label maps) or instance (detections) results.
    min_size_test, max_size_test: the test-time resize (``INPUT.MIN_SIZE_TEST`` / ``MAX_SIZE_TEST``).
    divisor: canvas sides are multiples of it (the backbone's size divisibility).
    buckets: padding canvases: None (the evaluation buckets of the test sizes), ``"exact"``
      (``ceil32`` per image) or a sequence of ``(H, W)``.
    batch_size: images per program call; a partial last batch is padded with blank images.
    score_threshold: keep detections with ``score > score_threshold`` (instance models).
    mask_threshold: mask pixel threshold on the probabilities (detectron2: 0.5).
    exact_fallback: an image that fits no bucket is padded to ``ceil32`` (a new compilation;
      with a warning) instead of raising ``ValueError``.

  Subclasses set :attr:`program` (``(images [B, H, W, 3] uint8, image_sizes [B, 2] int32) ->
  padded predictions``, with a ``compile_seconds`` dict) and, for
  :meth:`predict_with_stages`, :attr:`stages_program`.
  """

  def __init__(self, *, class_names: Sequence[str], is_semantic: bool, min_size_test: int,
               max_size_test: int, divisor: int,
               buckets: str | Sequence[tuple[int, int]] | None = None, batch_size: int = 1,
               score_threshold: float | None = None, mask_threshold: float = 0.5,
               exact_fallback: bool = True):
    if batch_size < 1:
      raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    self.class_names = list(class_names)
    self.is_semantic = bool(is_semantic)
    self.min_size_test, self.max_size_test = int(min_size_test), int(max_size_test)
    self._divisor = int(divisor)
    self.batch_size = int(batch_size)
    self.score_threshold = score_threshold
    self.mask_threshold = float(mask_threshold)
    self.exact_fallback = exact_fallback
    if buckets is None:
      buckets = batching.bucket_sizes(min_size_test, max_size_test, self._divisor)
    elif isinstance(buckets, str):
      if buckets != "exact":
        raise ValueError(f"buckets must be None, 'exact' or a list of (H, W), got {buckets!r}")
    else:
      buckets = tuple((int(h), int(w)) for h, w in buckets)
      if any(h % self._divisor or w % self._divisor for h, w in buckets):
        raise ValueError(f"bucket sides must be multiples of {self._divisor}: {buckets}")
    self.buckets = buckets
    self.program: Any = None
    self.stages_program: Any = None
    self._warned_fallback = False

  @property
  def num_compiles(self) -> int:
    """How many programs have been compiled (one per program x batch size x bucket)."""
    return sum(len(p.compile_seconds) for p in (self.program, self.stages_program) if p)

  def resized_size(self, height: int, width: int) -> tuple[int, int]:
    """detectron2's test-time ``ResizeShortestEdge`` output ``(h, w)``."""
    return resize_shortest_edge_size(height, width, self.min_size_test, self.max_size_test)

  def bucket_for(self, height: int, width: int) -> tuple[int, int]:
    """The padded canvas of a *resized* ``height x width`` image."""
    exact = (batching.ceil_to(height, self._divisor), batching.ceil_to(width, self._divisor))
    if isinstance(self.buckets, str):
      return exact
    try:
      return batching.choose_bucket(height, width, self.buckets)
    except ValueError:
      if not self.exact_fallback:
        raise ValueError(f"a {height}x{width} (resized) image fits no bucket of "
                         f"{list(self.buckets)}") from None
      if not self._warned_fallback:
        warnings.warn(f"a {height}x{width} image fits no bucket of {list(self.buckets)}; "
                      "padding it to multiples of 32 (one more compilation)", stacklevel=3)
        self._warned_fallback = True
      return exact

  def _prepare(self, image: ImageLike) -> tuple[np.ndarray, tuple[int, int], tuple[int, int]]:
    rgb = to_rgb_uint8(image)
    orig = rgb.shape[:2]
    resized_hw = self.resized_size(*orig)
    return resize_image(rgb, resized_hw), (int(orig[0]), int(orig[1])), resized_hw

  def _run(self, program: Any,
           prepared: list[tuple[np.ndarray, tuple[int, int], tuple[int, int]]]
           ) -> list[dict[str, Any]]:
    """Runs ``prepared`` images grouped by bucket; returns per-image numpy outputs (row ``i`` of
    the batch outputs) in input order."""
    groups: dict[tuple[int, int], list[int]] = {}
    for i, (_, _, hw) in enumerate(prepared):
      groups.setdefault(self.bucket_for(*hw), []).append(i)
    results: list[dict[str, Any] | None] = [None] * len(prepared)
    bs = self.batch_size
    for bucket, members in groups.items():
      for start in range(0, len(members), bs):
        chunk = members[start:start + bs]
        images = np.zeros((bs, bucket[0], bucket[1], 3), np.uint8)
        sizes = np.tile(np.asarray(bucket, np.int32), (bs, 1))  # blank slots: whole canvas
        for j, i in enumerate(chunk):
          img, _, (h, w) = prepared[i]
          images[j, :h, :w] = img
          sizes[j] = (h, w)
        out = jax.device_get(program(images, sizes))
        for j, i in enumerate(chunk):
          results[i] = jax.tree.map(lambda a, j=j: a[j], out)
    return results  # type: ignore[return-value]

  def _instances(self, out: Mapping[str, np.ndarray], orig: tuple[int, int],
                 resized: tuple[int, int]) -> tuple[Instances, np.ndarray]:
    return postprocess.instances(out, orig, resized, self.class_names,
                                 mask_threshold=self.mask_threshold,
                                 score_threshold=self.score_threshold)

  def __call__(self, images: ImageLike | Sequence[ImageLike], *, return_logits: bool = False
               ) -> Any:
    """Predicts one image or a list of images.

    Args:
      images: one image (numpy array, path or ``PIL.Image``; see :func:`to_rgb_uint8`) or a
        list / tuple of them. Every image is read and checked before the model runs, so a bad
        file fails fast with an error naming it.
      return_logits: semantic models: also return the per-pixel logits.

    Returns:
      :class:`~pointrend_jax.postprocess.Instances` or
      :class:`~pointrend_jax.postprocess.SemanticResult` per image: a list for a list
      input, one result for a single image.
    """
    single = isinstance(images, (np.ndarray, str, os.PathLike, Image.Image))
    items = [images] if single else list(images)
    prepared = [self._prepare(im) for im in items]
    outs = self._run(self.program, prepared)
    if self.is_semantic:
      results = [postprocess.semantic_result(o["logits"], orig, hw, self.class_names,
                                             return_logits=return_logits)
                 for o, (_, orig, hw) in zip(outs, prepared)]
    else:
      results = [self._instances(o, orig, hw)[0] for o, (_, orig, hw) in zip(outs, prepared)]
    return results[0] if single else results

  def predict_with_stages(self, image: ImageLike) -> tuple[Instances, SubdivisionStages]:
    """One image's :class:`~pointrend_jax.postprocess.Instances` and the subdivision
    stages of each of its rows (instance models; :attr:`stages_program`)."""
    if self.is_semantic:
      raise ValueError("subdivision stages are shown for instance models only")
    prepared = [self._prepare(image)]
    _, orig, hw = prepared[0]
    (out,) = self._run(self.stages_program, prepared)
    inst, rows = self._instances(out, orig, hw)
    return inst, postprocess.subdivision_stages(out, rows, inst.boxes)
