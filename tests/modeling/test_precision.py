"""Precision as constructor arguments: ``build_model(..., dtype, param_dtype, precision)``.

Parameters are created in ``param_dtype`` (float32); convs and matmuls compute in ``dtype``;
``precision=None`` means HIGHEST for float32 operands. Checked on the jaxpr, so nothing runs.
"""

import jax
import jax.extend.core as jcore
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from pointrend_jax.modeling import layers

HIGHEST = jax.lax.Precision.HIGHEST
F32, BF16 = jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16)
_MATMULS = ("conv_general_dilated", "dot_general")


def _matmuls(fn, *args):
  """``(primitive, lhs dtype, rhs dtype, precision)`` of every conv / dot in ``fn``'s jaxpr."""
  found = []

  def walk(jaxpr):
    for eqn in jaxpr.eqns:
      if eqn.primitive.name in _MATMULS:
        lhs, rhs = (v.aval.dtype for v in eqn.invars[:2])
        found.append((eqn.primitive.name, lhs, rhs, eqn.params["precision"]))
      for sub in jcore.jaxprs_in_params(eqn.params):
        walk(sub)

  walk(jax.make_jaxpr(fn)(*args).jaxpr)
  return found


def _precisions(found):
  return {p if p is None else tuple(p) for *_, p in found}


@pytest.mark.parametrize("make", [
    lambda **kw: layers.Conv2d(3, 4, 3, padding=1, rngs=nnx.Rngs(0), **kw),
    lambda **kw: layers.Linear(3, 4, rngs=nnx.Rngs(0), **kw),
], ids=["Conv2d", "Linear"])
def test_layer_precision_and_dtype_arguments(make):
  x = jnp.ones((1, 5, 5, 3), jnp.float32)
  # Default: float32 operands at HIGHEST (true float32 on GPU/TPU).
  found = _matmuls(make(), x)
  assert found and {(l, r) for _, l, r, _ in found} == {(F32, F32)}
  assert _precisions(found) == {(HIGHEST, HIGHEST)}
  # bfloat16: bf16 operands, the backend's default precision, float32 variables.
  layer = make(dtype=jnp.bfloat16)
  found = _matmuls(layer, x)
  assert {(l, r) for _, l, r, _ in found} == {(BF16, BF16)}
  assert _precisions(found) == {None}
  assert {v.dtype for v in jax.tree.leaves(nnx.state(layer))} == {F32}
  assert layer(x).dtype == BF16
  # An explicit precision is used as given; param_dtype sets the variables' dtype.
  found = _matmuls(make(precision="default"), x)
  assert _precisions(found) == {(jax.lax.Precision.DEFAULT,) * 2}
  assert {v.dtype for v in jax.tree.leaves(nnx.state(make(param_dtype=jnp.bfloat16)))} == {BF16}


def test_canonical_compute_dtype():
  for ok in (None, jnp.bfloat16, np.dtype("float32"), "float32", "bfloat16"):
    assert layers.canonical_compute_dtype(ok) in (F32, BF16)
  for bad in ("float16", jnp.int32, "fp8", "nonsense"):
    with pytest.raises(ValueError):
      layers.canonical_compute_dtype(bad)


def test_build_model_bfloat16_float32_params_bf16_compute():
  from pointrend_jax import build_model, zoo_config
  cfg = zoo_config("r50_fpn_1x_coco")
  model = nnx.eval_shape(lambda: build_model(cfg, rngs=nnx.Rngs(0), dtype=jnp.bfloat16))
  assert {v.dtype for v in jax.tree.leaves(nnx.state(model))} == {F32}
  graphdef, state = nnx.split(model)

  def features(state, images):
    m = nnx.merge(graphdef, state)
    return m.features(m.preprocess(images))

  images = jax.ShapeDtypeStruct((1, 64, 64, 3), jnp.uint8)
  res, fpn = jax.eval_shape(features, state, images)
  assert {a.dtype for a in (*res.values(), *fpn.values())} == {BF16}
  found = _matmuls(features, state, images)
  # 53 ResNet-50 convs + 8 FPN convs, every one on bf16 operands.
  assert len(found) == 61
  assert {(l, r) for _, l, r, _ in found} == {(BF16, BF16)}

  # The heads: bf16 matmuls, float32 outputs (boxes, scores, mask logits).
  out = jax.eval_shape(lambda s, x, hw: nnx.merge(graphdef, s).predict(x, hw), state, images,
                       jax.ShapeDtypeStruct((1, 2), jnp.int32))
  for k in ("boxes", "scores", "mask_logits"):
    assert out[k].dtype == F32, k


def test_build_model_float32_default_is_highest_float32():
  from pointrend_jax import build_model, zoo_config
  cfg = zoo_config("r50_fpn_1x_coco")
  model = nnx.eval_shape(lambda: build_model(cfg, rngs=nnx.Rngs(0)))
  graphdef, state = nnx.split(model)
  found = _matmuls(lambda s, x: nnx.merge(graphdef, s).predict(x, jnp.array([[64, 64]])),
                   state, jax.ShapeDtypeStruct((1, 64, 64, 3), jnp.uint8))
  assert len(found) > 61  # backbone, RPN head, box head, mask heads, ROIAlign
  assert {(l, r) for _, l, r, _ in found} == {(F32, F32)}
  assert _precisions(found) == {(HIGHEST, HIGHEST)}
