"""Reads detectron2 / Detectron (Caffe2) / PyTorch checkpoints into numpy, without torch.

Containers (``shared/spec/checkpoint_format.md`` §1), unpickled by
:mod:`pointrend_jax.checkpoint.safe_pickle`:

* detectron2 model-zoo ``.pkl``: ``{"model": {name: ndarray}, "__author__": ...}``;
* Caffe2 / Detectron1 ``.pkl`` (ImageNet backbones): ``{blob: ndarray}`` or ``{"blobs": {...}}``,
  or detectron2's normalised form of them, ``{"model": {blob: ndarray}, "__author__": "Caffe2",
  "matching_heuristics": True}``;
* ``torch.save`` files (``.pth``): detectron2 training checkpoints keep the state dict under
  ``"model"``.

Names are normalized to the current detectron2 (PointRend "v2") names (§3, §4); matching them
against a model is :mod:`pointrend_jax.checkpoint.d2_matching`. Arrays keep detectron2's PyTorch
layouts (OIHW convs, ``(out, in)`` linears) and the dtype they were stored with.
"""

from __future__ import annotations

import dataclasses
import os
import pickle
import re
import struct
import zipfile
import zlib
from typing import Any, Iterable, Mapping
from urllib import parse as urllib_parse

import numpy as np

from pointrend_jax.checkpoint.safe_pickle import read_container, state_arrays
from pointrend_jax.errors import CheckpointError, one_line

__all__ = ["Detectron2Checkpoint", "canonicalize_names", "convert_c2_names",
           "load_detectron2_file"]


@dataclasses.dataclass
class Detectron2Checkpoint:
  """A checkpoint's model state, normalized to current detectron2 names.

  Attributes:
    state: canonical detectron2 state-dict name -> array (PyTorch layout, stored dtype). For
      Caffe2 files the names are the converted short names (``res2.0.conv1.weight``) that
      :func:`match_state_dict` suffix-matches against the model.
    format: ``"d2-model-zoo"`` (model-zoo ``.pkl``), ``"caffe2"`` (Caffe2 / Detectron1
      ``.pkl``, or a model-zoo-style ``.pkl`` with ``__author__`` "Caffe2" and matching
      heuristics), ``"pth-training"`` (``torch.save`` of a dict with ``"model"``, e.g. detectron2
      training checkpoints) or ``"pth-state-dict"`` (``torch.save`` of a bare state dict).
    matching_heuristics: whether detectron2 would match names by the suffix heuristic (§4.2).
    metadata: ``container`` (pickle / torch-zip / torch-legacy), ``author``, ``iteration``,
      ``module_versions`` ({module: version} from the state dict's ``_metadata``),
      ``renamed`` ({canonical: original name}), ``dropped`` (``*_momentum`` blobs),
      ``top_level_keys``.
    path: the file read.
  """

  state: dict[str, np.ndarray]
  format: str
  metadata: dict[str, Any]
  matching_heuristics: bool = False
  path: str = ""


def _split_query(path: str) -> tuple[str, dict[str, list[str]]]:
  if os.path.exists(path) or "?" not in path:
    return path, {}
  base, _, query = path.partition("?")
  return base, urllib_parse.parse_qs(query)


def load_detectron2_file(path: str | os.PathLike[str]) -> Detectron2Checkpoint:
  """Reads a detectron2 / Caffe2 ``.pkl`` or a ``torch.save`` file without torch.

  The container is recognized from the content (zip, torch legacy magic number, or a plain
  pickle), not from the extension. A trailing ``?matching_heuristics=True`` (detectron2's URL
  query syntax) turns on suffix matching for ``.pth`` files. Returns the model state with
  canonical names (see :func:`canonicalize_names`) and metadata.

  Raises:
    CheckpointError: unreadable, truncated or corrupt file, or unsupported content.
    UnsafeCheckpointError: the pickle names a global outside the tensor/array allow-list.
    FileNotFoundError: no such file.
  """
  path, query = _split_query(os.fspath(path))
  path = os.path.expanduser(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"checkpoint file not found: {path}")
  try:
    return _load(path, query)
  except CheckpointError as e:
    msg = " ".join(str(e).split())
    if path not in msg:
      msg = f"{path}: {msg}"
    raise type(e)(msg) from e
  except (EOFError, pickle.UnpicklingError, zipfile.BadZipFile, zlib.error, struct.error,
          ValueError, TypeError, AttributeError, IndexError, KeyError, UnicodeDecodeError,
          OverflowError, MemoryError, RecursionError) as e:
    detail = one_line(f"{type(e).__name__}: {e}")
    raise CheckpointError(f"{path}: truncated or corrupt checkpoint file ({detail})") from e


def _load(path: str, query: Mapping[str, list[str]]) -> Detectron2Checkpoint:
  obj, container, close = read_container(path)
  metadata: dict[str, Any] = {"container": container}
  try:
    if container == "pickle":
      state, fmt, heuristics = _from_pickle(path, obj, metadata)
    else:
      state, fmt = _from_torch(path, obj, metadata)
      heuristics = query.get("matching_heuristics", ["False"]) == ["True"]
  finally:
    if close is not None:
      close()
  canon = canonicalize_names(state, caffe2=fmt == "caffe2")
  metadata["renamed"] = {n: o for o, n in zip(state, canon) if n != o}
  return Detectron2Checkpoint(state=canon, format=fmt, metadata=metadata,
                              matching_heuristics=heuristics, path=path)


def _from_pickle(path: str, data: Any, metadata: dict[str, Any]
                 ) -> tuple[dict[str, np.ndarray], str, bool]:
  """(state, format, matching heuristics) of a model-zoo or Caffe2 pickle."""
  if not isinstance(data, dict):
    raise CheckpointError(f"{path}: pickle holds a {type(data).__name__}, not a dict")
  metadata["top_level_keys"] = [str(k) for k in data]
  if "model" in data and "__author__" in data:
    metadata["author"] = data["__author__"]
    heuristics = bool(data.get("matching_heuristics", False))
    if not (heuristics and data["__author__"] == "Caffe2"):
      return state_arrays(path, data["model"]), "d2-model-zoo", heuristics
    # detectron2 converts Caffe2 blob names whenever a file matched by heuristics has
    # __author__ "Caffe2": also its own normalised form of a Caffe2 pickle, written back to disk.
    blobs = data["model"]
  else:
    blobs = data["blobs"] if "blobs" in data else data
    metadata["author"] = "Caffe2"
  if not isinstance(blobs, dict):
    raise CheckpointError(f"{path}: 'blobs' is a {type(blobs).__name__}, not a dict")
  metadata["dropped"] = [k for k in blobs if str(k).endswith("_momentum")]
  state = state_arrays(path, {k: v for k, v in blobs.items() if not str(k).endswith("_momentum")})
  return state, "caffe2", True


def _from_torch(path: str, obj: Any, metadata: dict[str, Any]
                ) -> tuple[dict[str, np.ndarray], str]:
  """(state, format) of a ``torch.save`` file."""
  if isinstance(obj, dict) and "model" in obj:
    fmt, raw_state = "pth-training", obj["model"]
    metadata["top_level_keys"] = [str(k) for k in obj]
    if isinstance(obj.get("iteration"), int):
      metadata["iteration"] = obj["iteration"]
  elif isinstance(obj, dict):
    fmt, raw_state = "pth-state-dict", obj
  else:
    raise CheckpointError(f"{path}: torch file holds a {type(obj).__name__}, not a dict")
  if not isinstance(raw_state, dict):
    raise CheckpointError(f"{path}: 'model' is a {type(raw_state).__name__}, not a dict")
  versions = _module_versions(getattr(raw_state, "_metadata", None))
  # Only the model's tensors are read; optimizer buffers etc. stay unread in the zip.
  state = state_arrays(path, raw_state)
  if versions is not None and _all_have_prefix(state, "module."):
    versions = {(m[len("module."):] if m.startswith("module.") else m): v
                for m, v in versions.items()}
  metadata["module_versions"] = versions
  return state, fmt


def _module_versions(meta: Any) -> dict[str, int] | None:
  if not isinstance(meta, dict):
    return None
  return {str(module): local["version"] for module, local in meta.items()
          if isinstance(local, dict) and isinstance(local.get("version"), int)}


# Names

# (regex, replacement), in convert_basic_c2_names order.
_C2_RULES: tuple[tuple[str, str], ...] = (
    (r"\.b$", ".bias"),
    (r"\.w$", ".weight"),
    (r"bn\.s$", "norm.weight"),
    (r"bn\.bias$", "norm.bias"),
    (r"bn\.rm", "norm.running_mean"),
    (r"bn\.running.mean$", "norm.running_mean"),
    (r"bn\.riv$", "norm.running_var"),
    (r"bn\.running.var$", "norm.running_var"),
    (r"bn\.gamma$", "norm.weight"),
    (r"bn\.beta$", "norm.bias"),
    (r"gn\.s$", "norm.weight"),
    (r"gn\.bias$", "norm.bias"),
    (r"^res\.conv1\.norm\.", "conv1.norm."),
    (r"^conv1\.", "stem.conv1."),
)
_C2_BLOCKS = ((".branch1.", ".shortcut."), (".branch2a.", ".conv1."),
              (".branch2b.", ".conv2."), (".branch2c.", ".conv3."))


def convert_c2_names(names: Iterable[str]) -> list[str]:
  """Caffe2 blob names -> detectron2 names, as detectron2's ``convert_basic_c2_names``.

  E.g. ``res2_0_branch2a_bn_s`` -> ``res2.0.conv1.norm.weight``, ``conv1_w`` ->
  ``stem.conv1.weight``, ``pred_w`` -> ``linear.weight`` (the ImageNet classifier). The
  detection-model extras of ``convert_c2_detectron_names`` (RPN, box head, FPN renames and the
  background-row surgery) are not applied: no PointRend weights come from Detectron1.
  """
  out = []
  for k in names:
    k = {"pred_b": "linear_b", "pred_w": "linear_w"}.get(k, k)
    k = k.replace("_", ".")
    for pattern, repl in _C2_RULES:
      k = re.sub(pattern, repl, k)
    for old, new in _C2_BLOCKS:
      k = k.replace(old, new)
    out.append(k)
  return out


# PointRend mask-head key generations v0 / v1 -> v2 (§3).
_POINTREND_PREFIXES = (("roi_heads.mask_coarse_head.", "roi_heads.mask_head.coarse_head."),
                       ("roi_heads.mask_point_head.", "roi_heads.mask_head.point_head."))
_COARSE_FC = ".coarse_head.coarse_mask_fc"


def _pointrend_v2_name(name: str) -> str:
  for old, new in _POINTREND_PREFIXES:
    if name.startswith(old):
      name = new + name[len(old):]
  return name.replace(_COARSE_FC, ".coarse_head.fc")


def _all_have_prefix(names: Iterable[str], prefix: str) -> bool:
  names = list(names)
  return bool(names) and all(n.startswith(prefix) for n in names)


def canonicalize_names(state: Mapping[str, Any], *, caffe2: bool = False) -> dict[str, Any]:
  """Renames a state dict's keys to current (v2) detectron2 names, keeping order and values.

  Applied in order: Caffe2 blob conversion (``caffe2=True``, :func:`convert_c2_names`; callers
  drop ``*_momentum`` blobs first); removal of a ``module.`` (DDP) prefix present on every key;
  PointRend mask-head keys of generation v0/v1 -> v2:
  ``roi_heads.mask_coarse_head.`` -> ``roi_heads.mask_head.coarse_head.``,
  ``roi_heads.mask_point_head.`` -> ``roi_heads.mask_head.point_head.``,
  ``.coarse_head.coarse_mask_fc{k}`` -> ``.coarse_head.fc{k}``.

  Raises:
    CheckpointError: two keys map to the same name (e.g. a file mixing generations).
  """
  new = convert_c2_names(state) if caffe2 else list(state)
  # fvcore strips a DDP "module." prefix only when every key has it.
  if _all_have_prefix(new, "module."):
    new = [n[len("module."):] for n in new]
  new = [_pointrend_v2_name(n) for n in new]
  seen: dict[str, str] = {}
  clashes = []
  for old, n in zip(state, new):
    if n in seen:
      clashes.append(f"{seen[n]} and {old} -> {n}")
    seen[n] = old
  if clashes:
    raise CheckpointError("checkpoint names collide after normalization: " + "; ".join(clashes))
  return dict(zip(new, state.values()))
