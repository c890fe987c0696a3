"""Cityscapes (fine) instance and semantic sources -> records in the ``coco`` module's format.

Layout (the official download, unzipped into one ``root``)::

  root/leftImg8bit/{split}/{city}/{city}_{seq}_{frame}_leftImg8bit.png
  root/gtFine/{split}/{city}/{city}_{seq}_{frame}_gtFine_polygons.json
                                                 _gtFine_instanceIds.png
                                                 _gtFine_labelIds.png
                                                 _gtFine_labelTrainIds.png  (semantic; see below)

Images are listed city by city, both sorted by name (detectron2 takes ``os.listdir`` order,
which is filesystem dependent); ``image_id`` is the index in that order (detectron2 uses the
file's basename, a string, which our int32 batches cannot carry).

**Instance records** (:func:`load_cityscapes_instances`) follow detectron2's
``load_cityscapes_instances``. The PointRend configs use ``from_json=True, to_polygons=True``:

* objects of ``*_gtFine_polygons.json`` are visited in *reverse* file order (cityscapesScripts
  draws them in file order, later ones on top); ``deleted`` objects and labels with id < 0
  (license plate) are skipped; ``<name>group`` is the crowd version of ``<name>``;
* each polygon is shifted by +0.5 px (float32, as detectron2) and dilated with shapely
  ``buffer(0.5, quad_segs=4)``, because cityscapesScripts rasterizes with PIL, which fills
  every pixel whose centre is inside;
* labels without instances or ignored in evaluation (road, caravan, ...) are not annotated but
  still occlude what lies below them; every annotated object keeps the part not covered by
  objects above it (``difference`` with the union so far); objects fully covered are dropped;
* ``segmentation`` = the exterior rings of the remaining (multi)polygon (holes dropped, as
  detectron2: the COCO API handles exteriors only), ``bbox`` = its bounds (XYXY),
  ``iscrowd`` = group label, ``category_id`` = contiguous id of the 8 thing classes.

``from_json=False, to_polygons=False`` reads ``*_gtFine_instanceIds.png`` instead (detectron2's
other supported mode): every id >= 24 of a thing class is an instance, ids < 1000 are groups
(``iscrowd = 1``), the mask is stored as compressed RLE and the box is detectron2's
``(xmin, ymin, xmax, ymax)`` of the pixel *indices* (inclusive max, no +1); instances one pixel
wide or high are dropped, as detectron2 does. detectron2's third mode (instanceIds ->
OpenCV contours) is not supported.

Annotations get an ``id`` counting from 1 over the split (for messages).

**Semantic records** (:func:`load_cityscapes_semantic`), as detectron2's
``load_cityscapes_semantic``: ``{"file_name", "sem_seg_file_name", "height", "width",
"image_id"}`` with ``sem_seg_file_name`` the ``*_gtFine_labelTrainIds.png`` (train ids 0..18,
255 elsewhere). The official ``createTrainIdLabelImgs`` renders those from the polygons; since
it draws the same polygons in the same order as the ``labelIds`` PNG, mapping ``labelIds``
through :data:`LABEL_ID_TO_TRAIN_ID` gives the same image, which is what
:func:`write_train_id_label_maps` does (no cityscapesScripts needed).

Bad input policy:

| input                                        | action                                      |
| -------------------------------------------- | ------------------------------------------- |
| root, ``leftImg8bit/<split>`` or             | ``FileNotFoundError`` saying what was       |
| ``gtFine/<split>`` missing                   | expected where                              |
| no ``*_leftImg8bit.png`` under the split     | ``FileNotFoundError``                       |
| other files in a city folder                 | ignored (logged)                            |
| ground-truth file of an image missing        | ``FileNotFoundError`` naming it             |
| polygons JSON unreadable / without size      | ``ValueError`` naming the file              |
| unknown label name or id                     | ``ValueError`` naming the file (as d2)      |
| polygon shapely cannot build (< 3 points)    | skipped, counted, logged (d2 crashes)       |
| ``labelTrainIds`` missing (semantic)         | ``FileNotFoundError`` pointing at           |
|                                              | :func:`write_train_id_label_maps`           |
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import os
import pathlib
from typing import Any

import numpy as np
from PIL import Image
import pycocotools.mask as mask_util

from pointrend_jax.data.coco import CocoCategories, PathLike, Record, read_coco_json, read_label_map

logger = logging.getLogger(__name__)

IGNORE_LABEL = 255
IMAGE_SUFFIX = "_leftImg8bit.png"

# Skip reasons (logged with the counts).
SKIP_INVALID_POLYGON = "invalid_polygon"


@dataclasses.dataclass(frozen=True)
class CityscapesLabel:
  """One row of cityscapesScripts' ``helpers/labels.py``."""
  name: str
  id: int
  train_id: int
  category: str
  category_id: int
  has_instances: bool
  ignore_in_eval: bool
  color: tuple[int, int, int]


_L = CityscapesLabel
# Copied from cityscapesScripts 2.3.0 (tests compare against the package) so that neither
# loading nor evaluation depends on it.
LABELS: tuple[CityscapesLabel, ...] = (
    _L("unlabeled", 0, 255, "void", 0, False, True, (0, 0, 0)),
    _L("ego vehicle", 1, 255, "void", 0, False, True, (0, 0, 0)),
    _L("rectification border", 2, 255, "void", 0, False, True, (0, 0, 0)),
    _L("out of roi", 3, 255, "void", 0, False, True, (0, 0, 0)),
    _L("static", 4, 255, "void", 0, False, True, (0, 0, 0)),
    _L("dynamic", 5, 255, "void", 0, False, True, (111, 74, 0)),
    _L("ground", 6, 255, "void", 0, False, True, (81, 0, 81)),
    _L("road", 7, 0, "flat", 1, False, False, (128, 64, 128)),
    _L("sidewalk", 8, 1, "flat", 1, False, False, (244, 35, 232)),
    _L("parking", 9, 255, "flat", 1, False, True, (250, 170, 160)),
    _L("rail track", 10, 255, "flat", 1, False, True, (230, 150, 140)),
    _L("building", 11, 2, "construction", 2, False, False, (70, 70, 70)),
    _L("wall", 12, 3, "construction", 2, False, False, (102, 102, 156)),
    _L("fence", 13, 4, "construction", 2, False, False, (190, 153, 153)),
    _L("guard rail", 14, 255, "construction", 2, False, True, (180, 165, 180)),
    _L("bridge", 15, 255, "construction", 2, False, True, (150, 100, 100)),
    _L("tunnel", 16, 255, "construction", 2, False, True, (150, 120, 90)),
    _L("pole", 17, 5, "object", 3, False, False, (153, 153, 153)),
    _L("polegroup", 18, 255, "object", 3, False, True, (153, 153, 153)),
    _L("traffic light", 19, 6, "object", 3, False, False, (250, 170, 30)),
    _L("traffic sign", 20, 7, "object", 3, False, False, (220, 220, 0)),
    _L("vegetation", 21, 8, "nature", 4, False, False, (107, 142, 35)),
    _L("terrain", 22, 9, "nature", 4, False, False, (152, 251, 152)),
    _L("sky", 23, 10, "sky", 5, False, False, (70, 130, 180)),
    _L("person", 24, 11, "human", 6, True, False, (220, 20, 60)),
    _L("rider", 25, 12, "human", 6, True, False, (255, 0, 0)),
    _L("car", 26, 13, "vehicle", 7, True, False, (0, 0, 142)),
    _L("truck", 27, 14, "vehicle", 7, True, False, (0, 0, 70)),
    _L("bus", 28, 15, "vehicle", 7, True, False, (0, 60, 100)),
    _L("caravan", 29, 255, "vehicle", 7, True, True, (0, 0, 90)),
    _L("trailer", 30, 255, "vehicle", 7, True, True, (0, 0, 110)),
    _L("train", 31, 16, "vehicle", 7, True, False, (0, 80, 100)),
    _L("motorcycle", 32, 17, "vehicle", 7, True, False, (0, 0, 230)),
    _L("bicycle", 33, 18, "vehicle", 7, True, False, (119, 11, 32)),
    _L("license plate", -1, -1, "vehicle", 7, False, True, (0, 0, 142)),
)
del _L

NAME_TO_LABEL: dict[str, CityscapesLabel] = {l.name: l for l in LABELS}
ID_TO_LABEL: dict[int, CityscapesLabel] = {l.id: l for l in LABELS}

# The 8 instance classes, in label order = detectron2's contiguous ids (spec 7.2).
_THING_LABELS = tuple(l for l in LABELS if l.has_instances and not l.ignore_in_eval)
THING_CLASSES: tuple[str, ...] = tuple(l.name for l in _THING_LABELS)
THING_LABEL_IDS: tuple[int, ...] = tuple(l.id for l in _THING_LABELS)
THING_CATEGORIES = CocoCategories(ids=THING_LABEL_IDS, names=THING_CLASSES)
"""Contiguous id <-> Cityscapes label id of the thing classes (``CocoCategories`` API)."""

# The 19 semantic classes, index = train id (spec 7.3).
_TRAIN_LABELS = tuple(sorted((l for l in LABELS if 0 <= l.train_id < 255),
                             key=lambda l: l.train_id))
SEM_SEG_CLASSES: tuple[str, ...] = tuple(l.name for l in _TRAIN_LABELS)
SEM_SEG_LABEL_IDS: tuple[int, ...] = tuple(l.id for l in _TRAIN_LABELS)
NUM_SEM_SEG_CLASSES = len(SEM_SEG_CLASSES)

LABEL_ID_TO_TRAIN_ID = np.full(256, IGNORE_LABEL, np.uint8)
"""uint8 [256] lookup table: label id -> train id (0..18), 255 for every other value."""
TRAIN_ID_TO_LABEL_ID = np.full(256, IGNORE_LABEL, np.uint8)
"""uint8 [256] lookup table: train id (0..18) -> label id, 255 for every other value."""
for _train_id, _label_id in enumerate(SEM_SEG_LABEL_IDS):
  LABEL_ID_TO_TRAIN_ID[_label_id] = _train_id
  TRAIN_ID_TO_LABEL_ID[_train_id] = _label_id
LABEL_ID_TO_TRAIN_ID.flags.writeable = False
TRAIN_ID_TO_LABEL_ID.flags.writeable = False


def label_id_to_train_id(label_ids: np.ndarray) -> np.ndarray:
  """Label-id map (any int dtype) -> uint8 train ids; values that are not a train class -> 255."""
  label_ids = np.asarray(label_ids)
  out = np.full(label_ids.shape, IGNORE_LABEL, np.uint8)
  valid = (label_ids >= 0) & (label_ids < 256)
  out[valid] = LABEL_ID_TO_TRAIN_ID[label_ids[valid].astype(np.int64)]
  return out


def train_id_to_label_id(train_ids: np.ndarray) -> np.ndarray:
  """Train-id map (0..18, e.g. an argmax) -> uint8 label ids for the official scripts.

  Raises:
    ValueError: on a value outside 0..18 (it has no label id; detectron2 would write 255,
      which the official script rejects).
  """
  train_ids = np.asarray(train_ids)
  if train_ids.size and (train_ids.min() < 0 or train_ids.max() >= NUM_SEM_SEG_CLASSES):
    raise ValueError(f"train ids must be in 0..{NUM_SEM_SEG_CLASSES - 1}, got range "
                     f"{train_ids.min()}..{train_ids.max()}")
  return TRAIN_ID_TO_LABEL_ID[train_ids.astype(np.int64)]


# Files.


@dataclasses.dataclass(frozen=True)
class CityscapesFiles:
  """The files of one image (ground-truth paths may not exist; checked by the loaders)."""
  image: str
  instance_ids: str
  label_ids: str
  label_train_ids: str
  polygons: str


def split_dirs(root: PathLike, split: str) -> tuple[pathlib.Path, pathlib.Path]:
  """``(root/leftImg8bit/split, root/gtFine/split)``; errors say what was expected where."""
  root = pathlib.Path(root)
  if not root.is_dir():
    raise FileNotFoundError(f"Cityscapes root {root} does not exist (expected "
                            f"{root}/leftImg8bit/<split> and {root}/gtFine/<split>)")
  image_dir, gt_dir = root / "leftImg8bit" / split, root / "gtFine" / split
  for what, path, pattern in (("images", image_dir, f"<city>/*{IMAGE_SUFFIX}"),
                              ("fine annotations", gt_dir, "<city>/*_gtFine_*")):
    if not path.is_dir():
      raise FileNotFoundError(
          f"Cityscapes {what} of split {split!r} not found: expected {path}/{pattern} "
          f"(the layout of the official leftImg8bit / gtFine archives under {root})")
  return image_dir, gt_dir


def cityscapes_files(root: PathLike, split: str) -> list[CityscapesFiles]:
  """Every image of a split with its ground-truth paths, cities and files sorted by name."""
  image_dir, gt_dir = split_dirs(root, split)
  files, ignored = [], []
  for city in sorted(p.name for p in image_dir.iterdir() if p.is_dir()):
    for name in sorted(os.listdir(image_dir / city)):
      if not name.endswith(IMAGE_SUFFIX):
        ignored.append(name)
        continue
      stem = os.path.join(gt_dir, city, name[:-len(IMAGE_SUFFIX)])
      files.append(CityscapesFiles(
          image=os.path.join(image_dir, city, name),
          instance_ids=stem + "_gtFine_instanceIds.png",
          label_ids=stem + "_gtFine_labelIds.png",
          label_train_ids=stem + "_gtFine_labelTrainIds.png",
          polygons=stem + "_gtFine_polygons.json"))
  if ignored:
    logger.info("%s: ignored %d files not named *%s (e.g. %s)", image_dir, len(ignored),
                IMAGE_SUFFIX, ignored[0])
  if not files:
    raise FileNotFoundError(f"no Cityscapes images found: expected {image_dir}/<city>/"
                            f"*{IMAGE_SUFFIX}")
  return files


def _require(path: str, what: str, image: str) -> None:
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{what} not found: {path} (for image {image})")


def _read_polygons_json(path: str) -> dict[str, Any]:
  obj = read_coco_json(path, "Cityscapes polygons file")
  if not (isinstance(obj, dict) and isinstance(obj.get("imgHeight"), int) and
          isinstance(obj.get("imgWidth"), int) and isinstance(obj.get("objects"), list)):
    raise ValueError(f"Cityscapes polygons file {path}: expected imgHeight, imgWidth and "
                     "objects")
  return obj


def _label_of(name: str, path: str) -> tuple[CityscapesLabel, bool]:
  """(label, is_group) of a polygon label name, as detectron2 / json2instanceImg parse it."""
  if name in NAME_TO_LABEL:
    return NAME_TO_LABEL[name], False
  if name.endswith("group") and name[:-len("group")] in NAME_TO_LABEL:
    return NAME_TO_LABEL[name[:-len("group")]], True
  raise ValueError(f"{path}: unknown Cityscapes label {name!r}")


# Instances.


def _annotations_from_json(path: str, skipped: list[str]) -> tuple[int, int, list[Record]]:
  """detectron2's ``_cityscapes_files_to_dict(from_json=True, to_polygons=True)``."""
  try:
    from shapely.errors import ShapelyError  # pylint: disable=g-import-not-at-top
    from shapely.geometry import MultiPolygon, Polygon  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError("Cityscapes polygons need shapely (pip install shapely), as detectron2; "
                      "or load with from_json=False, to_polygons=False") from e
  obj_json = _read_polygons_json(path)
  union = Polygon()
  annos = []
  for k in reversed(range(len(obj_json["objects"]))):
    obj = obj_json["objects"][k]
    if "deleted" in obj:
      continue
    label, is_group = _label_of(obj["label"], path)
    if label.id < 0:
      continue
    # Integer vertex coordinates; +0.5 in float32 exactly as detectron2.
    coords = np.asarray(obj["polygon"], dtype="f4") + 0.5
    try:
      poly = Polygon(coords).buffer(0.5, quad_segs=4)
    except (ValueError, TypeError, ShapelyError) as e:
      skipped.append(f"{path}: object {k} ({obj['label']}): {e}")
      continue
    if not label.has_instances or label.ignore_in_eval:
      union = union.union(poly)  # Not annotated, but occludes what lies below.
      continue
    visible = poly.difference(union)
    if visible.is_empty:
      continue
    union = union.union(poly)
    if isinstance(visible, Polygon):
      parts = [visible]
    elif isinstance(visible, MultiPolygon):
      parts = list(visible.geoms)
    else:  # detectron2 raises NotImplementedError too (e.g. a GeometryCollection).
      raise ValueError(f"{path}: object {k}: unexpected geometry {visible.geom_type}")
    xmin, ymin, xmax, ymax = visible.bounds
    annos.append({
        "bbox": np.array([xmin, ymin, xmax, ymax], np.float32),
        "category_id": THING_LABEL_IDS.index(label.id),
        "iscrowd": int(is_group),
        "segmentation": [[float(v) for v in itertools.chain(*p.exterior.coords)]
                         for p in parts],
    })
  return obj_json["imgHeight"], obj_json["imgWidth"], annos


def _annotations_from_instance_ids(path: str) -> tuple[int, int, list[Record]]:
  """detectron2's ``_cityscapes_files_to_dict(from_json=False, to_polygons=False)``."""
  with Image.open(path) as image:
    inst = np.asarray(image, order="F")
  if inst.ndim != 2:
    raise ValueError(f"{path}: instance id image must be single-channel, got {inst.shape}")
  annos = []
  for instance_id in np.unique(inst[inst >= 24]):  # Ids < 24 are stuff.
    instance_id = int(instance_id)
    label_id = instance_id // 1000 if instance_id >= 1000 else instance_id
    if label_id not in ID_TO_LABEL:
      raise ValueError(f"{path}: instance id {instance_id} has unknown label id {label_id}")
    label = ID_TO_LABEL[label_id]
    if not label.has_instances or label.ignore_in_eval:
      continue
    mask = np.asarray(inst == instance_id, dtype=np.uint8, order="F")
    ys, xs = np.nonzero(mask)
    xmin, xmax, ymin, ymax = xs.min(), xs.max(), ys.min(), ys.max()
    if xmax <= xmin or ymax <= ymin:
      continue
    rle = mask_util.encode(mask[:, :, None])[0]
    annos.append({
        "bbox": np.array([xmin, ymin, xmax, ymax], np.float32),
        "category_id": THING_LABEL_IDS.index(label.id),
        "iscrowd": int(instance_id < 1000),
        "segmentation": {"size": [int(inst.shape[0]), int(inst.shape[1])],
                         "counts": rle["counts"].decode("ascii")},
    })
  return int(inst.shape[0]), int(inst.shape[1]), annos


def load_cityscapes_instances(root: PathLike,
                              split: str,
                              *,
                              from_json: bool = True,
                              to_polygons: bool = True) -> list[Record]:
  """Instance records of a split (see the module docstring; detectron2's flags).

  Args:
    root: the Cityscapes root (holding ``leftImg8bit`` and ``gtFine``).
    split: ``train`` or ``val`` (``test`` has no instance ground truth).
    from_json: polygons from ``*_gtFine_polygons.json`` (the PointRend configs) if True, else
      masks from ``*_gtFine_instanceIds.png``.
    to_polygons: must equal ``from_json`` (the two modes detectron2 supports without OpenCV).

  Returns:
    One ``coco``-format record per image, in :func:`cityscapes_files` order.
  """
  if from_json != to_polygons:
    raise ValueError("supported: from_json=True, to_polygons=True (polygons JSON -> polygons, "
                     "the PointRend configs) or from_json=False, to_polygons=False "
                     "(instanceIds PNG -> RLE); detectron2 cannot turn polygons into masks and "
                     "needs OpenCV to turn instanceIds into polygons")
  files = cityscapes_files(root, split)
  for f in files:
    _require(f.polygons if from_json else f.instance_ids,
             "polygons JSON" if from_json else "instanceIds PNG", f.image)
  records, skipped = [], []
  ann_ids = itertools.count(1)
  for image_id, f in enumerate(files):
    if from_json:
      height, width, annos = _annotations_from_json(f.polygons, skipped)
    else:
      height, width, annos = _annotations_from_instance_ids(f.instance_ids)
    records.append({
        "file_name": f.image,
        "height": height,
        "width": width,
        "image_id": image_id,
        "annotations": [{"id": next(ann_ids), **a} for a in annos],
    })
  if skipped:
    logger.warning("skipped %d Cityscapes polygons (%s), e.g. %s", len(skipped),
                   SKIP_INVALID_POLYGON, skipped[0])
  logger.info("Cityscapes %s: loaded %d images, %d instances", split, len(records),
              next(ann_ids) - 1)
  return records


# Semantic.


def _image_size(f: CityscapesFiles) -> tuple[int, int]:
  """(height, width): the polygons JSON's (detectron2), else the image header."""
  if os.path.isfile(f.polygons):
    obj = _read_polygons_json(f.polygons)
    return obj["imgHeight"], obj["imgWidth"]
  with Image.open(f.image) as image:
    return image.height, image.width


def load_cityscapes_semantic(root: PathLike, split: str, *,
                             require_train_ids: bool = True) -> list[Record]:
  """Semantic records of a split: ``sem_seg_file_name`` = the ``labelTrainIds`` PNG.

  Args:
    root, split: the Cityscapes root and ``train``, ``val`` or ``test``.
    require_train_ids: check that every ``*_gtFine_labelTrainIds.png`` exists (the pipeline
      reads them); False for callers that derive train ids from ``labelIds`` themselves.

  Raises:
    FileNotFoundError: if a ``*_gtFine_labelTrainIds.png`` is missing; create them with
      :func:`write_train_id_label_maps` (or cityscapesScripts' ``createTrainIdLabelImgs``).
  """
  files = cityscapes_files(root, split)
  records = []
  for image_id, f in enumerate(files):
    if require_train_ids and not os.path.isfile(f.label_train_ids):
      raise FileNotFoundError(
          f"train-id label map not found: {f.label_train_ids} (for image {f.image}); create "
          f"them with pointrend_jax.data.cityscapes.write_train_id_label_maps({str(root)!r}, "
          f"{split!r}) or cityscapesScripts' createTrainIdLabelImgs")
    height, width = _image_size(f)
    records.append({
        "file_name": f.image,
        "sem_seg_file_name": f.label_train_ids,
        "height": height,
        "width": width,
        "image_id": image_id,
    })
  logger.info("Cityscapes %s: %d semantic images", split, len(records))
  return records


def write_train_id_label_maps(root: PathLike, split: str, *, overwrite: bool = False) -> int:
  """Writes ``*_gtFine_labelTrainIds.png`` next to each ``*_gtFine_labelIds.png``.

  Returns:
    The number of files written (existing ones are kept unless ``overwrite``).
  """
  written = 0
  for f in cityscapes_files(root, split):
    if os.path.isfile(f.label_train_ids) and not overwrite:
      continue
    _require(f.label_ids, "labelIds PNG", f.image)
    Image.fromarray(label_id_to_train_id(read_label_map(f.label_ids))).save(f.label_train_ids)
    written += 1
  logger.info("Cityscapes %s: wrote %d labelTrainIds PNGs", split, written)
  return written


def cityscapes_stem(file_name: PathLike) -> str:
  """``<city>_<seq>_<frame>`` of any Cityscapes file name (the official scripts' key)."""
  parts = os.path.basename(file_name).split("_")
  if len(parts) < 4:
    raise ValueError(f"not a Cityscapes file name (<city>_<seq>_<frame>_<type>...): "
                     f"{file_name}")
  return "_".join(parts[:3])
