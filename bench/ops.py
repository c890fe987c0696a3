"""Benchmarks of the core ops: ROIAlign, the FPN pooler, NMS, point sampling, mask pasting.

Usage::

  python bench/ops.py [--filter SUBSTRING] [--repeats N]

Prints a markdown table (compile time, steady-state median and min) headed by the machine,
ready to paste into ``bench/RESULTS.md``.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _harness  # noqa: E402
import ops_boxes  # noqa: E402
import ops_points  # noqa: E402
import ops_roi_align  # noqa: E402


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--filter", default="", help="run only benchmarks whose name contains this")
  parser.add_argument("--repeats", type=int, default=5)
  args = parser.parse_args()
  print(f"Machine: {_harness.machine_description()}\n", flush=True)
  rows = []
  for module in (ops_roi_align, ops_boxes, ops_points):
    for name, fn, fn_args in module.benchmarks():
      if args.filter and args.filter not in name:
        continue
      row = _harness.time_benchmark(name, fn, fn_args, repeats=args.repeats)
      print(f"  {name}: compile {row['compile_s']:.2f} s, median {row['median_ms']:.2f} ms",
            file=sys.stderr, flush=True)
      rows.append(row)
  print(_harness.markdown_table(rows))


if __name__ == "__main__":
  main()
