"""Tests of ``pointrend_jax.ops.point_sample`` (grid_sample semantics, gradients, x2 upsampling)."""

from __future__ import annotations


import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pointrend_jax.ops.point_sample import (interpolate_bilinear_x2, point_sample,
                                            point_sample_by_index)
from pointrend_jax.parity.compare import compare
from pointrend_jax.parity.ops_points import CHECKS

# The remaining CHECKS of ops_points run in test_point_selection.py.
POINT_SAMPLE_CHECKS = ("out_point_sample", "out_point_sample_nearest", "out_interp_x2")


@pytest.mark.parametrize("name", POINT_SAMPLE_CHECKS)
def test_parity_with_detectron2(ops_golden, name):
  check = CHECKS[name]
  row = compare(name, check, ops_golden[name], check.compute(ops_golden))
  assert row.passed, row


def _reference_matrix(coords: np.ndarray, height: int, width: int) -> np.ndarray:
  """float64 bilinear interpolation matrix ``[P, H*W]`` written from the spec (§2.1)."""
  m = np.zeros((coords.shape[0], height * width))
  for p, (x, y) in enumerate(coords.astype(np.float64)):
    px, py = x * width - 0.5, y * height - 0.5
    x0, y0 = int(np.floor(px)), int(np.floor(py))
    for yy, wy in ((y0, 1 - (py - y0)), (y0 + 1, py - y0)):
      for xx, wx in ((x0, 1 - (px - x0)), (x0 + 1, px - x0)):
        if 0 <= xx < width and 0 <= yy < height:
          m[p, yy * width + xx] += wy * wx
  return m


def _random_inputs(seed=0, n=2, h=5, w=6, c=3, p=17):
  rng = np.random.default_rng(seed)
  feats = rng.normal(size=(n, h, w, c)).astype(np.float32)
  coords = rng.uniform(-0.2, 1.2, size=(n, p, 2)).astype(np.float32)
  # Exact corners, edges and pixel centres.
  coords[:, :4] = [[0.0, 0.0], [1.0, 1.0], [0.5 / w, 0.5 / h], [1.0, 0.0]]
  return feats, coords


def test_bilinear_matches_reference_forward_and_gradient():
  feats, coords = _random_inputs()
  n, h, w, c = feats.shape
  cot = np.random.default_rng(1).normal(size=(n, coords.shape[1], c)).astype(np.float32)
  mats = [_reference_matrix(coords[i], h, w) for i in range(n)]
  want = np.stack([m @ feats[i].reshape(h * w, c) for i, m in enumerate(mats)])
  want_grad = np.stack([(m.T @ cot[i]).reshape(h, w, c) for i, m in enumerate(mats)])

  np.testing.assert_allclose(point_sample(feats, coords), want, atol=1e-5, rtol=1e-5)
  loss = lambda f, x: jnp.sum(point_sample(f, x) * cot)
  grad_f, grad_x = jax.grad(loss, argnums=(0, 1))(jnp.asarray(feats), jnp.asarray(coords))
  np.testing.assert_allclose(grad_f, want_grad, atol=1e-5, rtol=1e-5)
  assert np.all(np.asarray(grad_x) == 0)


def test_nearest_half_way_points_round_half_to_even():
  h, w = 2, 4
  feats = (np.arange(h * w, dtype=np.float32) + 1).reshape(1, h, w, 1)  # 0 only from padding
  # px = x*4 - 0.5: -0.5 (-> -0 -> col 0), 0, 0.5 (-> 0), 1, 1.5 (-> 2), 2.5 (-> 2),
  # 3.5 (-> 4, outside), -1 (outside), 4 (outside). py = y*2 - 0.5.
  xs = [0.0, 0.125, 0.25, 0.375, 0.5, 0.75, 1.0, -0.125, 1.125]
  cols = [0, 0, 0, 1, 2, 2, None, None, None]
  for y, row in ((0.25, 0), (0.5, 0), (0.75, 1), (1.0, None)):  # py = 0, 0.5, 1, 1.5
    coords = np.array([[[x, y] for x in xs]], np.float32)
    got = np.asarray(point_sample(feats, coords, mode="nearest"))[0, :, 0]
    want = [0.0 if (col is None or row is None) else feats[0, row, col, 0] for col in cols]
    np.testing.assert_array_equal(got, want, err_msg=f"y={y}")


def test_grid_shaped_coords_and_by_index():
  feats, _ = _random_inputs(n=3)
  rng = np.random.default_rng(2)
  grid = rng.uniform(0, 1, size=(3, 4, 5, 2)).astype(np.float32)
  out = point_sample(feats, grid)
  assert out.shape == (3, 4, 5, feats.shape[-1])
  np.testing.assert_array_equal(out.reshape(3, 20, -1), point_sample(feats, grid.reshape(3, 20, 2)))

  batch_index = np.array([2, 0, 2, 1, 0], np.int32)
  coords = rng.uniform(-0.1, 1.1, size=(5, 7, 2)).astype(np.float32)
  for mode in ("bilinear", "nearest"):
    np.testing.assert_array_equal(
        point_sample_by_index(feats, batch_index, coords, mode=mode),
        point_sample(feats[batch_index], coords, mode=mode))


def test_by_index_does_not_copy_maps_per_roi():
  n, h, w, c, r = 2, 16, 20, 8, 64
  feats = jnp.zeros((n, h, w, c))
  batch_index = jnp.zeros((r,), jnp.int32)
  coords = jnp.zeros((r, 3, 2))
  fwd = lambda f: point_sample_by_index(f, batch_index, coords)
  bwd = jax.grad(lambda f: jnp.sum(fwd(f)))
  for fn in (fwd, bwd):
    jaxpr = jax.make_jaxpr(fn)(feats).jaxpr
    sizes = [np.prod(v.aval.shape) for eqn in jaxpr.eqns for v in eqn.outvars]
    assert max(sizes) <= n * h * w * c


def test_vmap_over_extra_axis():
  feats, coords = _random_inputs()
  stacked_f = np.stack([feats, feats[::-1]])
  stacked_c = np.stack([coords, coords[:, ::-1]])
  got = jax.vmap(point_sample)(stacked_f, stacked_c)
  for i in range(2):
    np.testing.assert_allclose(got[i], point_sample(stacked_f[i], stacked_c[i]), atol=1e-6)


def test_jit_traces_once_for_same_shapes():
  traces = 0

  def fn(f, x):
    nonlocal traces
    traces += 1
    return point_sample(f, x), interpolate_bilinear_x2(f)

  jitted = jax.jit(fn)
  feats, coords = _random_inputs()
  for k in range(3):
    jax.block_until_ready(jitted(feats + k, coords * (1 + 0.1 * k)))
  assert traces == 1


def _reference_upsample_x2(x: np.ndarray) -> np.ndarray:
  """PyTorch bilinear x2, align_corners=False, written from the spec (§3.6 a), NHWC."""
  def taps(n):
    src = np.maximum((np.arange(2 * n) + 0.5) / 2 - 0.5, 0.0)
    i0 = np.floor(src).astype(int)
    return i0, np.minimum(i0 + 1, n - 1), src - i0
  y0, y1, ly = taps(x.shape[1])
  x0, x1, lx = taps(x.shape[2])
  x = x.astype(np.float64)
  rows = x[:, y0] * (1 - ly)[None, :, None, None] + x[:, y1] * ly[None, :, None, None]
  return rows[:, :, x0] * (1 - lx)[None, None, :, None] + rows[:, :, x1] * lx[None, None, :, None]


@pytest.mark.parametrize("shape", [(2, 5, 7, 3), (1, 1, 2, 2), (1, 3, 1, 1)])
def test_interpolate_bilinear_x2(shape):
  x = np.random.default_rng(3).normal(size=shape).astype(np.float32)
  got = interpolate_bilinear_x2(x)
  assert got.shape == (shape[0], 2 * shape[1], 2 * shape[2], shape[3])
  np.testing.assert_allclose(got, _reference_upsample_x2(x), atol=1e-6, rtol=1e-6)
