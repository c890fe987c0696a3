"""Box branch of detectron2's ``StandardROIHeads``: pooler, box head, predictor, inference.

Spec: ``mask_rcnn_fpn.md`` §7.2, §8, §11, §13; names and layouts: ``checkpoint_format.md`` §5.4,
§6. The mask branch lives in :mod:`pointrend_jax.modeling.point_rend`.

Conventions:

* Feature maps are NHWC ``[B, H_l, W_l, C]``; pooled ROI features are ``[R, 7, 7, C]``.
* Boxes are ``(x0, y0, x1, y1)`` pixels of the resized, unpadded image; ``image_sizes`` ``[B, 2]``
  int holds each image's unpadded ``(H', W')``. Per-image tensors are ``[B, R, ...]`` with a
  validity mask; the pooler works on the flattened ``[B*R]`` ROIs with ``batch_index``.
* Classes are contiguous ``0..K-1``; the classifier's column ``K`` is background.
* Module paths equal detectron2's: the state-dict names are the :class:`StandardROIHeads` paths
  after ``roi_heads.`` (``box_head.fc1.weight``, ``box_predictor.cls_score.bias``, ...).
* Flatten order: :class:`FastRCNNConvFCHead` transposes ``[R, 7, 7, C]`` to ``[R, C, 7, 7]``
  before flattening (index ``c*49 + y*7 + x``, as PyTorch), so ``fc1``'s kernel is exactly the
  transposed PyTorch weight and checkpoints load and save without any row permutation (the
  transpose of a 12544-wide activation is negligible next to fc1 itself).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from pointrend_jax.modeling.layers import DType, Linear, c2_xavier_fill
from pointrend_jax.ops.boxes import DEFAULT_SCALE_CLAMP, clip_boxes, decode_boxes
from pointrend_jax.ops.nms import batched_nms
from pointrend_jax.ops.poolers import multilevel_roi_align

Array = jax.Array

__all__ = ["FastRCNNConvFCHead", "FastRCNNOutputLayers", "Detections", "StandardROIHeads",
           "fast_rcnn_inference"]


class FastRCNNConvFCHead(nnx.Module):
  """detectron2 ``FastRCNNConvFCHead`` with NUM_CONV 0: flatten (C, H, W), then FC + ReLU layers.

  Args:
    in_channels, resolution: pooled input ``[R, resolution, resolution, in_channels]``.
    num_fc, fc_dim: ``fc1 .. fc{num_fc}`` of width ``fc_dim`` (2 x 1024 in Base-RCNN-FPN).
    dtype, param_dtype, precision: see :class:`~.layers.Linear`.
    rngs: initializer RNGs (c2_xavier_fill, zero bias).
  """

  def __init__(self, in_channels: int = 256, resolution: int = 7, *, num_fc: int = 2,
               fc_dim: int = 1024, dtype: DType = jnp.float32, param_dtype: DType = jnp.float32,
               precision: jax.lax.PrecisionLike = None, rngs: nnx.Rngs):
    if num_fc < 1:
      raise ValueError("FastRCNNConvFCHead needs at least one FC layer (NUM_CONV is not supported)")
    self.num_fc = num_fc
    self.output_size = fc_dim
    dim = in_channels * resolution * resolution
    for i in range(1, num_fc + 1):
      setattr(self, f"fc{i}", Linear(dim, fc_dim, kernel_init=c2_xavier_fill, dtype=dtype,
                                     param_dtype=param_dtype, precision=precision, rngs=rngs))
      dim = fc_dim

  def __call__(self, x: Array) -> Array:
    """x: ``[R, h, w, C]`` pooled features -> ``[R, fc_dim]``."""
    x = jnp.transpose(x, (0, 3, 1, 2)).reshape(x.shape[0], -1)  # PyTorch (C, H, W) flatten.
    for i in range(1, self.num_fc + 1):
      x = jax.nn.relu(getattr(self, f"fc{i}")(x))
    return x


class FastRCNNOutputLayers(nnx.Module):
  """detectron2 ``FastRCNNOutputLayers``: ``cls_score`` (K+1, background last), ``bbox_pred`` (4K).

  Args:
    in_features: box-head width.
    num_classes: ``K`` foreground classes (80 COCO, 8 Cityscapes).
    dtype, param_dtype, precision: see :class:`~.layers.Linear` (outputs are float32 anyway).
    rngs: initializer RNGs (cls Normal(0, 0.01), box Normal(0, 0.001), zero bias).
  """

  def __init__(self, in_features: int = 1024, *, num_classes: int, dtype: DType = jnp.float32,
               param_dtype: DType = jnp.float32, precision: jax.lax.PrecisionLike = None,
               rngs: nnx.Rngs):
    self.num_classes = num_classes
    kw = dict(dtype=dtype, param_dtype=param_dtype, precision=precision, rngs=rngs)
    self.cls_score = Linear(in_features, num_classes + 1,
                            kernel_init=jax.nn.initializers.normal(0.01), **kw)
    self.bbox_pred = Linear(in_features, 4 * num_classes,
                            kernel_init=jax.nn.initializers.normal(0.001), **kw)

  def __call__(self, x: Array) -> tuple[Array, Array]:
    """x: ``[R, in_features]`` -> (``[R, K+1]`` class logits, ``[R, 4K]`` class-specific deltas,
    column ``4k + j`` = component j (dx, dy, dw, dh) of class k), both float32 whatever the
    compute dtype (softmax, box decoding and the losses read them)."""
    return self.cls_score(x).astype(jnp.float32), self.bbox_pred(x).astype(jnp.float32)


class Detections(NamedTuple):
  """Fixed-size detections of a batch (``D`` = detections per image), sorted by score.

  Attributes:
    boxes: ``[B, D, 4]`` xyxy in resized-image pixels, clipped; invalid rows 0.
    scores: ``[B, D]`` class probabilities; invalid rows 0.
    classes: ``[B, D]`` int32 in ``0..K-1``; invalid rows 0.
    valid: ``[B, D]`` bool, a prefix mask per image.
    proposal_index: ``[B, D]`` int32 row of the image's proposals each detection came from.
  """
  boxes: Array
  scores: Array
  classes: Array
  valid: Array
  proposal_index: Array


def _inference_one(cls_logits: Array, box_deltas: Array, proposals: Array, proposal_valid: Array,
                   image_size: Array, score_thresh: float, nms_thresh: float, topk: int,
                   weights: Sequence[float], scale_clamp: float, coordinate_trick: bool
                   ) -> Detections:
  r, k1 = cls_logits.shape
  k = k1 - 1
  probs = jax.nn.softmax(cls_logits.astype(jnp.float32), axis=-1)[:, :k]
  boxes = decode_boxes(box_deltas, proposals, weights, scale_clamp).reshape(r, k, 4)
  # detectron2 drops a proposal when any of its boxes or scores is non-finite.
  finite = (jnp.all(jnp.isfinite(boxes), axis=(1, 2)) &
            jnp.all(jnp.isfinite(probs), axis=1))
  hw = image_size.astype(jnp.float32)
  boxes = clip_boxes(boxes, (hw[0], hw[1]))
  cand = (probs > score_thresh) & (proposal_valid & finite)[:, None]
  # Candidates are the (proposal, class) pairs in row-major order, as nonzero() gives them.
  flat_boxes = boxes.reshape(r * k, 4)
  flat_scores = probs.reshape(r * k)
  flat_cls = jnp.broadcast_to(jnp.arange(k, dtype=jnp.int32), (r, k)).reshape(r * k)
  keep, valid = batched_nms(flat_boxes, flat_scores, flat_cls, nms_thresh, topk,
                            cand.reshape(r * k), coordinate_trick=coordinate_trick)
  return Detections(boxes=jnp.where(valid[:, None], flat_boxes[keep], 0.0),
                    scores=jnp.where(valid, flat_scores[keep], 0.0),
                    classes=jnp.where(valid, flat_cls[keep], 0), valid=valid,
                    proposal_index=jnp.where(valid, keep // k, 0).astype(jnp.int32))


def fast_rcnn_inference(cls_logits: Array, box_deltas: Array, proposals: Array,
                        proposal_valid: Array, image_sizes: Array, *, score_thresh: float = 0.05,
                        nms_thresh: float = 0.5, topk_per_image: int = 100,
                        box_reg_weights: Sequence[float] = (10.0, 10.0, 5.0, 5.0),
                        scale_clamp: float = DEFAULT_SCALE_CLAMP,
                        coordinate_trick: bool = False) -> Detections:
  """detectron2 ``fast_rcnn_inference`` with fixed-size outputs.

  Per image: softmax over K+1 classes, background dropped; class-specific boxes decoded from the
  proposals and clipped to the image; proposals with any non-finite box or score dropped;
  (proposal, class) candidates with probability ``> score_thresh`` (row-major order); class-aware
  greedy NMS (IoU ``> nms_thresh``); the first ``topk_per_image`` by descending score.

  Args:
    cls_logits: ``[B, R, K+1]`` classifier logits, background last.
    box_deltas: ``[B, R, 4K]`` class-specific deltas.
    proposals: ``[B, R, 4]`` proposal boxes.
    proposal_valid: ``[B, R]`` bool; invalid proposals yield no candidates.
    image_sizes: ``[B, 2]`` int unpadded ``(H', W')``.
    score_thresh, nms_thresh, topk_per_image: ROI_HEADS.SCORE_THRESH_TEST, NMS_THRESH_TEST,
      TEST.DETECTIONS_PER_IMAGE (``topk_per_image`` is the static output size ``D``).
    box_reg_weights: ROI_BOX_HEAD.BBOX_REG_WEIGHTS.
    scale_clamp: clamp of ``dw, dh`` before ``exp``.
    coordinate_trick: reproduce torchvision's offset-based batched NMS (its path for at most
      1,000 candidates on CPU / 5,000 on GPU) instead of exact per-class NMS; see
      :func:`pointrend_jax.ops.nms.batched_nms`.

  Returns:
    :class:`Detections` with ``D = topk_per_image`` rows per image.
  """
  fn = lambda *a: _inference_one(*a, float(score_thresh), float(nms_thresh), int(topk_per_image),
                                 tuple(box_reg_weights), float(scale_clamp),
                                 bool(coordinate_trick))
  return jax.vmap(fn)(jnp.asarray(cls_logits), jnp.asarray(box_deltas), jnp.asarray(proposals),
                      jnp.asarray(proposal_valid, bool), jnp.asarray(image_sizes))


class StandardROIHeads(nnx.Module):
  """The box branch of detectron2 ``StandardROIHeads`` (box pooler + head + predictor).

  Args:
    num_classes: ``K``.
    in_channels: FPN width.
    in_features, strides: pooled levels (p2..p5) and their strides.
    pooler_resolution, pooler_sampling_ratio: ROIAlignV2 output size and sampling ratio.
    num_fc, fc_dim: box head.
    score_thresh, nms_thresh, detections_per_image, box_reg_weights: box inference.
    max_image_side: optional bound of the input size; caps the ROIAlign samples per bin at the
      exact worst case for boxes inside such an image (cost bound only; ``None`` = exact for
      every box).
    dtype, param_dtype, precision: of the box head and predictor layers.
  """

  def __init__(self, num_classes: int, in_channels: int = 256, *,
               in_features: Sequence[str] = ("p2", "p3", "p4", "p5"),
               strides: Sequence[int] = (4, 8, 16, 32), pooler_resolution: int = 7,
               pooler_sampling_ratio: int = 0, num_fc: int = 2, fc_dim: int = 1024,
               score_thresh: float = 0.05, nms_thresh: float = 0.5, detections_per_image: int = 100,
               box_reg_weights: Sequence[float] = (10.0, 10.0, 5.0, 5.0),
               max_image_side: float | None = None, dtype: DType = jnp.float32,
               param_dtype: DType = jnp.float32, precision: jax.lax.PrecisionLike = None,
               rngs: nnx.Rngs):
    if len(in_features) != len(strides):
      raise ValueError(f"{len(in_features)} ROI features but {len(strides)} strides")
    self.num_classes = num_classes
    self.in_features = tuple(in_features)
    self.scales = tuple(1.0 / s for s in strides)
    self.pooler_resolution = int(pooler_resolution)
    self.pooler_sampling_ratio = int(pooler_sampling_ratio)
    self.score_thresh = float(score_thresh)
    self.nms_thresh = float(nms_thresh)
    self.detections_per_image = int(detections_per_image)
    self.box_reg_weights = tuple(float(w) for w in box_reg_weights)
    self.max_image_side = max_image_side
    kw = dict(dtype=dtype, param_dtype=param_dtype, precision=precision, rngs=rngs)
    self.box_head = FastRCNNConvFCHead(in_channels, pooler_resolution, num_fc=num_fc,
                                       fc_dim=fc_dim, **kw)
    self.box_predictor = FastRCNNOutputLayers(fc_dim, num_classes=num_classes, **kw)

  def pool_boxes(self, features: Mapping[str, Array], boxes: Array, valid: Array) -> Array:
    """ROIAlignV2 features ``[B*R, res, res, C]`` (image-major) of boxes ``[B, R, 4]``.

    ``features``: ``{name: [B, H_l, W_l, C]}`` containing ``in_features``. Boxes not ``valid``
    (``[B, R]``) are pooled as empty boxes (zeros, no cost).
    """
    b, r = boxes.shape[:2]
    flat = jnp.where(valid[..., None], boxes, 0.0).reshape(b * r, 4)
    batch_index = jnp.repeat(jnp.arange(b, dtype=jnp.int32), r)
    return multilevel_roi_align([features[f] for f in self.in_features], flat, batch_index,
                                self.scales, self.pooler_resolution,
                                self.pooler_sampling_ratio, aligned=True,
                                max_image_side=self.max_image_side)

  def box_outputs(self, features: Mapping[str, Array], boxes: Array,
                  valid: Array) -> tuple[Array, Array]:
    """Classifier logits ``[B, R, K+1]`` and class-specific deltas ``[B, R, 4K]`` of boxes
    ``[B, R, 4]`` (``valid`` ``[B, R]``)."""
    b, r = boxes.shape[:2]
    x = self.box_head(self.pool_boxes(features, boxes, valid))
    cls_logits, deltas = self.box_predictor(x)
    return cls_logits.reshape(b, r, -1), deltas.reshape(b, r, -1)

  def inference(self, cls_logits: Array, box_deltas: Array, proposals: Array, proposal_valid: Array,
                image_sizes: Array, *, coordinate_trick: bool = False) -> Detections:
    """:func:`fast_rcnn_inference` with this head's test settings."""
    return fast_rcnn_inference(cls_logits, box_deltas, proposals, proposal_valid, image_sizes,
                               score_thresh=self.score_thresh, nms_thresh=self.nms_thresh,
                               topk_per_image=self.detections_per_image,
                               box_reg_weights=self.box_reg_weights,
                               coordinate_trick=coordinate_trick)

  def __call__(self, features: Mapping[str, Array], proposals: Array, proposal_valid: Array,
               image_sizes: Array) -> Detections:
    """Box inference: ``[B, R, 4]`` proposals (``[B, R]`` valid) -> :class:`Detections`."""
    cls_logits, deltas = self.box_outputs(features, proposals, proposal_valid)
    return self.inference(cls_logits, deltas, proposals, proposal_valid, image_sizes)
