"""Converted checkpoints: a model's Flax variables in orbax format plus its config as JSON.

Layout of a converted directory::

  OUT_DIR/config.json   {"format": "pointrend-jax-converted", "version": 1,
                         "config": ModelConfig.to_dict(), "source": {...},
                         ["class_names": [...]]}
  OUT_DIR/state/        orbax StandardCheckpointer of nnx.to_pure_dict(nnx.state(model))

``class_names`` (optional; models exported from training store their dataset's names) label
the class ids in :class:`~pointrend_jax.inference.Predictor`.

Every variable is saved (trainable ``nnx.Param``, ``FrozenParam``, FrozenBN ``FrozenStat``,
``BatchStat``), in the Flax layouts (HWIO convs, ``(in, out)`` dense kernels). Restoring builds the
model abstractly from the config and fills it, so no random initialization runs.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import orbax.checkpoint as ocp
from flax import nnx

from pointrend_jax.errors import CheckpointError, ConfigError
from pointrend_jax.modeling.config import ModelConfig
from pointrend_jax.modeling.meta_arch import abstract_model

__all__ = ["FORMAT", "VERSION", "save_converted", "load_converted", "load_converted_into",
           "read_converted_config", "read_converted_class_names"]

FORMAT = "pointrend-jax-converted"
VERSION = 1
_CONFIG = "config.json"
_STATE = "state"


def _sync(name: str) -> None:
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(name)


def save_converted(model: nnx.Module, cfg: ModelConfig, out_dir: str | os.PathLike[str], *,
                   source: Mapping[str, Any] | None = None, overwrite: bool = False,
                   class_names: Sequence[str] | None = None) -> pathlib.Path:
  """Writes ``model``'s variables (orbax) and ``cfg`` (JSON) to ``out_dir``; returns its
  absolute path.

  With several JAX processes every process must call it (orbax writes collectively); process 0
  alone prepares the directory and writes ``config.json``.

  Args:
    model: a concrete model (every variable holds an array).
    cfg: its :class:`~pointrend_jax.modeling.config.ModelConfig`.
    out_dir: created; must be absent or empty unless ``overwrite``.
    source: provenance stored in ``config.json`` (e.g. the detectron2 file and format).
    overwrite: replace an existing non-empty ``out_dir``.
    class_names: names of the class ids (``cfg.num_classes`` of them), stored for the
      predictor's labels.
  """
  out = pathlib.Path(os.fspath(out_dir)).expanduser().resolve()
  if class_names is not None and len(class_names) != cfg.num_classes:
    raise CheckpointError(f"{len(class_names)} class names for {cfg.num_classes} classes")
  primary = jax.process_index() == 0
  if out.exists():
    if not out.is_dir():
      raise CheckpointError(f"{out} exists and is not a directory")
    if any(out.iterdir()):
      if not overwrite:
        raise CheckpointError(f"{out} is not empty (use overwrite / --force)")
      if primary:
        shutil.rmtree(out)
  if primary:
    out.mkdir(parents=True, exist_ok=True)
  # No process may look at the directory while process 0 is still replacing it.
  _sync("pointrend_jax.save_converted.prepared")
  ckpt = ocp.StandardCheckpointer()
  ckpt.save(out / _STATE, nnx.to_pure_dict(nnx.state(model)))
  ckpt.wait_until_finished()
  if primary:
    meta = {"format": FORMAT, "version": VERSION, "config": cfg.to_dict(),
            "source": dict(source or {})}
    if class_names is not None:
      meta["class_names"] = [str(n) for n in class_names]
    (out / _CONFIG).write_text(json.dumps(meta, indent=1) + "\n", encoding="utf-8")
  _sync("pointrend_jax.save_converted.done")
  return out


def _read_meta(out_dir: str | os.PathLike[str]) -> tuple[pathlib.Path, dict[str, Any]]:
  path = pathlib.Path(os.fspath(out_dir)).expanduser() / _CONFIG
  try:
    meta = json.loads(path.read_text(encoding="utf-8"))
  except FileNotFoundError as e:
    raise CheckpointError(f"{path.parent}: not a converted checkpoint (no {_CONFIG})") from e
  except (OSError, ValueError) as e:
    raise CheckpointError(f"{path}: unreadable ({e})") from e
  if not isinstance(meta, dict) or meta.get("format") != FORMAT:
    raise CheckpointError(f"{path}: not a {FORMAT} file")
  if meta.get("version") != VERSION:
    raise CheckpointError(f"{path}: version {meta.get('version')} is not supported "
                          f"(expected {VERSION})")
  return path, meta


def read_converted_config(out_dir: str | os.PathLike[str]) -> ModelConfig:
  """The :class:`ModelConfig` stored in a converted directory."""
  path, meta = _read_meta(out_dir)
  try:
    return ModelConfig.from_dict(meta["config"])
  except (ConfigError, KeyError, TypeError) as e:
    raise CheckpointError(f"{path}: bad config ({e})") from e


def load_converted(out_dir: str | os.PathLike[str]) -> tuple[ModelConfig, nnx.Module]:
  """Restores ``(cfg, model)`` from a directory written by :func:`save_converted`."""
  cfg = read_converted_config(out_dir)
  model = abstract_model(cfg)
  graphdef, state = nnx.split(model)
  path = pathlib.Path(os.fspath(out_dir)).expanduser().resolve() / _STATE
  if not path.is_dir():
    raise CheckpointError(f"{path.parent}: missing the {_STATE}/ directory")
  try:
    restored = ocp.StandardCheckpointer().restore(path, nnx.to_pure_dict(state))
  except Exception as e:  # orbax raises many types; the caller wants one readable error
    raise CheckpointError(f"{path}: cannot restore ({' '.join(str(e).split())[:300]})") from e
  nnx.replace_by_pure_dict(state, restored)
  return cfg, nnx.merge(graphdef, state)


def load_converted_into(model: nnx.Module, out_dir: str | os.PathLike[str]) -> None:
  """Fills ``model`` (in place) from a converted directory whose variables have the same names
  and shapes (e.g. the same network with other test sizes or thresholds).

  Raises:
    CheckpointError: unreadable, or the variables differ from ``model``'s.
  """
  _, loaded = load_converted(out_dir)
  theirs = nnx.state(loaded)
  shapes = lambda state: jax.tree.map(lambda x: tuple(x.shape), nnx.to_pure_dict(state))
  if shapes(nnx.state(model)) != shapes(theirs):
    raise CheckpointError(f"{out_dir}: the converted model's variables (names or shapes) differ "
                          "from this config's model; use the config it was converted with")
  nnx.update(model, theirs)


def read_converted_class_names(out_dir: str | os.PathLike[str]) -> list[str] | None:
  """The class names stored in a converted directory, or None (e.g. converted detectron2
  files: the predictor then uses the COCO / Cityscapes names by class count)."""
  path, meta = _read_meta(out_dir)
  names = meta.get("class_names")
  if names is None:
    return None
  if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
    raise CheckpointError(f"{path}: class_names must be a list of strings")
  return names
