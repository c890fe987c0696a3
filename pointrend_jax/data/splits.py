"""Dataset splits of a run config: ``config.data.train`` / ``config.data.val`` -> records.

``source`` is ``coco`` (annotations JSON + image folder), ``cityscapes`` (root with
``leftImg8bit`` / ``gtFine``), ``tfds`` (the array_record builders of
:mod:`~pointrend_jax.data.tfds_builders`, ``root`` = TFDS data dir) or ``synthetic`` (generated
under ``root``, default ``<workdir>/data``). A missing path raises :class:`DataError` saying what
was expected where and how to provide it; a malformed file :class:`DatasetError` naming the file
and id. Every loaded split's category count must equal the model's class count
(:func:`check_num_classes`).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from pointrend_jax.errors import ConfigError, DataError, DatasetError
from pointrend_jax.modeling.config import ModelConfig

logger = logging.getLogger(__name__)

__all__ = ["SOURCES", "Split", "load_split", "check_num_classes"]

SOURCES = ("coco", "cityscapes", "tfds", "synthetic")


@dataclasses.dataclass
class Split:
  """One split's records and what its evaluation needs.

  Attributes:
    which: ``"train"`` or ``"val"`` (the config section).
    source: ``coco`` | ``cityscapes`` | ``tfds`` | ``synthetic``.
    records: ``coco``-format records (``sem_seg_file_name`` for semantic).
    class_names: thing classes (instance) or semantic classes.
    coco_gt: COCO ground truth (JSON path or parsed dict) for COCO-style evaluation.
    cityscapes_gt: per record, the ``gtFine`` files (``instanceIds`` / ``labelIds``) for the
      official Cityscapes metrics.
  """
  which: str
  source: str
  records: Sequence[Mapping[str, Any]]
  class_names: tuple[str, ...]
  coco_gt: str | Mapping[str, Any] | None = None
  cityscapes_gt: Sequence[Any] | None = None


def _require(exists, path: str, what: str, key: str, how: str) -> None:
  """``exists`` is ``os.path.isfile`` or ``os.path.isdir``."""
  if not path or not exists(path):
    raise DataError(f"expected {what} at {path or '(unset)'} (config.{key}); {how}")


def _synthetic_root(config: Any, which: str, workdir: str) -> str:
  root = str(config.data[which].get("root", "") or "")
  return root or os.path.join(workdir, "data")


def _coco_gt_from_records(records: Sequence[Mapping[str, Any]], names: Sequence[str],
                          ids: Sequence[int]) -> dict[str, Any]:
  """A COCO ground-truth dict from records (TFDS-stored COCO data has no JSON at hand)."""
  from pointrend_jax.data import coco
  images, anns = [], []
  for r in records:
    images.append({"id": int(r["image_id"]), "height": int(r["height"]),
                   "width": int(r["width"]), "file_name": str(r.get("file_name", ""))})
    for a in r.get("annotations", ()):
      x0, y0, x1, y1 = (float(v) for v in a["bbox"])
      segm = a.get("segmentation")
      segm = [list(map(float, p)) for p in segm] if isinstance(segm, (list, tuple)) else dict(segm)
      area = a.get("area")
      if area is None or not np.isfinite(area):
        area = float(coco.decode_segmentation(segm, int(r["height"]), int(r["width"])).sum())
      anns.append({"id": len(anns) + 1, "image_id": int(r["image_id"]),
                   "category_id": int(ids[int(a["category_id"])]), "iscrowd": int(a["iscrowd"]),
                   "bbox": [x0, y0, x1 - x0, y1 - y0], "area": float(area),
                   "segmentation": segm})
  return {"images": images, "annotations": anns,
          "categories": [{"id": int(i), "name": n} for i, n in zip(ids, names)]}


def _split_origin(config: Any, which: str, workdir: str) -> str:
  """Where ``config.data.<which>`` reads from, for messages (the annotations file, the root)."""
  s = config.data[which]
  source = str(s.source)
  if source == "coco":
    return f"COCO annotations {s.annotations}"
  if source == "cityscapes":
    return f"Cityscapes root {s.root}"
  if source == "synthetic":
    return f"synthetic dataset at {_synthetic_root(config, which, workdir)}"
  return f"TFDS data dir {s.root}"


def check_num_classes(split: Split, mcfg: ModelConfig, origin: str = "") -> None:
  """Raises unless the split's category count equals the model's class count.

  The data pipeline maps categories to contiguous ids ``0..C-1``; a model with fewer classes
  would train on out-of-range labels without any error, one with more on never-seen classes.

  Args:
    split: from :func:`load_split` (``class_names``: its contiguous categories).
    mcfg: the model config (``roi_heads.num_classes`` / ``sem_seg_head.num_classes``).
    origin: where the split was read from (for the message).

  Raises:
    ConfigError: the counts differ; the message names ``config.model.num_classes``.
  """
  have = len(split.class_names)
  if not have:
    # TFDS datasets prepared without class metadata: nothing to compare against.
    logger.warning("config.data.%s (%s) stores no class names; cannot check that it has %d "
                   "classes", split.which, origin or split.source, mcfg.num_classes)
    return
  if have == mcfg.num_classes:
    return
  head = "sem_seg_head" if mcfg.is_semantic else "roi_heads"
  what = "semantic classes" if mcfg.is_semantic else "categories"
  if split.source == "cityscapes" and mcfg.is_semantic:
    what = "semantic classes (Cityscapes train ids)"
  raise ConfigError(
      f"config.data.{split.which} ({origin or split.source}) has {have} {what} but the model "
      f"has {mcfg.num_classes} classes ({head}.num_classes); set --config.model.num_classes="
      f"{have} (or point config.data.{split.which} at the dataset the model is for)")


def load_split(config: Any, which: str, workdir: str,
               mcfg: ModelConfig) -> Split:
  """Records of ``config.data.<which>`` (see the module docstring); errors say what is missing.

  Raises:
    DataError: a path the config names does not exist.
    DatasetError: a dataset file is malformed (the message names the file / id).
    ConfigError: unknown source, a source that cannot feed this model type, or a category
      count different from the model's class count (:func:`check_num_classes`).
  """
  try:
    split = _load_split(config, which, workdir, mcfg)
  except (DataError, ConfigError):
    raise
  except FileNotFoundError as e:  # an image / ground-truth file of the dataset
    raise DataError(f"{e} (config.data.{which})") from e
  except ValueError as e:  # the loaders' malformed-file errors name the file and the id
    raise DatasetError(f"{e} (config.data.{which})") from e
  check_num_classes(split, mcfg, _split_origin(config, which, workdir))
  return split


def _load_split(config: Any, which: str, workdir: str,
                mcfg: ModelConfig) -> Split:
  from pointrend_jax.data import cityscapes, coco
  s = config.data[which]
  source = str(s.source)
  split = str(s.split)
  semantic = mcfg.is_semantic
  key = f"data.{which}"
  if source not in SOURCES:
    raise ConfigError(f"config.{key}.source must be one of {SOURCES}, got {source!r}")

  if source == "synthetic":
    from pointrend_jax.data import synthetic
    syn = config.data.synthetic
    root = _synthetic_root(config, which, workdir)
    t0 = time.perf_counter()
    ds = synthetic.ensure_synthetic_dataset(
        root, num_train=int(syn.num_train), num_val=int(syn.num_val),
        image_size=tuple(int(v) for v in syn.image_size), seed=int(syn.seed))
    logger.info("synthetic dataset at %s (%.1f s)", ds.root, time.perf_counter() - t0)
    if split not in ds.splits:
      raise ConfigError(f"config.{key}.split must be one of {tuple(ds.splits)}, got "
                             f"{split!r}")
    records = synthetic.load_synthetic_records(ds, split)
    if semantic:
      return Split(which, source, records, synthetic.SEM_SEG_CLASSES)
    return Split(which, source, records, synthetic.THING_CLASSES,
                 coco_gt=str(ds.splits[split].annotations))

  if source == "coco":
    if semantic:
      raise ConfigError(f"config.{key}.source 'coco' provides instances; semantic models "
                             "need 'cityscapes', 'tfds' (cityscapes_semantic) or 'synthetic'")
    how = ("download COCO 2017 from https://cocodataset.org/#download (annotations_trainval2017"
           ".zip and the train2017 / val2017 image zips), unzip them under "
           "$POINTREND_DATASETS/coco (annotations/, train2017/, val2017/) or point "
           f"--config.{key}.annotations=/path/instances_{split or '<split>'}.json and "
           f"--config.{key}.images=/path/{split or '<split>'}")
    _require(os.path.isfile, str(s.annotations), "COCO annotations", f"{key}.annotations", how)
    _require(os.path.isdir, str(s.images), "COCO images", f"{key}.images", how)
    dataset = coco.load_coco_dataset(str(s.annotations), str(s.images))
    return Split(which, source, dataset.records, dataset.categories.names,
                 coco_gt=str(s.annotations))

  if source == "cityscapes":
    root = str(s.root)
    how = ("download leftImg8bit_trainvaltest.zip and gtFine_trainvaltest.zip from "
           "https://www.cityscapes-dataset.com/downloads/, unzip both under one folder and "
           f"point --config.{key}.root=/path/to/cityscapes (or set $POINTREND_DATASETS)")
    _require(os.path.isdir, root, "the Cityscapes root (leftImg8bit/, gtFine/)", f"{key}.root", how)
    try:
      cityscapes.split_dirs(root, split)
    except FileNotFoundError as e:
      raise DataError(f"{e} (config.{key}.root / .split); {how}") from e
    files = cityscapes.cityscapes_files(root, split)
    if semantic:
      records = cityscapes.load_cityscapes_semantic(root, split)
      return Split(which, source, records, cityscapes.SEM_SEG_CLASSES, cityscapes_gt=files)
    records = cityscapes.load_cityscapes_instances(root, split)
    return Split(which, source, records, cityscapes.THING_CLASSES, cityscapes_gt=files)

  # TFDS (array_record builders of pointrend_jax.data.tfds_builders).
  from pointrend_jax.data import tfds_builders
  root = str(s.root)
  kind = str(s.get("tfds_kind", "") or "") or ("cityscapes_semantic" if semantic
                                               else "coco_instances")
  name = str(s.get("tfds_name", "default") or "default")
  builder_name = (tfds_builders.SEMANTIC_BUILDER if kind == "cityscapes_semantic"
                  else tfds_builders.INSTANCES_BUILDER)
  builder_dir = os.path.join(root, builder_name, name)
  how = ("prepare it with pointrend_jax.data.tfds_builders.prepare_tfds(kind, sources, "
         f"data_dir, name=...) and point --config.{key}.root at that data_dir")
  _require(os.path.isdir, builder_dir, f"a prepared TFDS dataset ({kind}/{name})", f"{key}.root",
           how)
  if semantic != (kind == "cityscapes_semantic"):
    raise ConfigError(f"config.{key}.tfds_kind {kind!r} does not fit a "
                           f"{'semantic' if semantic else 'instance'} model")
  records = tfds_builders.TfdsRecords(root, kind, split, name=name)
  import tensorflow_datasets as tfds
  versions = sorted((d for d in os.listdir(builder_dir) if re.fullmatch(r"\d+\.\d+\.\d+", d)),
                    key=lambda v: tuple(int(x) for x in v.split(".")))
  if not versions:
    raise DataError(f"no prepared version under {builder_dir} (config.{key}.root); {how}")
  builder = tfds.builder_from_directory(os.path.join(builder_dir, versions[-1]))
  names, ids = tfds_builders.class_metadata(builder)
  if which == "val":
    records = list(records)
    if kind == "coco_instances":
      return Split(which, source, records, tuple(names),
                   coco_gt=_coco_gt_from_records(records, names, ids))
    raise ConfigError(f"config.{key}: evaluating Cityscapes needs the gtFine files the "
                           "official metrics read; use source='cityscapes' for data.val")
  return Split(which, source, records, tuple(names))
