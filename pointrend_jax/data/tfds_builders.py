"""Our own TFDS datasets (array_record files, no TensorFlow) and their records.

Three kinds, built by two ``tfds.core.GeneratorBasedBuilder`` s from the direct sources:

| kind                     | builder                           | source per split            |
| ------------------------ | --------------------------------- | --------------------------- |
| ``coco_instances``       | ``pointrend_instances``           | (annotations JSON, images)  |
| ``cityscapes_instances`` | ``pointrend_instances``           | Cityscapes root (polygons)  |
| ``cityscapes_semantic``  | ``pointrend_cityscapes_semantic`` | Cityscapes root             |

Build with :func:`prepare_tfds`, read with :class:`TfdsRecords` (a random-access, grain-ready
source) or ``tfds.data_source("<builder>/<name>", split=..., data_dir=...)`` +
:func:`example_to_record`. A record is *exactly* the direct source's record (``coco`` module
format; ``sem_seg_file_name`` for semantic) plus the encoded files, so nothing reads the
original folders again:

* ``image_bytes``: the image file's bytes, unchanged (PNG/JPEG; EXIF kept), decoded with PIL by
  :func:`~pointrend_jax.data.coco.load_image` exactly as ``read_image`` decodes the file (the
  decoders live in ``coco`` so that the data pipeline needs no tfds import);
* ``sem_seg_bytes`` (semantic): a PNG of the train ids (0..18, 255), made from
  ``*_gtFine_labelIds.png`` through ``LABEL_ID_TO_TRAIN_ID`` (identical to ``labelTrainIds``);
  ``coco.load_label_map``.

Stored features (``pointrend_instances``), one example per image in record order::

  image bytes | file_name text | image_id int64 | height, width int32
  ann_id int64 [N] | boxes float32 [N, 4] (XYXY) | classes int64 [N] (contiguous)
  is_crowd bool [N] | area float64 [N] (NaN = the JSON had none; raw bytes, see below)
  segm_type int8 [N]: 0 none, 1 polygons, 2 compressed RLE
  rle bytes [N]: the RLE ``counts`` (size = [height, width]); b"" otherwise
  polygon_counts int32 [N]: polygons per annotation; polygon_sizes int32 [P]: coordinates per
  polygon; polygon_coords float64 [sum of sizes]: all coordinates, flattened (raw bytes)

tfds serializes through ``tf.train.Example`` protos, whose only float type is float32, so a
float64 ``Tensor`` would silently lose precision: float64 arrays are stored as little-endian
bytes.

Masks stay in the source's own representation (polygons as float64 coordinates, RLE as its
compressed string) rather than being rasterized: this is the most compact form and keeps
records identical, which matters because detectron2 rasterizes polygons *after* resizing
(a pre-rasterized mask resized with nearest neighbour would differ). Class names and dataset
ids (COCO category ids / Cityscapes label ids) are in ``builder.info.metadata``.

No TensorFlow (tfds 4.9): ``tfds.features.Image`` / ``Video`` encoding calls TensorFlow, so
images are stored as scalar ``Tensor(dtype=object)`` bytes and every other feature is a numpy
``Tensor``/``Text``, which tfds serializes itself; ``file_format="array_record"`` and reading
with ``tfds.data_source`` / ``as_data_source`` need no TensorFlow either (``tf.data`` reading
would). ``DatasetInfo`` is built directly, because ``dataset_info_from_configs`` looks for
metadata files next to the builder's module. ``disable_shuffling=True`` keeps examples in
record order. A prepared dataset is reused as is (``overwrite=True`` rebuilds it): the config
name identifies the sources.
"""

from __future__ import annotations

import collections.abc
import dataclasses
import io
import math
import os
import pathlib
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
from PIL import Image
import tensorflow_datasets as tfds

from pointrend_jax.data import cityscapes
from pointrend_jax.data import coco
from pointrend_jax.data.coco import PathLike, Record

INSTANCES_BUILDER = "pointrend_instances"
SEMANTIC_BUILDER = "pointrend_cityscapes_semantic"
KINDS = ("coco_instances", "cityscapes_instances", "cityscapes_semantic")
_BUILDER_OF_KIND = {"coco_instances": INSTANCES_BUILDER,
                    "cityscapes_instances": INSTANCES_BUILDER,
                    "cityscapes_semantic": SEMANTIC_BUILDER}

SEGM_NONE, SEGM_POLYGONS, SEGM_RLE = 0, 1, 2
_VERSION = tfds.core.Version("1.0.0")


def _bytes_feature() -> tfds.features.Tensor:
  return tfds.features.Tensor(shape=(), dtype=np.object_)


def _f64_bytes(values: Sequence[float]) -> bytes:
  return np.asarray(values, "<f8").tobytes()


# Instances.


@dataclasses.dataclass(eq=False)
class InstancesConfig(tfds.core.BuilderConfig):
  """Sources of a ``pointrend_instances`` dataset.

  Attributes:
    source: ``"coco"`` or ``"cityscapes"``.
    splits: ``(split, path, images_dir)`` per split: COCO annotations JSON and image folder, or
      the Cityscapes root and ``""``.
  """
  source: str = "coco"
  splits: tuple[tuple[str, str, str], ...] = ()


def _load_instance_records(config: InstancesConfig,
                           split: str) -> tuple[list[Record], coco.CocoCategories]:
  path, images_dir = {s: (a, b) for s, a, b in config.splits}[split]
  if config.source == "coco":
    dataset = coco.load_coco_dataset(path, images_dir)
    return dataset.records, dataset.categories
  return cityscapes.load_cityscapes_instances(path, split), cityscapes.THING_CATEGORIES


def _encode_instances(record: Record) -> dict[str, Any]:
  anns = record["annotations"]
  segm_type, rle, polygon_counts, polygon_sizes, coords = [], [], [], [], []
  for ann in anns:
    segm = ann.get("segmentation")
    if segm is None:
      segm_type.append(SEGM_NONE)
      rle.append(b"")
      polygon_counts.append(0)
    elif isinstance(segm, dict):
      counts = segm["counts"]
      if not isinstance(counts, (str, bytes)) or list(segm["size"]) != [record["height"],
                                                                       record["width"]]:
        raise ValueError(f"annotation id {ann.get('id')}: expected compressed RLE of the "
                         "image's size")
      segm_type.append(SEGM_RLE)
      rle.append(counts.encode("ascii") if isinstance(counts, str) else counts)
      polygon_counts.append(0)
    else:
      segm_type.append(SEGM_POLYGONS)
      rle.append(b"")
      polygon_counts.append(len(segm))
      polygon_sizes.extend(len(polygon) for polygon in segm)
      coords.extend(float(v) for polygon in segm for v in polygon)
  return {
      "image": pathlib.Path(record["file_name"]).read_bytes(),
      "file_name": str(record["file_name"]),
      "image_id": int(record["image_id"]),
      "height": int(record["height"]),
      "width": int(record["width"]),
      "ann_id": np.array([int(a["id"]) for a in anns], np.int64),
      "boxes": np.array([a["bbox"] for a in anns], np.float32).reshape(-1, 4),
      "classes": np.array([a["category_id"] for a in anns], np.int64),
      "is_crowd": np.array([bool(a.get("iscrowd", 0)) for a in anns], bool),
      "area": _f64_bytes([a.get("area", math.nan) for a in anns]),
      "segm_type": np.array(segm_type, np.int8),
      "rle": np.array(rle, dtype=object),
      "polygon_counts": np.array(polygon_counts, np.int32),
      "polygon_sizes": np.array(polygon_sizes, np.int32),
      "polygon_coords": _f64_bytes(coords),
  }


def _text(value: Any) -> str:
  return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def _decode_instances(example: Mapping[str, Any]) -> Record:
  height, width = int(example["height"]), int(example["width"])
  starts = np.cumsum([0] + np.asarray(example["polygon_sizes"]).tolist()).tolist()
  coords = np.frombuffer(example["polygon_coords"], "<f8").tolist()
  polygon_counts = np.asarray(example["polygon_counts"]).tolist()
  area = np.frombuffer(example["area"], "<f8")
  rle = list(example["rle"])
  anns, p = [], 0
  for k, ann_id in enumerate(np.asarray(example["ann_id"]).tolist()):
    ann: dict[str, Any] = {
        "id": ann_id,
        "bbox": np.asarray(example["boxes"][k], np.float32),
        "category_id": int(example["classes"][k]),
        "iscrowd": int(bool(example["is_crowd"][k])),
    }
    if not math.isnan(area[k]):
      ann["area"] = float(area[k])
    kind = int(example["segm_type"][k])
    if kind == SEGM_RLE:
      ann["segmentation"] = {"size": [height, width], "counts": _text(rle[k])}
    elif kind == SEGM_POLYGONS:
      ann["segmentation"] = [coords[starts[i]:starts[i + 1]]
                             for i in range(p, p + polygon_counts[k])]
      p += polygon_counts[k]
    anns.append(ann)
  return {
      "file_name": _text(example["file_name"]),
      "height": height,
      "width": width,
      "image_id": int(example["image_id"]),
      "annotations": anns,
      "image_bytes": bytes(example["image"]),
  }


class InstancesBuilder(tfds.core.GeneratorBasedBuilder):
  """Instance segmentation records (COCO JSON or Cityscapes polygons) as array_record."""
  name = INSTANCES_BUILDER
  VERSION = _VERSION
  BUILDER_CONFIG_CLASS = InstancesConfig

  def _info(self) -> tfds.core.DatasetInfo:
    config: InstancesConfig = self.builder_config
    metadata = tfds.core.MetadataDict()
    if config.splits:  # Empty when tfds instantiates the class only to read files.
      if config.source == "coco":
        categories = coco.CocoCategories.from_coco(coco.read_coco_json(config.splits[0][1]))
      else:
        categories = cityscapes.THING_CATEGORIES
      metadata.update(class_names=list(categories.names), dataset_ids=list(categories.ids),
                      source=config.source)
    return tfds.core.DatasetInfo(
        builder=self,
        description=f"pointrend-jax instance records ({config.source})",
        features=tfds.features.FeaturesDict({
            "image": _bytes_feature(),
            "file_name": tfds.features.Text(),
            "image_id": np.int64,
            "height": np.int32,
            "width": np.int32,
            "ann_id": tfds.features.Tensor(shape=(None,), dtype=np.int64),
            "boxes": tfds.features.Tensor(shape=(None, 4), dtype=np.float32),
            "classes": tfds.features.Tensor(shape=(None,), dtype=np.int64),
            "is_crowd": tfds.features.Tensor(shape=(None,), dtype=np.bool_),
            "area": _bytes_feature(),
            "segm_type": tfds.features.Tensor(shape=(None,), dtype=np.int8),
            "rle": tfds.features.Tensor(shape=(None,), dtype=np.object_),
            "polygon_counts": tfds.features.Tensor(shape=(None,), dtype=np.int32),
            "polygon_sizes": tfds.features.Tensor(shape=(None,), dtype=np.int32),
            "polygon_coords": _bytes_feature(),
        }),
        metadata=metadata,
        disable_shuffling=True,
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # Local sources only.
    return {split: self._generate_examples(split) for split, _, _ in self.builder_config.splits}

  def _generate_examples(self, split: str) -> Iterator[tuple[str, dict[str, Any]]]:
    records, categories = _load_instance_records(self.builder_config, split)
    if list(categories.ids) != self.info.metadata["dataset_ids"]:
      raise ValueError(f"split {split!r} has categories {list(categories.ids)}, the first split "
                       f"{self.info.metadata['dataset_ids']}: contiguous ids would differ")
    for index, record in enumerate(records):
      yield f"{index:010d}", _encode_instances(record)


# Cityscapes semantic.


@dataclasses.dataclass(eq=False)
class SemanticConfig(tfds.core.BuilderConfig):
  """Sources of a ``pointrend_cityscapes_semantic`` dataset: ``(split, Cityscapes root)``."""
  splits: tuple[tuple[str, str], ...] = ()


def _train_id_png(files: cityscapes.CityscapesFiles) -> bytes:
  if os.path.isfile(files.label_ids):
    train_ids = cityscapes.label_id_to_train_id(coco.read_label_map(files.label_ids))
  elif os.path.isfile(files.label_train_ids):
    train_ids = coco.read_label_map(files.label_train_ids)
  else:
    raise FileNotFoundError(f"neither {files.label_ids} nor {files.label_train_ids} exists "
                            f"(for image {files.image})")
  buf = io.BytesIO()
  Image.fromarray(train_ids).save(buf, format="PNG")
  return buf.getvalue()


class SemanticBuilder(tfds.core.GeneratorBasedBuilder):
  """Cityscapes semantic records (image + train-id PNG) as array_record."""
  name = SEMANTIC_BUILDER
  VERSION = _VERSION
  BUILDER_CONFIG_CLASS = SemanticConfig

  def _info(self) -> tfds.core.DatasetInfo:
    metadata = tfds.core.MetadataDict(class_names=list(cityscapes.SEM_SEG_CLASSES),
                                      dataset_ids=list(cityscapes.SEM_SEG_LABEL_IDS),
                                      ignore_label=cityscapes.IGNORE_LABEL)
    return tfds.core.DatasetInfo(
        builder=self,
        description="pointrend-jax Cityscapes semantic records (train ids, 255 = ignore)",
        features=tfds.features.FeaturesDict({
            "image": _bytes_feature(),
            "file_name": tfds.features.Text(),
            "sem_seg": _bytes_feature(),
            "sem_seg_file_name": tfds.features.Text(),
            "image_id": np.int64,
            "height": np.int32,
            "width": np.int32,
        }),
        metadata=metadata,
        disable_shuffling=True,
    )

  def _split_generators(self, dl_manager):
    del dl_manager
    return {split: self._generate_examples(split, root)
            for split, root in self.builder_config.splits}

  def _generate_examples(self, split: str, root: str) -> Iterator[tuple[str, dict[str, Any]]]:
    records = cityscapes.load_cityscapes_semantic(root, split, require_train_ids=False)
    files = cityscapes.cityscapes_files(root, split)
    for index, (record, f) in enumerate(zip(records, files)):
      yield f"{index:010d}", {
          "image": pathlib.Path(record["file_name"]).read_bytes(),
          "file_name": record["file_name"],
          "sem_seg": _train_id_png(f),
          "sem_seg_file_name": record["sem_seg_file_name"],
          "image_id": record["image_id"],
          "height": record["height"],
          "width": record["width"],
      }


# Public API.


def _check_kind(kind: str) -> None:
  if kind not in KINDS:
    raise ValueError(f"unknown kind {kind!r}; expected one of {KINDS}")


def prepare_tfds(kind: str,
                 sources: Mapping[str, Any],
                 data_dir: PathLike,
                 *,
                 name: str = "default",
                 overwrite: bool = False) -> tfds.core.DatasetBuilder:
  """Builds (or reuses) an array_record TFDS dataset from local sources.

  Args:
    kind: one of :data:`KINDS`.
    sources: split -> ``(annotations JSON, images folder)`` for ``coco_instances``; split ->
      Cityscapes root for the Cityscapes kinds.
    data_dir: TFDS data dir; the dataset lands in ``data_dir/<builder>/<name>/1.0.0``.
    name: the builder config name (tells datasets of one kind apart).
    overwrite: rebuild even if the dataset exists.

  Returns:
    The prepared builder (``builder.as_data_source(split)``, ``builder.info``).
  """
  _check_kind(kind)
  if not sources:
    raise ValueError("no splits given")
  if kind == "coco_instances":
    splits = []
    for split, value in sources.items():
      if not (isinstance(value, (tuple, list)) and len(value) == 2):
        raise ValueError(f"coco_instances source of split {split!r} must be (annotations JSON, "
                         f"images folder), got {value!r}")
      ann, images = (os.path.abspath(v) for v in value)
      if not os.path.isfile(ann):
        raise FileNotFoundError(f"COCO annotations file not found: {ann} (split {split!r})")
      if not os.path.isdir(images):
        raise FileNotFoundError(f"images folder not found: {images} (split {split!r})")
      splits.append((split, ann, images))
    config = InstancesConfig(name=name, source="coco", splits=tuple(splits),
                             description=f"COCO-format instances: {dict(sources)}")
    builder_cls = InstancesBuilder
  else:
    for split, root in sources.items():
      cityscapes.split_dirs(root, split)  # Fails early, saying what is expected where.
    if kind == "cityscapes_instances":
      config = InstancesConfig(name=name, source="cityscapes",
                               splits=tuple((s, os.path.abspath(r), "")
                                            for s, r in sources.items()),
                               description=f"Cityscapes instances: {dict(sources)}")
      builder_cls = InstancesBuilder
    else:
      config = SemanticConfig(name=name,
                              splits=tuple((s, os.path.abspath(r)) for s, r in sources.items()),
                              description=f"Cityscapes semantic: {dict(sources)}")
      builder_cls = SemanticBuilder
  builder = builder_cls(config=config, data_dir=os.fspath(data_dir),
                        file_format="array_record")
  mode = (tfds.download.GenerateMode.REUSE_CACHE_IF_EXISTS if overwrite
          else tfds.download.GenerateMode.REUSE_DATASET_IF_EXISTS)
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
      download_mode=mode))
  return builder


def example_to_record(example: Mapping[str, Any], kind: str) -> Record:
  """One example of ``tfds.data_source`` / ``as_data_source`` as a record (module docstring)."""
  _check_kind(kind)
  if kind != "cityscapes_semantic":
    return _decode_instances(example)
  return {
      "file_name": _text(example["file_name"]),
      "sem_seg_file_name": _text(example["sem_seg_file_name"]),
      "height": int(example["height"]),
      "width": int(example["width"]),
      "image_id": int(example["image_id"]),
      "image_bytes": bytes(example["image"]),
      "sem_seg_bytes": bytes(example["sem_seg"]),
  }


class TfdsRecords(collections.abc.Sequence):
  """Records of a prepared split, random access (a grain ``RandomAccessDataSource``)."""

  def __init__(self, data_dir: PathLike, kind: str, split: str, *, name: str = "default"):
    _check_kind(kind)
    self.kind = kind
    self._source = tfds.data_source(f"{_BUILDER_OF_KIND[kind]}/{name}", split=split,
                                    data_dir=os.fspath(data_dir))

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, index):  # pytype: disable=signature-mismatch
    if isinstance(index, slice):
      return [self[i] for i in range(*index.indices(len(self)))]
    n = len(self)
    index = index.__index__()
    if not -n <= index < n:  # Sequence iteration stops on IndexError.
      raise IndexError(f"record index {index} out of range for {n} records")
    return example_to_record(self._source[index % n], self.kind)

  def __repr__(self) -> str:
    return f"TfdsRecords({self._source!r}, kind={self.kind!r})"


def class_metadata(builder: tfds.core.DatasetBuilder) -> tuple[list[str], list[int]]:
  """``(class names, dataset ids)`` stored with a prepared dataset (any builder, including
  ``tfds.builder_from_directory``)."""
  metadata = builder.info.metadata or {}
  return list(metadata.get("class_names", [])), [int(i) for i in
                                                 metadata.get("dataset_ids", [])]


__all__ = [
    "INSTANCES_BUILDER", "SEMANTIC_BUILDER", "KINDS", "InstancesBuilder", "InstancesConfig",
    "SemanticBuilder", "SemanticConfig", "prepare_tfds", "example_to_record", "TfdsRecords",
    "class_metadata",
]
