"""Evaluates saved predictions.

Usage::

  python -m pointrend_jax.tools.evaluate coco \\
      --annotations instances_val.json --predictions coco_instances_results.json \\
      [--tasks bbox,segm] [--output metrics.json]

``coco`` prints COCOeval's standard tables and a per-category AP table per task, then writes
the flat metrics (``bbox/AP``, ``segm/AP-<name>``, ... in percent; NaN as ``null``) to
``--output``. Tasks default to those every prediction supports (``bbox``; ``segm`` when all
have a ``segmentation``).

``cityscapes-semantic`` is reserved and not implemented yet.

Exit status: 0 on success; 2 on any error (usage, missing or malformed file, not implemented).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from typing import Sequence, TextIO

from pointrend_jax.evaluation import coco_eval


def _parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog="python -m pointrend_jax.tools.evaluate",
                                   description=__doc__.split("\n")[0])
  sub = parser.add_subparsers(dest="command", required=True)
  coco = sub.add_parser("coco", help="COCO box/mask AP of a COCO results JSON")
  coco.add_argument("--annotations", required=True, help="ground-truth COCO instances JSON")
  coco.add_argument("--predictions", required=True, help="COCO results JSON (a list)")
  coco.add_argument("--output", help="where to write the flat metrics JSON")
  coco.add_argument("--tasks", help="comma-separated subset of bbox,segm (default: inferred)")
  sub.add_parser("cityscapes-semantic",
                 help="Cityscapes semantic mIoU (not implemented yet)")
  return parser


def _run_coco(args: argparse.Namespace, out: TextIO) -> dict[str, float]:
  missing = [f"{flag} {path}" for flag, path in (("--annotations", args.annotations),
                                                  ("--predictions", args.predictions))
             if not os.path.isfile(path)]
  if missing:
    raise FileNotFoundError("file not found: " + "; ".join(missing))
  tasks = None
  if args.tasks:
    tasks = tuple(t.strip() for t in args.tasks.split(",") if t.strip())
  results = coco_eval.read_results_json(args.predictions)
  evaluator = coco_eval.evaluate_coco(args.annotations, results, tasks)
  metrics = evaluator.compute()
  for task in coco_eval.TASKS:
    if f"{task}/AP" not in metrics:
      continue
    print(f"== {task} ==", file=out)
    print(evaluator.summaries.get(task, "(no predictions)").rstrip(), file=out)
    table = evaluator.per_category_table(task)
    if table:
      print(f"\nper-category {task} AP:\n{table}", file=out)
    summary = ", ".join(f"{m}={_fmt(metrics[f'{task}/{m}'])}" for m in coco_eval.SUMMARY_METRICS)
    print(f"\n{task}: {summary}\n", file=out)
  if args.output:
    coco_eval.write_metrics_json(metrics, args.output)
    print(f"wrote {args.output}", file=out)
  return metrics


def _fmt(value: float) -> str:
  return "nan" if math.isnan(value) else f"{value:.3f}"


def main(argv: Sequence[str] | None = None, out: TextIO | None = None) -> int:
  """Command-line entry point; returns the exit status."""
  out = out or sys.stdout
  parser = _parser()
  args = parser.parse_args(argv)
  if args.command == "cityscapes-semantic":
    print("error: cityscapes-semantic: not implemented yet", file=sys.stderr)
    return 2
  try:
    _run_coco(args, out)
  except (FileNotFoundError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  sys.exit(main())
