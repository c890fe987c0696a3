"""Detections to original-image results (detectron2 ``detector_postprocess``), spec §12.

Two stages, so that the main jitted model never depends on the original image size:

* :func:`detector_postprocess` (jittable, fixed shapes, traced sizes): scale boxes from the
  resized image to the original ``(height, width)``, clip, and mark empty boxes invalid.
* :func:`paste_masks` (one compile per original size; call it per image outside the model's
  jit, or on host): paste ``[D, S, S]`` mask probabilities at the original size with
  :func:`pointrend_jax.ops.paste_masks.paste_masks_in_image`, invalid rows all False.

:func:`compact` turns one image's padded rows into numpy arrays of the valid rows only, in order
(what detectron2's ``Instances`` would hold).
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from pointrend_jax.ops.boxes import clip_boxes, nonempty_boxes
from pointrend_jax.ops.paste_masks import paste_masks_in_image

Array = jax.Array

__all__ = ["detector_postprocess", "paste_masks", "compact"]


def detector_postprocess(boxes: Array, valid: Array, image_sizes: Array,
                         output_sizes: Array) -> tuple[Array, Array]:
  """Rescales boxes to the original image size, clips them and drops empty ones.

  ``scale_x = width / W'``, ``scale_y = height / H'`` (float32 division of the integer sizes;
  detectron2 divides in float64 and then multiplies float32 boxes by the rounded factor, which
  agrees except in astronomically rare double-rounding cases); boxes clipped to
  ``[0, width] x [0, height]``; boxes with width or height ``<= 0`` become invalid.

  Args:
    boxes: ``[B, D, 4]`` xyxy in resized-image pixels.
    valid: ``[B, D]`` bool.
    image_sizes: ``[B, 2]`` int resized unpadded ``(H', W')``.
    output_sizes: ``[B, 2]`` int original ``(height, width)``.

  Returns:
    ``(boxes [B, D, 4], valid [B, D])`` in original-image pixels; invalid rows are 0. Valid rows
    keep their order (the valid rows are no longer a prefix if a box became empty).
  """
  boxes = jnp.asarray(boxes, jnp.float32)
  image_sizes = jnp.asarray(image_sizes).astype(jnp.float32)
  output_sizes = jnp.asarray(output_sizes).astype(jnp.float32)
  scale = output_sizes / image_sizes  # [B, 2] (y, x)
  sx, sy = scale[:, 1, None], scale[:, 0, None]
  boxes = boxes * jnp.stack([sx, sy, sx, sy], axis=-1)
  boxes = clip_boxes(boxes, (output_sizes[:, 0, None], output_sizes[:, 1, None]))
  valid = jnp.asarray(valid, bool) & nonempty_boxes(boxes)
  return jnp.where(valid[..., None], boxes, 0.0), valid


def paste_masks(mask_probs: Array, boxes: Array, valid: Array, output_hw: tuple[int, int],
                threshold: float = 0.5, **kwargs) -> Array:
  """Pastes one image's box-frame mask probabilities at the original size.

  Args:
    mask_probs: ``[D, S, S]`` probabilities (sigmoid of the predicted class's mask logits).
    boxes: ``[D, 4]`` boxes in original-image pixels (from :func:`detector_postprocess`).
    valid: ``[D]`` bool.
    output_hw: static original ``(height, width)``.
    threshold: pixel is ``probability >= threshold``.
    **kwargs: ``method`` / ``chunk_size`` of ``paste_masks_in_image``.

  Returns:
    ``[D, height, width]`` bool; invalid rows all False.
  """
  masks = paste_masks_in_image(mask_probs, boxes, output_hw, threshold, **kwargs)
  return masks & jnp.asarray(valid, bool)[:, None, None]


def compact(fields: Mapping[str, Array | np.ndarray], valid: Array | np.ndarray
            ) -> dict[str, np.ndarray]:
  """Host-side: keeps the valid rows (in order) of one image's per-detection arrays.

  Args:
    fields: ``{name: [D, ...]}`` arrays of one image.
    valid: ``[D]`` bool.

  Returns:
    ``{name: numpy [n, ...]}`` with ``n = valid.sum()``.
  """
  keep = np.asarray(valid, bool)
  return {name: np.asarray(a)[keep] for name, a in fields.items()}
