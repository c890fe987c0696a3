"""detectron2 weights into a PointRend model: its state-dict names and strict loading.

:func:`d2_model_names` lists a model's variables under their detectron2 names and PyTorch
shapes; :func:`load_d2_model` matches a checkpoint against them
(:func:`~pointrend_jax.checkpoint.d2_matching.match_state_dict`) and loads the arrays by the
same walk over the model (:func:`~pointrend_jax.modeling.layers.load_d2_state`, which
transposes the layouts).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
from flax import nnx

from pointrend_jax.checkpoint.d2_matching import MatchReport, match_state_dict
from pointrend_jax.checkpoint.d2_reader import Detectron2Checkpoint
from pointrend_jax.errors import CheckpointError
from pointrend_jax.modeling.layers import d2_names_of, load_d2_state
from pointrend_jax.modeling.meta_arch import PointRendRCNN
from pointrend_jax.modeling.semantic import PointRendSemanticSegmentor

__all__ = ["d2_model_names", "load_d2_model", "random_d2_state"]

# The one module path that differs from detectron2's: PointRendRCNN keeps the mask head beside
# the box branch, detectron2 nests it in ROIHeads.
_D2_RENAMES = {"mask_head.": "roi_heads.mask_head."}


def d2_model_names(model: PointRendRCNN | PointRendSemanticSegmentor
                   ) -> dict[str, tuple[int, ...]]:
  """``{detectron2 state-dict name: PyTorch shape}`` of every variable (abstract models work)."""
  if not isinstance(model, (PointRendRCNN, PointRendSemanticSegmentor)):
    raise TypeError(f"not a PointRend model: {type(model).__name__}")
  names = d2_names_of(model, renames=_D2_RENAMES)
  # detectron2's order: the mask head after the box branch (a stable sort on two name levels).
  return dict(sorted(names.items(), key=lambda item: item[0].split(".")[:2]))


def _as_float32(name: str, array: np.ndarray) -> np.ndarray:
  array = np.asarray(array)
  if np.issubdtype(array.dtype, np.floating) or array.dtype.name == "bfloat16":
    return array.astype(np.float32, copy=False)
  raise CheckpointError(f"{name}: dtype {array.dtype} cannot be loaded into a float32 variable")


def load_d2_model(model: PointRendRCNN | PointRendSemanticSegmentor,
                  state: Mapping[str, np.ndarray] | Detectron2Checkpoint,
                  strict: bool = True, backbone_only: bool = False) -> MatchReport:
  """Loads detectron2 weights (PyTorch layouts, canonical v2 names) into ``model`` in place.

  Names are matched by :func:`~pointrend_jax.checkpoint.d2_matching.match_state_dict` (exact,
  or detectron2's suffix heuristic for Caffe2 files) against :func:`d2_model_names`; float16 /
  float64 / bfloat16 arrays are cast to float32 and loaded by
  :func:`~pointrend_jax.modeling.layers.load_d2_state`, which transposes the layouts.

  Args:
    model: concrete, or abstract (:func:`~pointrend_jax.modeling.meta_arch.abstract_model`)
      when every variable gets loaded (``strict`` and not ``backbone_only``).
    state: ``{name: array}`` or a :class:`Detectron2Checkpoint` (``load_detectron2_file``).
    strict: refuse (``CheckpointError`` listing names and shapes) anything missing,
      unexpected or mis-shaped.
    backbone_only: ImageNet initialization: only ``backbone.bottom_up.*`` is loaded; the rest
      keeps its values (see :class:`MatchReport` ``not_loaded``).
  """
  expected = d2_model_names(model)
  report = match_state_dict(state, expected, strict=strict, backbone_only=backbone_only)
  arrays = {k: _as_float32(k, v) for k, v in report.state.items()}
  if backbone_only:
    load_d2_state(model.backbone.bottom_up, arrays, "backbone.bottom_up.", strict=strict)
  else:
    load_d2_state(model, arrays, renames=_D2_RENAMES, strict=strict)
  return report


def random_d2_state(model: nnx.Module, seed: int = 0, pixel_std: Sequence[float] = (1., 1., 1.)
                    ) -> dict[str, np.ndarray]:
  """Random but well-scaled weights for every detectron2 name of ``model`` (numpy, fast).

  Drawn from numpy rather than the modules' jax initializers: eager jax init compiles one small
  program per parameter shape (minutes for a ResNet-50 on CPU). Scheme (a simplification of the
  parity fixtures' ``make_weights.py``): kernels normal with std ``gain / sqrt(fan_in)`` and every
  output unit centred to zero mean (otherwise ReLU features carry a common mode that makes one
  class win every box); gain sqrt(2), except the stem (``mean(pixel_std) / 64``: raw pixel
  contrast is ~64), the last conv of each bottleneck (0.5), FPN convs (1), class / objectness
  logits (4), box deltas (0.5-1) and mask predictors (2). Norm scales and running variances 1,
  biases and running means 0.

  Args:
    model: a (possibly abstract) model; only its names and shapes are read.
    seed: numpy seed.
    pixel_std: the config's ``PIXEL_STD`` (scales the stem).

  Returns:
    ``{detectron2 name: float32 array}`` for :func:`load_d2_model`.
  """
  rng = np.random.default_rng(seed)
  gains = (("stem.conv1.weight", float(np.mean(pixel_std)) / 64.0), (".conv3.weight", 0.5),
           ("fpn_lateral", 1.0), ("fpn_output", 1.0), ("objectness_logits", 4.0),
           ("anchor_deltas", 0.5), ("cls_score", 4.0), ("bbox_pred", 1.0),
           ("prediction.weight", 2.0), ("predictor.weight", 2.0))
  state = {}
  for name, shape in sorted(d2_model_names(model).items()):
    if len(shape) >= 2 and ".norm." not in name:
      fan_in = int(np.prod(shape[1:]))
      gain = next((g for k, g in gains if k in name), math.sqrt(2.0))
      w = rng.standard_normal((shape[0], fan_in))
      if fan_in > 1:
        w -= w.mean(axis=1, keepdims=True)
      state[name] = (w * gain / math.sqrt(fan_in)).astype(np.float32).reshape(shape)
    elif name.endswith("running_var") or (".norm." in name and name.endswith("weight")) or (
        name.endswith(".weight") and len(shape) == 1):
      state[name] = np.ones(shape, np.float32)
    else:
      state[name] = np.zeros(shape, np.float32)
  return state
