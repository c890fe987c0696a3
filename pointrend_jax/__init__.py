"""pointrend-jax: PointRend (Kirillov, Wu, He, Girshick) in JAX / Flax NNX.

Numerical conventions follow detectron2 (see ``docs/architecture.md``): feature maps are NHWC,
boxes are ``(x0, y0, x1, y1)`` in pixels of the resized, unpadded image, and pixel ``(i, j)``
covers ``[j, j+1) x [i, i+1)``.
"""

__version__ = "0.1.0"
