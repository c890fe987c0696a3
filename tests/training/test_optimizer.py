"""detectron2 optimizer / schedule: values, PyTorch-SGD equivalence, weight-decay groups."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from flax import nnx

from pointrend_jax.modeling import layers
from pointrend_jax.training import optimizer


class _Toy(nnx.Module):

  def __init__(self, rngs: nnx.Rngs):
    self.conv = layers.Conv2d(3, 32, 3, padding=1, use_bias=False,
                              norm=layers.GroupNorm(32, 32), rngs=rngs)
    self.head = layers.Conv2d(32, 5, 1, rngs=rngs)
    self.frozen = layers.Conv2d(3, 3, 1, param_type=layers.FrozenParam, rngs=rngs)
    self.bn = layers.FrozenBatchNorm(3)

  def __call__(self, x):
    return self.head(jax.nn.relu(self.conv(self.bn(self.frozen(x)))))


def _config(max_iter=90000, **solver):
  base = dict(base_lr=0.02, steps=(60000, 80000))
  base.update(solver)
  return ml_collections.ConfigDict({"solver": base, "train": {"max_steps": max_iter}})


def test_schedule_matches_spec_values():
  s = optimizer.warmup_multistep_schedule(0.02, (60000, 80000), max_iter=90000)
  f = lambda t: float(s(t)) / 0.02
  np.testing.assert_allclose(f(0), 0.001, rtol=1e-6)
  np.testing.assert_allclose(f(999), 0.999001, rtol=1e-6)
  np.testing.assert_allclose(f(500), 0.001 + 0.999 * 0.5, rtol=1e-6)
  np.testing.assert_allclose(f(1000), 1.0, rtol=1e-6)
  np.testing.assert_allclose(f(59999), 1.0, rtol=1e-6)
  np.testing.assert_allclose(f(60000), 0.1, rtol=1e-6)
  np.testing.assert_allclose(f(79999), 0.1, rtol=1e-6)
  np.testing.assert_allclose(f(80000), 0.01, rtol=1e-6)
  np.testing.assert_allclose(f(89999), 0.01, rtol=1e-6)
  # Semantic Cityscapes and instance Cityscapes schedules.
  s = optimizer.warmup_multistep_schedule(0.01, (40000, 55000), max_iter=65000)
  assert [round(float(s(t)) / 0.01, 6) for t in (39999, 40000, 55000)] == [1.0, 0.1, 0.01]
  # Steps beyond MAX_ITER are dropped, as detectron2 does.
  s = optimizer.warmup_multistep_schedule(0.01, (18000, 30000), max_iter=24000)
  np.testing.assert_allclose(float(s(23999)), 0.001, rtol=1e-6)


def test_schedule_warmup_interpolates_to_main_value_at_warmup_end():
  # fvcore: linear from factor * m(0) to m(W); with a milestone inside the warmup m(W) != m(0).
  s = optimizer.warmup_multistep_schedule(1.0, (5,), warmup_iters=10, warmup_factor=0.5)
  np.testing.assert_allclose(float(s(0)), 0.5, rtol=1e-6)
  np.testing.assert_allclose(float(s(4)), 0.1 * 0.4 + 0.5 * 0.6, rtol=1e-6)
  np.testing.assert_allclose(float(s(10)), 0.1, rtol=1e-6)


def _torch_sgd(params, grads_fn, lrs, wd_of, momentum=0.9):
  """PyTorch SGD (dampening 0, no Nesterov) in float32 numpy."""
  params = {k: v.copy() for k, v in params.items()}
  bufs = {}
  for t, lr in enumerate(lrs):
    grads = grads_fn(params, t)
    for k in params:
      d_p = grads[k] + np.float32(wd_of[k]) * params[k] if wd_of[k] else grads[k].copy()
      bufs[k] = d_p.copy() if k not in bufs else np.float32(momentum) * bufs[k] + d_p
      params[k] = params[k] + np.float32(-lr) * bufs[k]
  return params


@pytest.mark.parametrize("jit", [False, True])
def test_optimizer_matches_pytorch_sgd_5_steps(jit):
  model = _Toy(nnx.Rngs(0))
  # Large rates so that any deviation from PyTorch's update rule shows.
  cfg = _config(base_lr=0.5, steps=(3,), max_iter=10, warmup_iters=2, warmup_factor=0.1,
                weight_decay=0.05)
  tx, schedule = optimizer.make_optimizer(cfg, model)
  params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  flat, treedef = jax.tree_util.tree_flatten_with_path(params)
  names = [jax.tree_util.keystr(p) for p, _ in flat]
  wd = dict(zip(names, jax.tree.leaves(optimizer.weight_decay_tree(model, 0.05))))
  rng = np.random.default_rng(0)
  grads_seq = [{n: rng.standard_normal(np.shape(v)).astype(np.float32) for n, (_, v) in
                zip(names, flat)} for _ in range(5)]

  def step(g, opt_state, p):
    u, opt_state = tx.update(g, opt_state, p)
    return optax.apply_updates(p, u), opt_state

  step = jax.jit(step) if jit else step
  opt_state = tx.init(params)
  p = params
  for t in range(5):
    g = jax.tree.unflatten(treedef, [jnp.asarray(grads_seq[t][n]) for n in names])
    p, opt_state = step(g, opt_state, p)

  lrs = [np.float32(schedule(t)) for t in range(5)]
  ref = _torch_sgd({n: np.asarray(v, np.float32) for n, (_, v) in zip(names, flat)},
                   lambda _, t: grads_seq[t], lrs, wd)
  got = dict(zip(names, jax.tree.leaves(p)))
  for n in names:
    if jit:
      # XLA fuses ``a + b * c`` into FMAs (as PyTorch's vectorised ``add(alpha=)`` does):
      # a few ulp after 5 steps.
      np.testing.assert_allclose(np.asarray(got[n]), ref[n], rtol=1e-6, atol=1e-7, err_msg=n)
    else:
      np.testing.assert_array_equal(np.asarray(got[n]), ref[n], err_msg=n)


def test_weight_decay_groups_and_frozen_params():
  model = _Toy(nnx.Rngs(0))
  groups = optimizer.param_groups(model)
  assert groups == {"conv": {"kernel": "weight", "norm": {"weight": "norm", "bias": "norm"}},
                    "head": {"kernel": "weight", "bias": "bias"}}
  wd = optimizer.weight_decay_tree(model, 1e-4)
  assert wd["conv"]["norm"] == {"weight": 0.0, "bias": 0.0}
  assert wd["head"] == {"kernel": 1e-4, "bias": 1e-4}
  # Frozen conv and FrozenBN buffers are not optimizer parameters at all.
  assert "frozen" not in wd and "bn" not in wd

  # Zero gradients: only the weight decay moves parameters, and never the norm parameters.
  tx, schedule = optimizer.make_optimizer(_config(base_lr=0.1, warmup_iters=0), model)
  params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  params["conv"]["norm"]["bias"] = jnp.full((32,), 0.5)
  params["head"]["bias"] = jnp.full((5,), 0.5)
  zeros = jax.tree.map(jnp.zeros_like, params)
  u, _ = tx.update(zeros, tx.init(params), params)
  np.testing.assert_array_equal(u["conv"]["norm"]["weight"], 0.0)
  np.testing.assert_array_equal(u["conv"]["norm"]["bias"], 0.0)
  np.testing.assert_allclose(u["head"]["bias"], -0.1 * 1e-4 * 0.5, rtol=1e-6)
  np.testing.assert_allclose(u["head"]["kernel"], -0.1 * 1e-4 * params["head"]["kernel"],
                             rtol=1e-6)
