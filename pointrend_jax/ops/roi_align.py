"""ROIAlign with torchvision ``roi_align`` semantics, as pure, jittable JAX functions.

Conventions (spec ``mask_rcnn_fpn.md`` §7.1):

* Feature maps are NHWC ``[N, H, W, C]``. Boxes are ``[R, 4]`` ``(x0, y0, x1, y1)`` in input
  pixels; ``spatial_scale`` (``1 / stride``) maps them onto the feature grid, on which the value
  ``f[i, j]`` sits at the continuous position ``(x, y) = (j, i)``. With ``aligned=True``
  (ROIAlignV2) the scaled box is shifted by ``-0.5`` so that pixel centres line up.
* Output ``[R, ph, pw, C]``; cell ``(p, q)`` averages ``gh * gw`` bilinear samples on a regular
  grid inside its bin, with torchvision's clamping rules (samples outside ``[-1, H] x [-1, W]``
  are 0, positions in ``[-1, 0)`` are clamped to 0, taps past the last row/column are clamped).
* ``sampling_ratio > 0`` fixes ``gh = gw = sampling_ratio``; ``sampling_ratio == 0`` is
  torchvision's adaptive grid ``gh = ceil(rh / ph)``, ``gw = ceil(rw / pw)``, per ROI.
  Degenerate ROIs (``gh`` or ``gw`` <= 0) give 0; the divisor is ``max(gh * gw, 1)``.

Formulation. A sample's bilinear weight and its in-map test factorise into a row part and a
column part, so bin ``(p, q)`` equals ``sum_ij A[p, i] B[q, j] f[i, j] / (gh gw)``, where
``A[p, i]`` sums the row weights that bin row ``p``'s samples put on map row ``i`` (``B`` likewise
for columns) -- the separable form of spec §7.3, equal to the per-sample sum up to float
summation order. Each weight is computed with exactly torchvision's float32 per-sample arithmetic.

* :func:`roi_align` (many channels) restricts ``i``/``j`` to the few rows/columns each bin
  touches (about ``gh + 1`` by ``gw + 1``) and loops over these flattened *tap slots*: every slot
  gathers one ``C``-vector per bin straight from the flattened map ``[N * H * W, C]`` at the ROI's
  image (no per-ROI copy of the map). That is up to ~4x fewer gathers than looping over samples
  with 4 taps each (3x on proposal-like boxes on p2). ROIs are sorted by slot count and
  processed in chunks, each chunk looping up to its own largest count, so the work follows the
  samples actually needed; shapes are static, only trip counts are data dependent. Only the
  rows/columns that samples inside ``[-1, H]`` can touch are visited, so every box is exact,
  however large. The backward pass is a hand-written scatter-add into one gradient buffer
  (``custom_vjp``): memory stays ``O(R ph pw C)`` plus one map-sized gradient either way.
* :func:`roi_align_separable` (single-channel maps, e.g. the PointRend coarse-mask target) builds
  the full ``A`` ``[R, ph, H]`` and ``B`` ``[R, pw, W]`` and applies two matmuls.

Bounds. Nothing here needs a sample bound to be exact. ``roi_align``'s optional static
``max_samples_per_bin`` caps the per-ROI work instead: a ROI with more than that many in-map
samples per bin is resampled on a coarser uniform grid ``gh' x gw'`` (``gh' gw' <= cap``, divisor
``gh' gw'``) -- an approximation, not torchvision's value. :func:`adaptive_samples_bound` derives
the exact worst case of the FPN box pooler (spec §7.3: 48 for COCO images of 1333 x 800, 74 for
Cityscapes' 2048 x 1024), a cap that no box inside the image reaches.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple, Optional, Sequence, Union

import jax
import jax.numpy as jnp

__all__ = ["roi_align", "roi_align_separable", "pool_flat_maps", "normalize_output_size",
           "default_chunk_size", "adaptive_samples_bound", "adaptive_grid_size_bound"]

Array = jax.Array
OutputSize = Union[int, Sequence[int]]

# Adaptive grids are clipped to this before the int conversion: it guards int32 overflow for
# absurd boxes; visited work is bounded by the map size anyway.
_GRID_CAP = 1 << 20
# Detectron2's level rule adds this inside the log2 (``assign_boxes_to_levels``).
_LEVEL_EPS = 1e-8
# Adaptive grids have sample spacing > 0.5 px (one sample per bin otherwise), so at most 5
# samples touch a given row (positions in a 2 px window); plus 1 each side against float error
# in the estimate of the first one.
_ADAPTIVE_CANDIDATES = 7


def _div(num: Array, den: Array) -> Array:
  """``num / den`` correctly rounded, as torch and torchvision compute it.

  XLA rewrites a division by a broadcast (or constant) into a multiplication by its reciprocal,
  which is off by an ulp; on sample positions near x = 60 that is ~4e-6, visible at the 1e-5
  parity tolerance. Hiding a full-shape divisor behind an optimization barrier keeps the divide.
  """
  num = jnp.asarray(num)
  den = jax.lax.optimization_barrier(jnp.broadcast_to(jnp.asarray(den, num.dtype), num.shape))
  return jax.lax.div(num, den)


def _rounded(x: Array) -> Array:
  """``x``, rounded to its dtype before any later use.

  XLA's CPU/GPU emitters contract ``a * b + c`` into an FMA, which skips the rounding of the
  product that torchvision's kernel performs; on sample positions that is again an ulp. A select
  on ``x == x`` (identity, NaN included) sits between the multiply and the add and blocks it.
  """
  return jnp.where(x == x, x, jnp.nan)


def normalize_output_size(output_size: OutputSize) -> tuple[int, int]:
  """``ph`` or ``(ph, pw)`` -> ``(ph, pw)`` as Python ints (hashable, for static arguments)."""
  if isinstance(output_size, int):
    return output_size, output_size
  ph, pw = output_size
  return int(ph), int(pw)


# Static bounds.


def adaptive_grid_size_bound(max_side: float, output_size: int, spatial_scale: float = 1.0) -> int:
  """Largest adaptive per-axis grid ``ceil(r / output_size)`` for boxes of side <= ``max_side``.

  ``r = side * spatial_scale`` is the box extent on the feature grid (the aligned offset cancels),
  e.g. ``adaptive_grid_size_bound(1333, 7) == 191`` for the mask-target crop at scale 1.
  """
  return max(1, math.ceil(max_side * spatial_scale / output_size))


def adaptive_samples_bound(max_image_side: float,
                           output_size: OutputSize = 7,
                           min_level: int = 2,
                           max_level: int = 5,
                           canonical_box_size: float = 224.0,
                           canonical_level: int = 4,
                           min_image_side: Optional[float] = None) -> int:
  """Exact worst case of ``gh * gw`` in the FPN box pooler, for boxes inside the image.

  A box ``w x h`` (sides within the image's) is pooled from level
  ``k = clamp(floor(canonical_level + log2(sqrt(w h) / canonical_box_size + 1e-8)))`` at scale
  ``2**-k`` with ``gw = ceil(w 2**-k / pw)``, ``gh = ceil(h 2**-k / ph)``. For each level and
  pair ``(gh, gw)`` the boxes realising it are ``w in (pw (gw-1) 2**k, pw gw 2**k]``,
  ``h in (ph (gh-1) 2**k, ph gh 2**k]`` (cut to the image); their areas fill
  ``(w_lo h_lo, w_hi h_hi]``, which must meet the level's area interval. The bound is the
  largest feasible ``gh * gw`` (brute force over a few thousand pairs; exact in real arithmetic).

  Args:
    max_image_side: longest image side in input pixels.
    output_size: pooler resolution ``ph`` (or ``(ph, pw)``).
    min_level, max_level, canonical_box_size, canonical_level: the level rule (detectron2's).
    min_image_side: shortest image side; defaults to ``max_image_side`` (square images). Both
      orientations are considered.

  Returns:
    ``max gh * gw``: 48 for 1333 (x 800 or square), 74 for 2048 x 1024 -- both reached by ~1 px
    high boxes nearly as wide as the image, pooled from p2 -- but 100 for a square 2048 image
    (a 2048 x 2048 box on p5 has a 10 x 10 grid).
  """
  ph, pw = normalize_output_size(output_size)
  short = max_image_side if min_image_side is None else min_image_side
  best = 0
  for w_max, h_max in ((max_image_side, short), (short, max_image_side)):
    for level in range(min_level, max_level + 1):
      stride = 2.0**level
      # Area interval [a_lo, a_hi) assigned to this level (the clamp opens the outer ends).
      a_lo = 0.0 if level == min_level else (
          canonical_box_size * (2.0**(level - canonical_level) - _LEVEL_EPS))**2
      a_hi = math.inf if level == max_level else (
          canonical_box_size * (2.0**(level + 1 - canonical_level) - _LEVEL_EPS))**2
      gw_max = adaptive_grid_size_bound(w_max, pw, 1.0 / stride)
      gh_max = adaptive_grid_size_bound(h_max, ph, 1.0 / stride)
      for gh in range(1, gh_max + 1):
        h_lo, h_hi = ph * (gh - 1) * stride, min(ph * gh * stride, h_max)
        for gw in range(1, gw_max + 1):
          if gh * gw <= best:
            continue
          w_lo, w_hi = pw * (gw - 1) * stride, min(pw * gw * stride, w_max)
          if w_lo * h_lo < a_hi and w_hi * h_hi >= a_lo:
            best = gh * gw
  return best


# Per-axis sampling geometry and weights (shared by both formulations).


class _Axis(NamedTuple):
  """Sampling of every ROI along one axis (``P`` bins).

  Sample ``k < grid`` of bin ``p`` lies at ``(start + p * bin_size) + ((k + .5) * bin_size) / grid``
  (torchvision's float32 expression). Bin ``p``'s samples inside ``[-1, size]`` touch map
  rows ``tap0[p] .. tap0[p] + taps[p] - 1`` (``taps == 0``: none).
  """
  start: Array  # [R] f32, ROI start on the feature grid (after the aligned offset).
  bin_size: Array  # [R] f32.
  grid: Array  # [R] i32 samples per bin (gh or gw), >= 0.
  size: Array  # [R] i32 map rows (H or W).
  tap0: Array  # [R, P] i32.
  taps: Array  # [R, P] i32.


def _axis_grid(lo: Array, hi: Array, scale: Array, pooled: int, sampling_ratio: int,
               aligned: bool) -> tuple[Array, Array, Array]:
  """ROI start, bin size and samples per bin along one axis (torchvision's float32 formulas)."""
  offset = 0.5 if aligned else 0.0
  start = _rounded(lo * scale) - offset
  extent = (_rounded(hi * scale) - offset) - start
  if not aligned:
    extent = jnp.maximum(extent, 1.0)  # Legacy ROIAlign forces ROI sides of at least 1.
  bin_size = _div(extent, jnp.float32(pooled))
  if sampling_ratio > 0:
    grid = jnp.full(lo.shape, sampling_ratio, jnp.int32)
  else:
    g = jnp.clip(jnp.ceil(bin_size), 0, _GRID_CAP)
    grid = jnp.where(jnp.isnan(g), 0, g).astype(jnp.int32)
  return start, bin_size, grid


def _bin_base(start: Array, bin_size: Array, pooled: int) -> Array:
  """``start + p * bin_size`` ``[R, P]``, rounded like torchvision (no FMA)."""
  p = jnp.arange(pooled, dtype=jnp.float32)
  return start[:, None] + _rounded(p * bin_size[:, None])


def _positions(base: Array, bin_size: Array, grid: Array, k: Array) -> Array:
  """Positions of samples ``k`` (int, broadcast against ``base``) of every bin."""
  gridf = jnp.maximum(grid, 1).astype(jnp.float32)
  return base + _div((k.astype(jnp.float32) + 0.5) * bin_size, gridf)


def _axis_taps(pos: Array, size: Array) -> tuple[Array, Array, Array, Array, Array]:
  """torchvision's clamped bilinear taps along one axis.

  Returns ``(valid, low, high, w_low, w_high)``; positions outside ``[-1, size]`` are invalid
  (weights 0, indices in range but meaningless).
  """
  sizef = size.astype(jnp.float32)
  valid = (pos >= -1.0) & (pos <= sizef)
  # Clipping to `size` changes no valid position's taps (>= size - 1 clamps anyway) and keeps the
  # int conversion in range for far-away positions.
  p = jnp.clip(pos, 0.0, sizef)
  low = jnp.clip(jnp.floor(p).astype(jnp.int32), 0, size - 1)
  at_end = low >= size - 1
  high = jnp.where(at_end, low, low + 1)
  p = jnp.where(at_end, low.astype(jnp.float32), p)
  l = p - low.astype(jnp.float32)
  w_low = jnp.where(valid, 1.0 - l, 0.0)
  w_high = jnp.where(valid, l, 0.0)
  return valid, low, high, w_low, w_high


def _make_axis(start: Array, bin_size: Array, grid: Array, size: Array, pooled: int) -> _Axis:
  """Finds the rows each bin's in-map samples touch.

  Samples outside ``[-1, size]`` contribute nothing (they only count in the divisor), so the
  window covers the samples with index in ``[first, stop)``, estimated from the positions and
  widened by one sample each side against float error (extra rows just get weight 0).
  """
  base = _bin_base(start, bin_size, pooled)
  gridf = grid.astype(jnp.float32)[:, None]
  step = bin_size[:, None] / jnp.maximum(gridf, 1.0)
  forward = step > 0
  safe_step = jnp.where(forward, step, 1.0)
  sizef = size.astype(jnp.float32)[:, None]
  first = jnp.clip(jnp.floor((-1.0 - base) / safe_step - 0.5) - 1.0, 0.0, gridf)
  stop = jnp.clip(jnp.floor((sizef - base) / safe_step - 0.5) + 2.0, 0.0, gridf)
  # A non-positive bin with a fixed sampling ratio still samples (all at or before its start).
  first = jnp.where(forward, first, 0.0)
  stop = jnp.where(forward, stop, gridf)
  first = jnp.where(jnp.isnan(first), 0.0, first).astype(jnp.int32)
  stop = jnp.where(jnp.isnan(stop), 0.0, stop).astype(jnp.int32)
  size2 = size[:, None]
  pos = lambda k: _positions(base, bin_size[:, None], grid[:, None], k)
  _, lo_a, hi_a, _, _ = _axis_taps(pos(first), size2)
  _, lo_b, hi_b, _, _ = _axis_taps(pos(stop - 1), size2)
  tap0 = jnp.minimum(lo_a, lo_b)
  taps = jnp.where(stop > first, jnp.maximum(hi_a, hi_b) - tap0 + 1, 0)
  return _Axis(start, bin_size, grid, size, tap0, taps)


def _in_map_samples(start: Array, bin_size: Array, grid: Array, size: Array,
                    pooled: int) -> Array:
  """``[R]`` upper estimate of the samples per bin inside ``[-1, size]`` (for the work cap)."""
  step = bin_size / jnp.maximum(grid, 1).astype(jnp.float32)
  span = (size.astype(jnp.float32) + 1.0) / jnp.where(step > 0, step, 1.0) + 3.0
  span = jnp.where(jnp.isnan(span), 0.0, jnp.clip(span, 0.0, _GRID_CAP)).astype(jnp.int32)
  return jnp.minimum(grid, span)


def _row_weights(axis: _Axis, base: Array, row: Array, sampling_ratio: int) -> Array:
  """Sum of the bilinear weights that each bin's samples put on map row ``row``.

  Args:
    axis: the geometry; its ``[R]`` fields are broadcast against ``row``'s leading dim.
    base: ``_bin_base`` of the bins, shaped like ``row`` up to trailing dims.
    row: int rows, ``[R, P]`` or ``[R, P, S]``.
    sampling_ratio: > 0 visits all samples of the bin; 0 only the few that can reach ``row``.

  Returns:
    Weights shaped like ``row``: each sample's ``w_low``/``w_high`` exactly as torchvision
    computes them, summed over the samples whose low/high tap is ``row``.
  """
  expand = lambda a: a.reshape(a.shape + (1,) * (row.ndim - a.ndim))
  bin_size, grid, size = (expand(a[:, None]) for a in (axis.bin_size, axis.grid, axis.size))
  base = expand(base)
  if sampling_ratio > 0:
    k0 = jnp.zeros_like(row)
    candidates = sampling_ratio
  else:
    # Samples with a tap on `row` lie in [row - 1, row + 1) (row 0 also takes [-1, 0), the last
    # row everything up to `size`); start one sample before the first candidate.
    step = bin_size / jnp.maximum(grid, 1).astype(jnp.float32)
    lower = jnp.where(row == 0, -1.0, row.astype(jnp.float32) - 1.0)
    t = jnp.floor((lower - base) / jnp.where(step > 0, step, 1.0) - 0.5) - 1.0
    t = jnp.clip(jnp.where(jnp.isnan(t), 0.0, t), 0.0, grid.astype(jnp.float32))
    k0 = t.astype(jnp.int32)
    candidates = _ADAPTIVE_CANDIDATES
  # All candidates at once, on a trailing axis: one kernel rather than one per candidate.
  last = lambda a: a[..., None]
  k = last(k0) + jnp.arange(candidates, dtype=jnp.int32)
  _, low, high, w_low, w_high = _axis_taps(
      _positions(last(base), last(bin_size), last(grid), k), last(size))
  ok = k < last(grid)
  row = last(row)
  weights = (jnp.where(ok & (low == row), w_low, 0.0) + jnp.where(ok & (high == row), w_high, 0.0))
  return jnp.sum(weights, axis=-1)


# Many-channel formulation: windowed tap-slot loop over a buffer of flattened maps.


class _Rois(NamedTuple):
  """Everything the slot loop needs per ROI (leading dim R); no gradient flows through it."""
  y: _Axis
  x: _Axis
  row0: Array  # [R] i32, row of the flat buffer holding pixel (0, 0) of the ROI's map.
  slots: Array  # [R] i32, tap slots to visit = max_p taps_y * max_q taps_x.


def _make_rois(boxes: Array, scale: Array, height: Array, width: Array, row0: Array,
               pooled: tuple[int, int], sampling_ratio: int, aligned: bool,
               max_samples_per_bin: Optional[int]) -> _Rois:
  """Per-ROI geometry; ``scale``, ``height``, ``width``, ``row0`` are ``[R]``."""
  ph, pw = pooled
  boxes = boxes.astype(jnp.float32)
  scale = scale.astype(jnp.float32)
  height, width = height.astype(jnp.int32), width.astype(jnp.int32)
  ys, ybin, gh = _axis_grid(boxes[:, 1], boxes[:, 3], scale, ph, sampling_ratio, aligned)
  xs, xbin, gw = _axis_grid(boxes[:, 0], boxes[:, 2], scale, pw, sampling_ratio, aligned)
  if max_samples_per_bin is not None:
    cap = int(max_samples_per_bin)
    need = (_in_map_samples(ys, ybin, gh, height, ph) * _in_map_samples(xs, xbin, gw, width, pw))
    f = jnp.sqrt(cap / jnp.maximum(gh * gw, 1).astype(jnp.float32))
    gh2 = jnp.maximum(1, jnp.floor(gh * f).astype(jnp.int32))
    gw2 = jnp.maximum(1, jnp.floor(gw * f).astype(jnp.int32))
    gw2 = jnp.minimum(gw2, cap // gh2)
    gh2 = jnp.minimum(gh2, cap // gw2)
    over = need > cap
    gh = jnp.where(over, jnp.minimum(gh, gh2), gh)
    gw = jnp.where(over, jnp.minimum(gw, gw2), gw)
  y = _make_axis(ys, ybin, gh, height, ph)
  x = _make_axis(xs, xbin, gw, width, pw)
  slots = jnp.max(y.taps, axis=1) * jnp.max(x.taps, axis=1)
  return _Rois(y, x, row0.astype(jnp.int32), slots)


def _slot_taps(rois: _Rois, n: Array, sampling_ratio: int) -> tuple[Array, Array]:
  """Flat rows ``[K, ph, pw]`` and weights ``[K, ph, pw]`` of tap slot ``n`` of every ROI."""
  ph, pw = rois.y.tap0.shape[1], rois.x.tap0.shape[1]
  width = jnp.maximum(jnp.max(rois.x.taps, axis=1), 1)
  a, b = n // width, n % width  # Slot n = row offset a, column offset b in every bin's window.

  def axis_part(axis: _Axis, offset: Array, pooled: int):
    row = axis.tap0 + offset[:, None]
    active = offset[:, None] < axis.taps  # Beyond this bin's window (incl. n >= slots).
    row = jnp.minimum(row, axis.size[:, None] - 1)
    base = _bin_base(axis.start, axis.bin_size, pooled)
    w = jnp.where(active, _row_weights(axis, base, row, sampling_ratio), 0.0)
    return row, w

  rows, wy = axis_part(rois.y, a, ph)
  cols, wx = axis_part(rois.x, b, pw)
  idx = (rois.row0[:, None, None] + rows[:, :, None] * rois.x.size[:, None, None] +
         cols[:, None, :])
  return idx, wy[:, :, None] * wx[:, None, :]


def default_chunk_size(chunk_size: Optional[int] = None) -> int:
  """ROIs per chunk of the slot loop: ``chunk_size`` if given, else 8 on CPU and 256 elsewhere.

  Small chunks waste fewest loop trips on ROIs smaller than the chunk's largest and keep the
  accumulator in cache (on 2 CPU cores 4-8 beat 32-64 by 1.3-1.5x); accelerators prefer few,
  wide steps over many small kernel launches.
  """
  if chunk_size is not None:
    return int(chunk_size)
  return 8 if jax.default_backend() == "cpu" else 256


def _divisor(rois: _Rois) -> Array:
  return jnp.maximum(rois.y.grid * rois.x.grid, 1).astype(jnp.float32)


def _fori(trip: Array, body, init):
  """``fori_loop(0, trip, body, init)`` with a traced trip count (lowers to a while loop)."""
  return jax.lax.fori_loop(jnp.int32(0), trip.astype(jnp.int32), body, init)


def _chunked(rois: _Rois, chunk: int) -> tuple[_Rois, Array, Array, int]:
  """Sorts ROIs by slot count, pads to whole chunks and splits them.

  Returns the chunked ROIs (leading dims ``[num_chunks, chunk]``), the original index of each
  (``R`` for padding), each chunk's loop length, and ``num_chunks``.
  """
  r = rois.slots.shape[0]
  num_chunks = -(-r // chunk)
  pad = num_chunks * chunk - r
  order = jnp.argsort(rois.slots)
  # Edge padding repeats the last (largest) ROI: valid indices and no extra loop trips; its
  # results are dropped and its gradient rows are zero.
  pad_fn = lambda a: jnp.pad(a[order], [(0, pad)] + [(0, 0)] * (a.ndim - 1), mode="edge")
  split = lambda a: a.reshape((num_chunks, chunk) + a.shape[1:])
  sorted_rois = jax.tree.map(lambda a: split(pad_fn(a)), rois)
  index = split(jnp.concatenate([order.astype(jnp.int32), jnp.full((pad,), r, jnp.int32)]))
  trips = jnp.max(sorted_rois.slots, axis=1)
  return sorted_rois, index, trips, num_chunks


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _pool_flat(flat: Array, rois: _Rois, pooled: tuple[int, int], sampling_ratio: int,
               chunk: int) -> Array:
  """ROIAlign of ``flat`` ``[T, C]`` (rows of flattened maps) -> ``[R, ph, pw, C]``."""
  ph, pw = pooled
  r, c = rois.slots.shape[0], flat.shape[1]
  chunks, index, trips, num_chunks = _chunked(rois, chunk)

  def chunk_body(i, out):
    part = jax.tree.map(lambda a: a[i], chunks)

    def slot_body(n, acc):
      idx, w = _slot_taps(part, n, sampling_ratio)
      taps = flat.at[idx].get(mode="promise_in_bounds").astype(jnp.float32)
      return acc + w[..., None] * taps

    acc = _fori(trips[i], slot_body, jnp.zeros((chunk, ph, pw, c), jnp.float32))
    acc = _div(acc, _divisor(part)[:, None, None, None])
    return out.at[index[i]].set(acc.astype(out.dtype), mode="drop")  # Drops padding (index R).

  return jax.lax.fori_loop(0, num_chunks, chunk_body, jnp.zeros((r, ph, pw, c), flat.dtype))


def _pool_flat_fwd(flat, rois, pooled, sampling_ratio, chunk):
  # The op is linear in `flat`: the backward needs only its row count and dtype, carried by an
  # empty [T, 0] array rather than by the map itself.
  out = _pool_flat(flat, rois, pooled, sampling_ratio, chunk)
  return out, (rois, jnp.zeros((flat.shape[0], 0), flat.dtype))


def _pool_flat_bwd(pooled, sampling_ratio, chunk, res, ct):
  rois, empty = res
  c = ct.shape[-1]
  chunks, index, trips, num_chunks = _chunked(rois, chunk)
  # A zero row for the padding's index R.
  ct = jnp.concatenate([ct.astype(jnp.float32), jnp.zeros((1,) + ct.shape[1:], jnp.float32)])

  def chunk_body(i, grad):
    part = jax.tree.map(lambda a: a[i], chunks)
    g_out = _div(ct[index[i]], _divisor(part)[:, None, None, None])

    def slot_body(n, grad):
      idx, w = _slot_taps(part, n, sampling_ratio)
      upd = (w[..., None] * g_out).reshape(-1, c)
      return grad.at[idx.reshape(-1)].add(upd, mode="promise_in_bounds")

    return _fori(trips[i], slot_body, grad)

  grad = jax.lax.fori_loop(0, num_chunks, chunk_body,
                           jnp.zeros((empty.shape[0], c), jnp.float32))
  return grad.astype(empty.dtype), None


_pool_flat.defvjp(_pool_flat_fwd, _pool_flat_bwd)


def pool_flat_maps(flat: Array, boxes: Array, scale: Array, height: Array, width: Array,
                   row0: Array, output_size: OutputSize, sampling_ratio: int = 0,
                   aligned: bool = True, max_samples_per_bin: Optional[int] = None,
                   chunk_size: Optional[int] = None) -> Array:
  """ROIAlign from a buffer of flattened maps; each ROI names its own map (used by the pooler).

  Args:
    flat: ``[T, C]``, the pixels of one or more NHWC maps, each flattened row-major.
    boxes: ``[R, 4]`` xyxy in input pixels.
    scale: ``[R]`` spatial scale of each ROI's map.
    height, width: ``[R]`` int, size of each ROI's map.
    row0: ``[R]`` int, row of ``flat`` holding pixel ``(0, 0)`` of each ROI's map.
    output_size, sampling_ratio, aligned, max_samples_per_bin, chunk_size: as :func:`roi_align`.

  Returns:
    ``[R, ph, pw, C]`` in ``flat.dtype`` (accumulated in float32).
  """
  cap = None if max_samples_per_bin is None else int(max_samples_per_bin)
  flat, boxes, scale, height, width, row0 = map(jnp.asarray,
                                                (flat, boxes, scale, height, width, row0))
  return _pool_flat_maps(flat, boxes, scale, height, width, row0,
                         normalize_output_size(output_size), int(sampling_ratio), bool(aligned),
                         cap, default_chunk_size(chunk_size))


# Jitted with a static configuration so that eager callers (parity tool, tests) do not dispatch
# the geometry op by op; inside an outer jit this is inlined.
@functools.partial(jax.jit, static_argnums=(6, 7, 8, 9, 10))
def _pool_flat_maps(flat, boxes, scale, height, width, row0, pooled, sampling_ratio, aligned,
                    max_samples_per_bin, chunk_size):
  r = boxes.shape[0]
  if r == 0:
    return jnp.zeros((0,) + pooled + (flat.shape[1],), flat.dtype)
  rois = _make_rois(boxes, scale, height, width, row0, pooled, sampling_ratio, aligned,
                    max_samples_per_bin)
  rois = jax.tree.map(jax.lax.stop_gradient, rois)
  return _pool_flat(flat, rois, pooled, sampling_ratio, max(1, min(chunk_size, r)))


def roi_align(features: Array,
              boxes: Array,
              batch_index: Array,
              output_size: OutputSize,
              spatial_scale: float,
              sampling_ratio: int = 0,
              aligned: bool = True,
              max_samples_per_bin: Optional[int] = None,
              chunk_size: Optional[int] = None) -> Array:
  """torchvision ``roi_align`` on NHWC maps (spec ``mask_rcnn_fpn.md`` §7.1, §7.3).

  Args:
    features: ``[N, H, W, C]`` (any float dtype; accumulated in float32).
    boxes: ``[R, 4]`` ``(x0, y0, x1, y1)`` in input pixels; may be tiny, degenerate or extend
      past the map. Not differentiated (like torchvision).
    batch_index: ``[R]`` int image of each box (out-of-range values are clipped).
    output_size: ``ph`` or ``(ph, pw)``.
    spatial_scale: ``1 / stride`` of ``features`` relative to the box coordinates.
    sampling_ratio: samples per bin and axis; ``0`` = torchvision's adaptive ``ceil(r / p)``.
    aligned: ``True`` = ROIAlignV2 (-0.5 pixel shift, no minimum ROI size); ``False`` = legacy
      (no shift, ROI sides of at least 1 feature pixel).
    max_samples_per_bin: optional static cap on the work per ROI; ``None`` = exact for every
      box. A ROI with more in-map samples per bin is resampled on a coarser uniform grid of at
      most this many (an approximation); :func:`adaptive_samples_bound` gives a cap that no box
      inside the image reaches.
    chunk_size: ROIs processed together; each chunk loops up to its own largest tap-slot count
      (~``(gh + 1) (gw + 1)``). ``None``: :func:`default_chunk_size`.

  Returns:
    ``[R, ph, pw, C]`` in ``features.dtype``; row ``r`` is pooled from
    ``features[batch_index[r]]``. Differentiable w.r.t. ``features`` (reverse mode).
  """
  cap = None if max_samples_per_bin is None else int(max_samples_per_bin)
  features, boxes, batch_index = map(jnp.asarray, (features, boxes, batch_index))
  return _roi_align(features, boxes, batch_index, normalize_output_size(output_size),
                    float(spatial_scale), int(sampling_ratio), bool(aligned), cap,
                    default_chunk_size(chunk_size))


@functools.partial(jax.jit, static_argnums=(3, 4, 5, 6, 7, 8))
def _roi_align(features, boxes, batch_index, pooled, spatial_scale, sampling_ratio, aligned,
               max_samples_per_bin, chunk_size):
  n, h, w, c = features.shape
  r = boxes.shape[0]
  b = jnp.clip(batch_index.astype(jnp.int32), 0, n - 1)
  full = lambda v: jnp.full((r,), v, jnp.int32)
  return _pool_flat_maps(features.reshape(n * h * w, c), boxes,
                         jnp.full((r,), spatial_scale, jnp.float32), full(h), full(w),
                         b * (h * w), pooled, sampling_ratio, aligned, max_samples_per_bin,
                         chunk_size)


# Single-channel formulation: full separable weights and two matmuls.


def _dense_weights(lo: Array, hi: Array, scale: Array, size: int, pooled: int,
                   sampling_ratio: int, aligned: bool) -> tuple[Array, Array]:
  """``A`` ``[R, P, size]`` (row weights of every bin) and the grid ``[R]``."""
  start, bin_size, grid = _axis_grid(lo, hi, scale, pooled, sampling_ratio, aligned)
  r = lo.shape[0]
  sizes = jnp.full((r,), size, jnp.int32)
  axis = _Axis(start, bin_size, grid, sizes, jnp.zeros((r, pooled), jnp.int32),
               jnp.zeros((r, pooled), jnp.int32))
  base = _bin_base(start, bin_size, pooled)
  rows = jnp.broadcast_to(jnp.arange(size, dtype=jnp.int32), (r, pooled, size))
  return _row_weights(axis, base, rows, sampling_ratio), grid


def roi_align_separable(images: Array,
                        boxes: Array,
                        batch_index: Optional[Array],
                        output_size: OutputSize,
                        spatial_scale: float = 1.0,
                        sampling_ratio: int = 0,
                        aligned: bool = True,
                        chunk_size: int = 8) -> Array:
  """Exact ROIAlign of single-channel maps via separable weights (spec §7.3).

  ``out[r, p, q] = sum_ij A[r, p, i] M[i, j] B[r, q, j] / (gh gw)`` with ``A`` ``[R, ph, H]``
  and ``B`` ``[R, pw, W]`` computed densely (each entry from the <= 7 samples that can reach its
  row), then two float32 matmuls at highest precision. Exact for every box, whatever its grid
  (the PointRend coarse-mask target has grids of 115 x 191 samples and more; regressed boxes may
  exceed the image). Cost ``O(R ph H W)``, memory ``O(R ph H + chunk H W)``: cheap for one
  channel, too expensive for feature maps (use :func:`roi_align`).

  Args:
    images: ``[N, H, W]`` maps (cast to float32, e.g. bool GT bitmasks). With
      ``batch_index=None``, ``N == R`` and map ``r`` belongs to box ``r``.
    boxes: ``[R, 4]`` xyxy in input pixels; need not be clipped to the map.
    batch_index: ``[R]`` int index into ``images`` (clipped), or ``None``.
    output_size: ``ph`` or ``(ph, pw)``.
    spatial_scale, sampling_ratio, aligned: as :func:`roi_align`.
    chunk_size: ROIs whose maps are gathered and multiplied together (one chunk of maps is
      materialised at a time).

  Returns:
    ``[R, ph, pw]`` float32. Differentiable w.r.t. ``images``.
  """
  images, boxes = jnp.asarray(images), jnp.asarray(boxes)
  n, r = images.shape[0], boxes.shape[0]
  if batch_index is None:
    if n != r:
      raise ValueError(f"images {images.shape} need one map per box ({r}) without batch_index")
    batch_index = jnp.arange(r, dtype=jnp.int32)
  batch_index = jnp.asarray(batch_index)
  return _roi_align_separable(images, boxes, batch_index, normalize_output_size(output_size),
                              float(spatial_scale), int(sampling_ratio), bool(aligned),
                              int(chunk_size))


@functools.partial(jax.jit, static_argnums=(3, 4, 5, 6, 7))
def _roi_align_separable(images, boxes, batch_index, pooled, spatial_scale, sampling_ratio,
                         aligned, chunk_size):
  ph, pw = pooled
  n, h, w = images.shape
  r = boxes.shape[0]
  if r == 0:
    return jnp.zeros((0, ph, pw), jnp.float32)
  bidx = jnp.clip(batch_index.astype(jnp.int32), 0, n - 1)
  boxes = jax.lax.stop_gradient(boxes.astype(jnp.float32))
  scale = jnp.full((r,), spatial_scale, jnp.float32)
  wy, gh = _dense_weights(boxes[:, 1], boxes[:, 3], scale, h, ph, sampling_ratio, aligned)
  wx, gw = _dense_weights(boxes[:, 0], boxes[:, 2], scale, w, pw, sampling_ratio, aligned)
  divisor = jnp.maximum(gh * gw, 1).astype(jnp.float32)

  chunk = max(1, min(chunk_size, r))
  num_chunks = -(-r // chunk)
  pad = num_chunks * chunk - r
  split = lambda a: jnp.pad(a, [(0, pad)] + [(0, 0)] * (a.ndim - 1)).reshape(
      (num_chunks, chunk) + a.shape[1:])
  highest = jax.lax.Precision.HIGHEST

  def one_chunk(args):
    b, a_y, a_x = args
    maps = images[b].astype(jnp.float32)  # [chunk, H, W]: one chunk of maps at a time.
    rows = jnp.einsum("kph,khw->kpw", a_y, maps, precision=highest)
    return jnp.einsum("kpw,kqw->kpq", rows, a_x, precision=highest)

  out = jax.lax.map(one_chunk, (split(bidx), split(wy), split(wx)))
  return _div(out.reshape((num_chunks * chunk, ph, pw))[:r], divisor[:, None, None])
