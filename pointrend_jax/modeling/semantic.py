"""Semantic PointRend: ``SemSegFPNHead`` coarse head, ``PointRendSemSegHead``, the segmentor.

Spec: ``pointrend.md`` §4, §8; names: ``checkpoint_format.md`` §5.6. Maps are NHWC; semantic
point coordinates are ``(x, y)`` in ``[0, 1]`` of the *padded* image (``points_in_image``), so
the same coordinates address p2, the stride-4 coarse logits and the refined maps.

Module paths equal detectron2's: ``backbone.*``, ``sem_seg_head.coarse_sem_seg_head.p{2..5}.{k}``
(the parameter-free upsampling layers keep their odd indices), ``...predictor``,
``sem_seg_head.point_head.*``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pointrend_jax.modeling.fpn import FPN
from pointrend_jax.modeling.layers import Conv2d, DType, get_norm
from pointrend_jax.modeling.point_rend import StandardPointHead, subdivide
from pointrend_jax.postprocess import linear_taps
from pointrend_jax.ops.point_sample import interpolate_bilinear_x2, point_sample
from pointrend_jax.ops.point_selection import semantic_uncertainty, uncertain_points_with_randomness

Array = jax.Array

__all__ = ["resize_bilinear", "SemSegFPNHead", "PointRendSemSegHead", "PointRendSemanticSegmentor"]

# detectron2 MODEL.PIXEL_MEAN / PIXEL_STD defaults (BGR, MSRA weights).
PIXEL_MEAN_BGR = (103.53, 116.28, 123.675)
PIXEL_STD_BGR = (1.0, 1.0, 1.0)


# --- PyTorch bilinear resize ---


def _resize_axis(x: Array, axis: int, out_size: int) -> Array:
  in_size = x.shape[axis]
  if in_size == out_size:
    return x  # scale 1: every weight pair is (1, 0), i.e. the identity
  i0, i1, l0, l1 = linear_taps(in_size, out_size)
  shape = [1] * x.ndim
  shape[axis] = out_size
  w0 = jnp.asarray(l0.reshape(shape), x.dtype)
  w1 = jnp.asarray(l1.reshape(shape), x.dtype)
  return (jnp.take(x, jnp.asarray(i0, jnp.int32), axis=axis) * w0
          + jnp.take(x, jnp.asarray(i1, jnp.int32), axis=axis) * w1)


def resize_bilinear(x: Array, size: tuple[int, int]) -> Array:
  """PyTorch ``F.interpolate(x, size=size, mode="bilinear", align_corners=False)`` (no antialias).

  Separable with static taps; the width pass runs first and the height pass combines its rows
  (``h0*(w0*a + w1*b) + h1*(w0*c + w1*d)``), the order of PyTorch's generic CPU kernel. For
  ``size = 2 * (H, W)`` it equals :func:`interpolate_bilinear_x2`.

  ``x [N, H, W, C]`` -> ``[N, H_out, W_out, C]`` (dtype of ``x``) for a static ``size``.
  """
  x = jnp.asarray(x)
  if x.ndim != 4:
    raise ValueError(f"expected [N, H, W, C], got shape {x.shape}")
  out_h, out_w = int(size[0]), int(size[1])
  return _resize_axis(_resize_axis(x, 2, out_w), 1, out_h)


# --- Coarse head ---


class Upsample2x(nnx.Module):
  """Parameter-free ``nn.Upsample(scale_factor=2, bilinear, align_corners=False)``."""

  def __call__(self, x: Array) -> Array:
    return interpolate_bilinear_x2(x)


class SemSegFPNHead(nnx.Module):
  """detectron2 ``SemSegFPNHead`` as used by PointRend (``layers()``: no final x4 upsampling).

  Level with stride ``s``: ``max(1, log2(s / common_stride))`` x [conv 3x3 (no bias with a
  norm) + norm + ReLU (+ bilinear x2 if ``s != common_stride``)]; the stride-4 outputs are
  summed in ``in_features`` order and ``predictor`` (1x1, bias) gives the coarse logits.

  Args:
    num_classes: 19 for Cityscapes.
    in_features, feature_strides, feature_channels: FPN levels (p2..p5, 4..32, 256).
    conv_dims: 128. common_stride: 4. norm: "GN" (32 groups) or "" (convs get a bias).
    dtype, param_dtype, precision: of every conv and norm (the logits are float32 either way).
    rngs: initializer RNGs (all convs c2_msra_fill; GN weight 1, bias 0).
  """

  def __init__(self, num_classes: int = 19, *,
               in_features: Sequence[str] = ("p2", "p3", "p4", "p5"),
               feature_strides: Sequence[int] = (4, 8, 16, 32),
               feature_channels: int | Sequence[int] = 256, conv_dims: int = 128,
               common_stride: int = 4, norm: str = "GN", dtype: DType = jnp.float32,
               param_dtype: DType = jnp.float32, precision: jax.lax.PrecisionLike = None,
               rngs: nnx.Rngs):
    if isinstance(feature_channels, int):
      feature_channels = (feature_channels,) * len(in_features)
    self.in_features = tuple(in_features)
    self.common_stride = common_stride
    kw = dict(dtype=dtype, param_dtype=param_dtype, precision=precision, rngs=rngs)
    for name, stride, channels in zip(self.in_features, feature_strides, feature_channels):
      ops = []
      for k in range(max(1, int(np.log2(stride) - np.log2(common_stride)))):
        ops.append(Conv2d(channels if k == 0 else conv_dims, conv_dims, 3, padding=1,
                          use_bias=not norm,
                          norm=get_norm(norm, conv_dims, dtype=dtype, param_dtype=param_dtype),
                          **kw))
        if stride != common_stride:
          ops.append(Upsample2x())
      setattr(self, name, nnx.List(ops))
    self.predictor = Conv2d(conv_dims, num_classes, 1, **kw)

  def fused_features(self, features: Mapping[str, Array]) -> Array:
    """``{p_l: [N, H/s_l, W/s_l, C_l]}`` -> sum of the scale heads ``[N, H/4, W/4, conv_dims]``."""
    out = None
    for name in self.in_features:
      x = features[name]
      for op in getattr(self, name):
        x = op(x)
        if isinstance(op, Conv2d):  # detectron2's Conv2d: conv -> norm -> activation
          x = jax.nn.relu(x)
      out = x if out is None else out + x
    return out

  def logits(self, fused: Array) -> Array:
    """:meth:`fused_features` -> float32 coarse logits ``[N, H/4, W/4, num_classes]``.

    float32 whatever the compute dtype: the logits feed uncertainty, subdivision and the loss.
    """
    return self.predictor(fused).astype(jnp.float32)

  def __call__(self, features: Mapping[str, Array]) -> Array:
    """FPN features -> float32 coarse logits ``[N, H/4, W/4, num_classes]`` (stride
    ``common_stride``)."""
    return self.logits(self.fused_features(features))


# --- PointRend semantic head ---


class PointRendSemSegHead(nnx.Module):
  """detectron2 ``PointRendSemSegHead``: ``coarse_sem_seg_head`` + ``point_head``.

  Args:
    num_classes: 19.
    coarse_in_features, coarse_feature_strides: levels of the coarse head (p2..p5).
    point_in_features: levels sampled for the point head (p2); channels ``point_in_channels``.
    conv_dims, norm: coarse head (128, "GN").
    fc_dim, num_fc, coarse_pred_each_layer: point head (256, 3, False).
    train_num_points, oversample_ratio, importance_sample_ratio: training (2048, 3, 0.75).
    subdivision_steps, subdivision_num_points: inference (2, 8192).
    dtype, param_dtype, precision: passed to both heads.
  """

  def __init__(self, num_classes: int = 19, *,
               coarse_in_features: Sequence[str] = ("p2", "p3", "p4", "p5"),
               coarse_feature_strides: Sequence[int] = (4, 8, 16, 32), feature_channels: int = 256,
               conv_dims: int = 128, norm: str = "GN", point_in_features: Sequence[str] = ("p2",),
               point_in_channels: int = 256, fc_dim: int = 256, num_fc: int = 3,
               coarse_pred_each_layer: bool = False, train_num_points: int = 2048,
               oversample_ratio: float = 3.0, importance_sample_ratio: float = 0.75,
               subdivision_steps: int = 2, subdivision_num_points: int = 8192,
               dtype: DType = jnp.float32, param_dtype: DType = jnp.float32,
               precision: jax.lax.PrecisionLike = None, rngs: nnx.Rngs):
    self.num_classes = num_classes
    self.point_in_features = tuple(point_in_features)
    self.train_num_points = train_num_points
    self.oversample_ratio = oversample_ratio
    self.importance_sample_ratio = importance_sample_ratio
    self.subdivision_steps = subdivision_steps
    self.subdivision_num_points = subdivision_num_points
    kw = dict(dtype=dtype, param_dtype=param_dtype, precision=precision, rngs=rngs)
    self.coarse_sem_seg_head = SemSegFPNHead(
        num_classes, in_features=coarse_in_features, feature_strides=coarse_feature_strides,
        feature_channels=feature_channels, conv_dims=conv_dims, norm=norm, **kw)
    self.point_head = StandardPointHead(point_in_channels, num_classes=num_classes,
                                        fc_dim=fc_dim, num_fc=num_fc,
                                        coarse_pred_each_layer=coarse_pred_each_layer, **kw)

  def point_logits(self, features: Mapping[str, Array], coarse_logits: Array,
                   points_in_image: Array) -> Array:
    """Point-head logits ``[N, P, C]`` at ``points_in_image [N, P, 2]`` (padded-image frame)."""
    fine = jnp.concatenate([point_sample(features[f], points_in_image)
                            for f in self.point_in_features], axis=-1)
    return self.point_head(fine, point_sample(coarse_logits, points_in_image))

  def forward_train(self, features: Mapping[str, Array], key: Array) -> dict[str, Array]:
    """Training forward (spec §4.3 steps 1, 3, 4; the losses come later).

    Returns:
      ``coarse_logits [N, H/4, W/4, C]`` (for ``loss_sem_seg`` after x4 upsampling),
      ``point_coords [N, P, 2]`` in the padded-image frame (sample the targets there with
      ``point_sample(..., mode="nearest")``) and ``point_logits [N, P, C]`` (``P`` = 2048).
    """
    coarse = self.coarse_sem_seg_head(features)
    points = uncertain_points_with_randomness(key, coarse, semantic_uncertainty,
                                              self.train_num_points, self.oversample_ratio,
                                              self.importance_sample_ratio)
    return {"coarse_logits": coarse, "point_coords": points,
            "point_logits": self.point_logits(features, coarse, points)}

  def inference(self, features: Mapping[str, Array], *, return_intermediates: bool = False
                ) -> Array | tuple[Array, dict[str, Any]]:
    """Subdivision inference (spec §4.4): ``subdivision_steps`` x [x2 upsample, top-k uncertain
    cells, point head there (coarse features from the *original* coarse logits), scatter].

    Returns:
      logits ``[N, Hp, Wp, C]`` at the padded input resolution (stride-4 map x
      ``2**subdivision_steps``), and if requested a dict with ``coarse_logits``,
      ``fused_features`` ``[N, H/4, W/4, 128]`` and per-step tuples ``upsampled``,
      ``uncertainty`` (``[N, H_s, W_s]``), ``indices [N, K]`` (flat row-major, top-k order),
      ``point_coords [N, K, 2]`` and ``point_logits [N, K, C]``.
    """
    head = self.coarse_sem_seg_head
    fused = head.fused_features(features)
    coarse = head.logits(fused)
    logits, trace = subdivide(coarse, self.subdivision_steps, self.subdivision_num_points,
                              semantic_uncertainty,
                              lambda points: self.point_logits(features, coarse, points))
    if not return_intermediates:
      return logits
    trace["point_coords"] = trace.pop("points")
    return logits, {"coarse_logits": coarse, "fused_features": fused, **trace}


# --- Segmentor ---


class PointRendSemanticSegmentor(nnx.Module):
  """detectron2 ``SemanticSegmentor`` with the PointRend head: preprocess, backbone, head.

  Takes the padded batch the data pipeline makes (RGB, uint8 or float, ``[N, H, W, 3]`` with
  ``image_sizes [N, 2]`` valid ``(h, w)``): converts to the weights' channel order, normalizes
  and zeroes the padding (detectron2 pads *after* normalization), pads to a multiple of the
  backbone's divisibility (32). Postprocessing to original sizes is
  :func:`pointrend_jax.postprocess.semantic_result` (host side, since sizes are per
  image).

  Args:
    backbone: FPN (``backbone.*``).
    sem_seg_head: :class:`PointRendSemSegHead` (``sem_seg_head.*``).
    pixel_mean, pixel_std: in ``input_format`` channel order (detectron2 config values).
    input_format: "BGR" (MSRA weights) or "RGB".
  """

  def __init__(self, backbone: FPN, sem_seg_head: PointRendSemSegHead, *,
               pixel_mean: Sequence[float] = PIXEL_MEAN_BGR,
               pixel_std: Sequence[float] = PIXEL_STD_BGR, input_format: str = "BGR"):
    if input_format not in ("BGR", "RGB"):
      raise ValueError(f"input_format must be BGR or RGB, got {input_format!r}")
    self.backbone = backbone
    self.sem_seg_head = sem_seg_head
    # Plain tuples, not variables: detectron2 does not save them (non-persistent buffers).
    self.pixel_mean = tuple(float(v) for v in pixel_mean)
    self.pixel_std = tuple(float(v) for v in pixel_std)
    self.input_format = input_format

  def preprocess(self, images: Array, image_sizes: Array | None = None) -> Array:
    """RGB ``[N, H, W, 3]`` -> normalized ``[N, Hp, Wp, 3]``, zero outside each image's
    ``image_sizes`` and on the added padding (``Hp, Wp`` = next multiples of 32)."""
    # Imported here: meta_arch (the instance model and build_model) imports this module.
    from pointrend_jax.modeling.meta_arch import normalize_images
    return normalize_images(images, image_sizes, pixel_mean=self.pixel_mean,
                            pixel_std=self.pixel_std, input_format=self.input_format,
                            size_divisibility=self.backbone.size_divisibility)

  def __call__(self, images: Array, image_sizes: Array | None = None, *,
               return_intermediates: bool = False) -> Array | tuple[Array, dict[str, Any]]:
    """Inference: padded logits ``[N, Hp, Wp, C]`` (see :meth:`PointRendSemSegHead.inference`)."""
    features = self.backbone(self.preprocess(images, image_sizes))
    return self.sem_seg_head.inference(features, return_intermediates=return_intermediates)

  def forward_train(self, images: Array, image_sizes: Array | None, key: Array
                    ) -> dict[str, Array]:
    """Training forward: :meth:`PointRendSemSegHead.forward_train` on the preprocessed batch."""
    features = self.backbone(self.preprocess(images, image_sizes))
    return self.sem_seg_head.forward_train(features, key)
