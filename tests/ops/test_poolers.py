"""Tests of ``pointrend_jax.ops.poolers`` (FPN level assignment and ``ROIPooler``, spec §7.2)."""

from __future__ import annotations


import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pointrend_jax.ops.poolers import (assign_boxes_to_levels, levels_from_scales,
                                       multilevel_roi_align)
from pointrend_jax.ops.roi_align import roi_align
from pointrend_jax.parity.compare import compare
from pointrend_jax.parity.ops_roi_align import CHECKS

POOLER_CHECKS = ("out_pooler_levels", "out_pooler")
SCALES = (1 / 4, 1 / 8, 1 / 16, 1 / 32)
IMAGE_HW = (256, 320)


@pytest.mark.parametrize("name", POOLER_CHECKS)
def test_parity_with_detectron2(ops_golden, name):
  check = CHECKS[name]
  row = compare(name, check, ops_golden[name], check.compute(ops_golden))
  assert row.passed, row


def _square(side: float) -> list[float]:
  return [10.0, 20.0, 10.0 + side, 20.0 + side]


def test_assign_boxes_to_levels_boundaries():
  boxes = np.array([_square(s) for s in (1, 111.9, 112, 223.9, 224, 447.9, 448, 2000)] +
                   [[5, 5, 5, 30], [5, 5, 1, 1]], np.float32)
  levels = np.asarray(assign_boxes_to_levels(boxes))
  # floor(4 + log2(side / 224 + 1e-8)) clamped to [2, 5]; zero area -> 2; negative area (NaN) -> 2.
  np.testing.assert_array_equal(levels, [2, 2, 3, 3, 4, 4, 5, 5, 2, 2])
  assert levels.dtype == np.int32
  wide = np.array([[0, 0, 1000, 10]], np.float32)  # sqrt(area) = 100 -> level 2.
  assert int(assign_boxes_to_levels(wide)[0]) == 2
  custom = np.asarray(assign_boxes_to_levels(boxes[:8], 3, 6, canonical_box_size=112,
                                             canonical_level=5))
  np.testing.assert_array_equal(custom, [3, 4, 5, 5, 6, 6, 6, 6])


def test_levels_from_scales():
  assert levels_from_scales(SCALES) == (2, 5)
  with pytest.raises(ValueError):
    levels_from_scales((1 / 4, 1 / 16))


@pytest.fixture(scope="module")
def case():
  rng = np.random.default_rng(11)
  n, c = 2, 5
  feats = [rng.standard_normal((n, int(IMAGE_HW[0] * s), int(IMAGE_HW[1] * s), c))
           .astype(np.float32) for s in SCALES]
  r = 40
  sides = np.exp(rng.uniform(np.log(4), np.log(600), size=(r, 2)))
  x0 = rng.uniform(-30, IMAGE_HW[1] - 10, r)
  y0 = rng.uniform(-30, IMAGE_HW[0] - 10, r)
  boxes = np.stack([x0, y0, x0 + sides[:, 0], y0 + sides[:, 1]], 1).astype(np.float32)
  extra = [[0, 0, 320, 256], [0, 40, 320, 41], [60, 0, 61, 256], [-50, -60, 400, 300],
           [-100, -100, 500, 400]]
  boxes = np.concatenate([boxes, extra]).astype(np.float32)
  batch_index = rng.integers(0, n, len(boxes)).astype(np.int32)
  return feats, boxes, batch_index


@jax.jit
def _per_level(feats, boxes, batch_index):
  """Pools every box from every level with ``roi_align`` and keeps its assigned level."""
  levels = assign_boxes_to_levels(boxes) - 2
  out = 0.0
  for l, (f, s) in enumerate(zip(feats, SCALES)):
    pooled = roi_align(f, boxes, batch_index, 7, s)
    out = out + jnp.where((levels == l)[:, None, None, None], pooled, 0.0)
  return out


def test_matches_per_level_roi_align(case):
  feats, boxes, batch_index = case
  levels = np.asarray(assign_boxes_to_levels(boxes))
  assert len(set(levels.tolist())) == 4  # Every level is exercised.
  out = multilevel_roi_align(feats, boxes, batch_index, SCALES, 7)
  ref = _per_level(feats, boxes, batch_index)
  np.testing.assert_allclose(np.asarray(out), np.asarray(ref), rtol=1e-6, atol=1e-6)


def test_gradient_is_the_adjoint(case):
  """<vjp(ct), f'> == <ct, pool(f')>: the backward is the transpose of the (tested) forward."""
  feats, boxes, batch_index = case
  rng = np.random.default_rng(2)
  pool = jax.jit(lambda fs: multilevel_roi_align(fs, boxes, batch_index, SCALES))
  ct = rng.standard_normal((len(boxes), 7, 7, feats[0].shape[-1])).astype(np.float32)
  _, vjp = jax.vjp(pool, feats)
  (grads,) = vjp(jnp.asarray(ct))
  assert all(g.shape == f.shape for g, f in zip(grads, feats))
  for _ in range(2):
    probe = [rng.standard_normal(f.shape).astype(np.float32) for f in feats]
    lhs = sum(np.vdot(np.asarray(g, np.float64), p) for g, p in zip(grads, probe))
    rhs = np.vdot(ct.astype(np.float64), np.asarray(pool(probe), np.float64))
    assert abs(lhs - rhs) <= 1e-4 * max(1.0, abs(rhs))
  # The probe pairs cover every level: no level's gradient is identically zero.
  assert all(np.abs(np.asarray(g)).max() > 0 for g in grads)


def test_image_size_cap_is_exact_inside_the_image(case):
  feats, boxes, batch_index = case
  inside = np.clip(boxes, 0, [IMAGE_HW[1], IMAGE_HW[0]] * 2).astype(np.float32)
  exact = multilevel_roi_align(feats, inside, batch_index, SCALES)
  capped = multilevel_roi_align(feats, inside, batch_index, SCALES,
                                max_image_side=max(IMAGE_HW), min_image_side=min(IMAGE_HW))
  np.testing.assert_array_equal(np.asarray(capped), np.asarray(exact))


def test_jit_traces_once(case):
  feats, boxes, batch_index = case
  traces = []

  @jax.jit
  def pool(feats, boxes):
    traces.append(1)
    return multilevel_roi_align(feats, boxes, batch_index, SCALES)

  pool(feats, boxes).block_until_ready()
  pool(feats, boxes[::-1] * 0.5).block_until_ready()  # Other levels and sample counts.
  assert len(traces) == 1
