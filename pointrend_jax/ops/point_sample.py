"""Point sampling (detectron2 ``point_sample`` / ``grid_sample``) and exact x2 bilinear upsampling.

Conventions (spec ``pointrend.md`` §2.1, §3.6):

* Feature maps are NHWC ``[N, H, W, C]``.
* Point coordinates are ``(x, y)``, x first, normalised to ``[0, 1]`` of the map's *full* extent:
  ``(0, 0)`` is the top-left corner of pixel ``(0, 0)``, ``(1, 1)`` the bottom-right corner of pixel
  ``(H-1, W-1)``. Pixel ``(i, j)`` has its centre at ``((j + 0.5) / W, (i + 0.5) / H)``.
* Sampling is PyTorch ``grid_sample(align_corners=False, padding_mode="zeros")``: continuous pixel
  position ``px = x*W - 0.5``; every bilinear tap outside the map reads 0 (no coordinate clamping).

Sampling is implemented as four row gathers from the map flattened to ``[N*H*W, C]``, so its cost
is ``O(points * C)`` and the backward pass is a scatter-add into the features; coordinates never
carry gradient.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

__all__ = ["point_sample", "point_sample_by_index", "interpolate_bilinear_x2"]

_MODES = ("bilinear", "nearest")


def _source_positions(coords: jax.Array, height: int, width: int) -> tuple[jax.Array, jax.Array]:
  """Continuous pixel positions ``(px, py)`` of normalised coords ``[..., 2]`` (x, y).

  Mirrors PyTorch's arithmetic (``g = 2c - 1``, then ``(g + 1) * size/2 - 0.5``) rather than the
  algebraically equal ``c*size - 0.5`` so that half-way points in ``nearest`` mode round the same.
  """
  coords = lax.stop_gradient(coords)
  coords = coords.astype(jnp.promote_types(coords.dtype, jnp.float32))
  g = 2.0 * coords - 1.0
  px = (g[..., 0] + 1.0) * (width / 2.0) - 0.5
  py = (g[..., 1] + 1.0) * (height / 2.0) - 0.5
  # Far-away points would overflow the int32 cast; any position beyond one pixel outside the map
  # has all taps out of range, so clipping there does not change the result.
  px = jnp.clip(px, -2.0, width + 1.0)
  py = jnp.clip(py, -2.0, height + 1.0)
  return px, py


def _gather_rows(flat: jax.Array, row_base: jax.Array, ix: jax.Array, iy: jax.Array,
                 height: int, width: int) -> tuple[jax.Array, jax.Array]:
  """Reads taps ``flat[row_base + iy*W + ix]`` -> (values ``[R, Q, C]``, in-range mask ``[R, Q]``).

  Out-of-range taps are clamped to a valid row (their value is masked by the caller), so the
  gather needs no bounds handling.
  """
  valid = (ix >= 0) & (ix < width) & (iy >= 0) & (iy < height)
  rows = row_base[:, None] + jnp.clip(iy, 0, height - 1) * width + jnp.clip(ix, 0, width - 1)
  return flat.at[rows].get(mode="promise_in_bounds"), valid


def _sample_rows(features: jax.Array, batch_index: jax.Array, coords: jax.Array,
                 mode: str) -> jax.Array:
  """Core sampler: features ``[N, H, W, C]``, batch_index ``[R]``, coords ``[R, Q, 2]`` ->
  ``[R, Q, C]``."""
  if mode not in _MODES:
    raise ValueError(f"mode must be one of {_MODES}, got {mode!r}")
  n, h, w, c = features.shape
  flat = features.reshape(n * h * w, c)
  row_base = batch_index.astype(jnp.int32) * (h * w)
  px, py = _source_positions(coords, h, w)

  if mode == "nearest":
    # jnp.round is round-half-to-even, as PyTorch's nearbyint.
    ix = jnp.round(px).astype(jnp.int32)
    iy = jnp.round(py).astype(jnp.int32)
    val, valid = _gather_rows(flat, row_base, ix, iy, h, w)
    return jnp.where(valid[..., None], val, jnp.zeros((), val.dtype))

  compute_dtype = jnp.promote_types(features.dtype, jnp.float32)
  x0f = jnp.floor(px)
  y0f = jnp.floor(py)
  # Same weight formulas and summation order as PyTorch's CPU grid_sample kernel.
  wx1 = px - x0f
  wx0 = 1.0 - wx1
  wy1 = py - y0f
  wy0 = 1.0 - wy1
  x0 = x0f.astype(jnp.int32)
  y0 = y0f.astype(jnp.int32)
  out = None
  taps = ((0, 0, wy0 * wx0), (0, 1, wy0 * wx1), (1, 0, wy1 * wx0), (1, 1, wy1 * wx1))
  for dy, dx, weight in taps:
    val, valid = _gather_rows(flat, row_base, x0 + dx, y0 + dy, h, w)
    # Zeroing the weight (not the value) keeps the select on the small [R, Q] array.
    weight = jnp.where(valid, weight, 0.0).astype(compute_dtype)
    term = val.astype(compute_dtype) * weight[..., None]
    out = term if out is None else out + term
  return out.astype(features.dtype)


def point_sample_by_index(features: jax.Array, batch_index: jax.Array, coords: jax.Array,
                          mode: str = "bilinear") -> jax.Array:
  """Samples image ``batch_index[r]`` of ``features`` at the points of ROI ``r``.

  Equivalent to ``point_sample(features[batch_index], coords)`` but gathers directly from the
  shared maps (no per-ROI copy of the ``[H, W, C]`` map is made).

  Args:
    features: ``[N, H, W, C]`` feature maps.
    batch_index: ``[R]`` int, image of each ROI, in ``[0, N)``.
    coords: ``[R, ..., 2]`` points ``(x, y)`` normalised to ``[0, 1]`` of the map extent.
      Treated as constants (``stop_gradient``).
    mode: ``"bilinear"`` or ``"nearest"`` (round-half-to-even, out of range -> 0).

  Returns:
    ``[R, ..., C]`` sampled features, dtype of ``features``.
  """
  features, batch_index, coords = map(jnp.asarray, (features, batch_index, coords))
  r = coords.shape[0]
  if batch_index.shape != (r,):
    raise ValueError(f"batch_index must have shape ({r},), got {batch_index.shape}")
  c = features.shape[-1]
  out = _sample_rows(features, batch_index, coords.reshape(r, -1, 2), mode)
  return out.reshape(coords.shape[:-1] + (c,))


def point_sample(features: jax.Array, coords: jax.Array, mode: str = "bilinear") -> jax.Array:
  """detectron2 ``point_sample``: ``grid_sample(align_corners=False, zeros)`` at normalised points.

  Args:
    features: ``[N, H, W, C]`` feature maps.
    coords: ``[N, P, 2]`` or ``[N, ..., 2]`` points ``(x, y)`` in ``[0, 1]`` of the full map extent
      (pixel position ``x*W - 0.5``); points outside are allowed (zero padding per tap).
      Treated as constants (``stop_gradient``); gradients flow to ``features`` only.
    mode: ``"bilinear"`` or ``"nearest"`` (round-half-to-even, out of range -> 0).

  Returns:
    ``[N, P, C]`` (or ``[N, ..., C]``) sampled features, dtype of ``features``.
  """
  features, coords = jnp.asarray(features), jnp.asarray(coords)
  n = features.shape[0]
  if coords.shape[0] != n:
    raise ValueError(f"coords batch {coords.shape[0]} != features batch {n}")
  return point_sample_by_index(features, jnp.arange(n, dtype=jnp.int32), coords, mode)


def _upsample_axis_x2(x: jax.Array, axis: int) -> jax.Array:
  """x2 linear upsampling of one axis, ``align_corners=False``, PyTorch edge handling.

  Output ``2k`` reads source ``k - 0.25`` (``0.25*x[k-1] + 0.75*x[k]``; clamped to ``x[0]`` at
  ``k = 0``) and output ``2k+1`` reads ``k + 0.25`` (``0.75*x[k] + 0.25*x[k+1]``, with the upper
  neighbour index clamped to ``n-1``).
  """
  n = x.shape[axis]
  first = lax.slice_in_dim(x, 0, 1, axis=axis)
  last = lax.slice_in_dim(x, n - 1, n, axis=axis)
  lower = lax.slice_in_dim(x, 0, n - 1, axis=axis)
  upper = lax.slice_in_dim(x, 1, n, axis=axis)
  # PyTorch computes 1*x[0] + 0*x[1] at the clamped low edge, which is exactly x[0].
  even = jnp.concatenate([first, 0.25 * lower + 0.75 * upper], axis=axis)
  # At the high edge PyTorch computes 0.75*x[n-1] + 0.25*x[n-1]; keep that arithmetic.
  odd = 0.75 * x + 0.25 * jnp.concatenate([upper, last], axis=axis)
  out = jnp.stack([even, odd], axis=axis + 1)
  return out.reshape(x.shape[:axis] + (2 * n,) + x.shape[axis + 1:])


def interpolate_bilinear_x2(x: jax.Array) -> jax.Array:
  """PyTorch ``F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)``.

  Separable: the width pass runs first and the height pass combines its results, which is the
  order of PyTorch's CPU kernel (``h0*(w0*a + w1*b) + h1*(w0*c + w1*d)``). ``[N, H, W, C]`` ->
  ``[N, 2H, 2W, C]``, same dtype.
  """
  x = jnp.asarray(x)
  if x.ndim != 4:
    raise ValueError(f"expected [N, H, W, C], got shape {x.shape}")
  return _upsample_axis_x2(_upsample_axis_x2(x, axis=2), axis=1)
