"""Benchmarks of ROIAlign, the FPN pooler and the separable mask-target crop.

``benchmarks()`` returns ``(name, fn, args)`` entries; ``fn`` is jitted and ``fn(*args)`` is one
timed call (the harness in ``bench/ops.py`` warms up and blocks on the result). Inputs mimic a
COCO test image resized to 800 x 1216: FPN maps of 256 channels, 1000 proposal-like boxes with
log-uniform sides in [8, 800] px (independent width and height) lying inside the image.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from pointrend_jax.ops.poolers import multilevel_roi_align
from pointrend_jax.ops.roi_align import roi_align, roi_align_separable

IMAGE_HW = (800, 1216)
CHANNELS = 256
NUM_BOXES = 1000
SCALES = (1 / 4, 1 / 8, 1 / 16, 1 / 32)


def proposal_boxes(rng: np.random.Generator, num: int, image_hw=IMAGE_HW, min_side=8.0,
                   max_side=800.0) -> np.ndarray:
  """``[num, 4]`` xyxy float32 boxes inside the image, log-uniform sides in [min, max]."""
  h, w = image_hw
  sides = np.exp(rng.uniform(np.log(min_side), np.log(max_side), size=(num, 2)))
  bw, bh = np.minimum(sides[:, 0], w), np.minimum(sides[:, 1], h)
  x0 = rng.uniform(0, w - bw)
  y0 = rng.uniform(0, h - bh)
  return np.stack([x0, y0, x0 + bw, y0 + bh], axis=1).astype(np.float32)


def _fpn_maps(rng: np.random.Generator, batch: int = 1) -> list[jax.Array]:
  h, w = IMAGE_HW
  return [jnp.asarray(rng.standard_normal((batch, int(h * s), int(w * s), CHANNELS),
                                          dtype=np.float32)) for s in SCALES]


def benchmarks() -> list[tuple[str, Callable[..., Any], tuple]]:
  rng = np.random.default_rng(0)
  maps = _fpn_maps(rng)
  boxes = jnp.asarray(proposal_boxes(rng, NUM_BOXES))
  bidx = jnp.zeros((NUM_BOXES,), jnp.int32)
  p2 = maps[0]

  def single(feat, boxes, bidx):
    return roi_align(feat, boxes, bidx, 7, SCALES[0], sampling_ratio=0, aligned=True)

  def pooler(feats, boxes, bidx):
    return multilevel_roi_align(feats, boxes, bidx, SCALES, output_size=7, sampling_ratio=0,
                                max_image_side=max(IMAGE_HW), min_image_side=min(IMAGE_HW))

  single_grad = jax.grad(lambda f, b, i: jnp.sum(single(f, b, i)))
  pooler_grad = jax.grad(lambda f, b, i: jnp.sum(pooler(f, b, i)))

  # Mask-target crop: 128 sampled ROIs (regressed boxes, not clipped: some exceed the image)
  # against 16 full-resolution GT bitmasks.
  num_gt, num_rois = 16, 128
  masks = jnp.asarray(rng.uniform(size=(num_gt,) + IMAGE_HW) < 0.5)
  roi_boxes = proposal_boxes(rng, num_rois)
  roi_boxes += rng.normal(scale=20.0, size=roi_boxes.shape).astype(np.float32)
  mask_index = jnp.asarray(rng.integers(0, num_gt, size=num_rois), jnp.int32)

  def mask_target(masks, boxes, index):
    return roi_align_separable(masks, boxes, index, 7, spatial_scale=1.0) >= 0.5

  return [
      ("roi_align_p2_1000x7x7_sr0_fwd", jax.jit(single), (p2, boxes, bidx)),
      ("roi_align_p2_1000x7x7_sr0_fwd_bwd", jax.jit(single_grad), (p2, boxes, bidx)),
      ("fpn_pooler_p2-p5_1000x7x7_fwd", jax.jit(pooler), (maps, boxes, bidx)),
      ("fpn_pooler_p2-p5_1000x7x7_fwd_bwd", jax.jit(pooler_grad), (maps, boxes, bidx)),
      ("mask_target_separable_128x7x7_800x1216", jax.jit(mask_target),
       (masks, jnp.asarray(roi_boxes), mask_index)),
  ]
