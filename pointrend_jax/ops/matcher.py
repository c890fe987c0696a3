"""Ground-truth matching (detectron2 ``Matcher``) with padded, validity-masked GT rows."""

from __future__ import annotations

from typing import Sequence

import jax.numpy as jnp


def match(iou: jnp.ndarray, gt_valid: jnp.ndarray, thresholds: Sequence[float],
          labels: Sequence[int], allow_low_quality_matches: bool = False
          ) -> tuple[jnp.ndarray, jnp.ndarray]:
  """Assigns every prediction (anchor / proposal) a GT index and a label.

  Same as detectron2's ``Matcher(thresholds, labels, allow_low_quality_matches)`` applied to the
  valid rows of ``iou``:

  * ``matched_idx[a] = argmax_g iou[g, a]`` over valid GTs (first index on ties, as torch's CPU
    ``max``).
  * With ``t = [-inf] + thresholds + [inf]``, ``label[a] = labels[i]`` for the interval
    ``t[i] <= max_g iou[g, a] < t[i+1]``.
  * Low-quality matching: for every valid GT ``g``, every prediction whose IoU with ``g`` equals
    ``g``'s maximum over predictions (ties included) gets label 1; its ``matched_idx`` stays the
    argmax GT. As in detectron2 this also holds when that maximum is 0 (a GT overlapping no
    prediction then turns every non-overlapping prediction positive); detectron2 avoids it by
    dropping empty GT boxes beforehand, and so must the caller.
  * No valid GT: ``matched_idx = 0`` and every label ``labels[0]`` (detectron2's empty-matrix case).

  Args:
    iou: ``[G, A]`` match quality (IoU, >= 0) between padded GTs and predictions.
    gt_valid: ``[G]`` bool; invalid (padding) rows never match and never trigger low-quality
      matches.
    thresholds: increasing thresholds, e.g. RPN ``(0.3, 0.7)``, ROI heads ``(0.5,)``.
    labels: ``len(thresholds) + 1`` labels in ``{-1, 0, 1}``, e.g. ``(0, -1, 1)``, ``(0, 1)``.
    allow_low_quality_matches: RPN True, ROI heads False.

  Returns:
    ``matched_idx`` ``[A]`` int32 and ``match_labels`` ``[A]`` int8.
  """
  thresholds = [float(t) for t in thresholds]
  labels = [int(l) for l in labels]
  if len(labels) != len(thresholds) + 1:
    raise ValueError(f"need len(labels) == len(thresholds) + 1, got {labels}, {thresholds}")
  if any(lo > hi for lo, hi in zip(thresholds[:-1], thresholds[1:])):
    raise ValueError(f"thresholds must be increasing: {thresholds}")
  iou = jnp.asarray(iou, jnp.float32)
  gt_valid = jnp.asarray(gt_valid, bool)
  g, a = iou.shape
  if g == 0:
    return jnp.zeros((a,), jnp.int32), jnp.full((a,), labels[0], jnp.int8)

  # IoU >= 0, so -1 keeps padding rows out of the max/argmax whenever a valid row exists.
  q = jnp.where(gt_valid[:, None], iou, -1.0)
  matched_vals = jnp.max(q, axis=0)
  matched_idx = jnp.argmax(q, axis=0).astype(jnp.int32)

  bounds = [-jnp.inf] + thresholds + [jnp.inf]
  match_labels = jnp.ones((a,), jnp.int8)
  for lab, lo, hi in zip(labels, bounds[:-1], bounds[1:]):
    in_range = (matched_vals >= lo) & (matched_vals < hi)
    match_labels = jnp.where(in_range, jnp.int8(lab), match_labels)

  if allow_low_quality_matches:
    best_per_gt = jnp.max(q, axis=1)
    is_best = (q == best_per_gt[:, None]) & gt_valid[:, None]
    match_labels = jnp.where(jnp.any(is_best, axis=0), jnp.int8(1), match_labels)

  any_gt = jnp.any(gt_valid)
  matched_idx = jnp.where(any_gt, matched_idx, 0)
  match_labels = jnp.where(any_gt, match_labels, jnp.int8(labels[0]))
  return matched_idx, match_labels
