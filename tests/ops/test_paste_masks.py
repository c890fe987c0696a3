"""Tests of ``pointrend_jax.ops.paste_masks`` (detectron2 ``paste_masks_in_image``)."""

from __future__ import annotations

import numpy as np
import pytest

from pointrend_jax.ops.paste_masks import paste_masks_in_image
from pointrend_jax.parity.compare import compare
from pointrend_jax.parity.ops_boxes import CHECKS


@pytest.mark.parametrize("name", ["out_paste_masks_28", "out_paste_masks_224"])
def test_parity_with_detectron2(ops_golden, name):
  check = CHECKS[name]
  row = compare(name, check, ops_golden[name], check.compute(ops_golden))
  assert row.passed, row


def reference_paste(masks, boxes, hw):
  """Plain 4-tap ``grid_sample`` (float64) over the whole image, written from the spec (§12)."""
  h, w = hw
  d, s, _ = masks.shape
  out = np.zeros((d, h, w))
  for k in range(d):
    x0, y0, x1, y1 = boxes[k].astype(np.float64)
    u = (np.arange(w) + 0.5 - x0) / (x1 - x0) * s - 0.5
    v = (np.arange(h) + 0.5 - y0) / (y1 - y0) * s - 0.5
    padded = np.pad(masks[k].astype(np.float64), 1)  # Zero padding; index shift +1.
    fu, fv = np.floor(u), np.floor(v)
    for dy, wy in ((0, 1 - (v - fv)), (1, v - fv)):
      iy = np.clip(fv + dy, -1, s).astype(int) + 1
      for dx, wx in ((0, 1 - (u - fu)), (1, u - fu)):
        ix = np.clip(fu + dx, -1, s).astype(int) + 1
        out[k] += wy[:, None] * wx[None, :] * padded[iy][:, ix]
  return out


def _smooth_masks(rng, d, s):
  coarse = rng.random((d, 4, 4))
  idx = np.linspace(0, 3, s)
  lo = np.floor(idx).astype(int).clip(0, 2)
  t = idx - lo
  rows = coarse[:, lo] * (1 - t)[None, :, None] + coarse[:, lo + 1] * t[None, :, None]
  return (rows[:, :, lo] * (1 - t) + rows[:, :, lo + 1] * t).astype(np.float32)


@pytest.mark.parametrize("method", ["separable", "matmul"])
def test_matches_reference_on_random_masks(method):
  rng = np.random.default_rng(0)
  hw = (37, 53)
  masks = _smooth_masks(rng, 6, 28)
  boxes = np.array([[5.2, 3.1, 40.7, 30.3], [-10, -4, 20, 15], [30.5, 20.5, 70, 50],
                    [12, 12, 13.5, 13], [0, 0, 53, 37], [25.25, 1.75, 31.5, 36.0]], np.float32)
  ref = reference_paste(masks, boxes, hw)
  out = np.asarray(paste_masks_in_image(masks, boxes, hw, method=method, chunk_size=4))
  assert out.shape == (6,) + hw and out.dtype == bool
  decided = np.abs(ref - 0.5) > 1e-5  # float32 vs float64 may differ right at the threshold.
  np.testing.assert_array_equal(out[decided], ref[decided] >= 0.5)
  assert out.sum() > 100


def test_degenerate_box_gives_empty_mask_and_threshold():
  masks = np.full((2, 14, 14), 0.7, np.float32)
  boxes = np.array([[5, 5, 5, 9], [2, 2, 8, 8]], np.float32)
  out = np.asarray(paste_masks_in_image(masks, boxes, (10, 12)))
  assert not out[0].any()
  # Exactly the pixels whose centres lie in the box: the next ones out read only zero padding.
  assert out[1, 2:8, 2:8].all() and out[1].sum() == 36
  assert paste_masks_in_image(masks, boxes, (10, 12), threshold=0.8).sum() == 0
