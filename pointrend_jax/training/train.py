"""The training loop: :func:`train_loop` runs :mod:`~pointrend_jax.training.step`'s train step
over a data iterator with checkpoints, metrics, evaluation and preemption handling.

* **Robustness.** A non-finite loss raises :class:`FloatingPointError` naming the step and
  the loss terms; losses are checked (one host sync) at every log step and before every
  checkpoint, so a bad state is never saved. SIGTERM makes the loop checkpoint and return.
  Resuming restores params, optimizer state, step and the data iterator's position.

Config keys read (the run config of ``configs/*.py``): ``seed``; ``solver.*`` (see
:func:`~pointrend_jax.training.optimizer.make_optimizer`); ``train.max_steps``,
``train.batch_size`` (global images per step), ``train.num_replicas_d2``,
``train.log_every``, ``train.checkpoint_every``, ``eval.every`` (0: at the end only),
``train.max_to_keep``, ``train.async_checkpointing``, ``train.progress_bar``.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

import jax
import ml_collections
import numpy as np
from flax import nnx

from pointrend_jax.training import checkpointing
from pointrend_jax.training import mesh as mesh_lib
from pointrend_jax.training import optimizer as optimizer_lib
from pointrend_jax.training.logging import MetricWriter, ProgressBar
from pointrend_jax.training.step import LossFn, TrainState, create_train_state, make_train_step

__all__ = ["DataIterator", "InMemoryIterator", "train_loop"]

logger = logging.getLogger(__name__)

Array = jax.Array
EvalFn = Callable[[nnx.Module, int], Mapping[str, float]]


class DataIterator(Protocol):
  """What the loop needs from a training iterator (grain's ``DatasetIterator`` fits)."""

  def __next__(self) -> Mapping[str, np.ndarray]:
    ...

  def get_state(self) -> dict[str, Any] | bytes:
    ...

  def set_state(self, state: dict[str, Any] | bytes) -> None:
    ...


class InMemoryIterator:
  """Cycles through a list of host batches; its state is the number of batches drawn."""

  def __init__(self, batches: Sequence[Mapping[str, np.ndarray]]):
    if not batches:
      raise ValueError("no batches")
    self.batches = list(batches)
    self.position = 0

  def __iter__(self) -> "InMemoryIterator":
    return self

  def __next__(self) -> Mapping[str, np.ndarray]:
    batch = self.batches[self.position % len(self.batches)]
    self.position += 1
    return batch

  def get_state(self) -> dict[str, Any]:
    return {"position": self.position}

  def set_state(self, state: Mapping[str, Any]) -> None:
    self.position = int(state["position"])


# --------------------------------------------------------------------------------------------------
# Loop.
# --------------------------------------------------------------------------------------------------


def _cfg(config: ml_collections.ConfigDict, dotted: str, default: Any) -> Any:
  node = config
  for part in dotted.split("."):
    if node is None or part not in node:
      return default
    node = node[part]
  return default if node is None else node


class _PendingMetrics:
  """Per-step device metrics not yet looked at; :meth:`flush` syncs and checks them."""

  def __init__(self):
    self.items: list[tuple[int, dict[str, Array]]] = []

  def add(self, step: int, metrics: dict[str, Array]) -> None:
    self.items.append((step, metrics))

  def flush(self) -> list[tuple[int, dict[str, float]]]:
    host = jax.device_get(self.items)
    self.items = []
    out = []
    for step, metrics in host:
      values = {k: float(v) for k, v in metrics.items()}
      if not np.isfinite(values["loss"]):
        terms = ", ".join(f"{k}={v:.6g}" for k, v in values.items())
        raise FloatingPointError(
            f"non-finite loss at step {step} (iteration {step - 1}): {terms}; the state was not "
            "saved, the latest checkpoint is from before this step")
      out.append((step, values))
    return out


def train_loop(config: ml_collections.ConfigDict,
               workdir: str | os.PathLike,
               model: nnx.Module,
               loss_fn: LossFn,
               train_iter: DataIterator,
               *,
               eval_fn: EvalFn | None = None,
               mesh: jax.sharding.Mesh | None = None,
               batch_keys: Sequence[str] | None = None,
               preemption: checkpointing.PreemptionGuard | None = None) -> TrainState:
  """Trains ``model`` for ``config.train.max_steps`` steps, resuming from ``workdir`` if possible.

  Args:
    config: see the module docstring.
    workdir: checkpoints go to ``workdir/checkpoints``, metrics to ``workdir/metrics.jsonl``
      and ``workdir/tensorboard``.
    model: the initialised model (pretrained weights loaded); its values are taken over by
      the returned state (do not use the module afterwards).
    loss_fn: per-virtual-replica loss, see :func:`make_train_step`.
    train_iter: yields this process's share of each global batch (numpy); ``get_state`` /
      ``set_state`` make resuming exact.
    eval_fn: ``(model, step) -> {name: value}``, run every ``eval.every`` steps and at
      the end; logged as ``eval/<name>``.
    mesh: device mesh (default: all devices on ``'data'``).
    batch_keys: only these batch entries are sent to the devices (default: all).
    preemption: a :class:`~pointrend_jax.training.checkpointing.PreemptionGuard`; by default
      one catching SIGTERM is installed for the duration of the loop.

  Returns:
    The final train state (also checkpointed).

  Raises:
    FloatingPointError: a step produced a non-finite loss (nothing after the last good
      checkpoint is saved).
  """
  workdir = os.fspath(workdir)
  mesh = mesh or mesh_lib.make_mesh()
  max_iter = int(config.train.max_steps)
  batch_size = int(config.train.batch_size)
  num_groups = int(_cfg(config, "train.num_replicas_d2", 1))
  log_every = int(_cfg(config, "train.log_every", 20))
  checkpoint_every = int(_cfg(config, "train.checkpoint_every", 5000))
  eval_every = int(_cfg(config, "eval.every", 0))
  if batch_size % num_groups:
    raise ValueError(f"train.batch_size {batch_size} not divisible by "
                     f"train.num_replicas_d2 {num_groups}")

  tx, schedule = optimizer_lib.make_optimizer(config, model)
  state = create_train_state(model, tx, seed=int(_cfg(config, "seed", 0)), mesh=mesh)
  del model

  manager = checkpointing.make_checkpoint_manager(
      os.path.join(workdir, "checkpoints"),
      max_to_keep=_cfg(config, "train.max_to_keep", 3),
      async_save=bool(_cfg(config, "train.async_checkpointing", True)))
  start = 0
  restored = checkpointing.restore_latest(manager, state.checkpoint_tree())
  if restored is not None:
    start, tree, data_state = restored
    state = state.with_checkpoint_tree(tree)
    if data_state is not None:
      train_iter.set_state(data_state)
    else:
      logger.warning("checkpoint %d has no data-iterator state; the data stream restarts", start)
    logger.info("resuming at step %d", start)

  writer = MetricWriter(workdir, resume_step=start)
  train_step = make_train_step(loss_fn, tx, mesh=mesh, num_groups=num_groups,
                               schedule=schedule)
  guard = preemption or checkpointing.PreemptionGuard()
  own_guard = preemption is None
  bar = ProgressBar(max_iter, start, batch_size=batch_size,
                    enabled=bool(_cfg(config, "train.progress_bar", True))
                    and jax.process_index() == 0)
  pending = _PendingMetrics()
  window_start, window_time = start, time.perf_counter()

  def log_train(step: int) -> None:
    nonlocal window_start, window_time
    flushed = pending.flush()
    if not flushed:
      return
    now = time.perf_counter()
    keys = flushed[-1][1].keys()
    scalars = {f"train/{k}": (flushed[-1][1][k] if k == "lr" else
                              float(np.mean([m[k] for _, m in flushed]))) for k in keys}
    scalars["train/images_per_sec"] = (step - window_start) * batch_size / max(
        now - window_time, 1e-9)
    writer.write_scalars(step, scalars)
    bar.update(step, scalars["train/loss"])
    window_start, window_time = step, now

  def save(step: int) -> None:
    log_train(step)  # checks every pending loss before the state may be written
    checkpointing.save_checkpoint(manager, step, state.checkpoint_tree(),
                                  train_iter.get_state())

  def evaluate(step: int) -> None:
    log_train(step)
    results = eval_fn(state.model(), step)
    writer.write_scalars(step, {(k if "/" in k else f"eval/{k}"): v for k, v in results.items()})
    logger.info("eval at step %d: %s", step, dict(results))

  if own_guard:
    guard.install()
  try:
    step = start
    while step < max_iter:
      batch = next(train_iter)
      if batch_keys is not None:
        batch = {k: batch[k] for k in batch_keys}
      batch = mesh_lib.shard_batch(batch, mesh)
      global_batch = next(iter(batch.values())).shape[0]
      if global_batch != batch_size:
        raise ValueError(f"global batch has {global_batch} images, config.train.batch_size is "
                         f"{batch_size}")
      state, metrics = train_step(state, batch)
      step += 1
      pending.add(step, metrics)
      last = step == max_iter
      # With several processes the check is a collective; poll it less often there.
      stop = ((jax.process_count() == 1 or step % log_every == 0) and guard.should_stop())
      if step % log_every == 0 or last:
        log_train(step)
      if (checkpoint_every and step % checkpoint_every == 0) or last or stop:
        save(step)
      if eval_fn is not None and ((eval_every and step % eval_every == 0) or last):
        evaluate(step)
      if stop and not last:
        logger.warning("stopping at step %d on request (checkpoint saved)", step)
        break
  finally:
    # Let a checkpoint that is being written finish: it is the one to resume from.
    manager.wait_until_finished()
    manager.close()
    writer.close()
    bar.close()
    if own_guard:
      guard.uninstall()
  return state
