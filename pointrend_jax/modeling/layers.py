"""Basic layers matching detectron2's numerics: conv, FrozenBN, BN, GN, weight init.

All feature maps are NHWC. Conv kernels are stored HWIO (``(kh, kw, I/G, O)``); the detectron2
(PyTorch) layout is OIHW and :func:`load_d2_state` / :func:`d2_names_of` translate between them.

Trainability is encoded in the variable type, so optimizers and ``nnx.grad`` select parameters
with a type filter:

* ``nnx.Param``      trained (``requires_grad=True`` in detectron2).
* ``FrozenParam``    a parameter of a frozen stage (``BACKBONE.FREEZE_AT``): loaded and saved like a
                     parameter, never trained.
* ``FrozenStat``     a FrozenBatchNorm buffer (``weight, bias, running_mean, running_var``).
* ``nnx.BatchStat``  running statistics of a trainable :class:`BatchNorm` (updated in train mode).

``Frozen`` is the common base of ``FrozenParam`` and ``FrozenStat``; ``TRAINABLE`` (= ``nnx.Param``)
is the filter for ``nnx.Optimizer(..., wrt=TRAINABLE)``.

Precision is set per module, as in ``nnx.Conv`` / ``nnx.Linear``: every module takes ``dtype``
(the compute dtype of its activations and conv / matmul operands, float32 by default),
``param_dtype`` (the dtype its variables are created in, float32 by default) and ``precision``
(``None``: see :func:`resolve_precision`) and passes them to its children. Norm statistics are
computed in float32 whatever ``dtype`` is (see ``docs/architecture.md``, "Precision").
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pointrend_jax.ops import conv as conv_lib

Array = jax.Array
DType = jax.typing.DTypeLike
Initializer = Callable[..., Array]


class Frozen(nnx.Variable):
  """Base type of every variable that must never be updated by the optimizer."""


class FrozenParam(Frozen):
  """A parameter of a frozen stage (detectron2 ``requires_grad=False``)."""


class FrozenStat(Frozen):
  """A FrozenBatchNorm buffer (never trained, never updated)."""


# Filter of the variables an optimizer should update.
TRAINABLE = nnx.Param

# --- Precision: module constructor arguments (``dtype``, ``param_dtype``, ``precision``) ---

# Compute dtypes a model may be built with. float16 would need loss scaling in training, which is
# not implemented.
_COMPUTE_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16))


def canonical_compute_dtype(dtype: Any) -> jnp.dtype:
  """``None`` / ``"float32"`` / ``"bfloat16"`` / a jnp or numpy dtype -> the numpy dtype.

  Raises:
    ValueError: any other dtype.
  """
  if dtype is None:
    return jnp.dtype(jnp.float32)
  try:
    canonical = jnp.dtype(dtype)
  except TypeError as e:
    raise ValueError(f"unknown compute dtype {dtype!r}") from e
  if canonical not in _COMPUTE_DTYPES:
    raise ValueError(f"compute dtype must be float32 or bfloat16, got {dtype!r}")
  return canonical


def resolve_precision(dtype: DType, precision: jax.lax.PrecisionLike) -> jax.lax.PrecisionLike:
  """The conv / matmul precision of a layer computing in ``dtype``.

  ``precision=None`` means ``Precision.HIGHEST`` for float32 operands, which keeps them in true
  float32 on GPU/TPU (the backend default would use TF32 / bf16 passes and break float32 parity
  with detectron2; on CPU it changes nothing), and the backend default for other dtypes (bf16
  operands need no extra passes). Any other value is used as given.
  """
  if precision is None and jnp.dtype(dtype) == jnp.float32:
    return jax.lax.Precision.HIGHEST
  return precision


# --- Initializers (HWIO conv kernels or (in, out) dense kernels; fan computed like PyTorch) ---

# fvcore c2_msra_fill: kaiming_normal_(mode="fan_out", nonlinearity="relu"), i.e. plain (not
# truncated) normal with std sqrt(2 / fan_out), fan_out = O * kh * kw (not divided by groups).
c2_msra_fill: Initializer = jax.nn.initializers.variance_scaling(2.0, "fan_out", "normal")
# fvcore c2_xavier_fill: kaiming_uniform_(a=1), i.e. U(+-sqrt(3 / fan_in)), fan_in = I/G * kh * kw.
c2_xavier_fill: Initializer = jax.nn.initializers.variance_scaling(1.0, "fan_in", "uniform")


# --- Normalization layers. Variable names equal detectron2's buffer / parameter names ---


class FrozenBatchNorm(nnx.Module):
  """detectron2 ``FrozenBatchNorm2d``: a fixed per-channel affine map, eps 1e-5.

  ``y = x * s + (bias - running_mean * s)``, ``s = weight * rsqrt(running_var + eps)``, all in
  float32 like detectron2 (also with a bfloat16 ``dtype``, where only the result is rounded).
  Fresh values are the identity (running_var = 1 - eps).
  """

  def __init__(self, num_features: int, *, eps: float = 1e-5, dtype: DType = jnp.float32,
               param_dtype: DType = jnp.float32):
    self.num_features = num_features
    self.eps = eps
    self.dtype = dtype
    self.weight = FrozenStat(jnp.ones((num_features,), param_dtype))
    self.bias = FrozenStat(jnp.zeros((num_features,), param_dtype))
    self.running_mean = FrozenStat(jnp.zeros((num_features,), param_dtype))
    self.running_var = FrozenStat(jnp.full((num_features,), 1.0 - eps, param_dtype))

  def __call__(self, x: Array) -> Array:
    """x: (N, H, W, C) -> (N, H, W, C) in ``dtype``."""
    f32 = lambda v: v.astype(jnp.float32)
    scale = f32(self.weight[...]) * jax.lax.rsqrt(f32(self.running_var[...]) + self.eps)
    shift = f32(self.bias[...]) - f32(self.running_mean[...]) * scale
    scale, shift = jax.lax.stop_gradient((scale, shift))
    y = x.astype(jnp.float32) * scale + shift
    return y.astype(self.dtype)


class BatchNorm(nnx.Module):
  """PyTorch ``BatchNorm2d`` semantics (momentum 0.1, eps 1e-5, unbiased running variance).

  In train mode (``use_running_average=False``) normalizes with the batch statistics over
  (N, H, W) and updates ``running_mean`` / ``running_var``. Under ``jit`` with a batch sharded
  across devices the mean is global, i.e. this behaves like SyncBN. Switch modes with
  ``module.eval()`` / ``module.train()`` or ``nnx.view(module, use_running_average=...)``.
  """

  def __init__(self, num_features: int, *, eps: float = 1e-5, momentum: float = 0.1,
               use_running_average: bool = False, dtype: DType = jnp.float32,
               param_dtype: DType = jnp.float32):
    self.num_features = num_features
    self.eps = eps
    self.momentum = momentum
    self.use_running_average = use_running_average
    self.dtype = dtype
    self.weight = nnx.Param(jnp.ones((num_features,), param_dtype))
    self.bias = nnx.Param(jnp.zeros((num_features,), param_dtype))
    self.running_mean = nnx.BatchStat(jnp.zeros((num_features,), param_dtype))
    self.running_var = nnx.BatchStat(jnp.ones((num_features,), param_dtype))

  def set_view(self, use_running_average: bool | None = None):
    """Used by ``nnx.view``."""
    if use_running_average is not None:
      self.use_running_average = use_running_average

  def __call__(self, x: Array) -> Array:
    """x: (N, H, W, C) -> (N, H, W, C) in ``dtype`` (statistics in float32)."""
    # bf16 sums over N*H*W elements would lose the mean; the statistics need float32.
    x = x.astype(jnp.float32)
    if self.use_running_average:
      mean = self.running_mean[...].astype(jnp.float32)
      var = self.running_var[...].astype(jnp.float32)
    else:
      axes = tuple(range(x.ndim - 1))
      mean = jnp.mean(x, axis=axes)
      var = jnp.mean(jnp.square(x - mean), axis=axes)
      n = x.size // x.shape[-1]
      unbiased = var * (n / max(n - 1, 1))
      m = self.momentum
      stat_dtype = self.running_mean[...].dtype
      self.running_mean[...] = ((1 - m) * self.running_mean[...]
                                + m * jax.lax.stop_gradient(mean)).astype(stat_dtype)
      self.running_var[...] = ((1 - m) * self.running_var[...]
                               + m * jax.lax.stop_gradient(unbiased)).astype(stat_dtype)
    scale = self.weight[...].astype(jnp.float32) * jax.lax.rsqrt(var + self.eps)
    return ((x - mean) * scale + self.bias[...].astype(jnp.float32)).astype(self.dtype)


class GroupNorm(nnx.Module):
  """PyTorch ``GroupNorm(num_groups, C, eps=1e-5)`` on NHWC input (two-pass variance).

  Channel ``c`` belongs to group ``c // (C / num_groups)``, as in PyTorch.
  """

  def __init__(self, num_groups: int, num_channels: int, *, eps: float = 1e-5,
               param_type: type[nnx.Variable] = nnx.Param, dtype: DType = jnp.float32,
               param_dtype: DType = jnp.float32):
    if num_channels % num_groups:
      raise ValueError(f"GroupNorm: {num_channels} channels not divisible by {num_groups} groups")
    self.num_groups = num_groups
    self.num_channels = num_channels
    self.eps = eps
    self.dtype = dtype
    self.frozen = issubclass(param_type, Frozen)
    self.weight = param_type(jnp.ones((num_channels,), param_dtype))
    self.bias = param_type(jnp.zeros((num_channels,), param_dtype))

  def __call__(self, x: Array) -> Array:
    """x: (N, H, W, C) -> (N, H, W, C) in ``dtype`` (statistics in float32)."""
    # Group statistics over H*W*C/G elements are too coarse in bf16; normalize in float32.
    x = x.astype(jnp.float32)
    shape = x.shape
    g = x.reshape(shape[:-1] + (self.num_groups, shape[-1] // self.num_groups))
    axes = tuple(range(1, x.ndim - 1)) + (x.ndim,)
    mean = jnp.mean(g, axis=axes, keepdims=True)
    var = jnp.mean(jnp.square(g - mean), axis=axes, keepdims=True)
    y = ((g - mean) * jax.lax.rsqrt(var + self.eps)).reshape(shape)
    weight, bias = self.weight[...].astype(jnp.float32), self.bias[...].astype(jnp.float32)
    if self.frozen:
      weight, bias = jax.lax.stop_gradient((weight, bias))
    return (y * weight + bias).astype(self.dtype)


def get_norm(norm: str | None, channels: int, *, frozen: bool = False, dtype: DType = jnp.float32,
             param_dtype: DType = jnp.float32) -> nnx.Module | None:
  """detectron2 ``get_norm`` for the backbone norms.

  ``norm``: "" / None (no norm: returns None), "FrozenBN", "BN" (also "SyncBN"), or "GN" (32
  groups). ``frozen``: the norm belongs to a frozen stage; as in detectron2's ``freeze()``, BN
  becomes FrozenBN and GN keeps its affine parameters fixed (``FrozenParam``).
  """
  if not norm:
    return None
  kw = dict(dtype=dtype, param_dtype=param_dtype)
  if norm == "FrozenBN":
    return FrozenBatchNorm(channels, **kw)
  if norm in ("BN", "SyncBN"):
    return FrozenBatchNorm(channels, **kw) if frozen else BatchNorm(channels, **kw)
  if norm == "GN":
    return GroupNorm(32, channels, param_type=FrozenParam if frozen else nnx.Param, **kw)
  raise ValueError(f"unknown norm {norm!r}")


# --- Convolution and dense layers ---


def _pair(v: int | tuple[int, int]) -> tuple[int, int]:
  return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


class Conv2d(nnx.Module):
  """detectron2 ``Conv2d``: PyTorch conv (explicit symmetric padding, groups) + optional norm.

  The conv runs in ``dtype``: input, kernel and bias are cast to it, the variables (created in
  ``param_dtype``) are left as they are. ``precision``: see :func:`resolve_precision` (None:
  HIGHEST for float32).

  Attributes:
    kernel: (kh, kw, I/G, O) HWIO; detectron2 ``weight`` is (O, I/G, kh, kw).
    bias: (O,) or None.
    norm: a norm module applied after the conv, or None.
  """

  def __init__(self, in_channels: int, out_channels: int, kernel_size: int | tuple[int, int], *,
               stride: int | tuple[int, int] = 1, padding: int | tuple[int, int] = 0,
               dilation: int | tuple[int, int] = 1, groups: int = 1, use_bias: bool = True,
               norm: nnx.Module | None = None, kernel_init: Initializer = c2_msra_fill,
               bias_init: Initializer = jax.nn.initializers.zeros,
               param_type: type[nnx.Variable] = nnx.Param, dtype: DType = jnp.float32,
               param_dtype: DType = jnp.float32, precision: jax.lax.PrecisionLike = None,
               rngs: nnx.Rngs):
    if in_channels % groups or out_channels % groups:
      raise ValueError(f"channels {in_channels}->{out_channels} not divisible by groups={groups}")
    kh, kw = _pair(kernel_size)
    self.in_channels = in_channels
    self.out_channels = out_channels
    self.stride = _pair(stride)
    self.padding = _pair(padding)
    self.dilation = _pair(dilation)
    self.groups = groups
    self.dtype = dtype
    self.precision = precision
    self.frozen = issubclass(param_type, Frozen)
    self.kernel = param_type(
        kernel_init(rngs.params(), (kh, kw, in_channels // groups, out_channels), param_dtype))
    self.bias = (param_type(bias_init(rngs.params(), (out_channels,), param_dtype))
                 if use_bias else None)
    self.norm = norm

  def __call__(self, x: Array) -> Array:
    """x: (N, H, W, I) -> (N, H', W', O) in ``dtype``,
    H' = (H + 2p - d(k-1) - 1) // s + 1 as in PyTorch."""
    kernel = self.kernel[...]
    bias = self.bias[...] if self.bias is not None else None
    if self.frozen:
      kernel, bias = jax.lax.stop_gradient((kernel, bias))
    dtype = self.dtype
    ph, pw = self.padding
    # ops.conv2d: XLA's own kernel gradient of a conv is 4-10x slower on CPU (see its docs).
    y = conv_lib.conv2d(x.astype(dtype), kernel.astype(dtype), stride=self.stride,
                        padding=((ph, ph), (pw, pw)), dilation=self.dilation, groups=self.groups,
                        precision=resolve_precision(dtype, self.precision))
    if bias is not None:
      y = y + bias.astype(dtype)
    if self.norm is not None:
      y = self.norm(y)
    return y


class Linear(nnx.Module):
  """PyTorch ``nn.Linear`` on the last axis; ``kernel`` is ``(in, out)`` (= PyTorch weight.T).

  Like :class:`Conv2d`: computes in ``dtype`` (input, kernel and bias cast), variables in
  ``param_dtype``, ``precision`` None = HIGHEST for float32 (:func:`resolve_precision`).
  """

  def __init__(self, in_features: int, out_features: int, *,
               kernel_init: Initializer = c2_xavier_fill,
               bias_init: Initializer = jax.nn.initializers.zeros,
               dtype: DType = jnp.float32, param_dtype: DType = jnp.float32,
               precision: jax.lax.PrecisionLike = None, rngs: nnx.Rngs):
    self.in_features = in_features
    self.out_features = out_features
    self.dtype = dtype
    self.precision = precision
    self.kernel = nnx.Param(kernel_init(rngs.params(), (in_features, out_features), param_dtype))
    self.bias = nnx.Param(bias_init(rngs.params(), (out_features,), param_dtype))

  def __call__(self, x: Array) -> Array:
    """x: ``[..., in]`` -> ``[..., out]`` in ``dtype``."""
    dtype = self.dtype
    y = jnp.matmul(x.astype(dtype), self.kernel[...].astype(dtype),
                   precision=resolve_precision(dtype, self.precision))
    return y + self.bias[...].astype(dtype)


class PointwiseConv1d(Linear):
  """PyTorch ``Conv1d(kernel_size=1)`` applied per point: a :class:`Linear` on ``[R, P, in]``.

  Only the checkpoint layout differs: detectron2 stores ``weight`` as ``(out, in, 1)``
  (:func:`d2_names_of` / :func:`load_d2_state` handle it).
  """


def max_pool2d(x: Array, kernel_size: int, stride: int, padding: int) -> Array:
  """PyTorch ``max_pool2d`` (floor mode; padding acts as -inf). x: (N, H, W, C)."""
  return jax.lax.reduce_window(
      x, -jnp.inf, jax.lax.max, (1, kernel_size, kernel_size, 1), (1, stride, stride, 1),
      ((0, 0), (padding, padding), (padding, padding), (0, 0)))


# --- detectron2 state-dict names <-> module variables ---


def _d2_variables(module: nnx.Module, prefix: str, renames: Mapping[str, str] | None
                  ) -> Iterator[tuple[str, tuple[int, ...], nnx.Variable]]:
  """``(detectron2 name, PyTorch shape, variable)`` of every variable (see :func:`d2_names_of`)."""
  nodes = dict(nnx.iter_graph(module))  # children come before their parents
  for path, var in nodes.items():
    if not isinstance(var, nnx.Variable) or isinstance(var, nnx.RngState):
      continue
    *parents, leaf = path
    shape = tuple(int(s) for s in var.get_value().shape)
    if leaf == "kernel":
      leaf = "weight"
      if len(shape) == 4:  # HWIO -> OIHW
        shape = (shape[3], shape[2], shape[0], shape[1])
      elif len(shape) == 2:
        conv1d = isinstance(nodes[tuple(parents)], PointwiseConv1d)
        shape = shape[::-1] + ((1,) if conv1d else ())
      else:
        raise ValueError(f"no PyTorch layout rule for kernel {path} of shape {shape}")
    name = prefix + ".".join(str(p) for p in (*parents, leaf))
    old = next((o for o in renames or {} if name.startswith(o)), None)
    if old is not None:
      name = renames[old] + name[len(old):]
    yield name, shape, var


def d2_names_of(module: nnx.Module, prefix: str = "", renames: Mapping[str, str] | None = None
                ) -> dict[str, tuple[int, ...]]:
  """Returns ``{detectron2 name: PyTorch-layout shape}`` for every variable of ``module``.

  Works on abstract modules (``nnx.eval_shape``) too. Names are the module paths joined with
  ``.`` after ``prefix``, then the first matching ``renames`` entry (``{name prefix: detectron2
  prefix}``) applied; ``kernel`` becomes ``weight`` (4-D: OIHW, 2-D: (out, in), a
  :class:`PointwiseConv1d`'s: (out, in, 1)).
  """
  return {name: shape for name, shape, _ in _d2_variables(module, prefix, renames)}


def load_d2_state(module: nnx.Module, state: Mapping[str, np.ndarray], prefix: str = "",
                  renames: Mapping[str, str] | None = None, *, strict: bool = True) -> set[str]:
  """Assigns detectron2 (PyTorch-layout) arrays to the variables of ``module`` in place.

  ``module`` may be abstract (``nnx.eval_shape``; its variables get the loaded arrays).
  ``state`` is flat ``{detectron2 name: array}``; names as in :func:`d2_names_of` (``prefix``
  the name prefix of ``module``, e.g. ``"backbone."``); entries outside ``module`` are ignored.
  Returns the names used.

  Raises:
    KeyError: (``strict``) variables without an entry, listed; otherwise they keep their value.
    ValueError: an entry's shape differs from the module's, naming the entry.
  """
  used, missing = set(), []
  for name, torch_shape, var in _d2_variables(module, prefix, renames):
    if name not in state:
      missing.append(name)
      continue
    array = np.asarray(state[name])
    if tuple(array.shape) != torch_shape:
      raise ValueError(f"{name}: checkpoint shape {tuple(array.shape)} != expected {torch_shape}")
    current = var.get_value()
    if current.ndim == 4:
      array = np.transpose(array, (2, 3, 1, 0))  # OIHW -> HWIO (grouped: same group order)
    elif current.ndim == 2:
      array = np.transpose(array.reshape(torch_shape[:2]))  # (out, in[, 1]) -> (in, out)
    var.set_value(jnp.asarray(array, dtype=current.dtype))
    used.add(name)
  if strict and missing:
    raise KeyError(f"{len(missing)} entries missing from the state dict: {missing[:20]}"
                   + (" ..." if len(missing) > 20 else ""))
  return used
