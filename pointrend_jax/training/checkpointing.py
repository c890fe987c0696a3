"""Training checkpoints (orbax) with the data-iterator position, and SIGTERM handling.

A checkpoint at step ``k`` (``k`` iterations done) is a directory ``<root>/<k>/`` with two
items:

* ``state``: the train-state pytree (params, optimizer state, non-trainable variables, step,
  RNG) written by orbax's ``StandardCheckpointHandler`` -- asynchronously (the loop goes on
  while the arrays are written) and atomically (orbax writes ``<k>.orbax-checkpoint-tmp-*``
  and renames it when every process is done, so a crash mid-write leaves no partial ``<k>``).
* ``data_iter``: each process's data-iterator state as ``process_{i}-of-{n}.json`` (the file
  layout of grain's own handler; a dict state is stored as JSON, a ``bytes`` state base64).
  Unlike grain's handler this one stores a state *value* taken when the step's batch was
  drawn, so it is right even if the iterator has already been advanced (prefetching).

Only the newest ``max_to_keep`` checkpoints are kept.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import logging
import os
import signal
import threading
from collections.abc import Iterable
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from jax.experimental import multihost_utils

from pointrend_jax.checkpoint.workdir import DATA_ITEM, STATE_ITEM

__all__ = ["DataIteratorHandler", "DataIteratorSave", "DataIteratorRestore",
           "make_checkpoint_manager", "save_checkpoint", "restore_checkpoint", "restore_latest",
           "PreemptionGuard"]

logger = logging.getLogger(__name__)


def _json_default(value: Any) -> Any:
  # grain states are plain JSON types; numpy scalars / arrays can sneak into custom iterators.
  if isinstance(value, np.generic):
    return value.item()
  if isinstance(value, np.ndarray):
    return value.tolist()
  raise TypeError(f"data-iterator state value {value!r} is not JSON serializable")


def _process_file(directory: epath.Path) -> epath.Path:
  return directory / f"process_{jax.process_index()}-of-{jax.process_count()}.json"


class DataIteratorHandler(ocp.CheckpointHandler):
  """Orbax handler for a per-process data-iterator state (a JSON-able dict, or bytes)."""

  def save(self, directory: epath.Path, args: "DataIteratorSave") -> None:
    state = args.state
    if isinstance(state, (bytes, bytearray)):
      text = json.dumps({"__bytes_base64__": base64.b64encode(bytes(state)).decode("ascii")})
    else:
      text = json.dumps(state, indent=1, default=_json_default)
    directory.mkdir(parents=True, exist_ok=True)
    _process_file(directory).write_text(text)

  def restore(self, directory: epath.Path,
              args: "DataIteratorRestore | None" = None) -> Any:
    del args
    path = _process_file(directory)
    if not path.exists():
      raise FileNotFoundError(f"no data-iterator state {path} (was the process count changed?)")
    state = json.loads(path.read_text())
    if isinstance(state, dict) and set(state) == {"__bytes_base64__"}:
      return base64.b64decode(state["__bytes_base64__"])
    return state

  def metadata(self, directory: epath.Path) -> None:
    del directory
    return None


@ocp.args.register_with_handler(DataIteratorHandler, for_save=True)
@dataclasses.dataclass
class DataIteratorSave(ocp.args.CheckpointArgs):
  state: Any


@ocp.args.register_with_handler(DataIteratorHandler, for_restore=True)
@dataclasses.dataclass
class DataIteratorRestore(ocp.args.CheckpointArgs):
  pass


def make_checkpoint_manager(directory: str | os.PathLike, *, max_to_keep: int | None = 3,
                            async_save: bool = True) -> ocp.CheckpointManager:
  """An orbax ``CheckpointManager`` for ``state`` + ``data_iter`` items under ``directory``.

  Saving is decided by the caller (every ``save_checkpoint`` call writes), so the manager's
  own interval policy is left at "every step".
  """
  options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                         enable_async_checkpointing=async_save,
                                         cleanup_tmp_directories=True)
  return ocp.CheckpointManager(
      epath.Path(directory).absolute(), options=options,
      item_handlers={STATE_ITEM: ocp.StandardCheckpointHandler(),
                     DATA_ITEM: DataIteratorHandler()})


def save_checkpoint(manager: ocp.CheckpointManager, step: int, state: Any,
                    data_state: Any = None) -> None:
  """Starts writing ``state`` (a pytree of arrays) and ``data_state`` as checkpoint ``step``.

  Returns as soon as the arrays are copied off the devices; call ``manager.wait_until_finished()``
  before exiting (or before reading the checkpoint).
  """
  items = {STATE_ITEM: ocp.args.StandardSave(state)}
  if data_state is not None:
    items[DATA_ITEM] = DataIteratorSave(data_state)
  manager.save(int(step), args=ocp.args.Composite(**items), force=True)


def _abstract(tree: Any) -> Any:
  def leaf(x):
    if isinstance(x, jax.Array):
      return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
    if isinstance(x, jax.ShapeDtypeStruct):
      return x
    x = np.asarray(x)
    return jax.ShapeDtypeStruct(x.shape, x.dtype)
  return jax.tree.map(leaf, tree)


def restore_checkpoint(manager: ocp.CheckpointManager, step: int, target: Any,
                       *, with_data_state: bool = True) -> tuple[Any, Any]:
  """Restores checkpoint ``step``: ``(state, data_state)``.

  ``target`` has the structure of the saved state, its leaves arrays or ``jax.ShapeDtypeStruct``
  (their shardings, e.g. replicated on the mesh, are used). ``data_state`` (this process's
  data-iterator state) is None unless ``with_data_state`` and saved.
  """
  items = {STATE_ITEM: ocp.args.StandardRestore(_abstract(target))}
  has_data = with_data_state and (
      epath.Path(manager.directory) / str(step) / DATA_ITEM).exists()
  if has_data:
    items[DATA_ITEM] = DataIteratorRestore()
  restored = manager.restore(int(step), args=ocp.args.Composite(**items))
  return restored[STATE_ITEM], (restored[DATA_ITEM] if has_data else None)


def restore_latest(manager: ocp.CheckpointManager, target: Any,
                   *, with_data_state: bool = True) -> tuple[int, Any, Any] | None:
  """Restores the newest complete checkpoint: ``(step, state, data_state)``, or None if none."""
  step = manager.latest_step()
  if step is None:
    return None
  state, data_state = restore_checkpoint(manager, step, target, with_data_state=with_data_state)
  logger.info("restored checkpoint %d from %s", step, manager.directory)
  return step, state, data_state


class PreemptionGuard:
  """Turns SIGTERM (preemption, ``kill``, Kubernetes/SLURM shutdown) into a flag the loop polls.

  The handler only sets a flag, so the step in flight finishes; the loop then saves a
  checkpoint and returns normally. With several processes the flag is OR-ed across processes
  in :meth:`should_stop` (every process must call it at the same step) so all of them stop at
  the same step and write the same checkpoint.

  Use as a context manager; the previous handlers are restored on exit.
  """

  def __init__(self, signals: Iterable[int] = (signal.SIGTERM,)):
    self._signals = tuple(signals)
    self._event = threading.Event()
    self._previous: dict[int, Any] = {}

  def _handler(self, signum, frame) -> None:
    del frame
    logger.warning("received signal %d: will checkpoint and stop after this step", signum)
    self._event.set()

  def install(self) -> "PreemptionGuard":
    if threading.current_thread() is not threading.main_thread():
      logger.warning("not in the main thread: signal handlers not installed")
      return self
    for s in self._signals:
      self._previous[s] = signal.signal(s, self._handler)
    return self

  def uninstall(self) -> None:
    for s, h in self._previous.items():
      signal.signal(s, h)
    self._previous.clear()

  def should_stop(self) -> bool:
    """Whether any process received a stop signal (a collective with several processes)."""
    flag = self._event.is_set()
    if jax.process_count() > 1:
      flag = bool(np.any(multihost_utils.process_allgather(np.asarray(flag))))
    return flag

  def __enter__(self) -> "PreemptionGuard":
    return self.install()

  def __exit__(self, *exc) -> None:
    self.uninstall()
