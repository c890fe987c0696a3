"""How a recomputed array is compared with a detectron2 golden array.

A :class:`Check` names how to recompute one golden array from the golden file's inputs and how
to compare the result. :func:`compare` turns a (check, expected, actual) triple into a
:class:`Row`, the unit that ``python -m pointrend_jax.tools.d2_parity`` prints.

Comparison kinds
----------------
``allclose``  float arrays: passes when ``|a - e| <= atol + rtol * |e|`` everywhere (numpy's
              rule); the row reports max abs and max rel error (rel = abs / max(|e|, tiny)).
``exact``     integer / bool arrays that must be identical (e.g. NMS kept indices).
``set``       integer index arrays whose *order* is not meaningful (top-k on near-ties):
              per row (last axis) the two sets must be equal.
``agreement`` bool masks: the fraction of equal pixels must be >= ``min_agreement``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

import numpy as np

Golden = Mapping[str, np.ndarray]


@dataclasses.dataclass(frozen=True)
class Check:
  """How to recompute and compare one golden array.

  Attributes:
    compute: ``golden -> np.ndarray``; reads the ``in_*`` arrays it needs from the golden mapping.
    kind: one of ``allclose``, ``exact``, ``set``, ``agreement``.
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
    err = float(np.max(np.abs(actual.astype(np.float64) - expected.astype(np.float64)))) if actual.size else 0.0
    return Row(name, err, float(mism), tol, mism == 0, f"{mism} differing" if mism else "")
  if check.kind == "set":
    a2 = actual.reshape(-1, actual.shape[-1]) if actual.ndim else actual.reshape(1, 1)
    e2 = expected.reshape(-1, expected.shape[-1]) if expected.ndim else expected.reshape(1, 1)
    missing = sum(len(set(er.tolist()) - set(ar.tolist())) for ar, er in zip(a2, e2))
    return Row(name, float(missing), float(missing), tol, missing == 0,
               f"{missing} not in set" if missing else "")
  if check.kind == "agreement":
    n = max(expected.size, 1)
    mism = int(np.sum(actual != expected))
    frac = 1.0 - mism / n
    return Row(name, float(mism), mism / n, tol, frac >= check.min_agreement,
               f"{mism} differing" if mism else "")
  raise ValueError(f"unknown comparison kind {check.kind!r} for {name}")
