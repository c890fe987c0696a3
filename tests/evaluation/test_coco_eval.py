"""COCO evaluator: perfect and perturbed predictions against pycocotools run directly, CLI."""

import contextlib
import copy
import io
import json
import math
import subprocess
import sys

import numpy as np
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
import pycocotools.mask as mask_util
import pytest

from conftest import REPO_ROOT
from pointrend_jax.evaluation import coco_eval
from pointrend_jax.tools import evaluate as evaluate_tool

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

CATEGORIES = [{"id": 9, "name": "nine"}, {"id": 2, "name": "two"}, {"id": 5, "name": "five"}]
CONTIGUOUS_TO_ID = (2, 5, 9)  # Sorted ids.


def _ellipse(h, w, cx, cy, a, b):
  y, x = np.mgrid[0:h, 0:w] + 0.5
  return ((x - cx) / a)**2 + ((y - cy) / b)**2 < 1


def _rle(mask):
  rle = mask_util.encode(np.asfortranarray(mask.astype(np.uint8)))
  rle["counts"] = rle["counts"].decode()
  return rle


@pytest.fixture(scope="module")
def gt():
  """Six 64x80 images with 2-4 elliptic instances each (small and medium), one crowd."""
  rng = np.random.default_rng(0)
  images, anns, masks = [], [], {}
  for image_id in range(1, 7):
    h, w = 64, 80
    images.append({"id": image_id * 10, "file_name": f"{image_id}.png", "height": h, "width": w})
    for _ in range(rng.integers(2, 5)):
      a, b = rng.uniform(3, 28), rng.uniform(3, 28)
      m = _ellipse(h, w, rng.uniform(15, 65), rng.uniform(15, 50), a, b)
      rle = _rle(m)
      ann_id = len(anns) + 1
      anns.append({"id": ann_id, "image_id": image_id * 10,
                   "category_id": int(rng.choice(CONTIGUOUS_TO_ID)),
                   "bbox": mask_util.toBbox(rle).tolist(), "area": float(m.sum()),
                   "iscrowd": 0, "segmentation": rle})
      masks[ann_id] = m
  crowd = _ellipse(64, 80, 8, 8, 6, 6)
  anns.append({"id": len(anns) + 1, "image_id": 10, "category_id": 2, "iscrowd": 1,
               "bbox": mask_util.toBbox(_rle(crowd)).tolist(), "area": float(crowd.sum()),
               "segmentation": _rle(crowd)})
  areas = np.array([a["area"] for a in anns])
  assert (areas < 32**2).any() and (areas > 32**2).any() and (areas < 96**2).all()
  return {"images": images, "annotations": anns, "categories": CATEGORIES}, masks


def _perfect_results(gt_json, masks):
  results = []
  for a in gt_json["annotations"]:
    if a["iscrowd"]:
      continue
    x, y, w, h = a["bbox"]
    results += coco_eval.instances_to_coco_results(
        a["image_id"], np.array([[x, y, x + w, y + h]]), np.array([0.9]),
        np.array([CONTIGUOUS_TO_ID.index(a["category_id"])]), masks[a["id"]][None],
        CONTIGUOUS_TO_ID)
  return results


def _perturbed_results(gt_json, masks, seed=1):
  rng = np.random.default_rng(seed)
  results = []
  for a in gt_json["annotations"]:
    if a["iscrowd"] or rng.uniform() < 0.15:  # Some misses.
      continue
    x, y, w, h = a["bbox"]
    box = np.array([x, y, x + w, y + h]) + rng.normal(0, 1.5, 4)
    m = np.roll(masks[a["id"]], tuple(rng.integers(-2, 3, 2)), axis=(0, 1))
    cls = CONTIGUOUS_TO_ID.index(a["category_id"])
    if rng.uniform() < 0.1:
      cls = (cls + 1) % 3  # Some wrong classes.
    results += coco_eval.instances_to_coco_results(
        a["image_id"], box[None], rng.uniform(0.05, 1, 1), np.array([cls]), m[None],
        CONTIGUOUS_TO_ID)
  for image in gt_json["images"]:  # False positives.
    fp = _ellipse(64, 80, *rng.uniform(10, 60, 2), 5, 7)
    results += coco_eval.instances_to_coco_results(
        image["id"], np.array([[10, 10, 30, 25]]), rng.uniform(0.05, 1, 1),
        np.array([rng.integers(3)]), fp[None], CONTIGUOUS_TO_ID)
  return results


def test_instances_to_coco_results():
  mask = np.zeros((5, 7), bool)
  mask[1:3, 2:6] = True
  res = coco_eval.instances_to_coco_results(
      4, np.array([[1.5, 2.0, 6.0, 4.25]]), np.array([0.5]), np.array([2]), mask[None],
      CONTIGUOUS_TO_ID)
  assert res[0]["image_id"] == 4 and res[0]["category_id"] == 9 and res[0]["score"] == 0.5
  assert res[0]["bbox"] == [1.5, 2.0, 4.5, 2.25]
  np.testing.assert_array_equal(mask_util.decode(res[0]["segmentation"]), mask)
  json.dumps(res)  # Serializable.
  rle_input = coco_eval.instances_to_coco_results(
      4, np.zeros((1, 4)), np.ones(1), np.zeros(1, int), [res[0]["segmentation"]], {0: 2})
  assert rle_input[0]["segmentation"] == res[0]["segmentation"]
  assert rle_input[0]["category_id"] == 2
  with pytest.raises(ValueError, match="class 3"):
    coco_eval.instances_to_coco_results(1, np.zeros((1, 4)), np.ones(1), np.array([3]), None,
                                        CONTIGUOUS_TO_ID)


def test_perfect_predictions_give_100(gt):
  gt_json, masks = gt
  ev = coco_eval.COCOEvaluator(gt_json)
  ev.add(_perfect_results(gt_json, masks))
  metrics = ev.compute()
  for task in ("bbox", "segm"):
    for m in ("AP", "AP50", "AP75", "APs", "APm"):
      assert metrics[f"{task}/{m}"] == pytest.approx(100.0), (task, m)
    assert math.isnan(metrics[f"{task}/APl"])  # No large objects: -1 in COCOeval -> NaN.
    for c in ("nine", "two", "five"):
      assert metrics[f"{task}/AP-{c}"] == pytest.approx(100.0)


def _direct_cocoeval(gt_json, results, task):
  with contextlib.redirect_stdout(io.StringIO()):
    coco_gt = COCO()
    coco_gt.dataset = copy.deepcopy(gt_json)
    coco_gt.createIndex()
    results = copy.deepcopy(results)
    if task == "segm":
      for r in results:
        r.pop("bbox")
    e = COCOeval(coco_gt, coco_gt.loadRes(results), task)
    e.evaluate()
    e.accumulate()
    e.summarize()
  return e


def test_perturbed_predictions_match_pycocotools(gt):
  gt_json, masks = gt
  results = _perturbed_results(gt_json, masks)
  ev = coco_eval.COCOEvaluator(gt_json)
  for image in gt_json["images"]:  # Per image through add_instances, like the eval loop.
    rs = [r for r in results if r["image_id"] == image["id"]]
    ev.add_instances(
        image["id"],
        np.array([[x, y, x + w, y + h] for x, y, w, h in (r["bbox"] for r in rs)]).reshape(-1, 4),
        np.array([r["score"] for r in rs]),
        np.array([CONTIGUOUS_TO_ID.index(r["category_id"]) for r in rs], int),
        [r["segmentation"] for r in rs])
  metrics = ev.compute()
  names = {c["id"]: c["name"] for c in CATEGORIES}
  for task in ("bbox", "segm"):
    direct = _direct_cocoeval(gt_json, ev.results, task)
    for i, m in enumerate(coco_eval.SUMMARY_METRICS):
      want = direct.stats[i] * 100 if direct.stats[i] >= 0 else float("nan")
      assert metrics[f"{task}/{m}"] == pytest.approx(want, abs=1e-6, nan_ok=True), (task, m)
    assert 20 < metrics[f"{task}/AP"] < 95
    for k, cat_id in enumerate(sorted(names)):
      p = direct.eval["precision"][:, :, k, 0, -1]
      assert metrics[f"{task}/AP-{names[cat_id]}"] == pytest.approx(np.mean(p[p > -1]) * 100,
                                                                     abs=1e-6)
  assert "Average Precision" in ev.summaries["segm"]
  assert "nine" in ev.per_category_table("bbox")


def test_faster_coco_eval_backend_gives_the_same_numbers(gt):
  gt_json, masks = gt
  results = _perturbed_results(gt_json, masks)
  reference = coco_eval.evaluate_coco(gt_json, results).compute()
  faster = coco_eval.evaluate_coco(gt_json, results, backend="faster_coco_eval").compute()
  assert reference.keys() == faster.keys()
  for key, value in reference.items():
    assert faster[key] == pytest.approx(value, abs=1e-6, nan_ok=True), key
  with pytest.raises(ValueError, match="backend"):
    coco_eval.COCOEvaluator(gt_json, backend="nope")


def test_segm_uses_mask_area_and_img_ids(gt):
  gt_json, masks = gt
  results = _perturbed_results(gt_json, masks, seed=2)
  ev = coco_eval.COCOEvaluator(gt_json, tasks=("segm",))
  ev.add(results)
  full = ev.compute()
  assert set(k.split("/")[0] for k in full) == {"segm"}
  subset = ev.compute(img_ids=[10, 20])
  assert subset["segm/AP"] != full["segm/AP"]


def test_empty_predictions_are_nan(gt):
  gt_json, _ = gt
  ev = coco_eval.COCOEvaluator(gt_json)
  ev.add_instances(10, np.zeros((0, 4)), np.zeros(0), np.zeros(0, int), np.zeros((0, 64, 80)))
  metrics = ev.compute()
  assert sorted(metrics) == sorted(f"{t}/{m}" for t in ("bbox", "segm")
                                   for m in coco_eval.SUMMARY_METRICS)
  assert all(math.isnan(v) for v in metrics.values())


def test_rejects_unknown_ids(gt):
  gt_json, _ = gt
  ev = coco_eval.COCOEvaluator(gt_json, tasks=("bbox",))
  with pytest.raises(ValueError, match="image id 3"):
    ev.add([{"image_id": 3, "category_id": 2, "bbox": [0, 0, 1, 1], "score": 1.0}])
  with pytest.raises(ValueError, match="category id 4"):
    ev.add([{"image_id": 10, "category_id": 4, "bbox": [0, 0, 1, 1], "score": 1.0}])


def test_cli_round_trip(gt, tmp_path):
  gt_json, masks = gt
  gt_path, res_path, out_path = (tmp_path / "gt.json", tmp_path / "res.json",
                                 tmp_path / "metrics.json")
  gt_path.write_text(json.dumps(gt_json))
  coco_eval.write_results_json(_perturbed_results(gt_json, masks), res_path)
  out = io.StringIO()
  status = evaluate_tool.main(["coco", "--annotations", str(gt_path), "--predictions",
                               str(res_path), "--output", str(out_path)], out=out)
  assert status == 0
  written = json.loads(out_path.read_text())
  expected = coco_eval.evaluate_coco(gt_path, coco_eval.read_results_json(res_path)).compute()
  assert written.keys() == expected.keys()
  for k, v in expected.items():
    assert (written[k] is None) if math.isnan(v) else written[k] == pytest.approx(v)
  text = out.getvalue()
  assert "Average Precision" in text and "per-category segm AP" in text
  assert written["bbox/APl"] is None


def test_cli_errors(tmp_path, capsys):
  assert evaluate_tool.main(["coco", "--annotations", str(tmp_path / "gt.json"),
                             "--predictions", str(tmp_path / "r.json")]) == 2
  err = capsys.readouterr().err
  assert "gt.json" in err and "r.json" in err
  assert evaluate_tool.main(["cityscapes-semantic", "--gt", str(tmp_path),
                             "--predictions", str(tmp_path)]) == 2
  assert "leftImg8bit" in capsys.readouterr().err


def test_cli_module_entry_point():
  proc = subprocess.run([sys.executable, "-m", "pointrend_jax.tools.evaluate", "--help"],
                        cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
  assert proc.returncode == 0 and "coco" in proc.stdout
