"""Inference on ordinary images: :class:`Predictor` (detectron2 ``DefaultPredictor`` for JAX).

Example::

  from pointrend_jax import Predictor
  # detectron2's R50-FPN 1x COCO PointRend (model zoo 164254221, mask AP 36.2).
  predictor = Predictor("r50_fpn_1x_coco", "model_final_736f5a.pkl")
  result = predictor("photo.jpg")          # one image -> one result
  results = predictor([array, "b.png"])    # a list -> a list
  result.masks, result.rle, result.class_names

  # A model trained with launch.py (exported to <workdir>/model at the end of training, or
  # by ``python -m pointrend_jax.tools.export``): config, weights and class names are stored.
  predictor = Predictor(None, "runs/demo/model")

Per image (host side, numpy): read (EXIF, grayscale/RGBA/CMYK/16-bit -> RGB uint8), resize as
detectron2 at test time (``ResizeShortestEdge(MIN_SIZE_TEST, MAX_SIZE_TEST)``, PIL bilinear),
pad to a *bucket*, run the jitted model (device), postprocess to the original size (host).

Static shapes and compilation. The model runs on a fixed canvas per *bucket*; each
``(batch_size, bucket)`` is compiled once (ahead of time) and reused for every later image that
lands in it. :attr:`Predictor.num_compiles` counts the compilations. Padding modes:

* ``buckets=None`` (default): the data pipeline's evaluation buckets
  (:func:`pointrend_jax.data.batching.bucket_sizes` of the test sizes; 7 canvases for COCO:
  ``800x{800,1088,1216,1344}`` and the transposes), so at most 7 compilations for any stream of
  images. Padding beyond detectron2's ``ceil32`` extent changes activations near the bottom/right
  border slightly (``mask_rcnn_fpn.md`` §2.5): results are not bit-identical to detectron2 there.
* ``buckets="exact"``: pad each image to ``ceil32(h) x ceil32(w)`` (detectron2's own extent at
  batch size 1): bit-level parity, one compilation per distinct padded size.
* a sequence of ``(H, W)`` canvases (multiples of 32); an image that fits none falls back to
  exact padding (with a warning).

The device part is :class:`~pointrend_jax.modeling.predict.PredictProgram`; results at the
original size come from :mod:`pointrend_jax.postprocess` (numpy on the host, so nothing
compiles per original image size: detectron2's ``detector_postprocess`` and
``paste_masks_in_image``, pycocotools RLE; semantic models: crop the padding, PyTorch bilinear
resize to the original size, argmax).

``score_threshold`` filters detections on the host (``score > threshold``). For thresholds at
or above the config's ``SCORE_THRESH_TEST`` this equals detectron2's demo, which raises
``SCORE_THRESH_TEST`` instead: NMS only lets higher-scoring boxes suppress lower ones and the
top-``DETECTIONS_PER_IMAGE`` cut keeps the highest scores, so the boxes above the threshold are
the same either way (and no recompilation is needed to change it).
"""

from __future__ import annotations

import os
import pathlib
from collections.abc import Mapping, Sequence
from typing import Any

from flax import nnx

from pointrend_jax.data.cityscapes import SEM_SEG_CLASSES as CITYSCAPES_SEM_SEG_CLASSES
from pointrend_jax.data.cityscapes import THING_CLASSES as CITYSCAPES_THING_CLASSES
from pointrend_jax.image_predictor import ImagePredictor, to_rgb_uint8
from pointrend_jax.modeling.config import ModelConfig
from pointrend_jax.modeling.predict import PredictProgram
from pointrend_jax.modeling.zoo import from_detectron2_yaml, zoo_config

__all__ = ["COCO_CLASSES", "Predictor", "load_config", "default_class_names", "to_rgb_uint8"]

# checkpoint_format.md §7.1: contiguous id order = sorted COCO category ids.
COCO_CLASSES: tuple[str, ...] = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat",
    "traffic light", "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog",
    "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella",
    "handbag", "tie", "suitcase", "frisbee", "skis", "snowboard", "sports ball", "kite",
    "baseball bat", "baseball glove", "skateboard", "surfboard", "tennis racket", "bottle",
    "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple", "sandwich",
    "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch",
    "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote",
    "keyboard", "cell phone", "microwave", "oven", "toaster", "sink", "refrigerator", "book",
    "clock", "vase", "scissors", "teddy bear", "hair drier", "toothbrush")


# --- Configs, weights, images ---


def load_config(spec: str | os.PathLike[str] | ModelConfig) -> ModelConfig:
  """A :class:`ModelConfig` from a zoo name, a detectron2 yaml, a ``ModelConfig`` JSON file
  (``ModelConfig.to_json``), or a converted checkpoint directory (its ``config.json``)."""
  if isinstance(spec, ModelConfig):
    return spec
  path = pathlib.Path(os.fspath(spec)).expanduser()
  if path.is_dir():
    from pointrend_jax.checkpoint.orbax_io import read_converted_config
    return read_converted_config(path)
  if path.is_file():
    if path.suffix.lower() == ".json":
      import json
      try:
        data = json.loads(path.read_text(encoding="utf-8"))
      except (OSError, ValueError) as e:
        raise ValueError(f"config file {path}: unreadable JSON ({e})") from e
      if isinstance(data, dict) and data.get("format") == "pointrend-jax-converted":
        data = data["config"]
      return ModelConfig.from_dict(data)
    return from_detectron2_yaml(path)
  if path.suffix.lower() in (".yaml", ".yml", ".json") and os.sep in str(spec):
    raise FileNotFoundError(f"config file not found: {spec}")
  return zoo_config(str(spec))


def default_class_names(cfg: ModelConfig) -> list[str]:
  """COCO (80), Cityscapes things (8) or Cityscapes semantic (19) names, else ``class_<i>``."""
  n = cfg.num_classes
  if cfg.is_semantic and n == len(CITYSCAPES_SEM_SEG_CLASSES):
    return list(CITYSCAPES_SEM_SEG_CLASSES)
  if not cfg.is_semantic and n == len(COCO_CLASSES):
    return list(COCO_CLASSES)
  if not cfg.is_semantic and n == len(CITYSCAPES_THING_CLASSES):
    return list(CITYSCAPES_THING_CLASSES)
  return [f"class_{i}" for i in range(n)]


def _load_model(cfg: ModelConfig | None, weights: Any, seed: int
                ) -> tuple[ModelConfig, nnx.Module]:
  """Builds the model of ``cfg`` and fills it from ``weights`` (see :class:`Predictor`)."""
  from pointrend_jax.checkpoint import orbax_io
  from pointrend_jax.checkpoint.d2_model import load_d2_model, random_d2_state
  from pointrend_jax.checkpoint.weights import load_weights
  from pointrend_jax.modeling.meta_arch import abstract_model
  if isinstance(weights, nnx.Module):
    if cfg is None:
      cfg = getattr(weights, "cfg", None)
      if cfg is None:
        raise ValueError("pass the config of this model")
    return cfg, weights
  if cfg is None:
    if not (isinstance(weights, (str, os.PathLike)) and
            pathlib.Path(os.fspath(weights)).expanduser().is_dir()):
      raise ValueError("a config is needed unless weights is a converted checkpoint directory")
    return orbax_io.load_converted(weights)
  if not isinstance(weights, (str, os.PathLike, Mapping, type(None))):
    raise TypeError(f"weights must be a path, a state dict, a model or None, not "
                    f"{type(weights).__name__}")
  model = abstract_model(cfg)
  if weights is None:
    load_d2_model(model, random_d2_state(model, seed, cfg.pixel_std), strict=True)
  else:  # another config for a converted directory must have the same variables
    load_weights(model, weights)
  return cfg, model


def _stored_class_names(weights: Any, num_classes: int) -> list[str] | None:
  """The class names saved with a converted directory (models exported from training)."""
  if not isinstance(weights, (str, os.PathLike)):
    return None
  path = pathlib.Path(os.fspath(weights)).expanduser()
  if not path.is_dir():
    return None
  from pointrend_jax.checkpoint.orbax_io import read_converted_class_names
  names = read_converted_class_names(path)
  # Another config with another class count cannot load these weights; be safe anyway.
  return names if names is not None and len(names) == num_classes else None


# --- The predictor ---


class Predictor(ImagePredictor):
  """End-to-end inference of a PointRend model on images of any size.

  Args:
    config: zoo name (``"r50_fpn_1x_coco"`` or the detectron2 stem), detectron2 yaml path,
      ``ModelConfig`` JSON path, a :class:`ModelConfig`, or None when ``weights`` is a converted
      checkpoint directory (its stored config is used).
    weights: detectron2 ``.pkl`` / ``.pth``; a converted (orbax) directory from
      ``tools/convert``, ``tools/export`` or a training run (``<workdir>/model``); a
      ``{detectron2 name: array}`` dict; a built model; or None for random weights
      (:func:`~pointrend_jax.checkpoint.d2_model.random_d2_state`, for tests and benchmarks).
    buckets: padding canvases: None (the evaluation buckets of the config's test sizes),
      ``"exact"`` (``ceil32`` per image, detectron2 parity) or a sequence of ``(H, W)``. See
      the module docstring.
    batch_size: images per device call; a partial last batch is padded with blank images, so
      each bucket compiles once.
    score_threshold: keep detections with ``score > score_threshold`` (instance models).
    mask_threshold: mask pixel threshold on the probabilities (detectron2: 0.5).
    class_names: names of the class ids (default: those stored in a converted directory,
      else :func:`default_class_names`).
    seed: seed of the random weights when ``weights`` is None.
    dtype: compute dtype of the model (float32 or bfloat16; see
      :func:`~pointrend_jax.modeling.meta_arch.build_model`); None: float32, or the dtype a
      model passed as ``weights`` was built with. Parameters stay as loaded (float32).

  The weights are captured when the predictor is built; in-place updates of ``model``
  afterwards are not seen by the compiled programs.

  Attributes:
    cfg: the :class:`ModelConfig`.
    model: the Flax model.
    class_names: list of names.
    program: the :class:`~pointrend_jax.modeling.predict.PredictProgram` (its
      ``compile_seconds`` hold every compilation of the predictions).
    stages_program: the same with the subdivision stages (:meth:`predict_with_stages`).
  """

  def __init__(self, config: str | os.PathLike[str] | ModelConfig | None,
               weights: Any = None, *, buckets: str | Sequence[tuple[int, int]] | None = None,
               batch_size: int = 1, score_threshold: float | None = None,
               mask_threshold: float = 0.5, class_names: Sequence[str] | None = None,
               seed: int = 0, dtype: Any = None):
    cfg = None if config is None else load_config(config)
    self.cfg, self.model = _load_model(cfg, weights, seed)
    if dtype is not None:  # The same variables in a model built with this compute dtype.
      from pointrend_jax.modeling.meta_arch import abstract_model
      graphdef, _ = nnx.split(abstract_model(self.cfg, dtype=dtype))
      self.model = nnx.merge(graphdef, nnx.state(self.model))
    if class_names is None:
      class_names = _stored_class_names(weights, self.cfg.num_classes)
    if class_names is None:
      class_names = default_class_names(self.cfg)
    if len(class_names) != self.cfg.num_classes:
      raise ValueError(f"{len(class_names)} class names for {self.cfg.num_classes} classes")
    super().__init__(
        class_names=class_names, is_semantic=self.cfg.is_semantic,
        min_size_test=self.cfg.input.min_size_test, max_size_test=self.cfg.input.max_size_test,
        divisor=self.cfg.size_divisibility, buckets=buckets, batch_size=batch_size,
        score_threshold=score_threshold, mask_threshold=mask_threshold)
    self.program = PredictProgram(self.model)
    self.stages_program = None if self.is_semantic else PredictProgram(self.model, stages=True)
