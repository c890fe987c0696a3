"""The FPN multi-level ROI pooler (detectron2 ``ROIPooler``, spec ``mask_rcnn_fpn.md`` §7.2).

Each box is assigned one FPN level by its size and ROIAligned from that level only. Instead of
pooling every box from every level (4x the work) or gathering boxes per level (dynamic shapes),
all levels are flattened into one ``[sum_l N * H_l * W_l, C]`` buffer and every ROI samples its
own level's rows with its own ``H_l``, ``W_l``, scale and row offset: the cost is that of a single
ROIAlign over all boxes.
"""

from __future__ import annotations

import functools
import math
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from pointrend_jax.ops.roi_align import (OutputSize, adaptive_samples_bound, default_chunk_size,
                                         normalize_output_size, pool_flat_maps)

__all__ = ["assign_boxes_to_levels", "multilevel_roi_align", "levels_from_scales"]

Array = jax.Array


def assign_boxes_to_levels(boxes: Array,
                           min_level: int = 2,
                           max_level: int = 5,
                           canonical_box_size: float = 224.0,
                           canonical_level: int = 4) -> Array:
  """FPN level of each box: ``clamp(floor(canonical_level + log2(sqrt(area) / size + 1e-8)))``.

  Computed in float32 like detectron2's ``assign_boxes_to_levels``; ``area = (x1 - x0)(y1 - y0)``
  of the box as given (xyxy, input pixels).

  Args:
    boxes: ``[R, 4]`` xyxy.
    min_level, max_level: clamp range (2 and 5 for p2..p5).
    canonical_box_size, canonical_level: a box of sqrt-area ``canonical_box_size`` maps to
      ``canonical_level``.

  Returns:
    ``[R]`` int32 absolute levels in ``[min_level, max_level]`` (detectron2 returns
    ``level - min_level``). Boxes with negative area (NaN size) get ``min_level``.
  """
  boxes = jnp.asarray(boxes).astype(jnp.float32)
  area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
  level = jnp.floor(canonical_level +
                    jnp.log2(jnp.sqrt(area) / jnp.float32(canonical_box_size) + jnp.float32(1e-8)))
  level = jnp.where(jnp.isnan(level), min_level, jnp.clip(level, min_level, max_level))
  return level.astype(jnp.int32)


def levels_from_scales(scales: Sequence[float]) -> tuple[int, int]:
  """``(min_level, max_level)`` of consecutive power-of-two scales ``2**-level`` (detectron2)."""
  levels = [-math.log2(s) for s in scales]
  lo = int(round(levels[0]))
  if any(abs(l - (lo + i)) > 1e-6 for i, l in enumerate(levels)):
    raise ValueError(f"scales must be 2**-k for consecutive k, got {list(scales)}")
  return lo, lo + len(scales) - 1


def multilevel_roi_align(features: Sequence[Array],
                         boxes: Array,
                         batch_index: Array,
                         scales: Sequence[float],
                         output_size: OutputSize = 7,
                         sampling_ratio: int = 0,
                         aligned: bool = True,
                         canonical_box_size: float = 224.0,
                         canonical_level: int = 4,
                         max_image_side: Optional[float] = None,
                         min_image_side: Optional[float] = None,
                         max_samples_per_bin: Optional[int] = None,
                         chunk_size: Optional[int] = None) -> Array:
  """detectron2 ``ROIPooler`` (ROIAlign / ROIAlignV2 per level) over FPN maps.

  Args:
    features: per level ``[N, H_l, W_l, C]`` (e.g. p2..p5), finest first.
    boxes: ``[R, 4]`` xyxy in input pixels (proposals; the level rule uses their area as given).
    batch_index: ``[R]`` int image of each box.
    scales: ``1 / stride`` per level, consecutive powers of two (``(1/4, 1/8, 1/16, 1/32)``).
    output_size: ``ph`` or ``(ph, pw)`` (7 for the box head).
    sampling_ratio: 0 = adaptive (detectron2's POOLER_SAMPLING_RATIO 0).
    aligned: True = ROIAlignV2.
    canonical_box_size, canonical_level: the level rule (224 at level 4).
    max_image_side, min_image_side: if given, the static per-bin sample cap is
      :func:`~pointrend_jax.ops.roi_align.adaptive_samples_bound` of the image size (48 for
      1333 x 800, 74 for 2048 x 1024): exact for all boxes inside such an image, and a bounded
      cost for any box. ``None`` = no cap (exact for every box).
    max_samples_per_bin: explicit cap (overrides the image-size bound).
    chunk_size: see :func:`~pointrend_jax.ops.roi_align.roi_align`.

  Returns:
    ``[R, ph, pw, C]`` in input ROI order; row ``r`` is pooled from level
    ``assign_boxes_to_levels(boxes)[r]`` of image ``batch_index[r]``. Differentiable w.r.t. the
    features (reverse mode).
  """
  if len(features) != len(scales):
    raise ValueError(f"{len(features)} feature maps but {len(scales)} scales")
  min_level, max_level = levels_from_scales(scales)
  if max_samples_per_bin is None and max_image_side is not None:
    max_samples_per_bin = adaptive_samples_bound(max_image_side, output_size, min_level,
                                                 max_level, canonical_box_size, canonical_level,
                                                 min_image_side)
  cap = None if max_samples_per_bin is None else int(max_samples_per_bin)
  features = tuple(jnp.asarray(f) for f in features)
  boxes, batch_index = jnp.asarray(boxes), jnp.asarray(batch_index)
  return _multilevel_roi_align(features, boxes, batch_index,
                               tuple(float(s) for s in scales),
                               normalize_output_size(output_size), int(sampling_ratio),
                               bool(aligned), float(canonical_box_size), int(canonical_level), cap,
                               default_chunk_size(chunk_size))


@functools.partial(jax.jit, static_argnums=tuple(range(3, 11)))
def _multilevel_roi_align(features, boxes, batch_index, scales, pooled, sampling_ratio, aligned,
                          canonical_box_size, canonical_level, max_samples_per_bin, chunk_size):
  min_level, max_level = levels_from_scales(scales)
  n, c = features[0].shape[0], features[0].shape[-1]
  heights = [f.shape[1] for f in features]
  widths = [f.shape[2] for f in features]
  offsets = np.cumsum([0] + [n * h * w for h, w in zip(heights, widths)])[:-1]
  level = assign_boxes_to_levels(boxes, min_level, max_level, canonical_box_size,
                                 canonical_level) - min_level
  pick = lambda values, dtype: jnp.asarray(np.asarray(values), dtype)[level]
  height, width = pick(heights, jnp.int32), pick(widths, jnp.int32)
  b = jnp.clip(batch_index.astype(jnp.int32), 0, n - 1)
  row0 = pick(offsets, jnp.int32) + b * height * width
  flat = jnp.concatenate([f.reshape(-1, c) for f in features], axis=0)
  return pool_flat_maps(flat, boxes, pick(scales, jnp.float32), height, width, row0, pooled,
                        sampling_ratio, aligned, max_samples_per_bin, chunk_size)
