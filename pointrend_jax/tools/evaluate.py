"""Evaluates saved predictions.

Usage::

  python -m pointrend_jax.tools.evaluate coco \\
      --annotations instances_val.json --predictions coco_instances_results.json \\
      [--tasks bbox,segm] [--output metrics.json]

  python -m pointrend_jax.tools.evaluate cityscapes-semantic \\
      --gt CITYSCAPES_ROOT [--split val] --predictions DIR [--output metrics.json]

  python -m pointrend_jax.tools.evaluate cityscapes-instance \\
      --gt CITYSCAPES_ROOT [--split val] --predictions DIR [--output metrics.json]

``coco`` prints COCOeval's standard tables and a per-category AP table per task, then writes
the flat metrics (``bbox/AP``, ``segm/AP-<name>``, ... in percent; NaN as ``null``) to
``--output``. Tasks default to those every prediction supports (``bbox``; ``segm`` when all
have a ``segmentation``).

The Cityscapes commands evaluate the official results formats (see
:mod:`pointrend_jax.evaluation.cityscapes_eval`) against ``CITYSCAPES_ROOT/gtFine/<split>``, as
cityscapesScripts does, without needing it:

* ``cityscapes-semantic``: one label-id PNG per ``*_gtFine_labelIds.png``, named
  ``<city>_<seq>_<frame>*.png`` anywhere under ``DIR``; prints the per-class IoU table and
  writes ``sem_seg/mIoU``, ``sem_seg/IoU-<name>``, ``sem_seg/IoU_sup`` (+ ``iIoU``,
  ``iIoU_sup`` when the ``instanceIds`` exist);
* ``cityscapes-instance``: one ``<city>_<seq>_<frame>*.txt`` per ``*_gtFine_instanceIds.png``
  listing ``<mask png> <label id> <score>``; prints the per-class AP table and writes
  ``segm/AP``, ``segm/AP50``, ``segm/AP-<name>``, ``segm/AP50-<name>``.

Exit status: 0 on success; 2 on any error (usage, missing or malformed file).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from typing import Sequence, TextIO

from pointrend_jax.evaluation import cityscapes_eval
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
  coco.add_argument("--backend", default="pycocotools", choices=coco_eval.BACKENDS,
                    help="COCOeval implementation (both give the same numbers)")
  for name, help_text in (
      ("cityscapes-semantic", "Cityscapes semantic mIoU of label-id PNGs"),
      ("cityscapes-instance", "Cityscapes instance mask AP of txt + PNG results")):
    city = sub.add_parser(name, help=help_text)
    city.add_argument("--gt", required=True, help="Cityscapes root (holding gtFine/<split>)")
    city.add_argument("--split", default="val", help="ground-truth split (default: val)")
    city.add_argument("--predictions", required=True, help="folder of results (official format)")
    city.add_argument("--output", help="where to write the flat metrics JSON")
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
  evaluator = coco_eval.evaluate_coco(args.annotations, results, tasks, args.backend)
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
  return metrics


def _run_cityscapes(args: argparse.Namespace, out: TextIO) -> dict[str, float]:
  if args.command == "cityscapes-semantic":
    evaluator = cityscapes_eval.evaluate_semantic_results(args.gt, args.split, args.predictions)
    metrics = evaluator.compute()
    print(f"Cityscapes semantic, {evaluator.num_images} images (IoU in %):", file=out)
    print(evaluator.table(), file=out)
    summary = ", ".join(f"{k.split('/')[1]}={_fmt(v)}" for k, v in metrics.items()
                        if "-" not in k)
  else:
    evaluator = cityscapes_eval.evaluate_instance_results(args.gt, args.split, args.predictions)
    metrics = evaluator.compute()
    print(f"Cityscapes instances, {evaluator.num_images} images (mask AP in %):", file=out)
    print(evaluator.table(metrics), file=out)
    summary = f"AP={_fmt(metrics['segm/AP'])}, AP50={_fmt(metrics['segm/AP50'])}"
  print(f"\n{summary}", file=out)
  return metrics


def _fmt(value: float) -> str:
  return "nan" if math.isnan(value) else f"{value:.3f}"


def main(argv: Sequence[str] | None = None, out: TextIO | None = None) -> int:
  """Command-line entry point; returns the exit status."""
  out = out or sys.stdout
  parser = _parser()
  args = parser.parse_args(argv)
  try:
    metrics = (_run_coco if args.command == "coco" else _run_cityscapes)(args, out)
    if args.output:
      coco_eval.write_metrics_json(metrics, args.output)
      print(f"wrote {args.output}", file=out)
  except (FileNotFoundError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  sys.exit(main())
