"""Checks the project against detectron2 goldens.

Usage::

  python -m pointrend_jax.tools.d2_parity PATH [PATH ...]

Each PATH is either

* an op-level golden file laid out like ``shared/fixtures/detectron2_parity/ops.npz``
  (``in_*`` inputs, ``out_*`` outputs): every ``out_*`` array is recomputed with the project's
  ops and compared as its registered :class:`~pointrend_jax.parity.compare.Check` says; or
* a model fixture folder (``config.yaml``, ``meta.json``, ``expected.npz``, ``image.png``,
  optionally ``model_input.png``, and ``make_weights.py`` in the parent folder): the model of
  ``config.yaml`` is built, loaded with the fixture's weights recipe, run once, and every golden
  array is compared by the rule registered for its name (:mod:`pointrend_jax.parity.model_rules`;
  tolerances in ``docs/parity.md``).

One row is printed per array (name, max abs error, max rel error, tolerance, PASS/FAIL), a
``-- PATH: n passed, m failed`` line per folder, then ``N passed, M failed``. The exit status
is non-zero on any failure, including an array that no check knows how to recompute.
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback
from typing import Iterable, Mapping, Sequence

import numpy as np

from pointrend_jax.parity.compare import Check, Row, compare, fail_row


def ops_checks() -> dict[str, Check]:
  """All registered op-level checks, keyed by golden array name."""
  # Imported lazily so that `--help` does not pay for importing jax.
  from pointrend_jax.parity import ops_boxes, ops_points, ops_roi_align

  checks: dict[str, Check] = {}
  for module in (ops_points, ops_roi_align, ops_boxes):
    overlap = checks.keys() & module.CHECKS.keys()
    if overlap:
      raise RuntimeError(f"arrays checked twice: {sorted(overlap)}")
    checks.update(module.CHECKS)
  return checks


def check_ops_file(golden: Mapping[str, np.ndarray],
                   checks: Mapping[str, Check]) -> list[Row]:
  """Recomputes every output array of an ops golden mapping; one row per output array."""
  rows = []
  for name in sorted(golden):
    if name.startswith("in_"):
      continue  # Inputs are read by the checks, not compared.
    check = checks.get(name)
    if check is None:
      rows.append(fail_row(name, "no check knows this array"))
      continue
    try:
      actual = check.compute(golden)
    except Exception as e:  # A broken check is a failed row, not a crash of the report.
      rows.append(fail_row(name, f"{type(e).__name__}: {e}".splitlines()[0][:200],
                           check.tolerance_str()))
      if os.environ.get("D2_PARITY_DEBUG"):
        traceback.print_exc()
      continue
    rows.append(compare(name, check, golden[name], actual))
  return rows


def format_rows(rows: Iterable[Row]) -> str:
  rows = list(rows)
  width = max([len(r.name) for r in rows] + [5])
  lines = [f"{'array':<{width}}  {'max_abs_err':>11}  {'max_rel_err':>11}  {'tolerance':<24}  result"]
  for r in rows:
    line = (f"{r.name:<{width}}  {r.max_abs:11.3e}  {r.max_rel:11.3e}  {r.tolerance:<24}  "
            f"{'PASS' if r.passed else 'FAIL'}")
    if r.note:
      line += f"  ({r.note})"
    lines.append(line)
  return "\n".join(lines)


def run(paths: Sequence[str], out=None) -> int:
  """Checks every path (see the module docstring); returns the number of failed rows (missing
  paths count as failures)."""
  out = sys.stdout if out is None else out  # resolved per call (captured streams in tests)
  passed = failed = 0
  checks = None
  for path in paths:
    print(f"== {path}", file=out)
    folder = os.path.isdir(path)
    if folder:
      from pointrend_jax.parity import models  # pylint: disable=g-import-not-at-top
      rows = models.check_model_folder(
          path, log=lambda msg: print(f"# {msg}", file=out, flush=True))
    elif not os.path.isfile(path):
      print(f"FAIL: no such file: {path}", file=out)
      failed += 1
      continue
    else:
      try:
        with np.load(path, allow_pickle=False) as f:
          golden = {k: f[k] for k in f.files}
      except Exception as e:
        print(f"FAIL: cannot read {path} as an .npz golden file: {e}", file=out)
        failed += 1
        continue
      if checks is None:
        checks = ops_checks()
      rows = check_ops_file(golden, checks)
    print(format_rows(rows), file=out)
    n_ok = sum(r.passed for r in rows)
    if folder:
      print(f"-- {path}: {n_ok} passed, {len(rows) - n_ok} failed", file=out)
    passed += n_ok
    failed += len(rows) - n_ok
  print(f"{passed} passed, {failed} failed", file=out)
  return failed


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(
      prog="python -m pointrend_jax.tools.d2_parity",
      description=("Recompute detectron2 golden arrays with pointrend-jax and compare them. "
                   "PATH is an op golden file laid out like "
                   "shared/fixtures/detectron2_parity/ops.npz, or a model fixture folder "
                   "like shared/fixtures/detectron2_parity/r50_fpn_1x_coco/."),
      epilog="Exit status: 0 when every array passes, 1 otherwise.")
  parser.add_argument("paths", nargs="+", metavar="PATH",
                      help="golden .npz file(s) or model fixture folder(s)")
  args = parser.parse_args(argv)
  return 1 if run(args.paths) else 0


if __name__ == "__main__":
  sys.exit(main())
