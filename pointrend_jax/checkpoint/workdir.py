"""A ``launch.py`` workdir as the checkpoint code sees it: its layout, its run config, the model
of any training checkpoint, and the export of a trained model as a converted checkpoint.

Layout::

  WORKDIR/config.json             the run config (``configs/*.py`` after overrides)
  WORKDIR/class_names.json        the training data's class names
  WORKDIR/checkpoints/<step>/     orbax: ``state`` (train state) and ``data_iter``
  WORKDIR/model/                  the final model, a converted checkpoint
                                  (``Predictor(None, WORKDIR/model)``, ``tools.predict``)
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import ml_collections
from flax import nnx

from pointrend_jax.errors import ConfigError, DataError
from pointrend_jax.modeling.config import ModelConfig

__all__ = ["RUN_CONFIG", "CLASS_NAMES_FILE", "CHECKPOINTS", "STATE_ITEM", "DATA_ITEM",
           "EXPORT_DIR", "read_run_config", "read_class_names", "checkpoint_steps",
           "restore_trained_model", "export_trained_model"]

RUN_CONFIG = "config.json"
CLASS_NAMES_FILE = "class_names.json"
CHECKPOINTS = "checkpoints"
STATE_ITEM = "state"  # the train state in each checkpoint step
DATA_ITEM = "data_iter"  # the data iterator's state in each checkpoint step
EXPORT_DIR = "model"


def read_run_config(workdir: str | os.PathLike) -> ml_collections.ConfigDict:
  """The run config ``launch.py`` saved in ``workdir/config.json``.

  Raises:
    DataError: ``workdir`` or its ``config.json`` is missing.
    ConfigError: ``config.json`` is not a JSON object.
  """
  workdir = os.fspath(workdir)
  if not os.path.isdir(workdir):
    raise DataError(f"workdir not found: {workdir}")
  path = os.path.join(workdir, RUN_CONFIG)
  if not os.path.isfile(path):
    raise DataError(f"{workdir} has no {RUN_CONFIG} (not a launch.py workdir)")
  try:
    with open(path) as f:
      data = json.load(f)
  except ValueError as e:
    raise ConfigError(f"{path}: not JSON ({e})") from e
  if not isinstance(data, dict):
    raise ConfigError(f"{path}: expected a JSON object")
  return ml_collections.ConfigDict(data)


def read_class_names(workdir: str | os.PathLike, num_classes: int) -> list[str] | None:
  """The training data's class names, when stored and ``num_classes`` long."""
  path = os.path.join(os.fspath(workdir), CLASS_NAMES_FILE)
  if not os.path.isfile(path):
    return None
  with open(path) as f:
    names = json.load(f)
  ok = isinstance(names, list) and len(names) == num_classes
  return [str(n) for n in names] if ok else None


def checkpoint_steps(workdir: str | os.PathLike) -> list[int]:
  """The steps of the training checkpoints in ``workdir``, ascending."""
  ckpt_dir = os.path.join(os.fspath(workdir), CHECKPOINTS)
  if not os.path.isdir(ckpt_dir):
    return []
  return sorted(int(d) for d in os.listdir(ckpt_dir) if d.isdigit())


def restore_trained_model(workdir: str | os.PathLike, mcfg: ModelConfig,
                          step: int | None = None, *, dtype: Any = "float32",
                          sharding: jax.sharding.Sharding | None = None
                          ) -> tuple[int, nnx.Module]:
  """The model of training checkpoint ``step`` (default: the newest) of ``workdir``.

  Only the model's variables are read (an orbax partial restore of the train state's
  ``params`` and ``model_state``), into a model built abstractly (computing in ``dtype``), so
  this is fast even for big models and needs no optimizer.

  Returns:
    ``(step, model)``, the arrays with ``sharding`` (default: the first local device).

  Raises:
    DataError: no checkpoints, or no checkpoint ``step`` (the message lists those present).
  """
  import orbax.checkpoint as ocp
  from pointrend_jax.modeling.layers import TRAINABLE
  from pointrend_jax.modeling.meta_arch import abstract_model
  ckpt_dir = os.path.join(os.fspath(workdir), CHECKPOINTS)
  steps = checkpoint_steps(workdir)
  if not steps:
    raise DataError(f"no training checkpoint in {ckpt_dir}")
  step = steps[-1] if step is None else int(step)
  if step not in steps:
    raise DataError(f"no checkpoint {step} in {ckpt_dir} (available: "
                    f"{', '.join(map(str, steps))})")
  graphdef, params, rest = nnx.split(abstract_model(mcfg, dtype=dtype), TRAINABLE, ...)
  target = {"params": nnx.to_pure_dict(params), "model_state": nnx.to_pure_dict(rest)}
  sharding = sharding or jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding),
                        target)
  # The item directly, not through a CheckpointManager: opening a manager cleans up temporary
  # directories, i.e. would break a checkpoint that a running training is writing.
  path = os.path.abspath(os.path.join(ckpt_dir, str(step), STATE_ITEM))
  with ocp.PyTreeCheckpointer() as ckptr:
    tree = ckptr.restore(path, args=ocp.args.PyTreeRestore(item=target, partial_restore=True))
  return step, nnx.merge(graphdef, tree["params"], tree["model_state"])


def export_trained_model(model: nnx.Module, mcfg: ModelConfig, out_dir: str | os.PathLike, *,
                         class_names: Sequence[str] | None = None,
                         source: Mapping[str, Any] | None = None) -> str:
  """Writes ``model`` as a converted checkpoint (replacing ``out_dir``), returning its absolute
  path; every process calls it.

  Args:
    model: a concrete model (e.g. ``TrainState.model()``).
    mcfg: its full model config (stored as JSON: the directory loads without the run config).
    out_dir: the output directory; an existing one is replaced.
    class_names: the dataset's class names (Predictor's labels); must match the class count.
    source: provenance stored in ``config.json`` (workdir, step).
  """
  from pointrend_jax.checkpoint import orbax_io
  return str(orbax_io.save_converted(model, mcfg, out_dir, overwrite=True,
                                     source=dict(source or {}, kind="training checkpoint"),
                                     class_names=class_names))
