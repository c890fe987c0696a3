"""2-D convolution whose kernel gradient is computed as matrix products on CPU.

JAX differentiates ``conv_general_dilated`` w.r.t. the kernel with another convolution whose
"window" is the whole output map (``window={size=200x336}`` for a p2 map of an 800x1344 image).
XLA:CPU runs that form at 1-5 GFLOP/s: in the R50-FPN PointRend train step at 800x1344 the
kernel gradients of the three p2-resolution convs alone (FPN output 3x3, RPN 3x3, FPN lateral
1x1) took 39 s of a 72 s step (``bench/train.py``, profile in ``docs/performance.md``).

:func:`conv2d` is the same forward convolution with a custom VJP: the input gradient is JAX's
own transposed convolution, the kernel gradient is, for each of the ``kh * kw`` taps, one
``[I, N*Ho*Wo] x [N*Ho*Wo, O]`` matrix product of the (strided, shifted) input with the output
gradient -- what the kernel gradient is, written in the form every backend runs at full speed.
The results equal JAX's to float32 summation order. The form is chosen per platform when the
program is lowered (``jax.lax.platform_dependent``): CPU takes the per-tap form, GPU and TPU
JAX's native gradient convolutions, which their compilers run fast.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp

__all__ = ["conv2d"]

Array = jax.Array
_DIMS = ("NHWC", "HWIO", "NHWC")


def conv2d(x: Array, kernel: Array, *, stride: Sequence[int] = (1, 1),
           padding: Sequence[Sequence[int]] = ((0, 0), (0, 0)),
           dilation: Sequence[int] = (1, 1), groups: int = 1,
           precision: jax.lax.PrecisionLike = None) -> Array:
  """``lax.conv_general_dilated`` (NHWC x HWIO) with a matmul kernel gradient.

  Args:
    x: ``[N, H, W, I]``.
    kernel: ``[kh, kw, I / groups, O]``, same dtype as ``x``.
    stride: ``(sh, sw)``.
    padding: ``((top, bottom), (left, right))``, non-negative.
    dilation: kernel dilation ``(dh, dw)``.
    groups: ``feature_group_count``.
    precision: conv / matmul precision (also used for both gradients).

  Returns:
    ``[N, Ho, Wo, O]``, ``Ho = (H + top + bottom - dh (kh - 1) - 1) // sh + 1`` (PyTorch's).
    Differentiable in reverse mode w.r.t. ``x`` and ``kernel`` (no forward mode).
  """
  stride = tuple(int(s) for s in stride)
  padding = tuple((int(a), int(b)) for a, b in padding)
  dilation = tuple(int(d) for d in dilation)
  if any(p < 0 for pair in padding for p in pair):
    raise ValueError(f"conv2d: negative padding {padding}")
  return _conv(x, kernel, stride, padding, dilation, int(groups), precision)


def _plain(x, kernel, stride, padding, dilation, groups, precision):
  return jax.lax.conv_general_dilated(
      x, kernel, window_strides=stride, padding=padding, rhs_dilation=dilation,
      dimension_numbers=_DIMS, feature_group_count=groups, precision=precision)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4, 5, 6))
def _conv(x, kernel, stride, padding, dilation, groups, precision):
  return _plain(x, kernel, stride, padding, dilation, groups, precision)


def _conv_fwd(x, kernel, stride, padding, dilation, groups, precision):
  return _plain(x, kernel, stride, padding, dilation, groups, precision), (x, kernel)


def _conv_bwd(stride, padding, dilation, groups, precision, res, dy):
  x, kernel = res
  args = (stride, padding, dilation, groups, precision)
  # Chosen per platform when the program is lowered (for every platform of a multi-platform
  # jax.export artifact): XLA:CPU runs the kernel gradient fast only in the per-tap matmul form;
  # XLA:GPU and XLA:TPU have fast native convolution gradients.
  return jax.lax.platform_dependent(
      x, kernel, dy, cpu=lambda *a: _taps_backward(*a, *args),
      default=lambda *a: _native_backward(*a, *args))


def _native_backward(x, kernel, dy, stride, padding, dilation, groups, precision):
  """JAX's own gradients of the convolution (``jax.vjp``)."""
  _, vjp = jax.vjp(
      lambda v, k: _plain(v, k, stride, padding, dilation, groups, precision), x, kernel)
  return vjp(dy)


def _taps_backward(x, kernel, dy, stride, padding, dilation, groups, precision):
  """The input gradient as an ordinary convolution and the kernel gradient per tap (CPU)."""
  dx = _input_grad(dy, kernel, x.shape, stride, padding, dilation, groups, precision)
  dk = _kernel_grad(x, dy, kernel.shape, stride, padding, dilation, groups, precision)
  return dx, dk.astype(kernel.dtype)


def _input_grad(dy: Array, kernel: Array, x_shape: tuple[int, ...], stride, padding, dilation,
                groups: int, precision) -> Array:
  """``dL/dx``: the transposed convolution, with its kernel materialised in HWIO.

  JAX's own transpose rule convolves with a reversed kernel in ``01oi`` layout. Inside a loop
  body (the train step maps over virtual replicas with ``lax.map``) XLA:CPU then used its slow
  generic convolution for it (5.2 s instead of ~1 s for a p2 3x3 conv); an explicit flipped,
  I/O-swapped HWIO kernel keeps it an ordinary fast convolution.
  """
  kh, kw, ig, o = kernel.shape
  og = o // groups
  # K'[a, b, o', g*ig + i] = K[kh-1-a, kw-1-b, i, g*og + o'].
  flipped = kernel[::-1, ::-1].reshape(kh, kw, ig, groups, og)
  flipped = jnp.transpose(flipped, (0, 1, 4, 3, 2)).reshape(kh, kw, og, groups * ig)
  pads = []
  for size, k, s, d, (lo, _), out in zip(x_shape[1:3], (kh, kw), stride, dilation, padding,
                                           dy.shape[1:3]):
    before = d * (k - 1) - lo
    after = size - (out - 1) * s - 1 + lo
    pads.append((before, after))
  return jax.lax.conv_general_dilated(
      dy, flipped, window_strides=(1, 1), padding=pads, lhs_dilation=stride,
      rhs_dilation=dilation, dimension_numbers=_DIMS, feature_group_count=groups,
      precision=precision)


_conv.defvjp(_conv_fwd, _conv_bwd)


def _kernel_grad(x: Array, dy: Array, kernel_shape: tuple[int, ...], stride, padding, dilation,
                 groups: int, precision) -> Array:
  """``dL/dkernel [kh, kw, I/G, O]``: per tap ``(i, j)``, ``dy^T`` times the input pixels that
  the tap multiplies.

  Layout matters more than FLOPs on CPU: ``dy`` is transposed to ``[O, K]`` once and is the
  left operand of every tap's product, the input is the right operand in its own ``[K, I]``
  layout (no per-tap transpose). With stride 1, the input is flattened to ``[N*Hp*Wp, I]`` and
  ``dy`` zero-padded to the padded map's ``Hp x Wp`` grid: tap ``(i, j)`` is then the contiguous
  row window starting at ``i*dh*Wp + j*dw`` (rows that wrap into the next line or image meet a
  zero of the padded ``dy``), so no strided copy of the input is made either.
  """
  kh, kw, ig, o = kernel_shape
  n, _, _, c = x.shape
  _, ho, wo, _ = dy.shape
  sh, sw = stride
  dh, dw = dilation
  og = o // groups
  xp = jnp.pad(x, ((0, 0), padding[0], padding[1], (0, 0)))
  _, hp, wp, _ = xp.shape
  contiguous = (sh, sw) == (1, 1) and hp == ho + dh * (kh - 1) and wp == wo + dw * (kw - 1)
  if contiguous:
    span = (kh - 1) * dh * wp + (kw - 1) * dw
    rows = n * hp * wp - span
    dyp = jnp.pad(dy, ((0, 0), (0, hp - ho), (0, wp - wo), (0, 0))).reshape(n * hp * wp, o)
    lhs = dyp[:rows]
    xflat = xp.reshape(n * hp * wp, c)
  else:
    rows = n * ho * wo
    lhs = dy.reshape(rows, o)
  # [O, K] (groups: [G, O/G, K]), transposed once for all taps.
  lhs_t = (jnp.transpose(lhs) if groups == 1
           else jnp.transpose(lhs.reshape(rows, groups, og), (1, 2, 0)))
  taps = []
  for i in range(kh):
    for j in range(kw):
      y0, x0 = i * dh, j * dw
      if contiguous:
        off = y0 * wp + x0
        rhs = jax.lax.slice_in_dim(xflat, off, off + rows, axis=0)
      else:
        rhs = jax.lax.slice(xp, (0, y0, x0, 0),
                            (n, y0 + sh * (ho - 1) + 1, x0 + sw * (wo - 1) + 1, c),
                            (1, sh, sw, 1)).reshape(rows, c)
      if groups == 1:
        tap = jnp.dot(lhs_t, rhs, precision=precision, preferred_element_type=jnp.float32)
      else:
        tap = jnp.einsum("gok,kgi->goi", lhs_t, rhs.reshape(rows, groups, ig),
                         precision=precision, preferred_element_type=jnp.float32)
      taps.append(tap.reshape(o, ig))
  # [kh*kw, O, I/G] -> [kh, kw, I/G, O]
  return jnp.transpose(jnp.stack(taps), (0, 2, 1)).reshape(kh, kw, ig, o)
