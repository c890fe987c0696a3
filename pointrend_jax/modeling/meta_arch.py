"""Whole models: PointRend R-CNN (instance) and the semantic segmentor, built from a config.

* :class:`PointRendRCNN`: detectron2 ``GeneralizedRCNN`` with ``StandardROIHeads`` and
  ``PointRendMaskHead``: ResNet-FPN backbone, RPN, box branch, PointRend mask head.
  :meth:`PointRendRCNN.predict` is a pure, fixed-shape function of a padded batch
  (:class:`~pointrend_jax.modeling.predict.PredictProgram` compiles it once per input bucket).
* :func:`build_model` builds it, or :class:`~pointrend_jax.modeling.semantic.
  PointRendSemanticSegmentor` for ``SemanticSegmentor`` configs, from a
  :class:`~pointrend_jax.modeling.config.ModelConfig`, with the model's ``dtype`` (compute),
  ``param_dtype`` (variables) and ``precision`` (convs and matmuls), passed down as constructor
  arguments of every module.

Module paths equal detectron2's, so the state-dict names are the paths: ``backbone.*``,
``proposal_generator.*`` and ``roi_heads.{box_head,box_predictor}.*``; the mask head is the
attribute ``mask_head`` with names ``roi_heads.mask_head.*`` (detectron2 nests it in the ROI
heads; :mod:`pointrend_jax.checkpoint.d2_model` renames that path).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from pointrend_jax.modeling.config import ModelConfig
from pointrend_jax.modeling.fpn import build_resnet_fpn_backbone
from pointrend_jax.modeling.layers import DType, canonical_compute_dtype
from pointrend_jax.modeling.point_rend import PointRendMaskHead
from pointrend_jax.modeling.roi_heads import StandardROIHeads
from pointrend_jax.modeling.rpn import RPN
from pointrend_jax.modeling.semantic import PointRendSemanticSegmentor, PointRendSemSegHead
from pointrend_jax.ops import roi_align as roi_align_lib

Array = jax.Array

__all__ = ["PointRendRCNN", "normalize_images", "build_model", "abstract_model"]

_FPN_STRIDES = {"p2": 4, "p3": 8, "p4": 16, "p5": 32, "p6": 64}


def normalize_images(images: Array, image_sizes: Array | None, *, pixel_mean: Sequence[float],
                     pixel_std: Sequence[float], input_format: str,
                     size_divisibility: int) -> Array:
  """detectron2 ``preprocess_image`` on a padded batch.

  Args:
    images: ``[B, H, W, 3]`` RGB, uint8 or float, top-left aligned; content outside each
      image's valid region is ignored.
    image_sizes: ``[B, 2]`` valid ``(h, w)`` per image, or None (whole canvas valid).
    pixel_mean, pixel_std: in ``input_format`` channel order.
    input_format: "BGR" (channels reversed first) or "RGB".
    size_divisibility: output ``Hp, Wp`` are the next multiples of it.

  Returns:
    ``[B, Hp, Wp, 3]`` float32 ``(x - mean) / std``, zero outside each image (detectron2 pads
    *after* normalizing). The division is a true float32 division, bit-identical to
    detectron2's ``(x - pixel_mean) / pixel_std`` (XLA would otherwise multiply by the
    reciprocal, an ulp off for non-unit stds such as X101's); a unit std skips it (exact).
  """
  x = jnp.asarray(images).astype(jnp.float32)
  if input_format == "BGR":
    x = x[..., ::-1]
  x = x - jnp.asarray(pixel_mean, jnp.float32)
  if any(float(s) != 1.0 for s in pixel_std):
    x = roi_align_lib._div(x, jnp.asarray(pixel_std, jnp.float32))
  _, h, w, _ = x.shape
  if image_sizes is not None:
    sizes = jnp.asarray(image_sizes).astype(jnp.int32)
    valid = ((jnp.arange(h)[None, :, None] < sizes[:, 0, None, None])
             & (jnp.arange(w)[None, None, :] < sizes[:, 1, None, None]))
    x = jnp.where(valid[..., None], x, 0.0)
  d = size_divisibility
  return jnp.pad(x, ((0, 0), (0, -h % d), (0, -w % d), (0, 0)))


class PointRendRCNN(nnx.Module):
  """PointRend instance segmentation (detectron2 ``GeneralizedRCNN``), inference path.

  Attributes:
    cfg: the :class:`ModelConfig` (static).
    backbone: ResNet-FPN (``backbone.*``).
    proposal_generator: :class:`RPN` (``proposal_generator.*``).
    roi_heads: the box branch, :class:`StandardROIHeads` (``roi_heads.*``).
    mask_head: :class:`PointRendMaskHead` (``roi_heads.mask_head.*``).

  ``dtype``, ``param_dtype`` and ``precision`` go to every layer (see :func:`build_model`).
  """

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, dtype: DType = jnp.float32,
               param_dtype: DType = jnp.float32, precision: jax.lax.PrecisionLike = None):
    if cfg.is_semantic:
      raise ValueError("PointRendRCNN needs a GeneralizedRCNN config; use build_model()")
    self.cfg = cfg
    kw = dict(dtype=dtype, param_dtype=param_dtype, precision=precision, rngs=rngs)
    self.backbone = _build_backbone(cfg, **kw)
    fpn_channels = cfg.fpn.out_channels
    rpn = cfg.rpn
    self.proposal_generator = RPN(
        fpn_channels, in_features=rpn.in_features,
        strides=tuple(_FPN_STRIDES[f] for f in rpn.in_features), sizes=cfg.anchors.sizes,
        aspect_ratios=cfg.anchors.aspect_ratios, offset=cfg.anchors.offset,
        pre_nms_topk=(rpn.pre_nms_topk_train, rpn.pre_nms_topk_test),
        post_nms_topk=(rpn.post_nms_topk_train, rpn.post_nms_topk_test),
        nms_thresh=rpn.nms_thresh, min_box_size=rpn.min_size,
        box_reg_weights=rpn.bbox_reg_weights, **kw)
    roi, box = cfg.roi_heads, cfg.box_head
    self.roi_heads = StandardROIHeads(
        roi.num_classes, fpn_channels, in_features=roi.in_features,
        strides=tuple(_FPN_STRIDES[f] for f in roi.in_features),
        pooler_resolution=box.pooler_resolution, pooler_sampling_ratio=box.pooler_sampling_ratio,
        num_fc=box.num_fc, fc_dim=box.fc_dim, score_thresh=roi.score_thresh_test,
        nms_thresh=roi.nms_thresh_test, detections_per_image=roi.detections_per_image,
        box_reg_weights=box.bbox_reg_weights, **kw)
    mask, point = cfg.mask_head, cfg.point_head
    self.mask_head = PointRendMaskHead(
        roi.num_classes, in_features=mask.in_features,
        feature_strides=tuple(_FPN_STRIDES[f] for f in mask.in_features),
        in_channels=fpn_channels * len(mask.in_features),
        pooler_resolution=mask.pooler_resolution, conv_dim=mask.conv_dim,
        fc_dims=(mask.fc_dim,) * mask.num_fc, output_side=mask.output_side_resolution,
        point_fc_dim=point.fc_dim, point_num_fc=point.num_fc,
        coarse_pred_each_layer=point.coarse_pred_each_layer,
        cls_agnostic_mask=mask.cls_agnostic_mask, train_num_points=point.train_num_points,
        oversample_ratio=point.oversample_ratio,
        importance_sample_ratio=point.importance_sample_ratio,
        subdivision_steps=point.subdivision_steps,
        subdivision_num_points=point.subdivision_num_points, **kw)

  @property
  def size_divisibility(self) -> int:
    return self.backbone.size_divisibility

  def preprocess(self, images: Array, image_sizes: Array | None = None) -> Array:
    """RGB ``[B, H, W, 3]`` -> normalized ``[B, Hp, Wp, 3]`` (see :func:`normalize_images`)."""
    cfg = self.cfg
    return normalize_images(images, image_sizes, pixel_mean=cfg.pixel_mean,
                            pixel_std=cfg.pixel_std, input_format=cfg.input.format,
                            size_divisibility=self.size_divisibility)

  def features(self, x: Array) -> tuple[dict[str, Array], dict[str, Array]]:
    """Normalized ``[B, Hp, Wp, 3]`` -> (``{res2..res5}``, ``{p2..p6}``), NHWC."""
    bottom_up = self.backbone.bottom_up(x)
    return bottom_up, self.backbone.from_features(bottom_up)

  def predict(self, images: Array, image_sizes: Array, *, return_proposals: bool = False,
              return_mask_probs: bool = False, return_intermediates: bool = False
              ) -> dict[str, Any]:
    """Inference on a padded batch; every output has a fixed shape.

    Args:
      images: ``[B, H, W, 3]`` RGB (uint8 or float), each image top-left aligned; ``H, W``
        should be multiples of 32 (else padded here, which changes the bucket).
      image_sizes: ``[B, 2]`` int valid (resized, unpadded) ``(h, w)`` of each image.
      return_proposals: add ``proposal_boxes [B, P, 4]``, ``proposal_logits [B, P]``,
        ``proposal_valid [B, P]`` (``P`` = RPN.POST_NMS_TOPK_TEST).
      return_mask_probs: add ``mask_probs`` = sigmoid of ``mask_logits``.
      return_intermediates: add ``"intermediates"``: ``input`` (normalized, padded),
        ``features`` (res2..res5, p2..p6), ``rpn_logits`` / ``rpn_deltas`` (per level, anchor
        order), ``proposals`` (:class:`~pointrend_jax.modeling.rpn.Proposals`),
        ``box_cls_logits [B, P, K+1]``, ``box_deltas [B, P, 4K]``,
        ``proposal_index [B, D]`` and ``mask`` (the mask head's intermediates on the flattened
        ``B*D`` detections, see :meth:`PointRendMaskHead.subdivision_inference`).

    Returns:
      ``boxes [B, D, 4]`` (resized-image pixels), ``scores [B, D]``, ``classes [B, D]`` int32,
      ``valid [B, D]`` bool (a prefix), ``mask_logits [B, D, S, S]`` (box frame, predicted
      class; ``S`` = 224), ``D`` = TEST.DETECTIONS_PER_IMAGE. Invalid rows are zero (their mask
      logits are meaningless).
    """
    x = self.preprocess(images, image_sizes)
    image_sizes = jnp.asarray(image_sizes).astype(jnp.int32)
    bottom_up, feats = self.features(x)
    rpn_out = self.proposal_generator(feats, image_sizes)
    props = rpn_out.proposals
    cls_logits, box_deltas = self.roi_heads.box_outputs(feats, props.boxes, props.valid)
    dets = self.roi_heads.inference(cls_logits, box_deltas, props.boxes, props.valid,
                                    image_sizes)
    b, d = dets.valid.shape
    batch_index = jnp.repeat(jnp.arange(b, dtype=jnp.int32), d)
    masks = self.mask_head.subdivision_inference(
        feats, dets.boxes.reshape(b * d, 4), batch_index, dets.classes.reshape(b * d),
        return_intermediates=return_intermediates)
    mask_inter = None
    if return_intermediates:
      masks, mask_inter = masks
    s = masks.shape[-1]
    out: dict[str, Any] = dict(boxes=dets.boxes, scores=dets.scores, classes=dets.classes,
                               valid=dets.valid, mask_logits=masks.reshape(b, d, s, s))
    if return_mask_probs:
      out["mask_probs"] = jax.nn.sigmoid(out["mask_logits"])
    if return_proposals:
      out.update(proposal_boxes=props.boxes, proposal_logits=props.logits,
                 proposal_valid=props.valid)
    if return_intermediates:
      out["intermediates"] = dict(
          input=x, features={**bottom_up, **feats}, rpn_logits=rpn_out.logits,
          rpn_deltas=rpn_out.deltas, proposals=props, box_cls_logits=cls_logits,
          box_deltas=box_deltas, proposal_index=dets.proposal_index, mask=mask_inter)
    return out

  def __call__(self, images: Array, image_sizes: Array, **kwargs) -> dict[str, Any]:
    """Same as :meth:`predict`."""
    return self.predict(images, image_sizes, **kwargs)


def _build_backbone(cfg: ModelConfig, **kw: Any):
  r = cfg.resnets
  return build_resnet_fpn_backbone(
      depth=r.depth, num_groups=r.num_groups, width_per_group=r.width_per_group,
      stride_in_1x1=r.stride_in_1x1, norm=r.norm, freeze_at=r.freeze_at,
      out_channels=cfg.fpn.out_channels, fpn_norm=cfg.fpn.norm,
      stem_out_channels=r.stem_out_channels, res2_out_channels=r.res2_out_channels, **kw)


def build_model(model_config: ModelConfig, *, rngs: nnx.Rngs, dtype: DType = jnp.float32,
                param_dtype: DType = jnp.float32, precision: jax.lax.PrecisionLike = None
                ) -> PointRendRCNN | PointRendSemanticSegmentor:
  """Builds the model a config describes (randomly initialized with detectron2's inits).

  For weights loaded right after, build abstractly: :func:`abstract_model`.

  Args:
    model_config: the :class:`ModelConfig` (e.g. ``zoo_config("r50_fpn_1x_coco")``).
    rngs: initializer RNGs.
    dtype: compute dtype of the activations and conv / matmul operands, float32 or bfloat16.
      Norm statistics, the head outputs that feed box decoding, point selection and the losses
      (RPN, box, mask and semantic logits), boxes and sampling coordinates stay float32.
    param_dtype: dtype the variables are created in (float32: gradients, optimizer state and
      checkpoints are float32 whatever ``dtype`` is).
    precision: conv / matmul precision. None: ``Precision.HIGHEST`` when ``dtype`` is float32
      (true float32 on GPU/TPU: detectron2's float32 numbers), the backend default otherwise.

  Raises:
    ValueError: ``dtype`` is not float32 or bfloat16.
  """
  cfg = model_config
  kw = dict(dtype=canonical_compute_dtype(dtype), param_dtype=jnp.dtype(param_dtype),
            precision=precision, rngs=rngs)
  if not cfg.is_semantic:
    return PointRendRCNN(cfg, **kw)
  if cfg.resnets.res5_dilation != 1:
    raise ValueError("MODEL.RESNETS.RES5_DILATION != 1 is not supported by the FPN backbone")
  sem, point = cfg.sem_seg_head, cfg.point_head
  backbone = _build_backbone(cfg, **kw)  # first: the random init draws backbone, then head
  head = PointRendSemSegHead(
      sem.num_classes, coarse_in_features=sem.in_features,
      coarse_feature_strides=tuple(_FPN_STRIDES[f] for f in sem.in_features),
      feature_channels=cfg.fpn.out_channels, conv_dims=sem.convs_dim, norm=sem.norm,
      point_in_features=point.in_features,
      point_in_channels=cfg.fpn.out_channels * len(point.in_features), fc_dim=point.fc_dim,
      num_fc=point.num_fc, coarse_pred_each_layer=point.coarse_pred_each_layer,
      train_num_points=point.train_num_points, oversample_ratio=point.oversample_ratio,
      importance_sample_ratio=point.importance_sample_ratio,
      subdivision_steps=point.subdivision_steps,
      subdivision_num_points=point.subdivision_num_points, **kw)
  return PointRendSemanticSegmentor(backbone, head, pixel_mean=cfg.pixel_mean,
                                    pixel_std=cfg.pixel_std, input_format=cfg.input.format)


def abstract_model(model_config: ModelConfig, *, dtype: DType = jnp.float32,
                   param_dtype: DType = jnp.float32, precision: jax.lax.PrecisionLike = None
                   ) -> PointRendRCNN | PointRendSemanticSegmentor:
  """:func:`build_model` under ``nnx.eval_shape``: no memory, no random init; load weights
  with :func:`pointrend_jax.checkpoint.d2_model.load_d2_model` (strict) before use."""
  return nnx.eval_shape(lambda: build_model(model_config, rngs=nnx.Rngs(0), dtype=dtype,
                                            param_dtype=param_dtype, precision=precision))
