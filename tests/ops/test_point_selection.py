"""Tests of ``pointrend_jax.ops.point_selection`` (grids, uncertainty, point selection)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pointrend_jax.ops import point_selection as sel
from pointrend_jax.ops.point_sample import point_sample
from pointrend_jax.parity.compare import compare
from pointrend_jax.parity.ops_points import CHECKS

# Checks run by test_point_sample.py; every other check of ops_points runs here.
POINT_SAMPLE_CHECKS = {"out_point_sample", "out_point_sample_nearest", "out_interp_x2"}
SELECTION_CHECKS = (
    "out_uncertainty_instance", "out_uncertainty_instance_agnostic", "out_uncertainty_semantic",
    "out_grid_indices_n40", "out_grid_coords_n40", "out_grid_indices_n1000",
    "out_grid_coords_n1000", "out_regular_grid_7", "out_regular_grid_28", "out_fine_features",
    "out_fine_point_coords_wrt_image")


def test_all_checks_are_tested():
  assert set(CHECKS) == POINT_SAMPLE_CHECKS | set(SELECTION_CHECKS)


@pytest.mark.parametrize("name", SELECTION_CHECKS)
def test_parity_with_detectron2(ops_golden, name):
  check = CHECKS[name]
  actual = check.compute(ops_golden)
  row = compare(name, check, ops_golden[name], actual)
  assert row.passed, row
  assert np.asarray(actual).dtype == ops_golden[name].dtype


def test_regular_grid_points():
  np.testing.assert_allclose(
      sel.regular_grid_points(3),
      [[u, v] for v in (1 / 6, 1 / 2, 5 / 6) for u in (1 / 6, 1 / 2, 5 / 6)], atol=1e-7)
  assert sel.regular_grid_points(28).shape == (784, 2)


def test_uncertainty_functions():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(3, 5, 4)).astype(np.float32)  # [R, P, C]
  classes = np.array([3, 0, 2])
  np.testing.assert_array_equal(sel.instance_uncertainty(logits, classes),
                                -np.abs(logits[np.arange(3), :, classes]))
  np.testing.assert_array_equal(sel.instance_uncertainty(logits[..., 1:2], classes),
                                -np.abs(logits[..., 1]))
  np.testing.assert_array_equal(sel.instance_uncertainty(logits), -np.abs(logits[..., 0]))

  logits[0, 0] = [2.0, 5.0, 5.0, 1.0]  # tie of the two largest -> 0
  top2 = np.sort(logits, axis=-1)[..., ::-1]
  got = np.asarray(sel.semantic_uncertainty(logits))
  np.testing.assert_array_equal(got, top2[..., 1] - top2[..., 0])
  assert got[0, 0] == 0


@pytest.mark.parametrize("num_points", [7, 1000])
def test_uncertain_points_on_grid(num_points):
  rng = np.random.default_rng(1)
  r, h, w = 2, 6, 9
  umap = rng.permutation(r * h * w).reshape(r, h, w).astype(np.float32)
  idx, coords = sel.uncertain_points_on_grid(umap, num_points)
  k = min(num_points, h * w)
  want = np.argsort(-umap.reshape(r, -1), axis=1)[:, :k]
  np.testing.assert_array_equal(idx, want)
  np.testing.assert_allclose(coords[..., 0], (want % w + 0.5) / w, atol=1e-7)
  np.testing.assert_allclose(coords[..., 1], (want // w + 0.5) / h, atol=1e-7)


def _randomness_args(num_classes=5, side=7, r=3, seed=0):
  rng = np.random.default_rng(seed)
  logits = rng.normal(size=(r, side, side, num_classes)).astype(np.float32)
  classes = rng.integers(0, num_classes, size=(r,))
  return jnp.asarray(logits), functools.partial(sel.instance_uncertainty, classes=classes)


def test_uncertain_points_with_randomness_instance():
  logits, unc_fn = _randomness_args()
  key = jax.random.key(0)
  pts = sel.uncertain_points_with_randomness(key, logits, unc_fn, 196, 3, 0.75)
  assert pts.shape == (3, 196, 2) and pts.dtype == jnp.float32
  assert np.all((np.asarray(pts) >= 0) & (np.asarray(pts) < 1))
  np.testing.assert_array_equal(
      pts, sel.uncertain_points_with_randomness(key, logits, unc_fn, 196, 3, 0.75))
  other = sel.uncertain_points_with_randomness(jax.random.key(1), logits, unc_fn, 196, 3, 0.75)
  assert not np.array_equal(pts, other)

  # Re-derive the 588 candidates from the documented key split: the 147 important points are
  # candidates, in descending uncertainty, at least as uncertain as every dropped candidate.
  key_candidates, key_random = jax.random.split(key)
  cand = np.asarray(jax.random.uniform(key_candidates, (3, 588, 2), jnp.float32))
  cand_unc = np.asarray(unc_fn(point_sample(logits, cand)))
  important = np.asarray(pts[:, :147])
  for r in range(3):
    match = np.all(cand[r][None, :, :] == important[r][:, None, :], axis=-1)  # [147, 588]
    assert np.all(match.sum(axis=1) == 1)
    chosen = match.argmax(axis=1)
    assert len(set(chosen.tolist())) == 147
    kept = cand_unc[r, chosen]
    dropped = np.delete(cand_unc[r], chosen)
    assert np.all(np.diff(kept) <= 0)
    assert kept.min() >= dropped.max()
  np.testing.assert_array_equal(pts[:, 147:], jax.random.uniform(key_random, (3, 49, 2)))


def test_uncertain_points_with_randomness_semantic_counts():
  rng = np.random.default_rng(2)
  logits = jnp.asarray(rng.normal(size=(1, 16, 32, 19)).astype(np.float32))
  pts = sel.uncertain_points_with_randomness(
      jax.random.key(3), logits, sel.semantic_uncertainty, 2048, 3, 0.75)
  assert pts.shape == (1, 2048, 2)
  unc = np.asarray(sel.semantic_uncertainty(point_sample(logits, pts)))[0]
  assert np.all(np.diff(unc[:1536]) <= 0)  # important part in descending uncertainty


def test_selection_jit_traces_once():
  traces = 0
  logits, unc_fn = _randomness_args()

  def fn(key, lg, umap):
    nonlocal traces
    traces += 1
    pts = sel.uncertain_points_with_randomness(key, lg, unc_fn, 196, 3, 0.75)
    return pts, sel.uncertain_points_on_grid(umap, 40)

  jitted = jax.jit(fn)
  umap = jnp.zeros((3, 14, 14))
  for k in range(3):
    jax.block_until_ready(jitted(jax.random.key(k), logits * k, umap + k))
  assert traces == 1


def test_point_sample_fine_grained_features_two_levels():
  rng = np.random.default_rng(4)
  p2 = rng.normal(size=(2, 16, 20, 3)).astype(np.float32)
  p3 = rng.normal(size=(2, 8, 10, 5)).astype(np.float32)
  boxes = np.array([[3.0, 5.0, 40.0, 30.0], [-4.0, 10.0, 70.5, 66.0], [0.0, 0.0, 80.0, 64.0]],
                   np.float32)
  batch_index = np.array([1, 0, 1], np.int32)
  pts_box = rng.uniform(0, 1, size=(3, 11, 2)).astype(np.float32)

  feats, pts_img = jax.jit(sel.point_sample_fine_grained_features, static_argnums=1)(
      [p2, p3], (4, 8), boxes, batch_index, pts_box)
  assert feats.shape == (3, 11, 8)
  np.testing.assert_allclose(pts_img, boxes[:, None, :2] + pts_box * (boxes[:, None, 2:] -
                                                                       boxes[:, None, :2]),
                             atol=1e-5)
  for level, (fmap, stride, channels) in enumerate(((p2, 4, slice(0, 3)), (p3, 8, slice(3, 8)))):
    extent = np.array([fmap.shape[2] * stride, fmap.shape[1] * stride], np.float32)
    want = point_sample(fmap[batch_index], np.asarray(pts_img) / extent)
    # Under jit XLA turns the division by the constant extent into a reciprocal multiply, which
    # moves coords by an ulp (~1e-6 in the sampled values).
    np.testing.assert_allclose(feats[..., channels], want, atol=1e-5, err_msg=f"level {level}")
