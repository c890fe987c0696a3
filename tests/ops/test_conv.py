"""conv2d: same forward as lax.conv_general_dilated, gradients equal to JAX's own.

Both backward forms (the per-tap form CPU lowers, the native one GPU/TPU lower) run on CPU here.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pointrend_jax.ops import conv as conv_lib
from pointrend_jax.ops.conv import conv2d

HIGHEST = jax.lax.Precision.HIGHEST


def _force_backward(monkeypatch, which):
  """Makes conv2d's backward lower the ``which`` form (taps: CPU's; native: GPU/TPU's)."""
  monkeypatch.setattr(jax.lax, "platform_dependent",
                      lambda *args, cpu, default: (cpu if which == "taps" else default)(*args))


def _reference(x, k, stride, padding, dilation, groups):
  return jax.lax.conv_general_dilated(x, k, stride, padding, rhs_dilation=dilation,
                                      dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                      feature_group_count=groups, precision=HIGHEST)


@pytest.mark.parametrize("ksize,stride,pad,dilation,groups", [
    (3, 1, 1, 1, 1),  # FPN output / RPN conv
    (1, 1, 0, 1, 1),  # lateral / bottleneck 1x1
    (1, 2, 0, 1, 1),  # shortcut with stride 2
    (3, 2, 1, 1, 1),  # stride-2 3x3 (res3+ first block)
    (7, 2, 3, 1, 1),  # stem
    (3, 2, 1, 1, 4),  # ResNeXt grouped 3x3
    (3, 1, 2, 2, 1),  # dilated
    (2, 1, 0, 1, 1),  # even kernel, odd map: the last row/column is never used
])
@pytest.mark.parametrize("backward", ["taps", "native"])
def test_forward_and_gradients_match_jax(ksize, stride, pad, dilation, groups, backward,
                                         monkeypatch):
  _force_backward(monkeypatch, backward)
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((2, 13, 11, 8), dtype=np.float32))
  k = jnp.asarray(rng.standard_normal((ksize, ksize, 8 // groups, 12), dtype=np.float32))
  args = ((stride, stride), ((pad, pad), (pad, pad)), (dilation, dilation), groups)
  ours = lambda x, k: conv2d(x, k, stride=args[0], padding=args[1], dilation=args[2],
                             groups=groups, precision=HIGHEST)
  ref = lambda x, k: _reference(x, k, *args)
  y, y_ref = ours(x, k), ref(x, k)
  np.testing.assert_array_equal(np.asarray(y), np.asarray(y_ref))
  dy = jnp.asarray(rng.standard_normal(y.shape, dtype=np.float32))
  loss = lambda f: lambda x, k: jnp.sum(f(x, k) * dy)
  gx, gk = jax.jit(jax.grad(loss(ours), argnums=(0, 1)))(x, k)
  rx, rk = jax.jit(jax.grad(loss(ref), argnums=(0, 1)))(x, k)
  np.testing.assert_allclose(np.asarray(gx), np.asarray(rx), rtol=1e-5, atol=1e-4)
  np.testing.assert_allclose(np.asarray(gk), np.asarray(rk), rtol=1e-5, atol=1e-4)


def test_bfloat16_kernel_gradient_keeps_dtype_and_value(monkeypatch):
  _force_backward(monkeypatch, "taps")
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.standard_normal((1, 9, 9, 4), dtype=np.float32))
  k = jnp.asarray(rng.standard_normal((3, 3, 4, 6), dtype=np.float32))
  f = lambda k: jnp.sum(conv2d(x.astype(jnp.bfloat16), k.astype(jnp.bfloat16),
                               padding=((1, 1), (1, 1))).astype(jnp.float32))
  g = jax.grad(f)(k)
  ref = jax.grad(lambda k: jnp.sum(_reference(x, k, (1, 1), ((1, 1), (1, 1)), (1, 1), 1)))(k)
  assert g.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(g), np.asarray(ref), rtol=2e-2, atol=0.1)


def test_vmap_and_frozen_kernel(monkeypatch):
  """vmap over virtual replicas works; a kernel without gradient needs no kernel product."""
  _force_backward(monkeypatch, "taps")
  rng = np.random.default_rng(2)
  x = jnp.asarray(rng.standard_normal((3, 2, 6, 6, 4), dtype=np.float32))
  k = jnp.asarray(rng.standard_normal((3, 3, 4, 5), dtype=np.float32))
  f = lambda x, k: jnp.sum(conv2d(x, k, padding=((1, 1), (1, 1)), precision=HIGHEST) ** 2)
  g = jax.vmap(jax.grad(f, argnums=1), in_axes=(0, None))(x, k)
  ref = jnp.stack([jax.grad(lambda k: jnp.sum(_reference(xi, k, (1, 1), ((1, 1), (1, 1)),
                                                         (1, 1), 1) ** 2))(k) for xi in x])
  np.testing.assert_allclose(np.asarray(g), np.asarray(ref), rtol=1e-5, atol=1e-3)
  gx = jax.grad(lambda x: f(x, jax.lax.stop_gradient(k)))(x[0])
  assert gx.shape == x[0].shape


def test_backward_form_is_chosen_per_platform():
  """CPU lowers the per-tap kernel gradient (one dot per tap), CUDA and TPU JAX's native
  gradient convolutions (no dot at all)."""
  from jax import export
  x = jax.ShapeDtypeStruct((1, 16, 16, 8), jnp.float32)
  k = jax.ShapeDtypeStruct((3, 3, 8, 8), jnp.float32)
  grad = jax.jit(jax.grad(lambda x, k: jnp.sum(conv2d(x, k, padding=((1, 1), (1, 1)))),
                          argnums=1))
  for platform, dots in (("cpu", 9), ("cuda", 0), ("tpu", 0)):
    text = export.export(grad, platforms=(platform,))(x, k).mlir_module()
    assert text.count("stablehlo.dot_general") == dots, platform
    assert ("stablehlo.convolution" in text) == (dots == 0), platform
