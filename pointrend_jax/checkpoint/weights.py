"""Filling a built model from weights on disk: the one loader behind ``config.init.weights``,
``Predictor(weights=...)`` and the tools.

A path is either a detectron2 file (``.pkl`` / ``.pth``: a full model loads strictly; a file
whose names cover only the backbone, e.g. the ImageNet ``R-50.pkl``, loads
``backbone.bottom_up`` strictly and leaves the rest as initialised) or a converted orbax
directory (:mod:`~pointrend_jax.checkpoint.orbax_io`).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from flax import nnx

__all__ = ["load_weights"]

# detectron2 names outside the bottom-up backbone: a file without any is a backbone file.
_HEAD_PREFIXES = ("proposal_generator.", "roi_heads.", "sem_seg_head.", "backbone.fpn_",
                  "backbone.top_block")


def load_weights(model: nnx.Module, weights: str | os.PathLike | Mapping[str, Any], *,
                 backbone_only_ok: bool = False) -> str:
  """Loads ``weights`` into ``model`` in place; returns a one-line description of what loaded.

  Args:
    model: a built (or abstract) model.
    weights: a detectron2 ``.pkl`` / ``.pth`` path, a converted directory, or a detectron2
      state dict (``{name: array}``).
    backbone_only_ok: accept a file holding only the bottom-up backbone (ImageNet
      initialisation for training); otherwise every detectron2 name must be present.

  Raises:
    CheckpointError: unreadable, or the names / shapes do not match the model.
    FileNotFoundError: the path does not exist.
  """
  from pointrend_jax.checkpoint import d2_reader, orbax_io
  from pointrend_jax.checkpoint.d2_model import load_d2_model
  if isinstance(weights, Mapping):
    load_d2_model(model, weights, strict=True)
    return "detectron2 state dict"
  path = os.path.expanduser(os.fspath(weights).split("?", 1)[0])
  if os.path.isdir(path):
    orbax_io.load_converted_into(model, path)
    return f"converted orbax checkpoint {path}"
  if not os.path.isfile(path):
    raise FileNotFoundError(f"weights not found: {path}")
  ckpt = d2_reader.load_detectron2_file(path)
  full = not backbone_only_ok or any(k.startswith(_HEAD_PREFIXES) for k in ckpt.state)
  report = load_d2_model(model, ckpt, strict=True, backbone_only=not full)
  what = "full detectron2 model" if full else "detectron2 backbone (ImageNet) weights"
  return f"{what} {path}: {report.format(limit=5).splitlines()[0]}"
