"""Runs a PointRend model on images and writes overlays and JSON.

Usage::

  python -m pointrend_jax.tools.predict --config r50_fpn_1x_coco --weights model.pkl \\
      --input a.jpg b.png photos/ --output out/ [--score-threshold 0.5]

For every input image ``<stem>.<ext>`` (directories are expanded to the image files they hold,
sorted) it writes:

* instance models: ``<stem>.png`` (masks, boxes and "class score" labels over the image) and
  ``<stem>.json``: ``{"file", "height", "width", "instances": [{"box": [x0, y0, x1, y1],
  "score", "class", "class_name", "segmentation": COCO RLE {"size", "counts"}}]}`` in original
  pixels, detections with ``score > --score-threshold`` only;
* semantic models: ``<stem>.png`` (Cityscapes colours over the image, with a legend),
  ``<stem>_labels.png`` (uint8 class id per pixel) and ``<stem>.json`` (class names and the
  pixel fraction of each predicted class).

``--config`` is a zoo name (``r50_fpn_1x_coco``, ...), a detectron2 yaml, a ``ModelConfig`` JSON
file, or omitted when ``--weights`` is a converted checkpoint directory (``tools/convert``).
``--weights`` is a detectron2 ``.pkl`` / ``.pth``, a converted directory, or ``random`` (random
weights, for tests).

Errors print one line to stderr (``predict: error: ...``): a missing input or a bad model stops
before anything runs (exit 1); an image that cannot be decoded is reported, skipped, and makes
the exit status 1 once the other images are done.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
import time
import warnings
from collections.abc import Sequence

from pointrend_jax.errors import ToolError, one_line, report_error

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".gif", ".ppm",
                    ".pgm")

__all__ = ["IMAGE_EXTENSIONS", "expand_inputs", "build_predictor",
           "add_common_args", "output_dir", "main"]


def expand_inputs(inputs: Sequence[str]) -> list[pathlib.Path]:
  """Input paths with directories replaced by their image files (sorted); checks existence and
  that output stems are unique."""
  files: list[pathlib.Path] = []
  for spec in inputs:
    p = pathlib.Path(spec).expanduser()
    if p.is_dir():
      found = sorted(f for f in p.iterdir() if f.is_file()
                     and f.suffix.lower() in IMAGE_EXTENSIONS)
      if not found:
        raise ToolError(f"no image files in directory {p}")
      files.extend(found)
    elif p.is_file():
      files.append(p)
    else:
      raise ToolError(f"input not found: {p}")
  stems: dict[str, pathlib.Path] = {}
  for f in files:
    if f.stem in stems:
      raise ToolError(f"inputs {stems[f.stem]} and {f} would write the same output "
                      f"{f.stem}.png; rename one")
    stems[f.stem] = f
  return files


def add_common_args(parser: argparse.ArgumentParser) -> None:
  """The model, ``--output`` and ``--score-threshold`` (shared with ``visualize_points``)."""
  parser.add_argument(
      "--config", default=None,
      help="zoo config name (r50_fpn_1x_coco, r50_fpn_3x_coco, r101_fpn_3x_coco, "
           "x101_32x8d_fpn_3x_coco, r50_fpn_1x_cityscapes, semantic_r101_fpn_cityscapes, or a "
           "detectron2 stem), a detectron2 yaml, or a ModelConfig .json; may be omitted when "
           "--weights is a converted checkpoint directory")
  parser.add_argument(
      "--weights", required=True,
      help="detectron2 .pkl/.pth, a directory written by pointrend_jax.tools.convert, or "
           "'random' (random weights, for testing the pipeline)")
  parser.add_argument("--buckets", choices=("default", "exact"), default="default",
                      help="padding: 'default' = a few fixed canvases (one compilation each), "
                           "'exact' = multiples of 32 per image (detectron2 parity, one "
                           "compilation per padded size)")
  parser.add_argument("--output", required=True, metavar="DIR",
                      help="output directory (created if needed)")
  parser.add_argument("--score-threshold", type=float, default=0.5,
                      help="keep detections with score > this (default 0.5, as detectron2's "
                           "demo)")


def output_dir(args: argparse.Namespace) -> pathlib.Path:
  """``--output``, refused when it exists and is not a directory (not created yet)."""
  out_dir = pathlib.Path(args.output).expanduser()
  if out_dir.exists() and not out_dir.is_dir():
    raise ToolError(f"--output {out_dir} exists and is not a directory")
  return out_dir


def build_predictor(args: argparse.Namespace, prog: str):
  """The :class:`~pointrend_jax.inference.Predictor` of ``--config`` / ``--weights`` /
  ``--score-threshold``; config warnings (e.g. a built-in ``_BASE_``) become ``note:`` lines on
  stderr."""
  from pointrend_jax.inference import Predictor  # heavy imports after argument parsing
  weights = None if args.weights == "random" else args.weights
  if weights is not None and not os.path.exists(os.path.expanduser(weights)):
    raise ToolError(f"weights not found: {weights}")
  if args.config is None and (weights is None or not os.path.isdir(weights)):
    raise ToolError("--config is required unless --weights is a converted checkpoint directory")
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    predictor = Predictor(args.config, weights, score_threshold=args.score_threshold,
                          buckets="exact" if args.buckets == "exact" else None)
  for w in caught:
    print(f"{prog}: note: {one_line(w.message)}", file=sys.stderr)
  return predictor


def _write_png(path: pathlib.Path, array) -> None:
  from PIL import Image
  Image.fromarray(array).save(path, optimize=True)


def _predict_one(predictor, path: pathlib.Path, out_dir: pathlib.Path) -> int:
  from pointrend_jax import visualization as vis
  from pointrend_jax.inference import to_rgb_uint8
  import numpy as np
  image = to_rgb_uint8(path)
  result = predictor(image)
  record = {"file": str(path), **result.to_json()}
  if predictor.cfg.is_semantic:
    _write_png(out_dir / f"{path.stem}.png", vis.draw_semantic_prediction(image, result))
    _write_png(out_dir / f"{path.stem}_labels.png", result.sem_seg.astype(np.uint8))
    count = len(record["pixel_fraction"])
  else:
    _write_png(out_dir / f"{path.stem}.png", vis.draw_instance_predictions(image, result))
    count = len(result)
  (out_dir / f"{path.stem}.json").write_text(json.dumps(record) + "\n", encoding="utf-8")
  return count


def main(argv: Sequence[str] | None = None) -> int:
  prog = "predict"
  parser = argparse.ArgumentParser(
      prog="python -m pointrend_jax.tools.predict",
      description="Run a PointRend model (instance or semantic) on images; write <stem>.png "
                  "(overlay) and <stem>.json (boxes, scores, classes, class names, COCO RLE "
                  "masks) per image into --output.",
      epilog="Example: python -m pointrend_jax.tools.predict --config r50_fpn_1x_coco "
             "--weights model_final.pkl --input photo.jpg --output out/")
  add_common_args(parser)
  parser.add_argument("--input", nargs="+", required=True, metavar="IMG",
                      help="image files or directories of images")
  parser.add_argument("--quiet", action="store_true", help="no progress bar or summary")
  args = parser.parse_args(argv)
  try:
    files = expand_inputs(args.input)
    out_dir = output_dir(args)
    predictor = build_predictor(args, prog)
    out_dir.mkdir(parents=True, exist_ok=True)
  except Exception as e:  # pylint: disable=broad-except  # one line, no traceback
    return report_error(prog, e)

  from tqdm import tqdm
  failed = 0
  t0 = time.perf_counter()
  # disable=None: no bar when stderr is not a terminal (logs, tests).
  bar = tqdm(files, desc="images", unit="img", disable=True if args.quiet else None)
  for path in bar:
    try:
      n = _predict_one(predictor, path, out_dir)
    except (ValueError, OSError) as e:  # undecodable / unreadable image: report, go on
      failed += 1
      bar.write(f"{prog}: error: {one_line(e)}", file=sys.stderr)
      continue
    if not args.quiet and bar.disable:
      print(f"{path}: {n} {'classes' if predictor.cfg.is_semantic else 'instances'}",
            file=sys.stderr)
  if not args.quiet:
    print(f"{prog}: {len(files) - failed}/{len(files)} images in "
          f"{time.perf_counter() - t0:.1f} s ({predictor.num_compiles} compilation(s)); "
          f"wrote {out_dir}", file=sys.stderr)
  return 1 if failed else 0


if __name__ == "__main__":
  sys.exit(main())
