"""Cityscapes semantic (pixel-level) and instance-level metrics, as the official scripts.

Numpy re-implementations of cityscapesScripts 2.3.0's ``evalPixelLevelSemanticLabeling`` and
``evalInstanceLevelSemanticLabeling`` (which detectron2's ``CityscapesSemSegEvaluator`` /
``CityscapesInstanceEvaluator`` call), so that the product does not need the package; the tests
check both against it. Both evaluators take images in memory (``add``) or the official results
formats on disk (:func:`evaluate_semantic_results`, :func:`evaluate_instance_results`).

**Semantic** (label ids; :class:`CityscapesSemSegEvaluator`). A 34 x 34 confusion matrix
``[gt, pred]`` over label ids 0..33. For each of the 19 evaluated classes ``c``: ``tp`` =
``M[c, c]``, ``fn`` = row sum - tp (any prediction), ``fp`` = column ``c`` over the ground-truth
rows of evaluated labels other than ``c`` (void ground truth never makes a false positive);
``IoU = tp / (tp + fp + fn)``, NaN when that is 0. ``mIoU`` = mean of the non-NaN class IoUs
(``averageScoreClasses``). Also computed, as the script does: category IoU (``IoU_sup``, the 7
non-void categories) and, when instance-id ground truth is given for every image, the
instance-weighted ``iIoU`` / ``iIoU_sup`` (true positives and false negatives of each ground-truth
instance ``> 1000`` weighted by the class's average instance size / its size).

**Instances** (:class:`CityscapesInstanceEvaluator`; ``allAp``), 8 classes, for each overlap
``t`` in ``np.arange(0.5, 1.0, 0.05)``:

* ground truth = the ``*_gtFine_instanceIds.png`` ids of the class; ids < 1000 are groups;
  instances used for matching are the non-group ones with at least 100 pixels
  (``minRegionSizes[0]``; distances are not available, so only the first region size is used);
* a prediction (non-empty binary mask, label id, score) is compared with the ground-truth
  instances *of its class* only, overlap = IoU in pixels; a ground-truth instance is matched by
  every prediction with overlap ``> t``: the highest score is a true positive, the others are false
  positives; unmatched ground truth instances are misses (``hardFns``);
* a prediction matching no instance of its class (groups and small instances included) is a false
  positive unless the fraction of its pixels on void labels, on groups of its class and on small
  instances of its class (the last two summed per instance, so a small group counts twice) is
  ``> t``: then it is ignored;
* AP = step-wise integral of the precision/recall curve at each distinct score, with an
  artificial (recall 0, precision 1) end point: ``sum_i p_i (r_{i-1} - r_{i+1}) / 2``; 0 when the
  class has ground truth but no prediction, NaN without ground truth. The script crashes when a
  class has ground truth and predictions but all predictions are ignored and nothing matched; that
  case is AP 0 here.
* ``AP`` = nanmean over classes and overlaps, ``AP50`` = nanmean over classes at 0.5; per class
  ``AP-<name>`` / ``AP50-<name>``.

Metrics are in percent: ``sem_seg/mIoU``, ``sem_seg/IoU-<name>``, ``sem_seg/IoU_sup``
[, ``sem_seg/iIoU``, ``sem_seg/iIoU_sup``]; ``segm/AP``, ``segm/AP50``, ``segm/AP-<name>``,
``segm/AP50-<name>``. NaN where undefined.

Results formats (detectron2's naming; the scripts find a prediction by the ground truth's
``<city>_<seq>_<frame>`` prefix anywhere under the predictions folder, exactly one per image):

* semantic: ``<image stem>_pred.png``, uint8 label ids (train ids mapped back);
* instances: ``<image stem>_pred.txt`` with lines ``<mask png, relative> <label id> <score>`` and
  one ``<image stem>_<k>_<class name>.png`` (0 / 255) per instance.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import glob
import math
import os
import warnings
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
from PIL import Image

from pointrend_jax.data import cityscapes as cs

PathLike = str | os.PathLike[str]

NUM_LABEL_IDS = 34  # Label ids 0..33: the official confusion matrix size.
OVERLAPS = np.arange(0.5, 1., 0.05)
MIN_REGION_SIZE = 100

# evalPixelLevelSemanticLabeling's args.avgClassSize (iIoU weights).
AVG_CLASS_SIZE = {
    "bicycle": 4672.3249222261,
    "caravan": 36771.8241758242,
    "motorcycle": 6298.7200839748,
    "rider": 3930.4788056518,
    "bus": 35732.1511111111,
    "train": 67583.7075812274,
    "car": 12794.0202738185,
    "person": 3462.4756337644,
    "truck": 27855.1264367816,
    "trailer": 16926.9763313609,
}

_EVAL_LABELS = tuple(l.id for l in cs.LABELS if l.id >= 0)  # 0..33, void included.
_NOT_IGNORED = tuple(l.id for l in cs.LABELS if l.id >= 0 and not l.ignore_in_eval)
_VOID_IDS = np.array([l.id for l in cs.LABELS if l.ignore_in_eval])
_CATEGORIES = tuple(dict.fromkeys(l.category for l in cs.LABELS))  # First-appearance order.


def _category_instance_label_ids() -> dict[str, tuple[int, ...]]:
  """Categories whose labels (id >= 0) all have instances, with those ids (human, vehicle)."""
  out = {}
  for category in _CATEGORIES:
    ids = [l.id for l in cs.LABELS if l.category == category and l.id >= 0]
    if all(cs.ID_TO_LABEL[i].has_instances for i in ids):
      out[category] = tuple(ids)
  return out


_INST_CATEGORIES = _category_instance_label_ids()


def _pct(value: float) -> float:
  return 100.0 * float(value)


def _iou(tp: Any, fp: Any, fn: Any) -> float:
  """The script's IoU: ``tp / (tp + fp + fn)``, NaN when that is 0."""
  denom = tp + fp + fn
  return float(tp) / denom if denom != 0 else float("nan")


def _score_average(scores: Iterable[float]) -> float:
  """The script's getScoreAverage: mean of the non-NaN values, in list order."""
  total, n = 0.0, 0
  for s in scores:
    if not math.isnan(s):
      n += 1
      total += s
  return total / n if n else float("nan")


# ------------------------------------------------------------------------------------------------
# Semantic.


class CityscapesSemSegEvaluator:
  """Accumulates the label-id confusion matrix (and iIoU statistics) over images."""

  def __init__(self):
    self.reset()

  def reset(self) -> None:
    self.conf_matrix = np.zeros((NUM_LABEL_IDS, NUM_LABEL_IDS), np.uint64)  # [gt, pred]
    self._inst = {name: [0.0, 0.0] for name in cs.THING_CLASSES}  # [tpWeighted, fnWeighted]
    self._inst_cat = {c: [0.0, 0.0] for c in _INST_CATEGORIES}
    self.num_images = 0
    self.num_images_with_instances = 0

  def add(self, pred_train_ids: np.ndarray, gt_label_ids: np.ndarray,
          gt_instance_ids: np.ndarray | None = None) -> None:
    """One image: train-id prediction (0..18, e.g. the argmax), label-id ground truth
    (``*_gtFine_labelIds.png``), optional instance ids (``*_gtFine_instanceIds.png``) for iIoU."""
    self.add_label_ids(cs.train_id_to_label_id(pred_train_ids), gt_label_ids, gt_instance_ids)

  def add_label_ids(self, pred: np.ndarray, gt: np.ndarray, inst: np.ndarray | None = None
                    ) -> None:
    """One image in label ids (the official results format)."""
    pred, gt = np.asarray(pred), np.asarray(gt)
    if pred.ndim != 2:
      raise ValueError(f"prediction must be a single-channel [H, W] map, got shape "
                       f"{pred.shape}")
    if pred.shape != gt.shape:
      raise ValueError(f"prediction shape {pred.shape} != ground truth shape {gt.shape}")
    pred, gt = pred.astype(np.int64), gt.astype(np.int64)
    for what, a in (("ground truth", gt), ("prediction", pred)):
      if a.size and (a.min() < 0 or a.max() >= NUM_LABEL_IDS):
        raise ValueError(f"{what} label ids must be in 0..{NUM_LABEL_IDS - 1}, got range "
                         f"{a.min()}..{a.max()}")
    self.conf_matrix += np.bincount(gt.ravel() * NUM_LABEL_IDS + pred.ravel(),
                                    minlength=NUM_LABEL_IDS ** 2).reshape(
                                        NUM_LABEL_IDS, NUM_LABEL_IDS).astype(np.uint64)
    self.num_images += 1
    if inst is None:
      return
    inst = np.asarray(inst).astype(np.int64)
    if inst.shape != gt.shape:
      raise ValueError(f"instance ids shape {inst.shape} != ground truth shape {gt.shape}")
    self.num_images_with_instances += 1
    cat_masks = {c: np.isin(pred, ids) for c, ids in _INST_CATEGORIES.items()}
    for inst_id in np.unique(inst[inst > 1000]):
      label_id = int(inst_id) // 1000
      label = cs.ID_TO_LABEL.get(label_id)
      if label is None:
        raise ValueError(f"instance id {inst_id} has unknown label id {label_id}")
      if label.ignore_in_eval:
        continue
      if label.name not in AVG_CLASS_SIZE:
        raise ValueError(f"instance id {inst_id}: label {label.name!r} has no instances")
      mask = inst == inst_id
      size = np.count_nonzero(mask)
      tp = np.count_nonzero(pred[mask] == label_id)
      weight = AVG_CLASS_SIZE[label.name] / float(size)
      stats = self._inst[label.name]
      stats[0] += float(tp) * weight
      stats[1] += float(size - tp) * weight
      if label.category in self._inst_cat:
        cat_tp = np.count_nonzero(np.logical_and(mask, cat_masks[label.category]))
        stats = self._inst_cat[label.category]
        stats[0] += float(cat_tp) * weight
        stats[1] += float(size - cat_tp) * weight

  @property
  def has_instance_scores(self) -> bool:
    """Whether every image came with instance ids (iIoU is meaningful)."""
    return self.num_images > 0 and self.num_images_with_instances == self.num_images

  def raw_results(self) -> dict[str, Any]:
    """The official result dict's scores (fractions), keyed by label / category name:
    ``classScores``, ``classInstScores``, ``categoryScores``, ``categoryInstScores`` and their
    ``averageScore*`` (NaN entries included, as the script reports them)."""
    m = self.conf_matrix
    not_ignored = list(_NOT_IGNORED)
    class_scores, class_inst_scores = {}, {}
    for label_id in _EVAL_LABELS:
      label = cs.ID_TO_LABEL[label_id]
      iou = inst_iou = float("nan")
      if not label.ignore_in_eval:
        fp = np.longlong(m[[l for l in not_ignored if l != label_id], label_id].sum())
        tp = np.longlong(m[label_id, label_id])
        fn = np.longlong(m[label_id, :].sum()) - tp
        iou = _iou(tp, fp, fn)
        if label.name in self._inst:
          tpw, fnw = self._inst[label.name]
          inst_iou = _iou(tpw, fp, fnw)
      class_scores[label.name] = iou
      class_inst_scores[label.name] = inst_iou
    cat_scores, cat_inst_scores = {}, {}
    for category in _CATEGORIES:
      ids = [l.id for l in cs.LABELS
             if l.category == category and not l.ignore_in_eval and l.id >= 0]
      others = [l for l in not_ignored if cs.ID_TO_LABEL[l].category != category]
      iou = inst_iou = float("nan")
      if ids:
        tp = np.longlong(m[ids, :][:, ids].sum())
        fn = np.longlong(m[ids, :].sum()) - tp
        fp = np.longlong(m[others, :][:, ids].sum())
        iou = _iou(tp, fp, fn)
      if category in self._inst_cat:
        fp = np.longlong(m[others, :][:, list(_INST_CATEGORIES[category])].sum())
        tpw, fnw = self._inst_cat[category]
        inst_iou = _iou(tpw, fp, fnw)
      cat_scores[category] = iou
      cat_inst_scores[category] = inst_iou
    return {
        "classScores": class_scores,
        "classInstScores": class_inst_scores,
        "categoryScores": cat_scores,
        "categoryInstScores": cat_inst_scores,
        "averageScoreClasses": _score_average(class_scores.values()),
        "averageScoreInstClasses": _score_average(class_inst_scores.values()),
        "averageScoreCategories": _score_average(cat_scores.values()),
        "averageScoreInstCategories": _score_average(cat_inst_scores.values()),
    }

  def compute(self) -> dict[str, float]:
    """Flat metrics in percent (see the module docstring)."""
    raw = self.raw_results()
    res = {"sem_seg/mIoU": _pct(raw["averageScoreClasses"])}
    for name in cs.SEM_SEG_CLASSES:
      res[f"sem_seg/IoU-{name}"] = _pct(raw["classScores"][name])
    res["sem_seg/IoU_sup"] = _pct(raw["averageScoreCategories"])
    if self.has_instance_scores:
      res["sem_seg/iIoU"] = _pct(raw["averageScoreInstClasses"])
      res["sem_seg/iIoU_sup"] = _pct(raw["averageScoreInstCategories"])
    return res

  def table(self) -> str:
    """Per-class IoU (and iIoU) table, in percent."""
    raw = self.raw_results()
    inst = self.has_instance_scores

    def line(name: str, iou: float, inst_iou: float) -> str:
      return f"{name:<14} {_pct(iou):7.3f}" + (f" {_pct(inst_iou):7.3f}" if inst else "")

    lines = [f"{'class':<14} {'IoU':>7}" + (f" {'iIoU':>7}" if inst else "")]
    lines += [line(n, raw["classScores"][n], raw["classInstScores"][n])
              for n in cs.SEM_SEG_CLASSES]
    return "\n".join(lines + ["-" * len(lines[0]), line("mean", raw["averageScoreClasses"],
                                                         raw["averageScoreInstClasses"])])


# ------------------------------------------------------------------------------------------------
# Instances.


@dataclasses.dataclass
class _Pred:
  pixel_count: int
  confidence: float
  void_intersection: int
  matched: list[tuple[int, int]]  # (index into the image's ground truth of the class, pixels)


@dataclasses.dataclass
class _Image:
  gts: list[list[tuple[int, int]]]  # Per class: (instance id, pixel count).
  preds: list[list[_Pred]]  # Per class, in prediction order.
  gt_preds: list[list[list[tuple[int, int]]]]  # Per class and gt: (pred index, pixels).


class CityscapesInstanceEvaluator:
  """Instance-level AP of cityscapesScripts (see the module docstring)."""

  def __init__(self):
    self.reset()

  def reset(self) -> None:
    self._images: list[_Image] = []

  @property
  def num_images(self) -> int:
    return len(self._images)

  def add(self, gt_instance_ids: np.ndarray, masks: Sequence[np.ndarray] | np.ndarray,
          label_ids: Sequence[int] | np.ndarray, scores: Sequence[float] | np.ndarray) -> None:
    """One image.

    Args:
      gt_instance_ids: int [H, W], the ``*_gtFine_instanceIds.png`` values.
      masks: N masks [H, W]; any non-zero pixel belongs to the instance.
      label_ids: N Cityscapes *label* ids (e.g. ``THING_LABEL_IDS[class]``); predictions of
        other labels are ignored, as the script does.
      scores: N confidences.
    """
    gt = np.asarray(gt_instance_ids).astype(np.int64)
    if gt.ndim != 2:
      raise ValueError(f"ground truth must be [H, W], got shape {gt.shape}")
    if not (len(masks) == len(label_ids) == len(scores)):
      raise ValueError(f"{len(masks)} masks, {len(label_ids)} label ids and {len(scores)} "
                       "scores")
    ids, counts = np.unique(gt, return_counts=True)
    gts: list[list[tuple[int, int]]] = [[] for _ in cs.THING_CLASSES]
    for inst_id, count in zip(ids.tolist(), counts.tolist()):
      label_id = inst_id if inst_id < 1000 else inst_id // 1000
      if label_id not in cs.ID_TO_LABEL:
        raise ValueError(f"ground-truth instance id {inst_id} has unknown label id {label_id}")
      if label_id in cs.THING_LABEL_IDS:
        gts[cs.THING_LABEL_IDS.index(label_id)].append((inst_id, count))
    void = np.isin(gt, _VOID_IDS)
    preds: list[list[_Pred]] = [[] for _ in cs.THING_CLASSES]
    gt_preds = [[[] for _ in class_gts] for class_gts in gts]
    for mask, label_id, score in zip(masks, label_ids, scores):
      label_id = int(label_id)
      if label_id not in cs.ID_TO_LABEL:
        raise ValueError(f"predicted label id {label_id} is not a Cityscapes label id")
      if label_id not in cs.THING_LABEL_IDS:
        continue
      c = cs.THING_LABEL_IDS.index(label_id)
      mask = np.asarray(mask)
      if mask.shape != gt.shape:
        raise ValueError(f"mask shape {mask.shape} != ground truth shape {gt.shape}")
      mask = mask != 0
      pixel_count = int(np.count_nonzero(mask))
      if not pixel_count:
        continue
      under, under_counts = np.unique(gt[mask], return_counts=True)
      overlap = dict(zip(under.tolist(), under_counts.tolist()))
      matched = [(k, overlap[inst_id]) for k, (inst_id, _) in enumerate(gts[c])
                 if overlap.get(inst_id, 0) > 0]
      for k, inter in matched:
        gt_preds[c][k].append((len(preds[c]), inter))
      preds[c].append(_Pred(pixel_count=pixel_count, confidence=float(score),
                            void_intersection=int(np.count_nonzero(void & mask)),
                            matched=matched))
    self._images.append(_Image(gts=gts, preds=preds, gt_preds=gt_preds))

  def ap_matrix(self) -> np.ndarray:
    """float64 [8 classes, 10 overlaps] AP (fractions; NaN for classes without ground truth)."""
    ap = np.zeros((len(cs.THING_CLASSES), len(OVERLAPS)), float)
    for o_i, overlap_th in enumerate(OVERLAPS):
      for c in range(len(cs.THING_CLASSES)):
        ap[c, o_i] = self._class_ap(c, overlap_th)
    return ap

  def _class_ap(self, c: int, overlap_th: float) -> float:
    # Mirrors evaluateMatches step by step (same appends and float operations).
    y_true, y_score = np.empty(0), np.empty(0)
    hard_fns = 0
    have_gt = have_pred = False
    for img in self._images:
      all_gts, preds = img.gts[c], img.preds[c]
      kept = [k for k, (inst_id, count) in enumerate(all_gts)
              if inst_id >= 1000 and count >= MIN_REGION_SIZE]
      have_gt |= bool(kept)
      have_pred |= bool(preds)
      cur_true = np.ones(len(kept))
      cur_score = np.ones(len(kept)) * (-float("inf"))
      cur_match = np.zeros(len(kept), dtype=bool)
      for g_i, k in enumerate(kept):
        gt_count = all_gts[k][1]
        found = False
        for p_i, inter in img.gt_preds[c][k]:
          pred = preds[p_i]
          overlap = float(inter) / (gt_count + pred.pixel_count - inter)
          if overlap > overlap_th:
            if cur_match[g_i]:
              hi = max(cur_score[g_i], pred.confidence)
              lo = min(cur_score[g_i], pred.confidence)
              cur_score[g_i] = hi
              cur_true = np.append(cur_true, 0)
              cur_score = np.append(cur_score, lo)
              cur_match = np.append(cur_match, True)
            else:
              found = True
              cur_match[g_i] = True
              cur_score[g_i] = pred.confidence
        if not found:
          hard_fns += 1
      cur_true = cur_true[cur_match]
      cur_score = cur_score[cur_match]
      for pred in preds:
        if any(float(inter) / (all_gts[k][1] + pred.pixel_count - inter) > overlap_th
               for k, inter in pred.matched):
          continue
        ignored = pred.void_intersection
        for k, inter in pred.matched:
          inst_id, count = all_gts[k]
          if inst_id < 1000:
            ignored += inter
          if count < MIN_REGION_SIZE:
            ignored += inter
        if float(ignored) / pred.pixel_count <= overlap_th:
          cur_true = np.append(cur_true, 0)
          cur_score = np.append(cur_score, pred.confidence)
      y_true = np.append(y_true, cur_true)
      y_score = np.append(y_score, cur_score)

    if not have_gt:
      return float("nan")
    if not have_pred or not len(y_score):
      return 0.0
    order = np.argsort(y_score)
    y_score_sorted = y_score[order]
    y_true_cumsum = np.cumsum(y_true[order])
    _, unique_indices = np.unique(y_score_sorted, return_index=True)
    n_points = len(unique_indices) + 1
    n_examples = len(y_score_sorted)
    n_true = y_true_cumsum[-1]
    precision, recall = np.zeros(n_points), np.zeros(n_points)
    y_true_cumsum = np.append(y_true_cumsum, 0)
    for i, idx in enumerate(unique_indices):
      cum = y_true_cumsum[idx - 1]
      tp = n_true - cum
      fp = n_examples - idx - tp
      fn = cum + hard_fns
      precision[i] = float(tp) / (tp + fp)
      recall[i] = float(tp) / (tp + fn)
    precision[-1] = 1.
    recall[-1] = 0.
    recall_for_conv = np.append(np.append(recall[0], recall), 0.)
    step_widths = np.convolve(recall_for_conv, [-0.5, 0, 0.5], "valid")
    return float(np.dot(precision, step_widths))

  def compute(self) -> dict[str, float]:
    """``segm/AP``, ``segm/AP50`` and per class ``segm/AP-<name>``, ``segm/AP50-<name>``
    (percent; the script's ``allAp``, ``allAp50%`` and class ``ap`` / ``ap50%``)."""
    ap = self.ap_matrix()
    o50 = np.where(np.isclose(OVERLAPS, 0.5))
    with warnings.catch_warnings():
      warnings.simplefilter("ignore", RuntimeWarning)  # nanmean of all-NaN: NaN is right.
      res = {"segm/AP": _pct(np.nanmean(ap)), "segm/AP50": _pct(np.nanmean(ap[:, o50]))}
    for c, name in enumerate(cs.THING_CLASSES):
      res[f"segm/AP-{name}"] = _pct(np.average(ap[c]))
    for c, name in enumerate(cs.THING_CLASSES):
      res[f"segm/AP50-{name}"] = _pct(np.average(ap[c, o50]))
    return res

  def table(self, metrics: Mapping[str, float] | None = None) -> str:
    """Per-class AP / AP50 table in percent."""
    m = self.compute() if metrics is None else metrics
    lines = [f"{'class':<12} {'AP':>7} {'AP50':>7}"]
    for name in cs.THING_CLASSES:
      lines.append(f"{name:<12} {m[f'segm/AP-{name}']:7.3f} {m[f'segm/AP50-{name}']:7.3f}")
    lines.append("-" * len(lines[0]))
    lines.append(f"{'average':<12} {m['segm/AP']:7.3f} {m['segm/AP50']:7.3f}")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------
# Results formats.


def _ground_truth_files(gt_root: PathLike, split: str, suffix: str) -> list[str]:
  _, gt_dir = cs.split_dirs(gt_root, split)
  files = sorted(glob.glob(os.path.join(gt_dir, "*", "*" + suffix)))
  if not files:
    raise FileNotFoundError(f"no ground truth found: expected {gt_dir}/<city>/*{suffix}")
  return files


def _find_predictions(gt_files: Sequence[str], predictions_dir: PathLike,
                      ext: str) -> list[str]:
  """The script's getPrediction: exactly one ``<city>_<seq>_<frame>*<ext>`` anywhere below."""
  if not os.path.isdir(predictions_dir):
    raise FileNotFoundError(f"predictions folder not found: {predictions_dir}")
  walk = [(root, files) for root, _, files in os.walk(predictions_dir)]
  found = []
  for gt in gt_files:
    pattern = f"{cs.cityscapes_stem(gt)}*{ext}"
    hits = [os.path.join(root, f) for root, files in walk for f in fnmatch.filter(files, pattern)]
    if not hits:
      raise FileNotFoundError(f"no prediction {pattern} under {predictions_dir} for ground "
                              f"truth {gt}")
    if len(hits) > 1:
      raise ValueError(f"several predictions match {pattern} for ground truth {gt}: "
                       f"{hits[:3]}")
    found.append(hits[0])
  return found


def _read_array(path: str) -> np.ndarray:
  try:
    with Image.open(path) as image:
      return np.array(image)
  except (OSError, SyntaxError, ValueError) as e:
    raise ValueError(f"cannot read {path}: {e}") from e


def evaluate_semantic_results(gt_root: PathLike, split: str,
                              predictions_dir: PathLike) -> CityscapesSemSegEvaluator:
  """Evaluates label-id prediction PNGs against ``gtFine/{split}/*/*_gtFine_labelIds.png``
  (with the ``instanceIds`` for iIoU where they all exist)."""
  gt_files = _ground_truth_files(gt_root, split, "_gtFine_labelIds.png")
  pred_files = _find_predictions(gt_files, predictions_dir, ".png")
  inst_files = [f.replace("_labelIds.png", "_instanceIds.png") for f in gt_files]
  with_inst = all(os.path.isfile(f) for f in inst_files)
  evaluator = CityscapesSemSegEvaluator()
  for gt_file, pred_file, inst_file in zip(gt_files, pred_files, inst_files):
    pred, gt = _read_array(pred_file), _read_array(gt_file)
    try:  # add_label_ids checks the shapes and the ids
      evaluator.add_label_ids(pred, gt, _read_array(inst_file) if with_inst else None)
    except ValueError as e:
      raise ValueError(f"{pred_file} vs {gt_file}: {e}") from e
  return evaluator


def read_instance_prediction(txt_file: PathLike,
                             predictions_dir: PathLike) -> list[tuple[str, int, float]]:
  """``(mask path, label id, score)`` of an official results txt (the script's readPredInfo:
  paths relative to the txt, inside ``predictions_dir``; a repeated path keeps its first
  position and last values). Blank lines are skipped."""
  root = os.path.abspath(predictions_dir)
  entries: dict[str, tuple[int, float]] = {}
  with open(txt_file) as f:
    for n, line in enumerate(f, 1):
      if not line.strip():
        continue
      parts = line.split(" ")
      if len(parts) != 3:
        raise ValueError(f"{txt_file}:{n}: expected '<mask png> <label id> <score>', got "
                         f"{line.rstrip()!r}")
      if os.path.isabs(parts[0]):
        raise ValueError(f"{txt_file}:{n}: mask path must be relative, got {parts[0]}")
      path = os.path.abspath(os.path.join(os.path.dirname(txt_file), parts[0]))
      if os.path.commonprefix([path, root]) != root:
        raise ValueError(f"{txt_file}:{n}: mask {path} is outside the predictions folder {root}")
      try:
        entries[path] = (int(float(parts[1])), float(parts[2]))
      except ValueError as e:
        raise ValueError(f"{txt_file}:{n}: {e}") from e
  return [(p, l, s) for p, (l, s) in entries.items()]


def evaluate_instance_results(gt_root: PathLike, split: str,
                              predictions_dir: PathLike) -> CityscapesInstanceEvaluator:
  """Evaluates official instance results (txt + mask PNGs) against
  ``gtFine/{split}/*/*_gtFine_instanceIds.png``."""
  gt_files = _ground_truth_files(gt_root, split, "_gtFine_instanceIds.png")
  txt_files = _find_predictions(gt_files, predictions_dir, ".txt")
  evaluator = CityscapesInstanceEvaluator()
  for gt_file, txt_file in zip(gt_files, txt_files):
    gt = _read_array(gt_file)
    masks, label_ids, scores = [], [], []
    for path, label_id, score in read_instance_prediction(txt_file, predictions_dir):
      if label_id not in cs.ID_TO_LABEL:
        raise ValueError(f"{txt_file}: unknown label id {label_id} for {path}")
      if label_id not in cs.THING_LABEL_IDS:
        continue  # The script does not even open those masks.
      try:
        with Image.open(path) as image:
          mask = np.array(image.convert("L")) != 0
      except FileNotFoundError:
        raise FileNotFoundError(f"{txt_file}: mask {path} not found") from None
      except (OSError, SyntaxError, ValueError) as e:
        raise ValueError(f"{txt_file}: cannot read mask {path}: {e}") from e
      if mask.shape != gt.shape:
        raise ValueError(f"{path}: mask size {mask.shape} != ground truth {gt.shape} of "
                         f"{gt_file}")
      masks.append(mask)
      label_ids.append(label_id)
      scores.append(score)
    evaluator.add(gt, masks, label_ids, scores)
  return evaluator
