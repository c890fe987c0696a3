"""Box coding and box geometry (detectron2 ``Box2BoxTransform`` and ``structures.boxes``).

Conventions: boxes are ``(x0, y0, x1, y1)`` float32 pixels, width ``x1 - x0`` and height
``y1 - y0`` (no "+1"). All functions are pure, jittable and work on any leading batch shape
unless a shape is given explicitly.
"""

from __future__ import annotations

import math
from typing import Sequence

import jax.numpy as jnp

# detectron2's `_DEFAULT_SCALE_CLAMP`: caps exp(dw) at 1000/16 so a wild delta cannot overflow.
DEFAULT_SCALE_CLAMP = math.log(1000.0 / 16)

Weights = Sequence[float]


def _centers_sizes(boxes: jnp.ndarray):
  w = boxes[..., 2] - boxes[..., 0]
  h = boxes[..., 3] - boxes[..., 1]
  return boxes[..., 0] + 0.5 * w, boxes[..., 1] + 0.5 * h, w, h


def encode_boxes(src: jnp.ndarray, target: jnp.ndarray, weights: Weights) -> jnp.ndarray:
  """Regression targets that turn ``src`` into ``target`` (``Box2BoxTransform.get_deltas``).

  Args:
    src: ``[..., 4]`` source boxes (anchors or proposals); widths/heights must be > 0.
    target: ``[..., 4]`` target boxes, same shape.
    weights: ``(wx, wy, ww, wh)``; RPN ``(1, 1, 1, 1)``, ROI box head ``(10, 10, 5, 5)``.

  Returns:
    ``[..., 4]`` deltas ``(dx, dy, dw, dh)``: ``dx = wx * (cx_t - cx_s) / w_s``,
    ``dw = ww * log(w_t / w_s)`` (same for y/h).
  """
  src = jnp.asarray(src, jnp.float32)
  target = jnp.asarray(target, jnp.float32)
  scx, scy, sw, sh = _centers_sizes(src)
  tcx, tcy, tw, th = _centers_sizes(target)
  wx, wy, ww, wh = (float(w) for w in weights)
  # Operation order as detectron2 (weight first, then divide) for bit-level agreement.
  dx = wx * (tcx - scx) / sw
  dy = wy * (tcy - scy) / sh
  dw = ww * jnp.log(tw / sw)
  dh = wh * jnp.log(th / sh)
  return jnp.stack([dx, dy, dw, dh], axis=-1)


def decode_boxes(deltas: jnp.ndarray, boxes: jnp.ndarray, weights: Weights,
                 scale_clamp: float = DEFAULT_SCALE_CLAMP) -> jnp.ndarray:
  """Applies deltas to boxes (``Box2BoxTransform.apply_deltas``), in float32.

  Args:
    deltas: ``[..., R, K*4]``; ``K > 1`` for class-specific regression, channel ``k*4 + c``
      is component ``c`` (dx, dy, dw, dh) of class ``k``.
    boxes: ``[..., R, 4]`` reference boxes.
    weights: ``(wx, wy, ww, wh)`` as in :func:`encode_boxes`.
    scale_clamp: upper clamp of ``dw / ww`` and ``dh / wh`` before ``exp``.

  Returns:
    ``[..., R, K*4]`` decoded boxes, same layout as ``deltas``. Not clipped.
  """
  deltas = jnp.asarray(deltas, jnp.float32)
  boxes = jnp.asarray(boxes, jnp.float32)
  k = deltas.shape[-1] // 4
  d = deltas.reshape(deltas.shape[:-1] + (k, 4))
  cx, cy, w, h = (v[..., None] for v in _centers_sizes(boxes))
  wx, wy, ww, wh = (float(v) for v in weights)
  dx = d[..., 0] / wx
  dy = d[..., 1] / wy
  dw = jnp.minimum(d[..., 2] / ww, scale_clamp)
  dh = jnp.minimum(d[..., 3] / wh, scale_clamp)
  pcx = dx * w + cx
  pcy = dy * h + cy
  pw = jnp.exp(dw) * w
  ph = jnp.exp(dh) * h
  out = jnp.stack([pcx - 0.5 * pw, pcy - 0.5 * ph, pcx + 0.5 * pw, pcy + 0.5 * ph], axis=-1)
  return out.reshape(deltas.shape)


def box_area(boxes: jnp.ndarray) -> jnp.ndarray:
  """``[..., 4] -> [...]`` area ``(x1 - x0) * (y1 - y0)`` (negative for inverted boxes)."""
  return (boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])


def pairwise_intersection(a: jnp.ndarray, b: jnp.ndarray) -> jnp.ndarray:
  """``[N, 4] x [M, 4] -> [N, M]`` intersection areas (0 for disjoint boxes)."""
  wh = (jnp.minimum(a[:, None, 2:], b[None, :, 2:]) -
        jnp.maximum(a[:, None, :2], b[None, :, :2]))
  wh = jnp.maximum(wh, 0.0)
  return wh[..., 0] * wh[..., 1]


def pairwise_iou(a: jnp.ndarray, b: jnp.ndarray) -> jnp.ndarray:
  """IoU matrix ``[N, 4] x [M, 4] -> [N, M]`` (detectron2 ``pairwise_iou``).

  ``inter / (area_a + area_b - inter)`` where ``inter > 0``, else exactly 0 (so empty or disjoint
  boxes never produce NaN).
  """
  a = jnp.asarray(a, jnp.float32)
  b = jnp.asarray(b, jnp.float32)
  inter = pairwise_intersection(a, b)
  union = box_area(a)[:, None] + box_area(b)[None, :] - inter
  pos = inter > 0
  # The inner where keeps the untaken branch finite so gradients/NaN checks stay clean.
  return jnp.where(pos, inter / jnp.where(pos, union, 1.0), 0.0)


def clip_boxes(boxes: jnp.ndarray, hw) -> jnp.ndarray:
  """Clamps x to ``[0, W]`` and y to ``[0, H]`` (``Boxes.clip``).

  Args:
    boxes: ``[..., 4]``.
    hw: ``(H, W)``; Python numbers or arrays broadcastable against ``boxes[..., 0]`` (e.g. a
      per-image ``[B, 1]`` for ``[B, R, 4]`` boxes).
  """
  h = jnp.asarray(hw[0], jnp.float32)
  w = jnp.asarray(hw[1], jnp.float32)
  x0 = jnp.clip(boxes[..., 0], 0.0, w)
  y0 = jnp.clip(boxes[..., 1], 0.0, h)
  x1 = jnp.clip(boxes[..., 2], 0.0, w)
  y1 = jnp.clip(boxes[..., 3], 0.0, h)
  return jnp.stack([x0, y0, x1, y1], axis=-1)


def nonempty_boxes(boxes: jnp.ndarray, threshold: float = 0.0) -> jnp.ndarray:
  """``[..., 4] -> [...]`` bool: width and height both strictly greater than ``threshold``."""
  w = boxes[..., 2] - boxes[..., 0]
  h = boxes[..., 3] - boxes[..., 1]
  return (w > threshold) & (h > threshold)
