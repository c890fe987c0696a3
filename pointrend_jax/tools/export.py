"""Exports a training checkpoint of a ``launch.py`` workdir as a converted checkpoint.

Usage::

  python -m pointrend_jax.tools.export --workdir runs/demo [--step 3000] --output demo_model \\
      [--force]

Reads the run config ``launch.py`` saved in ``WORKDIR/config.json`` (the model config is built
from it as :func:`pointrend_jax.modeling.zoo.model_config` does, so a config given only as
``overrides`` -- the synthetic ones -- is stored in full), restores the model of checkpoint
``--step`` (default: the newest) of ``WORKDIR/checkpoints`` and writes it in the format of
:func:`pointrend_jax.checkpoint.orbax_io.save_converted` (``config.json`` + ``state/``), with the
training data's class names (``WORKDIR/class_names.json``) when the run stored them. The result
loads with ``Predictor(None, OUT)`` and ``python -m pointrend_jax.tools.predict --weights OUT``,
or as ``--config.init.weights=OUT`` of another run. A completed run already exports its final
model to ``WORKDIR/model``.

Errors (no such workdir or step, no ``config.json``, an existing non-empty ``--output`` without
``--force``, an unreadable checkpoint) print one line to stderr, ``export: error: ...``, and exit
with status 1.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence

from pointrend_jax.errors import ToolError, report_error

__all__ = ["export", "main"]


def export(workdir: str, output: str, step: int | None = None, *, force: bool = False,
           log=print) -> str:
  """Library form of the command: returns the absolute output directory; raises on a problem.

  Args:
    workdir: a ``launch.py`` workdir (``config.json``, ``checkpoints/<step>/``).
    output: the converted checkpoint's directory (absent or empty unless ``force``).
    step: the checkpoint step; None: the newest.
    force: replace a non-empty ``output``.
    log: progress lines go here.
  """
  from pointrend_jax.checkpoint import workdir as workdir_lib
  from pointrend_jax.modeling import zoo
  t0 = time.perf_counter()
  config = workdir_lib.read_run_config(workdir)
  mcfg = zoo.model_config(config.model)
  out = os.path.abspath(os.path.expanduser(output))
  if os.path.isdir(out) and os.listdir(out) and not force:
    raise ToolError(f"--output {out} is not empty (use --force to replace it)")
  if os.path.exists(out) and not os.path.isdir(out):
    raise ToolError(f"--output {out} exists and is not a directory")
  step, model = workdir_lib.restore_trained_model(workdir, mcfg, step)
  log(f"restored checkpoint {step} of {os.path.join(workdir, 'checkpoints')} "
      f"({'semantic' if mcfg.is_semantic else 'instance'}, {mcfg.num_classes} classes; "
      f"{time.perf_counter() - t0:.1f} s)")
  out = workdir_lib.export_trained_model(
      model, mcfg, out, class_names=workdir_lib.read_class_names(workdir, mcfg.num_classes),
      source={"workdir": os.path.abspath(workdir), "step": step})
  log(f"wrote {out} ({time.perf_counter() - t0:.1f} s); use it with Predictor(None, {out!r}) "
      f"or python -m pointrend_jax.tools.predict --weights {out}")
  return out


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(
      prog="python -m pointrend_jax.tools.export",
      description="Export a training checkpoint of a launch.py workdir as a converted "
                  "checkpoint (config.json + orbax state) for Predictor / tools.predict.",
      epilog="Example: python -m pointrend_jax.tools.export --workdir runs/demo "
             "--output demo_model")
  parser.add_argument("--workdir", required=True, help="the launch.py --workdir of the run")
  parser.add_argument("--step", type=int, default=None,
                      help="checkpoint step (default: the newest in WORKDIR/checkpoints)")
  parser.add_argument("--output", required=True, metavar="OUT",
                      help="output directory (absent or empty unless --force)")
  parser.add_argument("--force", action="store_true", help="replace a non-empty --output")
  args = parser.parse_args(argv)
  try:
    export(args.workdir, args.output, args.step, force=args.force)
  except Exception as e:  # pylint: disable=broad-except  # one line, no traceback
    return report_error("export", e)
  return 0


if __name__ == "__main__":
  sys.exit(main())
