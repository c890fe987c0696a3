"""Model configuration: frozen dataclasses, one per detectron2 config section.

A model config is fixed once the model is built, and the networks read it at trace time; frozen
dataclasses are immutable, hashable (usable as static module attributes and ``jit`` static
arguments), typed, have defaults, and round-trip through JSON (:meth:`ModelConfig.to_dict` /
:meth:`ModelConfig.from_dict`, used by converted checkpoints). Change a value with
:meth:`ModelConfig.replace` (dotted paths). Training settings (solver, data loader) are not part
of it: they belong to the run config (``configs/*.py``).

Every field names the detectron2 key it comes from. The default values are those of the R50
COCO PointRend config (``pointrend_rcnn_R_50_FPN_1x_coco``), not detectron2's bare defaults.
Configs come from detectron2 yamls and the model zoo (:mod:`pointrend_jax.modeling.zoo`).
"""

from __future__ import annotations

import dataclasses
import json
import typing
from collections.abc import Mapping
from typing import Any

from pointrend_jax.errors import ConfigError

__all__ = ["ResNetConfig", "FPNConfig", "AnchorConfig", "RPNConfig", "ROIHeadsConfig",
           "BoxHeadConfig", "MaskHeadConfig", "PointHeadConfig", "SemSegHeadConfig", "InputConfig",
           "ModelConfig", "convert_value"]


_frozen = dataclasses.dataclass(frozen=True)

# --- Dataclasses ---


@_frozen
class ResNetConfig:
  """``MODEL.RESNETS.*`` and ``MODEL.BACKBONE.FREEZE_AT``.

  Attributes:
    depth: 18, 34, 50, 101 or 152 (``DEPTH``).
    num_groups, width_per_group: conv2 groups and per-group width (X101-32x8d: 32, 8).
    stride_in_1x1: stride on the first 1x1 conv (MSRA) instead of the 3x3 (C2/FAIR models).
    norm: "FrozenBN", "BN", "SyncBN", "GN" or "".
    freeze_at: ``MODEL.BACKBONE.FREEZE_AT`` (0: nothing frozen; 2: stem + res2).
    stem_out_channels, res2_out_channels, res5_dilation: widths and res5 dilation.
    out_features: always res2..res5 for the FPN backbone.
  """
  depth: int = 50
  num_groups: int = 1
  width_per_group: int = 64
  stride_in_1x1: bool = True
  norm: str = "FrozenBN"
  freeze_at: int = 2
  stem_out_channels: int = 64
  res2_out_channels: int = 256
  res5_dilation: int = 1
  out_features: tuple[str, ...] = ("res2", "res3", "res4", "res5")


@_frozen
class FPNConfig:
  """``MODEL.FPN.*`` (LastLevelMaxPool top block: p6 = subsampled p5)."""
  in_features: tuple[str, ...] = ("res2", "res3", "res4", "res5")
  out_channels: int = 256
  norm: str = ""


@_frozen
class AnchorConfig:
  """``MODEL.ANCHOR_GENERATOR.*`` (DefaultAnchorGenerator): one size list per RPN level."""
  sizes: tuple[tuple[float, ...], ...] = ((32.0,), (64.0,), (128.0,), (256.0,), (512.0,))
  aspect_ratios: tuple[float, ...] = (0.5, 1.0, 2.0)
  offset: float = 0.0


@_frozen
class RPNConfig:
  """``MODEL.RPN.*`` and ``MODEL.PROPOSAL_GENERATOR.MIN_SIZE``.

  ``pre_nms_topk_*`` is per level, ``post_nms_topk_*`` per image (the static proposal count).
  """
  in_features: tuple[str, ...] = ("p2", "p3", "p4", "p5", "p6")
  pre_nms_topk_train: int = 2000
  pre_nms_topk_test: int = 1000
  post_nms_topk_train: int = 1000
  post_nms_topk_test: int = 1000
  nms_thresh: float = 0.7
  min_size: float = 0.0
  bbox_reg_weights: tuple[float, ...] = (1.0, 1.0, 1.0, 1.0)
  iou_thresholds: tuple[float, ...] = (0.3, 0.7)
  iou_labels: tuple[int, ...] = (0, -1, 1)
  batch_size_per_image: int = 256
  positive_fraction: float = 0.5
  smooth_l1_beta: float = 0.0
  loss_weight: float = 1.0
  bbox_reg_loss_weight: float = 1.0
  boundary_thresh: int = -1


@_frozen
class ROIHeadsConfig:
  """``MODEL.ROI_HEADS.*`` (StandardROIHeads) and ``TEST.DETECTIONS_PER_IMAGE``."""
  num_classes: int = 80
  in_features: tuple[str, ...] = ("p2", "p3", "p4", "p5")
  score_thresh_test: float = 0.05
  nms_thresh_test: float = 0.5
  detections_per_image: int = 100
  batch_size_per_image: int = 512
  positive_fraction: float = 0.25
  iou_thresholds: tuple[float, ...] = (0.5,)
  iou_labels: tuple[int, ...] = (0, 1)
  proposal_append_gt: bool = True


@_frozen
class BoxHeadConfig:
  """``MODEL.ROI_BOX_HEAD.*`` (FastRCNNConvFCHead, class-specific boxes, ROIAlignV2)."""
  num_fc: int = 2
  fc_dim: int = 1024
  pooler_resolution: int = 7
  pooler_sampling_ratio: int = 0
  bbox_reg_weights: tuple[float, ...] = (10.0, 10.0, 5.0, 5.0)
  smooth_l1_beta: float = 0.0
  bbox_reg_loss_weight: float = 1.0
  train_on_pred_boxes: bool = True


@_frozen
class MaskHeadConfig:
  """``MODEL.ROI_MASK_HEAD.*`` of PointRendMaskHead (coarse head).

  ``pooler_resolution`` is the side of the regular point grid the coarse head samples (14).
  """
  in_features: tuple[str, ...] = ("p2",)
  pooler_resolution: int = 14
  conv_dim: int = 256
  fc_dim: int = 1024
  num_fc: int = 2
  output_side_resolution: int = 7
  cls_agnostic_mask: bool = False


@_frozen
class PointHeadConfig:
  """``MODEL.POINT_HEAD.*`` (StandardPointHead, training points, subdivision inference)."""
  num_classes: int = 80
  in_features: tuple[str, ...] = ("p2",)
  fc_dim: int = 256
  num_fc: int = 3
  cls_agnostic_mask: bool = False
  coarse_pred_each_layer: bool = True
  train_num_points: int = 196
  oversample_ratio: float = 3.0
  importance_sample_ratio: float = 0.75
  subdivision_steps: int = 5
  subdivision_num_points: int = 784


@_frozen
class SemSegHeadConfig:
  """``MODEL.SEM_SEG_HEAD.*`` (PointRendSemSegHead with a SemSegFPNHead coarse head)."""
  num_classes: int = 19
  in_features: tuple[str, ...] = ("p2", "p3", "p4", "p5")
  convs_dim: int = 128
  common_stride: int = 4
  norm: str = "GN"
  ignore_value: int = 255
  loss_weight: float = 1.0


@_frozen
class InputConfig:
  """``INPUT.*``: channel order, resize (test and train), crop, colour augmentation."""
  format: str = "BGR"
  min_size_test: int = 800
  max_size_test: int = 1333
  min_size_train: tuple[int, ...] = (640, 672, 704, 736, 768, 800)
  max_size_train: int = 1333
  min_size_train_sampling: str = "choice"
  random_flip: str = "horizontal"
  mask_format: str = "bitmask"
  crop_enabled: bool = False
  crop_type: str = "relative_range"
  crop_size: tuple[float, ...] = (0.9, 0.9)
  crop_single_category_max_area: float = 1.0
  color_aug_ssd: bool = False


@_frozen
class ModelConfig:
  """Everything needed to build a PointRend model and run its inference.

  Attributes:
    meta_architecture: "GeneralizedRCNN" (instance: :class:`~pointrend_jax.modeling.meta_arch.
      PointRendRCNN`) or "SemanticSegmentor".
    pixel_mean, pixel_std: ``MODEL.PIXEL_MEAN`` / ``PIXEL_STD`` in ``input.format`` order.
    weights: ``MODEL.WEIGHTS`` (informational: the initialization the config names).
    resnets .. input: the sections above. Instance models ignore ``sem_seg_head``; semantic
      models ignore ``anchors``, ``rpn``, ``roi_heads``, ``box_head`` and ``mask_head``.
  """
  meta_architecture: str = "GeneralizedRCNN"
  pixel_mean: tuple[float, ...] = (103.53, 116.28, 123.675)
  pixel_std: tuple[float, ...] = (1.0, 1.0, 1.0)
  weights: str = ""
  resnets: ResNetConfig = ResNetConfig()
  fpn: FPNConfig = FPNConfig()
  anchors: AnchorConfig = AnchorConfig()
  rpn: RPNConfig = RPNConfig()
  roi_heads: ROIHeadsConfig = ROIHeadsConfig()
  box_head: BoxHeadConfig = BoxHeadConfig()
  mask_head: MaskHeadConfig = MaskHeadConfig()
  point_head: PointHeadConfig = PointHeadConfig()
  sem_seg_head: SemSegHeadConfig = SemSegHeadConfig()
  input: InputConfig = InputConfig()

  @property
  def is_semantic(self) -> bool:
    return self.meta_architecture == "SemanticSegmentor"

  @property
  def size_divisibility(self) -> int:
    """Inputs are padded to a multiple of this: the coarsest FPN input stride (32)."""
    return 2 ** int(self.fpn.in_features[-1][len("res"):])

  @property
  def num_classes(self) -> int:
    return self.sem_seg_head.num_classes if self.is_semantic else self.roi_heads.num_classes

  def to_dict(self) -> dict[str, Any]:
    """JSON-compatible nested dict (tuples become lists)."""
    return json.loads(json.dumps(dataclasses.asdict(self)))

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> ModelConfig:
    """Inverse of :meth:`to_dict`; unknown keys raise :class:`ConfigError`."""
    return _from_dict(cls, d, "")

  def to_json(self, **kwargs) -> str:
    return json.dumps(self.to_dict(), **kwargs)

  def replace(self, **updates: Any) -> ModelConfig:
    """``dataclasses.replace`` with dotted paths, e.g. ``cfg.replace(**{"rpn.nms_thresh": .6})``."""
    cfg = self
    for path, value in updates.items():
      cfg = _replace_path(cfg, path.split("."), value)
    return cfg


def _replace_path(obj: Any, parts: list[str], value: Any) -> Any:
  names = {f.name for f in dataclasses.fields(obj)}
  if parts[0] not in names:
    raise ConfigError(f"{type(obj).__name__} has no field {parts[0]!r}")
  if len(parts) == 1:
    return dataclasses.replace(obj, **{parts[0]: value})
  return dataclasses.replace(
      obj, **{parts[0]: _replace_path(getattr(obj, parts[0]), parts[1:], value)})


def convert_value(tp: Any, value: Any, where: str) -> Any:
  """Converts a JSON / yaml value to the annotated field type (lists -> tuples)."""
  origin = typing.get_origin(tp)
  if dataclasses.is_dataclass(tp):
    if not isinstance(value, Mapping):
      raise ConfigError(f"{where}: expected a mapping, got {value!r}")
    return _from_dict(tp, value, where + ".")
  if origin is tuple:
    if not isinstance(value, (list, tuple)):
      raise ConfigError(f"{where}: expected a list, got {value!r}")
    args = typing.get_args(tp)
    return tuple(convert_value(args[0], v, where) for v in value)
  if tp not in _SCALARS:
    raise ConfigError(f"{where}: unsupported field type {tp}")  # pragma: no cover
  what, ok = _SCALARS[tp]
  if not ok(value):
    raise ConfigError(f"{where}: expected {what}, got {value!r}")
  return tp(value)


_number = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)
# Field type -> (what the error says was expected, test of a yaml / JSON value).
_SCALARS: dict[type, tuple[str, Any]] = {
    bool: ("a bool", lambda v: isinstance(v, bool)),
    int: ("an int", lambda v: _number(v) and int(v) == v),
    float: ("a number", _number),
    str: ("a string", lambda v: isinstance(v, str)),
}


def _from_dict(cls: type, d: Mapping[str, Any], prefix: str) -> Any:
  hints = typing.get_type_hints(cls)
  names = {f.name for f in dataclasses.fields(cls)}
  unknown = set(d) - names
  if unknown:
    raise ConfigError(f"unknown config keys: {', '.join(prefix + k for k in sorted(unknown))}")
  return cls(**{k: convert_value(hints[k], v, prefix + k) for k, v in d.items()})
