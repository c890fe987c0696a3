"""bfloat16 compute (``layers.compute_dtype`` / ``train.compute_dtype``): float32 variables,
gradients and optimizer state; bf16 activations; float32 head outputs, losses and boxes."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from pointrend_jax.modeling import layers
from pointrend_jax.modeling.point_rend import Linear
from pointrend_jax.training import losses_instance as L
from pointrend_jax.training import mesh as mesh_lib
from pointrend_jax.training import optimizer, train
from pointrend_jax.training.losses_semantic import semantic_loss_fn

from _tiny_batches import instance_batch, semantic_pair
from _tiny_models import tiny_instance_config, tiny_semantic_config, tiny_model

BF16 = jnp.dtype(jnp.bfloat16)
F32 = jnp.dtype(jnp.float32)

# bf16 vs float32 on the first step (same parameters, same keys), measured on CPU: instance
# total loss rel. 1.1e-4 (terms <= 2.7e-4), grad norm 7e-4; semantic total 1.7e-3 (terms
# <= 1.8e-3), grad norm 1.9e-2. Later steps drift apart (discrete proposal / point choices).
LOSS_RTOL = 1e-2
LOSS_ATOL = 2e-3


def _float_dtypes(tree):
  return {jnp.dtype(x.dtype) for x in jax.tree.leaves(tree)
          if jnp.issubdtype(jnp.dtype(x.dtype), jnp.floating)}


# --------------------------------------------------------------------------------------------------
# Layers.
# --------------------------------------------------------------------------------------------------


def test_compute_dtype_context_and_validation():
  assert layers.get_compute_dtype() == F32
  with layers.compute_dtype("bfloat16"):
    assert layers.get_compute_dtype() == BF16
    with layers.compute_dtype(None):
      assert layers.get_compute_dtype() == F32
    assert layers.get_compute_dtype() == BF16
  assert layers.get_compute_dtype() == F32
  for ok in (jnp.bfloat16, np.dtype("float32"), "float32", jnp.float32):
    assert layers.canonical_compute_dtype(ok) in (F32, BF16)
  for bad in ("float16", jnp.int32, "fp8", "nonsense"):
    with pytest.raises(ValueError):
      layers.canonical_compute_dtype(bad)
  with pytest.raises(ValueError):
    with layers.compute_dtype("float16"):
      pass
  assert layers.get_compute_dtype() == F32


def test_conv2d_bf16_output_float32_kernel_and_default_unchanged():
  conv = layers.Conv2d(5, 8, 3, stride=2, padding=1, rngs=nnx.Rngs(0))
  conv.bias[...] = jax.random.normal(jax.random.key(1), (8,))
  x = jax.random.normal(jax.random.key(2), (2, 9, 11, 5), jnp.float32)
  # The float32 conv as it was before the compute-dtype option (kernel cast to x.dtype).
  ref = jax.lax.conv_general_dilated(
      x, conv.kernel[...], (2, 2), ((1, 1), (1, 1)), rhs_dilation=(1, 1),
      dimension_numbers=("NHWC", "HWIO", "NHWC"),
      precision=jax.lax.Precision.HIGHEST) + conv.bias[...]

  out = conv(x)
  assert out.dtype == F32
  np.testing.assert_array_equal(np.asarray(out), np.asarray(ref))
  with layers.compute_dtype("float32"):
    np.testing.assert_array_equal(np.asarray(conv(x)), np.asarray(ref))

  with layers.compute_dtype("bfloat16"):
    out16 = conv(x)
    grads = nnx.grad(lambda m: jnp.sum(m(x).astype(jnp.float32) ** 2))(conv)
  assert out16.dtype == BF16
  assert conv.kernel[...].dtype == F32 and conv.bias[...].dtype == F32
  assert len(jax.tree.leaves(grads)) == 2 and _float_dtypes(grads) == {F32}
  # bf16 operands (8 bits of mantissa), float32 accumulation.
  np.testing.assert_allclose(np.asarray(out16, np.float32), np.asarray(ref), rtol=3e-2,
                             atol=3e-2 * float(jnp.abs(ref).max()))


@pytest.mark.parametrize("make_norm", [
    lambda: layers.FrozenBatchNorm(8),
    lambda: layers.BatchNorm(8),
    lambda: layers.GroupNorm(4, 8),
], ids=["FrozenBN", "BN", "GN"])
def test_norms_return_compute_dtype_with_float32_statistics(make_norm):
  norm = make_norm()
  for name in ("weight", "bias", "running_mean", "running_var"):
    if hasattr(norm, name):  # non-trivial affine parameters / statistics
      v = getattr(norm, name)
      v[...] = v[...] + jax.random.uniform(jax.random.key(len(name)), (8,))
  # bf16-exact input with a large common offset: statistics summed in bf16 would lose the
  # variance (bf16 steps are 0.5 at 100); float32 statistics give float32 results, rounded once.
  x16 = (100.0 + 4.0 * jax.random.normal(jax.random.key(0), (2, 6, 6, 8))).astype(jnp.bfloat16)
  ref = make_norm()
  nnx.update(ref, nnx.state(norm))
  out32 = ref(x16.astype(jnp.float32))
  assert out32.dtype == F32
  with layers.compute_dtype("bfloat16"):
    out16 = norm(x16)
  assert out16.dtype == BF16
  assert _float_dtypes(nnx.state(norm)) == {F32}
  np.testing.assert_allclose(np.asarray(out16, np.float32), np.asarray(out32), rtol=2 ** -8,
                             atol=1e-6)


def test_linear_bf16_and_default_unchanged():
  lin = Linear(16, 4, rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(1), (3, 16), jnp.float32)
  ref = jnp.matmul(x, lin.kernel[...], precision=jax.lax.Precision.HIGHEST) + lin.bias[...]
  np.testing.assert_array_equal(np.asarray(lin(x)), np.asarray(ref))
  with layers.compute_dtype("bfloat16"):
    y = lin(x)
  assert y.dtype == BF16 and lin.kernel[...].dtype == F32
  np.testing.assert_allclose(np.asarray(y, np.float32), np.asarray(ref), atol=0.05)


# --------------------------------------------------------------------------------------------------
# Train steps.
# --------------------------------------------------------------------------------------------------


def _semantic_batch():
  images, labels = semantic_pair()
  hw = images.shape[1]
  return {"image": np.concatenate([images] * 2), "image_size": np.full((4, 2), hw, np.int32),
          "sem_seg": np.concatenate([labels] * 2)}


def _run_steps(model, config, loss_fn, batch, dtypes_steps):
  """Runs ``steps`` train steps from the same initial state for each ``(dtype, steps)``."""
  tx, _ = optimizer.make_optimizer(config, model)
  mesh = mesh_lib.make_mesh(jax.devices()[:1])
  initial = jax.device_get(train.create_train_state(model, tx, seed=0))
  out = {}
  for dtype, steps in dtypes_steps:
    seen = []

    def recording_loss(m, b, k):
      seen.append(layers.get_compute_dtype())  # trace time
      return loss_fn(m, b, k)

    step = train.make_train_step(recording_loss, tx, mesh=mesh,
                                 num_groups=config.train.num_replicas_d2, compute_dtype=dtype)
    state = mesh_lib.replicate(initial, mesh)  # fresh buffers (the step donates its input)
    metrics = []
    for _ in range(steps):
      state, m = step(state, batch)
      metrics.append({k: float(v) for k, v in jax.device_get(m).items()})
    assert set(seen) == {jnp.dtype(dtype)}, seen
    assert layers.get_compute_dtype() == F32  # the step's context does not leak
    out[dtype] = (metrics, state, initial)
  return out


def _check_bf16_run(runs, loss_names, overfit_factor):
  m32, _, initial = runs["float32"]
  m16, state, _ = runs["bfloat16"]
  # First step: same parameters and keys, so the losses differ by bf16 rounding only.
  for k in ("loss",) + tuple(loss_names):
    np.testing.assert_allclose(m16[0][k], m32[0][k], rtol=LOSS_RTOL, atol=LOSS_ATOL, err_msg=k)
  np.testing.assert_allclose(m16[0]["grad_norm"], m32[0]["grad_norm"], rtol=5e-2)
  for m in m16:
    assert all(np.isfinite(v) for v in m.values()), m
  # Parameters, optimizer state and frozen variables stay float32, with the same structure.
  for name in ("params", "opt_state", "model_state"):
    got, want = getattr(state, name), getattr(initial, name)
    assert jax.tree.structure(got) == jax.tree.structure(want), name
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
      assert g.dtype == w.dtype and g.shape == w.shape, (name, g.dtype, w.dtype)
  assert _float_dtypes(state.params) == {F32}
  assert _float_dtypes(state.opt_state) <= {F32}
  losses = [m["loss"] for m in m16]
  assert np.mean(losses[-3:]) < overfit_factor * np.mean(losses[:3]), losses


def test_instance_train_step_bf16():
  config = tiny_instance_config()
  config.solver.update(base_lr=0.005, warmup_iters=0, steps=())
  model = tiny_model(config)
  runs = _run_steps(model, config, L.instance_loss_fn, instance_batch(),
                    (("float32", 1), ("bfloat16", 14)))
  # Same criterion as the float32 overfitting test in test_losses_instance.py.
  _check_bf16_run(runs, L.LOSS_NAMES, 0.75)


def test_semantic_train_step_bf16():
  config = tiny_semantic_config()
  config.model.overrides.point_head.train_num_points = 48
  config.solver.update(base_lr=0.001, warmup_iters=0, steps=())
  model = tiny_model(config)
  runs = _run_steps(model, config, semantic_loss_fn, _semantic_batch(),
                    (("float32", 1), ("bfloat16", 6)))
  # Measured: 21.6 -> 2.5 in 6 steps (float32: 21.6 -> 3.0).
  _check_bf16_run(runs, ("loss_sem_seg", "loss_sem_seg_point"), 0.5)


class _Toy(nnx.Module):

  def __init__(self, rngs: nnx.Rngs):
    self.conv = layers.Conv2d(3, 8, 3, padding=1, norm=layers.GroupNorm(4, 8), rngs=rngs)
    self.head = layers.Conv2d(8, 2, 1, rngs=rngs)


def test_train_loop_reads_compute_dtype(tmp_path):
  seen = []

  def loss_fn(model, batch, key):
    del key
    seen.append(layers.get_compute_dtype())
    feats = model.conv(batch["image"].astype(jnp.float32) / 255.0)
    assert feats.dtype == seen[-1]
    logits = model.head(jax.nn.relu(feats)).astype(jnp.float32)
    loss = jnp.mean(jnp.square(logits - 1.0))
    return loss, {"mse": loss}

  config = ml_collections.ConfigDict({
      "seed": 0,
      "solver": {"base_lr": 0.01, "steps": (), "warmup_iters": 0},
      "train": {"max_steps": 2, "batch_size": 2, "num_replicas_d2": 1, "log_every": 1, "checkpoint_every": 0,
                "progress_bar": False, "async_checkpointing": False,
                "compute_dtype": "bfloat16"},
  })
  image = np.random.default_rng(0).integers(0, 255, (2, 8, 8, 3)).astype(np.uint8)
  state = train.train_loop(config, str(tmp_path), _Toy(nnx.Rngs(0)), loss_fn,
                           train.InMemoryIterator([{"image": image}]))
  assert seen == [BF16]
  assert int(state.step) == 2 and _float_dtypes(state.params) == {F32}
  assert _float_dtypes(state.opt_state) <= {F32}
  config.train.compute_dtype = "float16"
  with pytest.raises(ValueError, match="float32 or bfloat16"):
    train.train_loop(config, str(tmp_path / "bad"), _Toy(nnx.Rngs(0)), loss_fn,
                     train.InMemoryIterator([{"image": image}]))


# --------------------------------------------------------------------------------------------------
# Inference.
# --------------------------------------------------------------------------------------------------


def test_instance_predict_bf16_returns_float32():
  from pointrend_jax.modeling.meta_arch import make_predict_fn
  model = tiny_model(tiny_instance_config())
  batch = instance_batch()
  images, sizes = jnp.asarray(batch["image"][:2]), jnp.asarray(batch["image_size"][:2])
  with layers.compute_dtype("bfloat16"):  # the context must be active while tracing
    predict = make_predict_fn(model, return_intermediates=True)
    out = predict(images, sizes)
  assert predict.num_traces() == 1
  inter = out["intermediates"]
  assert inter["features"]["p2"].dtype == BF16  # the model did compute in bf16
  for k in ("boxes", "scores", "mask_logits"):
    assert out[k].dtype == F32, (k, out[k].dtype)
    assert np.all(np.isfinite(np.asarray(out[k]))), k
  assert all(a.dtype == F32 for a in inter["rpn_logits"] + inter["rpn_deltas"])
  assert inter["box_cls_logits"].dtype == F32 and inter["box_deltas"].dtype == F32
  assert inter["proposals"].boxes.dtype == F32
  assert inter["mask"]["coarse_logits"].dtype == F32
  assert _float_dtypes(nnx.state(model)) == {F32}
  # The RPN logits equal float32's up to bf16 rounding (later stages select discrete boxes).
  ref = make_predict_fn(model, return_intermediates=True)(images, sizes)["intermediates"]
  for got, want in zip(inter["rpn_logits"], ref["rpn_logits"]):
    np.testing.assert_allclose(np.asarray(got), np.asarray(want),
                               atol=0.02 * float(jnp.abs(want).max()) + 1e-4)


def test_semantic_inference_bf16_returns_float32():
  config = tiny_semantic_config()
  model = tiny_model(config)
  batch = _semantic_batch()
  images, sizes = jnp.asarray(batch["image"][:1]), jnp.asarray(batch["image_size"][:1])

  def run(m, x, s):
    return m(x, s, return_intermediates=True)

  with layers.compute_dtype("bfloat16"):
    logits16, inter16 = nnx.jit(run)(model, images, sizes)
  logits32, inter32 = nnx.jit(run)(model, images, sizes)
  assert inter16["fused_features"].dtype == BF16 and inter32["fused_features"].dtype == F32
  assert logits16.dtype == F32 and logits16.shape == logits32.shape
  assert inter16["coarse_logits"].dtype == F32
  assert all(a.dtype == F32 for a in inter16["point_logits"])
  assert np.all(np.isfinite(np.asarray(logits16)))
  # Coarse logits agree up to bf16 rounding; the refined cells may not (the uncertain points
  # are a discrete choice on the rounded logits).
  coarse32 = np.asarray(inter32["coarse_logits"])
  np.testing.assert_allclose(np.asarray(inter16["coarse_logits"]), coarse32,
                             atol=0.03 * np.abs(coarse32).max())
