"""What ``launch.py`` runs, and the training loop.

* :func:`train_and_evaluate` / :func:`evaluate`: the run config (``configs/*.py``) -> model config
  (:func:`~pointrend_jax.modeling.zoo.model_config`), splits
  (:func:`~pointrend_jax.data.splits.load_split`), loaders, model and init weights
  (:func:`init_weights`), then :func:`train_loop` with the instance or semantic losses and the
  run's :class:`~pointrend_jax.training.evaluator.Evaluator`; after the final evaluation the
  pictures (``<workdir>/pictures``), the summary (``<workdir>/summary.json``) and the exported
  model (``<workdir>/model``, :mod:`~pointrend_jax.checkpoint.workdir`).
* :func:`train_loop` runs :mod:`~pointrend_jax.training.step`'s train step over a data
  iterator with checkpoints, metrics, evaluation and preemption handling.

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

import json
import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

import jax
import ml_collections
import numpy as np
from flax import nnx

from pointrend_jax.checkpoint import workdir as workdir_lib
from pointrend_jax.data import pipeline
from pointrend_jax.data.splits import load_split
from pointrend_jax.errors import ConfigError, DataError
from pointrend_jax.modeling import zoo
from pointrend_jax.modeling.config import ModelConfig
from pointrend_jax.training import checkpointing
from pointrend_jax.training import mesh as mesh_lib
from pointrend_jax.training import optimizer as optimizer_lib
from pointrend_jax.training.logging import MetricWriter, ProgressBar
from pointrend_jax.training.evaluator import Evaluator
from pointrend_jax.training.step import LossFn, TrainState, create_train_state, make_train_step

__all__ = ["DataIterator", "InMemoryIterator", "train_loop", "validate_config", "build_run_model",
           "init_weights", "train_and_evaluate", "evaluate"]

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


# --- Loop ---


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
      os.path.join(workdir, workdir_lib.CHECKPOINTS),
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


# --- Model and weights ---


def build_run_model(config: ml_collections.ConfigDict, mcfg: ModelConfig) -> nnx.Module:
  """The randomly initialised model (seed ``config.seed``), computing in
  ``train.compute_dtype``."""
  from pointrend_jax.modeling import meta_arch
  return meta_arch.build_model(mcfg, rngs=nnx.Rngs(int(config.get("seed", 0) or 0)),
                               dtype=config.train.get("compute_dtype", "float32"))


def init_weights(model: nnx.Module, config: ml_collections.ConfigDict) -> str:
  """Loads ``config.init.weights`` into ``model`` in place; returns a one-line description."""
  from pointrend_jax.checkpoint.weights import load_weights
  path = str(config.init.get("weights", "") or "")
  if not path:
    return "random initialisation (config.init.weights is empty)"
  if path.startswith(("detectron2://", "http://", "https://")):
    url = path.replace("detectron2://", "https://dl.fbaipublicfiles.com/detectron2/")
    raise DataError(f"config.init.weights is a URL ({path}); nothing is downloaded at run time: "
                    f"download {url} and set --config.init.weights=/local/path")
  local = os.path.expanduser(path.split("?", 1)[0])
  if not os.path.exists(local):
    raise DataError(f"expected weights at {local} (config.init.weights); download the "
                    "detectron2 file (ImageNet backbones: https://dl.fbaipublicfiles.com/"
                    "detectron2/ImageNetPretrained/MSRA/R-50.pkl etc.), point "
                    "--config.init.weights at it, or set it to '' to train from scratch")
  return load_weights(model, local, backbone_only_ok=True)


# --- Training / evaluation entry points ---


class _SlowIterator:
  """Sleeps before each batch (``train.debug_step_delay_s``; preemption tests only)."""

  def __init__(self, it: Any, delay: float):
    self._it, self._delay = it, delay

  def __next__(self):
    time.sleep(self._delay)
    return next(self._it)

  def get_state(self):
    return self._it.get_state()

  def set_state(self, state):
    self._it.set_state(state)


def validate_config(config: ml_collections.ConfigDict) -> None:
  for key in ("seed", "train.max_steps", "train.batch_size", "train.checkpoint_every",
              "train.log_every", "eval.every", "init.weights", "data.train", "data.val",
              "solver.base_lr", "model.zoo"):
    node = config
    for part in key.split("."):
      if not isinstance(node, ml_collections.ConfigDict) or part not in node:
        raise ConfigError(f"config is missing required key {key!r} (see configs/common.py)")
      node = node[part]
  # Values train_loop would reject only after the data and the model are built.
  batch = int(config.train.batch_size)
  groups = int(config.train.get("num_replicas_d2", 1) or 1)
  if batch < 1 or groups < 1 or batch % groups:
    raise ConfigError(f"config.train.batch_size ({batch}) must be a positive multiple of "
                           f"config.train.num_replicas_d2 ({groups})")
  from pointrend_jax.modeling import layers
  try:
    layers.canonical_compute_dtype(config.train.get("compute_dtype", "float32"))
  except ValueError as e:
    raise ConfigError(f"config.train.compute_dtype: {e}") from e


def _fmt(v: Any) -> str:
  return "nan" if v is None or not np.isfinite(v) else f"{v:.1f}"


def _write_summary(config: ml_collections.ConfigDict, workdir: str, metrics: Mapping[str, float],
                   step: int, timings: Mapping[str, float], mcfg: ModelConfig) -> None:
  if jax.process_index() != 0:
    return
  summary = {"step": step, "metrics": {k: (None if not np.isfinite(v) else v)
                                       for k, v in metrics.items() if "-" not in k},
             "seconds": dict(timings)}
  with open(os.path.join(workdir, "summary.json"), "w") as f:
    json.dump(summary, f, indent=1)
  lines = [f"== summary: {workdir} (step {step}) =="]
  if mcfg.is_semantic:
    lines.append(f"mIoU {_fmt(metrics.get('eval/sem_seg/mIoU'))}")
  else:
    from pointrend_jax.modeling.point_rend import subdivision_schedule
    side = mcfg.mask_head.output_side_resolution
    res, steps = subdivision_schedule(side, mcfg.point_head.subdivision_steps,
                                      mcfg.point_head.subdivision_num_points)
    rows = [(f"mask AP, PointRend {res * 2 ** steps}x{res * 2 ** steps}", "segm"),
            (f"mask AP, coarse {side}x{side} upsampled", "segm_coarse"), ("box AP", "bbox")]
    width = max(len(r[0]) for r in rows)
    for title, task in rows:
      if f"eval/{task}/AP" in metrics:
        lines.append(f"{title:<{width}}  " + "  ".join(
            f"{m} {_fmt(metrics.get(f'eval/{task}/{m}'))}" for m in ("AP", "AP50", "AP75")))
  lines.append("wall time " + ", ".join(f"{k} {v / 60:.1f} min" if v >= 60 else f"{k} {v:.0f} s"
                                        for k, v in timings.items()))
  print("\n".join(lines), flush=True)


def _pictures(evaluator: Evaluator, workdir: str) -> None:
  if not evaluator.last_visuals or jax.process_index() != 0:
    return
  from pointrend_jax import visualization
  out = os.path.join(workdir, "pictures")
  paths = visualization.write_pictures(evaluator.last_visuals, evaluator.split.class_names,
                                       out, mask_threshold=evaluator.threshold)
  logger.info("wrote %d pictures to %s", len(paths), out)


def _setup(config: ml_collections.ConfigDict, workdir: str):
  validate_config(config)
  os.makedirs(workdir, exist_ok=True)
  if jax.process_index() == 0:
    with open(os.path.join(workdir, "config.json"), "w") as f:
      f.write(config.to_json_best_effort(indent=1))
  mcfg = zoo.model_config(config.model)
  return mcfg, mesh_lib.make_mesh()


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | os.PathLike, *,
                       evaluate_after: bool = True,
                       start_time: float | None = None) -> dict[str, float]:
  """Trains ``config`` in ``workdir`` (resuming from its latest checkpoint), evaluating every
  ``eval.every`` steps and at the end when ``evaluate_after``.

  Returns:
    The last evaluation's metrics (empty without evaluation or when stopped by SIGTERM).
  """
  start_time = time.time() if start_time is None else start_time
  workdir = os.fspath(workdir)
  mcfg, mesh = _setup(config, workdir)
  timings: dict[str, float] = {}
  t = time.time()
  train_split = load_split(config, "train", workdir, mcfg)
  if jax.process_index() == 0:
    # For tools.export: the exported model carries the names (Predictor labels).
    with open(os.path.join(workdir, workdir_lib.CLASS_NAMES_FILE), "w") as f:
      json.dump(list(train_split.class_names), f, indent=1)
  evaluator = Evaluator(config, workdir, mcfg, mesh=mesh) if evaluate_after else None
  timings["data"] = time.time() - t

  t = time.time()
  model = build_run_model(config, mcfg)
  if workdir_lib.checkpoint_steps(workdir):
    logger.info("init: skipped, resuming from %s",
                os.path.join(workdir, workdir_lib.CHECKPOINTS))
  else:
    logger.info("init: %s", init_weights(model, config))
  timings["model"] = time.time() - t

  procs = jax.process_count()
  batch = int(config.train.batch_size)
  if batch % procs:
    raise ConfigError(f"train.batch_size {batch} not divisible by {procs} processes")
  it = pipeline.build_train_loader(
      train_split.records, batch_size_per_process=batch // procs, seed=int(config.seed),
      config=pipeline.loader_config(config.data, mcfg),
      worker_count=int(config.data.get("num_workers", 0)))
  delay = float(config.train.get("debug_step_delay_s", 0.0) or 0.0)
  train_iter = _SlowIterator(it, delay) if delay > 0 else it

  if mcfg.is_semantic:
    from pointrend_jax.training.losses_semantic import semantic_loss_fn as loss_fn
    batch_keys: tuple[str, ...] = ("image", "image_size", "sem_seg")
  else:
    from pointrend_jax.training.losses_instance import INSTANCE_BATCH_KEYS as batch_keys
    from pointrend_jax.training.losses_instance import instance_loss_fn as loss_fn

  max_steps = int(config.train.max_steps)
  last: dict[str, Any] = {"metrics": {}, "step": None}

  def eval_fn(m: nnx.Module, step: int) -> dict[str, float]:
    final = step >= max_steps
    te = time.time()
    metrics = evaluator(m, step, final=final)
    timings["eval" if final else f"eval@{step}"] = time.time() - te
    last.update(metrics=metrics, step=step)
    if final:
      _pictures(evaluator, workdir)
    return metrics

  t = time.time()
  try:
    state = train_loop(config, workdir, model, loss_fn, train_iter,
                                 eval_fn=eval_fn if evaluate_after else None, mesh=mesh,
                                 batch_keys=batch_keys)
  finally:
    if hasattr(it, "close"):
      it.close()
  step = int(jax.device_get(state.step))
  timings["train"] = time.time() - t - sum(v for k, v in timings.items() if k.startswith("eval"))
  if step < max_steps:
    logger.warning("training stopped at step %d of %d (preempted); rerun the same command to "
                   "resume", step, max_steps)
    return {}
  if evaluate_after and last["step"] != step:
    # Training was already complete (nothing ran): evaluate the final checkpoint.
    metrics = eval_fn(state.model(), step)
    with MetricWriter(workdir) as writer:
      writer.write_scalars(step, metrics)
  t = time.time()
  exported = workdir_lib.export_trained_model(
      state.model(), mcfg, os.path.join(workdir, workdir_lib.EXPORT_DIR),
      class_names=train_split.class_names or None,
      source={"workdir": os.path.abspath(workdir), "step": step})
  logger.info("exported the final model to %s (Predictor(None, %r), tools.predict --weights)",
              exported, str(exported))
  timings["export"] = time.time() - t
  timings["total"] = time.time() - start_time
  if evaluate_after:
    _write_summary(config, workdir, last["metrics"], step, timings, mcfg)
  return last["metrics"]


def evaluate(config: ml_collections.ConfigDict, workdir: str | os.PathLike, *,
             start_time: float | None = None) -> dict[str, float]:
  """Evaluates the latest checkpoint in ``workdir`` (else ``config.init.weights``).

  Metrics are appended to ``workdir/metrics.jsonl`` / TensorBoard at the checkpoint's step.
  """
  start_time = time.time() if start_time is None else start_time
  workdir = os.fspath(workdir)
  mcfg, mesh = _setup(config, workdir)
  timings: dict[str, float] = {}
  t = time.time()
  evaluator = Evaluator(config, workdir, mcfg, mesh=mesh)  # data errors first, before the model
  timings["data"] = time.time() - t
  ckpt_dir = os.path.join(workdir, workdir_lib.CHECKPOINTS)
  step = 0
  if workdir_lib.checkpoint_steps(workdir):
    step, model = workdir_lib.restore_trained_model(
        workdir, mcfg, dtype=config.train.get("compute_dtype", "float32"),
        sharding=mesh_lib.replicated_sharding(mesh))
    logger.info("evaluating checkpoint %d of %s", step, ckpt_dir)
  else:
    if not str(config.init.get("weights", "") or ""):
      raise DataError(f"nothing to evaluate: no checkpoint in {ckpt_dir} and config.init.weights "
                      "is empty (train first, or point --config.init.weights at a full model)")
    model = build_run_model(config, mcfg)
    logger.info("evaluating init weights: %s", init_weights(model, config))
  t = time.time()
  metrics = evaluator(model, step, final=True)
  timings["eval"] = time.time() - t
  _pictures(evaluator, workdir)
  with MetricWriter(workdir) as writer:
    writer.write_scalars(step, metrics)
  timings["total"] = time.time() - start_time
  _write_summary(config, workdir, metrics, step, timings, mcfg)
  return metrics
