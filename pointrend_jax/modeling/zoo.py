"""detectron2 yaml configs and the six PointRend model-zoo configs -> :class:`ModelConfig`.

* :func:`from_detectron2_yaml` parses a detectron2 yaml: a full ``cfg.dump()`` or a model-zoo
  yaml with a ``_BASE_`` chain. Like detectron2 (yacs), values merge over detectron2's defaults
  (plus PointRend's ``add_pointrend_config``) in base-first order, and string values are
  ``ast.literal_eval``-ed (``"(640, 672)"`` -> a tuple). A ``_BASE_`` file that does not exist is
  replaced by a built-in copy of the detectron2 base file of that name
  (``Base-RCNN-FPN.yaml``, ``Base-PointRend-RCNN-FPN.yaml``, ``Base-PointRend-Semantic-FPN.yaml``;
  values as resolved in ``shared/spec/configs.md``), with a warning saying so.
* :func:`zoo_config` returns the six PointRend model-zoo configs (``ZOO_NAMES``) from built-in
  copies of their yamls, through the same parser.
* :func:`model_config` turns a run config's ``model`` section (``configs/*.py``) into the
  model config: the one place that does.

Values the networks cannot represent (another meta-architecture, deformable convs, a different
head, ...) raise :class:`ConfigError` naming the detectron2 key.
"""

from __future__ import annotations

import ast
import copy
import dataclasses
import os
import pathlib
import typing
import warnings
from collections.abc import Mapping
from typing import Any

import yaml

from pointrend_jax.errors import ConfigError
from pointrend_jax.modeling.config import (AnchorConfig, BoxHeadConfig, FPNConfig, InputConfig,
                                           MaskHeadConfig, ModelConfig, PointHeadConfig,
                                           ResNetConfig, ROIHeadsConfig, RPNConfig,
                                           SemSegHeadConfig, convert_value)

__all__ = ["ZOO_NAMES", "ZOO_STEMS", "from_detectron2_yaml", "zoo_config", "zoo_yaml",
           "model_config"]


# --------------------------------------------------------------------------------------------------
# detectron2 defaults and the built-in yamls (values: detectron2 defaults.py + PointRend's
# add_pointrend_config, resolved in shared/spec/configs.md).
# --------------------------------------------------------------------------------------------------

_D2_DEFAULTS: dict[str, Any] = {
    "MODEL": {
        "META_ARCHITECTURE": "GeneralizedRCNN",
        "MASK_ON": False,
        "KEYPOINT_ON": False,
        "LOAD_PROPOSALS": False,
        "WEIGHTS": "",
        "PIXEL_MEAN": [103.53, 116.28, 123.675],
        "PIXEL_STD": [1.0, 1.0, 1.0],
        "BACKBONE": {"NAME": "build_resnet_backbone", "FREEZE_AT": 2},
        "FPN": {"IN_FEATURES": [], "OUT_CHANNELS": 256, "NORM": "", "FUSE_TYPE": "sum"},
        "PROPOSAL_GENERATOR": {"NAME": "RPN", "MIN_SIZE": 0},
        "ANCHOR_GENERATOR": {"NAME": "DefaultAnchorGenerator",
                             "SIZES": [[32, 64, 128, 256, 512]],
                             "ASPECT_RATIOS": [[0.5, 1.0, 2.0]], "OFFSET": 0.0},
        "RPN": {"HEAD_NAME": "StandardRPNHead", "IN_FEATURES": ["res4"], "BOUNDARY_THRESH": -1,
                "IOU_THRESHOLDS": [0.3, 0.7], "IOU_LABELS": [0, -1, 1],
                "BATCH_SIZE_PER_IMAGE": 256, "POSITIVE_FRACTION": 0.5,
                "BBOX_REG_LOSS_TYPE": "smooth_l1", "BBOX_REG_LOSS_WEIGHT": 1.0,
                "BBOX_REG_WEIGHTS": [1.0, 1.0, 1.0, 1.0], "SMOOTH_L1_BETA": 0.0,
                "LOSS_WEIGHT": 1.0, "PRE_NMS_TOPK_TRAIN": 12000, "PRE_NMS_TOPK_TEST": 6000,
                "POST_NMS_TOPK_TRAIN": 2000, "POST_NMS_TOPK_TEST": 1000, "NMS_THRESH": 0.7,
                "CONV_DIMS": [-1]},
        "ROI_HEADS": {"NAME": "Res5ROIHeads", "NUM_CLASSES": 80, "IN_FEATURES": ["res4"],
                      "IOU_THRESHOLDS": [0.5], "IOU_LABELS": [0, 1],
                      "BATCH_SIZE_PER_IMAGE": 512, "POSITIVE_FRACTION": 0.25,
                      "SCORE_THRESH_TEST": 0.05, "NMS_THRESH_TEST": 0.5,
                      "PROPOSAL_APPEND_GT": True},
        "ROI_BOX_HEAD": {"NAME": "", "BBOX_REG_LOSS_TYPE": "smooth_l1",
                         "BBOX_REG_LOSS_WEIGHT": 1.0, "BBOX_REG_WEIGHTS": [10.0, 10.0, 5.0, 5.0],
                         "SMOOTH_L1_BETA": 0.0, "POOLER_RESOLUTION": 14,
                         "POOLER_SAMPLING_RATIO": 0, "POOLER_TYPE": "ROIAlignV2", "NUM_FC": 0,
                         "FC_DIM": 1024, "NUM_CONV": 0, "CONV_DIM": 256, "NORM": "",
                         "CLS_AGNOSTIC_BBOX_REG": False, "TRAIN_ON_PRED_BOXES": False,
                         "USE_FED_LOSS": False, "USE_SIGMOID_CE": False},
        "ROI_MASK_HEAD": {"NAME": "MaskRCNNConvUpsampleHead", "POOLER_RESOLUTION": 14,
                          "POOLER_SAMPLING_RATIO": 0, "NUM_CONV": 0, "CONV_DIM": 256,
                          "NORM": "", "CLS_AGNOSTIC_MASK": False, "POOLER_TYPE": "ROIAlignV2",
                          # add_pointrend_config:
                          "FC_DIM": 1024, "NUM_FC": 2, "OUTPUT_SIDE_RESOLUTION": 7,
                          "IN_FEATURES": ["p2"], "POINT_HEAD_ON": False},
        "SEM_SEG_HEAD": {"NAME": "SemSegFPNHead", "IN_FEATURES": ["p2", "p3", "p4", "p5"],
                         "IGNORE_VALUE": 255, "NUM_CLASSES": 54, "CONVS_DIM": 128,
                         "COMMON_STRIDE": 4, "NORM": "GN", "LOSS_WEIGHT": 1.0},
        "POINT_HEAD": {"NAME": "StandardPointHead", "NUM_CLASSES": 80, "FC_DIM": 256,
                       "NUM_FC": 3, "CLS_AGNOSTIC_MASK": False, "IN_FEATURES": ["p2"],
                       "TRAIN_NUM_POINTS": 196, "OVERSAMPLE_RATIO": 3,
                       "IMPORTANCE_SAMPLE_RATIO": 0.75, "SUBDIVISION_STEPS": 5,
                       "SUBDIVISION_NUM_POINTS": 784, "COARSE_PRED_EACH_LAYER": True,
                       "COARSE_SEM_SEG_HEAD_NAME": "SemSegFPNHead"},
        "RESNETS": {"DEPTH": 50, "OUT_FEATURES": ["res4"], "NUM_GROUPS": 1, "NORM": "FrozenBN",
                    "WIDTH_PER_GROUP": 64, "STRIDE_IN_1X1": True, "RES5_DILATION": 1,
                    "RES2_OUT_CHANNELS": 256, "STEM_OUT_CHANNELS": 64,
                    "DEFORM_ON_PER_STAGE": [False, False, False, False]},
    },
    "INPUT": {"MIN_SIZE_TRAIN": [800], "MIN_SIZE_TRAIN_SAMPLING": "choice",
              "MAX_SIZE_TRAIN": 1333, "MIN_SIZE_TEST": 800, "MAX_SIZE_TEST": 1333,
              "RANDOM_FLIP": "horizontal", "FORMAT": "BGR", "MASK_FORMAT": "polygon",
              "COLOR_AUG_SSD": False,
              "CROP": {"ENABLED": False, "TYPE": "relative_range", "SIZE": [0.9, 0.9],
                       "SINGLE_CATEGORY_MAX_AREA": 1.0}},
    "TEST": {"DETECTIONS_PER_IMAGE": 100},
}

# detectron2's configs/Base-RCNN-FPN.yaml (model and input parts).
_BASE_RCNN_FPN: dict[str, Any] = {
    "MODEL": {
        "META_ARCHITECTURE": "GeneralizedRCNN",
        "BACKBONE": {"NAME": "build_resnet_fpn_backbone"},
        "RESNETS": {"OUT_FEATURES": ["res2", "res3", "res4", "res5"]},
        "FPN": {"IN_FEATURES": ["res2", "res3", "res4", "res5"]},
        "ANCHOR_GENERATOR": {"SIZES": [[32], [64], [128], [256], [512]],
                             "ASPECT_RATIOS": [[0.5, 1.0, 2.0]]},
        "RPN": {"IN_FEATURES": ["p2", "p3", "p4", "p5", "p6"], "PRE_NMS_TOPK_TRAIN": 2000,
                "PRE_NMS_TOPK_TEST": 1000, "POST_NMS_TOPK_TRAIN": 1000,
                "POST_NMS_TOPK_TEST": 1000},
        "ROI_HEADS": {"NAME": "StandardROIHeads", "IN_FEATURES": ["p2", "p3", "p4", "p5"]},
        "ROI_BOX_HEAD": {"NAME": "FastRCNNConvFCHead", "NUM_FC": 2, "POOLER_RESOLUTION": 7},
        "ROI_MASK_HEAD": {"NAME": "MaskRCNNConvUpsampleHead", "NUM_CONV": 4,
                          "POOLER_RESOLUTION": 14},
    },
    "INPUT": {"MIN_SIZE_TRAIN": [640, 672, 704, 736, 768, 800]},
}

# projects/PointRend/configs/InstanceSegmentation/Base-PointRend-RCNN-FPN.yaml.
_BASE_POINTREND_RCNN_FPN: dict[str, Any] = {
    "_BASE_": "../../../../configs/Base-RCNN-FPN.yaml",
    "MODEL": {
        "MASK_ON": True,
        "ROI_BOX_HEAD": {"TRAIN_ON_PRED_BOXES": True},
        "ROI_MASK_HEAD": {"POOLER_TYPE": "", "NAME": "PointRendMaskHead", "FC_DIM": 1024,
                          "NUM_FC": 2, "OUTPUT_SIDE_RESOLUTION": 7, "IN_FEATURES": ["p2"],
                          "POINT_HEAD_ON": True},
        "POINT_HEAD": {"FC_DIM": 256, "NUM_FC": 3, "IN_FEATURES": ["p2"]},
    },
    "INPUT": {"MASK_FORMAT": "bitmask"},
}

# projects/PointRend/configs/SemanticSegmentation/Base-PointRend-Semantic-FPN.yaml.
_BASE_POINTREND_SEMANTIC_FPN: dict[str, Any] = {
    "_BASE_": "../../../../configs/Base-RCNN-FPN.yaml",
    "MODEL": {
        "META_ARCHITECTURE": "SemanticSegmentor",
        "BACKBONE": {"FREEZE_AT": 0},
        "SEM_SEG_HEAD": {"NAME": "PointRendSemSegHead"},
        "POINT_HEAD": {"NUM_CLASSES": 54, "FC_DIM": 256, "NUM_FC": 3, "IN_FEATURES": ["p2"],
                       "TRAIN_NUM_POINTS": 1024, "SUBDIVISION_STEPS": 2,
                       "SUBDIVISION_NUM_POINTS": 8192,
                       "COARSE_SEM_SEG_HEAD_NAME": "SemSegFPNHead",
                       "COARSE_PRED_EACH_LAYER": False},
    },
}

_BUILTIN_BASES: dict[str, dict[str, Any]] = {
    "Base-RCNN-FPN.yaml": _BASE_RCNN_FPN,
    "Base-PointRend-RCNN-FPN.yaml": _BASE_POINTREND_RCNN_FPN,
    "Base-PointRend-Semantic-FPN.yaml": _BASE_POINTREND_SEMANTIC_FPN,
}


def _coco_instance(depth: int, schedule_3x: bool, **resnets: Any) -> dict[str, Any]:
  cfg: dict[str, Any] = {
      "_BASE_": "Base-PointRend-RCNN-FPN.yaml",
      "MODEL": {"MASK_ON": True, "RESNETS": {"DEPTH": depth, **resnets},
                "ROI_HEADS": {"NUM_CLASSES": 80}, "POINT_HEAD": {"NUM_CLASSES": 80}},
  }
  weights = {50: "MSRA/R-50.pkl", 101: "MSRA/R-101.pkl"}[depth]
  if resnets.get("NUM_GROUPS", 1) > 1:
    weights = "FAIR/X-101-32x8d.pkl"
    cfg["MODEL"]["PIXEL_STD"] = [57.375, 57.120, 58.395]
  cfg["MODEL"]["WEIGHTS"] = "detectron2://ImageNetPretrained/" + weights
  if schedule_3x:
    cfg["SOLVER"] = {"STEPS": [210000, 250000], "MAX_ITER": 270000}
  return cfg


# The model-zoo yamls (projects/PointRend/configs/...), keyed by short name.
_ZOO_YAMLS: dict[str, dict[str, Any]] = {
    "r50_fpn_1x_coco": _coco_instance(50, False),
    "r50_fpn_3x_coco": _coco_instance(50, True),
    "r101_fpn_3x_coco": _coco_instance(101, True),
    "x101_32x8d_fpn_3x_coco": _coco_instance(101, True, STRIDE_IN_1X1=False, NUM_GROUPS=32,
                                             WIDTH_PER_GROUP=8),
    "r50_fpn_1x_cityscapes": {
        "_BASE_": "Base-PointRend-RCNN-FPN.yaml",
        "MODEL": {"WEIGHTS": "detectron2://ImageNetPretrained/MSRA/R-50.pkl",
                  "RESNETS": {"DEPTH": 50}, "ROI_HEADS": {"NUM_CLASSES": 8},
                  "POINT_HEAD": {"NUM_CLASSES": 8}},
        "INPUT": {"MAX_SIZE_TEST": 2048, "MAX_SIZE_TRAIN": 2048, "MIN_SIZE_TEST": 1024,
                  "MIN_SIZE_TRAIN": [800, 832, 864, 896, 928, 960, 992, 1024]},
    },
    "semantic_r101_fpn_cityscapes": {
        "_BASE_": "Base-PointRend-Semantic-FPN.yaml",
        "MODEL": {"WEIGHTS": "detectron2://ImageNetPretrained/MSRA/R-101.pkl",
                  "RESNETS": {"DEPTH": 101}, "SEM_SEG_HEAD": {"NUM_CLASSES": 19},
                  "POINT_HEAD": {"NUM_CLASSES": 19, "TRAIN_NUM_POINTS": 2048,
                                 "SUBDIVISION_NUM_POINTS": 8192}},
        "INPUT": {"MIN_SIZE_TRAIN": [512, 768, 1024, 1280, 1536, 1792, 2048],
                  "MIN_SIZE_TRAIN_SAMPLING": "choice", "MIN_SIZE_TEST": 1024,
                  "MAX_SIZE_TRAIN": 4096, "MAX_SIZE_TEST": 2048,
                  "CROP": {"ENABLED": True, "TYPE": "absolute", "SIZE": [512, 1024],
                           "SINGLE_CATEGORY_MAX_AREA": 0.75},
                  "COLOR_AUG_SSD": True},
    },
}

ZOO_NAMES: tuple[str, ...] = tuple(_ZOO_YAMLS)
# Short zoo name -> detectron2 config stem (also the manifest name in shared/spec/checkpoints).
ZOO_STEMS: dict[str, str] = {
    "r50_fpn_1x_coco": "pointrend_rcnn_R_50_FPN_1x_coco",
    "r50_fpn_3x_coco": "pointrend_rcnn_R_50_FPN_3x_coco",
    "r101_fpn_3x_coco": "pointrend_rcnn_R_101_FPN_3x_coco",
    "x101_32x8d_fpn_3x_coco": "pointrend_rcnn_X_101_32x8d_FPN_3x_coco",
    "r50_fpn_1x_cityscapes": "pointrend_rcnn_R_50_FPN_1x_cityscapes",
    "semantic_r101_fpn_cityscapes": "pointrend_semantic_R_101_FPN_1x_cityscapes",
}


# --- Loading and merging yamls ---


def _decode(value: Any) -> Any:
  """yacs ``_decode_cfg_value``: strings that are Python literals become those values."""
  if isinstance(value, Mapping):
    return {k: _decode(v) for k, v in value.items()}
  if isinstance(value, list):
    return [_decode(v) for v in value]
  if isinstance(value, str):
    try:
      return ast.literal_eval(value)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
      return value
  return value


def _merge(base: dict[str, Any], update: Mapping[str, Any]) -> dict[str, Any]:
  out = dict(base)
  for k, v in update.items():
    if isinstance(v, Mapping) and isinstance(out.get(k), Mapping):
      out[k] = _merge(out[k], v)
    else:
      out[k] = copy.deepcopy(v)
  return out


def _read_yaml(path: pathlib.Path) -> dict[str, Any]:
  try:
    with open(path, encoding="utf-8") as f:
      data = yaml.safe_load(f)
  except yaml.YAMLError as e:
    raise ConfigError(f"{path}: not a valid yaml file ({' '.join(str(e).split())})") from e
  if data is None:
    data = {}
  if not isinstance(data, dict):
    raise ConfigError(f"{path}: a detectron2 config must be a mapping, got "
                      f"{type(data).__name__}")
  return data


def _resolve(raw: Mapping[str, Any], base_dir: pathlib.Path | None, seen: tuple[str, ...],
             notes: list[str]) -> dict[str, Any]:
  """Merges ``raw`` over its ``_BASE_`` chain (bases first); returns the merged dict."""
  raw = dict(raw)
  base = raw.pop("_BASE_", None)
  if base is None:
    return _decode(raw)
  if not isinstance(base, str):
    raise ConfigError(f"_BASE_ must be a file name, got {base!r}")
  name = os.path.basename(base)
  path = pathlib.Path(os.path.expanduser(base))
  if not path.is_absolute() and base_dir is not None:
    path = base_dir / path
  if (base_dir is not None or path.is_absolute()) and path.is_file():
    key = str(path.resolve())
    if key in seen:
      raise ConfigError(f"_BASE_ cycle through {path}")
    parent = _resolve(_read_yaml(path), path.parent, seen + (key,), notes)
  elif name in _BUILTIN_BASES:
    if base_dir is not None or path.is_absolute():
      notes.append(f"_BASE_ file {path} not found; used the built-in copy of detectron2's "
                   f"{name} (values from shared/spec/configs.md)")
    if name in seen:
      raise ConfigError(f"_BASE_ cycle through {name}")
    parent = _resolve(_BUILTIN_BASES[name], None, seen + (name,), notes)
  else:
    raise ConfigError(f"_BASE_ file {path} not found and no built-in copy of {name} exists")
  return _merge(parent, _decode(raw))


# --- Parsing a merged detectron2 config ---


class _Reader:
  """Typed access to a merged detectron2 config dict; errors name the dotted key."""

  def __init__(self, cfg: Mapping[str, Any]):
    self.cfg = cfg

  def get(self, key: str) -> Any:
    node: Any = self.cfg
    for part in key.split("."):
      if not isinstance(node, Mapping) or part not in node:
        raise ConfigError(f"{key}: missing from the config")
      node = node[part]
    return node

  def typed(self, key: str, tp: Any) -> Any:
    return convert_value(tp, self.get(key), key)

  def expect(self, key: str, allowed: Any, why: str = "") -> Any:
    value = self.get(key)
    options = allowed if isinstance(allowed, (list, tuple, set, frozenset)) else (allowed,)
    norm = lambda v: list(v) if isinstance(v, tuple) else v
    if norm(value) not in [norm(a) for a in options]:
      shown = " or ".join(repr(a) for a in options)
      raise ConfigError(f"{key}: unsupported value {value!r} (supported: {shown})"
                        + (f"; {why}" if why else ""))
    return value


def _section(r: _Reader, cls: type, section: str, keys: Mapping[str, str] | None = None,
             **given: Any) -> Any:
  """``cls`` with every field not ``given`` read from ``{section}.{FIELD}`` (or ``keys[field]``)."""
  hints = typing.get_type_hints(cls)
  values = {}
  for f in dataclasses.fields(cls):
    if f.name not in given:
      key = (keys or {}).get(f.name, f"{section}.{f.name.upper()}")
      values[f.name] = r.typed(key, hints[f.name])
  return cls(**values, **given)


def _parse(r: _Reader) -> ModelConfig:
  meta = r.expect("MODEL.META_ARCHITECTURE", ("GeneralizedRCNN", "SemanticSegmentor"))
  semantic = meta == "SemanticSegmentor"
  r.expect("MODEL.BACKBONE.NAME", "build_resnet_fpn_backbone")
  r.expect("MODEL.KEYPOINT_ON", False)
  r.expect("MODEL.LOAD_PROPOSALS", False)
  r.expect("MODEL.RESNETS.DEFORM_ON_PER_STAGE", ([False] * 4,),
           "deformable convolutions are not implemented")
  r.expect("MODEL.RESNETS.DEPTH", (18, 34, 50, 101, 152))
  r.expect("MODEL.RESNETS.NORM", ("FrozenBN", "BN", "SyncBN", "GN", ""))
  r.expect("MODEL.RESNETS.RES5_DILATION", (1, 2))
  levels = ["res2", "res3", "res4", "res5"]
  r.expect("MODEL.RESNETS.OUT_FEATURES", (levels,))
  r.expect("MODEL.FPN.IN_FEATURES", (levels,))
  r.expect("MODEL.FPN.FUSE_TYPE", "sum")
  r.expect("MODEL.FPN.NORM", ("", "GN", "BN", "SyncBN", "FrozenBN"))
  r.expect("INPUT.FORMAT", ("BGR", "RGB"))
  pixel_mean = r.typed("MODEL.PIXEL_MEAN", tuple[float, ...])
  pixel_std = r.typed("MODEL.PIXEL_STD", tuple[float, ...])
  for key, v in (("MODEL.PIXEL_MEAN", pixel_mean), ("MODEL.PIXEL_STD", pixel_std)):
    if len(v) != 3:
      raise ConfigError(f"{key}: expected 3 values, got {list(v)}")
  if any(s == 0 for s in pixel_std):
    raise ConfigError(f"MODEL.PIXEL_STD: zero entry in {list(pixel_std)}")
  depth = r.typed("MODEL.RESNETS.DEPTH", int)
  if depth in (18, 34):
    # detectron2's BasicBlock ResNets require these (its build_resnet_backbone asserts them).
    r.expect("MODEL.RESNETS.RES2_OUT_CHANNELS", 64, "ResNet-18/34 use 64")
    r.expect("MODEL.RESNETS.NUM_GROUPS", 1, "ResNet-18/34 have no groups")
    r.expect("MODEL.RESNETS.RES5_DILATION", 1, "ResNet-18/34 do not support dilation")

  resnets = _section(r, ResNetConfig, "MODEL.RESNETS", {"freeze_at": "MODEL.BACKBONE.FREEZE_AT"},
                     depth=depth, out_features=tuple(levels))
  fpn = _section(r, FPNConfig, "MODEL.FPN", in_features=tuple(levels))
  fpn_levels = ("p2", "p3", "p4", "p5", "p6")

  def features(key: str, allowed: tuple[str, ...]) -> tuple[str, ...]:
    feats = r.typed(key, tuple[str, ...])
    if not feats or any(f not in allowed for f in feats):
      raise ConfigError(f"{key}: unsupported value {list(feats)} (features must be among "
                        f"{list(allowed)})")
    if list(feats) != sorted(feats, key=allowed.index) or len(set(feats)) != len(feats):
      raise ConfigError(f"{key}: features must be distinct and finest first, got {list(feats)}")
    return feats

  input_cfg = _section(r, InputConfig, "INPUT",
                       {f"crop_{k}": f"INPUT.CROP.{k.upper()}"
                        for k in ("enabled", "type", "size", "single_category_max_area")},
                       min_size_train=_int_tuple(r, "INPUT.MIN_SIZE_TRAIN"))
  point_feats = features("MODEL.POINT_HEAD.IN_FEATURES", fpn_levels[:4])
  r.expect("MODEL.POINT_HEAD.NAME", "StandardPointHead")
  point_head = _section(r, PointHeadConfig, "MODEL.POINT_HEAD", in_features=point_feats)
  sem_seg_head = _section(r, SemSegHeadConfig, "MODEL.SEM_SEG_HEAD")
  common = dict(meta_architecture=meta, pixel_mean=pixel_mean, pixel_std=pixel_std,
                weights=str(r.get("MODEL.WEIGHTS") or ""), resnets=resnets, fpn=fpn,
                input=input_cfg, point_head=point_head, sem_seg_head=sem_seg_head)

  if semantic:
    r.expect("MODEL.SEM_SEG_HEAD.NAME", "PointRendSemSegHead")
    r.expect("MODEL.POINT_HEAD.COARSE_SEM_SEG_HEAD_NAME", "SemSegFPNHead")
    r.expect("MODEL.SEM_SEG_HEAD.COMMON_STRIDE", 4)
    r.expect("MODEL.SEM_SEG_HEAD.NORM", ("GN", "", "BN", "SyncBN", "FrozenBN"))
    features("MODEL.SEM_SEG_HEAD.IN_FEATURES", fpn_levels[:4])
    if point_head.num_classes != sem_seg_head.num_classes:
      raise ConfigError(f"MODEL.POINT_HEAD.NUM_CLASSES ({point_head.num_classes}) must equal "
                        f"MODEL.SEM_SEG_HEAD.NUM_CLASSES ({sem_seg_head.num_classes})")
    _check_subdivision(point_head, semantic=True)
    return ModelConfig(**common)

  # Instance segmentation (GeneralizedRCNN + PointRend mask head).
  r.expect("MODEL.MASK_ON", True, "the instance model is Mask R-CNN with the PointRend head")
  r.expect("MODEL.PROPOSAL_GENERATOR.NAME", "RPN")
  r.expect("MODEL.RPN.HEAD_NAME", "StandardRPNHead")
  r.expect("MODEL.RPN.CONV_DIMS", ([-1],))
  r.expect("MODEL.ANCHOR_GENERATOR.NAME", "DefaultAnchorGenerator")
  r.expect("MODEL.ROI_HEADS.NAME", "StandardROIHeads")
  r.expect("MODEL.ROI_BOX_HEAD.NAME", "FastRCNNConvFCHead")
  r.expect("MODEL.ROI_BOX_HEAD.NUM_CONV", 0)
  r.expect("MODEL.ROI_BOX_HEAD.NORM", "")
  r.expect("MODEL.ROI_BOX_HEAD.CLS_AGNOSTIC_BBOX_REG", False)
  r.expect("MODEL.ROI_BOX_HEAD.POOLER_TYPE", "ROIAlignV2")
  r.expect("MODEL.ROI_BOX_HEAD.USE_SIGMOID_CE", False)
  r.expect("MODEL.ROI_MASK_HEAD.NAME", "PointRendMaskHead")
  r.expect("MODEL.ROI_MASK_HEAD.POINT_HEAD_ON", True)
  r.expect("MODEL.ROI_MASK_HEAD.POOLER_TYPE", "",
           "PointRendMaskHead samples its own points (no ROI pooler)")

  rpn_feats = features("MODEL.RPN.IN_FEATURES", fpn_levels)
  sizes = _anchor_lists(r, "MODEL.ANCHOR_GENERATOR.SIZES", len(rpn_feats))
  ratios = _anchor_lists(r, "MODEL.ANCHOR_GENERATOR.ASPECT_RATIOS", len(rpn_feats))
  if any(rt != ratios[0] for rt in ratios):
    raise ConfigError("MODEL.ANCHOR_GENERATOR.ASPECT_RATIOS: different ratios per level are "
                      f"not supported, got {[list(x) for x in ratios]}")
  if any(len(s) != len(sizes[0]) for s in sizes):
    raise ConfigError("MODEL.ANCHOR_GENERATOR.SIZES: every level needs the same number of "
                      f"sizes, got {[list(x) for x in sizes]}")
  anchors = AnchorConfig(sizes=sizes, aspect_ratios=ratios[0],
                         offset=r.typed("MODEL.ANCHOR_GENERATOR.OFFSET", float))
  rpn = _section(r, RPNConfig, "MODEL.RPN", {"min_size": "MODEL.PROPOSAL_GENERATOR.MIN_SIZE"},
                 in_features=rpn_feats)
  roi_heads = _section(r, ROIHeadsConfig, "MODEL.ROI_HEADS",
                       {"detections_per_image": "TEST.DETECTIONS_PER_IMAGE"},
                       in_features=features("MODEL.ROI_HEADS.IN_FEATURES", fpn_levels[:4]))
  box_head = _section(r, BoxHeadConfig, "MODEL.ROI_BOX_HEAD")
  if box_head.num_fc < 1:
    raise ConfigError("MODEL.ROI_BOX_HEAD.NUM_FC: at least one fc layer is required")
  mask_head = _section(r, MaskHeadConfig, "MODEL.ROI_MASK_HEAD",
                       in_features=features("MODEL.ROI_MASK_HEAD.IN_FEATURES", fpn_levels[:4]))
  if mask_head.in_features != point_head.in_features:
    raise ConfigError(f"MODEL.ROI_MASK_HEAD.IN_FEATURES ({list(mask_head.in_features)}) must "
                      f"equal MODEL.POINT_HEAD.IN_FEATURES ({list(point_head.in_features)})")
  if point_head.num_classes != roi_heads.num_classes:
    raise ConfigError(f"MODEL.POINT_HEAD.NUM_CLASSES ({point_head.num_classes}) must equal "
                      f"MODEL.ROI_HEADS.NUM_CLASSES ({roi_heads.num_classes})")
  if point_head.cls_agnostic_mask != mask_head.cls_agnostic_mask:
    raise ConfigError("MODEL.POINT_HEAD.CLS_AGNOSTIC_MASK must equal "
                      "MODEL.ROI_MASK_HEAD.CLS_AGNOSTIC_MASK")
  _check_subdivision(point_head, semantic=False, output_side=mask_head.output_side_resolution)
  return ModelConfig(**common, anchors=anchors, rpn=rpn, roi_heads=roi_heads, box_head=box_head,
                     mask_head=mask_head)


def _int_tuple(r: _Reader, key: str) -> tuple[int, ...]:
  value = r.get(key)
  if isinstance(value, (int, float)) and not isinstance(value, bool):
    value = [value]  # detectron2 accepts a single int for MIN_SIZE_TRAIN.
  return convert_value(tuple[int, ...], value, key)


def _anchor_lists(r: _Reader, key: str, num_levels: int) -> tuple[tuple[float, ...], ...]:
  """detectron2 ``_broadcast_params``: one list for all levels, or one list per level."""
  value = r.get(key)
  if not isinstance(value, (list, tuple)) or not value:
    raise ConfigError(f"{key}: expected a list of lists, got {value!r}")
  if not isinstance(value[0], (list, tuple)):
    value = [value]
  if len(value) == 1:
    value = list(value) * num_levels
  if len(value) != num_levels:
    raise ConfigError(f"{key}: {len(value)} lists for {num_levels} RPN levels")
  return tuple(convert_value(tuple[float, ...], v, key) for v in value)


def _check_subdivision(point_head: PointHeadConfig, *, semantic: bool,
                       output_side: int = 7) -> None:
  if point_head.subdivision_num_points <= 0:
    raise ConfigError("MODEL.POINT_HEAD.SUBDIVISION_NUM_POINTS must be positive")
  if not semantic:
    # Imported here: the config module itself does not need jax.
    from pointrend_jax.modeling.point_rend import subdivision_schedule
    try:
      subdivision_schedule(output_side, point_head.subdivision_steps,
                           point_head.subdivision_num_points)
    except ValueError as e:
      raise ConfigError(f"MODEL.POINT_HEAD.SUBDIVISION_STEPS: {e}") from e


def from_detectron2_yaml(path_or_dict: str | os.PathLike[str] | Mapping[str, Any]
                         ) -> ModelConfig:
  """Parses a detectron2 config into a :class:`ModelConfig`.

  Args:
    path_or_dict: a yaml file (a full ``cfg.dump()`` or a yaml with ``_BASE_``; relative bases
      are resolved next to the file), or the already loaded mapping (its ``_BASE_`` can only be
      one of the built-in base files).

  Returns:
    The config. A missing ``_BASE_`` file with a built-in copy produces a ``UserWarning``.

  Raises:
    ConfigError: unreadable yaml, unsupported values (the message names the key), missing base.
    FileNotFoundError: ``path_or_dict`` is a path that does not exist.
  """
  notes: list[str] = []
  if isinstance(path_or_dict, Mapping):
    merged = _resolve(path_or_dict, None, (), notes)
  else:
    path = pathlib.Path(os.fspath(path_or_dict)).expanduser()
    if not path.is_file():
      raise FileNotFoundError(f"config file not found: {path}")
    merged = _resolve(_read_yaml(path), path.parent, (str(path.resolve()),), notes)
  for note in notes:
    warnings.warn(note, UserWarning, stacklevel=2)
  return _parse(_Reader(_merge(_D2_DEFAULTS, merged)))


def zoo_config(name: str) -> ModelConfig:
  """One of the six PointRend model-zoo configs.

  Args:
    name: a short name from ``ZOO_NAMES`` (``"r50_fpn_1x_coco"``, ...) or the detectron2 config
      stem (``"pointrend_rcnn_R_50_FPN_1x_coco"``), optionally with ``.yaml``.
  """
  key = name[:-len(".yaml")] if name.endswith(".yaml") else name
  key = {v: k for k, v in ZOO_STEMS.items()}.get(key, key)
  if key not in _ZOO_YAMLS:
    raise ConfigError(f"unknown zoo config {name!r}; known: {', '.join(ZOO_NAMES)} (or their "
                      "detectron2 stems)")
  return from_detectron2_yaml(_ZOO_YAMLS[key])


def zoo_yaml(name: str) -> dict[str, Any]:
  """The built-in copy of a zoo yaml (with its ``_BASE_``), e.g. to write it to a file."""
  key = {v: k for k, v in ZOO_STEMS.items()}.get(name, name)
  return copy.deepcopy(_ZOO_YAMLS[key])


# --- The run config's model section ---


def _plain(value: Any) -> Any:
  """ConfigDicts / lists -> dicts / tuples, recursively (model configs must be hashable)."""
  if hasattr(value, "to_dict"):  # an ml_collections ConfigDict
    value = value.to_dict()
  if isinstance(value, Mapping):
    return {k: _plain(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return tuple(_plain(v) for v in value)
  return value


def _class_count_updates(cfg: ModelConfig, value: Any) -> dict[str, int]:
  heads = ("sem_seg_head", "point_head") if cfg.is_semantic else ("roi_heads", "point_head")
  return {f"{head}.num_classes": int(value) for head in heads}


def model_config(model: Mapping[str, Any]) -> ModelConfig:
  """The model config of a run config's ``model`` section (``config.model`` of ``configs/*.py``):
  ``zoo`` (or ``ModelConfig()``) with ``overrides`` and ``num_classes`` applied.

  ``overrides`` mirrors ``ModelConfig`` (sections as dicts, top-level fields directly);
  ``num_classes`` (in ``overrides``, or ``config.model.num_classes`` > 0, which wins) sets the
  head class counts (ROI + point head, or sem-seg + point head).

  Raises:
    ConfigError: ``config.model.num_classes`` is negative.
    ConfigError: an override names no ``ModelConfig`` field, or the zoo name is unknown.
  """
  zoo = str(model.get("zoo", "") or "")
  cfg = zoo_config(zoo) if zoo else ModelConfig()
  overrides = _plain(model.get("overrides", None) or {})
  # Overrides may change the meta architecture, which decides the heads num_classes goes to.
  if "meta_architecture" in overrides:
    cfg = cfg.replace(meta_architecture=overrides["meta_architecture"])
  updates: dict[str, Any] = {}
  for key, value in overrides.items():
    if key == "num_classes":
      updates.update(_class_count_updates(cfg, value))
    elif isinstance(value, Mapping):
      for field, v in value.items():
        updates[f"{key}.{field}"] = v
    elif key != "meta_architecture":
      updates[key] = value
  num_classes = int(model.get("num_classes", 0) or 0)
  if num_classes < 0:
    raise ConfigError(f"config.model.num_classes must be >= 0 (0 = the zoo / overrides "
                           f"value), got {num_classes}")
  if num_classes:
    # After the sections, so that it also wins over overrides.roi_heads.num_classes etc.
    updates.update(_class_count_updates(cfg, num_classes))
  return cfg.replace(**updates)
