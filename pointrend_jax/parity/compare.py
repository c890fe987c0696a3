"""How a recomputed array is compared with a detectron2 golden array.

A :class:`Check` names how to recompute one golden array from the golden file's inputs and how
to compare the result. :func:`compare` turns a (check, expected, actual) triple into a
:class:`Row`, the unit that ``python -m pointrend_jax.tools.d2_parity`` prints.

Comparison kinds
----------------
``allclose``  float arrays: passes when ``|a - e| <= atol + rtol * |e|`` everywhere (numpy's
              rule); the row reports max abs and max rel error (rel = abs / max(|e|, tiny)).
``exact``     integer / bool arrays that must be identical (e.g. NMS kept indices).
``agreement`` bool masks: the fraction of equal pixels must be >= ``min_agreement``.

Model goldens add rows compared on most entries (:func:`mostly_close_row`) and box sets matched
by IoU regardless of order (:func:`set_match`), whose rows may differ only at near-ties of a
top-n cut.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Mapping

import numpy as np

Golden = Mapping[str, np.ndarray]

TIE_TOL = 1e-4          # near-tie margin of a top-k / top-n cut
MATCH_IOU = 0.99        # proposals / detections are the same box above this
MIN_AGREEMENT = 0.999   # refined maps / masks: fraction within tolerance
FLOAT_TOL = dict(atol=1e-5, rtol=1e-5)  # op-level float goldens


def nhwc(x: np.ndarray) -> np.ndarray:
  return np.transpose(x, (0, 2, 3, 1))


def nchw(x: Any) -> np.ndarray:
  return np.transpose(np.asarray(x), (0, 3, 1, 2))


def boxes_by_image(golden: Golden, prefix: str) -> tuple[np.ndarray, np.ndarray]:
  """The golden's ``<prefix>_img0``, ``_img1``, ... boxes concatenated, and each one's image."""
  boxes, batch_index = [], []
  while f"{prefix}_img{len(boxes)}" in golden:
    b = golden[f"{prefix}_img{len(boxes)}"]
    batch_index.append(np.full((b.shape[0],), len(boxes), np.int32))
    boxes.append(b)
  return np.concatenate(boxes), np.concatenate(batch_index)


@dataclasses.dataclass(frozen=True)
class Check:
  """How to recompute and compare one golden array.

  Attributes:
    compute: ``golden -> np.ndarray``; reads the ``in_*`` arrays it needs from the golden mapping.
    kind: one of ``allclose``, ``exact``, ``agreement``.
    atol, rtol: tolerances for ``allclose``.
    min_agreement: for ``agreement``, the minimum fraction of equal elements.
  """

  compute: Callable[[Golden], Any]
  kind: str = "allclose"
  atol: float = 1e-5
  rtol: float = 1e-5
  min_agreement: float = 1.0

  def tolerance_str(self) -> str:
    if self.kind == "allclose":
      return f"atol={self.atol:g} rtol={self.rtol:g}"
    if self.kind == "agreement":
      return f">={self.min_agreement:.4%} equal"
    return self.kind


@dataclasses.dataclass(frozen=True)
class Row:
  name: str
  max_abs: float
  max_rel: float
  tolerance: str
  passed: bool
  note: str = ""


def compare(name: str, check: Check, expected: np.ndarray, actual: Any) -> Row:
  """Compares ``actual`` with ``expected`` as ``check.kind`` says; never raises on mismatch."""
  actual = np.asarray(actual)
  expected = np.asarray(expected)
  tol = check.tolerance_str()
  if actual.shape != expected.shape:
    return Row(name, np.inf, np.inf, tol, False,
               f"shape {actual.shape} != expected {expected.shape}")
  if check.kind == "allclose":
    e = expected.astype(np.float64)
    a = actual.astype(np.float64)
    if e.size == 0:
      return Row(name, 0.0, 0.0, tol, True)
    if not np.all(np.isfinite(a) == np.isfinite(e)):
      return Row(name, np.inf, np.inf, tol, False, "non-finite values differ")
    diff = np.abs(a - e)
    diff = np.where(np.isfinite(diff), diff, 0.0)
    rel = diff / np.maximum(np.abs(e), np.finfo(np.float32).tiny)
    ok = bool(np.all(diff <= check.atol + check.rtol * np.abs(np.where(np.isfinite(e), e, 0))))
    return Row(name, float(diff.max()), float(rel.max()), tol, ok)
  if check.kind == "exact":
    mism = int(np.sum(actual != expected))
    err = (float(np.max(np.abs(actual.astype(np.float64) - expected.astype(np.float64))))
           if actual.size else 0.0)
    return Row(name, err, float(mism), tol, mism == 0, f"{mism} differing" if mism else "")
  if check.kind == "agreement":
    n = max(expected.size, 1)
    mism = int(np.sum(actual != expected))
    frac = 1.0 - mism / n
    return Row(name, float(mism), mism / n, tol, frac >= check.min_agreement,
               f"{mism} differing" if mism else "")
  raise ValueError(f"unknown comparison kind {check.kind!r} for {name}")


def _with_note(row: Row, note: str) -> Row:
  if not note:
    return row
  return dataclasses.replace(row, note="; ".join(n for n in (row.note, note) if n))


def close_row(name: str, expected: np.ndarray, actual: Any, atol: float, rtol: float,
              note: str = "") -> Row:
  return _with_note(compare(name, Check(None, "allclose", atol, rtol), expected, actual), note)


def exact_row(name: str, expected: np.ndarray, actual: Any) -> Row:
  return compare(name, Check(None, "exact"), expected, actual)


def agreement_row(name: str, expected: np.ndarray, actual: Any) -> Row:
  return compare(name, Check(None, "agreement", min_agreement=MIN_AGREEMENT), expected, actual)


def fail_row(name: str, note: str, tol: str = "-") -> Row:
  return Row(name, math.inf, math.inf, tol, False, note)


def mostly_close_row(name: str, expected: np.ndarray, actual: np.ndarray, atol: float,
                     rtol: float, strict_rows: np.ndarray | None = None) -> Row:
  """allclose on >= MIN_AGREEMENT of the entries (all entries of ``strict_rows``)."""
  tol = f"atol={atol:g} rtol={rtol:g} on >={MIN_AGREEMENT:.1%}"
  e = np.asarray(expected, np.float64)
  a = np.asarray(actual, np.float64)
  if a.shape != e.shape:
    return fail_row(name, f"shape {a.shape} != expected {e.shape}", tol)
  if e.size == 0:
    return Row(name, 0.0, 0.0, tol, True)
  diff = np.abs(a - e)
  bad = ~(diff <= atol + rtol * np.abs(e))
  good = ~bad
  max_abs = float(diff[good].max()) if good.any() else math.inf
  rel = diff / np.maximum(np.abs(e), np.finfo(np.float32).tiny)
  max_rel = float(rel[good].max()) if good.any() else math.inf
  ok = bad.mean() <= 1.0 - MIN_AGREEMENT
  note = ""
  if bad.any():
    note = (f"{int(bad.sum())} of {bad.size} out of tol (top-k flips), max err there "
            f"{float(diff[bad].max()):.3g}")
  if strict_rows is not None and bad[np.asarray(strict_rows, bool)].any():
    ok = False
    note += "; differences in rows without a top-k flip"
  return Row(name, max_abs, max_rel, tol, bool(ok), note)


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
  """[N, 4] x [M, 4] -> [N, M] IoU (float64)."""
  a, b = np.asarray(a, np.float64).reshape(-1, 4), np.asarray(b, np.float64).reshape(-1, 4)
  lt = np.maximum(a[:, None, :2], b[None, :, :2])
  rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
  inter = np.prod(np.clip(rb - lt, 0, None), axis=-1)
  area = lambda x: (x[:, 2] - x[:, 0]) * (x[:, 3] - x[:, 1])
  union = area(a)[:, None] + area(b)[None, :] - inter
  return np.where(inter > 0, inter / np.where(union > 0, union, 1), 0.0)


@dataclasses.dataclass
class SetMatch:
  """Golden rows matched to ours. ``j[i]`` = our row of golden row ``i`` or -1."""
  j: np.ndarray
  ok: bool
  note: str

  @property
  def m(self) -> np.ndarray:
    return self.j >= 0


def set_match(g_boxes: np.ndarray, g_scores: np.ndarray, boxes: np.ndarray, scores: np.ndarray,
              capacity: int, g_classes: np.ndarray | None = None,
              classes: np.ndarray | None = None) -> SetMatch:
  """Matches golden and our boxes as sets (IoU > MATCH_IOU, same class if given).

  Rows may stay unmatched only at a full top-n cut (``capacity`` rows on both sides) and only
  when the scores of all unmatched rows, golden and ours, tie the golden cut (its lowest score)
  within TIE_TOL: which of such neighbours make the cut is not meaningful.
  """
  iou = box_iou(g_boxes, boxes)
  if g_classes is not None:
    iou = np.where(np.asarray(g_classes)[:, None] == np.asarray(classes)[None, :], iou, 0.0)
  j = np.full(len(g_boxes), -1, np.int64)
  used = np.zeros(len(boxes), bool)
  for i in range(len(g_boxes)):  # greedy, golden order
    cand = np.where(used, -1.0, iou[i])
    if cand.size and cand.max() > MATCH_IOU:
      j[i] = int(cand.argmax())
      used[j[i]] = True
  problems = []
  if len(boxes) != len(g_boxes):
    problems.append(f"{len(boxes)} rows, golden {len(g_boxes)}")
  full = len(g_boxes) == capacity and len(boxes) == capacity
  g_un = np.flatnonzero(j < 0)
  o_un = np.flatnonzero(~used)
  if len(g_un) or len(o_un):
    # A flip at the cut swaps rows whose scores all tie the golden cut value.
    cut = g_scores.min() if len(g_scores) else 0.0
    unmatched = np.concatenate([g_scores[g_un], scores[o_un]])
    if not (full and np.all(np.abs(unmatched - cut) <= TIE_TOL)):
      problems.append(f"{len(g_un)} golden rows unmatched, not near-ties of the cut (first: "
                      f"{g_un[:5].tolist()})")
  note = f"{len(g_un)} unmatched near-ties at the cut" if len(g_un) else ""
  if problems:
    note = "; ".join(problems)
  return SetMatch(j, not problems, note)


def matched_row(row: Row, sm: SetMatch) -> Row:
  """``row`` of the golden rows ``sm`` matched, with the match's note; fails when the match does."""
  row = _with_note(row, (sm.note + "; " if sm.note else "") + f"{int(sm.m.sum())} matched")
  return dataclasses.replace(row, passed=row.passed and sm.ok)
