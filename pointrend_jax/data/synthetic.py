"""A deterministic synthetic instance + semantic segmentation dataset ("shapes").

Each image is a textured background with a few textured shapes of five classes whose boundaries
are smooth curves defined analytically:

| class (COCO id)     | contig. | label | inside test in the shape's frame (u, v)         |
| ------------------- | ------- | ----- | ----------------------------------------------- |
| ellipse (2)         | 0       | 1     | (u/a)^2 + (v/b)^2 < 1                           |
| flower (3)          | 1       | 2     | rho < r0 (1 + amp cos(k phi)), k = 4..7 petals  |
| ring (7)            | 2       | 3     | q^2 < (u/a)^2 + (v/b)^2 < 1 (has a hole)        |
| rounded_square (11) | 3       | 4     | abs(u/a)^n + abs(v/b)^n < 1, n in [3, 6]        |
| crescent (13)       | 4       | 5     | u^2 + v^2 < r^2 and (u - d)^2 + v^2 >= r2^2     |

COCO category ids are deliberately non-contiguous and listed unsorted in the JSON so that the
id -> contiguous mapping (sorted ids, as detectron2) is exercised. Semantic labels are
``0 = background, 1..5 = contiguous id + 1``; ``255`` is reserved for "ignore" and not produced.

Exactness: a pixel ``(i, j)`` belongs to a shape iff its centre ``(x, y) = (j + 0.5, i + 0.5)``
satisfies the predicate above, evaluated in float64 from the parameters stored in the JSON (the
image entry's ``"shapes"`` list). Shapes are painted in list order, so later shapes occlude
earlier ones; each stored instance mask is the *visible* part, and instances whose visible area
falls below ``min_visible_area`` pixels are dropped (their pixels keep their class in the
semantic map). Because image, semantic map and instance masks are all painted from the same
boolean masks, they agree pixel for pixel.

Annotation formats (all three kinds COCO uses):
* compressed RLE (pycocotools) for most instances;
* polygons: an ellipse, flower or rounded square lying fully inside the image is, with
  probability ``polygon_fraction``, defined by a dense polygon of its boundary (the shape's
  ``"polygon"`` entry, 2 decimals): its pixels are pycocotools' rasterization of that polygon
  (what a COCO loader decodes), not the analytic predicate. It is annotated with the polygon
  if it stays fully visible, else with the compressed RLE of its visible part;
* uncompressed RLE for "crowd" annotations (``iscrowd = 1``): in some images a cluster of tiny
  ellipses of one class is annotated as a single crowd region, as in COCO.

Randomness for image ``index`` of a split comes from ``SeedSequence([seed, split, index])``, so
an image does not depend on how many images the split has.

Layout written by :func:`ensure_synthetic_dataset` (all paths under ``root``)::

  manifest.json                      # parameters + generator version (completion marker)
  annotations/instances_{split}.json # COCO format
  images/{split}/{image_id:06d}.png  # RGB uint8
  sem_seg/{split}/{image_id:06d}.png # L uint8 labels as above
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import pathlib
import shutil
import tempfile
from typing import Any, Mapping

import numpy as np
from PIL import Image
import pycocotools.mask as mask_util

from pointrend_jax.data import coco

# Bump when the generated content changes for the same parameters; part of the cache key.
GENERATOR_VERSION = 1

# (COCO id, name) in the order of the JSON "categories" list. Sorted ids give contiguous ids.
_CATEGORIES_JSON_ORDER = ((7, "ring"), (2, "ellipse"), (13, "crescent"), (3, "flower"),
                          (11, "rounded_square"))
CATEGORIES: tuple[dict[str, Any], ...] = tuple(
    {"id": i, "name": n, "supercategory": "shape"} for i, n in sorted(_CATEGORIES_JSON_ORDER))
THING_CLASSES: tuple[str, ...] = tuple(c["name"] for c in CATEGORIES)
SEM_SEG_CLASSES: tuple[str, ...] = ("background",) + THING_CLASSES
SPLITS = ("train", "val")

_KINDS = THING_CLASSES  # Shape kind == class name.
_POLYGON_KINDS = ("ellipse", "flower", "rounded_square")  # Simply connected, polar boundary.


@dataclasses.dataclass(frozen=True)
class SyntheticConfig:
  """Generator parameters; every field is part of the cache key.

  Attributes:
    image_size: (min, max) side length in pixels; height and width are drawn independently and
      uniformly from this closed range (equal values give fixed square images).
    min_shapes, max_shapes: shapes per image (before dropping occluded ones).
    min_visible_area: instances with fewer visible pixels are not annotated.
    polygon_fraction: probability that an eligible shape is defined (and, if fully visible,
      annotated) by a polygon.
    crowd_probability: probability that an image contains one crowd cluster.
    noise_sigma: standard deviation of the per-pixel Gaussian noise (in 0..255 units).
  """
  image_size: tuple[int, int] = (128, 192)
  min_shapes: int = 2
  max_shapes: int = 7
  min_visible_area: int = 24
  polygon_fraction: float = 0.3
  crowd_probability: float = 0.15
  noise_sigma: float = 3.0

  def __post_init__(self):
    lo, hi = self.image_size
    if not 32 <= lo <= hi:
      raise ValueError(
          f"image_size must be (min, max) with 32 <= min <= max, got {self.image_size}")
    if not 1 <= self.min_shapes <= self.max_shapes:
      raise ValueError(f"need 1 <= min_shapes <= max_shapes, got {self.min_shapes}, "
                       f"{self.max_shapes}")


@dataclasses.dataclass(frozen=True)
class SyntheticSample:
  """One generated image and its labels (what is written to disk for it).

  Attributes:
    image: uint8 [H, W, 3] RGB.
    sem_seg: uint8 [H, W]; 0 background, 1..K = contiguous class id + 1.
    annotations: COCO annotation dicts without ``id``/``image_id`` (assigned when writing).
    shapes: the painted items in z-order (JSON-able parameters; see the module docstring),
      each with ``"annotation_index"`` into ``annotations`` or None if dropped.
  """
  image: np.ndarray
  sem_seg: np.ndarray
  annotations: list[dict[str, Any]]
  shapes: list[dict[str, Any]]


@dataclasses.dataclass(frozen=True)
class SyntheticSplit:
  """Where one split lives on disk."""
  annotations: pathlib.Path  # COCO instances JSON.
  images_dir: pathlib.Path  # The JSON's file_name values are relative to this.
  sem_seg_dir: pathlib.Path  # Same basenames as the images.


@dataclasses.dataclass(frozen=True)
class SyntheticDataset:
  """A generated dataset: its root and its splits (``"train"``, ``"val"``)."""
  root: pathlib.Path
  splits: Mapping[str, SyntheticSplit]


# Shapes: sampling and exact rasterization.


def _local_coords(shape: Mapping[str, Any], xs: np.ndarray,
                  ys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Pixel-centre coordinates in the shape's rotated frame; xs [1, w], ys [h, 1] -> [h, w]."""
  dx = xs - shape["cx"]
  dy = ys - shape["cy"]
  c, s = math.cos(shape["theta"]), math.sin(shape["theta"])
  return c * dx + s * dy, -s * dx + c * dy


def shape_predicate(shape: Mapping[str, Any], xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
  """Evaluates the analytic inside-test of ``shape`` at points (xs, ys) (broadcasting).

  This ignores ``shape["polygon"]``; see :func:`rasterize_shape` for the painted mask.
  """
  kind = shape["kind"]
  if kind == "crowd":
    inside = np.zeros(np.broadcast_shapes(xs.shape, ys.shape), bool)
    for part in shape["parts"]:
      inside |= shape_predicate(part, xs, ys)
    return inside
  u, v = _local_coords(shape, xs, ys)
  if kind == "ellipse":
    return (u / shape["a"])**2 + (v / shape["b"])**2 < 1.0
  if kind == "flower":
    radius = shape["r0"] * (1.0 + shape["amp"] * np.cos(shape["k"] * np.arctan2(v, u)))
    return np.hypot(u, v) < radius
  if kind == "ring":
    s = (u / shape["a"])**2 + (v / shape["b"])**2
    return (s < 1.0) & (s > shape["q"]**2)
  if kind == "rounded_square":
    n = shape["n"]
    return np.abs(u / shape["a"])**n + np.abs(v / shape["b"])**n < 1.0
  if kind == "crescent":
    outer = u**2 + v**2 < shape["r"]**2
    return outer & ((u - shape["d"])**2 + v**2 >= shape["r2"]**2)
  raise ValueError(f"unknown shape kind {kind!r}")


def _bounding_radius(shape: Mapping[str, Any]) -> float:
  kind = shape["kind"]
  if kind == "crowd":
    return max(math.hypot(p["cx"] - shape["cx"], p["cy"] - shape["cy"]) + _bounding_radius(p)
               for p in shape["parts"])
  if kind in ("ellipse", "ring"):
    return max(shape["a"], shape["b"])
  if kind == "flower":
    return shape["r0"] * (1.0 + shape["amp"])
  if kind == "rounded_square":
    return math.hypot(shape["a"], shape["b"])
  return shape["r"]  # crescent


def _polar_boundary(shape: Mapping[str, Any], t: np.ndarray) -> np.ndarray:
  """Boundary radius at local angle ``t`` for the star-shaped kinds."""
  kind = shape["kind"]
  c, s = np.cos(t), np.sin(t)
  if kind == "ellipse":
    return 1.0 / np.sqrt((c / shape["a"])**2 + (s / shape["b"])**2)
  if kind == "flower":
    return shape["r0"] * (1.0 + shape["amp"] * np.cos(shape["k"] * t))
  if kind == "rounded_square":
    n = shape["n"]
    return (np.abs(c / shape["a"])**n + np.abs(s / shape["b"])**n)**(-1.0 / n)
  raise ValueError(f"no polygon for kind {kind!r}")


def shape_polygon(shape: Mapping[str, Any]) -> list[float]:
  """A dense polygon [x0, y0, x1, y1, ...] (2 decimals) tracing a star-shaped boundary."""
  num = int(np.clip(2.0 * math.pi * _bounding_radius(shape) / 1.5, 24, 240))
  t = np.arange(num) * (2.0 * math.pi / num)
  r = _polar_boundary(shape, t)
  lu, lv = r * np.cos(t), r * np.sin(t)
  c, s = math.cos(shape["theta"]), math.sin(shape["theta"])
  x = shape["cx"] + c * lu - s * lv
  y = shape["cy"] + s * lu + c * lv
  return np.round(np.stack([x, y], axis=1).ravel(), 2).tolist()


def _crop_window(shape: Mapping[str, Any], height: int,
                 width: int) -> tuple[int, int, int, int]:
  """Pixel rows/cols [i0, i1) x [j0, j1) containing every pixel centre inside the shape."""
  r = _bounding_radius(shape) + 1.0
  j0 = max(0, int(math.floor(shape["cx"] - r)))
  j1 = min(width, int(math.ceil(shape["cx"] + r)) + 1)
  i0 = max(0, int(math.floor(shape["cy"] - r)))
  i1 = min(height, int(math.ceil(shape["cy"] + r)) + 1)
  return i0, max(i0, i1), j0, max(j0, j1)


def rasterize_shape(shape: Mapping[str, Any], height: int,
                    width: int) -> tuple[np.ndarray, tuple[int, int, int, int]]:
  """The pixels a shape covers (before occlusion), as a crop of the image.

  Returns:
    (mask, (i0, i1, j0, j1)): bool mask [i1 - i0, j1 - j0] of the window rows i0:i1, cols j0:j1.
  """
  if shape.get("polygon"):
    # pycocotools' rasterization, exactly what the COCO loader decodes.
    full = coco.decode_segmentation([shape["polygon"]], height, width)
    return full, (0, height, 0, width)
  i0, i1, j0, j1 = _crop_window(shape, height, width)
  xs = (np.arange(j0, j1, dtype=np.float64) + 0.5)[None, :]
  ys = (np.arange(i0, i1, dtype=np.float64) + 0.5)[:, None]
  return shape_predicate(shape, xs, ys), (i0, i1, j0, j1)


def _sample_shape(rng: np.random.Generator, kind: str, height: int,
                  width: int) -> dict[str, Any]:
  """Draws one shape's parameters (python floats, so that the JSON round trip is exact)."""
  side = min(height, width)
  # Log-uniform size: COCO small (< 32^2), medium and large (> 96^2) areas all occur.
  size = side * math.exp(rng.uniform(math.log(0.07), math.log(0.5)))
  shape: dict[str, Any] = {
      "kind": kind,
      "cx": float(rng.uniform(0.08, 0.92) * width),
      "cy": float(rng.uniform(0.08, 0.92) * height),
      "theta": float(rng.uniform(0.0, math.pi)),
  }
  if kind == "ellipse":
    shape.update(a=size, b=size * float(rng.uniform(0.45, 1.0)))
  elif kind == "flower":
    amp = float(rng.uniform(0.15, 0.32))
    shape.update(r0=size / (1.0 + amp), amp=amp, k=int(rng.integers(4, 8)))
  elif kind == "ring":
    shape.update(a=size, b=size * float(rng.uniform(0.7, 1.0)), q=float(rng.uniform(0.45, 0.7)))
  elif kind == "rounded_square":
    shape.update(a=size * 0.75, b=size * 0.75 * float(rng.uniform(0.6, 1.0)),
                 n=float(rng.uniform(3.0, 6.0)))
  elif kind == "crescent":
    shape.update(r=size, r2=size * float(rng.uniform(0.75, 0.95)),
                 d=size * float(rng.uniform(0.35, 0.6)))
  return {k: float(v) if isinstance(v, float) else v for k, v in shape.items()}


def _sample_crowd(rng: np.random.Generator, height: int, width: int) -> dict[str, Any]:
  """A cluster of 5-9 tiny ellipses of one class, annotated as one crowd region."""
  side = min(height, width)
  cx = float(rng.uniform(0.2, 0.8) * width)
  cy = float(rng.uniform(0.2, 0.8) * height)
  spread = 0.12 * side
  parts = []
  for _ in range(int(rng.integers(5, 10))):
    a = float(rng.uniform(2.5, 5.0))
    parts.append({
        "kind": "ellipse",
        "cx": cx + float(rng.uniform(-spread, spread)),
        "cy": cy + float(rng.uniform(-spread, spread)),
        "theta": float(rng.uniform(0.0, math.pi)),
        "a": a,
        "b": a * float(rng.uniform(0.6, 1.0)),
    })
  return {"kind": "crowd", "class": "ellipse", "cx": cx, "cy": cy, "theta": 0.0, "parts": parts}


# Textures.


def _smooth_noise(rng: np.random.Generator, height: int, width: int, cells: int,
                  channels: int) -> np.ndarray:
  """Bilinearly upsampled N(0, 1) lattice of ``cells`` x ``cells`` cells -> float32 [h, w, c]."""
  grid = rng.standard_normal((cells + 1, cells + 1, channels), dtype=np.float32)
  # Separable bilinear interpolation as two small matrix products.
  ay = _interp_matrix(height, cells)  # [h, cells + 1]
  ax = _interp_matrix(width, cells)  # [w, cells + 1]
  rows = (ay @ grid.reshape(cells + 1, -1)).reshape(height, cells + 1, channels)
  return (rows.transpose(0, 2, 1) @ ax.T).transpose(0, 2, 1)


def _interp_matrix(size: int, cells: int) -> np.ndarray:
  """Weights [size, cells + 1] of linear interpolation at pixel centres over ``cells`` cells."""
  f = (np.arange(size, dtype=np.float32) + 0.5) * (cells / size)
  i = np.minimum(f.astype(np.int64), cells - 1)
  w = f - i
  m = np.zeros((size, cells + 1), np.float32)
  m[np.arange(size), i] = 1.0 - w
  m[np.arange(size), i + 1] = w
  return m


def _random_colour(rng: np.random.Generator) -> np.ndarray:
  return rng.uniform(20.0, 235.0, size=3).astype(np.float32)


def _stripes(rng: np.random.Generator, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
  """Smooth periodic stripes in [-1, 1] at a random angle and period (pixels)."""
  angle = rng.uniform(0.0, math.pi)
  period = rng.uniform(5.0, 24.0)
  phase = rng.uniform(0.0, 2.0 * math.pi)
  freq = np.float32(2.0 * math.pi / period)
  return np.sin((xs * np.float32(math.cos(angle)) + ys * np.float32(math.sin(angle))) * freq +
                np.float32(phase))


def _background(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
  """Gradient + optional stripes + smooth noise; float32 [H, W, 3] in roughly 0..255."""
  xs = (np.arange(width, dtype=np.float32) + 0.5)[None, :]
  ys = (np.arange(height, dtype=np.float32) + 0.5)[:, None]
  c0, c1 = _random_colour(rng), _random_colour(rng)
  angle = rng.uniform(0.0, 2.0 * math.pi)
  t = xs * np.float32(math.cos(angle)) + ys * np.float32(math.sin(angle))
  t = (t - t.min()) / max(float(np.ptp(t)), 1e-6)
  img = c0 + (c1 - c0) * t[..., None]
  if rng.uniform() < 0.5:
    weights = (rng.uniform(15.0, 50.0) * rng.uniform(-1.0, 1.0, size=3)).astype(np.float32)
    img = img + _stripes(rng, xs, ys)[..., None] * weights
  cells = int(rng.integers(3, 9))
  img = img + np.float32(rng.uniform(15.0, 45.0)) * _smooth_noise(rng, height, width, cells, 3)
  return img


def _shape_texture(rng: np.random.Generator, shape: Mapping[str, Any],
                   window: tuple[int, int, int, int]) -> np.ndarray:
  """Base colour + linear shading + a random pattern over the window; float32 [h, w, 3]."""
  i0, i1, j0, j1 = window
  xs = (np.arange(j0, j1, dtype=np.float32) + 0.5)[None, :]
  ys = (np.arange(i0, i1, dtype=np.float32) + 0.5)[:, None]
  colour = _random_colour(rng)
  scale = max(_bounding_radius(shape), 1.0)
  angle = rng.uniform(0.0, 2.0 * math.pi)
  shading = ((xs - np.float32(shape["cx"])) * np.float32(math.cos(angle) / scale) +
             (ys - np.float32(shape["cy"])) * np.float32(math.sin(angle) / scale))
  gain = np.float32(rng.uniform(10.0, 45.0))
  tex = colour + gain * np.clip(shading, -1.5, 1.5)[..., None]
  pattern = rng.integers(0, 3)
  if pattern == 1:
    other = _random_colour(rng)
    mix = np.float32(0.3) * (1.0 + _stripes(rng, xs, ys))[..., None]
    tex = tex * (1.0 - mix) + other * mix
  elif pattern == 2:
    gain = np.float32(rng.uniform(15.0, 35.0))
    tex = tex + gain * _smooth_noise(rng, i1 - i0, j1 - j0, 3, 3)
  return tex


# One image.


def generate_sample(config: SyntheticConfig, seed: int, split: str, index: int) -> SyntheticSample:
  """Generates image ``index`` of ``split`` (pure function of its arguments)."""
  rng = np.random.default_rng(np.random.SeedSequence([seed, SPLITS.index(split), index]))
  lo, hi = config.image_size
  height, width = int(rng.integers(lo, hi + 1)), int(rng.integers(lo, hi + 1))
  image = _background(rng, height, width)
  owner = np.full((height, width), -1, np.int16)

  shapes: list[dict[str, Any]] = []
  num = int(rng.integers(config.min_shapes, config.max_shapes + 1))
  crowd_at = int(rng.integers(0, num + 1)) if rng.uniform() < config.crowd_probability else -1
  for k in range(num + (crowd_at >= 0)):
    if k == crowd_at:
      shape = _sample_crowd(rng, height, width)
    else:
      shape = _sample_shape(rng, _KINDS[int(rng.integers(len(_KINDS)))], height, width)
      r = _bounding_radius(shape)
      inside = (r + 1.0 <= shape["cx"] <= width - r - 1.0 and
                r + 1.0 <= shape["cy"] <= height - r - 1.0)
      wants_polygon = rng.uniform() < config.polygon_fraction
      if shape["kind"] in _POLYGON_KINDS and inside and wants_polygon:
        shape["polygon"] = shape_polygon(shape)
    mask, window = rasterize_shape(shape, height, width)
    i0, i1, j0, j1 = window
    tex = _shape_texture(rng, shape, window)
    region = image[i0:i1, j0:j1]
    region[mask] = tex[mask]
    owner[i0:i1, j0:j1][mask] = k
    shape["area_full"] = int(mask.sum())
    shapes.append(shape)

  image += rng.standard_normal(image.shape, dtype=np.float32) * np.float32(config.noise_sigma)
  image_u8 = np.clip(np.rint(image), 0, 255).astype(np.uint8)

  sem_seg = np.zeros((height, width), np.uint8)
  annotations: list[dict[str, Any]] = []
  for k, shape in enumerate(shapes):
    visible = owner == k
    area = int(visible.sum())
    class_name = shape.get("class", shape["kind"])
    contiguous = THING_CLASSES.index(class_name)
    sem_seg[visible] = contiguous + 1
    shape["annotation_index"] = None
    if area < config.min_visible_area:
      continue
    is_crowd = shape["kind"] == "crowd"
    rle = mask_util.encode(np.asfortranarray(visible.astype(np.uint8)))
    bbox = [float(x) for x in mask_util.toBbox(rle)]
    if is_crowd:
      segmentation: Any = _uncompressed_rle(visible)
    elif "polygon" in shape and area == shape["area_full"]:
      segmentation = [shape["polygon"]]
    else:
      segmentation = {"size": [height, width], "counts": rle["counts"].decode("ascii")}
    shape["annotation_index"] = len(annotations)
    annotations.append({
        "category_id": CATEGORIES[contiguous]["id"],
        "bbox": bbox,
        "area": area,
        "iscrowd": int(is_crowd),
        "segmentation": segmentation,
    })
  return SyntheticSample(image_u8, sem_seg, annotations, shapes)


def _uncompressed_rle(mask: np.ndarray) -> dict[str, Any]:
  """COCO's uncompressed RLE (column-major run lengths, starting with a run of zeros)."""
  flat = mask.ravel(order="F").astype(np.int8)
  change = np.flatnonzero(np.diff(flat)) + 1
  bounds = np.concatenate([[0], change, [flat.size]])
  counts = np.diff(bounds).tolist()
  if flat.size and flat[0]:
    counts = [0] + counts
  return {"size": [int(mask.shape[0]), int(mask.shape[1])], "counts": counts}


# On disk.


def _dataset(root: pathlib.Path) -> SyntheticDataset:
  return SyntheticDataset(root=root, splits={
      s: SyntheticSplit(annotations=root / "annotations" / f"instances_{s}.json",
                        images_dir=root / "images" / s, sem_seg_dir=root / "sem_seg" / s)
      for s in SPLITS})


def _write_png(path: pathlib.Path, array: np.ndarray) -> None:
  # Fast zlib level: the files are a cache; level does not affect determinism.
  Image.fromarray(array).save(path, format="PNG", compress_level=1)


def _write_split(root: pathlib.Path, split: str, count: int, config: SyntheticConfig,
                 seed: int) -> None:
  images_dir = root / "images" / split
  sem_dir = root / "sem_seg" / split
  images_dir.mkdir(parents=True)
  sem_dir.mkdir(parents=True)
  images, annotations = [], []
  for index in range(count):
    sample = generate_sample(config, seed, split, index)
    image_id = index + 1
    file_name = f"{image_id:06d}.png"
    _write_png(images_dir / file_name, sample.image)
    _write_png(sem_dir / file_name, sample.sem_seg)
    first_id = len(annotations) + 1
    for ann in sample.annotations:
      annotations.append({"id": len(annotations) + 1, "image_id": image_id, **ann})
    shapes = []
    for shape in sample.shapes:
      shape = dict(shape)
      index_in_image = shape.pop("annotation_index")
      shape["annotation_id"] = None if index_in_image is None else first_id + index_in_image
      shapes.append(shape)
    images.append({
        "id": image_id,
        "file_name": file_name,
        "height": int(sample.image.shape[0]),
        "width": int(sample.image.shape[1]),
        "sem_seg_file_name": file_name,
        "shapes": shapes,
    })
  coco = {
      "info": {"description": "pointrend-jax synthetic shapes", "version": str(GENERATOR_VERSION)},
      "licenses": [],
      "images": images,
      "annotations": annotations,
      "categories": [{"id": i, "name": n, "supercategory": "shape"}
                     for i, n in _CATEGORIES_JSON_ORDER],
  }
  with open(root / "annotations" / f"instances_{split}.json", "w") as f:
    f.write(json.dumps(coco, separators=(",", ":")))  # dumps uses the C encoder; dump does not.


def ensure_synthetic_dataset(cache_dir: str | os.PathLike[str],
                             num_train: int = 400,
                             num_val: int = 100,
                             image_size: tuple[int, int] = (128, 192),
                             seed: int = 0,
                             config: SyntheticConfig | None = None) -> SyntheticDataset:
  """Returns the dataset for these parameters, generating it under ``cache_dir`` if needed.

  The dataset lives in ``cache_dir/shapes-<hash>`` where the hash covers every parameter and
  :data:`GENERATOR_VERSION`, so changed parameters get a fresh directory. It is built in a
  temporary sibling directory and renamed into place when complete, so a reader never sees a
  partial dataset; concurrent callers each build and the first rename wins.

  Args:
    cache_dir: parent directory of the cache (created if missing).
    num_train, num_val: images in the train and val splits.
    image_size: (min, max) image side; overrides ``config.image_size``.
    seed: base seed.
    config: other generator parameters (defaults: :class:`SyntheticConfig`).
  """
  if num_train < 0 or num_val < 0:
    raise ValueError(f"image counts must be >= 0, got {num_train}, {num_val}")
  config = dataclasses.replace(config or SyntheticConfig(), image_size=tuple(image_size))
  counts = {"train": num_train, "val": num_val}
  params = {"generator_version": GENERATOR_VERSION, "config": dataclasses.asdict(config),
            "num_images": counts, "seed": seed}
  key = hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:16]
  cache_dir = pathlib.Path(cache_dir)
  root = cache_dir / f"shapes-{key}"
  if _is_complete(root, params):
    return _dataset(root)

  cache_dir.mkdir(parents=True, exist_ok=True)
  tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".tmp-shapes-{key}-", dir=cache_dir))
  try:
    (tmp / "annotations").mkdir()
    for split in SPLITS:
      _write_split(tmp, split, counts[split], config, seed)
    with open(tmp / "manifest.json", "w") as f:
      json.dump(params, f, indent=2, sort_keys=True)
    try:
      os.rename(tmp, root)
    except OSError:
      # Someone else finished first (or a stale, incomplete directory is in the way).
      if not _is_complete(root, params):
        shutil.rmtree(root, ignore_errors=True)
        os.rename(tmp, root)
  finally:
    if tmp.exists():
      shutil.rmtree(tmp, ignore_errors=True)
  return _dataset(root)


def _is_complete(root: pathlib.Path, params: Mapping[str, Any]) -> bool:
  try:
    with open(root / "manifest.json") as f:
      return json.load(f) == json.loads(json.dumps(params))
  except (OSError, ValueError):
    return False


def load_synthetic_records(dataset: SyntheticDataset, split: str) -> list[dict[str, Any]]:
  """The split as :func:`pointrend_jax.data.coco.load_coco_dataset` records plus
  ``sem_seg_file_name`` (absolute path of the semantic label PNG)."""
  s = dataset.splits[split]
  records = coco.load_coco_dataset(s.annotations, s.images_dir).records
  for record in records:
    record["sem_seg_file_name"] = str(s.sem_seg_dir / os.path.basename(record["file_name"]))
  return records
