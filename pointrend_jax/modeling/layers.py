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

Precision is set at trace time, model-wide: :func:`conv_precision` (HIGHEST by default: true
float32 matmuls on GPU/TPU) and :func:`compute_dtype` (float32 by default; bfloat16 activations
with float32 variables, see ``docs/architecture.md``, "Precision").
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pointrend_jax.ops import conv as conv_lib

Array = jax.Array
Initializer = Callable[..., Array]


class Frozen(nnx.Variable):
  """Base type of every variable that must never be updated by the optimizer."""


class FrozenParam(Frozen):
  """A parameter of a frozen stage (detectron2 ``requires_grad=False``)."""


class FrozenStat(Frozen):
  """A FrozenBatchNorm buffer (never trained, never updated)."""


# Filter of the variables an optimizer should update.
TRAINABLE = nnx.Param

# --------------------------------------------------------------------------------------------------
# Convolution precision.
# --------------------------------------------------------------------------------------------------

# HIGHEST keeps float32 convs in true float32 on GPU/TPU (the default would use TF32 / bf16
# passes, which breaks 1e-5 parity with detectron2's float32 reference). Lower it for speed in
# training if wanted. Read at trace time: changing it does not retrace already-jitted functions.
_CONV_PRECISION: jax.lax.PrecisionLike = jax.lax.Precision.HIGHEST


def get_conv_precision() -> jax.lax.PrecisionLike:
  """Returns the precision used by :class:`Conv2d` modules whose ``precision`` is ``None``."""
  return _CONV_PRECISION


def set_conv_precision(precision: jax.lax.PrecisionLike) -> None:
  """Sets the default conv precision (e.g. ``"highest"``, ``"default"``); affects new traces."""
  global _CONV_PRECISION
  _CONV_PRECISION = precision


@contextlib.contextmanager
def conv_precision(precision: jax.lax.PrecisionLike) -> Iterator[None]:
  """Context manager that temporarily sets the default conv precision (trace time)."""
  old = get_conv_precision()
  set_conv_precision(precision)
  try:
    yield
  finally:
    set_conv_precision(old)


# --------------------------------------------------------------------------------------------------
# Compute dtype.
# --------------------------------------------------------------------------------------------------

# dtype of the activations and of the matmul / conv operands. Variables stay float32 whatever it
# is (so gradients and optimizer state are float32 too); Conv2d and Linear cast their input and
# parameters to it, norms compute their statistics in float32 and return it, and every head whose
# outputs feed box decoding, sampling or a loss casts them back to float32. float32 is the parity
# setting (casts to the same dtype are no-ops: bit-identical to a model without this option).
# Read at trace time, like the conv precision.
_COMPUTE_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16))
_COMPUTE_DTYPE: jnp.dtype = jnp.dtype(jnp.float32)


def canonical_compute_dtype(dtype: Any) -> jnp.dtype:
  """``None`` / ``"float32"`` / ``"bfloat16"`` / a jnp or numpy dtype -> the numpy dtype.

  Raises:
    ValueError: any other dtype (float16 would need loss scaling, which is not implemented).
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


def get_compute_dtype() -> jnp.dtype:
  """The dtype layers compute in (float32 unless set; see :func:`compute_dtype`)."""
  return _COMPUTE_DTYPE


def set_compute_dtype(dtype: Any) -> None:
  """Sets the compute dtype (None / "float32" / "bfloat16" / a dtype); affects new traces."""
  global _COMPUTE_DTYPE
  _COMPUTE_DTYPE = canonical_compute_dtype(dtype)


@contextlib.contextmanager
def compute_dtype(dtype: Any) -> Iterator[None]:
  """Context manager that temporarily sets the compute dtype (trace time).

  Wrap the *tracing* of a function (its first call under ``jit``, or ``.lower()``): an already
  traced and cached function keeps the dtype it was traced with. Parameters stay float32.
  """
  old = get_compute_dtype()
  set_compute_dtype(dtype)
  try:
    yield
  finally:
    set_compute_dtype(old)


# --------------------------------------------------------------------------------------------------
# Initializers (HWIO conv kernels or (in, out) dense kernels; fan computed like PyTorch).
# --------------------------------------------------------------------------------------------------

# fvcore c2_msra_fill: kaiming_normal_(mode="fan_out", nonlinearity="relu"), i.e. plain (not
# truncated) normal with std sqrt(2 / fan_out), fan_out = O * kh * kw (not divided by groups).
c2_msra_fill: Initializer = jax.nn.initializers.variance_scaling(2.0, "fan_out", "normal")
# fvcore c2_xavier_fill: kaiming_uniform_(a=1), i.e. U(+-sqrt(3 / fan_in)), fan_in = I/G * kh * kw.
c2_xavier_fill: Initializer = jax.nn.initializers.variance_scaling(1.0, "fan_in", "uniform")


# --------------------------------------------------------------------------------------------------
# Normalization layers. Variable names equal detectron2's buffer / parameter names.
# --------------------------------------------------------------------------------------------------


class FrozenBatchNorm(nnx.Module):
  """detectron2 ``FrozenBatchNorm2d``: a fixed per-channel affine map, eps 1e-5.

  ``y = x * s + (bias - running_mean * s)``, ``s = weight * rsqrt(running_var + eps)``, all in
  float32 like detectron2 (also under a bfloat16 compute dtype, where only the result is
  rounded). Fresh values are the identity (running_var = 1 - eps).
  """

  def __init__(self, num_features: int, *, eps: float = 1e-5):
    self.num_features = num_features
    self.eps = eps
    self.weight = FrozenStat(jnp.ones((num_features,), jnp.float32))
    self.bias = FrozenStat(jnp.zeros((num_features,), jnp.float32))
    self.running_mean = FrozenStat(jnp.zeros((num_features,), jnp.float32))
    self.running_var = FrozenStat(jnp.full((num_features,), 1.0 - eps, jnp.float32))

  def __call__(self, x: Array) -> Array:
    """x: (N, H, W, C) -> (N, H, W, C) in the compute dtype."""
    scale = self.weight[...] * jax.lax.rsqrt(self.running_var[...] + self.eps)
    shift = self.bias[...] - self.running_mean[...] * scale
    scale, shift = jax.lax.stop_gradient((scale, shift))
    y = x.astype(jnp.float32) * scale + shift
    return y.astype(get_compute_dtype())


class BatchNorm(nnx.Module):
  """PyTorch ``BatchNorm2d`` semantics (momentum 0.1, eps 1e-5, unbiased running variance).

  In train mode (``use_running_average=False``) normalizes with the batch statistics over
  (N, H, W) and updates ``running_mean`` / ``running_var``. Under ``jit`` with a batch sharded
  across devices the mean is global, i.e. this behaves like SyncBN. Switch modes with
  ``module.eval()`` / ``module.train()`` or ``nnx.view(module, use_running_average=...)``.
  """

  def __init__(self, num_features: int, *, eps: float = 1e-5, momentum: float = 0.1,
               use_running_average: bool = False):
    self.num_features = num_features
    self.eps = eps
    self.momentum = momentum
    self.use_running_average = use_running_average
    self.weight = nnx.Param(jnp.ones((num_features,), jnp.float32))
    self.bias = nnx.Param(jnp.zeros((num_features,), jnp.float32))
    self.running_mean = nnx.BatchStat(jnp.zeros((num_features,), jnp.float32))
    self.running_var = nnx.BatchStat(jnp.ones((num_features,), jnp.float32))

  def set_view(self, use_running_average: bool | None = None):
    """Used by ``nnx.view``."""
    if use_running_average is not None:
      self.use_running_average = use_running_average

  def __call__(self, x: Array) -> Array:
    """x: (N, H, W, C) -> (N, H, W, C) in the compute dtype (statistics in float32)."""
    out_dtype = get_compute_dtype()
    # bf16 sums over N*H*W elements would lose the mean; the statistics need float32.
    x = x.astype(jnp.float32)
    if self.use_running_average:
      mean, var = self.running_mean[...], self.running_var[...]
    else:
      axes = tuple(range(x.ndim - 1))
      mean = jnp.mean(x, axis=axes)
      var = jnp.mean(jnp.square(x - mean), axis=axes)
      n = x.size // x.shape[-1]
      unbiased = var * (n / max(n - 1, 1))
      m = self.momentum
      self.running_mean[...] = (1 - m) * self.running_mean[...] + m * jax.lax.stop_gradient(mean)
      self.running_var[...] = (1 - m) * self.running_var[...] + m * jax.lax.stop_gradient(unbiased)
    scale = self.weight[...] * jax.lax.rsqrt(var + self.eps)
    return ((x - mean) * scale + self.bias[...]).astype(out_dtype)


class GroupNorm(nnx.Module):
  """PyTorch ``GroupNorm(num_groups, C, eps=1e-5)`` on NHWC input (two-pass variance).

  Channel ``c`` belongs to group ``c // (C / num_groups)``, as in PyTorch.
  """

  def __init__(self, num_groups: int, num_channels: int, *, eps: float = 1e-5,
               param_type: type[nnx.Variable] = nnx.Param):
    if num_channels % num_groups:
      raise ValueError(f"GroupNorm: {num_channels} channels not divisible by {num_groups} groups")
    self.num_groups = num_groups
    self.num_channels = num_channels
    self.eps = eps
    self.frozen = issubclass(param_type, Frozen)
    self.weight = param_type(jnp.ones((num_channels,), jnp.float32))
    self.bias = param_type(jnp.zeros((num_channels,), jnp.float32))

  def __call__(self, x: Array) -> Array:
    """x: (N, H, W, C) -> (N, H, W, C) in the compute dtype (statistics in float32)."""
    out_dtype = get_compute_dtype()
    # Group statistics over H*W*C/G elements are too coarse in bf16; normalize in float32.
    x = x.astype(jnp.float32)
    shape = x.shape
    g = x.reshape(shape[:-1] + (self.num_groups, shape[-1] // self.num_groups))
    axes = tuple(range(1, x.ndim - 1)) + (x.ndim,)
    mean = jnp.mean(g, axis=axes, keepdims=True)
    var = jnp.mean(jnp.square(g - mean), axis=axes, keepdims=True)
    y = ((g - mean) * jax.lax.rsqrt(var + self.eps)).reshape(shape)
    weight, bias = self.weight[...], self.bias[...]
    if self.frozen:
      weight, bias = jax.lax.stop_gradient((weight, bias))
    return (y * weight + bias).astype(out_dtype)


def get_norm(norm: str | None, channels: int, *, frozen: bool = False) -> nnx.Module | None:
  """detectron2 ``get_norm`` for the backbone norms.

  Args:
    norm: "" / None (no norm), "FrozenBN", "BN" (also "SyncBN"), or "GN" (32 groups).
    channels: number of channels C.
    frozen: the norm belongs to a frozen stage. As in detectron2's ``freeze()``, BN becomes
      FrozenBN and GN keeps its affine parameters fixed (``FrozenParam``).

  Returns:
    The norm module, or None.
  """
  if not norm:
    return None
  if norm == "FrozenBN":
    return FrozenBatchNorm(channels)
  if norm in ("BN", "SyncBN"):
    return FrozenBatchNorm(channels) if frozen else BatchNorm(channels)
  if norm == "GN":
    return GroupNorm(32, channels, param_type=FrozenParam if frozen else nnx.Param)
  raise ValueError(f"unknown norm {norm!r}")


# --------------------------------------------------------------------------------------------------
# Convolution.
# --------------------------------------------------------------------------------------------------


def _pair(v: int | tuple[int, int]) -> tuple[int, int]:
  return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


class Conv2d(nnx.Module):
  """detectron2 ``Conv2d``: PyTorch conv (explicit symmetric padding, groups) + optional norm.

  The conv runs in the compute dtype (:func:`compute_dtype`): input, kernel and bias are cast
  to it, the float32 variables are left as they are.

  Attributes:
    kernel: (kh, kw, I/G, O) HWIO; detectron2 ``weight`` is (O, I/G, kh, kw).
    bias: (O,) or None.
    norm: a norm module applied after the conv, or None.
  """

  def __init__(
      self,
      in_channels: int,
      out_channels: int,
      kernel_size: int | tuple[int, int],
      *,
      stride: int | tuple[int, int] = 1,
      padding: int | tuple[int, int] = 0,
      dilation: int | tuple[int, int] = 1,
      groups: int = 1,
      use_bias: bool = True,
      norm: nnx.Module | None = None,
      kernel_init: Initializer = c2_msra_fill,
      bias_init: Initializer = jax.nn.initializers.zeros,
      param_type: type[nnx.Variable] = nnx.Param,
      precision: jax.lax.PrecisionLike | None = None,
      rngs: nnx.Rngs,
  ):
    if in_channels % groups or out_channels % groups:
      raise ValueError(f"channels {in_channels}->{out_channels} not divisible by groups={groups}")
    kh, kw = _pair(kernel_size)
    self.in_channels = in_channels
    self.out_channels = out_channels
    self.stride = _pair(stride)
    self.padding = _pair(padding)
    self.dilation = _pair(dilation)
    self.groups = groups
    self.precision = precision
    self.frozen = issubclass(param_type, Frozen)
    self.kernel = param_type(
        kernel_init(rngs.params(), (kh, kw, in_channels // groups, out_channels), jnp.float32))
    self.bias = (param_type(bias_init(rngs.params(), (out_channels,), jnp.float32))
                 if use_bias else None)
    self.norm = norm

  def __call__(self, x: Array) -> Array:
    """x: (N, H, W, I) -> (N, H', W', O) in the compute dtype,
    H' = (H + 2p - d(k-1) - 1) // s + 1 as in PyTorch."""
    kernel = self.kernel[...]
    bias = self.bias[...] if self.bias is not None else None
    if self.frozen:
      kernel, bias = jax.lax.stop_gradient((kernel, bias))
    dtype = get_compute_dtype()
    ph, pw = self.padding
    # ops.conv2d: XLA's own kernel gradient of a conv is 4-10x slower on CPU (see its docs).
    y = conv_lib.conv2d(
        x.astype(dtype), kernel.astype(dtype),
        stride=self.stride,
        padding=((ph, ph), (pw, pw)),
        dilation=self.dilation,
        groups=self.groups,
        precision=self.precision if self.precision is not None else get_conv_precision(),
    )
    if bias is not None:
      y = y + bias.astype(dtype)
    if self.norm is not None:
      y = self.norm(y)
    return y


def max_pool2d(x: Array, kernel_size: int, stride: int, padding: int) -> Array:
  """PyTorch ``max_pool2d`` (floor mode; padding acts as -inf). x: (N, H, W, C)."""
  return jax.lax.reduce_window(
      x, -jnp.inf, jax.lax.max, (1, kernel_size, kernel_size, 1), (1, stride, stride, 1),
      ((0, 0), (padding, padding), (padding, padding), (0, 0)))


# --------------------------------------------------------------------------------------------------
# detectron2 state-dict names <-> module variables.
# --------------------------------------------------------------------------------------------------


def _variables(module: nnx.Module) -> Iterator[tuple[tuple[Any, ...], nnx.Variable]]:
  for path, node in nnx.iter_graph(module):
    if isinstance(node, nnx.Variable) and not isinstance(node, nnx.RngState):
      yield tuple(path), node


def _to_torch(path: tuple[Any, ...], value_shape: tuple[int, ...]) -> tuple[str, tuple[int, ...]]:
  """Maps a variable path and shape to its detectron2 name suffix and PyTorch shape."""
  *parents, leaf = path
  shape = tuple(int(s) for s in value_shape)
  if leaf == "kernel":
    leaf = "weight"
    if len(shape) == 4:  # HWIO -> OIHW
      shape = (shape[3], shape[2], shape[0], shape[1])
    elif len(shape) == 2:  # dense (in, out) -> (out, in)
      shape = shape[::-1]
    else:
      raise ValueError(f"no PyTorch layout rule for kernel {path} of shape {shape}")
  return ".".join(str(p) for p in (*parents, leaf)), shape


def _from_torch(array: np.ndarray, jax_ndim: int) -> np.ndarray:
  if jax_ndim == 4:
    return np.transpose(array, (2, 3, 1, 0))  # OIHW -> HWIO (grouped: same group order)
  if jax_ndim == 2:
    return np.transpose(array)
  return array


def d2_names_of(module: nnx.Module, prefix: str = "") -> dict[str, tuple[int, ...]]:
  """Returns ``{detectron2 name: PyTorch-layout shape}`` for every variable of ``module``.

  Works on abstract modules (``nnx.eval_shape``) too. Names are the module paths joined with
  ``.`` after ``prefix``; ``kernel`` becomes ``weight`` (4-D: OIHW, 2-D: (out, in)).
  """
  out = {}
  for path, var in _variables(module):
    name, shape = _to_torch(path, var.get_value().shape)
    out[prefix + name] = shape
  return out


def load_d2_state(module: nnx.Module, state: Mapping[str, np.ndarray], prefix: str = "",
                  *, strict: bool = True) -> set[str]:
  """Assigns detectron2 (PyTorch-layout) arrays to the variables of ``module`` in place.

  Args:
    module: the module (concrete or abstract from ``nnx.eval_shape``; abstract variables are
      replaced by the loaded arrays).
    state: flat ``{detectron2 name: array}``; entries not belonging to ``module`` are ignored.
    prefix: detectron2 name prefix of ``module`` (e.g. ``"backbone."``).
    strict: if True, a variable of ``module`` without an entry in ``state`` is an error;
      otherwise it keeps its current value.

  Returns:
    The set of names of ``state`` that were used.

  Raises:
    KeyError: missing entries (strict), listing the names.
    ValueError: an entry's shape differs from the module's, naming the entry.
  """
  used, missing = set(), []
  for path, var in _variables(module):
    current = var.get_value()
    name, torch_shape = _to_torch(path, current.shape)
    name = prefix + name
    if name not in state:
      missing.append(name)
      continue
    array = np.asarray(state[name])
    if tuple(array.shape) != torch_shape:
      raise ValueError(f"{name}: checkpoint shape {tuple(array.shape)} != expected {torch_shape}")
    var.set_value(jnp.asarray(_from_torch(array, len(current.shape)), dtype=current.dtype))
    used.add(name)
  if strict and missing:
    raise KeyError(f"{len(missing)} entries missing from the state dict: {missing[:20]}"
                   + (" ..." if len(missing) > 20 else ""))
  return used
