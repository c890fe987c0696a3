"""ResNet / ResNeXt backbone as detectron2's ``build_resnet_backbone`` (NHWC).

Module paths equal detectron2's: ``stem.conv1``, ``res{2..5}.{i}.conv{1,2,3}``,
``res{s}.0.shortcut``, each conv with its ``norm``. Spec: ``mask_rcnn_fpn.md`` §3.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from pointrend_jax.modeling.layers import Conv2d, DType, FrozenParam, get_norm, max_pool2d

Array = jax.Array

BLOCKS_PER_STAGE = {18: (2, 2, 2, 2), 34: (3, 4, 6, 3), 50: (3, 4, 6, 3), 101: (3, 4, 23, 3),
                    152: (3, 8, 36, 3)}


def _conv(in_ch: int, out_ch: int, k: int, *, norm: str, frozen: bool, dtype: DType,
          param_dtype: DType, precision: jax.lax.PrecisionLike, rngs: nnx.Rngs, **kwargs) -> Conv2d:
  """Backbone conv: no bias, norm, c2_msra_fill init; FrozenParam kernel in frozen stages."""
  return Conv2d(in_ch, out_ch, k, use_bias=False,
                norm=get_norm(norm, out_ch, frozen=frozen, dtype=dtype, param_dtype=param_dtype),
                param_type=FrozenParam if frozen else nnx.Param, dtype=dtype,
                param_dtype=param_dtype, precision=precision, rngs=rngs, **kwargs)


class BasicStem(nnx.Module):
  """conv 7x7/2 pad 3 -> norm -> ReLU -> max-pool 3x3/2 pad 1 (output stride 4)."""

  def __init__(self, in_channels: int = 3, out_channels: int = 64, *, norm: str = "FrozenBN",
               frozen: bool = False, dtype: DType = jnp.float32, param_dtype: DType = jnp.float32,
               precision: jax.lax.PrecisionLike = None, rngs: nnx.Rngs):
    self.conv1 = _conv(in_channels, out_channels, 7, stride=2, padding=3, norm=norm,
                       frozen=frozen, dtype=dtype, param_dtype=param_dtype, precision=precision,
                       rngs=rngs)

  def __call__(self, x: Array) -> Array:
    """x: (N, H, W, 3) -> (N, H/4, W/4, C)."""
    return max_pool2d(jax.nn.relu(self.conv1(x)), 3, 2, 1)


class BasicBlock(nnx.Module):
  """ResNet-18/34 block: 3x3 (stride) -> 3x3, plus projection shortcut when in != out."""

  def __init__(self, in_channels: int, out_channels: int, *, stride: int = 1,
               norm: str = "FrozenBN", frozen: bool = False, dtype: DType = jnp.float32,
               param_dtype: DType = jnp.float32, precision: jax.lax.PrecisionLike = None,
               rngs: nnx.Rngs):
    kw = dict(norm=norm, frozen=frozen, dtype=dtype, param_dtype=param_dtype,
              precision=precision, rngs=rngs)
    self.shortcut = (_conv(in_channels, out_channels, 1, stride=stride, **kw)
                     if in_channels != out_channels else None)
    self.conv1 = _conv(in_channels, out_channels, 3, stride=stride, padding=1, **kw)
    self.conv2 = _conv(out_channels, out_channels, 3, padding=1, **kw)

  def __call__(self, x: Array) -> Array:
    """x: (N, H, W, Cin) -> (N, H/stride, W/stride, Cout)."""
    out = self.conv2(jax.nn.relu(self.conv1(x)))
    shortcut = self.shortcut(x) if self.shortcut is not None else x
    return jax.nn.relu(out + shortcut)


class BottleneckBlock(nnx.Module):
  """1x1 -> 3x3 (groups) -> 1x1 bottleneck; the stride sits on the 1x1 if ``stride_in_1x1``."""

  def __init__(self, in_channels: int, out_channels: int, *, bottleneck_channels: int,
               stride: int = 1, num_groups: int = 1, stride_in_1x1: bool = True,
               dilation: int = 1, norm: str = "FrozenBN", frozen: bool = False,
               dtype: DType = jnp.float32, param_dtype: DType = jnp.float32,
               precision: jax.lax.PrecisionLike = None, rngs: nnx.Rngs):
    kw = dict(norm=norm, frozen=frozen, dtype=dtype, param_dtype=param_dtype,
              precision=precision, rngs=rngs)
    self.shortcut = (_conv(in_channels, out_channels, 1, stride=stride, **kw)
                     if in_channels != out_channels else None)
    stride_1x1, stride_3x3 = (stride, 1) if stride_in_1x1 else (1, stride)
    self.conv1 = _conv(in_channels, bottleneck_channels, 1, stride=stride_1x1, **kw)
    self.conv2 = _conv(bottleneck_channels, bottleneck_channels, 3, stride=stride_3x3,
                       padding=dilation, dilation=dilation, groups=num_groups, **kw)
    self.conv3 = _conv(bottleneck_channels, out_channels, 1, **kw)

  def __call__(self, x: Array) -> Array:
    """x: (N, H, W, Cin) -> (N, H/stride, W/stride, Cout)."""
    out = jax.nn.relu(self.conv1(x))
    out = jax.nn.relu(self.conv2(out))
    out = self.conv3(out)
    shortcut = self.shortcut(x) if self.shortcut is not None else x
    return jax.nn.relu(out + shortcut)


class ResNet(nnx.Module):
  """ResNet-18/34/50/101/152 and ResNeXt, as detectron2 ``build_resnet_backbone``.

  Args:
    depth: 18, 34 (BasicBlock) or 50, 101, 152 (BottleneckBlock).
    num_groups: conv2 groups (ResNeXt-101 32x8d: 32).
    width_per_group: bottleneck width per group at res2 (ResNeXt-101 32x8d: 8).
    stride_in_1x1: stride-2 on the first 1x1 conv (MSRA models) instead of the 3x3 (C2 models).
    norm: "FrozenBN" (all pretrained configs), "BN", "GN" or "" (see ``layers.get_norm``).
    freeze_at: 0 nothing frozen; 1 stem; k >= 2 stem and res2..res{k}. Frozen convs hold
      ``FrozenParam`` kernels (and BN becomes FrozenBN, GN gets ``FrozenParam`` affine), so
      ``nnx.Param`` selects exactly the trainable parameters.
    out_features: names among "stem", "res2".."res5"; stages after the last one are not built.
    in_channels, stem_out_channels, res2_out_channels: widths (detectron2 defaults 3, 64 and
      256 for bottleneck / 64 for basic-block ResNets when ``res2_out_channels`` is None).
    res5_dilation: 1 or 2 (2: res5 keeps stride 16 and uses dilated 3x3 convs).
    dtype, param_dtype, precision: of every layer (see :class:`~.layers.Conv2d`).
    rngs: initializer RNGs (convs: c2_msra_fill).

  Call: ``x`` (N, H, W, in_channels) float32 -> ``{name: (N, H/stride, W/stride, C)}``.
  """

  def __init__(self, depth: int = 50, *, num_groups: int = 1, width_per_group: int = 64,
               stride_in_1x1: bool = True, norm: str = "FrozenBN", freeze_at: int = 2,
               out_features: Sequence[str] = ("res2", "res3", "res4", "res5"), in_channels: int = 3,
               stem_out_channels: int = 64, res2_out_channels: int | None = None,
               res5_dilation: int = 1, dtype: DType = jnp.float32, param_dtype: DType = jnp.float32,
               precision: jax.lax.PrecisionLike = None, rngs: nnx.Rngs):
    if depth not in BLOCKS_PER_STAGE:
      raise ValueError(f"unsupported ResNet depth {depth}")
    basic = depth in (18, 34)
    if basic and num_groups != 1:
      raise ValueError("ResNet-18/34 do not support num_groups != 1")
    if res5_dilation not in (1, 2):
      raise ValueError(f"res5_dilation must be 1 or 2, got {res5_dilation}")
    if res2_out_channels is None:
      res2_out_channels = 64 if basic else 256
    names = ("stem", "res2", "res3", "res4", "res5")
    for f in out_features:
      if f not in names:
        raise ValueError(f"unknown out feature {f!r}; expected one of {names}")
    self.out_features = tuple(out_features)
    self.freeze_at = freeze_at
    kw = dict(dtype=dtype, param_dtype=param_dtype, precision=precision, rngs=rngs)
    self.stem = BasicStem(in_channels, stem_out_channels, norm=norm, frozen=freeze_at >= 1, **kw)
    self.out_feature_strides = {"stem": 4}
    self.out_feature_channels = {"stem": stem_out_channels}

    max_stage = max(names.index(f) for f in out_features) + 1
    stage_names = []
    cur_in, cur_out = stem_out_channels, res2_out_channels
    bottleneck = num_groups * width_per_group
    stride = 4
    for s in range(2, max_stage + 1):
      dilation = res5_dilation if s == 5 else 1
      first_stride = 1 if s == 2 or dilation == 2 else 2
      frozen = freeze_at >= s
      blocks = []
      for i in range(BLOCKS_PER_STAGE[depth][s - 2]):
        block_in = cur_in if i == 0 else cur_out
        block_stride = first_stride if i == 0 else 1
        if basic:
          blocks.append(BasicBlock(block_in, cur_out, stride=block_stride, norm=norm,
                                   frozen=frozen, **kw))
        else:
          blocks.append(BottleneckBlock(
              block_in, cur_out, bottleneck_channels=bottleneck, stride=block_stride,
              num_groups=num_groups, stride_in_1x1=stride_in_1x1, dilation=dilation, norm=norm,
              frozen=frozen, **kw))
      name = f"res{s}"
      setattr(self, name, nnx.List(blocks))
      stage_names.append(name)
      stride *= first_stride
      self.out_feature_strides[name] = stride
      self.out_feature_channels[name] = cur_out
      cur_in, cur_out, bottleneck = cur_out, cur_out * 2, bottleneck * 2
    self.stage_names = tuple(stage_names)
    self.out_feature_strides = {f: self.out_feature_strides[f] for f in self.out_features}
    self.out_feature_channels = {f: self.out_feature_channels[f] for f in self.out_features}

  def __call__(self, x: Array) -> dict[str, Array]:
    """x: (N, H, W, C_in) normalized image -> {feature name: (N, H/s, W/s, C)} (NHWC)."""
    if x.ndim != 4:
      raise ValueError(f"ResNet takes (N, H, W, C) input, got shape {x.shape}")
    outputs = {}
    x = self.stem(x)
    if "stem" in self.out_features:
      outputs["stem"] = x
    for name in self.stage_names:
      for block in getattr(self, name):
        x = block(x)
      if name in self.out_features:
        outputs[name] = x
    return outputs
