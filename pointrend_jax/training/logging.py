"""Metric logging without TensorFlow: TensorBoard event files, ``metrics.jsonl``, a progress bar.

``MetricWriter`` writes every scalar dict to ``workdir/metrics.jsonl`` (one JSON object per
call: ``{"step": ..., "train/loss": ..., ...}``) and to a TensorBoard event file in
``workdir/tensorboard`` using tensorboard's own ``EventFileWriter`` and protos (``clu`` and
``flax.metrics.tensorboard`` import TensorFlow, which is not a dependency). Only process 0
writes.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
import tqdm
from tensorboard.compat.proto import event_pb2, summary_pb2
from tensorboard.summary.writer.event_file_writer import EventFileWriter

__all__ = ["MetricWriter", "ProgressBar", "read_metrics"]

METRICS_FILE = "metrics.jsonl"


def _to_float(value: Any) -> float:
  return float(np.asarray(value))


class MetricWriter:
  """Scalars to ``metrics.jsonl`` and TensorBoard.

  Args:
    workdir: output directory (created).
    enabled: write anything at all (default: only on process 0).
    tensorboard: also write TensorBoard event files under ``workdir/tensorboard``.
    resume_step: when resuming from a checkpoint at this step, drop ``metrics.jsonl`` lines of
      later steps (logged after that checkpoint by the interrupted run, about to be redone).
  """

  def __init__(self, workdir: str | os.PathLike, *, enabled: bool | None = None,
               tensorboard: bool = True, resume_step: int | None = None):
    self.enabled = jax.process_index() == 0 if enabled is None else enabled
    self.path = os.path.join(os.fspath(workdir), METRICS_FILE)
    self._jsonl = None
    self._tb = None
    if not self.enabled:
      return
    os.makedirs(os.fspath(workdir), exist_ok=True)
    if resume_step is not None and os.path.exists(self.path):
      kept = [r for r in read_metrics(self.path) if r.get("step", 0) <= resume_step]
      with open(self.path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in kept)
    self._jsonl = open(self.path, "a")
    if tensorboard:
      self._tb = EventFileWriter(os.path.join(os.fspath(workdir), "tensorboard"))

  def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
    """Writes one record ``{"step": step, **scalars}`` (values converted to float)."""
    if not self.enabled:
      return
    values = {k: _to_float(v) for k, v in scalars.items()}
    record = {"step": int(step), **{k: (v if math.isfinite(v) else str(v))
                                    for k, v in values.items()}}
    self._jsonl.write(json.dumps(record) + "\n")
    self._jsonl.flush()
    if self._tb is not None:
      summary = summary_pb2.Summary(value=[
          summary_pb2.Summary.Value(tag=k, simple_value=v) for k, v in values.items()])
      self._tb.add_event(event_pb2.Event(wall_time=time.time(), step=int(step),
                                         summary=summary))

  def flush(self) -> None:
    if self._jsonl is not None:
      self._jsonl.flush()
    if self._tb is not None:
      self._tb.flush()

  def close(self) -> None:
    if self._jsonl is not None:
      self._jsonl.close()
      self._jsonl = None
    if self._tb is not None:
      self._tb.close()
      self._tb = None

  def __enter__(self) -> "MetricWriter":
    return self

  def __exit__(self, *exc) -> None:
    self.close()


def read_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
  """Reads a ``metrics.jsonl`` file (a workdir is accepted too)."""
  path = os.fspath(path)
  if os.path.isdir(path):
    path = os.path.join(path, METRICS_FILE)
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


class ProgressBar:
  """tqdm bar over training steps showing loss, images/s and the ETA (process 0 only).

  Args:
    total: the last step (MAX_ITER).
    initial: the step training starts (or resumes) from.
    batch_size: global images per step, for the images/s figure.
    enabled: show the bar (default: process 0 only).
  """

  def __init__(self, total: int, initial: int = 0, *, batch_size: int = 1,
               enabled: bool | None = None):
    if enabled is None:
      enabled = jax.process_index() == 0
    self.batch_size = batch_size
    self._bar = tqdm.tqdm(total=total, initial=initial, disable=not enabled, unit="step",
                          dynamic_ncols=True, smoothing=0.1)
    self._last_step = initial
    self._last_time = time.perf_counter()

  def update(self, step: int, loss: float | None = None, **extra: float) -> None:
    """Moves the bar to ``step``; images/s is measured since the previous update."""
    now = time.perf_counter()
    steps = step - self._last_step
    postfix = {}
    if loss is not None:
      postfix["loss"] = f"{loss:.4f}"
    if steps > 0 and now > self._last_time:
      postfix["img/s"] = f"{steps * self.batch_size / (now - self._last_time):.1f}"
    postfix.update({k: f"{v:.4g}" for k, v in extra.items()})
    self._bar.set_postfix(postfix, refresh=False)
    self._bar.update(steps)
    self._last_step, self._last_time = step, now

  def close(self) -> None:
    self._bar.close()

