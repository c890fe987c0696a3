"""The training run's evaluator: ``config.eval`` and ``config.data.val`` ->
:func:`~pointrend_jax.evaluation.inference.inference_on_dataset`.

:class:`Evaluator` loads the val split, builds its loader and the model's
:class:`~pointrend_jax.modeling.predict.PredictProgram` once per run, and at every evaluation
runs the program over the loader into a dataset evaluator: COCO box and mask AP (results JSON in
``<workdir>/eval``) or the official Cityscapes instance AP, mask AP twice when
``eval.coarse_masks`` (PointRend's subdivided masks, ``segm``, and the 7x7 coarse logits pasted
bilinearly, ``segm_coarse``); semantic models: mIoU. The final evaluation keeps
``eval.num_visualize`` images' results for the pictures (:attr:`Evaluator.last_visuals`).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import jax
import ml_collections
import tqdm
from flax import nnx

from pointrend_jax.data import pipeline
from pointrend_jax.data.splits import Split, load_split
from pointrend_jax.evaluation.inference import (InstanceEvaluator, SemanticEvaluator,
                                                inference_on_dataset)
from pointrend_jax.modeling import config as config_lib
from pointrend_jax.modeling.predict import PredictProgram
from pointrend_jax.training import mesh as mesh_lib

__all__ = ["Evaluator"]


class Evaluator:
  """Evaluates a model on ``config.data.val``; one instance per run (the compiled predict
  program is kept).

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
    self.num_visualize = 0 if mcfg.is_semantic else int(ev.get("num_visualize", 0) or 0)
    self._program: PredictProgram | None = None
    self._coco_gt: Any = None
    self.last_visuals: list[dict[str, Any]] = []

  def _batches(self, desc: str):
    """The loader's batches, images and sizes placed on the mesh when they divide evenly."""
    bar = tqdm.tqdm(self.loader, total=len(self.loader), desc=desc, unit="batch",
                    disable=jax.process_index() != 0 or not bool(
                        self.config.train.get("progress_bar", True)), dynamic_ncols=True)
    for batch in bar:
      out = {k: batch[k] for k in ("image", "image_size", "orig_size", "record_index", "valid")}
      if (jax.process_count() > 1 or
          out["image"].shape[0] * jax.process_count() % self.mesh.devices.size == 0):
        out.update(mesh_lib.shard_batch({k: out[k] for k in ("image", "image_size")}, self.mesh))
      yield out
    bar.close()

  def _dataset_evaluator(self, step: int, final: bool):
    names = self.split.class_names
    city = self.split.cityscapes_gt
    if self.mcfg.is_semantic:
      return SemanticEvaluator(self.records, names, cityscapes_gt=city, step=step,
                               ignore_label=self.mcfg.sem_seg_head.ignore_value)
    if city is None and self._coco_gt is None:
      import contextlib
      import io
      from pycocotools.coco import COCO
      from pointrend_jax.data.coco import read_coco_json
      gt = self.split.coco_gt
      self._coco_gt = COCO()
      self._coco_gt.dataset = dict(gt) if isinstance(gt, Mapping) else read_coco_json(gt)
      with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
        self._coco_gt.createIndex()
    return InstanceEvaluator(
        self.records, names, coco_gt=None if city is not None else self._coco_gt,
        cityscapes_gt=city, coarse=self.coarse, mask_threshold=self.threshold,
        partial=self.partial, output_dir=os.path.join(self.workdir, "eval"), step=step,
        num_visualize=self.num_visualize if final else 0)

  def __call__(self, model: nnx.Module, step: int, *, final: bool = False) -> dict[str, float]:
    if self._program is None:
      self._program = PredictProgram(model, stages=self.num_visualize > 0)
    else:
      self._program.update(model)
    evaluator = self._dataset_evaluator(step, final)
    metrics = inference_on_dataset(self._program, self._batches(f"eval step {step}"), evaluator)
    self.last_visuals = getattr(evaluator, "visuals", [])
    return metrics
