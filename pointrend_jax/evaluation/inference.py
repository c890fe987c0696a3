"""Evaluation of a model on a dataset (detectron2 ``inference_on_dataset``).

:func:`inference_on_dataset` runs a :class:`~pointrend_jax.modeling.predict.PredictProgram` on
the batches of the evaluation loader and feeds the host-side predictions to a dataset evaluator
(``reset`` / ``process`` / ``evaluate``):

* :class:`InstanceEvaluator`: COCO box and mask AP
  (:class:`~pointrend_jax.evaluation.coco_eval.COCOEvaluator`; the COCO tables are logged and the
  results JSON written to ``<output_dir>``) or the official Cityscapes instance AP. With
  ``coarse`` the mask AP is computed a second time from the 7x7 coarse logits pasted bilinearly
  (``segm_coarse``), the Mask R-CNN-style baseline.
* :class:`SemanticEvaluator`: mIoU (Cityscapes' official pixel metrics on Cityscapes).

Results are at the original image size (:mod:`pointrend_jax.postprocess`); metrics are
named ``eval/<task>/<metric>``.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Protocol

import jax
import numpy as np
from PIL import Image

from pointrend_jax import postprocess

__all__ = ["DatasetEvaluator", "InstanceEvaluator", "SemanticEvaluator", "inference_on_dataset",
           "to_host"]

logger = logging.getLogger(__name__)


def to_host(tree: Any) -> Any:
  """Device (possibly multi-process global) arrays -> numpy, gathered on every process."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    return multihost_utils.process_allgather(tree, tiled=True)
  return jax.tree.map(np.asarray, jax.device_get(tree))


class DatasetEvaluator(Protocol):
  """What :func:`inference_on_dataset` feeds (detectron2's ``DatasetEvaluator``)."""

  def reset(self) -> None: ...

  def process(self, batch: Mapping[str, np.ndarray], outputs: Mapping[str, np.ndarray]
              ) -> None: ...

  def evaluate(self) -> dict[str, float]: ...


def inference_on_dataset(program: Any, batches: Iterable[Mapping[str, Any]],
                         evaluator: DatasetEvaluator) -> dict[str, float]:
  """Predicts every batch with ``program`` and returns ``evaluator``'s metrics.

  Args:
    program: ``(images, image_sizes) -> predictions`` (a
      :class:`~pointrend_jax.modeling.predict.PredictProgram`).
    batches: evaluation batches: ``image`` and ``image_size`` (the program's inputs, host or
      device arrays) and per-image ``orig_size``, ``record_index`` and ``valid`` (False for the
      padding images of a partial last batch).
    evaluator: receives every batch (gathered over processes, without ``image``) with its
      predictions as numpy.

  Returns:
    ``evaluator.evaluate()``.
  """
  evaluator.reset()
  t0 = time.perf_counter()
  n = 0
  for batch in batches:
    outputs = to_host(program(batch["image"], batch["image_size"]))
    meta = to_host({k: v for k, v in batch.items() if k != "image"})
    evaluator.process(meta, outputs)
    n += int(np.sum(meta["valid"]))
  logger.info("%d images predicted in %.1f s", n, time.perf_counter() - t0)
  return evaluator.evaluate()


def _rows(batch: Mapping[str, np.ndarray], outputs: Mapping[str, np.ndarray]):
  """``(i, record_index, orig_size, resized_size, outputs of image i)`` of the valid images."""
  for i in np.flatnonzero(batch["valid"]):
    yield (int(batch["record_index"][i]), tuple(int(v) for v in batch["orig_size"][i]),
           tuple(int(v) for v in batch["image_size"][i]),
           jax.tree.map(lambda a, i=i: a[i], outputs))


def _read_ids(path: str) -> np.ndarray:
  with Image.open(path) as im:
    return np.asarray(im, np.int64)


class InstanceEvaluator:
  """COCO (or Cityscapes) instance AP of the predictions of ``records``.

  Args:
    records: the evaluated records (``record_index`` of a batch indexes them).
    class_names: contiguous class names.
    coco_gt: COCO ground truth (a ``pycocotools.coco.COCO``, a dict or a JSON path); or
    cityscapes_gt: ``{image_id: files}`` with ``instance_ids`` paths (Cityscapes AP).
    coarse: also evaluate the coarse 7x7 masks (``segm_coarse``).
    mask_threshold: mask pixel threshold on the probabilities.
    partial: the records are a subset of the ground truth (AP over the seen images only).
    output_dir: where the COCO results JSON goes (process 0; None: not written).
    step: the training step (for the logs).
    num_visualize: keep the first so many images' results (and subdivision stages, when the
      program has them) in :attr:`visuals` (process 0).
  """

  def __init__(self, records: Sequence[Mapping[str, Any]], class_names: Sequence[str], *,
               coco_gt: Any = None, cityscapes_gt: Mapping[int, Any] | None = None,
               coarse: bool = False, mask_threshold: float = 0.5, partial: bool = False,
               output_dir: str | None = None, step: int = 0, num_visualize: int = 0):
    if (coco_gt is None) == (cityscapes_gt is None):
      raise ValueError("pass exactly one of coco_gt and cityscapes_gt")
    self.records = records
    self.class_names = list(class_names)
    self.coco_gt = coco_gt
    self.cityscapes_gt = cityscapes_gt
    self.variants = ("segm", "segm_coarse") if coarse else ("segm",)
    self.mask_threshold = float(mask_threshold)
    self.partial = partial
    self.output_dir = output_dir
    self.step = step
    self.num_visualize = num_visualize if jax.process_index() == 0 else 0
    self.reset()

  def reset(self) -> None:
    from pointrend_jax.evaluation import cityscapes_eval, coco_eval
    if self.cityscapes_gt is not None:
      self._evaluators = {v: cityscapes_eval.CityscapesInstanceEvaluator()
                          for v in self.variants}
    else:
      self._evaluators = {"segm": coco_eval.COCOEvaluator(self.coco_gt, ("bbox", "segm"))}
      if "segm_coarse" in self.variants:
        self._evaluators["segm_coarse"] = coco_eval.COCOEvaluator(self.coco_gt, ("segm",))
    self.visuals: list[dict[str, Any]] = []

  def process(self, batch: Mapping[str, np.ndarray], outputs: Mapping[str, np.ndarray]) -> None:
    keys = {"segm": "mask_probs", "segm_coarse": "coarse_probs"}
    for index, orig, resized, out in _rows(batch, outputs):
      record = self.records[index]
      results = {}
      for v in self.variants:
        inst, rows = postprocess.instances(out, orig, resized, self.class_names,
                                           mask_threshold=self.mask_threshold, mask_key=keys[v])
        results[v] = inst
        if self.cityscapes_gt is not None:
          from pointrend_jax.data import cityscapes as cs
          label_ids = np.asarray(cs.THING_LABEL_IDS)[inst.classes.astype(np.int64)]
          gt_ids = _read_ids(self.cityscapes_gt[int(record["image_id"])].instance_ids)
          self._evaluators[v].add(gt_ids, inst.masks, label_ids, inst.scores)
        else:
          self._evaluators[v].add_instances(int(record["image_id"]), inst.boxes, inst.scores,
                                            inst.classes, inst.rle)
      if len(self.visuals) < self.num_visualize:  # the kept rows are the same for all variants
        stages = (postprocess.subdivision_stages(out, rows, results["segm"].boxes)
                  if "upsampled" in out else None)
        self.visuals.append(dict(record=record, results=results, stages=stages))

  def evaluate(self) -> dict[str, float]:
    from pointrend_jax.evaluation import coco_eval
    metrics: dict[str, float] = {}
    for v, ev in self._evaluators.items():
      if self.cityscapes_gt is not None:
        m = ev.compute()
        logger.info("Cityscapes instance AP (%s masks):\n%s", v, ev.table(m))
        metrics.update({f"eval/{v}/{k.split('/', 1)[1]}": val for k, val in m.items()})
        continue
      m = ev.compute(img_ids=ev.seen_image_ids if self.partial else None)
      for task, summary in ev.summaries.items():
        name = "segm_coarse" if (v == "segm_coarse" and task == "segm") else task
        logger.info("COCO %s (step %d, %d images):\n%s\n%s", name, self.step, len(self.records),
                    summary.rstrip(), ev.per_category_table(task))
      for k, val in m.items():
        task, metric = k.split("/", 1)
        name = "segm_coarse" if (v == "segm_coarse" and task == "segm") else task
        metrics[f"eval/{name}/{metric}"] = val
      if self.output_dir is not None and jax.process_index() == 0:
        os.makedirs(self.output_dir, exist_ok=True)
        suffix = "" if v == "segm" else "_coarse"
        coco_eval.write_results_json(
            ev.results, os.path.join(self.output_dir, f"coco_instances_results{suffix}.json"))
    return metrics


class SemanticEvaluator:
  """mIoU of the semantic predictions of ``records``.

  Args:
    records: the evaluated records (with ``sem_seg_file_name`` unless Cityscapes).
    class_names: the class names (train ids).
    ignore_label: ground-truth label not evaluated.
    cityscapes_gt: ``{image_id: files}`` with ``label_ids`` / ``instance_ids`` paths: the
      official Cityscapes pixel metrics instead.
    step: the training step (for the logs).
  """

  def __init__(self, records: Sequence[Mapping[str, Any]], class_names: Sequence[str], *,
               ignore_label: int = 255, cityscapes_gt: Mapping[int, Any] | None = None,
               step: int = 0):
    self.records = records
    self.class_names = list(class_names)
    self.ignore_label = ignore_label
    self.cityscapes_gt = cityscapes_gt
    self.step = step
    self.reset()

  def reset(self) -> None:
    if self.cityscapes_gt is not None:
      from pointrend_jax.evaluation import cityscapes_eval
      self._ev = cityscapes_eval.CityscapesSemSegEvaluator()
    else:
      from pointrend_jax.evaluation import sem_seg
      self._ev = sem_seg.SemSegEvaluator(len(self.class_names), self.class_names,
                                         ignore_label=self.ignore_label)

  def process(self, batch: Mapping[str, np.ndarray], outputs: Mapping[str, np.ndarray]) -> None:
    for index, orig, resized, out in _rows(batch, outputs):
      record = self.records[index]
      pred = postprocess.semantic_result(out["logits"], orig, resized, self.class_names).sem_seg
      if self.cityscapes_gt is not None:
        files = self.cityscapes_gt[int(record["image_id"])]
        self._ev.add(pred, _read_ids(files.label_ids), _read_ids(files.instance_ids))
      else:
        from pointrend_jax.data import coco
        self._ev.add(pred, coco.read_label_map(record["sem_seg_file_name"]))

  def evaluate(self) -> dict[str, float]:
    m = self._ev.compute()
    if self.cityscapes_gt is not None:
      logger.info("Cityscapes semantic (step %d):\n%s", self.step, self._ev.table())
    else:
      logger.info("semantic segmentation (step %d): %s", self.step,
                  {k: round(v, 2) for k, v in m.items() if "-" not in k})
    return {f"eval/{k}": v for k, v in m.items()}
