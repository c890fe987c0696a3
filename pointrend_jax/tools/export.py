"""Exports a model: a ``launch.py`` workdir as a converted checkpoint, or any model as StableHLO.

Usage::

  python -m pointrend_jax.tools.export --workdir runs/demo [--step 3000] --output demo_model \\
      [--force]
  python -m pointrend_jax.tools.export --weights W [--config C] --format stablehlo --output DIR \\
      [--platforms cpu,cuda,tpu] [--dtype float32|bfloat16] [--buckets 800x1344,1344x800] \\
      [--batch-size 1] [--score-threshold 0.5] [--force]

**StableHLO** (``--format stablehlo``, :mod:`pointrend_jax.stablehlo`, ``docs/export.md``): one
serialized :mod:`jax.export` program per bucket, lowered for every ``--platforms`` entry, plus
the weights (``weights.npz``) and ``pointrend.json`` (class names, input format, resize rule,
buckets, thresholds, versions); :class:`pointrend_jax.stablehlo.ExportedPredictor` runs them
with jax alone. ``--weights`` is a detectron2 ``.pkl`` / ``.pth`` (with ``--config``), a
converted directory, or a ``launch.py`` workdir (its newest checkpoint, or ``--step``);
``--buckets`` defaults to the config's evaluation buckets (7 for COCO).

**Converted checkpoint** (the default format, from a workdir):

Reads the run config ``launch.py`` saved in ``WORKDIR/config.json`` (the model config is built
from it as :func:`pointrend_jax.modeling.zoo.model_config` does, so a config given only as
``overrides`` -- the synthetic ones -- is stored in full), restores the model of checkpoint
``--step`` (default: the newest) of ``WORKDIR/checkpoints`` and writes it in the format of
:func:`pointrend_jax.checkpoint.orbax_io.save_converted` (``config.json`` + ``state/``), with the
training data's class names (``WORKDIR/class_names.json``) when the run stored them. The result
loads with ``Predictor(None, OUT)`` and ``python -m pointrend_jax.tools.predict --weights OUT``,
or as ``--config.init.weights=OUT`` of another run. A completed run already exports its final
model to ``WORKDIR/model``.

Errors (no such workdir, weights or step, no ``config.json``, an existing non-empty ``--output``
without ``--force``, an unreadable checkpoint) print one line to stderr, ``export: error:
...``, and exit with status 1.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence

from pointrend_jax.errors import ToolError, report_error

__all__ = ["export", "export_stablehlo", "main"]


def _output_dir(output: str, force: bool) -> str:
  out = os.path.abspath(os.path.expanduser(output))
  if os.path.isdir(out) and os.listdir(out) and not force:
    raise ToolError(f"--output {out} is not empty (use --force to replace it)")
  if os.path.exists(out) and not os.path.isdir(out):
    raise ToolError(f"--output {out} exists and is not a directory")
  return out


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
  out = _output_dir(output, force)
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


def export_stablehlo(weights: str, output: str, config: str | None = None, *,
                     platforms: Sequence[str] = ("cpu", "cuda", "tpu"),
                     dtype: str = "float32", buckets: Sequence[tuple[int, int]] | None = None,
                     batch_size: int = 1, score_threshold: float | None = None,
                     step: int | None = None, force: bool = False, log=print) -> str:
  """Library form of ``--format stablehlo``: returns the absolute output directory.

  Args:
    weights: a detectron2 ``.pkl`` / ``.pth`` (``config`` needed), a converted directory or a
      ``launch.py`` workdir (checkpoint ``step``, default the newest).
    output: the artifact directory (absent or empty unless ``force``).
    config: as :class:`~pointrend_jax.inference.Predictor`'s (zoo name, yaml, JSON).
    platforms, dtype, buckets, batch_size, score_threshold: of the exported programs.
  """
  from pointrend_jax import stablehlo
  from pointrend_jax.checkpoint import workdir as workdir_lib
  from pointrend_jax.inference import Predictor
  t0 = time.perf_counter()
  out = _output_dir(output, force)
  path = os.path.expanduser(weights)
  if not os.path.exists(path):
    raise ToolError(f"--weights {weights} not found")
  kw = dict(dtype=dtype, batch_size=batch_size, score_threshold=score_threshold)
  if os.path.isdir(os.path.join(path, workdir_lib.CHECKPOINTS)):  # a launch.py workdir
    from pointrend_jax.modeling import zoo
    mcfg = zoo.model_config(workdir_lib.read_run_config(path).model)
    step, model = workdir_lib.restore_trained_model(path, mcfg, step, dtype=dtype)
    predictor = Predictor(mcfg, model, class_names=workdir_lib.read_class_names(
        path, mcfg.num_classes), **kw)
    name = f"{os.path.abspath(path)} step {step}"
  else:
    predictor = Predictor(config, path, **kw)
    name = config or os.path.abspath(path)
  log(f"loaded {name} ({time.perf_counter() - t0:.1f} s)")
  stablehlo.write_artifacts(predictor, out, platforms=platforms, buckets=buckets,
                            model_name=str(name), compute_dtype=dtype, log=log)
  log(f"wrote {out} ({time.perf_counter() - t0:.1f} s); use it with "
      f"pointrend_jax.stablehlo.ExportedPredictor({out!r})")
  return out


def _buckets(text: str) -> list[tuple[int, int]]:
  try:
    return [(int(h), int(w)) for h, w in (b.lower().split("x") for b in text.split(","))]
  except ValueError:
    raise argparse.ArgumentTypeError(f"buckets must look like 800x1344,1344x800: {text!r}")


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(
      prog="python -m pointrend_jax.tools.export",
      description="Export a model: a launch.py workdir as a converted checkpoint (config.json "
                  "+ orbax state, the default), or any model as StableHLO programs that run "
                  "with jax alone (--format stablehlo).",
      epilog="Examples: python -m pointrend_jax.tools.export --workdir runs/demo --output "
             "demo_model; python -m pointrend_jax.tools.export --weights "
             "model_final_736f5a.pkl --config r50_fpn_1x_coco --format stablehlo --output "
             "r50_stablehlo")
  source = parser.add_mutually_exclusive_group(required=True)
  source.add_argument("--workdir", help="the launch.py --workdir of the run")
  source.add_argument("--weights", help="stablehlo: a detectron2 .pkl/.pth, a converted "
                      "directory or a launch.py workdir")
  parser.add_argument("--format", choices=("converted", "stablehlo"), default="converted")
  parser.add_argument("--config", default=None, help="stablehlo: the config of --weights "
                      "(zoo name, detectron2 yaml or ModelConfig JSON)")
  parser.add_argument("--platforms", default="cpu,cuda,tpu",
                      help="stablehlo: lowering platforms, all in each program")
  parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                      help="stablehlo: compute dtype (variables stay float32)")
  parser.add_argument("--buckets", type=_buckets, default=None,
                      help="stablehlo: canvases HxW,... (default: the config's evaluation "
                           "buckets)")
  parser.add_argument("--batch-size", type=int, default=1, help="stablehlo: images per call")
  parser.add_argument("--score-threshold", type=float, default=None,
                      help="stablehlo: the default score threshold stored for the runtime")
  parser.add_argument("--step", type=int, default=None,
                      help="checkpoint step (default: the newest in WORKDIR/checkpoints)")
  parser.add_argument("--output", required=True, metavar="OUT",
                      help="output directory (absent or empty unless --force)")
  parser.add_argument("--force", action="store_true", help="replace a non-empty --output")
  args = parser.parse_args(argv)
  try:
    if args.format == "stablehlo":
      export_stablehlo(args.weights or args.workdir, args.output, args.config,
                       platforms=tuple(args.platforms.split(",")), dtype=args.dtype,
                       buckets=args.buckets, batch_size=args.batch_size,
                       score_threshold=args.score_threshold, step=args.step, force=args.force)
    elif args.workdir is None:
      raise ToolError("the converted format exports a --workdir; use --format stablehlo for "
                      "--weights")
    else:
      export(args.workdir, args.output, args.step, force=args.force)
  except Exception as e:  # pylint: disable=broad-except  # one line, no traceback
    return report_error("export", e)
  return 0


if __name__ == "__main__":
  sys.exit(main())
