"""Semantic segmentation metrics from a confusion matrix (detectron2's ``SemSegEvaluator``).

The matrix is ``(K + 1) x (K + 1)`` indexed ``[pred, gt]``; ground-truth ``ignore_label`` pixels
go to the extra bin ``K`` and drop out of every metric. With ``tp_k`` the diagonal,
``gt_k`` = ground-truth pixels of class k, ``pred_k`` = pixels predicted k (both over
non-ignored pixels):

* ``IoU-<name>`` = tp / (gt + pred - tp), NaN for a class without ground-truth pixels;
* ``mIoU`` = sum of the IoUs of classes *with ground truth* / number of classes with ground
  truth *or* predictions. This is detectron2's formula: a class that is predicted but absent from
  the ground truth adds 0 to the mean (it only grows the denominator);
* ``fwIoU`` = sum over classes with ground truth of IoU * gt / sum(gt);
* ``ACC-<name>`` = tp / gt; ``mACC`` = mean over classes with ground truth; ``pACC`` =
  sum(tp) / sum(gt).

All values are in percent and keyed ``sem_seg/<metric>``. With no non-ignored pixel at all the
metrics are NaN.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np


def confusion_matrix(pred: np.ndarray, gt: np.ndarray, num_classes: int,
                     ignore_label: int = 255) -> np.ndarray:
  """int64 [K + 1, K + 1] counts indexed [pred, gt]; ignored ground truth in column K.

  Args:
    pred: int [...] predicted class ids in 0..K-1 (an argmax, not logits).
    gt: int [...] same shape; class ids in 0..K-1 or ``ignore_label``.
    num_classes: K.
    ignore_label: ground-truth value excluded from the metrics.
  """
  pred = np.asarray(pred)
  gt = np.asarray(gt)
  if pred.shape != gt.shape:
    raise ValueError(f"prediction shape {pred.shape} != ground truth shape {gt.shape}")
  pred = pred.astype(np.int64).ravel()
  gt = gt.astype(np.int64).ravel()
  if pred.size and (pred.min() < 0 or pred.max() >= num_classes):
    raise ValueError(f"predictions must be in 0..{num_classes - 1}, "
                     f"got range {pred.min()}..{pred.max()}")
  ignored = gt == ignore_label
  bad = ~ignored & ((gt < 0) | (gt >= num_classes))
  if bad.any():
    raise ValueError(f"ground truth has values outside 0..{num_classes - 1} and "
                     f"{ignore_label}: {sorted(set(gt[bad].tolist()))[:10]}")
  gt = np.where(ignored, num_classes, gt)
  n = num_classes + 1
  return np.bincount(n * pred + gt, minlength=n * n).reshape(n, n)


class SemSegEvaluator:
  """Accumulates a confusion matrix over images and reports detectron2's metrics."""

  def __init__(self, num_classes: int, class_names: Sequence[str] | None = None,
               ignore_label: int = 255):
    """Args:
      num_classes: K (the model's classes; ``ignore_label`` is not one of them).
      class_names: K names for the per-class keys (default ``"0".."K-1"``).
      ignore_label: ground-truth value to ignore.
    """
    if class_names is None:
      class_names = [str(i) for i in range(num_classes)]
    if len(class_names) != num_classes:
      raise ValueError(f"{len(class_names)} class names for {num_classes} classes")
    self.num_classes = num_classes
    self.class_names = tuple(class_names)
    self.ignore_label = ignore_label
    self.reset()

  def reset(self) -> None:
    self.conf_matrix = np.zeros((self.num_classes + 1,) * 2, np.int64)

  def add(self, pred: np.ndarray, gt: np.ndarray) -> None:
    """Adds one image (or a batch): predicted ids and ground truth of the same shape."""
    self.conf_matrix += confusion_matrix(pred, gt, self.num_classes, self.ignore_label)

  def compute(self) -> dict[str, float]:
    """``sem_seg/{mIoU, fwIoU, mACC, pACC, IoU-<name>, ACC-<name>}`` in percent (see the module
    docstring)."""
    k = self.num_classes
    m = self.conf_matrix.astype(np.float64)
    tp = m.diagonal()[:-1]
    pos_gt = m[:-1, :-1].sum(axis=0)
    pos_pred = m[:-1, :-1].sum(axis=1)
    has_gt = pos_gt > 0
    acc = np.full(k, np.nan)
    iou = np.full(k, np.nan)
    acc[has_gt] = tp[has_gt] / pos_gt[has_gt]
    union = pos_gt + pos_pred - tp
    iou[has_gt] = tp[has_gt] / union[has_gt]
    iou_valid = (pos_gt + pos_pred) > 0
    total = pos_gt.sum()
    with np.errstate(invalid="ignore", divide="ignore"):
      miou = iou[has_gt].sum() / iou_valid.sum() if has_gt.any() else np.nan
      macc = acc[has_gt].sum() / has_gt.sum() if has_gt.any() else np.nan
      fwiou = (iou[has_gt] * pos_gt[has_gt] / total).sum() if total > 0 else np.nan
      pacc = tp.sum() / total if total > 0 else np.nan
    res = {"sem_seg/mIoU": 100 * float(miou), "sem_seg/fwIoU": 100 * float(fwiou)}
    for i, name in enumerate(self.class_names):
      res[f"sem_seg/IoU-{name}"] = 100 * float(iou[i])
    res["sem_seg/mACC"] = 100 * float(macc)
    res["sem_seg/pACC"] = 100 * float(pacc)
    for i, name in enumerate(self.class_names):
      res[f"sem_seg/ACC-{name}"] = 100 * float(acc[i])
    return res
