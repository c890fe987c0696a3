"""Draws PointRend's adaptive subdivision for chosen instances of one image.

Usage::

  python -m pointrend_jax.tools.visualize_points --config r50_fpn_1x_coco --weights model.pkl \\
      --input photo.jpg --output out/ [--top-k 3 | --instances 0,1,2]

Writes ``<stem>_subdivision.png`` (one row per instance) and ``<stem>_inst<i>.png`` (one row
each). A row shows: the image crop with the box; the coarse 7x7 prediction; the 28x28 step-0
prediction; each subdivision step's x2-upsampled prediction with the 784 points chosen there
(red); the final 224x224 mask. Predictions are ``sigmoid`` of the predicted class's logits in
the box frame (black 0, white 1). Instances are numbered by descending score among the
detections with ``score > --score-threshold``.

Errors print one line to stderr (``visualize_points: error: ...``) and exit 1.
"""

from __future__ import annotations

import argparse
import pathlib
import sys
from collections.abc import Sequence

from pointrend_jax.errors import ToolError, report_error
from pointrend_jax.tools.predict import add_common_args, build_predictor, output_dir

__all__ = ["main"]


def _parse_instances(text: str) -> list[int]:
  try:
    values = [int(v) for v in text.split(",") if v.strip()]
  except ValueError:
    raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}")
  if not values or min(values) < 0:
    raise argparse.ArgumentTypeError(f"expected non-negative indices, got {text!r}")
  return values


def main(argv: Sequence[str] | None = None) -> int:
  prog = "visualize_points"
  parser = argparse.ArgumentParser(
      prog="python -m pointrend_jax.tools.visualize_points",
      description="Draw PointRend's subdivision stages (coarse 7x7, 28x28, each step's "
                  "upsampled mask with its selected points, final 224x224 mask) for chosen "
                  "instances of one image. Instance models only.")
  add_common_args(parser)
  parser.add_argument("--input", required=True, metavar="IMG", help="one image file")
  which = parser.add_mutually_exclusive_group()
  which.add_argument("--instances", type=_parse_instances, default=None, metavar="I,J,...",
                     help="instance indices (0 = highest score)")
  which.add_argument("--top-k", type=int, default=3, metavar="K",
                     help="the K highest-scoring instances (default 3)")
  parser.add_argument("--panel-height", type=int, default=160, help="pixels per panel")
  args = parser.parse_args(argv)
  try:
    path = pathlib.Path(args.input).expanduser()
    if not path.is_file():
      raise ToolError(f"input not found: {path}")
    if args.top_k < 1:
      raise ToolError("--top-k must be >= 1")
    out_dir = output_dir(args)
    from pointrend_jax.inference import load_config, to_rgb_uint8
    # Fail on a semantic config or an undecodable image before building any weights.
    if args.config is not None and load_config(args.config).is_semantic:
      raise ToolError("visualize_points draws instance masks; this is a semantic model")
    image = to_rgb_uint8(path)
    predictor = build_predictor(args, prog)
    if predictor.cfg.is_semantic:
      raise ToolError("visualize_points draws instance masks; this is a semantic model")
    from PIL import Image
    from pointrend_jax import visualization as vis
    instances, stages = predictor.predict_with_stages(image)
    n = len(instances)
    chosen = args.instances if args.instances is not None else list(range(min(args.top_k, n)))
    if n == 0:
      raise ToolError(f"{path}: no detections with score > {args.score_threshold}")
    bad = [i for i in chosen if i >= n]
    if bad:
      raise ToolError(f"{path}: instance index {bad[0]} out of range ({n} detections with "
                      f"score > {args.score_threshold})")
    out_dir.mkdir(parents=True, exist_ok=True)
    fig = vis.subdivision_figure(image, instances, stages, chosen,
                                 panel_height=args.panel_height)
    Image.fromarray(fig).save(out_dir / f"{path.stem}_subdivision.png", optimize=True)
    for i in chosen:
      row = vis.subdivision_row(image, stages, i, panel_height=args.panel_height,
                                label=f"#{i} {instances.class_names[i]} "
                                      f"{instances.scores[i]:.2f}")
      Image.fromarray(row).save(out_dir / f"{path.stem}_inst{i}.png", optimize=True)
  except Exception as e:  # pylint: disable=broad-except  # one line, no traceback
    return report_error(prog, e)
  print(f"{prog}: wrote {out_dir / (path.stem + '_subdivision.png')} ({len(chosen)} "
        f"instance(s) of {n})", file=sys.stderr)
  return 0


if __name__ == "__main__":
  sys.exit(main())
