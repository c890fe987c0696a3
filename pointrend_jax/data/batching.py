"""Static-shape batches: per-image examples -> a dict of fixed-shape numpy arrays.

A **Batch** is the only thing that crosses into jitted code. Every array has a shape fixed by
``(batch_size, bucket_hw, max_instances)`` so that one compiled step serves every batch of a
bucket. Padding is zero / invalid; consumers mask with the validity arrays.

| key               | shape / dtype               | meaning                                    |
| ----------------- | --------------------------- | ------------------------------------------ |
| image             | [B, Hb, Wb, 3] uint8        | RGB, top-left aligned; 0 outside the image |
| image_size        | [B, 2] int32                | valid (h, w) after resize (and crop)       |
| orig_size         | [B, 2] int32                | (height, width) of the record              |
| image_id          | [B] int32                   | record image_id (-1: not an int / padding) |
| record_index      | [B] int32                   | index into the loader's records (-1: pad)  |
| valid             | [B] bool                    | False for padding images (eval pass end)   |
| gt_boxes          | [B, M, 4] float32           | xyxy pixels of the resized image           |
| gt_classes        | [B, M] int32                | contiguous ids 0..K-1 (0 in padding)       |
| gt_valid          | [B, M] bool                 | real instances                             |
| gt_masks_packed   | [B, M, Hb, Wb // 8] uint8   | full-image bitmasks, bit-packed along W    |
| gt_masks          | [B, M, Hb, Wb] uint8        | same, unpacked (mask_format="dense")       |
| sem_seg           | [B, Hb, Wb] uint8           | labels, 255 = ignore and outside the image |

Instance keys appear with ``instance_targets`` (one of the two mask keys when masks are on),
``sem_seg`` with ``semantic_targets``. Padding images have ``image_size = orig_size =
(Hb, Wb)`` (a finite, harmless size), no instances and an all-ignore ``sem_seg``.

Images are padded with 0 in **uint8**: detectron2 pads with 0 *after* normalisation, so the
model must set pixels outside ``image_size`` to 0 after subtracting the mean. Semantic labels
are padded with 255 (detectron2 pads targets with the ignore value).

Mask targets: PointRend's point labels and 7x7 ROIAlign target both sample the *full-image*
bitmask of each matched GT, so that bitmask is shipped at the padded canvas, bit-packed along W
(``np.packbits``, big-endian bit order): pixel ``(i, j)`` of instance ``m`` is
``(packed[b, m, i, j >> 3] >> (7 - (j & 7))) & 1``; ``jnp.unpackbits(packed, axis=-1)``
unpacks it on device. Exact and 8x smaller than uint8; why not box-cropped masks (measured by
``bench/data.py``): ``docs/data.md``.

Geometry for consumers: the canvas has the same origin as the image, so a point at image pixel
``(X, Y)`` reads mask position ``(X - 0.5, Y - 0.5)`` exactly as detectron2 (normalising by the
unpadded size and multiplying back is the identity); mask pixels outside ``image_size`` are 0,
which is what detectron2's zero padding gives for taps outside the image. **ROIAlign of the
7x7 target clamps at the unpadded image** (``y`` in ``(h-1, h]`` reads row ``h-1``): use
``image_size``, not the canvas size, as the map size there, otherwise rows/columns next to the
bottom/right image border are interpolated with the zero padding instead of replicated.

Instance cap. ``max_instances`` (M, default 100) slots per image. detectron2 keeps every
instance; an image with more than M keeps the M with the largest mask area (box area without
masks; ties: first in annotation order), in their original order, and a warning with a running
count is logged. COCO images rarely come close to 100 non-crowd instances.
"""

from __future__ import annotations

import logging
import math
import threading
from typing import Any, Mapping, Sequence

import numpy as np

logger = logging.getLogger(__name__)

__all__ = ["Batch", "Example", "IGNORE_LABEL", "SIZE_DIVISIBILITY", "MASK_FORMATS", "ceil_to",
           "bucket_sizes", "choose_bucket", "select_instances", "pack_masks", "unpack_masks",
           "make_batch", "compact_example", "batch_nbytes"]

Batch = dict[str, np.ndarray]
# One transformed image (what the pipeline's mapper returns), variable sizes:
#   image uint8 [h, w, 3]; image_size (h, w); orig_size (H, W); image_id; record_index;
#   gt_boxes float32 [N, 4]; gt_classes int [N]; gt_masks bool [N, h, w] or
#   gt_masks_packed uint8 [N, h, ceil(w / 8)] (see compact_example; optional);
#   sem_seg uint8 [h, w] (optional).
Example = dict[str, Any]
Size = tuple[int, int]

IGNORE_LABEL = 255
SIZE_DIVISIBILITY = 32
MASK_FORMATS = ("packed", "dense", "none")

# Long/short ratios of the intermediate bucket sides: 4:3 and 3:2 are COCO's two most common
# photo shapes (640x480, 640x427), so most images fit a bucket without a long tail of padding.
DEFAULT_LONG_RATIOS = (1.0, 4.0 / 3.0, 1.5)

_truncation_lock = threading.Lock()
_truncations = 0


def ceil_to(x: int, divisor: int) -> int:
  """Smallest multiple of ``divisor`` that is ``>= x``."""
  return -(-int(x) // divisor) * divisor


def bucket_sizes(short_sizes: int | Sequence[int],
                 max_size: int,
                 divisibility: int = SIZE_DIVISIBILITY,
                 long_ratios: Sequence[float] = DEFAULT_LONG_RATIOS) -> tuple[Size, ...]:
  """The fixed list of padded canvases ``(Hb, Wb)`` for a ResizeShortestEdge configuration.

  With ``S = ceil(min(max(short_sizes), max_size))`` and ``L = ceil(max_size)`` (ceil to
  ``divisibility``), the long sides are ``ceil(S * r)`` for ``r`` in ``long_ratios`` (kept if
  ``< L``) plus ``L``; each gives a landscape ``(S, l)`` and a portrait ``(l, S)`` bucket (one
  square bucket). Every resized image fits one: its short side is at most ``S`` and its long
  side at most ``max_size``. One compiled step per bucket, e.g. COCO (short <= 800, max 1333):
  ``800x800, 800x1088, 1088x800, 800x1216, 1216x800, 800x1344, 1344x800`` = 7 compilations;
  Cityscapes (1024, 2048): ``1024x1024, 1024x1376, 1376x1024, 1024x1536, 1536x1024,
  1024x2048, 2048x1024``.

  Returns:
    Buckets sorted by area, then height.
  """
  shorts = [short_sizes] if isinstance(short_sizes, int) else list(short_sizes)
  if not shorts or min(shorts) <= 0 or max_size <= 0:
    raise ValueError(f"invalid sizes: short {short_sizes}, max {max_size}")
  s = ceil_to(min(max(shorts), max_size), divisibility)
  l_max = ceil_to(max_size, divisibility)
  longs = {ceil_to(math.ceil(s * r - 1e-9), divisibility) for r in long_ratios}
  longs = sorted({l for l in longs if s <= l < l_max} | {l_max})
  buckets = {(s, l) for l in longs} | {(l, s) for l in longs}
  return tuple(sorted(buckets, key=lambda b: (b[0] * b[1], b[0])))


def choose_bucket(height: int, width: int, buckets: Sequence[Size]) -> Size:
  """The smallest-area bucket holding an ``height x width`` image (ties: first in the list)."""
  best = None
  for b in buckets:
    if b[0] >= height and b[1] >= width and (best is None or b[0] * b[1] < best[0] * best[1]):
      best = tuple(b)
  if best is None:
    raise ValueError(f"no bucket holds a {height}x{width} (h x w) image; buckets: {list(buckets)}")
  return best


def select_instances(areas: np.ndarray, max_instances: int) -> np.ndarray:
  """Indices of the instances to keep: all if ``<= max_instances``, else the largest areas.

  Ties keep the earlier instance; the returned indices are ascending (annotation order).
  """
  n = len(areas)
  if n <= max_instances:
    return np.arange(n)
  order = np.argsort(-np.asarray(areas, np.float64), kind="stable")
  return np.sort(order[:max_instances])


def pack_masks(masks: np.ndarray) -> np.ndarray:
  """bool ``[..., H, W]`` -> uint8 ``[..., H, ceil(W / 8)]`` (big-endian bits along W)."""
  return np.packbits(np.asarray(masks, bool), axis=-1)


def unpack_masks(packed: np.ndarray, width: int) -> np.ndarray:
  """Inverse of :func:`pack_masks`: uint8 ``[..., H, Wp]`` -> bool ``[..., H, width]``."""
  return np.unpackbits(packed, axis=-1, count=width).astype(bool)


def _note_truncation(example: Example, kept: int, total: int) -> None:
  global _truncations
  with _truncation_lock:
    _truncations += 1
    count = _truncations
  logger.warning(
      "image id %s (record %s): %d instances > max_instances=%d; kept the %d largest "
      "(truncated images so far in this process: %d)", example.get("image_id"),
      example.get("record_index"), total, kept, kept, count)


def _int32_id(value: Any) -> int:
  if isinstance(value, (int, np.integer)) and -2**31 <= int(value) < 2**31:
    return int(value)
  return -1


def _packed_masks(ex: Example, i: int, n: int, h: int, w: int, mask_format: str) -> np.ndarray:
  """An example's masks (either form) bit-packed at its size: uint8 ``[n, h, ceil(w / 8)]``."""
  masks, packed = ex.get("gt_masks"), ex.get("gt_masks_packed")
  if masks is not None:
    if masks.shape != (n, h, w):
      raise ValueError(f"example {i}: gt_masks {masks.shape} != ({n}, {h}, {w})")
    return pack_masks(masks)
  if packed is None:
    raise ValueError(f"example {i} has no gt_masks but mask_format={mask_format!r}")
  if packed.shape != (n, h, -(-w // 8)):
    raise ValueError(f"example {i}: gt_masks_packed {packed.shape} != ({n}, {h}, {-(-w // 8)})")
  return packed


def compact_example(example: Example) -> Example:
  """The example with ``gt_masks`` bit-packed at the image size (``gt_masks_packed``).

  Worker processes send compact examples (~8x smaller masks, no canvas padding) and the
  consumer pads them with :func:`make_batch`, which accepts either form.
  """
  if example.get("gt_masks") is None:
    return example
  out = dict(example)
  out["gt_masks_packed"] = pack_masks(out.pop("gt_masks"))
  return out


def make_batch(examples: Sequence[Example],
               bucket_hw: Size,
               *,
               batch_size: int | None = None,
               max_instances: int = 100,
               mask_format: str = "packed",
               instance_targets: bool = True,
               semantic_targets: bool = False,
               ignore_label: int = IGNORE_LABEL) -> Batch:
  """Pads examples into a fixed-shape :data:`Batch` (see the module docstring for the keys).

  Args:
    examples: transformed images (at most ``batch_size``), each fitting ``bucket_hw``.
    bucket_hw: ``(Hb, Wb)`` canvas; multiples of 8 when masks are packed.
    batch_size: ``B``; defaults to ``len(examples)``. Missing slots are padding
      (``valid = False``).
    max_instances: ``M`` instance slots per image (see the module docstring for the policy).
    mask_format: ``"packed"`` (``gt_masks_packed``), ``"dense"`` (``gt_masks`` uint8) or
      ``"none"`` (boxes only).
    instance_targets, semantic_targets: emit the ``gt_*`` keys, ``sem_seg``.
    ignore_label: semantic padding value.
  """
  hb, wb = (int(v) for v in bucket_hw)
  b = len(examples) if batch_size is None else int(batch_size)
  if len(examples) > b:
    raise ValueError(f"{len(examples)} examples do not fit batch_size {b}")
  if mask_format not in MASK_FORMATS:
    raise ValueError(f"mask_format must be one of {MASK_FORMATS}, got {mask_format!r}")
  if mask_format == "packed" and wb % 8:
    raise ValueError(f"packed masks need a bucket width divisible by 8, got {wb}")
  m = int(max_instances)

  batch: Batch = {
      "image": np.zeros((b, hb, wb, 3), np.uint8),
      "image_size": np.tile(np.array([hb, wb], np.int32), (b, 1)),
      "orig_size": np.tile(np.array([hb, wb], np.int32), (b, 1)),
      "image_id": np.full((b,), -1, np.int32),
      "record_index": np.full((b,), -1, np.int32),
      "valid": np.zeros((b,), bool),
  }
  if instance_targets:
    batch["gt_boxes"] = np.zeros((b, m, 4), np.float32)
    batch["gt_classes"] = np.zeros((b, m), np.int32)
    batch["gt_valid"] = np.zeros((b, m), bool)
    if mask_format == "packed":
      batch["gt_masks_packed"] = np.zeros((b, m, hb, wb // 8), np.uint8)
    elif mask_format == "dense":
      batch["gt_masks"] = np.zeros((b, m, hb, wb), np.uint8)
  if semantic_targets:
    batch["sem_seg"] = np.full((b, hb, wb), ignore_label, np.uint8)

  for i, ex in enumerate(examples):
    image = ex["image"]
    h, w = image.shape[:2]
    if (h, w) != tuple(ex.get("image_size", (h, w))):
      raise ValueError(f"example {i}: image {h}x{w} != image_size {ex['image_size']}")
    if h > hb or w > wb:
      raise ValueError(f"example {i} (image id {ex.get('image_id')}): {h}x{w} image does not "
                       f"fit the {hb}x{wb} bucket")
    batch["image"][i, :h, :w] = image
    batch["image_size"][i] = (h, w)
    batch["orig_size"][i] = tuple(ex.get("orig_size", (h, w)))
    batch["image_id"][i] = _int32_id(ex.get("image_id"))
    batch["record_index"][i] = _int32_id(ex.get("record_index"))
    batch["valid"][i] = True

    if instance_targets:
      boxes = np.asarray(ex["gt_boxes"], np.float32).reshape(-1, 4)
      classes = np.asarray(ex["gt_classes"]).reshape(-1)
      n = len(boxes)
      packed = None if mask_format == "none" else _packed_masks(ex, i, n, h, w, mask_format)
      if n > m:
        if packed is not None:
          areas = unpack_masks(packed, w).reshape(n, -1).sum(axis=1)
        else:
          areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
        keep = select_instances(areas, m)
        _note_truncation(ex, m, n)
        boxes, classes = boxes[keep], classes[keep]
        packed = packed[keep] if packed is not None else None
        n = m
      batch["gt_boxes"][i, :n] = boxes
      batch["gt_classes"][i, :n] = classes
      batch["gt_valid"][i, :n] = True
      if mask_format == "packed" and n:
        # Packed at the image width, then placed: canvas bytes beyond it stay 0, and a partial
        # last byte has zero padding bits (np.packbits pads with 0).
        batch["gt_masks_packed"][i, :n, :h, :packed.shape[-1]] = packed
      elif mask_format == "dense" and n:
        batch["gt_masks"][i, :n, :h, :w] = unpack_masks(packed, w)

    if semantic_targets:
      sem = ex.get("sem_seg")
      if sem is None:
        raise ValueError(f"example {i} has no sem_seg")
      if sem.shape != (h, w):
        raise ValueError(f"example {i}: sem_seg {sem.shape} != image {h}x{w}")
      batch["sem_seg"][i, :h, :w] = sem
  return batch


def batch_nbytes(batch: Mapping[str, np.ndarray]) -> dict[str, int]:
  """Bytes per key plus ``"total"``."""
  sizes = {k: int(v.nbytes) for k, v in batch.items()}
  sizes["total"] = sum(sizes.values())
  return sizes

