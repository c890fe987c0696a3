"""Config-driven training and evaluation: what ``launch.py`` runs.

:func:`train_and_evaluate` and :func:`evaluate` build everything from the config's keys (see
``configs/common.py`` for the layout):

* **Data** (:func:`load_split`): ``source`` ``coco`` (annotations JSON + image folder),
  ``cityscapes`` (root with ``leftImg8bit`` / ``gtFine``), ``tfds`` (our array_record builders,
  ``root`` = TFDS data dir) or ``synthetic`` (generated under ``root``, default
  ``<workdir>/data``). A missing path raises :class:`DataError` saying what was expected where
  and how to provide it. Training uses :func:`~pointrend_jax.data.pipeline.build_train_loader`
  (its iterator state is checkpointed with the model), evaluation
  :func:`~pointrend_jax.data.pipeline.build_eval_loader`.
  Every loaded split's category count must equal the model's class count
  (:func:`check_num_classes`; a mismatch raises :class:`ConfigError` naming
  ``config.model.num_classes``).
* **Model**: ``config.model.zoo`` / ``overrides`` / ``num_classes`` ->
  :class:`~pointrend_jax.modeling.config.ModelConfig` ->
  :func:`~pointrend_jax.modeling.meta_arch.build_model` (instance or semantic).
* **Init** (``config.init.weights``): a detectron2 file whose names cover only the backbone
  (ImageNet ``R-50.pkl``) loads ``backbone.bottom_up`` strictly and keeps the random init
  elsewhere; a full detectron2 model loads strictly; a directory is a converted orbax checkpoint
  (:func:`~pointrend_jax.checkpoint.orbax_io.load_converted`).
* **Training**: :func:`~pointrend_jax.training.train.train_loop` with the instance or semantic
  losses (``solver.max_iter`` = ``train.max_steps``, ``train.eval_every`` = ``eval.every``).
* **Evaluation** (:class:`Evaluator`): instance models run ``predict`` jitted once per input
  bucket, :func:`~pointrend_jax.modeling.meta_arch.postprocess_instances`, then COCO AP
  (:class:`~pointrend_jax.evaluation.coco_eval.COCOEvaluator`; the COCO tables are logged and
  the results JSON written to ``<workdir>/eval``) or the official Cityscapes instance AP. Mask
  AP is computed twice when ``eval.coarse_masks``: with PointRend's subdivided masks (``segm``)
  and with the 7x7 coarse logits pasted bilinearly (``segm_coarse``), the Mask R-CNN-style
  baseline. Semantic models: mIoU (Cityscapes' official pixel metrics on Cityscapes).
  Metrics go to ``metrics.jsonl`` and TensorBoard as ``eval/<task>/<metric>``.
* After the final evaluation ``eval.num_visualize`` val images get prediction overlays and
  point-stage pictures (``<workdir>/pictures``), and a summary is printed and written to
  ``<workdir>/summary.json``.
* **Export**: a completed training run writes its final model to ``<workdir>/model`` as a
  converted checkpoint (:func:`~pointrend_jax.checkpoint.orbax_io.save_converted`: the full
  ``ModelConfig`` + the variables, and the dataset's class names), which
  ``Predictor(None, "<workdir>/model")`` and ``python -m pointrend_jax.tools.predict --weights
  <workdir>/model`` load; ``python -m pointrend_jax.tools.export`` does the same for any
  checkpoint of a workdir (:func:`restore_model`).

Errors a user can fix raise :class:`DataError` (a missing file), :class:`DatasetError` (a
malformed dataset file) or :class:`ConfigError` (a bad or mismatched config value);
``launch.py`` prints those and the rest of :data:`USER_ERRORS` as one line.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import os
import re
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import tqdm
from flax import nnx

from pointrend_jax.errors import ConfigError, DataError, DatasetError
from pointrend_jax.data import pipeline
from pointrend_jax.modeling import config as config_lib
from pointrend_jax.modeling import zoo
from pointrend_jax.training import checkpointing
from pointrend_jax.training import mesh as mesh_lib
from pointrend_jax.training import optimizer as optimizer_lib
from pointrend_jax.training import train as train_lib
from pointrend_jax.training.logging import MetricWriter

__all__ = [
    "Split",
    "check_num_classes",
    "load_split",
    "build_model",
    "init_weights",
    "Evaluator",
    "train_and_evaluate",
    "evaluate",
    "restore_model",
    "export_model",
    "read_workdir_config",
    "EXPORT_DIR",
]

logger = logging.getLogger(__name__)

SOURCES = ("coco", "cityscapes", "tfds", "synthetic")


# The final model of a completed run, as a converted checkpoint (Predictor / tools.predict).
EXPORT_DIR = "model"
# Class names of the training data, for the export tool (written at the start of training).
CLASS_NAMES_FILE = "class_names.json"


# --------------------------------------------------------------------------------------------------
# Config -> model config and input config.
# --------------------------------------------------------------------------------------------------


# --------------------------------------------------------------------------------------------------
# Data sources.
# --------------------------------------------------------------------------------------------------


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


def _section(config: ml_collections.ConfigDict, which: str) -> ml_collections.ConfigDict:
  return config.data[which]


def _require_file(path: str, what: str, key: str, how: str) -> None:
  if not path or not os.path.isfile(path):
    raise DataError(f"expected {what} at {path or '(unset)'} (config.{key}); {how}")


def _require_dir(path: str, what: str, key: str, how: str) -> None:
  if not path or not os.path.isdir(path):
    raise DataError(f"expected {what} at {path or '(unset)'} (config.{key}); {how}")


def _synthetic_root(config: ml_collections.ConfigDict, which: str, workdir: str) -> str:
  root = str(_section(config, which).get("root", "") or "")
  return root or os.path.join(workdir, "data")


def _coco_gt_from_records(records: Sequence[Mapping[str, Any]], names: Sequence[str],
                          ids: Sequence[int]) -> dict[str, Any]:
  """A COCO ground-truth dict from records (TFDS-stored COCO data has no JSON at hand)."""
  import pycocotools.mask as mask_util
  images, anns = [], []
  for r in records:
    images.append({"id": int(r["image_id"]), "height": int(r["height"]),
                   "width": int(r["width"]), "file_name": str(r.get("file_name", ""))})
    for a in r.get("annotations", ()):
      x0, y0, x1, y1 = (float(v) for v in a["bbox"])
      segm = a.get("segmentation")
      if isinstance(segm, (list, tuple)):
        segm = [list(map(float, p)) for p in segm]
        rle = mask_util.merge(mask_util.frPyObjects(segm, int(r["height"]), int(r["width"])))
      else:
        segm = dict(segm)
        rle = {"size": segm["size"], "counts": segm["counts"].encode()
               if isinstance(segm["counts"], str) else segm["counts"]}
      area = a.get("area")
      if area is None or not np.isfinite(area):
        area = float(mask_util.area(rle))
      anns.append({"id": len(anns) + 1, "image_id": int(r["image_id"]),
                   "category_id": int(ids[int(a["category_id"])]), "iscrowd": int(a["iscrowd"]),
                   "bbox": [x0, y0, x1 - x0, y1 - y0], "area": float(area),
                   "segmentation": segm})
  return {"images": images, "annotations": anns,
          "categories": [{"id": int(i), "name": n} for i, n in zip(ids, names)]}


def _split_origin(config: ml_collections.ConfigDict, which: str, workdir: str) -> str:
  """Where ``config.data.<which>`` reads from, for messages (the annotations file, the root)."""
  s = _section(config, which)
  source = str(s.source)
  if source == "coco":
    return f"COCO annotations {s.annotations}"
  if source == "cityscapes":
    return f"Cityscapes root {s.root}"
  if source == "synthetic":
    return f"synthetic dataset at {_synthetic_root(config, which, workdir)}"
  return f"TFDS data dir {s.root}"


def check_num_classes(split: Split, mcfg: config_lib.ModelConfig, origin: str = "") -> None:
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


def load_split(config: ml_collections.ConfigDict, which: str, workdir: str,
               mcfg: config_lib.ModelConfig) -> Split:
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


def _load_split(config: ml_collections.ConfigDict, which: str, workdir: str,
                mcfg: config_lib.ModelConfig) -> Split:
  from pointrend_jax.data import cityscapes, coco
  s = _section(config, which)
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
    _require_file(str(s.annotations), "COCO annotations", f"{key}.annotations", how)
    _require_dir(str(s.images), "COCO images", f"{key}.images", how)
    dataset = coco.load_coco_dataset(str(s.annotations), str(s.images))
    return Split(which, source, dataset.records, dataset.categories.names,
                 coco_gt=str(s.annotations))

  if source == "cityscapes":
    root = str(s.root)
    how = ("download leftImg8bit_trainvaltest.zip and gtFine_trainvaltest.zip from "
           "https://www.cityscapes-dataset.com/downloads/, unzip both under one folder and "
           f"point --config.{key}.root=/path/to/cityscapes (or set $POINTREND_DATASETS)")
    _require_dir(root, "the Cityscapes root (leftImg8bit/, gtFine/)", f"{key}.root", how)
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
  _require_dir(builder_dir, f"a prepared TFDS dataset ({kind}/{name})", f"{key}.root", how)
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


# --------------------------------------------------------------------------------------------------
# Model and weights.
# --------------------------------------------------------------------------------------------------


def build_model(config: ml_collections.ConfigDict, mcfg: config_lib.ModelConfig) -> nnx.Module:
  """The randomly initialised model (seed ``config.seed``)."""
  from pointrend_jax.modeling import meta_arch
  return meta_arch.build_model(mcfg, nnx.Rngs(int(config.get("seed", 0) or 0)))


_HEAD_PREFIXES = ("proposal_generator.", "roi_heads.", "sem_seg_head.", "backbone.fpn_",
                  "backbone.top_block")


def init_weights(model: nnx.Module, config: ml_collections.ConfigDict) -> str:
  """Loads ``config.init.weights`` into ``model`` in place; returns a one-line description."""
  from pointrend_jax.checkpoint import d2_reader
  from pointrend_jax.modeling import meta_arch
  path = str(config.init.get("weights", "") or "")
  if not path:
    return "random initialisation (config.init.weights is empty)"
  if path.startswith(("detectron2://", "http://", "https://")):
    url = path.replace("detectron2://", "https://dl.fbaipublicfiles.com/detectron2/")
    raise DataError(f"config.init.weights is a URL ({path}); nothing is downloaded at run time: "
                    f"download {url} and set --config.init.weights=/local/path")
  local = os.path.expanduser(path.split("?", 1)[0])
  if os.path.isdir(local):
    from pointrend_jax.checkpoint import orbax_io
    _, loaded = orbax_io.load_converted(local)
    ours = nnx.state(model)
    theirs = nnx.state(loaded)
    if jax.tree.structure(nnx.to_pure_dict(ours)) != jax.tree.structure(
        nnx.to_pure_dict(theirs)):
      raise d2_reader.CheckpointError(
          f"{local}: the converted model's structure differs from config.model's; use the "
          "config the checkpoint was converted with")
    for a, b in zip(jax.tree.leaves(nnx.to_pure_dict(ours)),
                    jax.tree.leaves(nnx.to_pure_dict(theirs))):
      if a.shape != b.shape:
        raise d2_reader.CheckpointError(f"{local}: shape {b.shape} != model's {a.shape}")
    nnx.update(model, theirs)
    return f"converted orbax checkpoint {local}"
  if not os.path.isfile(local):
    raise DataError(f"expected weights at {local} (config.init.weights); download the "
                    "detectron2 file (ImageNet backbones: https://dl.fbaipublicfiles.com/"
                    "detectron2/ImageNetPretrained/MSRA/R-50.pkl etc.), point "
                    "--config.init.weights at it, or set it to '' to train from scratch")
  ckpt = d2_reader.load_detectron2_file(path)
  full = any(k.startswith(_HEAD_PREFIXES) for k in ckpt.state)
  report = meta_arch.load_d2_model(model, ckpt, strict=True, backbone_only=not full)
  what = "full detectron2 model" if full else "detectron2 backbone (ImageNet) weights"
  return f"{what} {local}: {report.format(limit=5).splitlines()[0]}"


# --------------------------------------------------------------------------------------------------
# Evaluation.
# --------------------------------------------------------------------------------------------------


def _to_host(tree: Any) -> Any:
  """Device (possibly multi-process global) arrays -> numpy, gathered on every process."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    return multihost_utils.process_allgather(tree, tiled=True)
  return jax.tree.map(np.asarray, jax.device_get(tree))


class _JitPerBucket:
  """``fn(model, images, sizes)`` under ``nnx.jit``; logs each new input shape (a compile)."""

  def __init__(self, fn: Callable[..., Any], name: str):
    self._fn = nnx.jit(fn)
    self._name = name
    self._seen: set[tuple[int, ...]] = set()

  def __call__(self, model: nnx.Module, images: Any, sizes: Any) -> Any:
    shape = tuple(images.shape)
    if shape not in self._seen:
      self._seen.add(shape)
      logger.info("compiling %s for bucket %dx%d (batch %d)", self._name, shape[1], shape[2],
                  shape[0])
    return self._fn(model, images, sizes)


def _instance_outputs(model, images, sizes):
  """``predict`` plus the mask head's small intermediates (coarse logits, subdivision points)."""
  out = model.predict(images, sizes, return_intermediates=True)
  inter = out.pop("intermediates")["mask"]
  b, d = out["valid"].shape
  res = {k: out[k] for k in ("boxes", "scores", "classes", "valid")}
  res["mask_probs"] = jax.nn.sigmoid(out["mask_logits"])
  coarse = inter["coarse_logits_class"]
  res["coarse_probs"] = jax.nn.sigmoid(coarse).reshape((b, d) + coarse.shape[1:])
  init = inter["init_logits"]
  res["init_logits"] = init.reshape((b, d) + init.shape[1:])
  if inter["indices"]:
    res["indices"] = jnp.stack(inter["indices"], axis=1).reshape(b, d, len(inter["indices"]), -1)
    res["point_logits"] = jnp.stack(inter["point_logits"], axis=1).reshape(
        b, d, len(inter["indices"]), -1)
  return res


def _semantic_outputs(model, images, sizes):
  return model(images, sizes)


class Evaluator:
  """Evaluates a model on ``config.data.val``; one instance per run (compiles are kept).

  Args:
    config: the run config.
    workdir: where results, pictures and the summary go.
    mcfg: the model config.
    split: the val :class:`Split` (default: loaded from the config).
    mesh: the device mesh (batches are split over it when they divide evenly).
  """

  def __init__(self, config: ml_collections.ConfigDict, workdir: str,
               mcfg: config_lib.ModelConfig, split: Split | None = None,
               mesh: jax.sharding.Mesh | None = None):
    self.config = config
    self.workdir = workdir
    self.mcfg = mcfg
    self.split = split or load_split(config, "val", workdir, mcfg)
    self.mesh = mesh or mesh_lib.make_mesh()
    ev = config.eval
    n = int(ev.get("num_images", 0) or 0)
    records = list(self.split.records)
    self.records = records[:n] if n > 0 else records
    self.partial = len(self.records) < len(records)
    per_process = max(1, int(ev.get("batch_size", 1)))
    local = jax.local_device_count()
    self.batch_size = -(-per_process // local) * local  # a multiple of the local devices
    self.input_cfg = pipeline.loader_config(config.data, mcfg)
    self.loader = pipeline.build_eval_loader(
        self.records, self.batch_size, config=self.input_cfg,
        worker_count=int(config.data.get("num_workers", 0)),
        padding=str(config.data.get("eval_padding", "bucket")), with_targets=False)
    self.coarse = bool(ev.get("coarse_masks", True)) and not mcfg.is_semantic
    self.threshold = float(ev.get("mask_threshold", 0.5))
    fn = _semantic_outputs if mcfg.is_semantic else _instance_outputs
    self._predict = _JitPerBucket(fn, "predict")
    self._sem_post: dict[Any, Callable[..., Any]] = {}
    self.last_visuals: list[dict[str, Any]] = []

  # -- helpers ---------------------------------------------------------------------------------

  def _device_batch(self, batch: Mapping[str, np.ndarray]) -> tuple[Any, Any]:
    images, sizes = batch["image"], batch["image_size"]
    if (jax.process_count() > 1 or
        images.shape[0] * jax.process_count() % self.mesh.devices.size == 0):
      placed = mesh_lib.shard_batch({"image": images, "image_size": sizes}, self.mesh)
      return placed["image"], placed["image_size"]
    return images, sizes

  def _batches(self, desc: str):
    bar = tqdm.tqdm(self.loader, total=len(self.loader), desc=desc, unit="batch",
                    disable=jax.process_index() != 0 or not bool(
                        self.config.train.get("progress_bar", True)), dynamic_ncols=True)
    for batch in bar:
      meta = {k: batch[k] for k in ("image_size", "orig_size", "image_id", "record_index",
                                    "valid")}
      images, sizes = self._device_batch(batch)
      yield batch, _to_host(meta), images, sizes
    bar.close()

  # -- instance --------------------------------------------------------------------------------

  def _evaluate_instances(self, model: nnx.Module, step: int, final: bool) -> dict[str, float]:
    from pointrend_jax.evaluation import coco_eval
    from pointrend_jax.modeling.meta_arch import postprocess_instances
    city = self.split.cityscapes_gt is not None
    variants = ["segm"] + (["segm_coarse"] if self.coarse else [])
    if city:
      from pointrend_jax.data import cityscapes as cs
      from pointrend_jax.evaluation import cityscapes_eval
      evaluators = {v: cityscapes_eval.CityscapesInstanceEvaluator() for v in variants}
    else:
      gt = self._coco_api()
      evaluators = {"segm": coco_eval.COCOEvaluator(gt, ("bbox", "segm"))}
      if self.coarse:
        evaluators["segm_coarse"] = coco_eval.COCOEvaluator(gt, ("segm",))
    num_vis = int(self.config.eval.get("num_visualize", 0) or 0) if final else 0
    visuals: list[dict[str, Any]] = []
    t0 = time.perf_counter()
    for batch, meta, images, sizes in self._batches(f"eval step {step}"):
      out = _to_host(self._predict(model, images, sizes))
      per_variant = {"segm": postprocess_instances(out, meta["image_size"], meta["orig_size"],
                                                   mask_threshold=self.threshold)}
      if self.coarse:
        per_variant["segm_coarse"] = postprocess_instances(
            dict(out, mask_probs=out["coarse_probs"]), meta["image_size"], meta["orig_size"],
            mask_threshold=self.threshold)
      for i in np.flatnonzero(meta["valid"]):
        record = self.records[int(meta["record_index"][i])]
        for v, results in per_variant.items():
          r = results[i]
          if city:
            label_ids = np.asarray(cs.THING_LABEL_IDS)[r["classes"].astype(np.int64)]
            gt_ids = self._cityscapes_instance_ids(record)
            evaluators[v].add(gt_ids, r["masks"], label_ids, r["scores"])
          else:
            evaluators[v].add_instances(int(record["image_id"]), r["boxes"], r["scores"],
                                        r["classes"], r["masks"])
        if len(visuals) < num_vis and jax.process_index() == 0:
          # Only the row of this image (the batch axis may hold padding images).
          visuals.append(dict(
              record=record, image=np.asarray(batch["image"])[i] if jax.process_count() == 1
              else None, image_size=meta["image_size"][i], orig_size=meta["orig_size"][i],
              outputs={k: v[i] for k, v in out.items()},
              results={v: res[i] for v, res in per_variant.items()}))
    logger.info("evaluation at step %d: %d images predicted in %.1f s", step, len(self.records),
                time.perf_counter() - t0)
    metrics: dict[str, float] = {}
    for v, ev in evaluators.items():
      if city:
        m = ev.compute()
        logger.info("Cityscapes instance AP (%s masks):\n%s", v, ev.table(m))
        metrics.update({f"eval/{v}/{k.split('/', 1)[1]}": val for k, val in m.items()})
        continue
      img_ids = ev.seen_image_ids if self.partial else None
      m = ev.compute(img_ids=img_ids)
      for task, summary in ev.summaries.items():
        name = "segm_coarse" if (v == "segm_coarse" and task == "segm") else task
        logger.info("COCO %s (step %d, %d images):\n%s\n%s", name, step, len(self.records),
                    summary.rstrip(), ev.per_category_table(task))
      for k, val in m.items():
        task, metric = k.split("/", 1)
        name = "segm_coarse" if (v == "segm_coarse" and task == "segm") else task
        metrics[f"eval/{name}/{metric}"] = val
      if jax.process_index() == 0:
        os.makedirs(os.path.join(self.workdir, "eval"), exist_ok=True)
        suffix = "" if v == "segm" else "_coarse"
        coco_eval.write_results_json(
            ev.results, os.path.join(self.workdir, "eval",
                                     f"coco_instances_results{suffix}.json"))
    self.last_visuals = visuals
    return metrics

  def _coco_api(self):
    if getattr(self, "_coco_gt_api", None) is None:
      import contextlib
      import io
      from pycocotools.coco import COCO
      from pointrend_jax.data.coco import read_coco_json
      gt = self.split.coco_gt
      api = COCO()
      api.dataset = dict(gt) if isinstance(gt, Mapping) else read_coco_json(gt)
      with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
        api.createIndex()
      self._coco_gt_api = api
    return self._coco_gt_api

  def _cityscapes_instance_ids(self, record: Mapping[str, Any]) -> np.ndarray:
    from PIL import Image
    files = self.split.cityscapes_gt[int(record["image_id"])]
    with Image.open(files.instance_ids) as im:
      return np.asarray(im, np.int64)

  # -- semantic --------------------------------------------------------------------------------

  def _sem_postprocess(self, size: tuple[int, int], orig: tuple[int, int]) -> Callable[..., Any]:
    from pointrend_jax.modeling.semantic import sem_seg_postprocess
    key = (size, orig)
    if key not in self._sem_post:
      logger.info("compiling semantic postprocess %s -> %s", size, orig)
      self._sem_post[key] = jax.jit(lambda logits: jnp.argmax(
          sem_seg_postprocess(logits, size, orig), axis=-1).astype(jnp.uint8))
    return self._sem_post[key]

  def _evaluate_semantic(self, model: nnx.Module, step: int) -> dict[str, float]:
    from pointrend_jax.data import coco
    city = self.split.cityscapes_gt is not None
    if city:
      from pointrend_jax.evaluation import cityscapes_eval
      ev = cityscapes_eval.CityscapesSemSegEvaluator()
    else:
      from pointrend_jax.evaluation import sem_seg
      ev = sem_seg.SemSegEvaluator(self.mcfg.sem_seg_head.num_classes, self.split.class_names,
                                   ignore_label=self.mcfg.sem_seg_head.ignore_value)
    for _, meta, images, sizes in self._batches(f"eval step {step}"):
      logits = _to_host(self._predict(model, images, sizes))
      for i in np.flatnonzero(meta["valid"]):
        record = self.records[int(meta["record_index"][i])]
        size = tuple(int(v) for v in meta["image_size"][i])
        orig = tuple(int(v) for v in meta["orig_size"][i])
        pred = np.asarray(self._sem_postprocess(size, orig)(logits[i]))
        if city:
          from PIL import Image
          files = self.split.cityscapes_gt[int(record["image_id"])]
          with Image.open(files.label_ids) as im:
            gt_labels = np.asarray(im, np.int64)
          with Image.open(files.instance_ids) as im:
            gt_inst = np.asarray(im, np.int64)
          ev.add(pred, gt_labels, gt_inst)
        else:
          ev.add(pred, coco.read_label_map(record["sem_seg_file_name"]))
    m = ev.compute()
    if city:
      logger.info("Cityscapes semantic (step %d):\n%s", step, ev.table())
    else:
      logger.info("semantic segmentation (step %d): %s", step,
                  {k: round(v, 2) for k, v in m.items() if "-" not in k})
    return {f"eval/{k}": v for k, v in m.items()}

  # -- entry -----------------------------------------------------------------------------------

  def __call__(self, model: nnx.Module, step: int, *, final: bool = False) -> dict[str, float]:
    if self.mcfg.is_semantic:
      return self._evaluate_semantic(model, step)
    return self._evaluate_instances(model, step, final)


# --------------------------------------------------------------------------------------------------
# Training / evaluation entry points.
# --------------------------------------------------------------------------------------------------


def _loop_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The keys :func:`~pointrend_jax.training.train.train_loop` reads, from ours."""
  c = ml_collections.ConfigDict(copy.deepcopy(config.to_dict()))
  c.solver.max_iter = int(config.train.max_steps)
  c.train.eval_every = int(config.eval.get("every", 0) or 0)
  return c


class _SlowIterator:
  """Sleeps before each batch (``train.debug_step_delay_s``; preemption tests only)."""

  def __init__(self, it: Any, delay: float):
    self._it, self._delay = it, delay

  def __next__(self):
    time.sleep(self._delay)
    return next(self._it)

  def get_state(self):
    return self._it.get_state()

  def set_state(self, state):
    self._it.set_state(state)


def _check_config(config: ml_collections.ConfigDict) -> None:
  for key in ("seed", "train.max_steps", "train.batch_size", "train.checkpoint_every",
              "train.log_every", "eval.every", "init.weights", "data.train", "data.val",
              "solver.base_lr", "model.zoo"):
    node = config
    for part in key.split("."):
      if not isinstance(node, ml_collections.ConfigDict) or part not in node:
        raise ConfigError(f"config is missing required key {key!r} (see configs/common.py)")
      node = node[part]
  # Values train_loop would reject only after the data and the model are built.
  batch = int(config.train.batch_size)
  groups = int(config.train.get("num_replicas_d2", 1) or 1)
  if batch < 1 or groups < 1 or batch % groups:
    raise ConfigError(f"config.train.batch_size ({batch}) must be a positive multiple of "
                           f"config.train.num_replicas_d2 ({groups})")
  from pointrend_jax.modeling import layers
  try:
    layers.canonical_compute_dtype(config.train.get("compute_dtype", "float32"))
  except ValueError as e:
    raise ConfigError(f"config.train.compute_dtype: {e}") from e


def _fmt(v: Any) -> str:
  return "nan" if v is None or not np.isfinite(v) else f"{v:.1f}"


def _write_summary(config: ml_collections.ConfigDict, workdir: str, metrics: Mapping[str, float],
                   step: int, timings: Mapping[str, float], mcfg: config_lib.ModelConfig) -> None:
  if jax.process_index() != 0:
    return
  summary = {"step": step, "metrics": {k: (None if not np.isfinite(v) else v)
                                       for k, v in metrics.items() if "-" not in k},
             "seconds": dict(timings)}
  with open(os.path.join(workdir, "summary.json"), "w") as f:
    json.dump(summary, f, indent=1)
  wall = timings.get("total", float("nan"))
  lines = [f"== summary: {workdir} (step {step}) =="]
  if mcfg.is_semantic:
    lines.append(f"mIoU {_fmt(metrics.get('eval/sem_seg/mIoU'))}")
  else:
    from pointrend_jax.modeling.point_rend import subdivision_schedule
    side = mcfg.mask_head.output_side_resolution
    res, steps = subdivision_schedule(side, mcfg.point_head.subdivision_steps,
                                      mcfg.point_head.subdivision_num_points)
    rows = [(f"mask AP, PointRend {res * 2 ** steps}x{res * 2 ** steps}", "segm"),
            (f"mask AP, coarse {side}x{side} upsampled", "segm_coarse"), ("box AP", "bbox")]
    width = max(len(r[0]) for r in rows)
    for title, task in rows:
      if f"eval/{task}/AP" in metrics:
        lines.append(f"{title:<{width}}  " + "  ".join(
            f"{m} {_fmt(metrics.get(f'eval/{task}/{m}'))}" for m in ("AP", "AP50", "AP75")))
  lines.append("wall time " + ", ".join(f"{k} {v / 60:.1f} min" if v >= 60 else f"{k} {v:.0f} s"
                                        for k, v in timings.items()))
  print("\n".join(lines), flush=True)


def _pictures(evaluator: Evaluator, workdir: str) -> None:
  if not evaluator.last_visuals or jax.process_index() != 0:
    return
  from pointrend_jax.training import demo_pictures
  out = os.path.join(workdir, "pictures")
  paths = demo_pictures.write_pictures(evaluator.last_visuals, evaluator.split.class_names,
                                       out, threshold=evaluator.threshold)
  logger.info("wrote %d pictures to %s", len(paths), out)


def _setup(config: ml_collections.ConfigDict, workdir: str):
  _check_config(config)
  os.makedirs(workdir, exist_ok=True)
  if jax.process_index() == 0:
    with open(os.path.join(workdir, "config.json"), "w") as f:
      f.write(config.to_json_best_effort(indent=1))
  mcfg = zoo.model_config(config.model)
  return mcfg, mesh_lib.make_mesh()


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | os.PathLike, *,
                       evaluate_after: bool = True,
                       start_time: float | None = None) -> dict[str, float]:
  """Trains ``config`` in ``workdir`` (resuming from its latest checkpoint), evaluating every
  ``eval.every`` steps and at the end when ``evaluate_after``.

  Returns:
    The last evaluation's metrics (empty without evaluation or when stopped by SIGTERM).
  """
  start_time = time.time() if start_time is None else start_time
  workdir = os.fspath(workdir)
  mcfg, mesh = _setup(config, workdir)
  timings: dict[str, float] = {}
  t = time.time()
  train_split = load_split(config, "train", workdir, mcfg)
  if jax.process_index() == 0:
    # For tools.export: the exported model carries the names (Predictor labels).
    with open(os.path.join(workdir, CLASS_NAMES_FILE), "w") as f:
      json.dump(list(train_split.class_names), f, indent=1)
  evaluator = Evaluator(config, workdir, mcfg, mesh=mesh) if evaluate_after else None
  timings["data"] = time.time() - t

  t = time.time()
  model = build_model(config, mcfg)
  ckpt_dir = os.path.join(workdir, "checkpoints")
  if os.path.isdir(ckpt_dir) and any(d.isdigit() for d in os.listdir(ckpt_dir)):
    logger.info("init: skipped, resuming from %s", ckpt_dir)
  else:
    logger.info("init: %s", init_weights(model, config))
  timings["model"] = time.time() - t

  procs = jax.process_count()
  batch = int(config.train.batch_size)
  if batch % procs:
    raise ConfigError(f"train.batch_size {batch} not divisible by {procs} processes")
  it = pipeline.build_train_loader(
      train_split.records, batch_size_per_process=batch // procs, seed=int(config.seed),
      config=pipeline.loader_config(config.data, mcfg),
      worker_count=int(config.data.get("num_workers", 0)))
  delay = float(config.train.get("debug_step_delay_s", 0.0) or 0.0)
  train_iter = _SlowIterator(it, delay) if delay > 0 else it

  if mcfg.is_semantic:
    from pointrend_jax.training.losses_semantic import semantic_loss_fn as loss_fn
    batch_keys: tuple[str, ...] = ("image", "image_size", "sem_seg")
  else:
    from pointrend_jax.training.losses_instance import INSTANCE_BATCH_KEYS as batch_keys
    from pointrend_jax.training.losses_instance import instance_loss_fn as loss_fn

  max_steps = int(config.train.max_steps)
  last: dict[str, Any] = {"metrics": {}, "step": None}

  def eval_fn(m: nnx.Module, step: int) -> dict[str, float]:
    final = step >= max_steps
    te = time.time()
    metrics = evaluator(m, step, final=final)
    timings["eval" if final else f"eval@{step}"] = time.time() - te
    last.update(metrics=metrics, step=step)
    if final:
      _pictures(evaluator, workdir)
    return metrics

  t = time.time()
  try:
    state = train_lib.train_loop(_loop_config(config), workdir, model, loss_fn, train_iter,
                                 eval_fn=eval_fn if evaluate_after else None, mesh=mesh,
                                 batch_keys=batch_keys)
  finally:
    if hasattr(it, "close"):
      it.close()
  step = int(jax.device_get(state.step))
  timings["train"] = time.time() - t - sum(v for k, v in timings.items() if k.startswith("eval"))
  if step < max_steps:
    logger.warning("training stopped at step %d of %d (preempted); rerun the same command to "
                   "resume", step, max_steps)
    return {}
  if evaluate_after and last["step"] != step:
    # Training was already complete (nothing ran): evaluate the final checkpoint.
    metrics = eval_fn(state.model(), step)
    with MetricWriter(workdir) as writer:
      writer.write_scalars(step, metrics)
  t = time.time()
  exported = export_model(state.model(), mcfg, os.path.join(workdir, EXPORT_DIR),
                          class_names=train_split.class_names or None,
                          source={"workdir": os.path.abspath(workdir), "step": step})
  logger.info("exported the final model to %s (Predictor(None, %r), tools.predict --weights)",
              exported, str(exported))
  timings["export"] = time.time() - t
  timings["total"] = time.time() - start_time
  if evaluate_after:
    _write_summary(config, workdir, last["metrics"], step, timings, mcfg)
  return last["metrics"]


def evaluate(config: ml_collections.ConfigDict, workdir: str | os.PathLike, *,
             start_time: float | None = None) -> dict[str, float]:
  """Evaluates the latest checkpoint in ``workdir`` (else ``config.init.weights``).

  Metrics are appended to ``workdir/metrics.jsonl`` / TensorBoard at the checkpoint's step.
  """
  start_time = time.time() if start_time is None else start_time
  workdir = os.fspath(workdir)
  mcfg, mesh = _setup(config, workdir)
  timings: dict[str, float] = {}
  t = time.time()
  evaluator = Evaluator(config, workdir, mcfg, mesh=mesh)  # data errors first, before the model
  timings["data"] = time.time() - t
  model = build_model(config, mcfg)
  ckpt_dir = os.path.join(workdir, "checkpoints")
  step = 0
  restored = None
  if os.path.isdir(ckpt_dir):
    tx, _ = optimizer_lib.make_optimizer(_loop_config(config), model)
    state = train_lib.create_train_state(model, tx, seed=int(config.seed), mesh=mesh)
    manager = checkpointing.make_checkpoint_manager(ckpt_dir, async_save=False)
    try:
      restored = checkpointing.restore_latest(manager, state.checkpoint_tree(),
                                              with_data_state=False)
    finally:
      manager.close()
    if restored is not None:
      step, tree, _ = restored
      model = state.with_checkpoint_tree(tree).model()
      logger.info("evaluating checkpoint %d of %s", step, ckpt_dir)
  if restored is None:
    if not str(config.init.get("weights", "") or ""):
      raise DataError(f"nothing to evaluate: no checkpoint in {ckpt_dir} and config.init.weights "
                      "is empty (train first, or point --config.init.weights at a full model)")
    logger.info("evaluating init weights: %s", init_weights(model, config))
  t = time.time()
  metrics = evaluator(model, step, final=True)
  timings["eval"] = time.time() - t
  _pictures(evaluator, workdir)
  with MetricWriter(workdir) as writer:
    writer.write_scalars(step, metrics)
  timings["total"] = time.time() - start_time
  _write_summary(config, workdir, metrics, step, timings, mcfg)
  return metrics


# --------------------------------------------------------------------------------------------------
# Export: training checkpoints -> converted checkpoints (Predictor, tools.predict).
# --------------------------------------------------------------------------------------------------


def export_model(model: nnx.Module, mcfg: config_lib.ModelConfig, out_dir: str | os.PathLike,
                 *, class_names: Sequence[str] | None = None,
                 source: Mapping[str, Any] | None = None) -> str:
  """Writes ``model`` as a converted checkpoint (replacing ``out_dir``); every process calls it.

  Args:
    model: a concrete model (e.g. ``TrainState.model()``).
    mcfg: its full :class:`~pointrend_jax.modeling.config.ModelConfig` (stored as JSON, so the
      directory loads without the training config).
    out_dir: the output directory; an existing one is replaced.
    class_names: the dataset's class names (Predictor's labels); must match the class count.
    source: provenance stored in ``config.json`` (workdir, step).

  Returns:
    The absolute output directory.
  """
  from pointrend_jax.checkpoint import orbax_io
  return str(orbax_io.save_converted(model, mcfg, out_dir, overwrite=True,
                                     source=dict(source or {}, kind="training checkpoint"),
                                     class_names=class_names))


def read_workdir_config(workdir: str | os.PathLike) -> ml_collections.ConfigDict:
  """The run config ``launch.py`` saved in ``workdir/config.json``.

  Raises:
    DataError: ``workdir`` or its ``config.json`` is missing.
    ConfigError: ``config.json`` is not a JSON object.
  """
  workdir = os.fspath(workdir)
  if not os.path.isdir(workdir):
    raise DataError(f"workdir not found: {workdir}")
  path = os.path.join(workdir, "config.json")
  if not os.path.isfile(path):
    raise DataError(f"{workdir} has no config.json (not a launch.py workdir)")
  try:
    with open(path) as f:
      data = json.load(f)
  except ValueError as e:
    raise ConfigError(f"{path}: not JSON ({e})") from e
  if not isinstance(data, dict):
    raise ConfigError(f"{path}: expected a JSON object")
  return ml_collections.ConfigDict(data)


def restore_model(config: ml_collections.ConfigDict, workdir: str | os.PathLike,
                  step: int | None = None, *, mcfg: config_lib.ModelConfig | None = None,
                  mesh: jax.sharding.Mesh | None = None) -> tuple[int, nnx.Module]:
  """The model of training checkpoint ``step`` (default: the newest) of ``workdir``.

  The checkpoint's structure is built abstractly (no random initialisation), so this is fast
  even for big models; the optimizer state is read too (orbax restores whole items).

  Args:
    config: the run config (e.g. :func:`read_workdir_config`).
    workdir: the run's workdir (``checkpoints/<step>/``).
    step: the checkpoint step; None: the newest.
    mcfg: the model config (default: :func:`model_config` of ``config``).
    mesh: where the arrays go (default: all devices, replicated).

  Returns:
    ``(step, model)``.

  Raises:
    DataError: no checkpoints, or no checkpoint ``step`` (the message lists those present).
  """
  from pointrend_jax.modeling import layers, meta_arch
  workdir = os.fspath(workdir)
  mcfg = mcfg or zoo.model_config(config.model)
  mesh = mesh or mesh_lib.make_mesh()
  ckpt_dir = os.path.join(workdir, "checkpoints")
  steps = sorted(int(d) for d in os.listdir(ckpt_dir) if d.isdigit()) if os.path.isdir(
      ckpt_dir) else []
  if not steps:
    raise DataError(f"no training checkpoint in {ckpt_dir}")
  step = steps[-1] if step is None else int(step)
  if step not in steps:
    raise DataError(f"no checkpoint {step} in {ckpt_dir} (available: "
                    f"{', '.join(map(str, steps))})")
  abstract = meta_arch.abstract_model(mcfg)
  tx, _ = optimizer_lib.make_optimizer(_loop_config(config), abstract)

  def checkpoint_tree():
    model = meta_arch.build_model(mcfg, nnx.Rngs(0))
    return train_lib.create_train_state(model, tx).checkpoint_tree()

  replicated = mesh_lib.replicated_sharding(mesh)
  target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated),
                        jax.eval_shape(checkpoint_tree))
  # The state item directly, not through a CheckpointManager: opening a manager cleans up
  # temporary directories, i.e. would break a checkpoint that a running training is writing.
  import orbax.checkpoint as ocp
  path = os.path.abspath(os.path.join(ckpt_dir, str(step), checkpointing.STATE_ITEM))
  with ocp.StandardCheckpointer() as ckptr:
    tree = ckptr.restore(path, target)
  # The same split as create_train_state: trainable params, then every other variable.
  graphdef, _, _ = nnx.split(abstract, layers.TRAINABLE, ...)
  return step, nnx.merge(graphdef, tree["params"], tree["model_state"])
