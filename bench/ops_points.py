"""Benchmark cases of the point ops, at PointRend's training and inference sizes.

``benchmarks()`` returns ``(name, fn, args)`` triples; ``fn`` is jitted and ``fn(*args)`` is one
timed call (the harness in ``bench/ops.py`` does warm-up, ``block_until_ready`` and timing).
Inputs are built lazily on the default device when ``benchmarks()`` is called.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

from pointrend_jax.ops.point_sample import (interpolate_bilinear_x2, point_sample,
                                            point_sample_by_index)
from pointrend_jax.ops.point_selection import semantic_uncertainty, uncertain_points_on_grid


def _with_grad(fn: Callable[..., jax.Array]) -> Callable[..., Any]:
  """Forward + backward: gradient of ``sum(fn(features, ...))`` w.r.t. ``features``."""
  return jax.grad(lambda features, *rest: jnp.sum(fn(features, *rest)))


def benchmarks() -> list[tuple[str, Callable[..., Any], tuple[Any, ...]]]:
  key = jax.random.key(0)
  k = iter(jax.random.split(key, 16))
  cases = []

  # Training: p2 of a 2-image batch (800x1216 input), 128 fg ROIs per image, 14x14 points.
  p2_train = jax.random.normal(next(k), (2, 200, 304, 256), jnp.float32)
  batch_index = jnp.repeat(jnp.arange(2, dtype=jnp.int32), 128)
  coords_train = jax.random.uniform(next(k), (256, 196, 2), jnp.float32)
  cases.append(("point_sample_by_index/train_2x200x304x256_256roi_196pt",
                point_sample_by_index, (p2_train, batch_index, coords_train)))

  # Inference subdivision step: 100 detections x 784 points on one image.
  p2_test = jax.random.normal(next(k), (1, 200, 304, 256), jnp.float32)
  det_index = jnp.zeros((100,), jnp.int32)
  coords_sub = jax.random.uniform(next(k), (100, 784, 2), jnp.float32)
  cases.append(("point_sample_by_index/subdiv_1x200x304x256_100roi_784pt",
                point_sample_by_index, (p2_test, det_index, coords_sub)))

  # Semantic: 8192 points on p2 of a 1024x2048 input.
  p2_sem = jax.random.normal(next(k), (1, 256, 512, 256), jnp.float32)
  coords_sem = jax.random.uniform(next(k), (1, 8192, 2), jnp.float32)
  cases.append(("point_sample/semantic_1x256x512x256_8192pt", point_sample, (p2_sem, coords_sem)))

  out = []
  for name, fn, args in cases:
    out.append((f"{name}/fwd", jax.jit(fn), args))
    out.append((f"{name}/fwd+bwd", jax.jit(_with_grad(fn)), args))

  # Subdivision helpers: x2 upsampling and top-k selection at the largest step sizes.
  mask_112 = jax.random.normal(next(k), (100, 112, 112, 1), jnp.float32)
  out.append(("interpolate_bilinear_x2/100x112x112x1", jax.jit(interpolate_bilinear_x2),
              (mask_112,)))
  sem_logits = jax.random.normal(next(k), (1, 256, 512, 19), jnp.float32)
  out.append(("interpolate_bilinear_x2/1x256x512x19", jax.jit(interpolate_bilinear_x2),
              (sem_logits,)))
  mask_224 = jax.random.normal(next(k), (100, 224, 224), jnp.float32)
  out.append(("uncertain_points_on_grid/100x224x224_784",
              jax.jit(lambda u: uncertain_points_on_grid(-jnp.abs(u), 784)), (mask_224,)))
  out.append(("semantic_uncertainty+grid/1x512x1024x19_8192",
              jax.jit(lambda lg: uncertain_points_on_grid(
                  semantic_uncertainty(interpolate_bilinear_x2(lg)), 8192)),
              (sem_logits,)))
  return out
