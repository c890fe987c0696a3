"""FPN anchors (detectron2 ``DefaultAnchorGenerator``), computed with numpy at trace time.

Anchors depend only on static shapes, so they are numpy constants rather than traced values.
Arithmetic follows detectron2 bit for bit: the cell anchors are computed in float64 (Python
floats) and then rounded to float32; the grid shifts are float32 and are added to the float32
cell anchors in float32.

Conventions: boxes ``(x0, y0, x1, y1)`` in pixels of the padded network input; anchor ``a`` at
grid position ``(y, x)`` of a level has flat index ``(y * W_l + x) * A + a``, levels p2..p6
concatenated in that order when a caller concatenates them.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

DEFAULT_STRIDES = (4, 8, 16, 32, 64)
DEFAULT_SIZES = ((32,), (64,), (128,), (256,), (512,))
DEFAULT_ASPECT_RATIOS = (0.5, 1.0, 2.0)


def cell_anchors(sizes: Sequence[float], aspect_ratios: Sequence[float]) -> np.ndarray:
  """Anchors centred at the origin, ``[len(sizes) * len(aspect_ratios), 4]`` float32.

  For size ``s`` and ratio ``r`` (height / width): ``w = sqrt(s^2 / r)``, ``h = r * w``, box
  ``(-w/2, -h/2, w/2, h/2)``. Order: size-major, then ratio.
  """
  out = []
  for size in sizes:
    area = float(size) ** 2.0
    for ratio in aspect_ratios:
      w = math.sqrt(area / float(ratio))
      h = float(ratio) * w
      out.append([-w / 2.0, -h / 2.0, w / 2.0, h / 2.0])
  return np.asarray(out, dtype=np.float64).astype(np.float32)


def grid_anchors(feature_hw: tuple[int, int], stride: float, cells: np.ndarray,
                 offset: float = 0.0) -> np.ndarray:
  """All anchors of one level: ``[H * W * A, 4]`` float32, location-major then cell anchor.

  Args:
    feature_hw: ``(H, W)`` of the level's feature map.
    stride: the level's stride in input pixels.
    cells: ``[A, 4]`` float32 cell anchors (:func:`cell_anchors`).
    offset: anchor centres at ``((x + offset) * stride, (y + offset) * stride)``; detectron2's
      config uses 0.0.
  """
  h, w = int(feature_hw[0]), int(feature_hw[1])
  # torch.arange(offset*stride, W*stride, step=stride, dtype=float32): start + i*step computed
  # in float64 and rounded once, which is what the float64 arange here does.
  xs = (offset * stride + np.arange(w, dtype=np.float64) * stride).astype(np.float32)
  ys = (offset * stride + np.arange(h, dtype=np.float64) * stride).astype(np.float32)
  sy, sx = np.meshgrid(ys, xs, indexing="ij")
  sx = sx.reshape(-1)
  sy = sy.reshape(-1)
  shifts = np.stack([sx, sy, sx, sy], axis=1)
  cells = np.asarray(cells, np.float32)
  return (shifts[:, None, :] + cells[None, :, :]).reshape(-1, 4)


def level_hw(image_padded_hw: tuple[int, int], stride: int) -> tuple[int, int]:
  """Feature-map size of a level: ``ceil(H / stride), ceil(W / stride)`` of the padded input.

  Every stride-2 layer of ResNet/FPN (padded convs, the stem max-pool, p6's 1x1/2 max-pool) maps
  ``n`` to ``ceil(n / 2)``, and nested ceils of halvings equal one ceil.
  """
  return (-(-int(image_padded_hw[0]) // stride), -(-int(image_padded_hw[1]) // stride))


def fpn_anchors(image_padded_hw: tuple[int, int],
                strides: Sequence[int] = DEFAULT_STRIDES,
                sizes: Sequence[Sequence[float]] = DEFAULT_SIZES,
                aspect_ratios: Sequence[float] | Sequence[Sequence[float]] = DEFAULT_ASPECT_RATIOS,
                offset: float = 0.0) -> list[np.ndarray]:
  """Anchors of every FPN level for a padded input size.

  Args:
    image_padded_hw: ``(H, W)`` of the padded network input (static ints).
    strides: one stride per level (p2..p6).
    sizes: one sequence of sizes per level (a single sequence is broadcast to all levels, as in
      detectron2).
    aspect_ratios: one sequence of ratios for all levels, or one per level.
    offset: see :func:`grid_anchors`.

  Returns:
    One float32 numpy array ``[H_l * W_l * A_l, 4]`` per level.
  """
  n = len(strides)
  if len(sizes) == 1 and n > 1:
    sizes = list(sizes) * n
  if not isinstance(aspect_ratios[0], (list, tuple)):
    aspect_ratios = [aspect_ratios] * n
  elif len(aspect_ratios) == 1 and n > 1:
    aspect_ratios = list(aspect_ratios) * n
  if len(sizes) != n or len(aspect_ratios) != n:
    raise ValueError(f"need one sizes/aspect_ratios entry per stride, got {len(sizes)}, "
                     f"{len(aspect_ratios)} for {n} strides")
  return [grid_anchors(level_hw(image_padded_hw, s), s, cell_anchors(sz, ar), offset)
          for s, sz, ar in zip(strides, sizes, aspect_ratios)]
