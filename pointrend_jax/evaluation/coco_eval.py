"""COCO box and mask AP, as detectron2's ``COCOEvaluator`` computes and reports it.

Metrics are flat, in percent::

  bbox/AP bbox/AP50 bbox/AP75 bbox/APs bbox/APm bbox/APl bbox/AP-<class name> ...
  segm/AP ...                                             segm/AP-<class name> ...

computed by pycocotools' ``COCOeval`` (maxDets 1/10/100; the reported numbers use 100) over all
ground-truth images unless ``img_ids`` restricts them. Conventions copied from detectron2:

* a metric COCOeval cannot compute (``stats[i] == -1``, e.g. APl without large objects) is NaN;
* per-category AP = mean precision over IoU thresholds and recall points at area "all" and
  maxDets 100 (``precision[:, :, k, 0, -1]`` without the -1 entries), NaN without GT; not
  reported when the dataset has a single category;
* for ``segm`` the results' ``bbox`` is removed so that COCOeval's area ranges use mask areas;
* if there are no results at all, every task reports its six summary metrics as NaN and no
  per-category keys (detectron2 warns "No predictions from the model!"). detectron2 returns
  ``{}`` when it saw no image at all; here that case is reported like "no results".

Results use dataset (COCO) category ids; :func:`instances_to_coco_results` maps contiguous ids
back, like detectron2's evaluator.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import logging
import os
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from pointrend_jax.data.coco import CocoCategories, read_coco_json
from pointrend_jax.postprocess import encode_rle

logger = logging.getLogger(__name__)

PathLike = str | os.PathLike[str]
TASKS = ("bbox", "segm")
BACKENDS = ("pycocotools", "faster_coco_eval")
SUMMARY_METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl")


def instances_to_coco_results(
    image_id: int,
    boxes_xyxy: np.ndarray,
    scores: np.ndarray,
    classes: np.ndarray,
    masks: np.ndarray | Sequence[Mapping[str, Any]] | None,
    contiguous_to_coco_id: Sequence[int] | Mapping[int, int],
) -> list[dict[str, Any]]:
  """One image's detections as COCO result dicts (detectron2's ``instances_to_coco_json``).

  Args:
    image_id: the COCO image id.
    boxes_xyxy: float [N, 4] in pixels of the original image.
    scores: float [N].
    classes: int [N] contiguous class ids.
    masks: bool [N, H, W] full-image masks, N compressed RLE dicts, or None (boxes only).
    contiguous_to_coco_id: ``ids[c]`` (or ``{c: id}``) = COCO category id of class ``c``.

  Returns:
    N dicts ``{"image_id", "category_id", "bbox" (XYWH), "score"[, "segmentation"]}``.
  """
  # float32 like detectron2's tensors, so that the written XYWH values match its output.
  boxes = np.asarray(boxes_xyxy, np.float32).reshape(-1, 4).copy()
  boxes[:, 2:] -= boxes[:, :2]
  scores = np.asarray(scores, np.float32).reshape(-1)
  classes = np.asarray(classes).reshape(-1)
  n = len(boxes)
  if len(scores) != n or len(classes) != n or (masks is not None and len(masks) != n):
    raise ValueError(f"inconsistent instance counts: boxes {n}, scores {len(scores)}, "
                     f"classes {len(classes)}, masks {None if masks is None else len(masks)}")
  rles = None
  if masks is not None:
    rles = []
    for m in masks:
      if isinstance(m, Mapping):
        rle = dict(m)
        if isinstance(rle["counts"], bytes):
          rle["counts"] = rle["counts"].decode("utf-8")
      else:
        (rle,) = encode_rle(np.asarray(m)[None])
      rles.append(rle)
  results = []
  for k in range(n):
    c = int(classes[k])
    try:
      category_id = int(contiguous_to_coco_id[c])
    except (IndexError, KeyError):
      raise ValueError(f"class {c} has no COCO category id") from None
    result = {
        "image_id": int(image_id),
        "category_id": category_id,
        "bbox": boxes[k].tolist(),
        "score": float(scores[k]),
    }
    if rles is not None:
      result["segmentation"] = rles[k]
    results.append(result)
  return results


def _load_coco_api(ground_truth: PathLike | Mapping[str, Any] | COCO) -> COCO:
  if isinstance(ground_truth, COCO):
    return ground_truth
  dataset = (ground_truth if isinstance(ground_truth, Mapping) else
             read_coco_json(ground_truth))
  api = COCO()
  api.dataset = dict(dataset)  # Neither createIndex nor loadRes modifies the ground truth.
  with contextlib.redirect_stdout(io.StringIO()):
    api.createIndex()
  return api


class COCOEvaluator:
  """Accumulates COCO-format results and computes detectron2-style COCO metrics.

  Usage::

    ev = COCOEvaluator("instances_val.json")
    for ...:
      ev.add_instances(image_id, boxes_xyxy, scores, classes, masks)  # contiguous classes
    metrics = ev.compute()  # {"bbox/AP": ..., "segm/AP": ..., "bbox/AP-<name>": ...}
  """

  def __init__(self,
               ground_truth: PathLike | Mapping[str, Any] | COCO,
               tasks: Sequence[str] = TASKS,
               backend: str = "pycocotools"):
    """Args:
      ground_truth: COCO instances JSON (path or parsed) or a pycocotools ``COCO``.
      tasks: subset of ``("bbox", "segm")``.
      backend: ``"pycocotools"`` (reference) or ``"faster_coco_eval"`` (a C++ reimplementation
        that gives the same numbers, several times faster on large result sets).
    """
    unknown = set(tasks) - set(TASKS)
    if unknown or not tasks:
      raise ValueError(f"tasks must be a non-empty subset of {TASKS}, got {tasks}")
    if backend not in BACKENDS:
      raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    self._backend = backend
    self._tasks = tuple(t for t in TASKS if t in tasks)
    self._coco_gt = _load_coco_api(ground_truth)
    self.categories = CocoCategories.from_coco(self._coco_gt.dataset)
    self._image_ids = set(self._coco_gt.getImgIds())
    self.summaries: dict[str, str] = {}
    self.per_category: dict[str, list[tuple[str, float]]] = {}
    self.reset()

  @property
  def seen_image_ids(self) -> frozenset[int]:
    """Image ids given to :meth:`add_instances` or present in added results."""
    return frozenset(self._seen)

  def reset(self) -> None:
    self._results: list[dict[str, Any]] = []
    self._seen: set[int] = set()

  def add(self, results: Iterable[Mapping[str, Any]]) -> None:
    """Adds COCO-format results (dataset category ids; ``segmentation`` needed for segm)."""
    known_cats = set(self.categories.ids)
    results = [dict(r) for r in results]
    for r in results:  # Validate everything before adding anything.
      if r["image_id"] not in self._image_ids:
        raise ValueError(f"result for image id {r['image_id']}, which is not in the ground truth")
      if r["category_id"] not in known_cats:
        raise ValueError(f"result has category id {r['category_id']}, which is not in the "
                         f"ground truth categories {list(self.categories.ids)}")
      if "segm" in self._tasks and "segmentation" not in r:
        raise ValueError(f"result for image id {r['image_id']} has no 'segmentation' "
                         "(needed for the segm task)")
      if "bbox" in self._tasks and "bbox" not in r:
        raise ValueError(f"result for image id {r['image_id']} has no 'bbox'")
    self._seen.update(r["image_id"] for r in results)
    self._results.extend(results)

  def add_instances(self,
                    image_id: int,
                    boxes_xyxy: np.ndarray,
                    scores: np.ndarray,
                    classes: np.ndarray,
                    masks: np.ndarray | Sequence[Mapping[str, Any]] | None = None) -> None:
    """Adds one image's detections with contiguous class ids (see instances_to_coco_results)."""
    if image_id not in self._image_ids:
      raise ValueError(f"image id {image_id} is not in the ground truth")
    self._seen.add(image_id)
    self.add(instances_to_coco_results(image_id, boxes_xyxy, scores, classes, masks,
                                       self.categories.ids))

  @property
  def results(self) -> list[dict[str, Any]]:
    """The accumulated COCO-format results (what ``coco_instances_results.json`` holds)."""
    return self._results

  def compute(self, img_ids: Iterable[int] | None = None) -> dict[str, float]:
    """Runs COCOeval per task.

    Args:
      img_ids: evaluate only these images (default: every ground-truth image, as detectron2;
        pass ``seen_image_ids`` when only part of the dataset was predicted).

    Returns:
      Flat metrics in percent (see the module docstring).
    """
    metrics: dict[str, float] = {}
    self.summaries, self.per_category = {}, {}
    if not self._results:
      logger.warning("COCOEvaluator: no predictions; all metrics are NaN")
    for task in self._tasks:
      if not self._results:
        metrics.update({f"{task}/{m}": float("nan") for m in SUMMARY_METRICS})
        continue
      coco_eval, summary = self._run_cocoeval(task, img_ids)
      self.summaries[task] = summary
      stats = coco_eval.stats
      for idx, m in enumerate(SUMMARY_METRICS):
        metrics[f"{task}/{m}"] = float(stats[idx] * 100) if stats[idx] >= 0 else float("nan")
      if len(self.categories) <= 1:
        continue  # detectron2 reports no per-category AP for a single class.
      precisions = coco_eval.eval["precision"]  # [iou, recall, class, area, max dets]
      per_category = []
      for k, name in enumerate(self.categories.names):
        p = precisions[:, :, k, 0, -1]
        p = p[p > -1]
        ap = float(np.mean(p) * 100) if p.size else float("nan")
        per_category.append((name, ap))
        metrics[f"{task}/AP-{name}"] = ap
      self.per_category[task] = per_category
      logger.info("COCO %s:\n%s", task, summary)
    return metrics

  def _run_cocoeval(self, task: str, img_ids: Iterable[int] | None) -> tuple[COCOeval, str]:
    results = copy.deepcopy(self._results)  # loadRes adds fields in place.
    if task == "segm":
      for r in results:
        r.pop("bbox", None)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
      if self._backend == "faster_coco_eval":
        # Imported lazily: an optional accelerator of the same computation.
        import faster_coco_eval  # pylint: disable=g-import-not-at-top
        coco_gt = faster_coco_eval.COCO(copy.deepcopy(self._coco_gt.dataset))
        coco_dt = coco_gt.loadRes(results)
        coco_eval = faster_coco_eval.COCOeval_faster(coco_gt, coco_dt, task)
      else:
        coco_dt = self._coco_gt.loadRes(results)
        coco_eval = COCOeval(self._coco_gt, coco_dt, task)
      if img_ids is not None:
        coco_eval.params.imgIds = sorted(set(img_ids))
      coco_eval.evaluate()
      coco_eval.accumulate()
    summary = io.StringIO()
    with contextlib.redirect_stdout(summary):
      coco_eval.summarize()
    return coco_eval, summary.getvalue()

  def per_category_table(self, task: str, columns: int = 3) -> str:
    """The per-category AP of the last :meth:`compute` as a small text table."""
    rows = self.per_category.get(task, [])
    if not rows:
      return ""
    width = max(len("category"), *(len(n) for n, _ in rows))
    cells = [f"{n:<{width}} | {ap:7.3f}" for n, ap in rows]
    header = " | ".join([f"{'category':<{width}} | {'AP':>7}"] * min(columns, len(cells)))
    lines = [header, "-" * len(header)]
    for i in range(0, len(cells), columns):
      lines.append(" | ".join(cells[i:i + columns]))
    return "\n".join(lines)


def read_results_json(path: PathLike) -> list[dict[str, Any]]:
  """Reads a COCO results file (a JSON list); errors name the file."""
  try:
    with open(path) as f:
      results = json.load(f)
  except FileNotFoundError:
    raise FileNotFoundError(f"results file not found: {path}") from None
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise ValueError(f"results file {path} is not valid JSON: {e}") from e
  if not isinstance(results, list):
    raise ValueError(f"results file {path} must hold a JSON list of detections")
  return results


def write_results_json(results: Sequence[Mapping[str, Any]], path: PathLike) -> None:
  """Writes COCO-format results (detectron2's ``coco_instances_results.json``)."""
  with open(path, "w") as f:
    f.write(json.dumps(list(results)))


def infer_tasks(results: Sequence[Mapping[str, Any]]) -> tuple[str, ...]:
  """``bbox`` if every result has a box, plus ``segm`` if every result has a mask."""
  if not results:
    return TASKS
  tasks = tuple(t for t, key in (("bbox", "bbox"), ("segm", "segmentation"))
                if all(key in r for r in results))
  if not tasks:
    raise ValueError("results have neither 'bbox' nor 'segmentation' in every entry")
  return tasks


def evaluate_coco(ground_truth: PathLike | Mapping[str, Any] | COCO,
                  results: Sequence[Mapping[str, Any]],
                  tasks: Sequence[str] | None = None,
                  backend: str = "pycocotools") -> COCOEvaluator:
  """An evaluator holding ``results``; its ``compute()`` gives the metrics and fills the tables."""
  evaluator = COCOEvaluator(ground_truth, tasks or infer_tasks(results), backend=backend)
  evaluator.add(results)
  return evaluator


def write_metrics_json(metrics: Mapping[str, float], path: PathLike) -> None:
  """Writes flat metrics as strict JSON (NaN -> null), keys in insertion order."""
  with open(path, "w") as f:
    json.dump({k: (None if isinstance(v, float) and np.isnan(v) else v)
               for k, v in metrics.items()}, f, indent=2, allow_nan=False)
    f.write("\n")
