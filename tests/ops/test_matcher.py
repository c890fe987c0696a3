"""Tests of ``pointrend_jax.ops.matcher.match`` (detectron2 ``Matcher`` semantics)."""

from __future__ import annotations

import jax
import numpy as np

from pointrend_jax.ops.matcher import match

RPN = dict(thresholds=(0.3, 0.7), labels=(0, -1, 1))
ROI = dict(thresholds=(0.5,), labels=(0, 1), allow_low_quality_matches=False)

# Rows: GT 0, GT 1, padding (invalid, would win everything if it were used).
IOU = np.array([
    [0.8, 0.5, 0.10, 0.0, 0.25, 0.2],
    [0.1, 0.6, 0.25, 0.0, 0.25, 0.6],
    [0.9, 0.9, 0.90, 0.9, 0.90, 0.9],
], np.float32)
VALID = np.array([True, True, False])


def _match(iou, valid, **kw):
  idx, lab = jax.jit(lambda i, v: match(i, v, **kw))(iou, valid)
  assert idx.dtype == np.int32 and lab.dtype == np.int8
  return np.asarray(idx), np.asarray(lab)


def test_thresholds_argmax_ties_and_padding_rows():
  idx, lab = _match(IOU, VALID, **RPN, allow_low_quality_matches=False)
  # Anchor 4 ties between GT 0 and 1 -> first index; anchor 3 overlaps nothing -> GT 0.
  np.testing.assert_array_equal(idx, [0, 1, 1, 0, 0, 1])
  np.testing.assert_array_equal(lab, [1, -1, 0, 0, 0, -1])


def test_low_quality_matches_include_ties_and_keep_argmax_index():
  idx, lab = _match(IOU, VALID, **RPN, allow_low_quality_matches=True)
  # GT 1's best IoU 0.6 is reached by anchors 1 and 5 (a tie): both become positive.
  np.testing.assert_array_equal(lab, [1, 1, 0, 0, 0, 1])
  np.testing.assert_array_equal(idx, [0, 1, 1, 0, 0, 1])
  # A GT whose best IoU is below the low threshold still gets its best anchors; the anchor's
  # matched index stays the argmax GT (GT 0 here).
  iou = np.array([[0.2, 0.05, 0.0], [0.1, 0.0, 0.0]], np.float32)
  idx, lab = _match(iou, np.array([True, True]), **RPN, allow_low_quality_matches=True)
  np.testing.assert_array_equal(lab, [1, 0, 0])
  np.testing.assert_array_equal(idx, [0, 0, 0])


def test_low_quality_with_zero_best_iou_follows_detectron2():
  # detectron2 compares with the GT's maximum even when it is 0: every anchor that does not
  # touch such a GT becomes positive (callers must drop empty GT boxes, as detectron2 does).
  iou = np.array([[0.0, 0.0, 0.0], [0.0, 0.8, 0.1]], np.float32)
  _, lab = _match(iou, np.array([True, True]), **RPN, allow_low_quality_matches=True)
  np.testing.assert_array_equal(lab, [1, 1, 1])
  _, lab = _match(iou, np.array([False, True]), **RPN, allow_low_quality_matches=True)
  np.testing.assert_array_equal(lab, [0, 1, 0])


def test_no_valid_gt():
  idx, lab = _match(IOU, np.zeros(3, bool), **RPN, allow_low_quality_matches=True)
  np.testing.assert_array_equal(idx, 0)
  np.testing.assert_array_equal(lab, 0)
  idx, lab = match(np.zeros((0, 4), np.float32), np.zeros((0,), bool), **ROI)
  assert idx.shape == (4,) and np.all(np.asarray(lab) == 0)


def test_roi_heads_threshold_is_inclusive():
  iou = np.array([[0.5, 0.49999997, 0.7]], np.float32)
  idx, lab = _match(iou, np.array([True]), **ROI)
  np.testing.assert_array_equal(lab, [1, 0, 1])
  np.testing.assert_array_equal(idx, [0, 0, 0])
