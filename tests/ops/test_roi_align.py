"""Tests of ``pointrend_jax.ops.roi_align`` (torchvision ROIAlign semantics, spec §7)."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pointrend_jax.ops.roi_align import (adaptive_grid_size_bound, adaptive_samples_bound,
                                         roi_align, roi_align_separable)
from pointrend_jax.parity.compare import compare
from pointrend_jax.parity.ops_roi_align import CHECKS

ROI_ALIGN_CHECKS = ("out_roi_align_sr0", "out_roi_align_sr2")  # The pooler's: test_poolers.py.
F32 = np.float32


@pytest.mark.parametrize("name", ROI_ALIGN_CHECKS)
def test_parity_with_detectron2(ops_golden, name):
  check = CHECKS[name]
  row = compare(name, check, ops_golden[name], check.compute(ops_golden))
  assert row.passed, row


# ----------------------------------------------------------------------------------------------
# Reference: the spec's §7.1 loops in float32 arithmetic, as a linear operator.
# ----------------------------------------------------------------------------------------------


def reference_matrix(shape, boxes, batch_index, output_size, scale, sampling_ratio, aligned):
  """``M`` ``[R, ph, pw, N, H, W]`` (float64) with ``roi_align(f) = M . f`` channel-wise.

  Sample positions and bilinear weights use numpy float32 scalars in torchvision's operation
  order; the sample sum and the division by the count are folded into M.
  """
  n, h, w = shape
  ph, pw = output_size
  m = np.zeros((len(boxes), ph, pw, n, h, w))
  off = F32(0.5) if aligned else F32(0.0)
  for r, (box, b) in enumerate(zip(boxes, batch_index)):
    x0, y0, x1, y1 = (F32(v) * F32(scale) - off for v in box)
    rw, rh = x1 - x0, y1 - y0
    if not aligned:
      rw, rh = max(rw, F32(1)), max(rh, F32(1))
    bin_h, bin_w = rh / F32(ph), rw / F32(pw)
    gh = sampling_ratio if sampling_ratio > 0 else int(math.ceil(bin_h))
    gw = sampling_ratio if sampling_ratio > 0 else int(math.ceil(bin_w))
    count = max(gh * gw, 1)
    for p in range(ph):
      for q in range(pw):
        for iy in range(max(gh, 0)):
          y = y0 + F32(p) * bin_h + (F32(iy) + F32(0.5)) * bin_h / F32(gh)
          for ix in range(max(gw, 0)):
            x = x0 + F32(q) * bin_w + (F32(ix) + F32(0.5)) * bin_w / F32(gw)
            if y < -1 or y > h or x < -1 or x > w:
              continue
            yy, xx = max(y, F32(0)), max(x, F32(0))
            ylo, xlo = int(yy), int(xx)
            if ylo >= h - 1:
              ylo = yhi = h - 1
              yy = F32(ylo)
            else:
              yhi = ylo + 1
            if xlo >= w - 1:
              xlo = xhi = w - 1
              xx = F32(xlo)
            else:
              xhi = xlo + 1
            ly, lx = yy - F32(ylo), xx - F32(xlo)
            hy, hx = F32(1) - ly, F32(1) - lx
            cell = m[r, p, q, b]
            cell[ylo, xlo] += hy * hx / count
            cell[ylo, xhi] += hy * lx / count
            cell[yhi, xlo] += ly * hx / count
            cell[yhi, xhi] += ly * lx / count
  return m


def apply_matrix(m, feats):
  """``[R, ph, pw, C]`` = M . feats (NHWC)."""
  return np.einsum("rpqnhw,nhwc->rpqc", m, feats.astype(np.float64))


def adjoint_matrix(m, cotangent):
  """``[N, H, W, C]`` = M^T . cotangent (the exact gradient w.r.t. the features)."""
  return np.einsum("rpqnhw,rpqc->nhwc", m, cotangent.astype(np.float64))


MAP_N, MAP_H, MAP_W = 2, 11, 14
SCALE = 0.5  # Boxes are in input pixels, the map covers 22 x 28.


def edge_case_boxes(rng):
  """Boxes in input pixels of a 22 x 28 image: typical, tiny, huge, outside, degenerate."""
  fixed = np.array([
      [3.0, 2.0, 19.0, 15.0],  # typical
      [0.0, 0.0, 28.0, 22.0],  # whole image
      [10.2, 7.7, 10.9, 8.1],  # tiny (< 1 feature pixel)
      [-40.0, -30.0, 70.0, 60.0],  # huge, covering the map with big sample grids
      [-8.0, -5.0, 6.0, 4.0],  # partly outside (top-left)
      [20.0, 15.0, 45.0, 33.0],  # partly outside (bottom-right)
      [30.0, 25.0, 50.0, 40.0],  # fully outside
      [-30.0, -20.0, -3.5, -2.5],  # fully outside, within the [-1, 0) clamp band at the end
      [5.0, 5.0, 5.0, 12.0],  # zero width
      [12.0, 9.0, 6.0, 3.0],  # negative extent (x1 < x0, y1 < y0)
      [27.0, 21.0, 28.0, 22.0],  # last pixel
      [-2.0, 6.0, 40.0, 6.5],  # thin and long (large gw, gh = 1)
  ], np.float32)
  xy = rng.uniform(-6, 30, size=(12, 2))
  wh = np.exp(rng.uniform(np.log(0.5), np.log(40), size=(12, 2)))
  random = np.concatenate([xy, xy + wh], axis=1).astype(np.float32)
  return np.concatenate([fixed, random])


@pytest.fixture(scope="module")
def case():
  rng = np.random.default_rng(7)
  feats = rng.standard_normal((MAP_N, MAP_H, MAP_W, 3)).astype(np.float32)
  boxes = edge_case_boxes(rng)
  batch_index = rng.integers(0, MAP_N, size=len(boxes)).astype(np.int32)
  return feats, boxes, batch_index


@pytest.fixture(scope="module")
def matrices(case):
  feats, boxes, batch_index = case
  return {(sr, aligned): reference_matrix((MAP_N, MAP_H, MAP_W), boxes, batch_index, (7, 7),
                                          SCALE, sr, aligned)
          for sr in (0, 2) for aligned in (True, False)}


@pytest.mark.parametrize("sampling_ratio", [0, 2])
@pytest.mark.parametrize("aligned", [True, False])
def test_matches_reference_forward_and_backward(case, matrices, sampling_ratio, aligned):
  feats, boxes, batch_index = case
  m = matrices[(sampling_ratio, aligned)]
  fn = lambda f: roi_align(f, boxes, batch_index, 7, SCALE, sampling_ratio, aligned)
  out, vjp = jax.vjp(fn, jnp.asarray(feats))
  np.testing.assert_allclose(np.asarray(out), apply_matrix(m, feats), rtol=1e-5, atol=1e-5)
  ct = np.random.default_rng(1).standard_normal(out.shape).astype(np.float32)
  (grad,) = vjp(jnp.asarray(ct))
  np.testing.assert_allclose(np.asarray(grad), adjoint_matrix(m, ct), rtol=1e-5, atol=1e-5)


def test_non_square_output_and_chunking(case):
  feats, boxes, batch_index = case
  m = reference_matrix((MAP_N, MAP_H, MAP_W), boxes, batch_index, (3, 5), SCALE, 0, True)
  for chunk_size in (1, 5, 64):
    out = roi_align(feats, boxes, batch_index, (3, 5), SCALE, chunk_size=chunk_size)
    np.testing.assert_allclose(np.asarray(out), apply_matrix(m, feats), rtol=1e-5, atol=1e-5)


def test_degenerate_and_far_boxes_are_zero(case):
  feats, boxes, batch_index = case
  out = np.asarray(roi_align(feats, boxes, batch_index, 7, SCALE))
  assert np.all(out[[6, 8, 9]] == 0)  # Fully outside (past [-1, H]), zero width, negative.


def test_sample_cap(case, matrices):
  feats, boxes, batch_index = case
  exact = np.asarray(roi_align(feats, boxes, batch_index, 7, SCALE))
  # A cap above every ROI's need changes nothing.
  np.testing.assert_array_equal(
      np.asarray(roi_align(feats, boxes, batch_index, 7, SCALE, max_samples_per_bin=10_000)), exact)
  # A cap of 4: ROIs needing <= 4 samples per bin are untouched; the others are averaged on a
  # coarser grid (finite, no larger than the map's values).
  capped = np.asarray(roi_align(feats, boxes, batch_index, 7, SCALE, max_samples_per_bin=4))
  m = matrices[(0, True)]
  needs = []
  for box in boxes:
    rw, rh = (box[2] - box[0]) * SCALE, (box[3] - box[1]) * SCALE
    needs.append(max(math.ceil(rw / 7), 0) * max(math.ceil(rh / 7), 0))
  small = np.array(needs) <= 4
  np.testing.assert_array_equal(capped[small], exact[small])
  assert not np.allclose(capped[~small], exact[~small])
  assert np.all(np.abs(capped) <= np.abs(feats).max() + 1e-6)
  del m


def test_batch_index_selects_the_image(case):
  feats, boxes, _ = case
  both = roi_align(feats, np.concatenate([boxes, boxes]),
                   np.repeat(np.array([0, 1], np.int32), len(boxes)), 7, SCALE)
  one = roi_align(feats[1:], boxes, np.zeros(len(boxes), np.int32), 7, SCALE)
  np.testing.assert_array_equal(np.asarray(both[len(boxes):]), np.asarray(one))


def test_bfloat16_and_empty():
  feats = jnp.ones((1, 6, 6, 4), jnp.bfloat16)
  out = roi_align(feats, np.array([[0, 0, 8, 8]], np.float32), np.zeros(1, np.int32), 2, 0.5)
  assert out.dtype == jnp.bfloat16 and np.allclose(np.asarray(out, np.float32), 1.0)
  empty = roi_align(feats, np.zeros((0, 4), np.float32), np.zeros(0, np.int32), 7, 0.5)
  assert empty.shape == (0, 7, 7, 4)


def test_jit_traces_once():
  traces = []

  @jax.jit
  def pool(feats, boxes, batch_index):
    traces.append(1)
    return roi_align(feats, boxes, batch_index, 7, 0.25)

  rng = np.random.default_rng(3)
  feats = rng.standard_normal((2, 16, 20, 8)).astype(np.float32)
  for scale in (10.0, 60.0):  # Different sample counts, same shapes.
    xy = rng.uniform(0, 40, size=(6, 2))
    boxes = np.concatenate([xy, xy + rng.uniform(1, scale, size=(6, 2))], 1).astype(np.float32)
    pool(feats, boxes, rng.integers(0, 2, 6).astype(np.int32)).block_until_ready()
  assert len(traces) == 1


# ----------------------------------------------------------------------------------------------
# Static bounds (spec §7.3).
# ----------------------------------------------------------------------------------------------


def test_adaptive_samples_bound_matches_spec():
  assert adaptive_samples_bound(1333) == 48
  assert adaptive_samples_bound(1333, min_image_side=800) == 48
  assert adaptive_samples_bound(2048, min_image_side=1024) == 74
  assert adaptive_samples_bound(2048) == 100  # Square 2048 images: 10 x 10 on p5.
  assert adaptive_grid_size_bound(1333, 7) == 191
  assert adaptive_grid_size_bound(1333, 7, 0.25) == 48  # Per axis on p2 (spec: 48 and 29).
  assert adaptive_grid_size_bound(800, 7, 0.25) == 29


def test_adaptive_samples_bound_against_sampled_boxes():
  """Random (incl. thin) boxes inside 1333 x 800 images never exceed 48; a thin one reaches it."""
  rng = np.random.default_rng(0)
  n = 200_000
  w = np.exp(rng.uniform(0, np.log(1333), n)).astype(np.float32)
  h = np.exp(rng.uniform(0, np.log(800), n)).astype(np.float32)
  w = np.concatenate([w, [1320.0]]).astype(np.float32)
  h = np.concatenate([h, [1.0]]).astype(np.float32)
  level = np.clip(np.floor(4 + np.log2(np.sqrt(w * h) / 224 + 1e-8)), 2, 5)
  stride = 2.0**level
  g = np.ceil(w / stride / 7) * np.ceil(h / stride / 7)
  assert g.max() == 48 and g[-1] == 48


# ----------------------------------------------------------------------------------------------
# Separable formulation.
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("sampling_ratio,aligned", [(0, True), (2, True), (0, False)])
def test_separable_matches_direct_and_reference(case, matrices, sampling_ratio, aligned):
  feats, boxes, batch_index = case
  images = feats[..., 0]
  sep = roi_align_separable(images, boxes, batch_index, 7, SCALE, sampling_ratio, aligned)
  direct = roi_align(feats[..., :1], boxes, batch_index, 7, SCALE, sampling_ratio, aligned)
  np.testing.assert_allclose(np.asarray(sep), np.asarray(direct)[..., 0], rtol=1e-5, atol=1e-5)
  ref = apply_matrix(matrices[(sampling_ratio, aligned)], feats[..., :1])[..., 0]
  np.testing.assert_allclose(np.asarray(sep), ref, rtol=1e-5, atol=1e-5)
  # One map per ROI (already gathered) gives the same.
  per_roi = roi_align_separable(images[batch_index], boxes, None, 7, SCALE, sampling_ratio,
                                aligned, chunk_size=5)
  np.testing.assert_allclose(np.asarray(per_roi), np.asarray(sep), rtol=1e-6, atol=1e-6)


def test_separable_mask_target_with_huge_grids():
  """Mask-target use: a bitmask at scale 1, grids up to 35 x 45 samples, boxes past the map."""
  rng = np.random.default_rng(5)
  mask = np.zeros((1, 120, 160), np.float32)
  mask[0, 20:100, 30:140] = 1.0
  mask[0, 50:70, 40:120] = 0.0
  boxes = np.array([[20, 10, 150, 110], [-80, -40, 240, 200], [0, 0, 160, 120],
                    [120, 90, 200, 160], [10.5, 20.25, 11.0, 20.5]], np.float32)
  boxes = np.concatenate([boxes, boxes + rng.uniform(-3, 3, boxes.shape).astype(np.float32)])
  index = np.zeros(len(boxes), np.int32)
  sep = np.asarray(roi_align_separable(mask, boxes, index, 7, 1.0))
  direct = np.asarray(roi_align(mask[..., None], boxes, index, 7, 1.0)[..., 0])
  # The direct loop sums ~1500 tap slots per bin sequentially in float32 (as torchvision sums its
  # samples); the matmuls sum blockwise. Both are within ~1e-5 of the exact value here.
  np.testing.assert_allclose(sep, direct, rtol=0, atol=5e-5)
  assert sep.min() >= 0 and sep.max() <= 1 + 1e-6
  # The whole-map box (18 x 23 samples per bin) against the float64 reference.
  m = reference_matrix((1, 120, 160), boxes[2:3], [0], (7, 7), 1.0, 0, True)
  np.testing.assert_allclose(sep[2], apply_matrix(m, mask[..., None])[0, ..., 0], atol=1e-6)
