"""Tests of ``pointrend_jax.ops.sampler`` (detectron2 ``subsample_labels`` with static shapes)."""

from __future__ import annotations

import functools

import jax
import numpy as np
import pytest

from pointrend_jax.ops.sampler import sample_mask, subsample_labels


def _labels(rng, n, n_pos, n_neg, pos_value=1, bg=0):
  lab = np.full(n, -1, np.int32)
  perm = rng.permutation(n)
  lab[perm[:n_pos]] = pos_value
  lab[perm[n_pos:n_pos + n_neg]] = bg
  return lab


@functools.partial(jax.jit, static_argnums=(2, 3, 4))
def _sample(key, labels, num, frac, bg):
  return subsample_labels(key, labels, num, frac, bg)


@pytest.mark.parametrize("n_pos,n_neg,exp_pos,exp_neg", [
    (300, 5000, 128, 128),  # Plenty of both.
    (20, 5000, 20, 236),    # Few positives: negatives fill up.
    (20, 30, 20, 30),       # Few of both: padding slots.
    (0, 0, 0, 0),           # Nothing to sample.
])
def test_counts_order_and_uniqueness(n_pos, n_neg, exp_pos, exp_neg):
  rng = np.random.default_rng(0)
  lab = _labels(rng, 6000, n_pos, n_neg)
  idx, is_pos, valid = map(np.asarray, _sample(jax.random.key(0), lab, 256, 0.5, 0))
  assert idx.shape == is_pos.shape == valid.shape == (256,) and idx.dtype == np.int32
  assert is_pos.sum() == exp_pos and (valid & ~is_pos).sum() == exp_neg
  # Prefix layout: positives, then negatives, then padding (index 0).
  np.testing.assert_array_equal(is_pos, np.arange(256) < exp_pos)
  np.testing.assert_array_equal(valid, np.arange(256) < exp_pos + exp_neg)
  assert np.all(idx[~valid] == 0)
  chosen = idx[valid]
  assert len(np.unique(chosen)) == len(chosen)
  assert np.all(lab[idx[is_pos]] == 1) and np.all(lab[idx[valid & ~is_pos]] == 0)


def test_roi_style_labels_with_background_class():
  rng = np.random.default_rng(1)
  lab = rng.integers(0, 80, 700).astype(np.int32)  # Foreground classes 0..79 ...
  lab[rng.permutation(700)[:600]] = 80              # ... and background K = 80.
  idx, is_pos, valid = map(np.asarray, _sample(jax.random.key(3), lab, 512, 0.25, 80))
  assert is_pos.sum() == 100 and valid.sum() == 512
  assert np.all(lab[idx[is_pos]] < 80) and np.all(lab[idx[valid & ~is_pos]] == 80)


def test_deterministic_by_key_and_roughly_uniform():
  rng = np.random.default_rng(2)
  lab = _labels(rng, 400, 40, 300)
  a = _sample(jax.random.key(7), lab, 64, 0.25, 0)
  b = _sample(jax.random.key(7), lab, 64, 0.25, 0)
  c = _sample(jax.random.key(8), lab, 64, 0.25, 0)
  np.testing.assert_array_equal(a[0], b[0])
  assert not np.array_equal(np.asarray(a[0]), np.asarray(c[0]))
  # Each of the 40 positives should be drawn in ~16/40 of 200 keys (= 80 times).
  keys = jax.random.split(jax.random.key(0), 200)
  idx, is_pos, _ = jax.vmap(lambda k: _sample(k, lab, 64, 0.25, 0))(keys)
  counts = np.bincount(np.asarray(idx)[np.asarray(is_pos)], minlength=400)[lab == 1]
  assert counts.min() > 45 and counts.max() < 120, counts


def test_sample_mask_equals_scattered_indices():
  rng = np.random.default_rng(3)
  lab = _labels(rng, 1000, 10, 400)
  lab[0] = 0  # Index 0 is also the padding index: it must not be cleared by padding slots.
  key = jax.random.key(5)
  idx, is_pos, valid = map(np.asarray, _sample(key, lab, 256, 0.5, 0))
  pos_mask, neg_mask = map(np.asarray, jax.jit(sample_mask, static_argnums=(2, 3, 4))(
      key, lab, 256, 0.5, 0))
  exp_pos = np.zeros(1000, bool)
  exp_pos[idx[is_pos]] = True
  exp_neg = np.zeros(1000, bool)
  exp_neg[idx[valid & ~is_pos]] = True
  np.testing.assert_array_equal(pos_mask, exp_pos)
  np.testing.assert_array_equal(neg_mask, exp_neg)
  assert pos_mask.sum() == 10 and neg_mask.sum() == 246
