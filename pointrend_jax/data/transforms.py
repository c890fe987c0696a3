"""numpy / PIL transforms with detectron2's exact semantics (spec ``mask_rcnn_fpn.md`` §2, §15.6).

Conventions:

* Images are ``uint8 [H, W, 3]`` RGB (the pipeline never converts to BGR; the model does). Every
  per-channel-symmetric operation (resize, flip, crop, brightness, contrast) is therefore the
  same as detectron2's on BGR; the HSV-based ones convert as OpenCV's ``BGR2HSV`` does on the
  BGR view of the same pixels.
* Label maps (semantic ``uint8 [H, W]``, 255 = ignore) and instance masks (``bool [N, H, W]``)
  are resampled with PIL ``NEAREST``, as detectron2's ``apply_segmentation``.
* Boxes are ``[N, 4]`` ``(x0, y0, x1, y1)`` and polygons flat ``[x0, y0, x1, y1, ...]``, both in
  pixels; pixel ``(i, j)`` covers ``[j, j+1) x [i, i+1)``. Coordinates are transformed in float64
  (detectron2 transforms numpy float64 arrays) and the caller casts to float32 at the end.
* Sizes are ``(height, width)``.
* All randomness comes from an explicit ``np.random.Generator``; given the generator state the
  result is deterministic. detectron2 draws from Python's / numpy's global RNG, so only the
  distributions match, never the individual draws (spec ``pointrend.md`` §6).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
from PIL import Image

__all__ = ["resize_shortest_edge_size", "resize_image", "resize_label_map", "scale_boxes",
           "transform_polygons", "hflip_image", "hflip_boxes", "clip_boxes", "nonempty_boxes",
           "random_crop_category_area", "crop_array", "color_aug_ssd", "rgb_to_hsv_opencv",
           "hsv_to_rgb_opencv"]

Size = tuple[int, int]

# ResizeShortestEdge.


def resize_shortest_edge_size(height: int, width: int, short: int, max_size: int) -> Size:
  """Output ``(new_h, new_w)`` of detectron2's ``ResizeShortestEdge.get_output_shape``.

  ``scale = short / min(h, w)``; the short side becomes ``short`` and the long side ``scale *
  long``; if the long side then exceeds ``max_size`` both are scaled by ``max_size / long``;
  finally each side is rounded with ``int(x + 0.5)`` (Python float64 arithmetic throughout).

  Example: ``(480, 640), short 800, max 1333 -> (800, 1067)``.
  """
  if height <= 0 or width <= 0:
    raise ValueError(f"image size must be positive, got {height}x{width} (h x w)")
  if short <= 0:
    raise ValueError(f"short side must be positive, got {short}")
  size = float(short)
  scale = size / min(height, width)
  if height < width:
    new_h, new_w = size, scale * width
  else:
    new_h, new_w = scale * height, size
  if max(new_h, new_w) > max_size:
    scale = max_size * 1.0 / max(new_h, new_w)
    new_h = new_h * scale
    new_w = new_w * scale
  return int(new_h + 0.5), int(new_w + 0.5)


def _pil_resize(array: np.ndarray, size: Size, resample: int) -> np.ndarray:
  """detectron2's ``ResizeTransform.apply_image`` for uint8 arrays ``[H, W]`` or ``[H, W, 3]``."""
  if array.dtype != np.uint8:
    raise TypeError(f"PIL resizing needs uint8, got {array.dtype}")
  new_h, new_w = size
  # PIL returns an exact copy when the size is unchanged, so no special case is needed.
  return np.asarray(Image.fromarray(array).resize((new_w, new_h), resample))


def resize_image(image: np.ndarray, size: Size) -> np.ndarray:
  """Resizes a uint8 image ``[H, W, 3]`` to ``size = (new_h, new_w)`` with PIL ``BILINEAR``.

  PIL's bilinear filter widens its support when downscaling (antialiasing), as in detectron2.
  """
  return _pil_resize(image, size, Image.BILINEAR)


def resize_label_map(label_map: np.ndarray, size: Size) -> np.ndarray:
  """Resizes a uint8 label map ``[H, W]`` to ``size`` with PIL ``NEAREST``."""
  return _pil_resize(label_map, size, Image.NEAREST)


def scale_boxes(boxes: np.ndarray, scale_x: float, scale_y: float) -> np.ndarray:
  """``x *= scale_x``, ``y *= scale_y`` on ``[N, 4]`` xyxy boxes; float64 result."""
  return np.asarray(boxes, np.float64).reshape(-1, 4) * (scale_x, scale_y, scale_x, scale_y)


def transform_polygons(polygons: Sequence[Sequence[float]],
                       scale_x: float,
                       scale_y: float,
                       flip_width: int | None = None) -> list[np.ndarray]:
  """Scales flat ``[x0, y0, x1, y1, ...]`` polygons (``x *= scale_x``, ``y *= scale_y``), then
  with ``flip_width`` flips them horizontally (``x -> flip_width - x``); float64 results."""
  out = []
  for poly in polygons:
    p = np.asarray(poly, np.float64).reshape(-1, 2) * (scale_x, scale_y)
    if flip_width is not None:
      p[:, 0] = flip_width - p[:, 0]
    out.append(p.reshape(-1))
  return out


# Horizontal flip.


def hflip_image(image: np.ndarray) -> np.ndarray:
  """``image[:, ::-1]`` (contiguous copy) of an image ``[H, W, 3]``, a label map or a mask."""
  return np.ascontiguousarray(image[:, ::-1])


def hflip_boxes(boxes: np.ndarray, width: int) -> np.ndarray:
  """Boxes of the flipped image: ``x -> width - x`` on the corners, then min/max; float64."""
  b = np.asarray(boxes, np.float64).reshape(-1, 4)
  out = b.copy()
  out[:, 0] = width - b[:, 2]
  out[:, 2] = width - b[:, 0]
  return out


def clip_boxes(boxes: np.ndarray, size: Size) -> np.ndarray:
  """Clips ``[N, 4]`` xyxy boxes to ``[0, W] x [0, H]`` (detectron2: ``clip(min=0)``, then
  ``minimum(box, [W, H, W, H])``)."""
  h, w = size
  b = np.asarray(boxes, np.float64).reshape(-1, 4)
  return np.minimum(np.maximum(b, 0.0), np.array([w, h, w, h], np.float64))


def nonempty_boxes(boxes: np.ndarray, threshold: float = 1e-5) -> np.ndarray:
  """``bool [N]``: width and height both ``> threshold`` (detectron2 ``Boxes.nonempty``)."""
  b = np.asarray(boxes).reshape(-1, 4)
  return ((b[:, 2] - b[:, 0]) > threshold) & ((b[:, 3] - b[:, 1]) > threshold)


# Semantic crop with a category-area constraint (RandomCrop_CategoryAreaConstraint).


def random_crop_category_area(sem_seg: np.ndarray,
                              crop_size: Size,
                              rng: np.random.Generator,
                              single_category_max_area: float = 0.75,
                              ignore_value: int | None = 255,
                              max_tries: int = 10) -> tuple[int, int, int, int]:
  """Chooses an "absolute" crop window as detectron2's ``RandomCrop_CategoryAreaConstraint``.

  The crop has size ``(min(crop_h, H), min(crop_w, W))``. Up to ``max_tries`` top-left corners
  are drawn uniformly; a crop is accepted when its non-ignored pixels hold more than one label
  and the most frequent label covers less than ``single_category_max_area`` of them. After
  ``max_tries`` rejections the last drawn crop is used. With ``single_category_max_area >= 1``
  the first draw is used (a plain random crop).

  Args:
    sem_seg: ``uint8 [H, W]`` label map.
    crop_size: ``(crop_h, crop_w)`` in pixels (absolute crop type).
    single_category_max_area: the constraint's area ratio (Cityscapes: 0.75).
    ignore_value: label excluded from the counts (None: count every label).
    max_tries: number of draws (detectron2: 10).

  Returns:
    ``(y0, x0, crop_h, crop_w)``; apply with :func:`crop_array`.
  """
  h, w = sem_seg.shape[:2]
  ch, cw = min(int(crop_size[0]), h), min(int(crop_size[1]), w)
  if ch <= 0 or cw <= 0:
    raise ValueError(f"crop size must be positive, got {crop_size}")
  tries = 1 if single_category_max_area >= 1.0 else max_tries
  y0 = x0 = 0
  for _ in range(tries):
    y0 = int(rng.integers(0, h - ch + 1))
    x0 = int(rng.integers(0, w - cw + 1))
    if single_category_max_area >= 1.0:
      break
    labels, counts = np.unique(sem_seg[y0:y0 + ch, x0:x0 + cw], return_counts=True)
    if ignore_value is not None:
      counts = counts[labels != ignore_value]
    if len(counts) > 1 and np.max(counts) < np.sum(counts) * single_category_max_area:
      break
  return y0, x0, ch, cw


def crop_array(array: np.ndarray, window: tuple[int, int, int, int]) -> np.ndarray:
  """``array[y0:y0+h, x0:x0+w]`` (leading two axes) as a contiguous copy."""
  y0, x0, h, w = window
  return np.ascontiguousarray(array[y0:y0 + h, x0:x0 + w])


# ColorAugSSDTransform and OpenCV's uint8 HSV conversions.

_HSV_SHIFT = 12
_HSV_ROUND = 1 << (_HSV_SHIFT - 1)


def _saturate_round(x: np.ndarray) -> np.ndarray:
  """OpenCV ``saturate_cast<int>(double)``: round half to even (``cvRound``)."""
  return np.rint(x).astype(np.int64)


# OpenCV's fixed-point reciprocal tables (``RGB2HSV_b``, hrange 180), index = divisor 0..255.
_I = np.arange(1, 256, dtype=np.float64)
_SDIV_TABLE = np.concatenate([[0], _saturate_round((255 << _HSV_SHIFT) / _I)])
_HDIV_TABLE_180 = np.concatenate([[0], _saturate_round((180 << _HSV_SHIFT) / (6.0 * _I))])
del _I
# HSV2RGB sector -> which of (v, p, q, t) lands in (b, g, r); OpenCV's ``sector_data``.
_SECTOR_BGR = np.array([[1, 3, 0], [1, 0, 2], [3, 0, 1], [0, 2, 1], [0, 1, 3], [2, 1, 0]])


def rgb_to_hsv_opencv(rgb: np.ndarray) -> np.ndarray:
  """``cv2.cvtColor(rgb[..., ::-1], cv2.COLOR_BGR2HSV)`` for uint8 images, in numpy.

  Integer fixed-point arithmetic of OpenCV's ``RGB2HSV_b`` (hue range 180): ``V = max``,
  ``S = round(255 (V - min) / V)`` and ``H = round(30 * sector offset / (V - min))`` via the
  same 12-bit reciprocal tables and rounding, so the result is bit-exact with OpenCV's scalar
  and SIMD paths (they share the tables). Returns ``uint8 [..., 3]`` (H in 0..179, S, V in 0..255).
  """
  if rgb.dtype != np.uint8 or rgb.shape[-1] != 3:
    raise ValueError(f"need uint8 [..., 3], got {rgb.dtype} {rgb.shape}")
  c = rgb.astype(np.int64)
  r, g, b = c[..., 0], c[..., 1], c[..., 2]
  v = np.maximum(np.maximum(b, g), r)
  vmin = np.minimum(np.minimum(b, g), r)
  diff = v - vmin
  s = (diff * _SDIV_TABLE[v] + _HSV_ROUND) >> _HSV_SHIFT
  # Sector offsets exactly as OpenCV selects them: max == r first, then max == g.
  h = np.where(v == r, g - b, np.where(v == g, b - r + 2 * diff, r - g + 4 * diff))
  h = (h * _HDIV_TABLE_180[diff] + _HSV_ROUND) >> _HSV_SHIFT  # Arithmetic shift, as in C.
  h = np.where(h < 0, h + 180, h)
  return np.stack([h, s, v], axis=-1).astype(np.uint8)


def hsv_to_rgb_opencv(hsv: np.ndarray) -> np.ndarray:
  """``cv2.cvtColor(hsv, cv2.COLOR_HSV2BGR)[..., ::-1]`` for uint8 images, in numpy.

  OpenCV's ``HSV2RGB_b`` works in float32: ``h * (6/180)``, ``s / 255``, ``v / 255``, sector
  ``floor(h)``, the four candidates ``v, v(1-s), v(1-s f), v(1-s(1-f))`` and
  ``saturate_cast<uchar>(x * 255)`` (round half to even). This reproduces those float32
  operations one by one. Deviation: a compiler may fuse some of OpenCV's multiply-adds (FMA),
  which can change a product in its last bit and, in rare ties, an output by 1. ``hsv`` has H in
  0..179.
  """
  if hsv.dtype != np.uint8 or hsv.shape[-1] != 3:
    raise ValueError(f"need uint8 [..., 3], got {hsv.dtype} {hsv.shape}")
  f32 = np.float32
  h = hsv[..., 0].astype(f32)
  s = hsv[..., 1].astype(f32) * f32(1.0 / 255.0)
  v = hsv[..., 2].astype(f32) * f32(1.0 / 255.0)
  h = h * f32(6.0 / 180.0)
  h = np.fmod(h, f32(6.0))
  sector = np.floor(h).astype(np.int64)
  h = h - sector.astype(f32)
  bad = (sector < 0) | (sector >= 6)
  sector = np.where(bad, 0, sector)
  h = np.where(bad, f32(0.0), h)
  one = f32(1.0)
  tab = np.stack([v, v * (one - s), v * (one - s * h), v * (one - s * (one - h))], axis=-1)
  idx = _SECTOR_BGR[sector]  # [..., 3] -> (b, g, r) candidates.
  bgr = np.take_along_axis(tab, idx, axis=-1)
  gray = (s == 0)[..., None]
  bgr = np.where(gray, v[..., None], bgr)
  out = np.clip(np.rint(bgr * f32(255.0)), 0, 255).astype(np.uint8)
  return np.ascontiguousarray(out[..., ::-1])


def _convert(x: np.ndarray, alpha: float = 1.0, beta: float = 0.0) -> np.ndarray:
  """detectron2's ``convert``: float32 ``x * alpha + beta``, clip to [0, 255], truncate."""
  y = x.astype(np.float32) * np.float32(alpha) + np.float32(beta)
  return np.clip(y, 0, 255).astype(np.uint8)


def color_aug_ssd(image: np.ndarray,
                  rng: np.random.Generator,
                  brightness_delta: float = 32.0,
                  contrast_range: tuple[float, float] = (0.5, 1.5),
                  saturation_range: tuple[float, float] = (0.5, 1.5),
                  hue_delta: int = 18) -> np.ndarray:
  """PointRend's ``ColorAugSSDTransform`` (spec §15.6) on a uint8 RGB image ``[H, W, 3]``.

  1. brightness w.p. 0.5: ``+ U(-32, 32)``, clip to 0..255, truncate to uint8;
  2. w.p. 0.5 the order ``contrast, saturation, hue``, else ``saturation, hue, contrast``; each
     applied w.p. 0.5: contrast ``* U(0.5, 1.5)``; saturation: OpenCV HSV, ``S * U(0.5, 1.5)``
     (clip, truncate), back to RGB; hue: ``(H + randint[-18, 18]) mod 180``, back to RGB.

  The order of the random draws follows detectron2's (coin, then value, per step).
  """
  img = image
  if rng.integers(2):
    img = _convert(img, beta=rng.uniform(-brightness_delta, brightness_delta))

  def contrast(x):
    return _convert(x, alpha=rng.uniform(*contrast_range)) if rng.integers(2) else x

  def saturation(x):
    if rng.integers(2):
      hsv = rgb_to_hsv_opencv(x)
      hsv[..., 1] = _convert(hsv[..., 1], alpha=rng.uniform(*saturation_range))
      return hsv_to_rgb_opencv(hsv)
    return x

  def hue(x):
    if rng.integers(2):
      hsv = rgb_to_hsv_opencv(x)
      shift = int(rng.integers(-hue_delta, hue_delta + 1))
      hsv[..., 0] = (hsv[..., 0].astype(np.int64) + shift) % 180
      return hsv_to_rgb_opencv(hsv)
    return x

  if rng.integers(2):
    img = hue(saturation(contrast(img)))
  else:
    img = contrast(hue(saturation(img)))
  return img if img is not image else img.copy()
