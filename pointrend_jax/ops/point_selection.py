"""PointRend point selection: regular grids, uncertainty, top-k points, box-frame sampling.

Conventions (spec ``pointrend.md`` §2.2-2.5, §5):

* Logits are channels-last: ``[R, H, W, C]`` maps or ``[R, P, C]`` point logits.
* Point coordinates are ``(x, y)`` normalised to ``[0, 1]``: of the map extent for grids, of the box
  for box-frame points (``(0, 0)`` = box corner ``(x0, y0)``, ``(1, 1)`` = ``(x1, y1)``).
* Boxes are ``(x0, y0, x1, y1)`` in pixels of the (resized) input image.
* Uncertainty: larger = more uncertain. Point selection is done without gradient.
"""

from __future__ import annotations

from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from pointrend_jax.ops.point_sample import point_sample, point_sample_by_index

__all__ = ["regular_grid_points", "instance_uncertainty", "semantic_uncertainty",
           "uncertain_points_on_grid", "uncertain_points_with_randomness", "points_in_box_to_image",
           "point_sample_fine_grained_features"]


def regular_grid_points(side: int) -> jax.Array:
  """Regular ``side x side`` grid of cell centres (``generate_regular_grid_point_coords``).

  Returns:
    ``[side*side, 2]`` float32; row-major point ``k = i*side + j`` is
    ``((j + 0.5)/side, (i + 0.5)/side)``. Broadcast to ``[R, side*side, 2]`` as needed.
  """
  c = (np.arange(side, dtype=np.float64) + 0.5) / side
  u, v = np.meshgrid(c, c, indexing="xy")  # u varies along columns, v along rows
  return jnp.asarray(np.stack([u.ravel(), v.ravel()], axis=-1).astype(np.float32))


def instance_uncertainty(logits: jax.Array, classes: jax.Array | None = None) -> jax.Array:
  """Instance uncertainty ``-|logit of each ROI's class|`` (detectron2 ``calculate_uncertainty``).

  Args:
    logits: ``[R, ..., C]`` (e.g. ``[R, H, W, C]`` mask logits or ``[R, P, C]`` point logits).
    classes: ``[R]`` int class per ROI. Ignored (class-agnostic: channel 0) when ``C == 1`` or
      ``classes is None``.

  Returns:
    ``[R, ...]`` uncertainty, ``<= 0``.
  """
  logits = jnp.asarray(logits)
  if logits.shape[-1] == 1 or classes is None:
    picked = logits[..., 0]
  else:
    index = jnp.asarray(classes).astype(jnp.int32).reshape((-1,) + (1,) * (logits.ndim - 1))
    picked = jnp.take_along_axis(logits, index, axis=-1, mode="clip")[..., 0]
  return -jnp.abs(picked)


def semantic_uncertainty(logits: jax.Array) -> jax.Array:
  """Semantic uncertainty: second-largest minus largest logit over the last (class) axis.

  ``[..., C]`` (``C >= 2``) -> ``[...]``, ``<= 0`` (0 on ties).
  """
  logits = jnp.asarray(logits)
  # max + masked max instead of top_k: elementwise and cheap for small C on every backend.
  # Masking only the first argmax keeps duplicated maxima (second == largest), like top-2.
  largest = jnp.max(logits, axis=-1)
  first = jnp.argmax(logits, axis=-1)
  is_first = jnp.arange(logits.shape[-1]) == first[..., None]
  second = jnp.max(jnp.where(is_first, -jnp.inf, logits), axis=-1)
  return second - largest


def _grid_cell_centres(flat_index: jax.Array, height: int, width: int) -> jax.Array:
  """Flat row-major cell indices ``[...]`` -> normalised cell centres ``[..., 2]`` (x, y)."""
  # detectron2 computes step/2 + i*step in float32 (python-float steps rounded to float32).
  w_step, h_step = np.float32(1.0 / width), np.float32(1.0 / height)
  w_half, h_half = np.float32(1.0 / width / 2.0), np.float32(1.0 / height / 2.0)
  x = w_half + (flat_index % width).astype(jnp.float32) * w_step
  y = h_half + (flat_index // width).astype(jnp.float32) * h_step
  return jnp.stack([x, y], axis=-1)


def uncertain_points_on_grid(uncertainty: jax.Array,
                             num_points: int) -> tuple[jax.Array, jax.Array]:
  """The ``k' = min(num_points, H*W)`` most uncertain cells of each map.

  detectron2 ``get_uncertain_point_coords_on_grid``.

  Args:
    uncertainty: ``[R, H, W]`` uncertainty maps (larger = more uncertain).
    num_points: static number of points.

  Returns:
    ``(indices, coords)``: ``[R, k']`` int32 flat row-major indices in top-k order (descending
    uncertainty; ties by lower index), and ``[R, k', 2]`` float32 cell centres ``(x, y)`` in
    ``[0, 1]`` of the map extent.
  """
  uncertainty = jnp.asarray(uncertainty)
  r, h, w = uncertainty.shape
  k = min(int(num_points), h * w)
  _, indices = lax.top_k(lax.stop_gradient(uncertainty).reshape(r, h * w), k)
  indices = indices.astype(jnp.int32)
  return indices, _grid_cell_centres(indices, h, w)


def uncertain_points_with_randomness(
    key: jax.Array,
    coarse_logits: jax.Array,
    uncertainty_fn: Callable[[jax.Array], jax.Array],
    num_points: int,
    oversample_ratio: float,
    importance_ratio: float,
) -> jax.Array:
  """Training point selection (detectron2 ``get_uncertain_point_coords_with_randomness``).

  Draws ``M = int(num_points * oversample_ratio)`` uniform candidates in ``[0, 1)^2`` per ROI,
  bilinearly samples ``coarse_logits`` there, keeps the ``n_imp = int(importance_ratio *
  num_points)`` candidates with the largest ``uncertainty_fn`` (computed on the *sampled* logits)
  and appends ``num_points - n_imp`` fresh uniform points. ``key`` is split as
  ``key_candidates, key_random = jax.random.split(key)``.

  Args:
    key: PRNG key.
    coarse_logits: ``[R, h, w, C]`` (or ``C == 1``) coarse logits; points are in its map frame
      (the box frame for instance masks, the padded image for semantic segmentation).
    uncertainty_fn: ``[R, M, C] -> [R, M]``, e.g. ``functools.partial(instance_uncertainty,
      classes=gt_classes)`` or ``semantic_uncertainty``.
    num_points: static ``N`` (196 instance, 2048 semantic).
    oversample_ratio: ``k >= 1`` (3).
    importance_ratio: ``beta`` in ``[0, 1]`` (0.75).

  Returns:
    ``[R, num_points, 2]`` float32 coords ``(x, y)`` in ``[0, 1)``: first the ``n_imp`` important
    points in descending uncertainty, then the random ones. No gradient.
  """
  if oversample_ratio < 1:
    raise ValueError(f"oversample_ratio must be >= 1, got {oversample_ratio}")
  if not 0.0 <= importance_ratio <= 1.0:
    raise ValueError(f"importance_ratio must be in [0, 1], got {importance_ratio}")
  r = coarse_logits.shape[0]
  num_sampled = int(num_points * oversample_ratio)
  num_important = int(importance_ratio * num_points)
  num_random = num_points - num_important
  key_candidates, key_random = jax.random.split(key)
  candidates = jax.random.uniform(key_candidates, (r, num_sampled, 2), jnp.float32)
  point_logits = point_sample(lax.stop_gradient(coarse_logits), candidates)
  uncertainty = uncertainty_fn(point_logits)
  _, top = lax.top_k(uncertainty, num_important)
  important = jnp.take_along_axis(candidates, top[..., None], axis=1)
  random = jax.random.uniform(key_random, (r, num_random, 2), jnp.float32)
  return lax.stop_gradient(jnp.concatenate([important, random], axis=1))


def points_in_box_to_image(boxes: jax.Array, points_in_box: jax.Array) -> jax.Array:
  """Box-frame points -> image pixels: ``X = x0 + u*(x1 - x0)``, ``Y = y0 + v*(y1 - y0)``.

  Args:
    boxes: ``[R, 4]`` ``(x0, y0, x1, y1)`` pixels.
    points_in_box: ``[R, P, 2]`` ``(u, v)`` in the box frame.

  Returns:
    ``[R, P, 2]`` ``(X, Y)`` continuous pixel coordinates (no +-0.5 shift). No gradient.
  """
  boxes = lax.stop_gradient(jnp.asarray(boxes))
  points_in_box = lax.stop_gradient(jnp.asarray(points_in_box))
  origin = boxes[:, None, 0:2]
  size = boxes[:, None, 2:4] - origin
  # Same order as detectron2 (scale, then shift) for bit-identical coordinates.
  return points_in_box * size + origin


def point_sample_fine_grained_features(
    features_list: Sequence[jax.Array],
    strides: Sequence[float],
    boxes: jax.Array,
    batch_index: jax.Array,
    points_in_box: jax.Array,
) -> tuple[jax.Array, jax.Array]:
  """Samples FPN maps at box-frame points (detectron2 ``point_sample_fine_grained_features``).

  Each level ``l`` (``[N, H_l, W_l, C_l]``, stride ``s_l``) is sampled at image point ``(X, Y)``
  with coords normalised by its padded extent ``(W_l*s_l, H_l*s_l)``, i.e. feature pixel position
  ``X/s_l - 0.5`` (ROIAlign ``aligned=True`` geometry). detectron2's ``feature_scales`` are
  ``1/s_l``.

  Args:
    features_list: per-level ``[N, H_l, W_l, C_l]`` maps of the padded batch.
    strides: per-level stride ``s_l`` (static, e.g. ``(4,)`` for p2).
    boxes: ``[R, 4]`` ``(x0, y0, x1, y1)`` image pixels, ROIs of all images concatenated.
    batch_index: ``[R]`` int, image of each ROI.
    points_in_box: ``[R, P, 2]`` box-frame points ``(u, v)``.

  Returns:
    ``(features, points_in_image)``: ``[R, P, sum_l C_l]`` sampled features (levels concatenated
    on channels, in list order) and ``[R, P, 2]`` image-pixel coords ``(X, Y)``.
  """
  if len(features_list) != len(strides):
    raise ValueError("features_list and strides must have the same length")
  points_in_image = points_in_box_to_image(boxes, points_in_box)
  sampled = []
  for feats, stride in zip(features_list, strides):
    _, h, w, _ = feats.shape
    extent = jnp.asarray([w * float(stride), h * float(stride)], jnp.float32)
    sampled.append(point_sample_by_index(feats, batch_index, points_in_image / extent))
  return jnp.concatenate(sampled, axis=-1), points_in_image
