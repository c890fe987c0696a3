"""pointrend-jax: PointRend (Kirillov, Wu, He, Girshick) in JAX / Flax NNX.

Numerical conventions follow detectron2 (see ``docs/architecture.md``): feature maps are NHWC,
boxes are ``(x0, y0, x1, y1)`` in pixels of the resized, unpadded image, and pixel ``(i, j)``
covers ``[j, j+1) x [i, i+1)``.

``pointrend_jax.Predictor`` (:class:`pointrend_jax.inference.Predictor`) is imported lazily, so
``import pointrend_jax`` stays cheap (no jax import).
"""

from typing import Any

__version__ = "0.1.0"

__all__ = ["Predictor", "__version__"]

_LAZY = {"Predictor": "pointrend_jax.inference"}


def __getattr__(name: str) -> Any:
  if name in _LAZY:
    import importlib
    value = getattr(importlib.import_module(_LAZY[name]), name)
    globals()[name] = value
    return value
  raise AttributeError(f"module 'pointrend_jax' has no attribute {name!r}")


def __dir__() -> list[str]:
  return sorted(set(globals()) | set(_LAZY))
