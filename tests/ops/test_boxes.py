"""Tests of ``pointrend_jax.ops.boxes`` (Box2BoxTransform, IoU, clipping)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from pointrend_jax.ops import boxes as B
from pointrend_jax.parity.compare import compare
from pointrend_jax.parity.ops_boxes import CHECKS

BOX_CHECKS = ("out_get_deltas_w10_10_5_5", "out_get_deltas_w1_1_1_1",
              "out_apply_deltas_w10_10_5_5", "out_apply_deltas_w1_1_1_1")


@pytest.mark.parametrize("name", BOX_CHECKS)
def test_parity_with_detectron2(ops_golden, name):
  check = CHECKS[name]
  row = compare(name, check, ops_golden[name], check.compute(ops_golden))
  assert row.passed, row


def _random_boxes(rng, n, lo=0.0, hi=100.0, min_size=1.0):
  xy = rng.uniform(lo, hi, (n, 2))
  wh = rng.uniform(min_size, hi / 2, (n, 2))
  return np.concatenate([xy, xy + wh], 1).astype(np.float32)


def test_encode_decode_round_trip():
  rng = np.random.default_rng(0)
  src, tgt = _random_boxes(rng, 50), _random_boxes(rng, 50)
  for weights in ((1, 1, 1, 1), (10, 10, 5, 5)):
    deltas = B.encode_boxes(src, tgt, weights)
    np.testing.assert_allclose(B.decode_boxes(deltas, src, weights), tgt, atol=2e-4, rtol=1e-5)


def test_decode_class_specific_layout_and_clamp():
  src = np.array([[0, 0, 10, 20], [5, 5, 9, 7]], np.float32)
  deltas = np.zeros((2, 8), np.float32)
  deltas[0, 4:] = [1, 0, 0, 100]  # class 1: shift by one width, huge dh is clamped.
  out = np.asarray(B.decode_boxes(deltas, src, (1, 1, 1, 1)))
  assert out.shape == (2, 8)
  np.testing.assert_allclose(out[:, :4], src, atol=1e-6)  # Zero deltas are the identity.
  np.testing.assert_allclose(out[1, 4:], src[1], atol=1e-6)
  h = 20 * math.exp(math.log(1000 / 16))
  np.testing.assert_allclose(out[0, 4:], [10, 10 - h / 2, 20, 10 + h / 2], rtol=1e-6)


def _np_iou(a, b):
  out = np.zeros((len(a), len(b)), np.float64)
  for i, p in enumerate(a.astype(np.float64)):
    for j, q in enumerate(b.astype(np.float64)):
      w = min(p[2], q[2]) - max(p[0], q[0])
      h = min(p[3], q[3]) - max(p[1], q[1])
      inter = max(w, 0) * max(h, 0)
      if inter > 0:
        out[i, j] = inter / ((p[2] - p[0]) * (p[3] - p[1]) + (q[2] - q[0]) * (q[3] - q[1]) - inter)
  return out


def test_pairwise_iou_matches_reference_and_handles_empty():
  rng = np.random.default_rng(1)
  a = _random_boxes(rng, 7)
  extra = [[3, 3, 3, 8], [200, 200, 210, 210]]  # Empty; disjoint from everything.
  b = np.concatenate([_random_boxes(rng, 6), extra]).astype(np.float32)
  iou = np.asarray(B.pairwise_iou(a, b))
  assert iou.shape == (7, 8)
  np.testing.assert_allclose(iou, _np_iou(a, b), atol=1e-6)
  assert np.all(iou[:, -2:] == 0)  # Empty box and disjoint box: exactly 0, never NaN.
  empty = np.zeros((2, 4), np.float32)
  assert np.all(np.asarray(B.pairwise_iou(empty, empty)) == 0)


def test_area_clip_nonempty():
  boxes = np.array([[-5, 2, 30, 50], [10, 10, 10, 20], [1, 1, 2.5, 1.5]], np.float32)
  np.testing.assert_allclose(B.box_area(boxes), [35 * 48, 0, 0.75])
  clipped = np.asarray(B.clip_boxes(boxes, (40, 25)))
  np.testing.assert_array_equal(clipped[0], [0, 2, 25, 40])
  np.testing.assert_array_equal(B.nonempty_boxes(boxes), [True, False, True])
  np.testing.assert_array_equal(B.nonempty_boxes(boxes, threshold=0.6), [True, False, False])
