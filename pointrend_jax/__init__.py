"""pointrend-jax: PointRend (Kirillov, Wu, He, Girshick) in JAX / Flax NNX.

Numerical conventions follow detectron2 (see ``docs/architecture.md``): feature maps are NHWC,
boxes are ``(x0, y0, x1, y1)`` in pixels of the resized, unpadded image, and pixel ``(i, j)``
covers ``[j, j+1) x [i, i+1)``.

``pointrend_jax.Predictor`` (:class:`pointrend_jax.inference.Predictor`) is imported lazily, so
``import pointrend_jax`` stays cheap (no jax import).
"""

from typing import Any

__version__ = "0.1.0"

_LAZY = {
    # Using a model.
    "Predictor": "pointrend_jax.inference",
    "ExportedPredictor": "pointrend_jax.stablehlo",
    # Building models (Flax NNX modules) and their configs.
    "ModelConfig": "pointrend_jax.modeling.config",
    "zoo_config": "pointrend_jax.modeling.zoo",
    "from_detectron2_yaml": "pointrend_jax.modeling.zoo",
    "build_model": "pointrend_jax.modeling.meta_arch",
    "load_d2_model": "pointrend_jax.checkpoint.d2_model",
    "PointRendRCNN": "pointrend_jax.modeling.meta_arch",
    "PointRendSemanticSegmentor": "pointrend_jax.modeling.semantic",
    "ResNet": "pointrend_jax.modeling.resnet",
    "FPN": "pointrend_jax.modeling.fpn",
    "RPN": "pointrend_jax.modeling.rpn",
    "StandardROIHeads": "pointrend_jax.modeling.roi_heads",
    "PointRendMaskHead": "pointrend_jax.modeling.point_rend",
    "PointRendSemSegHead": "pointrend_jax.modeling.semantic",
    # detectron2 checkpoints.
    "load_detectron2_file": "pointrend_jax.checkpoint.d2_reader",
    # The core primitive.
    "point_sample": "pointrend_jax.ops.point_sample",
}

__all__ = sorted(_LAZY) + ["__version__"]


def __getattr__(name: str) -> Any:
  if name in _LAZY:
    import importlib
    value = getattr(importlib.import_module(_LAZY[name]), name)
    globals()[name] = value
    return value
  raise AttributeError(f"module 'pointrend_jax' has no attribute {name!r}")


def __dir__() -> list[str]:
  return sorted(set(globals()) | set(_LAZY))
