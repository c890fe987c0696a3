"""Converts a detectron2 checkpoint into a pointrend-jax (orbax) checkpoint.

Usage::

  python -m pointrend_jax.tools.convert WEIGHTS OUT_DIR [--config ZOO_NAME_OR_YAML]
      [--backbone-only] [--force]

WEIGHTS is a detectron2 model-zoo ``.pkl``, a detectron2 ``.pth`` (no torch needed) or, with
``--backbone-only``, a Caffe2 ImageNet backbone ``.pkl``. The model config comes from
``--config`` (a zoo name such as ``r50_fpn_1x_coco``, or a detectron2 yaml) or, without it, is
inferred from the checkpoint's parameter names and shapes (head type, classes, ResNet depth and
groups; a grouped ResNeXt is assumed to be the FAIR X101 setup: STRIDE_IN_1X1 False and its
PIXEL_STD, which shapes cannot tell). Weights load strictly: every model variable exactly once with
its shape, nothing left over. The result (see :mod:`pointrend_jax.checkpoint.orbax_io`) loads
with ``load_converted(OUT_DIR) -> (cfg, model)``.

Errors (unreadable, unsafe or mismatched files, bad configs) print one line to stderr and exit 1.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Mapping, Sequence
from typing import Any

from flax import nnx

from pointrend_jax.checkpoint.d2_matching import MatchReport, match_state_dict
from pointrend_jax.checkpoint.d2_model import d2_model_names, load_d2_model
from pointrend_jax.checkpoint.d2_reader import load_detectron2_file
from pointrend_jax.checkpoint.orbax_io import save_converted
from pointrend_jax.errors import ToolError, report_error
from pointrend_jax.modeling.config import ModelConfig
from pointrend_jax.modeling.meta_arch import abstract_model, build_model
from pointrend_jax.modeling.zoo import ZOO_NAMES, ZOO_STEMS, from_detectron2_yaml, zoo_config
from pointrend_jax.modeling.resnet import BLOCKS_PER_STAGE

__all__ = ["infer_config", "convert", "main"]


def _blocks(names: Mapping[str, tuple[int, ...]], stage: int) -> int:
  prefix = f"backbone.bottom_up.res{stage}."
  return len({n[len(prefix):].split(".")[0] for n in names if n.startswith(prefix)})


def infer_config(shapes: Mapping[str, tuple[int, ...]]) -> tuple[ModelConfig, str]:
  """Guesses ``(ModelConfig, description)`` of a checkpoint from its names and shapes.

  Raises:
    _Error: the checkpoint has no recognizable heads (e.g. an ImageNet backbone).
  """
  semantic = "sem_seg_head.coarse_sem_seg_head.predictor.weight" in shapes
  instance = "roi_heads.box_predictor.cls_score.weight" in shapes
  if semantic == instance:
    raise ToolError("cannot infer the model config from this checkpoint (no PointRend instance or "
                 "semantic heads found); pass --config")
  blocks = tuple(_blocks(shapes, s) for s in (2, 3, 4, 5))
  depth = {v: k for k, v in BLOCKS_PER_STAGE.items()}.get(blocks)
  if depth is None or depth < 50:
    raise ToolError(f"cannot infer the ResNet depth from blocks per stage {blocks}; pass --config")
  conv2 = shapes.get("backbone.bottom_up.res2.0.conv2.weight")
  if conv2 is None:
    raise ToolError("checkpoint has no backbone.bottom_up.res2.0.conv2.weight; pass --config")
  groups = conv2[0] // conv2[1]
  if semantic:
    classes = shapes["sem_seg_head.coarse_sem_seg_head.predictor.weight"][0]
    fc2 = shapes.get("sem_seg_head.point_head.fc2.weight", (0, 0))
    cfg = zoo_config("semantic_r101_fpn_cityscapes")
    like = "semantic_r101_fpn_cityscapes"
    updates = {"sem_seg_head.num_classes": classes, "point_head.num_classes": classes,
               "point_head.coarse_pred_each_layer": fc2[1] != cfg.point_head.fc_dim}
  else:
    classes = shapes["roi_heads.box_predictor.cls_score.weight"][0] - 1
    like = "r50_fpn_1x_cityscapes" if classes == 8 else "r50_fpn_1x_coco"
    if groups > 1:
      like = "x101_32x8d_fpn_3x_coco"
    elif depth == 101 and classes != 8:
      like = "r101_fpn_3x_coco"
    cfg = zoo_config(like)
    updates = {"roi_heads.num_classes": classes, "point_head.num_classes": classes}
  updates.update({"resnets.depth": depth, "resnets.num_groups": groups,
                  "resnets.width_per_group": conv2[0] // groups,
                  "resnets.stride_in_1x1": groups == 1})
  cfg = cfg.replace(**updates)
  kind = "semantic" if semantic else "instance"
  arch = f"{'X' if groups > 1 else 'R'}-{depth}" + (f" {groups}x{conv2[0] // groups}d"
                                                    if groups > 1 else "")
  return cfg, f"{kind}, {arch}, {classes} classes (settings of zoo config {like})"


def _load_config(spec: str) -> tuple[ModelConfig, str]:
  if os.path.isfile(os.path.expanduser(spec)):
    return from_detectron2_yaml(spec), spec
  stem = spec[:-5] if spec.endswith(".yaml") else spec
  if stem in ZOO_NAMES or stem in ZOO_STEMS.values():
    return zoo_config(stem), f"zoo config {stem}"
  raise ToolError(f"--config {spec!r} is neither a file nor a zoo config "
               f"({', '.join(ZOO_NAMES)})")


def _example(d: Mapping[str, Any]) -> str:
  name = next(iter(d))
  return f"{name} {list(d[name]) if isinstance(d[name], tuple) else d[name]}"


def convert(weights: str, out_dir: str, config: str | None = None, *,
            backbone_only: bool = False, force: bool = False, seed: int = 0,
            log=print) -> tuple[ModelConfig, MatchReport]:
  """Library form of the command: returns ``(cfg, MatchReport)``; raises on any problem."""
  t0 = time.perf_counter()
  ckpt = load_detectron2_file(weights)
  log(f"read {weights}: {ckpt.format}, {len(ckpt.state)} entries "
      f"({time.perf_counter() - t0:.1f} s)")
  if ckpt.format == "caffe2" and not backbone_only:
    raise ToolError(f"{weights} is a Caffe2 ImageNet backbone; use --backbone-only with --config")
  if config is not None:
    cfg, what = _load_config(config)
  elif backbone_only:
    raise ToolError("--backbone-only needs --config (the heads are not in the checkpoint)")
  else:
    cfg, what = infer_config({k: tuple(v.shape) for k, v in ckpt.state.items()})
    what = "inferred: " + what
  log(f"config: {what}")
  model = abstract_model(cfg)
  names = d2_model_names(model)
  report = match_state_dict(ckpt, names, strict=False, backbone_only=backbone_only)
  if not report.ok:
    parts = []
    if report.missing:
      parts.append(f"{len(report.missing)} missing (e.g. {_example(report.missing)})")
    if report.unexpected:
      parts.append(f"{len(report.unexpected)} unexpected (e.g. {_example(report.unexpected)})")
    if report.mismatched:
      m = report.mismatched[0]
      parts.append(f"{len(report.mismatched)} shape mismatches (e.g. {m.name} checkpoint "
                   f"{list(m.got)} vs model {list(m.expected)})")
    raise ToolError(f"{weights} does not match the model ({what}): " + ", ".join(parts))
  if backbone_only:
    # Heads keep detectron2's random initialization (seeded).
    model = build_model(cfg, rngs=nnx.Rngs(seed))
  report = load_d2_model(model, ckpt, strict=True, backbone_only=backbone_only)
  out = save_converted(model, cfg, out_dir, overwrite=force,
                       source={"file": os.path.abspath(weights), "format": ckpt.format,
                               "author": ckpt.metadata.get("author"),
                               "backbone_only": backbone_only, "config": what})
  log(f"wrote {out} ({len(report.state)} entries loaded, {len(report.filled)} FrozenBN stats "
      f"filled, {len(report.ignored)} ignored; {time.perf_counter() - t0:.1f} s)")
  return cfg, report


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(
      prog="python -m pointrend_jax.tools.convert",
      description="Convert a detectron2 PointRend checkpoint (.pkl/.pth) to an orbax checkpoint "
                  "of the Flax model plus its config (config.json).")
  parser.add_argument("weights", metavar="WEIGHTS", help="detectron2 .pkl / .pth file")
  parser.add_argument("out_dir", metavar="OUT_DIR", help="output directory (absent or empty)")
  parser.add_argument("--config", default=None,
                      help="zoo config name (e.g. r50_fpn_1x_coco) or detectron2 yaml; default: "
                           "inferred from the checkpoint")
  parser.add_argument("--backbone-only", action="store_true",
                      help="load only backbone.bottom_up.* (ImageNet init); heads are random")
  parser.add_argument("--force", action="store_true", help="overwrite a non-empty OUT_DIR")
  parser.add_argument("--seed", type=int, default=0, help="init seed of the heads "
                      "(--backbone-only)")
  args = parser.parse_args(argv)
  try:
    convert(args.weights, args.out_dir, args.config, backbone_only=args.backbone_only,
            force=args.force, seed=args.seed)
  except Exception as e:  # pylint: disable=broad-except  # one line, no traceback
    return report_error("convert", e)
  return 0


if __name__ == "__main__":
  sys.exit(main())
