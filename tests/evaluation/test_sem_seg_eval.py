"""Semantic segmentation metrics on a hand-computed confusion example."""

import math

import numpy as np
import pytest

from pointrend_jax.evaluation import sem_seg

# 8 pixels, K = 3, 255 = ignore. Class "c" is predicted once but has no ground truth.
GT = np.array([[0, 0, 0, 0], [1, 1, 255, 255]])
PRED = np.array([[0, 0, 1, 2], [1, 0, 2, 0]])


def test_confusion_matrix_is_pred_by_gt_with_ignore_bin():
  m = sem_seg.confusion_matrix(PRED, GT, 3)
  expected = np.array([
      # gt:  0  1  2  ignore
      [2, 1, 0, 1],  # pred 0
      [1, 1, 0, 0],  # pred 1
      [1, 0, 0, 1],  # pred 2
      [0, 0, 0, 0],
  ])
  np.testing.assert_array_equal(m, expected)


def test_hand_computed_metrics():
  ev = sem_seg.SemSegEvaluator(3, ["a", "b", "c"])
  ev.add(PRED[:1], GT[:1])  # Accumulates over calls.
  ev.add(PRED[1:], GT[1:])
  res = ev.compute()
  # tp = (2, 1, 0); gt = (4, 2, 0); pred = (3, 2, 1) over the 6 non-ignored pixels.
  iou_a, iou_b = 2 / (4 + 3 - 2), 1 / (2 + 2 - 1)
  assert res["sem_seg/IoU-a"] == pytest.approx(100 * iou_a)
  assert res["sem_seg/IoU-b"] == pytest.approx(100 * iou_b)
  assert math.isnan(res["sem_seg/IoU-c"])
  # detectron2: IoUs of classes with GT over the count of classes with GT or predictions.
  assert res["sem_seg/mIoU"] == pytest.approx(100 * (iou_a + iou_b) / 3)
  assert res["sem_seg/fwIoU"] == pytest.approx(100 * (iou_a * 4 + iou_b * 2) / 6)
  assert res["sem_seg/ACC-a"] == pytest.approx(50.0)
  assert res["sem_seg/ACC-b"] == pytest.approx(50.0)
  assert math.isnan(res["sem_seg/ACC-c"])
  assert res["sem_seg/mACC"] == pytest.approx(50.0)
  assert res["sem_seg/pACC"] == pytest.approx(50.0)


def test_perfect_and_empty():
  ev = sem_seg.SemSegEvaluator(2)
  assert all(math.isnan(v) for v in ev.compute().values())
  gt = np.array([[0, 1], [1, 255]])
  ev.add(np.array([[0, 1], [1, 0]]), gt)
  res = ev.compute()
  assert res["sem_seg/mIoU"] == 100 and res["sem_seg/pACC"] == 100
  assert set(res) == {"sem_seg/mIoU", "sem_seg/fwIoU", "sem_seg/mACC", "sem_seg/pACC",
                      "sem_seg/IoU-0", "sem_seg/IoU-1", "sem_seg/ACC-0", "sem_seg/ACC-1"}


def test_invalid_labels():
  with pytest.raises(ValueError, match="predictions"):
    sem_seg.confusion_matrix(np.array([3]), np.array([0]), 3)
  with pytest.raises(ValueError, match="ground truth"):
    sem_seg.confusion_matrix(np.array([0]), np.array([7]), 3)
  with pytest.raises(ValueError, match="shape"):
    sem_seg.confusion_matrix(np.zeros(2, int), np.zeros(3, int), 3)
