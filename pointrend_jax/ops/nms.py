"""Greedy non-maximum suppression with static shapes (torchvision ``nms`` / ``batched_nms``).

Semantics (torchvision's CPU kernel): boxes are visited in descending score order (ties: lower
input index first, as its stable sort); a box is kept unless an already kept box overlaps it with
IoU ``> iou_threshold`` (strictly); IoU is ``inter / (area_i + area_j - inter)`` in float32 with
areas ``(x1 - x0) * (y1 - y0)`` (no "+1").

Two exact algorithms over the score-sorted boxes (``method``; results are identical):

* ``"matrix"``: the ``[N, N]`` suppression matrix, then a ``fori_loop`` over the N sorted boxes
  (``keep &= ~(keep[i] & sup[i])``). Fastest on CPU when most boxes may be kept (RPN levels);
  ``O(N^2)`` memory and N sequential steps.
* ``"tiled"``: tiles of ``tile_size`` boxes inside a ``while_loop``. Each tile is tested against
  a buffer of the boxes kept so far (``[max_output + tile, 4]``), then resolved internally by
  iterating ``keep = cand & ~any_{j<i}(keep[j] & iou[j, i] > t)`` to its fixed point, which is
  exactly the greedy result (entry ``i`` only depends on entries before it, so the fixed point is
  unique and reached after at most ``tile_size`` sweeps, usually a handful). The loop stops once
  ``max_output`` boxes are kept or the valid boxes run out: greedy decisions never depend on
  later boxes, so "NMS, then keep the top k" costs only what the top k need (box inference:
  top 100 of thousands of candidates). Memory ``O(tile * (max_output + tile))``; few sequential
  steps, which suits accelerators.
* ``"auto"`` (default): ``"matrix"`` on the CPU backend when ``N <= MATRIX_MAX_BOXES`` and
  ``2 * max_output > N``, else ``"tiled"``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

DEFAULT_TILE_SIZE = 64
# Largest N for which method="auto" uses the N x N matrix scan on CPU.
MATRIX_MAX_BOXES = 4096


def _exceeds(ovr: jnp.ndarray, thr) -> jnp.ndarray:
  """``ovr > thr`` with ``thr`` a float64 number, as torchvision compares float32 IoUs."""
  if isinstance(thr, (float, int, np.floating, np.integer)):
    f = np.float32(thr)
    # A float32 IoU exceeds the double threshold iff it is >= the smallest float32 above it.
    if float(f) > float(thr):
      return ovr >= f
    return ovr > f
  return ovr > thr


def _suppresses(a: jnp.ndarray, b: jnp.ndarray, thr) -> jnp.ndarray:
  """``[P, 4] x [Q, 4] -> [P, Q]`` bool: IoU ``> thr`` with torchvision's float32 formula."""
  area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
  area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
  w = jnp.maximum(0.0, jnp.minimum(a[:, None, 2], b[None, :, 2]) -
                  jnp.maximum(a[:, None, 0], b[None, :, 0]))
  h = jnp.maximum(0.0, jnp.minimum(a[:, None, 3], b[None, :, 3]) -
                  jnp.maximum(a[:, None, 1], b[None, :, 1]))
  inter = w * h
  # 0/0 (two empty boxes) is NaN and compares False, as in torchvision.
  return _exceeds(inter / (area_a[:, None] + area_b[None, :] - inter), thr)


def _sort_by_score(scores: jnp.ndarray, valid: jnp.ndarray):
  """Descending-score order (stable), invalid entries last; also returns the number valid."""
  n = scores.shape[0]
  valid = valid & ~jnp.isnan(scores)  # NaN has no place in the order; never keep it.
  # One float key (2x faster than a (valid, score) key pair): invalid entries get +inf and land
  # last; valid scores are clipped to finite values so they stay ahead of them. `+ 0.0` folds
  # -0.0 into +0.0 so the two tie as in torch's sort; the stable sort keeps ties in input order.
  fmax = jnp.finfo(jnp.float32).max
  key = jnp.where(valid, -(jnp.clip(scores.astype(jnp.float32), -fmax, fmax) + 0.0), jnp.inf)
  _, order = jax.lax.sort((key, jnp.arange(n, dtype=jnp.int32)), num_keys=1, is_stable=True)
  return order, valid[order], jnp.sum(valid, dtype=jnp.int32)


def _nms_matrix(boxes, classes, sorted_valid, order, iou_threshold, max_output):
  """Greedy scan over the sorted boxes with a precomputed ``[N, N]`` suppression matrix."""
  n = boxes.shape[0]
  b = boxes[order]
  sup = _suppresses(b, b, iou_threshold)
  if classes is not None:
    c = classes[order]
    sup &= c[:, None] == c[None, :]
  pos = jnp.arange(n, dtype=jnp.int32)
  sup &= pos[:, None] < pos[None, :]  # Only later boxes can be suppressed.

  def body(i, keep):
    return keep & ~(keep[i] & sup[i])

  keep = jax.lax.fori_loop(0, n, body, sorted_valid)
  rank = jnp.cumsum(keep, dtype=jnp.int32) - 1
  slot = jnp.where(keep & (rank < max_output), rank, max_output)
  kept_pos = jnp.zeros((max_output,), jnp.int32).at[slot].set(pos, mode="drop")
  return kept_pos, jnp.sum(keep, dtype=jnp.int32)


def _nms_tiled(boxes, classes, sorted_valid, order, num_valid, iou_threshold, max_output, tile):
  """Tile-by-tile greedy NMS with an early exit (see the module docstring)."""
  n = boxes.shape[0]
  tile = max(1, min(tile, n))
  num_tiles = -(-n // tile)
  n_pad = num_tiles * tile
  num_valid_tiles = (num_valid + tile - 1) // tile  # Later tiles hold nothing to keep.
  sorted_boxes = jnp.zeros((n_pad, 4), jnp.float32).at[:n].set(boxes[order])
  cand = jnp.zeros((n_pad,), bool).at[:n].set(sorted_valid)
  if classes is not None:
    sorted_cls = jnp.full((n_pad,), -1, jnp.int32).at[:n].set(classes[order])
  buf = max_output + tile  # Room to append one whole tile after max_output - 1 kept boxes.
  lane = jnp.arange(tile, dtype=jnp.int32)
  earlier = lane[:, None] < lane[None, :]  # [j, i]: j precedes i in the tile.
  slot = jnp.arange(buf, dtype=jnp.int32)

  def cond(state):
    t, count = state[0], state[1]
    return (t < num_valid_tiles) & (count < max_output)

  def body(state):
    t, count, kept_boxes, kept_cls, kept_pos = state
    start = t * tile
    tb = jax.lax.dynamic_slice_in_dim(sorted_boxes, start, tile)
    tc = jax.lax.dynamic_slice_in_dim(cand, start, tile)
    vs_kept = _suppresses(tb, kept_boxes, iou_threshold) & (slot < count)[None, :]
    within = _suppresses(tb, tb, iou_threshold) & earlier
    if classes is not None:
      tcls = jax.lax.dynamic_slice_in_dim(sorted_cls, start, tile)
      vs_kept &= tcls[:, None] == kept_cls[None, :]
      within &= tcls[:, None] == tcls[None, :]
    c = tc & ~jnp.any(vs_kept, axis=1)

    def sweep(k):
      return c & ~jnp.any(within & k[:, None], axis=0)

    keep, _ = jax.lax.while_loop(lambda s: jnp.any(s[0] != s[1]),
                                 lambda s: (sweep(s[0]), s[0]), (sweep(c), c))
    pos = jnp.where(keep, count + jnp.cumsum(keep, dtype=jnp.int32) - 1, buf)
    kept_boxes = kept_boxes.at[pos].set(tb, mode="drop")
    if classes is not None:
      kept_cls = kept_cls.at[pos].set(tcls, mode="drop")
    kept_pos = kept_pos.at[pos].set(start + lane, mode="drop")
    return t + 1, count + jnp.sum(keep, dtype=jnp.int32), kept_boxes, kept_cls, kept_pos

  init = (jnp.int32(0), jnp.int32(0), jnp.zeros((buf, 4), jnp.float32),
          jnp.full((buf,), -1, jnp.int32), jnp.zeros((buf,), jnp.int32))
  _, count, _, _, kept_pos = jax.lax.while_loop(cond, body, init)
  return kept_pos[:max_output], count


def _resolve_method(method: str, n: int, max_output: int) -> str:
  if method == "auto":
    # Measured on CPU (bench/ops_boxes.py): when most of the boxes may be kept, the matrix scan
    # is ~25% faster up to a few thousand boxes; when only the top few are wanted the tiles'
    # early exit wins (4-5x for 100 of 2,000), and beyond a few thousand boxes the N^2 matrix
    # costs too much memory. On accelerators the scan's N sequential steps are slow, so tiles.
    use_matrix = (jax.default_backend() == "cpu" and n <= MATRIX_MAX_BOXES and 2 * max_output > n)
    return "matrix" if use_matrix else "tiled"
  if method not in ("matrix", "tiled"):
    raise ValueError(f"unknown NMS method {method!r}; use 'auto', 'matrix' or 'tiled'")
  return method


def _greedy_nms(boxes: jnp.ndarray, scores: jnp.ndarray, classes: jnp.ndarray | None,
                valid: jnp.ndarray, iou_threshold, max_output: int, method: str, tile: int
                ) -> tuple[jnp.ndarray, jnp.ndarray]:
  n = boxes.shape[0]
  if n == 0 or max_output == 0:
    return jnp.zeros((max_output,), jnp.int32), jnp.zeros((max_output,), bool)
  order, sorted_valid, num_valid = _sort_by_score(scores, valid)
  if _resolve_method(method, n, max_output) == "matrix":
    kept_pos, count = _nms_matrix(boxes, classes, sorted_valid, order, iou_threshold, max_output)
  else:
    kept_pos, count = _nms_tiled(boxes, classes, sorted_valid, order, num_valid, iou_threshold,
                                 max_output, tile)
  keep_valid = jnp.arange(max_output) < count
  keep = jnp.where(keep_valid, order[jnp.clip(kept_pos, 0, n - 1)], 0)
  return keep.astype(jnp.int32), keep_valid


def _prepare(boxes, scores, valid):
  boxes = jnp.asarray(boxes, jnp.float32)
  scores = jnp.asarray(scores)
  valid = jnp.ones(scores.shape, bool) if valid is None else jnp.asarray(valid, bool)
  return boxes, scores, valid


def nms(boxes: jnp.ndarray, scores: jnp.ndarray, iou_threshold: float, max_output: int,
        valid: jnp.ndarray | None = None, *, method: str = "auto",
        tile_size: int = DEFAULT_TILE_SIZE) -> tuple[jnp.ndarray, jnp.ndarray]:
  """Greedy NMS (torchvision ``nms``) with a fixed-size output.

  Args:
    boxes: ``[N, 4]`` xyxy.
    scores: ``[N]``; NaN scores count as invalid.
    iou_threshold: suppress when IoU ``> iou_threshold``. A Python float is compared exactly as
      torchvision compares a float32 IoU with a double threshold; a traced value in float32.
    max_output: static number of output slots; the first ``max_output`` kept boxes of the greedy
      order are returned (identical to running full NMS and truncating).
    valid: ``[N]`` bool; invalid entries are never kept and never suppress. Default all valid.
    method: ``"matrix"``, ``"tiled"`` or ``"auto"`` (see the module docstring); speed and memory
      only, the results are identical.
    tile_size: static tile length of ``"tiled"`` (speed only).

  Returns:
    ``keep`` ``[max_output]`` int32 indices into the input, in descending score order; padding
    slots hold 0. ``keep_valid`` ``[max_output]`` bool, a prefix mask.
  """
  boxes, scores, valid = _prepare(boxes, scores, valid)
  return _greedy_nms(boxes, scores, None, valid, iou_threshold, int(max_output), method,
                     int(tile_size))


def batched_nms(boxes: jnp.ndarray, scores: jnp.ndarray, classes: jnp.ndarray,
                iou_threshold: float, max_output: int, valid: jnp.ndarray | None = None, *,
                coordinate_trick: bool = False, method: str = "auto",
                tile_size: int = DEFAULT_TILE_SIZE) -> tuple[jnp.ndarray, jnp.ndarray]:
  """Class-aware NMS (torchvision / detectron2 ``batched_nms``) with a fixed-size output.

  By default this is exact per-category NMS: boxes of different classes never suppress each
  other, i.e. torchvision's ``_batched_nms_vanilla`` (which it uses for more than 1,000 boxes on
  CPU and 5,000 on GPU, e.g. detectron2's RPN on CPU). For fewer boxes torchvision instead shifts
  every box by ``class * (max_coordinate + 1)`` in float32 and runs one plain NMS
  (``_batched_nms_coordinate_trick``); the shift rounds the coordinates of high classes (about
  1/128 px at offsets near 1e5) and so can flip decisions whose IoU is within ~1e-4 of the
  threshold, and boxes with negative coordinates may interact across classes.
  ``coordinate_trick=True`` reproduces that path bit for bit (the maximum is taken over valid
  boxes only, as torchvision only sees the real candidates).

  Args:
    boxes, scores, iou_threshold, max_output, valid, method, tile_size: as in :func:`nms`.
    classes: ``[N]`` integer category (class id, or FPN level for the RPN).
    coordinate_trick: see above.

  Returns:
    ``keep`` ``[max_output]`` int32 and ``keep_valid`` ``[max_output]`` bool as in :func:`nms`,
    ordered by descending score across all classes.
  """
  boxes, scores, valid = _prepare(boxes, scores, valid)
  classes = jnp.asarray(classes).astype(jnp.int32)
  if coordinate_trick:
    max_coord = jnp.max(jnp.where(valid[:, None], boxes, -jnp.inf))
    max_coord = jnp.where(jnp.any(valid), max_coord, 0.0)
    offsets = classes.astype(jnp.float32) * (max_coord + jnp.float32(1.0))
    return _greedy_nms(boxes + offsets[:, None], scores, None, valid, iou_threshold,
                       int(max_output), method, int(tile_size))
  return _greedy_nms(boxes, scores, classes, valid, iou_threshold, int(max_output), method,
                     int(tile_size))
