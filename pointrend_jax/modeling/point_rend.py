"""PointRend instance mask head (detectron2 ``PointRendMaskHead``): coarse/point heads, subdivision.

Spec: ``pointrend.md`` §2-§3, §8; names and layouts: ``checkpoint_format.md`` §5.5, §6.

Conventions:

* Feature maps are NHWC ``[N, H, W, C]``; per-ROI maps are ``[R, h, w, C]`` (``C`` = mask classes).
* Boxes are ``(x0, y0, x1, y1)`` pixels of the resized (unpadded) input image, ROIs of all images
  concatenated, with ``batch_index [R]`` naming each ROI's image.
* ``points_in_box`` are ``(x, y)`` in ``[0, 1]`` of the box (``(0, 0)`` = ``(x0, y0)``);
  ``points_in_image`` are ``(X, Y)`` image pixels.
* Module paths equal detectron2's (``coarse_head.fc1``, ``point_head.predictor``, ...), so the
  state-dict names are the paths after ``roi_heads.mask_head.``. Point-head layers are kernel-1
  ``Conv1d`` in detectron2 (weight ``(out, in, 1)``) and :class:`~.layers.PointwiseConv1d` (a
  dense layer) here; :func:`~.layers.d2_names_of` / :func:`~.layers.load_d2_state` translate the
  layout.
* Flatten order: the coarse head flattens ``[R, C, 7, 7]`` (index ``c*49 + y*7 + x``, as
  PyTorch), so ``fc1``'s kernel is the transposed PyTorch weight, loaded without permutation.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax import lax

from pointrend_jax.modeling.layers import (Conv2d, DType, Linear, PointwiseConv1d, c2_msra_fill,
                                           c2_xavier_fill)
from pointrend_jax.ops.point_sample import interpolate_bilinear_x2, point_sample
from pointrend_jax.ops.point_selection import (instance_uncertainty,
                                               point_sample_fine_grained_features,
                                               regular_grid_points, uncertain_points_on_grid,
                                               uncertain_points_with_randomness)

Array = jax.Array
Features = Array | Mapping[str, Array]

__all__ = ["PointwiseConv1d", "ConvFCHead", "StandardPointHead", "PointRendMaskHead",
           "subdivision_schedule", "subdivide"]

_prediction_init = jax.nn.initializers.normal(0.001)

# --- Coarse head and point head ---


class ConvFCHead(nnx.Module):
  """detectron2 ``ConvFCHead`` (module ``coarse_head``): coarse per-class mask logits.

  ``[optional reduce_channel_dim_conv 1x1 + ReLU] -> reduce_spatial_dim_conv 2x2/2 + ReLU ->
  flatten (C, H, W order) -> fc1 + ReLU -> ... -> fcK + ReLU -> prediction``, reshaped to
  ``(C_out, S, S)`` and returned NHWC.

  Args:
    in_channels, input_side: channels and grid side of the pooled features (256, 14).
    num_classes: mask classes ``C_out`` (80 COCO, 8 Cityscapes, 1 class-agnostic).
    output_side: side ``S`` of the output (7).
    conv_dim, fc_dims: width of the convs (256) and of ``fc1..`` ((1024, 1024)).
    dtype, param_dtype, precision: of every layer (see :class:`~.layers.Conv2d`).
    rngs: initializer RNGs (convs c2_msra_fill; fcs c2_xavier_fill; prediction N(0, 0.001)).
  """

  def __init__(self, in_channels: int = 256, input_side: int = 14, *, num_classes: int,
               output_side: int = 7, conv_dim: int = 256, fc_dims: Sequence[int] = (1024, 1024),
               dtype: DType = jnp.float32, param_dtype: DType = jnp.float32,
               precision: lax.PrecisionLike = None, rngs: nnx.Rngs):
    if input_side % 2:
      raise ValueError(f"input_side must be even (2x2/2 conv), got {input_side}")
    self.num_classes = num_classes
    self.output_side = output_side
    kw = dict(dtype=dtype, param_dtype=param_dtype, precision=precision, rngs=rngs)
    self.reduce_channel_dim_conv = (Conv2d(in_channels, conv_dim, 1, **kw)
                                    if in_channels > conv_dim else None)
    self.reduce_spatial_dim_conv = Conv2d(conv_dim if in_channels > conv_dim else in_channels,
                                          conv_dim, 2, stride=2, **kw)
    in_dim = conv_dim * (input_side // 2) ** 2
    self.num_fc = len(fc_dims)
    for k, fc_dim in enumerate(fc_dims):
      setattr(self, f"fc{k + 1}", Linear(in_dim, fc_dim, kernel_init=c2_xavier_fill, **kw))
      in_dim = fc_dim
    self.prediction = Linear(in_dim, num_classes * output_side ** 2,
                             kernel_init=_prediction_init, **kw)

  def __call__(self, x: Array) -> Array:
    """x: ``[R, s, s, in_channels]`` pooled features -> ``[R, S, S, num_classes]`` float32
    logits."""
    if self.reduce_channel_dim_conv is not None:
      x = jax.nn.relu(self.reduce_channel_dim_conv(x))
    x = jax.nn.relu(self.reduce_spatial_dim_conv(x))
    # PyTorch flattens (C, H, W); transposing here keeps fc1's kernel = PyTorch weight.T.
    x = jnp.transpose(x, (0, 3, 1, 2)).reshape(x.shape[0], -1)
    for k in range(self.num_fc):
      x = jax.nn.relu(getattr(self, f"fc{k + 1}")(x))
    s = self.output_side
    # Logits leave the head in float32: they feed point selection, subdivision and the losses.
    x = self.prediction(x).astype(jnp.float32).reshape(x.shape[0], self.num_classes, s, s)
    return jnp.transpose(x, (0, 2, 3, 1))


class StandardPointHead(nnx.Module):
  """detectron2 ``StandardPointHead`` (module ``point_head``): a per-point MLP.

  ``x = [fine, coarse]`` -> ``fc_k``: Conv1d-1 + ReLU (and ``[x, coarse]`` again after each layer
  if ``coarse_pred_each_layer``) -> ``predictor``. Channel order of every concatenation: features
  first, then the ``C`` coarse logits (checkpoint column order).

  Args:
    in_channels: fine-grained feature channels (256 for p2).
    num_classes: output classes ``C`` (1 if class-agnostic); also the coarse input width.
    fc_dim, num_fc: hidden width and number of hidden layers (256, 3).
    coarse_pred_each_layer: True for instance, False for semantic PointRend.
    dtype, param_dtype, precision: of every layer (see :class:`~.layers.Linear`).
    rngs: initializer RNGs (fc c2_msra_fill, fan_out = fc_dim; predictor N(0, 0.001)).
  """

  def __init__(self, in_channels: int = 256, *, num_classes: int, fc_dim: int = 256,
               num_fc: int = 3, coarse_pred_each_layer: bool = True,
               dtype: DType = jnp.float32, param_dtype: DType = jnp.float32,
               precision: lax.PrecisionLike = None, rngs: nnx.Rngs):
    self.num_classes = num_classes
    self.num_fc = num_fc
    self.coarse_pred_each_layer = coarse_pred_each_layer
    self.dtype = dtype
    extra = num_classes if coarse_pred_each_layer else 0
    in_dim = in_channels + num_classes
    kw = dict(dtype=dtype, param_dtype=param_dtype, precision=precision, rngs=rngs)
    for k in range(num_fc):
      setattr(self, f"fc{k + 1}",
              PointwiseConv1d(in_dim, fc_dim, kernel_init=c2_msra_fill, **kw))
      in_dim = fc_dim + extra
    self.predictor = PointwiseConv1d(in_dim, num_classes, kernel_init=_prediction_init, **kw)

  def __call__(self, fine: Array, coarse: Array) -> Array:
    """fine ``[R, P, in_channels]``, coarse ``[R, P, C]`` -> float32 point logits ``[R, P, C]``.
    """
    dtype = self.dtype
    # One dtype per concatenation (fine features may be bf16, sampled coarse logits float32).
    coarse = coarse.astype(dtype)
    x = jnp.concatenate([fine.astype(dtype), coarse], axis=-1)
    for k in range(self.num_fc):
      x = jax.nn.relu(getattr(self, f"fc{k + 1}")(x))
      if self.coarse_pred_each_layer:
        x = jnp.concatenate([x, coarse], axis=-1)
    # float32 out: the logits are scattered into float32 masks and go into the losses.
    return self.predictor(x).astype(jnp.float32)


# --- PointRend mask head ---


def subdivision_schedule(output_side: int, steps: int, num_points: int) -> tuple[int, int]:
  """Effective ``(initial resolution, steps)`` of detectron2's subdivision (spec §3.6).

  The start resolution doubles (and a step is dropped) while ``4 * res**2 <= num_points``,
  because a step that recomputes every cell is the same as starting there: ``(7, 5, 784)`` ->
  ``(28, 3)`` -> final side ``28 * 2**3 = 224``.
  """
  res, given_steps = output_side, steps
  while 4 * res * res <= num_points:
    res *= 2
    steps -= 1
  if steps < 0:
    # detectron2 would not even run the initial step here (and fail).
    raise ValueError(f"subdivision: {num_points} points would skip more than the "
                     f"{given_steps} steps")
  return res, steps


def subdivide(logits: Array, steps: int, num_points: int, uncertainty: Callable[[Array], Array],
              point_logits: Callable[[Array], Array]) -> tuple[Array, dict[str, tuple[Array, ...]]]:
  """detectron2's subdivision inference (spec §3.6, §4.4) on ``logits [N, H, W, C]``.

  ``steps`` x [bilinear x2; the ``num_points`` most uncertain cells of ``uncertainty(logits)``
  ``[N, H, W]``; ``point_logits(points [N, K, 2]) -> [N, K, C]`` scattered into them]. Returns
  the refined ``[N, H * 2**steps, W * 2**steps, C]`` and per-step tuples ``upsampled`` (before
  the scatter), ``uncertainty``, ``indices [N, K]`` (flat row-major, top-k order), ``points``
  (cell centres, the frame of ``logits``) and ``point_logits``.
  """
  n, c = logits.shape[0], logits.shape[-1]
  rows = jnp.arange(n)[:, None]
  trace = {k: [] for k in ("upsampled", "uncertainty", "indices", "points", "point_logits")}
  for _ in range(steps):
    logits = interpolate_bilinear_x2(logits)
    h, w = logits.shape[1:3]
    u = uncertainty(logits)
    indices, points = uncertain_points_on_grid(u, num_points)
    values = point_logits(points)
    for k, v in zip(trace, (logits, u, indices, points, values)):
      trace[k].append(v)
    logits = logits.reshape(n, h * w, c).at[rows, indices].set(values, unique_indices=True)
    logits = logits.reshape(n, h, w, c)
  return logits, {k: tuple(v) for k, v in trace.items()}


class PointRendMaskHead(nnx.Module):
  """detectron2 ``PointRendMaskHead``: ``coarse_head`` (:class:`ConvFCHead`) + ``point_head``.

  Both heads read the same FPN level(s) (``in_features``, p2 in all configs). ``features``
  arguments are either that NHWC map (single level) or the FPN dict ``{name: [N, H, W, C]}``.

  Args:
    num_classes: foreground classes (80 COCO, 8 Cityscapes).
    in_features, feature_strides: FPN levels used (``("p2",)``, ``(4,)``); channels add up.
    in_channels: total channels of ``in_features`` (256).
    pooler_resolution: side of the point grid pooled for the coarse head (14).
    conv_dim, fc_dims, output_side: coarse head (256, (1024, 1024), 7).
    point_fc_dim, point_num_fc, coarse_pred_each_layer: point head (256, 3, True).
    cls_agnostic_mask: one mask channel for all classes.
    train_num_points, oversample_ratio, importance_sample_ratio: training points (196, 3, .75).
    subdivision_steps, subdivision_num_points: inference (5, 784 -> effective 28 + 3 steps).
    dtype, param_dtype, precision: passed to both heads (the logits leave them in float32).
  """

  def __init__(self, num_classes: int = 80, *, in_features: Sequence[str] = ("p2",),
               feature_strides: Sequence[int] = (4,), in_channels: int = 256,
               pooler_resolution: int = 14, conv_dim: int = 256,
               fc_dims: Sequence[int] = (1024, 1024), output_side: int = 7, point_fc_dim: int = 256,
               point_num_fc: int = 3, coarse_pred_each_layer: bool = True,
               cls_agnostic_mask: bool = False, train_num_points: int = 196,
               oversample_ratio: float = 3.0, importance_sample_ratio: float = 0.75,
               subdivision_steps: int = 5, subdivision_num_points: int = 784,
               dtype: DType = jnp.float32, param_dtype: DType = jnp.float32,
               precision: lax.PrecisionLike = None, rngs: nnx.Rngs):
    if len(in_features) != len(feature_strides):
      raise ValueError("in_features and feature_strides must have the same length")
    self.num_classes = num_classes
    self.num_mask_classes = 1 if cls_agnostic_mask else num_classes
    self.in_features = tuple(in_features)
    self.feature_strides = tuple(float(s) for s in feature_strides)
    self.pooler_resolution = pooler_resolution
    self.train_num_points = train_num_points
    self.oversample_ratio = oversample_ratio
    self.importance_sample_ratio = importance_sample_ratio
    self.subdivision_num_points = subdivision_num_points
    self.subdivision_init_resolution, self.subdivision_steps = subdivision_schedule(
        output_side, subdivision_steps, subdivision_num_points)
    kw = dict(dtype=dtype, param_dtype=param_dtype, precision=precision, rngs=rngs)
    self.coarse_head = ConvFCHead(in_channels, pooler_resolution,
                                  num_classes=self.num_mask_classes, output_side=output_side,
                                  conv_dim=conv_dim, fc_dims=fc_dims, **kw)
    self.point_head = StandardPointHead(in_channels, num_classes=self.num_mask_classes,
                                        fc_dim=point_fc_dim, num_fc=point_num_fc,
                                        coarse_pred_each_layer=coarse_pred_each_layer, **kw)

  @property
  def output_side(self) -> int:
    """Side of the inference mask logits (224 with the default schedule)."""
    return self.subdivision_init_resolution * 2 ** self.subdivision_steps

  # --- Building blocks ---

  def _levels(self, features: Features) -> list[Array]:
    if isinstance(features, Mapping):
      return [features[f] for f in self.in_features]
    if len(self.in_features) != 1:
      raise ValueError(f"pass a dict with {self.in_features}, not a single map")
    return [features]

  def _class_index(self, classes: Array) -> Array:
    """Mask channel of each ROI: its class (clipped into range), or 0 when class-agnostic."""
    classes = jnp.asarray(classes).astype(jnp.int32)
    if self.num_mask_classes == 1:
      return jnp.zeros_like(classes)
    return jnp.clip(classes, 0, self.num_mask_classes - 1)

  def fine_grained_features(self, features: Features, boxes: Array, batch_index: Array,
                            points_in_box: Array) -> tuple[Array, Array]:
    """FPN features at box-frame points.

    Returns ``([R, P, in_channels], points_in_image [R, P, 2])``.
    """
    return point_sample_fine_grained_features(self._levels(features), self.feature_strides,
                                              boxes, batch_index, points_in_box)

  def coarse_logits(self, features: Features, boxes: Array, batch_index: Array) -> Array:
    """Coarse mask logits of every class: ``[R, 7, 7, C]``.

    The coarse head's input is the FPN map sampled on a regular ``14 x 14`` grid in each box
    (spec §3.2; grid_sample semantics, so taps outside the map read 0).

    ``features``: p2 ``[N, H, W, 256]`` or the FPN dict; ``boxes [R, 4]`` image pixels (no
    gradient) of images ``batch_index [R]``.
    """
    r = boxes.shape[0]
    s = self.pooler_resolution
    grid = jnp.broadcast_to(regular_grid_points(s), (r, s * s, 2))
    pooled, _ = self.fine_grained_features(features, boxes, batch_index, grid)
    return self.coarse_head(pooled.reshape(r, s, s, pooled.shape[-1]))

  def point_logits(self, features: Features, boxes: Array, batch_index: Array,
                   points_in_box: Array, coarse_logits: Array) -> Array:
    """Point-head logits ``[R, P, C]`` at box-frame points ``[R, P, 2]``.

    Fine features are the FPN map at the points; coarse features are ``coarse_logits``
    ``[R, 7, 7, C]`` bilinearly sampled at the same box-frame points (gradient flows into them).
    """
    fine, _ = self.fine_grained_features(features, boxes, batch_index, points_in_box)
    coarse = point_sample(coarse_logits, points_in_box)
    return self.point_head(fine, coarse)

  # --- Training ---

  def forward_train(self, features: Features, boxes: Array, batch_index: Array,
                    gt_classes: Array, key: Array) -> dict[str, Array]:
    """Training forward of the fg ROIs (spec §3.5 steps 1, 3, 5, 6; the losses come later).

    Args:
      features: p2 ``[N, H, W, 256]`` or the FPN dict.
      boxes: ``[R, 4]`` proposal boxes (the box head's predictions for the GT class; no gradient).
        Padded rows are allowed; mask them in the loss.
      batch_index: ``[R]`` image of each ROI.
      gt_classes: ``[R]`` GT class of each ROI.
      key: PRNG key for the point sampling.

    Returns:
      ``coarse_logits [R, 7, 7, C]`` (for ``loss_mask``), ``point_coords [R, P, 2]`` box-frame
      points, ``points_in_image [R, P, 2]`` (to sample GT masks for the labels), and
      ``point_logits [R, P]`` of the GT class (``P`` = 196).
    """
    boxes = lax.stop_gradient(boxes)
    coarse = self.coarse_logits(features, boxes, batch_index)
    cls = self._class_index(gt_classes)
    points = uncertain_points_with_randomness(
        key, coarse, functools.partial(instance_uncertainty, classes=cls),
        self.train_num_points, self.oversample_ratio, self.importance_sample_ratio)
    fine, points_in_image = self.fine_grained_features(features, boxes, batch_index, points)
    logits = self.point_head(fine, point_sample(coarse, points))
    return {"coarse_logits": coarse, "point_coords": points, "points_in_image": points_in_image,
            "point_logits": jnp.take_along_axis(logits, cls[:, None, None], axis=-1)[..., 0]}

  # --- Inference ---

  def subdivision_inference(self, features: Features, boxes: Array, batch_index: Array,
                            classes: Array, *, return_intermediates: bool = False
                            ) -> Array | tuple[Array, dict[str, Any]]:
    """Mask logits of each detection's class by adaptive subdivision (spec §3.6).

    Only the predicted-class channel of the refined mask is tracked (the uncertainty and the
    output read nothing else; upsampling is per channel), which is exact and avoids the
    ``[D, 224, 224, C]`` buffer. The point head still runs with all ``C`` outputs.

    Args:
      features: p2 ``[N, H, W, 256]`` or the FPN dict.
      boxes: ``[D, 4]`` detected boxes, image pixels (clipped to the image, as detectron2).
      batch_index: ``[D]`` image of each detection.
      classes: ``[D]`` predicted class of each detection.
      return_intermediates: also return a dict of intermediate values.

    Returns:
      ``mask_logits [D, S, S]`` in the box frame (``S`` = 224; sigmoid gives detectron2's
      ``pred_masks``), and if requested a dict with ``coarse_logits [D, 7, 7, C]``,
      ``coarse_logits_class [D, 7, 7]``, ``init_logits [D, 28, 28]`` (step 0, regular grid) and
      per subdivision step tuples ``upsampled`` (``[D, H_s, W_s]`` before the scatter),
      ``indices [D, 784]`` (flat row-major, top-k order), ``points_in_box [D, 784, 2]`` and
      ``point_logits [D, 784]``.
    """
    boxes = lax.stop_gradient(jnp.asarray(boxes))
    d = boxes.shape[0]
    coarse = self.coarse_logits(features, boxes, batch_index)
    cls = self._class_index(classes)

    def class_point_logits(points_in_box):
      logits = self.point_logits(features, boxes, batch_index, points_in_box, coarse)
      return jnp.take_along_axis(logits, cls[:, None, None], axis=-1)[..., 0]

    res = self.subdivision_init_resolution
    grid = jnp.broadcast_to(regular_grid_points(res), (d, res * res, 2))
    init = class_point_logits(grid).reshape(d, res, res)
    # detectron2 returns after step 0 when there are no detections at all.
    mask, trace = subdivide(init[..., None], self.subdivision_steps if d > 0 else 0,
                            self.subdivision_num_points, instance_uncertainty,
                            lambda points: class_point_logits(points)[..., None])
    if not return_intermediates:
      return mask[..., 0]
    return mask[..., 0], {
        "coarse_logits": coarse, "init_logits": init,
        "coarse_logits_class": jnp.take_along_axis(coarse, cls[:, None, None, None], -1)[..., 0],
        "upsampled": tuple(u[..., 0] for u in trace["upsampled"]), "indices": trace["indices"],
        "points_in_box": trace["points"],
        "point_logits": tuple(v[..., 0] for v in trace["point_logits"])}
