"""Training loop on a toy model: exact resume, SIGTERM, NaN handling, compile counting; NaN
handling again on the tiny real instance model."""

import logging
import os
import signal

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from pointrend_jax.modeling import layers
from pointrend_jax.training import checkpointing
from pointrend_jax.training import mesh as mesh_lib
from pointrend_jax.training import optimizer
from pointrend_jax.training import train
from pointrend_jax.training import step as step_lib
from pointrend_jax.training.logging import read_metrics
from pointrend_jax.training.losses_semantic import cross_entropy_ignore


class _Toy(nnx.Module):

  def __init__(self, rngs: nnx.Rngs):
    self.frozen = layers.Conv2d(3, 3, 1, param_type=layers.FrozenParam, rngs=rngs)
    self.conv = layers.Conv2d(3, 32, 3, padding=1, use_bias=False,
                              norm=layers.GroupNorm(32, 32), rngs=rngs)
    self.head = layers.Conv2d(32, 4, 1, rngs=rngs)


def _toy_loss(model, batch, key):
  x = batch["image"].astype(jnp.float32) / 255.0
  feats = jax.nn.relu(model.conv(model.frozen(x)))
  # Randomness in the loss, so that resuming must restore the step keys too.
  keep = jax.random.bernoulli(key, 0.8, feats.shape)
  logits = model.head(feats * keep / 0.8)
  ce = cross_entropy_ignore(logits, batch["sem_seg"])
  return ce * jnp.mean(batch["scale"]), {"loss_ce": ce}


def _batches(n=6, b=4, hw=8, nan_at=None):
  rng = np.random.default_rng(0)
  out = []
  for i in range(n):
    sem = rng.integers(0, 4, (b, hw, hw)).astype(np.uint8)
    sem[rng.uniform(size=sem.shape) < 0.4] = 255
    image = (sem[..., None] * 50 + rng.integers(0, 30, (b, hw, hw, 3))).astype(np.uint8)
    scale = np.full((b,), np.nan if i == nan_at else 1.0, np.float32)
    out.append({"image": image, "sem_seg": sem, "scale": scale})
  return out


def _config(max_iter=6, checkpoint_every=3, log_every=1, eval_every=0):
  return ml_collections.ConfigDict({
      "seed": 3,
      "solver": {"base_lr": 0.1, "steps": (4,), "warmup_iters": 2},
      "train": {"max_steps": max_iter, "batch_size": 4, "num_replicas_d2": 2,
                "log_every": log_every, "checkpoint_every": checkpoint_every, "max_to_keep": 5,
                "progress_bar": False},
      "eval": {"every": eval_every},
  })


class _Iter(train.InMemoryIterator):
  """InMemoryIterator with a hook before handing out batch ``position``."""

  def __init__(self, batches, hook=None):
    super().__init__(batches)
    self.hook = hook

  def __next__(self):
    if self.hook is not None:
      self.hook(self.position)
    return super().__next__()


def _eval(model, step):
  return {"head_abs_mean": float(jnp.abs(model.head.kernel[...]).mean()), "at_step": step}


def _run(workdir, batches, hook=None, eval_fn=None, **cfg):
  return train.train_loop(_config(**cfg), workdir, _Toy(nnx.Rngs(0)), _toy_loss,
                          _Iter(batches, hook), eval_fn=eval_fn)


def _losses(workdir):
  # Last record per step: a resumed run re-logs the steps after its checkpoint.
  return {r["step"]: r["train/loss"] for r in read_metrics(workdir) if "train/loss" in r}


def _latest(workdir):
  manager = checkpointing.make_checkpoint_manager(os.path.join(workdir, "checkpoints"))
  try:
    return manager.latest_step()
  finally:
    manager.close()


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("reference"))
  state = _run(workdir, _batches(), eval_fn=_eval, eval_every=3)
  return workdir, jax.device_get(state.params)


def test_reference_run_logs_and_checkpoints(reference_run):
  workdir, params = reference_run
  records = [r for r in read_metrics(workdir) if "train/loss" in r]
  assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
  for key in ("train/loss", "train/loss_ce", "train/lr", "train/grad_norm"):
    assert all(np.isfinite(r[key]) for r in records), key
  np.testing.assert_allclose([r["train/lr"] for r in records],
                             [0.1 * 0.001, 0.1 * 0.5005, 0.1, 0.1, 0.01, 0.01], rtol=1e-5)
  from tensorboard.backend.event_processing import event_accumulator
  events = event_accumulator.EventAccumulator(os.path.join(workdir, "tensorboard"))
  events.Reload()
  assert [(e.step, e.value) for e in events.Scalars("train/loss")] == [
      (r["step"], pytest.approx(r["train/loss"], rel=1e-6)) for r in records]
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["3", "6"]
  evals = [r for r in read_metrics(workdir) if "eval/head_abs_mean" in r]
  assert [(r["step"], r["eval/at_step"]) for r in evals] == [(3, 3), (6, 6)]
  np.testing.assert_allclose(evals[-1]["eval/head_abs_mean"],
                             np.abs(params["head"]["kernel"]).mean(), rtol=1e-6)


def test_resume_after_crash_is_exact(reference_run, tmp_path):
  ref_dir, ref_params = reference_run
  workdir = str(tmp_path)

  def crash(position):
    if position == 4:  # after step 4 ran; its state is not checkpointed
      raise RuntimeError("simulated crash")

  with pytest.raises(RuntimeError, match="simulated crash"):
    _run(workdir, _batches(), crash)
  assert _latest(workdir) == 3
  state = _run(workdir, _batches())  # fresh model, iterator, step function, manager
  ref, got = _losses(ref_dir), _losses(workdir)
  assert sorted(got) == [1, 2, 3, 4, 5, 6]
  for step in (4, 5, 6):
    assert got[step] == ref[step], (step, got[step], ref[step])
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(state.params), ref_params)


def test_sigterm_checkpoints_and_stops(reference_run, tmp_path):
  ref_dir, ref_params = reference_run
  workdir = str(tmp_path)

  def sigterm(position):
    if position == 4:  # arrives while drawing the batch of step 5
      os.kill(os.getpid(), signal.SIGTERM)

  state = _run(workdir, _batches(), sigterm)
  assert int(state.step) == 5
  assert _latest(workdir) == 5
  state = _run(workdir, _batches())
  assert int(state.step) == 6
  assert _losses(workdir)[6] == _losses(ref_dir)[6]
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(state.params), ref_params)


def test_nan_loss_raises_and_keeps_last_good_checkpoint(tmp_path):
  workdir = str(tmp_path)
  with pytest.raises(FloatingPointError, match=r"step 5 .*loss=nan.*loss_ce="):
    # NaN in the batch of step 5; losses are only checked at log/checkpoint steps (6).
    _run(workdir, _batches(nan_at=4), checkpoint_every=2, log_every=100)
  assert _latest(workdir) == 4


@pytest.mark.slow
def test_nan_in_real_instance_model_names_terms_and_keeps_last_good_checkpoint(tmp_path):
  """The tiny R18 PointRend instance model, its real losses, one poisoned batch: one NaN pixel
  inside image 0 of the batch of step 3 goes through the backbone, RPN, box and point heads."""
  from _tiny_batches import instance_batch
  from _tiny_models import tiny_instance_config, tiny_model
  from pointrend_jax.checkpoint import workdir as workdir_lib
  from pointrend_jax.modeling import zoo
  from pointrend_jax.training import losses_instance

  config = tiny_instance_config()
  config.train.update(max_steps=4, checkpoint_every=2, log_every=100, progress_bar=False)
  # Float images (the model takes uint8 or float) so that clean and poisoned batches share one
  # compiled step.
  clean = dict(instance_batch(), image=instance_batch()["image"].astype(np.float32))
  poisoned = dict(clean, image=clean["image"].copy())
  poisoned["image"][0, 10, 10, 1] = np.nan  # inside image 0's valid 56x60 region
  workdir = str(tmp_path)

  def run(batches):
    return train.train_loop(config, workdir, tiny_model(config), losses_instance.instance_loss_fn,
                            train.InMemoryIterator(batches),
                            batch_keys=losses_instance.INSTANCE_BATCH_KEYS)

  with pytest.raises(FloatingPointError) as info:
    # Step 3 is poisoned; losses are checked before the step-4 checkpoint (log_every > steps).
    run([clean, clean, poisoned, clean])
  message = str(info.value)
  assert message.startswith("non-finite loss at step 3 (iteration 2): "), message
  assert "the state was not saved" in message
  terms = dict(kv.split("=") for kv in message.split(": ", 1)[1].split(";")[0].split(", "))
  # Image 0's features are NaN from the stem on (GroupNorm), so every term is; the logged
  # extras (lr, point/accuracy) are named too.
  assert [terms[k] for k in ("loss", *losses_instance.LOSS_NAMES, "grad_norm")] == ["nan"] * 8
  assert float(terms["lr"]) > 0 and "point/accuracy" in terms
  # The newest checkpoint is step 2, the last one before the poisoned step; nothing was logged
  # or saved after it.
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["2"]
  records = [r for r in read_metrics(workdir) if "train/loss" in r]
  assert [r["step"] for r in records] == [2]
  assert all(isinstance(v, (int, float)) and np.isfinite(v) for r in records
             for v in r.values())
  step, restored = workdir_lib.restore_trained_model(workdir, zoo.model_config(config.model))
  assert step == 2
  leaves = jax.tree.leaves(nnx.to_pure_dict(nnx.state(restored, nnx.Param)))
  assert leaves and all(np.isfinite(np.asarray(x)).all() for x in leaves)
  # A restart resumes from it and finishes with finite losses; the iterator resumes at position
  # 2 too (the poisoned batches 0 and 1 here are not drawn again).
  state = run([poisoned, poisoned, clean, clean])
  assert int(state.step) == 4 and _latest(workdir) == 4
  losses = _losses(workdir)
  assert sorted(losses) == [2, 4] and np.isfinite(losses[4])


def test_train_step_compiles_once_per_bucket(caplog):
  model = _Toy(nnx.Rngs(0))
  tx, schedule = optimizer.make_optimizer(_config(), model)
  mesh = mesh_lib.make_mesh()
  state = step_lib.create_train_state(model, tx, mesh=mesh)
  frozen_before = jax.device_get(state.model_state)
  step = step_lib.make_train_step(_toy_loss, tx, mesh=mesh, num_groups=2, schedule=schedule)
  batches = _batches(3)
  with caplog.at_level(logging.INFO):
    for batch in batches:
      state, metrics = step(state, batch)
  assert step.num_traces == 1 and step.num_compiled == 1
  assert sum("compiling train step for bucket 8x8" in r.message for r in caplog.records) == 1
  state, _ = step(state, _batches(1, hw=16)[0])
  assert step.num_traces == 2 and step.num_compiled == 2
  assert int(state.step) == 4
  # Frozen variables are constants of the step.
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(state.model_state), frozen_before)


@pytest.mark.parametrize("replicas", [None, "map", "vmap"])
def test_losses_are_per_virtual_replica_means(replicas):
  model = _Toy(nnx.Rngs(0))
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  params, rest = nnx.to_pure_dict(params), nnx.to_pure_dict(rest)
  batch = _batches(1)[0]
  batch["sem_seg"][:2, :6] = 255  # replica 0 has far fewer labelled pixels than replica 1
  batch = {k: jnp.asarray(v) for k, v in batch.items()}
  key = jax.random.key(0)
  loss, terms = step_lib.replica_mean_loss(_toy_loss, graphdef, params, rest, batch, key, 2,
                                           replicas=replicas)
  keys = jax.random.split(key, 2)
  halves = [_toy_loss(nnx.merge(graphdef, params, rest), {k: v[2 * g:2 * g + 2]
                                                          for k, v in batch.items()}, keys[g])
            for g in range(2)]
  np.testing.assert_allclose(float(loss), (float(halves[0][0]) + float(halves[1][0])) / 2,
                             rtol=1e-6)
  np.testing.assert_allclose(float(terms["loss_ce"]), float(loss), rtol=1e-6)
