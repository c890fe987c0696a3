"""detectron2's optimizer and learning-rate schedule in optax (spec ``mask_rcnn_fpn.md`` §15.1-2).

* SGD with PyTorch semantics: ``g <- g + wd * p``; ``buf <- momentum * buf + g`` (the first
  step gives ``buf = g``: ``optax.trace`` starts from zeros, so ``0.9 * 0 + g == g`` exactly);
  ``p <- p - lr * buf``. In optax: ``add_decayed_weights`` -> ``trace`` ->
  ``scale_by_learning_rate``. Eagerly this is bitwise PyTorch's update; under ``jit`` XLA
  fuses ``a + b * c`` into FMAs, a few ulp off (as PyTorch's own vectorised kernels are).
* Weight decay per parameter as ``get_default_optimizer_params``: ``WEIGHT_DECAY`` on conv /
  linear weights, ``WEIGHT_DECAY_BIAS`` (None = ``WEIGHT_DECAY``) on their biases,
  ``WEIGHT_DECAY_NORM`` (0) on the affine parameters of normalisation layers.
* Only ``nnx.Param`` variables are optimised; frozen variables (``layers.Frozen``) are not in
  the parameter tree at all, exactly like ``requires_grad=False`` parameters in detectron2.
* ``WarmupMultiStepLR`` (fvcore ``WarmupParamScheduler`` with a rescaled linear warmup over a
  ``MultiStepParamScheduler``).

Parameter trees here are the pure nested dicts of ``nnx.to_pure_dict(nnx.state(model,
nnx.Param))`` (what :mod:`pointrend_jax.training.train` keeps in its ``TrainState``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from pointrend_jax.modeling import layers

__all__ = ["NORM_MODULE_TYPES", "warmup_multistep_schedule", "param_groups", "weight_decay_tree",
           "make_optimizer"]

# Module types whose parameters are "norm" parameters for WEIGHT_DECAY_NORM (detectron2 lists
# BatchNorm*, SyncBatchNorm, GroupNorm, InstanceNorm*, LayerNorm, LocalResponseNorm and
# FrozenBatchNorm2d; the latter has no parameters).
NORM_MODULE_TYPES: tuple[type[nnx.Module], ...] = (
    layers.GroupNorm, layers.BatchNorm, layers.FrozenBatchNorm, nnx.GroupNorm, nnx.BatchNorm,
    nnx.LayerNorm, nnx.RMSNorm)


def warmup_multistep_schedule(base_lr: float, steps: Sequence[int], *, warmup_iters: int = 1000,
                              warmup_factor: float = 0.001, gamma: float = 0.1,
                              max_iter: int | None = None) -> optax.Schedule:
  """detectron2 ``WarmupMultiStepLR`` (linear warmup) as an optax schedule of the 0-based step.

  ``lr(t) = base_lr * f(t)`` with ``m(t) = gamma ** #{s in steps : s <= t}`` and, for
  ``t < warmup_iters``, ``f(t) = m(W) * a + warmup_factor * m(0) * (1 - a)``, ``a = t / W``
  (fvcore interpolates from ``warmup_factor * m(0)`` to the value the main schedule has where
  the warmup ends); otherwise ``f(t) = m(t)``. With the seed configs' steps (all > 1000):
  ``f(0) = 0.001``, ``f(999) = 0.999001``, ``f(59999) = 1``, ``f(60000) = 0.1``.

  Args:
    base_lr: SOLVER.BASE_LR.
    steps: SOLVER.STEPS (iterations where the lr is multiplied by ``gamma``).
    warmup_iters: SOLVER.WARMUP_ITERS (``min(W, max_iter)`` like detectron2 when ``max_iter``
      is given).
    warmup_factor, gamma: SOLVER.WARMUP_FACTOR, SOLVER.GAMMA.
    max_iter: SOLVER.MAX_ITER; steps beyond it are dropped as in detectron2.

  Returns:
    A function of the (traced or concrete) integer step returning the float32 learning rate.
  """
  steps = sorted(int(s) for s in steps)
  if max_iter is not None:
    steps = [s for s in steps if s <= max_iter]
    warmup_iters = min(warmup_iters, max_iter)
  milestones = jnp.asarray(steps, jnp.int32)

  def multiplier(t: jax.Array) -> jax.Array:
    if not steps:
      return jnp.ones_like(t, jnp.float32)
    count = jnp.sum(milestones <= t[..., None], axis=-1)
    return jnp.asarray(gamma, jnp.float32) ** count.astype(jnp.float32)

  def schedule(count: jax.Array | int) -> jax.Array:
    t = jnp.asarray(count, jnp.int32)
    main = multiplier(t)
    if warmup_iters <= 0:
      return base_lr * main
    alpha = t.astype(jnp.float32) / jnp.float32(warmup_iters)
    end = multiplier(jnp.full_like(t, warmup_iters))
    start = warmup_factor * multiplier(jnp.zeros_like(t))
    warm = end * alpha + start * (1.0 - alpha)
    return base_lr * jnp.where(t < warmup_iters, warm, main)

  return schedule


def _norm_module_paths(model: nnx.Module) -> set[tuple[Any, ...]]:
  return {tuple(path) for path, node in nnx.iter_graph(model)
          if isinstance(node, NORM_MODULE_TYPES)}


def param_groups(model: nnx.Module) -> dict[str, Any]:
  """Labels every trainable parameter ``"norm"``, ``"bias"`` or ``"weight"`` (detectron2's groups).

  Returns:
    A pure nested dict with the structure of ``nnx.to_pure_dict(nnx.state(model, nnx.Param))``
    whose leaves are the labels.
  """
  norm_paths = _norm_module_paths(model)
  params = nnx.to_pure_dict(nnx.state(model, layers.TRAINABLE))

  def label(path, _):
    keys = tuple(k.key for k in path)
    if keys[:-1] in norm_paths:
      return "norm"
    return "bias" if keys[-1] == "bias" else "weight"

  return jax.tree_util.tree_map_with_path(label, params)


def weight_decay_tree(model: nnx.Module, weight_decay: float, weight_decay_norm: float = 0.0,
                      weight_decay_bias: float | None = None) -> dict[str, Any]:
  """Per-parameter weight decay (pure nested dict of floats), detectron2 rules."""
  wd_bias = weight_decay if weight_decay_bias is None else weight_decay_bias
  values = {"weight": weight_decay, "bias": wd_bias, "norm": weight_decay_norm}
  return jax.tree.map(lambda g: float(values[g]), param_groups(model))


def _solver(config: Any) -> Mapping[str, Any]:
  get = config.solver.get
  return {
      "base_lr": float(get("base_lr")),
      "steps": tuple(get("steps", ())),
      "max_iter": int(config.train.max_steps),
      "warmup_iters": int(get("warmup_iters", 1000)),
      "warmup_factor": float(get("warmup_factor", 0.001)),
      "gamma": float(get("gamma", 0.1)),
      "momentum": float(get("momentum", 0.9)),
      "nesterov": bool(get("nesterov", False)),
      "weight_decay": float(get("weight_decay", 1e-4)),
      "weight_decay_norm": float(get("weight_decay_norm", 0.0)),
      "weight_decay_bias": get("weight_decay_bias", None),
  }


def make_optimizer(config: Any, model: nnx.Module
                   ) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """detectron2 ``build_optimizer`` + ``build_lr_scheduler`` for the trainable params of ``model``.

  Args:
    config: the run config: ``train.max_steps`` (detectron2's MAX_ITER) and a ``solver`` section
      holding ``base_lr``, ``steps``, and optionally ``warmup_iters`` (1000), ``warmup_factor``
      (0.001), ``gamma`` (0.1), ``momentum`` (0.9), ``nesterov`` (False), ``weight_decay``
      (1e-4), ``weight_decay_norm`` (0.0), ``weight_decay_bias`` (None = weight_decay).
    model: the model (concrete or abstract); only its structure is used: the transformation
      applies to the pure-dict tree of its ``nnx.Param`` variables.

  Returns:
    ``(tx, schedule)``; ``schedule(t)`` is the learning rate of 0-based iteration ``t``, which
    ``tx`` applies at its ``t``-th update.
  """
  s = _solver(config)
  schedule = warmup_multistep_schedule(
      s["base_lr"], s["steps"], warmup_iters=s["warmup_iters"], warmup_factor=s["warmup_factor"],
      gamma=s["gamma"], max_iter=s["max_iter"])
  wd = weight_decay_tree(model, s["weight_decay"], s["weight_decay_norm"],
                         None if s["weight_decay_bias"] is None
                         else float(s["weight_decay_bias"]))
  # One masked decay per distinct non-zero rate; each parameter is in exactly one of them, so
  # this is PyTorch's per-group ``g + wd * p``.
  decays = []
  for rate in sorted({v for v in jax.tree.leaves(wd) if v != 0.0}):
    mask = jax.tree.map(lambda v, r=rate: v == r, wd)
    decays.append(optax.add_decayed_weights(rate, mask=mask))
  tx = optax.chain(*decays, optax.trace(decay=s["momentum"], nesterov=s["nesterov"]),
                   optax.scale_by_learning_rate(schedule))
  return tx, schedule
