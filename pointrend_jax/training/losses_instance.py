"""Instance PointRend training losses (detectron2 ``GeneralizedRCNN`` + ``PointRendMaskHead``).

Spec: ``mask_rcnn_fpn.md`` §6.4 (RPN), §9 (ROI sampling, TRAIN_ON_PRED_BOXES), §10 (ROI losses),
§15.3 (per-GPU normalisation); ``pointrend.md`` §2.2, §3.5, §8.

The six detectron2 losses ``loss_rpn_cls, loss_rpn_loc, loss_cls, loss_box_reg, loss_mask,
loss_mask_point`` (all weight 1) plus the logged-only ``point/accuracy``, computed for the
images given (in training: one virtual replica = one detectron2 GPU, see
:mod:`pointrend_jax.training.train`). Every shape is static:

* RPN: every anchor of every image is labelled; the 256 sampled anchors are masks over all of
  them (:func:`~pointrend_jax.ops.sampler.sample_mask`).
* ROI heads: candidates are ``P`` proposal slots + ``M`` GT slots per image (invalid slots are
  label -1, never sampled); ``S = batch_size_per_image`` sampled slots per image, foreground
  first, with a validity mask (:class:`ROISamples`).
* Mask branch: the first ``F = int(S * positive_fraction)`` slots of each image (128 for
  detectron2's 512 x 0.25), the only place foreground ROIs can be, with validity = foreground.
* Means over a data-dependent number of elements divide by ``max(count, 1)`` of the *valid*
  elements, so images or replicas without instances give finite losses (detectron2's empty
  cases give ``0 * sum(pred)``, also 0).

GT masks are the batch's full-canvas bitmasks, bit-packed along W
(:mod:`pointrend_jax.data.batching`); nothing unpacks whole mask stacks:

* The 7x7 coarse target is ROIAlign (adaptive, aligned, scale 1) of the matched GT's bitmask
  over the (regressed) box, ``>= 0.5``. It uses the separable weights of
  :func:`~pointrend_jax.ops.roi_align.roi_align_separable` with the **unpadded** image size as
  the map size of each ROI (torchvision clamps samples in ``(h-1, h]`` to row ``h-1`` of
  detectron2's image-sized mask; the canvas would interpolate with its zero padding instead),
  unpacking one ROI's mask at a time.
* Point labels read the 4 bilinear taps of each point straight from the packed bytes, with
  ``grid_sample`` arithmetic on the unpadded size (taps outside the image read 0).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from pointrend_jax.ops import roi_align as roi_align_lib
from pointrend_jax.ops.boxes import decode_boxes, encode_boxes, nonempty_boxes, pairwise_iou
from pointrend_jax.ops.matcher import match
from pointrend_jax.ops.sampler import sample_mask, subsample_labels

if TYPE_CHECKING:
  from pointrend_jax.modeling.meta_arch import PointRendRCNN

__all__ = ["LOSS_NAMES", "INSTANCE_BATCH_KEYS", "ROISamples", "bce_with_logits", "rpn_losses",
           "sample_proposals", "roi_box_losses", "predict_boxes_for_gt_classes",
           "crop_and_resize_packed_masks", "point_labels_from_packed_masks", "mask_losses",
           "instance_losses", "instance_loss_fn"]

Array = jax.Array

LOSS_NAMES = ("loss_rpn_cls", "loss_rpn_loc", "loss_cls", "loss_box_reg", "loss_mask",
              "loss_mask_point")
# What an instance train step needs from a Batch (``gt_masks`` instead of the packed form works
# too, see :func:`instance_losses`).
INSTANCE_BATCH_KEYS = ("image", "image_size", "gt_boxes", "gt_classes", "gt_valid",
                       "gt_masks_packed")


# --- Elementwise pieces ---


def bce_with_logits(logits: Array, targets: Array) -> Array:
  """Elementwise ``F.binary_cross_entropy_with_logits`` (soft targets allowed), float32.

  ``max(x, 0) - x z + log1p(exp(-|x|))``, PyTorch's stable form.
  """
  x = logits.astype(jnp.float32)
  z = targets.astype(jnp.float32)
  return jnp.maximum(x, 0.0) - x * z + jnp.log1p(jnp.exp(-jnp.abs(x)))


def _box_regression_loss(pred: Array, target: Array, beta: float) -> Array:
  """detectron2 ``smooth_l1_loss`` summed over the last axis; ``beta < 1e-5`` is plain L1."""
  diff = pred.astype(jnp.float32) - target
  if beta < 1e-5:
    loss = jnp.abs(diff)
  else:
    ad = jnp.abs(diff)
    loss = jnp.where(ad < beta, 0.5 * diff * diff / beta, ad - 0.5 * beta)
  return jnp.sum(loss, axis=-1)


def _usable_gt(gt_boxes: Array, gt_valid: Array) -> Array:
  """Valid GTs with positive width and height.

  An empty GT box has IoU 0 with everything, and a valid GT whose best IoU is 0 would make the
  RPN matcher's low-quality rule turn *every* anchor positive (detectron2 behaves the same; its
  mapper drops such boxes first, as our pipeline does). Masking them here keeps a stray one
  from poisoning a step.
  """
  return jnp.asarray(gt_valid, bool) & nonempty_boxes(jnp.asarray(gt_boxes, jnp.float32))


# --- RPN ---


def _concat_levels(x: Sequence[Array] | Array, axis: int) -> Array:
  if isinstance(x, (list, tuple)):
    return jnp.concatenate([jnp.asarray(v) for v in x], axis=axis)
  return jnp.asarray(x)


def rpn_losses(key: Array, anchors: Sequence[np.ndarray | Array] | Array,
               pred_logits: Sequence[Array] | Array, pred_deltas: Sequence[Array] | Array,
               gt_boxes: Array, gt_valid: Array, *, batch_size_per_image: int = 256,
               positive_fraction: float = 0.5, iou_thresholds: Sequence[float] = (0.3, 0.7),
               iou_labels: Sequence[int] = (0, -1, 1),
               box_reg_weights: Sequence[float] = (1.0, 1.0, 1.0, 1.0), smooth_l1_beta: float = 0.0,
               loss_weight: float = 1.0, bbox_reg_loss_weight: float = 1.0) -> dict[str, Array]:
  """detectron2 ``RPN.losses`` after ``label_and_sample_anchors`` (spec §6.4).

  Per image: IoU of the usable GTs (valid, non-empty, overlapping some anchor) with every
  anchor; matcher ``iou_thresholds``/``iou_labels`` with low-quality matches;
  ``batch_size_per_image`` anchors sampled at ``positive_fraction`` (uniformly, ``key`` split
  per image). No GT: all negatives.
  RPN.BOUNDARY_THRESH = -1 (no anchor is dropped) is the only supported setting.

  Args:
    key: PRNG key of the anchor sampling.
    anchors: per level ``[N_l, 4]`` (or concatenated ``[A, 4]``) in anchor order.
    pred_logits: per level ``[B, N_l]`` (or ``[B, A]``) objectness logits.
    pred_deltas: per level ``[B, N_l, 4]`` (or ``[B, A, 4]``) anchor deltas.
    gt_boxes: ``[B, M, 4]`` GT boxes (resized-image pixels).
    gt_valid: ``[B, M]`` bool.
    batch_size_per_image .. bbox_reg_loss_weight: ``RPN.*`` of the same names
      (``box_reg_weights``: BBOX_REG_WEIGHTS; ``smooth_l1_beta`` 0: L1; ``loss_weight`` scales
      both terms, ``bbox_reg_loss_weight`` the loc term).

  Returns:
    ``loss_rpn_cls`` (sum of BCE over sampled anchors) and ``loss_rpn_loc`` (sum over positives
    of the 4-component L1), both divided by ``batch_size_per_image * B``.
  """
  anchors = jax.lax.stop_gradient(_concat_levels(anchors, 0).astype(jnp.float32))
  logits = _concat_levels(pred_logits, 1)
  deltas = _concat_levels(pred_deltas, 1)
  gt_boxes = jnp.asarray(gt_boxes, jnp.float32)
  usable = _usable_gt(gt_boxes, gt_valid)
  b = logits.shape[0]

  def one_image(k, boxes, valid):
    iou = pairwise_iou(boxes, anchors)
    # A GT overlapping no anchor at all (only possible for boxes outside the padded image) would
    # turn every anchor positive through the low-quality rule; it cannot match anything anyway.
    valid = valid & (jnp.max(iou, axis=1) > 0)
    matched, labels = match(iou, valid, iou_thresholds, iou_labels,
                            allow_low_quality_matches=True)
    pos, neg = sample_mask(k, labels.astype(jnp.int32), batch_size_per_image, positive_fraction,
                           0)
    target = encode_boxes(anchors, boxes[matched], box_reg_weights)
    # Non-positive anchors may be matched to a padding (zero) box: log(0) there. Zero it so that
    # no inf/NaN reaches the (masked) loss terms or their gradients.
    target = jnp.where(pos[:, None], target, 0.0)
    return pos, neg, target

  pos, neg, target = jax.vmap(one_image)(jax.random.split(key, b), gt_boxes, usable)
  pos, neg, target = jax.lax.stop_gradient((pos, neg, target))
  cls = bce_with_logits(logits, pos.astype(jnp.float32))
  loss_cls = jnp.sum(jnp.where(pos | neg, cls, 0.0))
  loc = _box_regression_loss(deltas, target, float(smooth_l1_beta))
  loss_loc = jnp.sum(jnp.where(pos, loc, 0.0))
  normalizer = float(batch_size_per_image * b)
  return {
      "loss_rpn_cls": loss_cls / normalizer * loss_weight,
      "loss_rpn_loc": loss_loc / normalizer * loss_weight * bbox_reg_loss_weight,
  }


# --- ROI heads: matching, sampling, box losses ---


class ROISamples(NamedTuple):
  """Sampled ROIs per image, ``S`` fixed slots, foreground slots first (spec §9).

  Attributes:
    index: ``[B, S]`` int32 candidate of each slot: ``[0, P)`` proposals, ``[P, P+M)`` the
      appended GT slots (0 in invalid slots).
    boxes: ``[B, S, 4]`` proposal boxes (0 in invalid slots).
    classes: ``[B, S]`` int32 GT class, ``K`` = background (also in invalid slots).
    gt_index: ``[B, S]`` int32 matched GT slot in ``[0, M)`` (meaningful for foreground).
    gt_boxes: ``[B, S, 4]`` the matched GT box.
    valid: ``[B, S]`` bool, sampled slots (a prefix: ``n_fg`` foreground, then ``n_bg``).
    is_fg: ``[B, S]`` bool, foreground slots (a prefix of ``valid``).
  """
  index: Array
  boxes: Array
  classes: Array
  gt_index: Array
  gt_boxes: Array
  valid: Array
  is_fg: Array


def sample_proposals(key: Array, proposal_boxes: Array, proposal_valid: Array, gt_boxes: Array,
                     gt_classes: Array, gt_valid: Array, *, num_classes: int,
                     batch_size_per_image: int = 512, positive_fraction: float = 0.25,
                     iou_thresholds: Sequence[float] = (0.5,), iou_labels: Sequence[int] = (0, 1),
                     append_gt: bool = True) -> ROISamples:
  """detectron2 ``label_and_sample_proposals`` with fixed slots.

  Per image: (``append_gt``) the GT boxes become extra candidates after the proposals; IoU of
  usable GTs x candidates; matcher without low-quality matches: label 1 -> class of the argmax
  GT, 0 -> background ``K``, -1 -> ignored; invalid proposal and GT slots are ignored. Then
  ``subsample_labels`` (``n_fg = min(#fg, int(S * positive_fraction))``, ``n_bg = min(#bg,
  S - n_fg)``), foreground first.

  Args:
    key: PRNG key (split per image).
    proposal_boxes: ``[B, P, 4]`` RPN proposals (no gradient).
    proposal_valid: ``[B, P]`` bool.
    gt_boxes, gt_classes, gt_valid: ``[B, M, 4]``, ``[B, M]`` (``0..K-1``), ``[B, M]``.
    num_classes: ``K``.
    batch_size_per_image, positive_fraction: ROI_HEADS.BATCH_SIZE_PER_IMAGE (static ``S``) and
      POSITIVE_FRACTION.
    iou_thresholds, iou_labels, append_gt: ROI_HEADS.IOU_THRESHOLDS, IOU_LABELS,
      PROPOSAL_APPEND_GT.

  Returns:
    :class:`ROISamples` (no gradient).
  """
  proposal_boxes = jax.lax.stop_gradient(jnp.asarray(proposal_boxes, jnp.float32))
  proposal_valid = jnp.asarray(proposal_valid, bool)
  gt_boxes = jnp.asarray(gt_boxes, jnp.float32)
  gt_classes = jnp.asarray(gt_classes).astype(jnp.int32)
  usable = _usable_gt(gt_boxes, gt_valid)
  if append_gt:
    cand_boxes = jnp.concatenate([proposal_boxes, gt_boxes], axis=1)
    cand_valid = jnp.concatenate([proposal_valid, usable], axis=1)
  else:
    cand_boxes, cand_valid = proposal_boxes, proposal_valid
  b = cand_boxes.shape[0]
  k = int(num_classes)

  def one_image(key, boxes, valid, gts, classes, gt_ok):
    matched, labels = match(pairwise_iou(gts, boxes), gt_ok, iou_thresholds, iou_labels)
    labels = labels.astype(jnp.int32)
    cls = jnp.where(labels == 1, classes[matched], jnp.where(labels == 0, k, -1))
    cls = jnp.where(valid, cls, -1)
    index, is_fg, ok = subsample_labels(key, cls, batch_size_per_image, positive_fraction, k)
    return ROISamples(index=index, boxes=jnp.where(ok[:, None], boxes[index], 0.0),
                      classes=jnp.where(ok, cls[index], k), gt_index=matched[index],
                      gt_boxes=gts[matched[index]], valid=ok, is_fg=is_fg)

  keys = jax.random.split(key, b)
  out = jax.vmap(one_image)(keys, cand_boxes, cand_valid, gt_boxes, gt_classes, usable)
  return jax.tree.map(jax.lax.stop_gradient, out)


def roi_box_losses(cls_logits: Array, box_deltas: Array, samples: ROISamples, *,
                   box_reg_weights: Sequence[float] = (10.0, 10.0, 5.0, 5.0),
                   smooth_l1_beta: float = 0.0,
                   bbox_reg_loss_weight: float = 1.0) -> dict[str, Array]:
  """detectron2 ``FastRCNNOutputLayers.losses`` on the sampled slots (spec §10).

  Args:
    cls_logits: ``[B, S, K+1]`` classifier logits (background last).
    box_deltas: ``[B, S, 4K]`` class-specific deltas.
    samples: the :class:`ROISamples` the logits were computed for.
    box_reg_weights, smooth_l1_beta, bbox_reg_loss_weight: ``ROI_BOX_HEAD.*`` (BBOX_REG_WEIGHTS).

  Returns:
    ``loss_cls`` (softmax CE, mean over the sampled ROIs of all images) and ``loss_box_reg``
    (L1 of the GT class's deltas summed over fg ROIs and components, divided by the number of
    sampled ROIs); both 0 without sampled ROIs.
  """
  logits = cls_logits.astype(jnp.float32)
  k = logits.shape[-1] - 1
  valid, fg = samples.valid, samples.is_fg
  count = jnp.maximum(jnp.sum(valid).astype(jnp.float32), 1.0)
  logp = jax.nn.log_softmax(logits, axis=-1)
  nll = -jnp.take_along_axis(logp, samples.classes[..., None], axis=-1)[..., 0]
  loss_cls = jnp.sum(jnp.where(valid, nll, 0.0)) / count

  b, s = samples.classes.shape
  per_class = box_deltas.reshape(b, s, k, 4)
  cls = jnp.clip(samples.classes, 0, k - 1)
  pred = jnp.take_along_axis(per_class, cls[..., None, None], axis=2)[:, :, 0]
  # Background / invalid slots may hold empty boxes: give them a unit box so the (unused)
  # target stays finite.
  unit = jnp.array([0.0, 0.0, 1.0, 1.0], jnp.float32)
  src = jnp.where(fg[..., None], samples.boxes, unit)
  dst = jnp.where(fg[..., None], samples.gt_boxes, unit)
  target = jax.lax.stop_gradient(encode_boxes(src, dst, box_reg_weights))
  reg = _box_regression_loss(pred, target, float(smooth_l1_beta))
  loss_box_reg = jnp.sum(jnp.where(fg, reg, 0.0)) / count * bbox_reg_loss_weight
  return {"loss_cls": loss_cls, "loss_box_reg": loss_box_reg}


def predict_boxes_for_gt_classes(box_deltas: Array, samples: ROISamples,
    box_reg_weights: Sequence[float] = (10.0, 10.0, 5.0, 5.0)) -> Array:
  """TRAIN_ON_PRED_BOXES: each slot's box decoded with the deltas of its GT class.

  ``FastRCNNOutputLayers.predict_boxes_for_gt_classes``: class ``clamp(gt_class, 0, K-1)``
  (background uses ``K-1``), ``scale_clamp`` as usual, **no clipping**, no gradient.

  Returns:
    ``[B, S, 4]``.
  """
  deltas = jax.lax.stop_gradient(box_deltas).astype(jnp.float32)
  b, s = samples.classes.shape
  k = deltas.shape[-1] // 4
  cls = jnp.clip(samples.classes, 0, k - 1)
  picked = jnp.take_along_axis(deltas.reshape(b, s, k, 4), cls[..., None, None], axis=2)[:, :, 0]
  return decode_boxes(picked, samples.boxes, box_reg_weights)


# --- Mask targets from bit-packed GT masks ---

# The exact float32 per-sample ROIAlign arithmetic of ops.roi_align, reused through its private
# helpers: its public separable op has one static map size for all ROIs, while the mask target
# needs each ROI's own (unpadded) image size.
# pylint: disable=protected-access
_Axis = roi_align_lib._Axis
_axis_grid = roi_align_lib._axis_grid
_bin_base = roi_align_lib._bin_base
_row_weights = roi_align_lib._row_weights
_div = roi_align_lib._div
# pylint: enable=protected-access


def _mask_row_weights(lo: Array, hi: Array, valid_size: Array, canvas: int,
                      pooled: int) -> tuple[Array, Array]:
  """Separable ROIAlign weights ``[R, pooled, canvas]`` and grids ``[R]`` along one axis.

  The map size of ROI ``r`` is ``valid_size[r]`` (its unpadded image side), so torchvision's
  clamping happens at the image border; canvas rows past it get weight 0.
  """
  r = lo.shape[0]
  scale = jnp.ones((r,), jnp.float32)
  start, bin_size, grid = _axis_grid(lo, hi, scale, pooled, 0, True)
  zeros = jnp.zeros((r, pooled), jnp.int32)
  axis = _Axis(start, bin_size, grid, valid_size.astype(jnp.int32), zeros, zeros)
  base = _bin_base(start, bin_size, pooled)
  rows = jnp.broadcast_to(jnp.arange(canvas, dtype=jnp.int32), (r, pooled, canvas))
  return _row_weights(axis, base, rows, 0), grid


def _flat_mask_index(batch_index: Array, gt_index: Array, num_gt: int) -> Array:
  return batch_index.astype(jnp.int32) * num_gt + gt_index.astype(jnp.int32)


def crop_and_resize_packed_masks(gt_masks_packed: Array, image_size: Array, batch_index: Array,
                                 gt_index: Array, boxes: Array, output_size: int = 7, *,
                                 chunk_size: int = 8) -> Array:
  """``BitMasks.crop_and_resize`` before its ``>= 0.5``: ROIAlign of each ROI's GT bitmask.

  torchvision ``roi_align(mask, box, output_size, 1, 0, aligned=True)`` on the ``h x w``
  (unpadded) bitmask, exact for any box (see the module docstring); ``chunk_size`` ROIs are
  unpacked at a time.

  Args:
    gt_masks_packed: ``[B, M, Hb, Wb // 8]`` uint8 bitmasks (big-endian bits along W), zero
      outside each image.
    image_size: ``[B, 2]`` int unpadded ``(h, w)``.
    batch_index: ``[R]`` int image of each ROI.
    gt_index: ``[R]`` int GT slot of each ROI.
    boxes: ``[R, 4]`` xyxy image pixels (no gradient).
    output_size: side of the target (7).
    chunk_size: ROIs unpacked and multiplied together.

  Returns:
    ``[R, output_size, output_size]`` float32 in ``[0, 1]``.
  """
  packed = jnp.asarray(gt_masks_packed)
  b, m, hb, wbytes = packed.shape
  wb = wbytes * 8
  r = boxes.shape[0]
  p = int(output_size)
  if r == 0:
    return jnp.zeros((0, p, p), jnp.float32)
  boxes = jax.lax.stop_gradient(jnp.asarray(boxes, jnp.float32))
  batch_index = jnp.clip(jnp.asarray(batch_index).astype(jnp.int32), 0, b - 1)
  size = jnp.asarray(image_size).astype(jnp.int32)[batch_index]
  wy, gh = _mask_row_weights(boxes[:, 1], boxes[:, 3], size[:, 0], hb, p)
  wx, gw = _mask_row_weights(boxes[:, 0], boxes[:, 2], size[:, 1], wb, p)
  divisor = jnp.maximum(gh * gw, 1).astype(jnp.float32)
  flat = packed.reshape(b * m, hb, wbytes)
  idx = jnp.clip(_flat_mask_index(batch_index, jnp.asarray(gt_index), m), 0, b * m - 1)
  highest = jax.lax.Precision.HIGHEST

  def one_roi(args):
    i, a_y, a_x = args
    mask = jnp.unpackbits(flat[i], axis=-1).astype(jnp.float32)  # [Hb, Wb]
    rows = jnp.matmul(a_y, mask, precision=highest)  # [p, Wb]
    return jnp.matmul(rows, a_x.T, precision=highest)  # [p, p]

  out = jax.lax.map(one_roi, (idx, wy, wx), batch_size=max(1, min(int(chunk_size), r)))
  return _div(out, divisor[:, None, None])


def point_labels_from_packed_masks(gt_masks_packed: Array, image_size: Array, batch_index: Array,
                                   gt_index: Array, points_in_image: Array) -> Array:
  """detectron2 ``sample_point_labels``: bilinear ``point_sample`` of the float GT bitmask.

  Point ``(X, Y)`` (image pixels) is normalised by the unpadded size ``(w, h)`` and sampled with
  ``grid_sample(align_corners=False, zeros)`` arithmetic on the ``h x w`` mask: position
  ``X - 0.5, Y - 0.5``, taps outside ``[0, w-1] x [0, h-1]`` read 0. The 4 taps are read from
  the packed bytes directly.

  Args:
    gt_masks_packed: ``[B, M, Hb, Wb // 8]`` uint8.
    image_size: ``[B, 2]`` int unpadded ``(h, w)``.
    batch_index, gt_index: ``[R]`` int image and GT slot of each ROI.
    points_in_image: ``[R, P, 2]`` ``(X, Y)`` image pixels.

  Returns:
    ``[R, P]`` float32 soft labels in ``[0, 1]`` (no gradient).
  """
  packed = jnp.asarray(gt_masks_packed)
  b, m, hb, wbytes = packed.shape
  batch_index = jnp.clip(jnp.asarray(batch_index).astype(jnp.int32), 0, b - 1)
  size = jnp.asarray(image_size).astype(jnp.int32)[batch_index]
  h = size[:, 0, None]
  w = size[:, 1, None]
  hf = h.astype(jnp.float32)
  wf = w.astype(jnp.float32)
  pts = jax.lax.stop_gradient(jnp.asarray(points_in_image, jnp.float32))
  # detectron2 divides by (w, h), then grid_sample unnormalises ((g + 1) * size/2 - 0.5 on CPU);
  # same float32 steps as ops.point_sample, with a per-ROI size.
  gx = 2.0 * (pts[..., 0] / wf) - 1.0
  gy = 2.0 * (pts[..., 1] / hf) - 1.0
  px = jnp.clip((gx + 1.0) * (wf / 2.0) - 0.5, -2.0, wf + 1.0)
  py = jnp.clip((gy + 1.0) * (hf / 2.0) - 0.5, -2.0, hf + 1.0)
  x0f = jnp.floor(px)
  y0f = jnp.floor(py)
  wx1 = px - x0f
  wx0 = 1.0 - wx1
  wy1 = py - y0f
  wy0 = 1.0 - wy1
  x0 = x0f.astype(jnp.int32)
  y0 = y0f.astype(jnp.int32)
  flat = packed.reshape(-1)
  base = _flat_mask_index(batch_index, jnp.clip(jnp.asarray(gt_index), 0, m - 1), m)
  base = (base * (hb * wbytes))[:, None]

  def tap(ix, iy):
    inside = (ix >= 0) & (ix < w) & (iy >= 0) & (iy < h)
    cx = jnp.clip(ix, 0, wbytes * 8 - 1)
    cy = jnp.clip(iy, 0, hb - 1)
    byte = flat[base + cy * wbytes + (cx >> 3)].astype(jnp.int32)
    bit = (byte >> (7 - (cx & 7))) & 1
    return inside & (bit == 1)

  out = None
  for dy, dx, weight in ((0, 0, wy0 * wx0), (0, 1, wy0 * wx1), (1, 0, wy1 * wx0),
                         (1, 1, wy1 * wx1)):
    term = jnp.where(tap(x0 + dx, y0 + dy), weight, 0.0)
    out = term if out is None else out + term
  return out


# --- Mask losses ---


def mask_losses(coarse_logits: Array, point_logits: Array, mask_targets: Array,
                point_labels: Array, valid: Array) -> dict[str, Array]:
  """``loss_mask`` (coarse, ``mask_rcnn_loss``), ``loss_mask_point``, ``point/accuracy``.

  Args:
    coarse_logits: ``[R, S, S]`` coarse logits of each ROI's GT class (channel 0 if
      class-agnostic).
    point_logits: ``[R, P]`` point logits of the GT class.
    mask_targets: ``[R, S, S]`` bool/{0,1} coarse targets (ROIAlign ``>= 0.5``).
    point_labels: ``[R, P]`` soft point labels in ``[0, 1]``.
    valid: ``[R]`` bool, foreground ROI slots.

  Returns:
    BCE means over the valid ``R*S*S`` / ``R*P`` elements (0 if none), and the fraction of
    valid points with ``(logit > 0) == uint8(label)`` (logging only, no gradient).
  """
  valid = jnp.asarray(valid, bool)
  n = jnp.sum(valid).astype(jnp.float32)
  s2 = coarse_logits.shape[1] * coarse_logits.shape[2]
  p = point_logits.shape[1]
  coarse = bce_with_logits(coarse_logits, mask_targets)
  loss_mask = jnp.sum(jnp.where(valid[:, None, None], coarse, 0.0)) / jnp.maximum(n * s2, 1.0)
  labels = jax.lax.stop_gradient(point_labels.astype(jnp.float32))
  point = bce_with_logits(point_logits, labels)
  loss_point = jnp.sum(jnp.where(valid[:, None], point, 0.0)) / jnp.maximum(n * p, 1.0)
  # uint8(label) truncates: only labels >= 1 count as 1 (detectron2's logged accuracy).
  correct = (jax.lax.stop_gradient(point_logits) > 0) == (labels >= 1.0)
  accuracy = jnp.sum(valid[:, None] & correct) / jnp.maximum(n * p, 1.0)
  return {"loss_mask": loss_mask, "loss_mask_point": loss_point,
          "point/accuracy": accuracy.astype(jnp.float32)}


# --- The whole model ---


def _packed_masks(batch: Mapping[str, Array]) -> Array:
  if "gt_masks_packed" in batch:
    return jnp.asarray(batch["gt_masks_packed"])
  if "gt_masks" in batch:
    return jnp.packbits(jnp.asarray(batch["gt_masks"]) != 0, axis=-1)
  raise KeyError("instance training needs gt_masks_packed (or gt_masks) in the batch")


def instance_losses(model: PointRendRCNN, batch: Mapping[str, Array],
                    key: Array) -> dict[str, Array]:
  """All instance PointRend training losses of one (virtual-replica) batch.

  The training forward of detectron2's ``GeneralizedRCNN`` with ``StandardROIHeads`` and
  ``PointRendMaskHead``: backbone -> RPN (train top-k) -> RPN losses; proposals (no gradient)
  + GT -> sampled ROIs -> box head -> box losses; TRAIN_ON_PRED_BOXES boxes of the foreground
  slots -> PointRend mask head -> coarse and point losses.

  Args:
    model: a :class:`~pointrend_jax.modeling.meta_arch.PointRendRCNN` (reads ``model.cfg``).
    batch: ``image [B, H, W, 3]`` uint8 RGB, ``image_size [B, 2]``, ``gt_boxes [B, M, 4]``,
      ``gt_classes [B, M]``, ``gt_valid [B, M]``, ``gt_masks_packed [B, M, H, W/8]`` (or dense
      ``gt_masks [B, M, H, W]``); ``H, W`` multiples of 32.
    key: PRNG key (anchor sampling, ROI sampling, point sampling).

  Returns:
    ``{name: scalar}`` for :data:`LOSS_NAMES` and ``point/accuracy``.
  """
  cfg = model.cfg
  images = jnp.asarray(batch["image"])
  sizes = jnp.asarray(batch["image_size"]).astype(jnp.int32)
  gt_boxes = jnp.asarray(batch["gt_boxes"], jnp.float32)
  gt_classes = jnp.asarray(batch["gt_classes"]).astype(jnp.int32)
  gt_valid = jnp.asarray(batch["gt_valid"]).astype(bool)
  packed = _packed_masks(batch)
  k_rpn, k_roi, k_point = jax.random.split(key, 3)

  x = model.preprocess(images, sizes)
  _, feats = model.features(x)

  # RPN.
  rpn = model.proposal_generator
  rpn_out = rpn(feats, sizes, training=True)
  h0, w0 = feats[rpn.in_features[0]].shape[1:3]
  anchors = rpn.anchors((h0 * rpn.strides[0], w0 * rpn.strides[0]))
  rc = cfg.rpn
  if rc.boundary_thresh >= 0:
    raise NotImplementedError("RPN.BOUNDARY_THRESH >= 0 (dropping straddling anchors)")
  losses = rpn_losses(
      k_rpn, anchors, rpn_out.logits, rpn_out.deltas, gt_boxes, gt_valid,
      batch_size_per_image=rc.batch_size_per_image, positive_fraction=rc.positive_fraction,
      iou_thresholds=rc.iou_thresholds, iou_labels=rc.iou_labels,
      box_reg_weights=rc.bbox_reg_weights, smooth_l1_beta=rc.smooth_l1_beta,
      loss_weight=rc.loss_weight, bbox_reg_loss_weight=rc.bbox_reg_loss_weight)

  # Box branch.
  roi, box = cfg.roi_heads, cfg.box_head
  props = jax.lax.stop_gradient(rpn_out.proposals)
  samples = sample_proposals(
      k_roi, props.boxes, props.valid, gt_boxes, gt_classes, gt_valid,
      num_classes=roi.num_classes, batch_size_per_image=roi.batch_size_per_image,
      positive_fraction=roi.positive_fraction, iou_thresholds=roi.iou_thresholds,
      iou_labels=roi.iou_labels, append_gt=roi.proposal_append_gt)
  cls_logits, box_deltas = model.roi_heads.box_outputs(feats, samples.boxes, samples.valid)
  losses.update(roi_box_losses(cls_logits, box_deltas, samples,
                               box_reg_weights=box.bbox_reg_weights,
                               smooth_l1_beta=box.smooth_l1_beta,
                               bbox_reg_loss_weight=box.bbox_reg_loss_weight))
  if box.train_on_pred_boxes:
    boxes = predict_boxes_for_gt_classes(box_deltas, samples, box.bbox_reg_weights)
  else:
    boxes = samples.boxes

  # Mask branch on the foreground-capable prefix of each image's slots.
  b = images.shape[0]
  f = int(roi.batch_size_per_image * roi.positive_fraction)
  r = b * f
  valid = samples.is_fg[:, :f].reshape(r)
  # Padding slots get a harmless box: garbage there could feed inf/NaN into masked gradients.
  unit = jnp.array([0.0, 0.0, 1.0, 1.0], jnp.float32)
  mask_boxes = jnp.where(valid[:, None], boxes[:, :f].reshape(r, 4), unit)
  mask_boxes = jax.lax.stop_gradient(mask_boxes)
  classes = samples.classes[:, :f].reshape(r)
  gt_index = samples.gt_index[:, :f].reshape(r)
  batch_index = jnp.repeat(jnp.arange(b, dtype=jnp.int32), f)
  head = model.mask_head
  out = head.forward_train(feats, mask_boxes, batch_index, classes, k_point)
  coarse = out["coarse_logits"]  # [R, 7, 7, C]
  channel = (jnp.zeros_like(classes) if head.num_mask_classes == 1
             else jnp.clip(classes, 0, head.num_mask_classes - 1))
  coarse = jnp.take_along_axis(coarse, channel[:, None, None, None], axis=-1)[..., 0]
  side = coarse.shape[1]
  targets = crop_and_resize_packed_masks(packed, sizes, batch_index, gt_index, mask_boxes,
                                         side) >= 0.5
  labels = point_labels_from_packed_masks(packed, sizes, batch_index, gt_index,
                                          out["points_in_image"])
  losses.update(mask_losses(coarse, out["point_logits"], targets, labels, valid))
  return losses


def instance_loss_fn(model: PointRendRCNN, batch: Mapping[str, Array], key: Array
                     ) -> tuple[Array, dict[str, Array]]:
  """``loss_fn`` for :func:`~pointrend_jax.training.step.make_train_step` (instance models):
  ``(sum of the six LOSS_NAMES, every term)`` (``point/accuracy`` is logged, not summed)."""
  terms = instance_losses(model, batch, key)
  total = sum(terms[k] for k in LOSS_NAMES)
  return total, terms
