"""Tests of ``pointrend_jax.ops.nms`` against torchvision goldens and a numpy greedy reference."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pointrend_jax.ops import nms as N
from pointrend_jax.parity.compare import compare
from pointrend_jax.parity.ops_boxes import CHECKS

NMS_CHECKS = ("out_nms_keep_iou05", "out_nms_keep_iou07", "out_batched_nms_keep_iou05",
              "out_batched_nms_keep_iou07")


@pytest.mark.parametrize("name", NMS_CHECKS)
def test_parity_with_torchvision(ops_golden, name):
  check = CHECKS[name]
  row = compare(name, check, ops_golden[name], check.compute(ops_golden))
  assert row.passed, row


@pytest.mark.parametrize("method", ["matrix", "tiled"])
@pytest.mark.parametrize("thr", [0.5, 0.7])
def test_both_methods_and_coordinate_trick_on_golden(ops_golden, thr, method):
  tag = f"{thr:.1f}".replace(".", "")
  b, s, c = ops_golden["in_nms_boxes"], ops_golden["in_nms_scores"], ops_golden["in_nms_classes"]
  keep, valid = N.nms(b, s, thr, 36, method=method)
  np.testing.assert_array_equal(_kept(keep, valid), ops_golden[f"out_nms_keep_iou{tag}"])
  for trick in (False, True):
    keep, valid = N.batched_nms(b, s, c, thr, 36, coordinate_trick=trick, method=method)
    np.testing.assert_array_equal(_kept(keep, valid), ops_golden[f"out_batched_nms_keep_iou{tag}"])


def reference_nms(boxes, scores, thr, valid=None, classes=None):
  """torchvision's CPU loop in numpy float32 (per class when ``classes`` is given)."""
  n = len(scores)
  valid = np.ones(n, bool) if valid is None else valid
  order = [i for i in np.argsort(-scores, kind="stable") if valid[i]]
  areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
  suppressed = np.zeros(n, bool)
  keep = []
  for pos, i in enumerate(order):
    if suppressed[i]:
      continue
    keep.append(i)
    for j in order[pos + 1:]:
      if suppressed[j] or (classes is not None and classes[i] != classes[j]):
        continue
      w = max(np.float32(0), min(boxes[i, 2], boxes[j, 2]) - max(boxes[i, 0], boxes[j, 0]))
      h = max(np.float32(0), min(boxes[i, 3], boxes[j, 3]) - max(boxes[i, 1], boxes[j, 1]))
      inter = w * h
      if float(inter / (areas[i] + areas[j] - inter)) > thr:
        suppressed[j] = True
  return np.array(keep, np.int64)


def random_clustered_boxes(rng, n, n_clusters, scale=40.0, hw=(200, 300)):
  centres = rng.uniform([0, 0], [hw[1], hw[0]], (n_clusters, 2))
  sizes = scale * np.exp(rng.normal(0, 0.4, (n_clusters, 2)))
  c = rng.integers(0, n_clusters, n)
  ctr = centres[c] + rng.normal(0, 0.2, (n, 2)) * sizes[c]
  wh = sizes[c] * np.exp(rng.normal(0, 0.15, (n, 2)))
  boxes = np.concatenate([ctr - wh / 2, ctr + wh / 2], 1).astype(np.float32)
  scores = rng.permutation(n).astype(np.float32) / n  # Distinct scores.
  return boxes, scores


@functools.partial(jax.jit, static_argnames=("thr", "max_output", "method", "tile_size"))
def _nms(boxes, scores, valid, *, thr, max_output, method, tile_size=N.DEFAULT_TILE_SIZE):
  return N.nms(boxes, scores, thr, max_output, valid, method=method, tile_size=tile_size)


@functools.partial(jax.jit, static_argnames=("thr", "max_output", "method"))
def _batched(boxes, scores, classes, valid, *, thr, max_output, method):
  return N.batched_nms(boxes, scores, classes, thr, max_output, valid, method=method)


def _kept(keep, valid):
  keep, valid = np.asarray(keep), np.asarray(valid)
  assert keep.dtype == np.int32 and np.all(valid[:valid.sum()]) and np.all(keep[~valid] == 0)
  return keep[valid]


@pytest.mark.parametrize("method", ["matrix", "tiled"])
@pytest.mark.parametrize("thr", [0.5, 0.7])
def test_random_boxes_with_invalid_entries_and_truncation(thr, method):
  rng = np.random.default_rng(int(thr * 10))
  boxes, scores = random_clustered_boxes(rng, 300, 25)
  valid = rng.random(300) > 0.15
  ref = reference_nms(boxes, scores, thr, valid)
  assert 25 < len(ref) < 250  # Real suppression happens, and the buffer is not trivially full.
  run = functools.partial(_nms, boxes, scores, valid, thr=thr, method=method)
  np.testing.assert_array_equal(_kept(*run(max_output=300)), ref)
  # max_output below the number kept: the greedy prefix.
  np.testing.assert_array_equal(_kept(*run(max_output=20)), ref[:20])
  if method == "tiled":  # Results do not depend on the tile size (1 = plain sequential greedy).
    for tile in (1, 7):
      np.testing.assert_array_equal(_kept(*run(max_output=300, tile_size=tile)), ref)


@pytest.mark.parametrize("method", ["matrix", "tiled"])
def test_batched_equals_per_class_reference(method):
  rng = np.random.default_rng(3)
  boxes, scores = random_clustered_boxes(rng, 300, 15)
  classes = rng.integers(0, 4, 300).astype(np.int32)
  valid = rng.random(300) > 0.1
  ref = reference_nms(boxes, scores, 0.5, valid, classes)
  run = functools.partial(_batched, boxes, scores, classes, valid, thr=0.5, method=method)
  np.testing.assert_array_equal(_kept(*run(max_output=300)), ref)
  np.testing.assert_array_equal(_kept(*run(max_output=30)), ref[:30])


def test_vmapped_levels_equal_single_calls():
  rng = np.random.default_rng(4)
  data = [random_clustered_boxes(rng, 300, 20) for _ in range(3)]
  boxes = np.stack([d[0] for d in data])
  scores = np.stack([d[1] for d in data])
  valid = np.ones((3, 300), bool)
  keep, kv = jax.jit(jax.vmap(lambda b, s, v: N.nms(b, s, 0.7, 300, v)))(boxes, scores, valid)
  for lvl in range(3):
    np.testing.assert_array_equal(_kept(keep[lvl], kv[lvl]),
                                  reference_nms(boxes[lvl], scores[lvl], 0.7))


@pytest.mark.parametrize("method", ["matrix", "tiled"])
def test_score_ties_nan_and_all_invalid(method):
  boxes = np.array([[0, 0, 10, 10], [0, 0, 10, 10.5], [50, 50, 60, 60], [1, 1, 9, 9]],
                   np.float32)
  scores = np.array([0.5, 0.5, 0.5, np.nan], np.float32)
  keep, valid = N.nms(boxes, scores, 0.5, 4, method=method)
  # Ties keep input order (stable sort); the NaN-scored box is never kept.
  np.testing.assert_array_equal(_kept(keep, valid), [0, 2])
  keep, valid = N.nms(boxes, scores, 0.5, 4, valid=np.zeros(4, bool), method=method)
  assert not np.any(np.asarray(valid))


def test_threshold_compared_as_double_like_torchvision():
  # float32(0.1) > 0.1 as doubles: an IoU equal to float32(0.1) exceeds threshold 0.1, whereas
  # float32(0.7) < 0.7, so an IoU equal to float32(0.7) does not exceed 0.7.
  for thr in (0.1, 0.7, 0.5, 0.3):
    for ovr in np.float32(thr) * np.array([1, 1 + 2 ** -23, 1 - 2 ** -24], np.float32):
      assert bool(N._exceeds(jnp.float32(ovr), thr)) == (float(ovr) > thr), (thr, ovr)


def test_compiles_once_for_repeated_calls():
  traces = []

  @functools.partial(jax.jit, static_argnums=(2,))
  def run(boxes, scores, thr):
    traces.append(1)
    return N.nms(boxes, scores, thr, 50)

  rng = np.random.default_rng(5)
  for _ in range(3):
    boxes, scores = random_clustered_boxes(rng, 64, 8)
    jax.block_until_ready(run(boxes, scores, 0.7))
  assert len(traces) == 1
