"""bfloat16 compute (``dtype=bfloat16`` module arguments, ``train.compute_dtype``): float32
variables, gradients and optimizer state; bf16 activations; float32 head outputs, losses and
boxes."""

import importlib.util
import pathlib

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from pointrend_jax.modeling import layers
from pointrend_jax.training import losses_instance as L
from pointrend_jax.training import mesh as mesh_lib
from pointrend_jax.training import optimizer, train
from pointrend_jax.training import step as step_lib
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


def test_conv2d_bf16_output_float32_kernel_and_default_unchanged():
  conv = layers.Conv2d(5, 8, 3, stride=2, padding=1, rngs=nnx.Rngs(0))
  conv.bias[...] = jax.random.normal(jax.random.key(1), (8,))
  x = jax.random.normal(jax.random.key(2), (2, 9, 11, 5), jnp.float32)
  # The plain float32 conv at HIGHEST precision.
  ref = jax.lax.conv_general_dilated(
      x, conv.kernel[...], (2, 2), ((1, 1), (1, 1)), rhs_dilation=(1, 1),
      dimension_numbers=("NHWC", "HWIO", "NHWC"),
      precision=jax.lax.Precision.HIGHEST) + conv.bias[...]

  out = conv(x)
  assert out.dtype == F32
  np.testing.assert_array_equal(np.asarray(out), np.asarray(ref))

  conv16 = layers.Conv2d(5, 8, 3, stride=2, padding=1, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
  nnx.update(conv16, nnx.state(conv))
  out16 = conv16(x)
  grads = nnx.grad(lambda m: jnp.sum(m(x).astype(jnp.float32) ** 2))(conv16)
  assert out16.dtype == BF16
  assert conv16.kernel[...].dtype == F32 and conv16.bias[...].dtype == F32
  assert len(jax.tree.leaves(grads)) == 2 and _float_dtypes(grads) == {F32}
  # bf16 operands (8 bits of mantissa), float32 accumulation.
  np.testing.assert_allclose(np.asarray(out16, np.float32), np.asarray(ref), rtol=3e-2,
                             atol=3e-2 * float(jnp.abs(ref).max()))


@pytest.mark.parametrize("make_norm", [
    lambda **kw: layers.FrozenBatchNorm(8, **kw),
    lambda **kw: layers.BatchNorm(8, **kw),
    lambda **kw: layers.GroupNorm(4, 8, **kw),
], ids=["FrozenBN", "BN", "GN"])
def test_norms_return_compute_dtype_with_float32_statistics(make_norm):
  norm = make_norm(dtype=jnp.bfloat16)
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
  out16 = norm(x16)
  assert out16.dtype == BF16
  assert _float_dtypes(nnx.state(norm)) == {F32}
  np.testing.assert_allclose(np.asarray(out16, np.float32), np.asarray(out32), rtol=2 ** -8,
                             atol=1e-6)


def test_linear_bf16_and_default_unchanged():
  lin = layers.Linear(16, 4, rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(1), (3, 16), jnp.float32)
  ref = jnp.matmul(x, lin.kernel[...], precision=jax.lax.Precision.HIGHEST) + lin.bias[...]
  np.testing.assert_array_equal(np.asarray(lin(x)), np.asarray(ref))
  lin16 = layers.Linear(16, 4, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
  nnx.update(lin16, nnx.state(lin))
  y = lin16(x)
  assert y.dtype == BF16 and lin16.kernel[...].dtype == F32
  np.testing.assert_allclose(np.asarray(y, np.float32), np.asarray(ref), atol=0.05)


# --------------------------------------------------------------------------------------------------
# Train steps.
# --------------------------------------------------------------------------------------------------


def _semantic_batch():
  images, labels = semantic_pair()
  hw = images.shape[1]
  return {"image": np.concatenate([images] * 2), "image_size": np.full((4, 2), hw, np.int32),
          "sem_seg": np.concatenate([labels] * 2)}


def _bf16_twin(model, build_bf16):
  """The same variables in a model that ``build_bf16`` builds with ``dtype=bfloat16``."""
  graphdef, _ = nnx.split(nnx.eval_shape(build_bf16))
  return nnx.merge(graphdef, nnx.state(model))


def _models(config):
  model = tiny_model(config)
  return {"float32": model,
          "bfloat16": _bf16_twin(model, lambda: tiny_model(config, dtype=jnp.bfloat16))}


def _run_steps(models, config, loss_fn, batch, dtypes_steps):
  """Runs ``steps`` train steps of ``models[dtype]`` for each ``(dtype, steps)``; the models
  share their initial variables."""
  tx, _ = optimizer.make_optimizer(config, models["float32"])
  mesh = mesh_lib.make_mesh(jax.devices()[:1])
  out = {}
  for dtype, steps in dtypes_steps:
    initial = jax.device_get(step_lib.create_train_state(models[dtype], tx, seed=0))
    step = step_lib.make_train_step(loss_fn, tx, mesh=mesh,
                                 num_groups=config.train.num_replicas_d2)
    state = mesh_lib.replicate(initial, mesh)  # fresh buffers (the step donates its input)
    metrics = []
    for _ in range(steps):
      state, m = step(state, batch)
      metrics.append({k: float(v) for k, v in jax.device_get(m).items()})
    out[dtype] = (metrics, state, initial)
  return out


def _check_bf16_run(runs, loss_names, overfit_factor):
  m32, _, initial = runs["float32"]
  m16, state, _ = runs["bfloat16"]
  # First step: same parameters and keys, so the losses differ by bf16 rounding only.
  assert m16[0]["loss"] != m32[0]["loss"]  # the bf16 model did compute in bf16
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


@pytest.mark.slow
def test_instance_train_step_bf16():
  config = tiny_instance_config()
  config.solver.update(base_lr=0.005, warmup_iters=0, steps=())
  runs = _run_steps(_models(config), config, L.instance_loss_fn, instance_batch(),
                    (("float32", 1), ("bfloat16", 14)))
  # Same criterion as the float32 overfitting test in test_losses_instance.py.
  _check_bf16_run(runs, L.LOSS_NAMES, 0.75)


@pytest.mark.slow
def test_semantic_train_step_bf16():
  config = tiny_semantic_config()
  config.model.overrides.point_head.train_num_points = 48
  config.solver.update(base_lr=0.001, warmup_iters=0, steps=())
  runs = _run_steps(_models(config), config, semantic_loss_fn, _semantic_batch(),
                    (("float32", 1), ("bfloat16", 6)))
  # Measured: 21.6 -> 2.5 in 6 steps (float32: 21.6 -> 3.0).
  _check_bf16_run(runs, ("loss_sem_seg", "loss_sem_seg_point"), 0.5)


class _Toy(nnx.Module):

  def __init__(self, rngs: nnx.Rngs, dtype):
    self.conv = layers.Conv2d(3, 8, 3, padding=1, norm=layers.GroupNorm(4, 8, dtype=dtype),
                              dtype=dtype, rngs=rngs)
    self.head = layers.Conv2d(8, 2, 1, dtype=dtype, rngs=rngs)


def test_train_loop_bf16_model_keeps_float32_state(tmp_path):
  seen = []

  def loss_fn(model, batch, key):
    del key
    feats = model.conv(batch["image"].astype(jnp.float32) / 255.0)
    seen.append(feats.dtype)  # trace time
    logits = model.head(jax.nn.relu(feats)).astype(jnp.float32)
    loss = jnp.mean(jnp.square(logits - 1.0))
    return loss, {"mse": loss}

  config = ml_collections.ConfigDict({
      "seed": 0,
      "solver": {"base_lr": 0.01, "steps": (), "warmup_iters": 0},
      "train": {"max_steps": 2, "batch_size": 2, "num_replicas_d2": 1, "log_every": 1, "checkpoint_every": 0,
                "progress_bar": False, "async_checkpointing": False},
  })
  image = np.random.default_rng(0).integers(0, 255, (2, 8, 8, 3)).astype(np.uint8)
  state = train.train_loop(config, str(tmp_path), _Toy(nnx.Rngs(0), jnp.bfloat16), loss_fn,
                           train.InMemoryIterator([{"image": image}]))
  assert seen == [BF16]
  assert int(state.step) == 2 and _float_dtypes(state.params) == {F32}
  assert _float_dtypes(state.opt_state) <= {F32}


def test_loop_builds_the_model_in_train_compute_dtype():
  from pointrend_jax.modeling import zoo
  path = pathlib.Path(__file__).resolve().parents[2] / "configs" / "synthetic_shapes.py"
  spec = importlib.util.spec_from_file_location("_config_synthetic_shapes", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  config.train.compute_dtype = "bfloat16"
  model = nnx.eval_shape(lambda: train.build_run_model(config, zoo.model_config(config.model)))
  assert model.backbone.bottom_up.stem.conv1.dtype == BF16
  assert model.mask_head.point_head.predictor.dtype == BF16
  assert _float_dtypes(nnx.state(model)) == {F32}


# --------------------------------------------------------------------------------------------------
# Inference.
# --------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_instance_predict_bf16_returns_float32():
  models = _models(tiny_instance_config())
  batch = instance_batch()
  images, sizes = jnp.asarray(batch["image"][:2]), jnp.asarray(batch["image_size"][:2])
  traces = []

  @nnx.jit
  def predict(m, images, sizes):
    traces.append(images.shape)
    return m.predict(images, sizes, return_intermediates=True)

  out = predict(models["bfloat16"], images, sizes)
  assert len(traces) == 1
  inter = out["intermediates"]
  assert inter["features"]["p2"].dtype == BF16  # the model did compute in bf16
  for k in ("boxes", "scores", "mask_logits"):
    assert out[k].dtype == F32, (k, out[k].dtype)
    assert np.all(np.isfinite(np.asarray(out[k]))), k
  assert all(a.dtype == F32 for a in inter["rpn_logits"] + inter["rpn_deltas"])
  assert inter["box_cls_logits"].dtype == F32 and inter["box_deltas"].dtype == F32
  assert inter["proposals"].boxes.dtype == F32
  assert inter["mask"]["coarse_logits"].dtype == F32
  assert _float_dtypes(nnx.state(models["bfloat16"])) == {F32}
  # The RPN logits equal float32's up to bf16 rounding (later stages select discrete boxes).
  ref = predict(models["float32"], images, sizes)
  assert ref["intermediates"]["features"]["p2"].dtype == F32
  for got, want in zip(inter["rpn_logits"], ref["intermediates"]["rpn_logits"]):
    np.testing.assert_allclose(np.asarray(got), np.asarray(want),
                               atol=0.02 * float(jnp.abs(want).max()) + 1e-4)


def test_predictor_dtype():
  from pointrend_jax.inference import Predictor
  model = tiny_model(tiny_instance_config())
  predictor = Predictor(model.cfg, model, dtype="bfloat16", buckets=[(64, 64)])
  assert predictor.model.backbone.bottom_up.stem.conv1.dtype == BF16
  assert _float_dtypes(nnx.state(predictor.model)) == {F32}
  assert Predictor(model.cfg, model).model.backbone.bottom_up.stem.conv1.dtype == F32
  with pytest.raises(ValueError, match="float32 or bfloat16"):
    Predictor(model.cfg, model, dtype="float16")


@pytest.mark.slow
def test_semantic_inference_bf16_returns_float32():
  models = _models(tiny_semantic_config())
  batch = _semantic_batch()
  images, sizes = jnp.asarray(batch["image"][:1]), jnp.asarray(batch["image_size"][:1])

  def run(m, x, s):
    return m(x, s, return_intermediates=True)

  logits16, inter16 = nnx.jit(run)(models["bfloat16"], images, sizes)
  logits32, inter32 = nnx.jit(run)(models["float32"], images, sizes)
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
