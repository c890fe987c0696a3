"""FPN on a ResNet (detectron2 ``build_resnet_fpn_backbone``).

Module paths equal detectron2's (``bottom_up.*``, ``fpn_lateral{2..5}``, ``fpn_output{2..5}``),
so the state-dict names are the paths with ``backbone.`` prepended. Spec: ``mask_rcnn_fpn.md``
§4, ``checkpoint_format.md`` §5.1-5.2, §6.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pointrend_jax.modeling.layers import Conv2d, DType, c2_xavier_fill, get_norm
from pointrend_jax.modeling.resnet import ResNet

Array = jax.Array


def _upsample_nearest_2x(x: Array) -> Array:
  """(N, H, W, C) -> (N, 2H, 2W, C), each pixel repeated 2x2 (``F.interpolate`` nearest x2)."""
  n, h, w, c = x.shape
  return jnp.broadcast_to(x[:, :, None, :, None, :], (n, h, 2, w, 2, c)).reshape(n, 2 * h, 2 * w, c)


class FPN(nnx.Module):
  """Feature pyramid over ``bottom_up`` features with a LastLevelMaxPool top block.

  For each input level l: ``fpn_lateral{l}`` 1x1 and ``fpn_output{l}`` 3x3 pad 1, both with bias
  (no norm by default); top-down ``m_l = lateral_l(res_l) + up2x(m_{l+1})``,
  ``p_l = output_l(m_l)``; ``p6 = p5[:, ::2, ::2]``.

  Args:
    bottom_up: the ResNet; must output ``in_features``.
    in_features: bottom-up feature names, finest first.
    out_channels: FPN width.
    norm: "" (detectron2 default; convs then have bias) or a ``get_norm`` name.
    dtype, param_dtype, precision: of the FPN convs (``bottom_up`` has its own).
    rngs: initializer RNGs (c2_xavier_fill, zero bias).

  Call: ``x`` (N, H, W, 3) normalized image, H and W multiples of ``size_divisibility`` ->
  ``{"p2": (N, H/4, W/4, C), ..., "p6": (N, ceil(H/64), ceil(W/64), C)}`` (NHWC).
  """

  def __init__(self, bottom_up: ResNet, *,
               in_features: Sequence[str] = ("res2", "res3", "res4", "res5"),
               out_channels: int = 256, norm: str = "", dtype: DType = jnp.float32,
               param_dtype: DType = jnp.float32, precision: jax.lax.PrecisionLike = None,
               rngs: nnx.Rngs):
    self.bottom_up = bottom_up
    self.in_features = tuple(in_features)
    self.out_channels = out_channels
    levels = []
    for f in self.in_features:
      stride = bottom_up.out_feature_strides[f]
      level = int(np.log2(stride))
      if 2 ** level != stride:
        raise ValueError(f"FPN input {f} has non power-of-2 stride {stride}")
      levels.append(level)
      conv_kw = dict(use_bias=not norm, kernel_init=c2_xavier_fill, dtype=dtype,
                     param_dtype=param_dtype, precision=precision, rngs=rngs)
      norm_kw = dict(dtype=dtype, param_dtype=param_dtype)
      setattr(self, f"fpn_lateral{level}",
              Conv2d(bottom_up.out_feature_channels[f], out_channels, 1,
                     norm=get_norm(norm, out_channels, **norm_kw), **conv_kw))
      setattr(self, f"fpn_output{level}",
              Conv2d(out_channels, out_channels, 3, padding=1,
                     norm=get_norm(norm, out_channels, **norm_kw), **conv_kw))
    self.levels = tuple(levels)
    top = self.levels[-1]
    self.out_feature_strides = {f"p{l}": 2 ** l for l in (*self.levels, top + 1)}
    self.out_feature_channels = {f"p{l}": out_channels for l in (*self.levels, top + 1)}
    # Inputs must be divisible by the coarsest input stride for the x2 upsampling to line up.
    self.size_divisibility = 2 ** top

  @property
  def out_features(self) -> tuple[str, ...]:
    return tuple(self.out_feature_strides)

  def __call__(self, x: Array) -> dict[str, Array]:
    """x: (N, H, W, 3) -> {"p2".."p6": (N, H/s, W/s, out_channels)}."""
    h, w = x.shape[1:3]
    if h % self.size_divisibility or w % self.size_divisibility:
      raise ValueError(f"FPN input {h}x{w} is not a multiple of {self.size_divisibility}; "
                       "pad the batch first")
    return self.from_features(self.bottom_up(x))

  def from_features(self, features: Mapping[str, Array]) -> dict[str, Array]:
    """The FPN part alone: ``{res_l: (N, H_l, W_l, C_l)}`` -> ``{p_l: (N, H_l, W_l, C)}``."""
    results = {}
    prev = None
    for f, level in reversed(tuple(zip(self.in_features, self.levels))):
      lateral = getattr(self, f"fpn_lateral{level}")(features[f])
      prev = lateral if prev is None else lateral + _upsample_nearest_2x(prev)
      results[f"p{level}"] = getattr(self, f"fpn_output{level}")(prev)
    top = self.levels[-1]
    # LastLevelMaxPool: max_pool2d(kernel 1, stride 2) is plain subsampling.
    results[f"p{top + 1}"] = results[f"p{top}"][:, ::2, ::2, :]
    return {name: results[name] for name in self.out_features}


def build_resnet_fpn_backbone(*, depth: int = 50, num_groups: int = 1, width_per_group: int = 64,
                              stride_in_1x1: bool = True, norm: str = "FrozenBN",
                              freeze_at: int = 2, out_channels: int = 256, fpn_norm: str = "",
                              stem_out_channels: int = 64, res2_out_channels: int | None = None,
                              dtype: DType = jnp.float32, param_dtype: DType = jnp.float32,
                              precision: jax.lax.PrecisionLike = None, rngs: nnx.Rngs) -> FPN:
  """detectron2 ``build_resnet_fpn_backbone`` from plain arguments (defaults: R-50 MSRA).

  Configs: R50/R101 (``depth``), X101-32x8d (``depth=101, num_groups=32, width_per_group=8,
  stride_in_1x1=False``); instance configs ``freeze_at=2``, the semantic config ``freeze_at=0``.
  See :class:`ResNet` and :class:`FPN` for the arguments; ``dtype``, ``param_dtype`` and
  ``precision`` go to both.
  """
  kw = dict(dtype=dtype, param_dtype=param_dtype, precision=precision, rngs=rngs)
  bottom_up = ResNet(depth, num_groups=num_groups, width_per_group=width_per_group,
                     stride_in_1x1=stride_in_1x1, norm=norm, freeze_at=freeze_at,
                     out_features=("res2", "res3", "res4", "res5"),
                     stem_out_channels=stem_out_channels, res2_out_channels=res2_out_channels,
                     **kw)
  return FPN(bottom_up, out_channels=out_channels, norm=fpn_norm, **kw)
