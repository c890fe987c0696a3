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
  losses.
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
  checkpoint of a workdir (:mod:`~pointrend_jax.checkpoint.workdir`).

Errors a user can fix raise :class:`DataError` (a missing file), :class:`DatasetError` (a
malformed dataset file) or :class:`ConfigError` (a bad or mismatched config value);
``launch.py`` prints those and the rest of :data:`USER_ERRORS` as one line.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import tqdm
from flax import nnx

from pointrend_jax.errors import ConfigError, DataError
from pointrend_jax.checkpoint import workdir as workdir_lib
from pointrend_jax.data import pipeline
from pointrend_jax.data.splits import Split, load_split
from pointrend_jax.modeling import config as config_lib
from pointrend_jax.modeling import zoo
from pointrend_jax.training import checkpointing
from pointrend_jax.training import mesh as mesh_lib
from pointrend_jax.training import optimizer as optimizer_lib
from pointrend_jax.training.logging import MetricWriter

__all__ = [
    "build_model",
    "init_weights",
    "Evaluator",
    "train_and_evaluate",
    "evaluate",
]

logger = logging.getLogger(__name__)



# --------------------------------------------------------------------------------------------------
# Config -> model config and input config.
# --------------------------------------------------------------------------------------------------


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
