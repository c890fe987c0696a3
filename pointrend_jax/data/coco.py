"""COCO-format instance data: annotations JSON + image folder -> records, masks and images.

Records follow detectron2's dataset dicts (``load_coco_json``), in numpy::

  {
    "file_name": str,        # absolute-or-as-given path: images_dir / image["file_name"]
    "height": int, "width": int,   # from the JSON (checked against the decoded image on load)
    "image_id": int,
    "annotations": [{
        "id": int,               # COCO annotation id (for messages)
        "bbox": float32 [4],     # XYXY in pixels, converted from COCO's XYWH
        "category_id": int,      # contiguous id in 0..C-1 (sorted COCO ids, as detectron2)
        "iscrowd": int,          # 1 = crowd region: dropped by training, used by evaluation
        "area": float,           # the JSON's area (absent if the JSON has none)
        "segmentation": list[list[float]] | {"size": [h, w], "counts": str},
                                 # polygons or *compressed* RLE (uncompressed RLE is
                                 # compressed at load, as detectron2 does); absent if none
    }, ...],
  }

Records are sorted by image id; annotations keep the JSON's order.

Bad input policy:

| input                                           | action                                      |
| ----------------------------------------------- | ------------------------------------------- |
| annotations file missing / not JSON             | error naming the file                       |
| image file missing (``check_files=True``)       | ``FileNotFoundError`` naming the file       |
| image undecodable                               | ``ValueError`` naming the file (on read)    |
| decoded image size != JSON size                 | ``ValueError`` naming the file (on load)    |
| unknown category id                             | ``ValueError`` naming the annotation id     |
| annotation of an unknown image id               | ``ValueError`` naming the annotation id     |
| duplicate image or annotation id                | ``ValueError`` naming the id                |
| bbox missing / not 4 finite numbers             | ``ValueError`` naming the annotation id     |
| RLE size != image size                          | ``ValueError`` naming the annotation id     |
| bbox with w <= 0 or h <= 0                      | skipped, counted, logged with its id        |
| polygons with < 3 points / odd length           | dropped; the annotation skipped, counted and |
|                                                 | logged if none is left (as detectron2)      |
| crowd annotation                                | kept with ``iscrowd = 1``                   |

Images are read with PIL, EXIF orientation applied, and converted to RGB uint8 (PIL's
``convert("RGB")``, as detectron2, for every mode except 16-bit grayscale: PIL would clip those
at 255, so they are rescaled by ``round(v / 257)`` instead).
"""

from __future__ import annotations

import collections
import dataclasses
import io
import json
import logging
import math
import os
import pathlib
from typing import Any, Mapping

import numpy as np
from PIL import Image, ImageOps
import pycocotools.mask as mask_util

logger = logging.getLogger(__name__)

Record = dict[str, Any]
PathLike = str | os.PathLike[str]

# Skip reasons in CocoDataset.skipped.
SKIP_DEGENERATE_BOX = "degenerate_box"
SKIP_INVALID_POLYGON = "invalid_polygon"

_MAX_IDS_LOGGED = 20
_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")


@dataclasses.dataclass(frozen=True)
class CocoCategories:
  """Category ids and names; index = contiguous id (ids sorted ascending, as detectron2).

  Attributes:
    ids: dataset (COCO) category ids, sorted; ``ids[c]`` is the id of contiguous class ``c``.
    names: category names in the same order (detectron2's ``thing_classes``).
  """
  ids: tuple[int, ...]
  names: tuple[str, ...]

  @classmethod
  def from_coco(cls, coco: Mapping[str, Any]) -> CocoCategories:
    """From a parsed COCO JSON's ``"categories"`` list (any order)."""
    cats = coco.get("categories")
    if not cats:
      raise ValueError("COCO JSON has no 'categories'")
    cats = sorted(cats, key=lambda c: c["id"])
    ids = tuple(int(c["id"]) for c in cats)
    if len(set(ids)) != len(ids):
      dup = [i for i, n in collections.Counter(ids).items() if n > 1]
      raise ValueError(f"duplicate category ids {dup}")
    return cls(ids=ids, names=tuple(str(c["name"]) for c in cats))

  def __len__(self) -> int:
    return len(self.ids)

  @property
  def dataset_id_to_contiguous_id(self) -> dict[int, int]:
    return {d: c for c, d in enumerate(self.ids)}


@dataclasses.dataclass
class CocoDataset:
  """What :func:`load_coco_dataset` returns.

  Attributes:
    records: one dict per image (see the module docstring), sorted by image id.
    categories: the id <-> contiguous id mapping and class names.
    skipped: annotation ids skipped at load, by reason (``SKIP_*``).
  """
  records: list[Record]
  categories: CocoCategories
  skipped: dict[str, list[int]]


def read_coco_json(path: PathLike, what: str = "COCO annotations file") -> Any:
  """Parses a JSON file (a COCO one unless ``what`` says otherwise); errors name the file."""
  try:
    with open(path) as f:
      return json.load(f)
  except FileNotFoundError:
    raise FileNotFoundError(f"{what} not found: {path}") from None
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise ValueError(f"{what} {path} is not valid JSON: {e}") from e


def _bbox_xyxy(ann: Mapping[str, Any]) -> np.ndarray:
  bbox = ann.get("bbox")
  if (not isinstance(bbox, (list, tuple)) or len(bbox) != 4 or
      not all(isinstance(v, (int, float)) and math.isfinite(v) for v in bbox)):
    raise ValueError(f"annotation id {ann.get('id')}: 'bbox' must be 4 finite numbers "
                     f"[x, y, w, h], got {bbox!r}")
  x, y, w, h = (float(v) for v in bbox)
  return np.array([x, y, x + w, y + h], np.float32)


def _rle(segm: Mapping[str, Any], height: int, width: int, what: str) -> Mapping[str, Any]:
  """An RLE of the image's size with compressed counts (uncompressed ``list`` counts are
  compressed)."""
  size = list(segm.get("size", ()))
  if size != [height, width]:
    raise ValueError(f"{what}: RLE size {size} does not match the image size "
                     f"[{height}, {width}] (height, width)")
  return mask_util.frPyObjects(segm, height, width) if isinstance(segm["counts"], list) else segm


def load_coco_dataset(annotations: PathLike | Mapping[str, Any],
                      images_dir: PathLike,
                      *,
                      check_files: bool = True) -> CocoDataset:
  """Reads a COCO instances JSON into records (see the module docstring for the policy).

  Args:
    annotations: path of the JSON, or the parsed JSON.
    images_dir: folder the images' ``file_name`` values are relative to.
    check_files: verify up front that every image file exists.

  Returns:
    The records, the categories and the skipped annotation ids.
  """
  coco = annotations if isinstance(annotations, Mapping) else read_coco_json(annotations)
  source = "<dict>" if isinstance(annotations, Mapping) else str(annotations)
  categories = CocoCategories.from_coco(coco)
  id_map = categories.dataset_id_to_contiguous_id
  if not (categories.ids[0] == 1 and categories.ids[-1] == len(categories)):
    logger.info("%s: category ids are not 1..%d; mapping sorted ids to contiguous ids",
                source, len(categories))

  images: dict[int, Mapping[str, Any]] = {}
  for img in coco.get("images", []):
    image_id = int(img["id"])
    if image_id in images:
      raise ValueError(f"{source}: duplicate image id {image_id}")
    h, w = img.get("height"), img.get("width")
    if not (isinstance(h, int) and isinstance(w, int) and h > 0 and w > 0):
      raise ValueError(f"{source}: image id {image_id} has invalid size {h}x{w} (h x w)")
    images[image_id] = img

  anns_per_image: dict[int, list[Mapping[str, Any]]] = collections.defaultdict(list)
  seen_ann_ids: set[int] = set()
  for ann in coco.get("annotations", []):
    ann_id = ann.get("id")
    if ann_id in seen_ann_ids:
      raise ValueError(f"{source}: duplicate annotation id {ann_id}")
    seen_ann_ids.add(ann_id)
    if ann.get("image_id") not in images:
      raise ValueError(f"{source}: annotation id {ann_id} refers to unknown image id "
                       f"{ann.get('image_id')}")
    anns_per_image[ann["image_id"]].append(ann)

  images_dir = pathlib.Path(images_dir)
  skipped: dict[str, list[int]] = {SKIP_DEGENERATE_BOX: [], SKIP_INVALID_POLYGON: []}
  records = []
  for image_id in sorted(images):
    img = images[image_id]
    height, width = img["height"], img["width"]
    file_name = os.path.join(images_dir, img["file_name"])
    if check_files and not os.path.isfile(file_name):
      raise FileNotFoundError(f"image file not found: {file_name} (image id {image_id})")
    objs = []
    for ann in anns_per_image.get(image_id, ()):
      ann_id = ann.get("id")
      if ann.get("category_id") not in id_map:
        raise ValueError(f"{source}: annotation id {ann_id} has unknown category id "
                         f"{ann.get('category_id')!r} (known: {list(categories.ids)})")
      bbox = _bbox_xyxy(ann)
      if not (bbox[2] > bbox[0] and bbox[3] > bbox[1]):
        skipped[SKIP_DEGENERATE_BOX].append(ann_id)
        continue
      obj: dict[str, Any] = {
          "id": ann_id,
          "bbox": bbox,
          "category_id": id_map[ann["category_id"]],
          "iscrowd": int(ann.get("iscrowd", 0)),
      }
      if "area" in ann:
        obj["area"] = float(ann["area"])
      segm = ann.get("segmentation")
      if segm:  # Either list[list[float]] (polygons) or dict (RLE); [] / None means none.
        if isinstance(segm, dict):
          counts = _rle(segm, height, width, f"{source}: annotation id {ann_id}")["counts"]
          segm = {"size": [height, width],
                  "counts": counts.decode("ascii") if isinstance(counts, bytes) else counts}
        else:
          segm = [p for p in segm if len(p) % 2 == 0 and len(p) >= 6]
          if not segm:
            skipped[SKIP_INVALID_POLYGON].append(ann_id)
            continue
        obj["segmentation"] = segm
      objs.append(obj)
    records.append({
        "file_name": file_name,
        "height": height,
        "width": width,
        "image_id": image_id,
        "annotations": objs,
    })

  for reason, ids in skipped.items():
    if ids:
      shown = ", ".join(str(i) for i in ids[:_MAX_IDS_LOGGED])
      more = f", ... ({len(ids) - _MAX_IDS_LOGGED} more)" if len(ids) > _MAX_IDS_LOGGED else ""
      logger.warning("%s: skipped %d annotations (%s): ids %s%s", source, len(ids), reason,
                     shown, more)
  logger.info("%s: loaded %d images, %d annotations", source, len(records),
              sum(len(r["annotations"]) for r in records))
  return CocoDataset(records=records, categories=categories, skipped=skipped)


# Masks.


def decode_segmentation(segm: Any, height: int, width: int) -> np.ndarray:
  """One instance's mask as bool [height, width].

  Args:
    segm: polygons ``[[x0, y0, x1, y1, ...], ...]`` (rasterized by pycocotools, union of the
      polygons), an RLE dict with compressed (``str``/``bytes``) or uncompressed (``list``)
      counts, or a bool/uint8 array [height, width].
  """
  if isinstance(segm, np.ndarray):
    if segm.shape != (height, width):
      raise ValueError(f"mask shape {segm.shape} != ({height}, {width})")
    return segm.astype(bool)
  if isinstance(segm, dict):
    return mask_util.decode(_rle(segm, height, width, "segmentation")).astype(bool)
  if isinstance(segm, (list, tuple)):
    polygons = [list(map(float, p)) for p in segm]
    if not polygons:
      raise ValueError("empty polygon list")
    rles = mask_util.frPyObjects(polygons, height, width)
    return mask_util.decode(mask_util.merge(rles)).astype(bool)
  raise TypeError(f"unsupported segmentation type {type(segm).__name__}")


# Images.


def _exif_transpose(image: Image.Image) -> Image.Image:
  try:
    return ImageOps.exif_transpose(image)
  except Exception:  # pylint: disable=broad-except
    # Malformed EXIF must not make a decodable image unreadable (detectron2 ignores it too).
    return image


def _to_rgb_uint8(image: Image.Image) -> np.ndarray:
  if image.mode in _SIXTEEN_BIT_MODES:
    values = np.clip(np.asarray(image).astype(np.int64), 0, 65535)
    gray = ((values * 255 + 32767) // 65535).astype(np.uint8)  # round(v / 257)
    return np.repeat(gray[..., None], 3, axis=-1)
  if image.mode == "F":
    raise ValueError("32-bit float images are not supported")
  return np.asarray(image.convert("RGB"), dtype=np.uint8)


def _open(path: PathLike) -> Image.Image:
  try:
    return Image.open(path)
  except FileNotFoundError:
    raise FileNotFoundError(f"image file not found: {path}") from None
  except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
    raise ValueError(f"cannot decode image {path}: {e}") from e


def read_image(path: PathLike) -> np.ndarray:
  """Reads an image as RGB uint8 [H, W, 3], EXIF orientation applied (see module docstring)."""
  with _open(path) as image:
    try:
      return np.ascontiguousarray(_to_rgb_uint8(_exif_transpose(image)))
    except (OSError, SyntaxError, ValueError) as e:
      raise ValueError(f"cannot decode image {path}: {e}") from e


def load_image(record: Mapping[str, Any]) -> np.ndarray:
  """A record's image as RGB uint8 [H, W, 3], checked against the record's height/width.

  Records from TFDS carry the encoded file as ``image_bytes``; others are read from
  ``file_name``. Both decode identically (:func:`read_image`).
  """
  if "image_bytes" in record:
    try:
      image = read_image(io.BytesIO(record["image_bytes"]))
    except ValueError as e:
      raise ValueError(f"image {record.get('file_name')} (stored bytes): {e}") from e
  else:
    image = read_image(record["file_name"])
  if image.shape[:2] != (record["height"], record["width"]):
    raise ValueError(
        f"image {record.get('file_name')}: decoded size {image.shape[0]}x{image.shape[1]} (h x w, "
        f"after EXIF orientation) != annotated size {record['height']}x{record['width']}")
  return image


def load_label_map(record: Mapping[str, Any]) -> np.ndarray:
  """A record's semantic labels as uint8 [H, W] (``sem_seg_bytes`` or ``sem_seg_file_name``)."""
  if "sem_seg_bytes" in record:
    try:
      return read_label_map(io.BytesIO(record["sem_seg_bytes"]))
    except ValueError as e:
      raise ValueError(
          f"label map {record.get('sem_seg_file_name')} (stored bytes): {e}") from e
  return read_label_map(record["sem_seg_file_name"])


def read_label_map(path: PathLike) -> np.ndarray:
  """Reads a single-channel label PNG (e.g. a semantic map, 255 = ignore) as uint8 [H, W].

  ``L`` and ``P`` images give their raw values (palette indices for ``P``); 16/32-bit integer
  images must hold values < 256.
  """
  with _open(path) as image:
    try:
      image = _exif_transpose(image)
      if image.mode in ("L", "P"):
        return np.array(image, dtype=np.uint8)
      if image.mode in _SIXTEEN_BIT_MODES:
        values = np.asarray(image)
        if values.size and (values.min() < 0 or values.max() > 255):
          raise ValueError(f"label values outside 0..255 (range {values.min()}..{values.max()})")
        return values.astype(np.uint8)
      raise ValueError(f"label map must be a single-channel image, got mode {image.mode}")
    except (OSError, SyntaxError) as e:
      raise ValueError(f"cannot decode label map {path}: {e}") from e
    except ValueError as e:
      raise ValueError(f"label map {path}: {e}") from e
