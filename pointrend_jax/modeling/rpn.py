"""Region proposal network (detectron2 ``RPN`` + ``StandardRPNHead``), static shapes.

Spec: ``mask_rcnn_fpn.md`` §5-§6; names and layouts: ``checkpoint_format.md`` §5.3, §6.

Conventions:

* Feature maps are NHWC ``[B, H_l, W_l, C]``, one per level (p2..p6).
* Per-level head outputs are flattened in detectron2's anchor order: logits ``[B, H_l*W_l*A]``
  and deltas ``[B, H_l*W_l*A, 4]`` with flat index ``(y*W_l + x)*A + a`` (the order of
  :func:`pointrend_jax.ops.anchors.fpn_anchors`). In NHWC this is a plain reshape, because the
  logit channel is ``a`` and the delta channel ``a*4 + k`` (component k of anchor a).
* Boxes are ``(x0, y0, x1, y1)`` pixels of the resized, unpadded image; ``image_sizes`` ``[B, 2]``
  int holds each image's unpadded ``(H', W')``.
* Module paths equal detectron2's: the state-dict names are the :class:`RPN` paths after
  ``proposal_generator.`` (``rpn_head.conv.weight``, ``rpn_head.objectness_logits.bias``, ...).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pointrend_jax.modeling.layers import Conv2d, DType
from pointrend_jax.ops import anchors as anchors_lib
from pointrend_jax.ops.boxes import (DEFAULT_SCALE_CLAMP, clip_boxes, decode_boxes,
                                     nonempty_boxes)
from pointrend_jax.ops.nms import nms

Array = jax.Array

__all__ = ["StandardRPNHead", "Proposals", "RPNOutput", "RPN", "find_top_rpn_proposals"]

# detectron2 initialises every RPN conv with Normal(0, 0.01) and zero bias.
_rpn_init = jax.nn.initializers.normal(0.01)


class StandardRPNHead(nnx.Module):
  """detectron2 ``StandardRPNHead``, shared across levels.

  ``conv`` 3x3 pad 1 (+bias) + ReLU, then ``objectness_logits`` 1x1 (A channels) and
  ``anchor_deltas`` 1x1 (A*box_dim channels); ``dtype``, ``param_dtype``, ``precision`` as in
  :class:`~pointrend_jax.modeling.layers.Conv2d`.
  """

  def __init__(self, in_channels: int = 256, num_anchors: int = 3, box_dim: int = 4, *,
               dtype: DType = jnp.float32, param_dtype: DType = jnp.float32,
               precision: jax.lax.PrecisionLike = None, rngs: nnx.Rngs):
    self.num_anchors = num_anchors
    self.box_dim = box_dim
    kw = dict(kernel_init=_rpn_init, dtype=dtype, param_dtype=param_dtype, precision=precision,
              rngs=rngs)
    self.conv = Conv2d(in_channels, in_channels, 3, padding=1, **kw)
    self.objectness_logits = Conv2d(in_channels, num_anchors, 1, **kw)
    self.anchor_deltas = Conv2d(in_channels, num_anchors * box_dim, 1, **kw)

  def __call__(self, features: Sequence[Array]) -> tuple[list[Array], list[Array]]:
    """Per-level ``[B, H_l, W_l, C]`` -> per-level objectness logits ``[B, H_l*W_l*A]`` and
    anchor deltas ``[B, H_l*W_l*A, box_dim]`` in anchor order, float32 whatever the compute
    dtype (they go into top-k, box decoding and the losses)."""
    logits, deltas = [], []
    for x in features:
      t = jax.nn.relu(self.conv(x))
      b = x.shape[0]
      logits.append(self.objectness_logits(t).astype(jnp.float32).reshape(b, -1))
      deltas.append(self.anchor_deltas(t).astype(jnp.float32).reshape(b, -1, self.box_dim))
    return logits, deltas


class Proposals(NamedTuple):
  """Fixed-size RPN proposals of a batch (``P`` = post_nms_topk), sorted by descending logit.

  Attributes:
    boxes: ``[B, P, 4]`` xyxy, clipped to the image; invalid rows are 0.
    logits: ``[B, P]`` raw objectness logits; invalid rows are 0.
    valid: ``[B, P]`` bool, a prefix mask per image.
    levels: ``[B, P]`` int32 index of the RPN level (0 = p2) each proposal came from.
  """
  boxes: Array
  logits: Array
  valid: Array
  levels: Array


class RPNOutput(NamedTuple):
  """RPN results; the raw head outputs are kept for the training losses.

  Attributes:
    proposals: :class:`Proposals` (no gradient).
    logits: per level ``[B, H_l*W_l*A]`` objectness logits.
    deltas: per level ``[B, H_l*W_l*A, 4]`` anchor deltas.
  """
  proposals: Proposals
  logits: list[Array]
  deltas: list[Array]


def _level_candidates(logits: Array, deltas: Array, anchors: np.ndarray, image_sizes: Array,
                      k: int, pad_to: int, weights: Sequence[float], scale_clamp: float,
                      min_box_size: float):
  """Top-k of one level, decoded, clipped and screened, padded to ``pad_to`` rows."""
  logits = logits.astype(jnp.float32)
  top_logits, idx = jax.lax.top_k(logits, k)  # Sorted, as torch.topk(sorted=True).
  top_deltas = jnp.take_along_axis(deltas.astype(jnp.float32), idx[..., None], axis=1)
  top_anchors = jnp.asarray(anchors)[idx]
  boxes = decode_boxes(top_deltas, top_anchors, weights, scale_clamp)
  valid = jnp.all(jnp.isfinite(boxes), axis=-1) & jnp.isfinite(top_logits)
  hw = image_sizes.astype(jnp.float32)
  boxes = clip_boxes(boxes, (hw[:, 0:1], hw[:, 1:2]))
  valid &= nonempty_boxes(boxes, min_box_size)
  pad = pad_to - k
  if pad:
    boxes = jnp.pad(boxes, ((0, 0), (0, pad), (0, 0)))
    top_logits = jnp.pad(top_logits, ((0, 0), (0, pad)))
    valid = jnp.pad(valid, ((0, 0), (0, pad)))
  return boxes, top_logits, valid


def find_top_rpn_proposals(logits: Sequence[Array], deltas: Sequence[Array],
                           anchors: Sequence[np.ndarray | Array], image_sizes: Array, *,
                           pre_nms_topk: int, post_nms_topk: int, nms_thresh: float = 0.7,
                           min_box_size: float = 0.0,
                           box_reg_weights: Sequence[float] = (1.0, 1.0, 1.0, 1.0),
                           scale_clamp: float = DEFAULT_SCALE_CLAMP) -> Proposals:
  """detectron2 ``find_top_rpn_proposals`` with fixed-size outputs (no gradient).

  Per image and level: the ``min(pre_nms_topk, H_l*W_l*A)`` highest logits (sorted); their
  anchors decoded; non-finite boxes/logits dropped; boxes clipped to the image's unpadded size;
  boxes with width or height ``<= min_box_size`` dropped; greedy NMS (IoU ``> nms_thresh``)
  within each level (vmapped over levels and images; the same as detectron2's level-batched NMS
  because levels never suppress each other); then the ``post_nms_topk`` best survivors over all
  levels by logit.

  Args:
    logits: per level ``[B, N_l]`` objectness logits in anchor order.
    deltas: per level ``[B, N_l, 4]`` anchor deltas.
    anchors: per level ``[N_l, 4]`` anchors (numpy constants from ``fpn_anchors``).
    image_sizes: ``[B, 2]`` int unpadded ``(H', W')``.
    pre_nms_topk: per-level candidate count (test 1000, train 2000 in Base-RCNN-FPN).
    post_nms_topk: proposals per image (1000), the static output size ``P``.
    nms_thresh, min_box_size, box_reg_weights: RPN.NMS_THRESH, PROPOSAL_GENERATOR.MIN_SIZE,
      RPN.BBOX_REG_WEIGHTS.
    scale_clamp: clamp of ``dw, dh`` before ``exp``.

  Returns:
    :class:`Proposals` with ``P = post_nms_topk``. If fewer than ``P`` boxes survive, the rest
    are invalid (detectron2 returns fewer rows).
  """
  image_sizes = jnp.asarray(image_sizes)
  ks = [min(int(pre_nms_topk), int(l.shape[1])) for l in logits]
  width = max(ks)
  per_level = [
      _level_candidates(l, d, np.asarray(a), image_sizes, k, width, box_reg_weights, scale_clamp,
                        min_box_size)
      for l, d, a, k in zip(logits, deltas, anchors, ks)
  ]
  boxes = jnp.stack([p[0] for p in per_level])  # [L, B, width, 4]
  scores = jnp.stack([p[1] for p in per_level])  # [L, B, width]
  valid = jnp.stack([p[2] for p in per_level])
  boxes, scores = jax.lax.stop_gradient((boxes, scores))

  # A level can contribute at most post_nms_topk proposals, so NMS may stop there.
  keep_per_level = min(width, int(post_nms_topk))
  level_nms = lambda b, s, v: nms(b, s, nms_thresh, keep_per_level, v)
  keep, keep_valid = jax.vmap(jax.vmap(level_nms))(boxes, scores, valid)  # [L, B, M]

  num_levels = len(logits)
  take = lambda a: jnp.take_along_axis(a, keep.reshape(keep.shape + (1,) * (a.ndim - 3)), axis=2)
  # [L, B, M, ...] -> [B, L*M, ...], levels in order so ties keep p2 first.
  merge = lambda a: jnp.moveaxis(a, 0, 1).reshape((a.shape[1], -1) + a.shape[3:])
  cand_boxes = merge(take(boxes))
  cand_scores = merge(take(scores))
  cand_valid = merge(keep_valid)
  cand_levels = merge(jnp.broadcast_to(jnp.arange(num_levels, dtype=jnp.int32)[:, None, None],
                                       keep.shape))

  p = int(post_nms_topk)
  if cand_scores.shape[1] < p:  # Tiny inputs: fewer candidates than output slots.
    extra = p - cand_scores.shape[1]
    cand_boxes = jnp.pad(cand_boxes, ((0, 0), (0, extra), (0, 0)))
    cand_scores, cand_valid, cand_levels = (
        jnp.pad(a, ((0, 0), (0, extra))) for a in (cand_scores, cand_valid, cand_levels))
  # Valid candidates first by descending logit (stable: equal logits keep level/NMS order).
  key = jnp.where(cand_valid, -cand_scores, jnp.inf)
  _, order = jax.lax.sort((key, jnp.broadcast_to(jnp.arange(key.shape[1]), key.shape)),
                          dimension=1, num_keys=1, is_stable=True)
  order = order[:, :p]
  gather = lambda a: jnp.take_along_axis(a, order.reshape(order.shape + (1,) * (a.ndim - 2)),
                                         axis=1)
  out_valid = gather(cand_valid)
  return Proposals(boxes=jnp.where(out_valid[..., None], gather(cand_boxes), 0.0),
                   logits=jnp.where(out_valid, gather(cand_scores), 0.0), valid=out_valid,
                   levels=jnp.where(out_valid, gather(cand_levels), 0))


class RPN(nnx.Module):
  """detectron2 ``RPN`` (inference path; the raw outputs are returned for training losses).

  Args:
    in_channels: FPN width.
    strides, sizes, aspect_ratios, offset: ``DefaultAnchorGenerator`` (Base-RCNN-FPN values).
    pre_nms_topk, post_nms_topk: ``(train, test)`` pairs (Base-RCNN-FPN: (2000, 1000), (1000,
      1000)).
    nms_thresh, min_box_size, box_reg_weights: RPN.NMS_THRESH, PROPOSAL_GENERATOR.MIN_SIZE,
      RPN.BBOX_REG_WEIGHTS.
    in_features: feature names read from the feature dict, finest first.
    dtype, param_dtype, precision: of the head's convs (its outputs are float32 either way).
    rngs: initializer RNGs (Normal(0, 0.01), zero bias).
  """

  def __init__(self, in_channels: int = 256, *,
               in_features: Sequence[str] = ("p2", "p3", "p4", "p5", "p6"),
               strides: Sequence[int] = anchors_lib.DEFAULT_STRIDES,
               sizes: Sequence[Sequence[float]] = anchors_lib.DEFAULT_SIZES,
               aspect_ratios: Sequence[float] = anchors_lib.DEFAULT_ASPECT_RATIOS,
               offset: float = 0.0, pre_nms_topk: tuple[int, int] = (2000, 1000),
               post_nms_topk: tuple[int, int] = (1000, 1000), nms_thresh: float = 0.7,
               min_box_size: float = 0.0, box_reg_weights: Sequence[float] = (1.0, 1.0, 1.0, 1.0),
               dtype: DType = jnp.float32, param_dtype: DType = jnp.float32,
               precision: jax.lax.PrecisionLike = None, rngs: nnx.Rngs):
    if len(in_features) != len(strides):
      raise ValueError(f"{len(in_features)} RPN features but {len(strides)} strides")
    self.in_features = tuple(in_features)
    self.strides = tuple(int(s) for s in strides)
    self.sizes = tuple(tuple(s) for s in sizes)
    self.aspect_ratios = tuple(aspect_ratios)
    self.offset = float(offset)
    self.pre_nms_topk = tuple(int(k) for k in pre_nms_topk)
    self.post_nms_topk = tuple(int(k) for k in post_nms_topk)
    self.nms_thresh = float(nms_thresh)
    self.min_box_size = float(min_box_size)
    self.box_reg_weights = tuple(float(w) for w in box_reg_weights)
    num_anchors = len(self.aspect_ratios) * len(self.sizes[0])
    self.rpn_head = StandardRPNHead(in_channels, num_anchors, dtype=dtype,
                                    param_dtype=param_dtype, precision=precision, rngs=rngs)

  def anchors(self, padded_hw: tuple[int, int]) -> list[np.ndarray]:
    """Per-level anchors ``[H_l*W_l*A, 4]`` (numpy) for a padded input size ``(Hp, Wp)``."""
    return anchors_lib.fpn_anchors(padded_hw, self.strides, self.sizes, self.aspect_ratios,
                                   self.offset)

  def __call__(self, features: Mapping[str, Array], image_sizes: Array, *,
               training: bool = False) -> RPNOutput:
    """Head outputs and proposals.

    Args:
      features: ``{name: [B, H_l, W_l, C]}`` containing ``in_features``; the padded input size
        is ``stride_0 * (H_0, W_0)`` of the finest level.
      image_sizes: ``[B, 2]`` int unpadded ``(H', W')`` of each image.
      training: selects the train or test ``pre_nms_topk`` / ``post_nms_topk`` (static).

    Returns:
      :class:`RPNOutput`; proposals have ``post_nms_topk`` rows per image.
    """
    feats = [features[f] for f in self.in_features]
    logits, deltas = self.rpn_head(feats)
    h0, w0 = feats[0].shape[1:3]
    padded_hw = (h0 * self.strides[0], w0 * self.strides[0])
    anchors = self.anchors(padded_hw)
    for a, l, f in zip(anchors, logits, self.in_features):
      if a.shape[0] != l.shape[1]:
        raise ValueError(f"{f}: {l.shape[1]} head outputs but {a.shape[0]} anchors for padded "
                         f"input {padded_hw}")
    mode = 0 if training else 1
    proposals = find_top_rpn_proposals(
        logits, deltas, anchors, image_sizes,
        pre_nms_topk=self.pre_nms_topk[mode], post_nms_topk=self.post_nms_topk[mode],
        nms_thresh=self.nms_thresh, min_box_size=self.min_box_size,
        box_reg_weights=self.box_reg_weights)
    return RPNOutput(proposals, logits, deltas)
