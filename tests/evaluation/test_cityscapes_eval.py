"""Cityscapes semantic / instance metrics: cross-checked against cityscapesScripts 2.3.0.

The official scripts run on the same files (results written with detectron2's names) with two shims
for numpy 2.x applied here only: ``np.in1d`` (removed in numpy 2.4) and JSON dumping of numpy
integers (``writeDict2JSON`` serializes through ``o.__dict__``).
"""

import glob
import io
import json
import math
import os

import numpy as np
from PIL import Image
import pytest

from pointrend_jax.data import cityscapes as cs
from pointrend_jax.evaluation import cityscapes_eval as ce
from pointrend_jax.tools import evaluate as evaluate_tool
from cityscapes_gt import write_gt_images

H, W = 72, 136
SPLIT = "val"

# Polygon labels drawn in random images: stuff, void, things, groups, ignored things.
_STUFF = ("road", "sidewalk", "building", "vegetation", "sky", "pole", "static", "ego vehicle",
          "parking", "guard rail", "terrain")
_THINGS = ("person", "rider", "car", "truck", "bus", "train", "motorcycle", "bicycle")
_EXTRA = ("cargroup", "persongroup", "bicyclegroup", "caravan", "trailer", "license plate")


def _random_polygon(rng, big):
  cx, cy = rng.integers(0, W), rng.integers(0, H)
  sx, sy = (rng.integers(20, 70), rng.integers(10, 40)) if big else (rng.integers(6, 30),
                                                                      rng.integers(6, 24))
  n = int(rng.integers(3, 7))
  angles = np.sort(rng.uniform(0, 2 * np.pi, n))
  radius = rng.uniform(0.6, 1.0, n)
  return [[int(np.clip(cx + sx * r * np.cos(a), 0, W - 1)),
           int(np.clip(cy + sy * r * np.sin(a), 0, H - 1))] for a, r in zip(angles, radius)]


def _build_ground_truth(root, rng, n_images=8):
  """Random polygons JSONs rendered into labelIds / instanceIds as the official scripts do."""
  cities = ("aachen", "bochum")
  for i in range(n_images):
    city = cities[i % 2]
    gt_dir = os.path.join(root, "gtFine", SPLIT, city)
    img_dir = os.path.join(root, "leftImg8bit", SPLIT, city)
    os.makedirs(gt_dir, exist_ok=True)
    os.makedirs(img_dir, exist_ok=True)
    stem = f"{city}_{i:06d}_000019"
    # A full-image road first, so that background is not void.
    objects = [{"label": "road", "polygon": [[0, 0], [W - 1, 0], [W - 1, H - 1], [0, H - 1]]}]
    objects += [{"label": str(rng.choice(_STUFF)), "polygon": _random_polygon(rng, True)}
                for _ in range(4)]
    for _ in range(int(rng.integers(4, 10))):
      label = str(rng.choice(_THINGS)) if rng.random() < 0.75 else str(rng.choice(_EXTRA))
      objects.append({"label": label, "polygon": _random_polygon(rng, False)})
    if i == n_images - 1:
      objects = objects[:3]  # An image without thing instances.
    with open(os.path.join(gt_dir, stem + "_gtFine_polygons.json"), "w") as f:
      json.dump({"imgHeight": H, "imgWidth": W, "objects": objects}, f)
    write_gt_images(os.path.join(gt_dir, stem + "_gtFine_polygons.json"))
    Image.fromarray(np.zeros((H, W, 3), np.uint8)).save(
        os.path.join(img_dir, stem + "_leftImg8bit.png"))


def _shift(mask, rng):
  """The mask shifted by 0..2 px: overlaps from 1 down to below 0.5."""
  dy, dx = rng.integers(-2, 3, 2) * (rng.random(2) < 0.5)
  return np.roll(np.roll(mask, dy, axis=0), dx, axis=1)


def _instance_predictions(gt_inst, rng):
  """Perturbed copies of gt instances (and groups), wrong classes, duplicates, false positives
  on background / void, ignored classes, an empty mask; scores with ties."""
  masks, label_ids, scores = [], [], []

  def add(mask, label_id):
    masks.append(mask)
    label_ids.append(int(label_id))
    scores.append(float(rng.choice([0.3, 0.5, 0.7, 0.9])) if rng.random() < 0.4
                  else float(np.float32(rng.random())))

  for inst_id in np.unique(gt_inst):
    label_id = inst_id // 1000 if inst_id >= 1000 else inst_id
    if label_id not in cs.THING_LABEL_IDS:
      continue
    for _ in range(int(rng.integers(0, 3))):
      wrong = rng.random() < 0.1
      add(_shift(gt_inst == inst_id, rng), rng.choice(cs.THING_LABEL_IDS) if wrong else label_id)
  # False positives; without thing instances (last image), one per class: cityscapesScripts
  # crashes on a class with ground truth whose every prediction is ignored and which has no
  # match at some overlap.
  no_things = not (gt_inst >= 1000).any()
  for k in range(len(cs.THING_LABEL_IDS) if no_things else 3):
    m = np.zeros((H, W), bool)
    y, x = rng.integers(0, H - 8), rng.integers(0, W - 8)
    m[y:y + rng.integers(3, 20), x:x + rng.integers(3, 30)] = True
    add(m, cs.THING_LABEL_IDS[k] if no_things else rng.choice(cs.THING_LABEL_IDS))
  add(np.isin(gt_inst, [0, 1, 4, 9]), 26)  # Mostly void: usually ignored, not a false positive.
  add(gt_inst > 0, 29)  # caravan: not evaluated.
  add(np.zeros((H, W), bool), 24)  # Empty: skipped.
  return masks, label_ids, scores


def _semantic_prediction(gt_label_ids, rng):
  train = cs.label_id_to_train_id(gt_label_ids).astype(np.int64)
  noise = rng.integers(0, cs.NUM_SEM_SEG_CLASSES, train.shape)
  flip = (rng.random(train.shape) < 0.15) | (train == cs.IGNORE_LABEL)
  pred = np.where(flip, noise, train)
  pred[:10, :20] = 13  # A block of "car" (instance-level tp/fn for iIoU).
  pred[pred == 5] = 7  # Never predict "pole": a class with GT but no prediction.
  return pred.astype(np.uint8)


def _write_instance_results(image_file, masks, label_ids, scores, out_dir):
  """One image's official instance results with detectron2's names; returns the txt path."""
  os.makedirs(out_dir, exist_ok=True)
  stem = os.path.splitext(os.path.basename(image_file))[0]
  txt = os.path.join(out_dir, stem + "_pred.txt")
  with open(txt, "w") as f:
    for i, (mask, label_id, score) in enumerate(zip(masks, label_ids, scores)):
      png = f"{stem}_{i}_{cs.ID_TO_LABEL[label_id].name}.png"
      Image.fromarray(np.asarray(mask).astype(np.uint8) * 255).save(os.path.join(out_dir, png))
      f.write(f"{png} {label_id} {float(score)!r}\n")  # repr: the score reads back exactly
  return txt


def _write_semantic_result(pred_train_ids, image_file, out_dir):
  """``<image stem>_pred.png`` in label ids, as detectron2 writes it; returns its path."""
  os.makedirs(out_dir, exist_ok=True)
  png = os.path.join(out_dir, os.path.splitext(os.path.basename(image_file))[0] + "_pred.png")
  Image.fromarray(cs.train_id_to_label_id(pred_train_ids)).save(png)
  return png


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
  """Ground truth + results written in the official formats; paths and in-memory data."""
  tmp = tmp_path_factory.mktemp("cityscapes_eval")
  root = str(tmp / "cityscapes")
  rng = np.random.default_rng(1234)
  _build_ground_truth(root, rng)
  inst_dir, sem_dir = str(tmp / "pred_inst"), str(tmp / "pred_sem")
  inst_ev, sem_ev = ce.CityscapesInstanceEvaluator(), ce.CityscapesSemSegEvaluator()
  for f in cs.cityscapes_files(root, SPLIT):
    gt_inst = np.array(Image.open(f.instance_ids)).astype(np.int64)
    gt_label = np.array(Image.open(f.label_ids))
    masks, label_ids, scores = _instance_predictions(gt_inst, rng)
    inst_ev.add(gt_inst, masks, label_ids, scores)
    _write_instance_results(f.image, masks, label_ids, scores, inst_dir)  # caravan included
    pred = _semantic_prediction(gt_label, rng)
    sem_ev.add(pred, gt_label, gt_inst)
    _write_semantic_result(pred, f.image, sem_dir)
  return {"root": root, "inst_dir": inst_dir, "sem_dir": sem_dir, "inst_ev": inst_ev,
          "sem_ev": sem_ev, "tmp": tmp}


@pytest.fixture()
def official(monkeypatch, tmp_path):
  """cityscapesScripts' evaluation modules with the numpy-2 shims, writing only in tmp_path."""
  pytest.importorskip("cityscapesscripts")
  from cityscapesscripts.evaluation import evalInstanceLevelSemanticLabeling as inst_mod
  from cityscapesscripts.evaluation import evalPixelLevelSemanticLabeling as pix_mod

  monkeypatch.setattr(np, "in1d", lambda a, b, invert=False: np.isin(a, b, invert=invert).ravel(),
                      raising=False)

  def write_json(d, file_name):
    with open(file_name, "w") as f:
      json.dump(d, f, default=lambda o: o.item() if isinstance(o, np.generic) else o.__dict__,
                sort_keys=True, indent=4)

  monkeypatch.setattr(inst_mod, "writeDict2JSON", write_json)
  monkeypatch.setattr(pix_mod, "writeDict2JSON", write_json)
  monkeypatch.chdir(tmp_path)  # evaluateImgLists writes matches.json into the cwd.
  for mod in (inst_mod, pix_mod):
    for k, v in (("predictionWalk", None), ("JSONOutput", False), ("quiet", True),
                 ("colorized", False)):
      monkeypatch.setattr(mod.args, k, v)
  monkeypatch.setattr(inst_mod.args, "gtInstancesFile", str(tmp_path / "gtInstances.json"))
  return inst_mod, pix_mod


def _official_instance(inst_mod, root, pred_dir, monkeypatch):
  monkeypatch.setattr(inst_mod.args, "predictionPath", os.path.abspath(pred_dir))
  gts = sorted(glob.glob(os.path.join(root, "gtFine", SPLIT, "*", "*_gtFine_instanceIds.png")))
  preds = [inst_mod.getPrediction(g, inst_mod.args) for g in gts]
  return inst_mod.evaluateImgLists(preds, gts, inst_mod.args)


def _official_semantic(pix_mod, root, pred_dir, monkeypatch):
  monkeypatch.setattr(pix_mod.args, "predictionPath", os.path.abspath(pred_dir))
  gts = sorted(glob.glob(os.path.join(root, "gtFine", SPLIT, "*", "*_gtFine_labelIds.png")))
  preds = [pix_mod.getPrediction(pix_mod.args, g) for g in gts]
  return pix_mod.evaluateImgLists(preds, gts, pix_mod.args)


def _close(a, b, tol=1e-6):
  if isinstance(a, float) and math.isnan(a):
    return isinstance(b, float) and math.isnan(b)
  return abs(a - b) <= tol


def test_labels_match_cityscapesscripts():
  labels = pytest.importorskip("cityscapesscripts.helpers.labels")
  ours = [(l.name, l.id, l.train_id, l.category, l.category_id, l.has_instances,
           l.ignore_in_eval, l.color) for l in cs.LABELS]
  theirs = [(l.name, l.id, l.trainId, l.category, l.categoryId, l.hasInstances,
             l.ignoreInEval, l.color) for l in labels.labels]
  assert ours == theirs
  assert cs.THING_LABEL_IDS == (24, 25, 26, 27, 28, 31, 32, 33)
  assert cs.SEM_SEG_LABEL_IDS == (7, 8, 11, 12, 13, 17, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28,
                                  31, 32, 33)


def test_instance_ap_matches_cityscapesscripts(dataset, official, monkeypatch):
  inst_mod, _ = official
  res = _official_instance(inst_mod, dataset["root"], dataset["inst_dir"], monkeypatch)
  theirs = np.array(res["resultApMatrix"])[0]  # [classes, overlaps] (no distances).
  assert res["instLabels"] == list(cs.THING_CLASSES)
  from_files = ce.evaluate_instance_results(dataset["root"], SPLIT, dataset["inst_dir"])
  for ev in (dataset["inst_ev"], from_files):
    ours = ev.ap_matrix()
    np.testing.assert_array_equal(np.isnan(ours), np.isnan(theirs))
    assert np.nanmax(np.abs(ours - theirs)) <= 1e-6
    m = ev.compute()
    avg = res["averages"]
    assert _close(m["segm/AP"] / 100, avg["allAp"])
    assert _close(m["segm/AP50"] / 100, avg["allAp50%"])
    for name in cs.THING_CLASSES:
      assert _close(m[f"segm/AP-{name}"] / 100, avg["classes"][name]["ap"])
      assert _close(m[f"segm/AP50-{name}"] / 100, avg["classes"][name]["ap50%"])
  # The data exercises the interesting cases: partial APs and a class without ground truth.
  ap = dataset["inst_ev"].ap_matrix()
  assert 0 < np.nanmean(ap) < 1
  assert np.isnan(ap).any() or (ap[:, 0] > ap[:, -1]).any()


def test_semantic_matches_cityscapesscripts(dataset, official, monkeypatch):
  _, pix_mod = official
  res = _official_semantic(pix_mod, dataset["root"], dataset["sem_dir"], monkeypatch)
  from_files = ce.evaluate_semantic_results(dataset["root"], SPLIT, dataset["sem_dir"])
  for ev in (dataset["sem_ev"], from_files):
    ours = ev.raw_results()
    for key in ("classScores", "classInstScores", "categoryScores", "categoryInstScores"):
      assert ours[key].keys() == res[key].keys()
      for name, v in res[key].items():
        assert _close(ours[key][name], v), (key, name, ours[key][name], v)
    for key in ("averageScoreClasses", "averageScoreInstClasses", "averageScoreCategories",
                "averageScoreInstCategories"):
      assert _close(ours[key], res[key]), key
    m = ev.compute()
    assert _close(m["sem_seg/mIoU"], 100 * res["averageScoreClasses"], 1e-4)
    assert _close(m["sem_seg/iIoU"], 100 * res["averageScoreInstClasses"], 1e-4)
    assert m["sem_seg/IoU-pole"] == 0.0
    np.testing.assert_array_equal(ev.conf_matrix, np.array(res["confMatrix"], np.uint64))


def test_hand_checked_instance_cases():
  gt = np.zeros((20, 20), np.int64)
  gt[0:10, 0:10] = 26000  # car, 100 px.
  gt[10:20, 0:10] = 26  # car group, 100 px.
  gt[0:5, 10:20] = 26001  # car, 50 px: too small.
  gt[10:20, 10:20] = 4  # static (void).
  car = gt == 26000
  ev = ce.CityscapesInstanceEvaluator()
  ev.add(gt, [car, car, gt == 26, gt == 4, gt == 26001], [26, 26, 26, 26, 26],
         [0.9, 0.8, 0.7, 0.6, 0.5])
  ap = ev.ap_matrix()
  # TP 0.9 and a duplicate (FP) 0.8; the group, void and small-instance predictions are
  # ignored. The FP scores below the TP, so precision is 1 at recall 1: AP = 1.
  np.testing.assert_array_equal(ap[cs.THING_CLASSES.index("car")], 1.0)
  assert np.isnan(ap[cs.THING_CLASSES.index("person")]).all()
  ev.add(gt, [], [], [])  # Same ground truth, no predictions: a miss, recall 1/2.
  # (p, r) at scores 0.8, 0.9 and the end point: (1/2, 1/2), (1, 1/2), (1, 0); step widths
  # (r_{i-1} - r_{i+1}) / 2 = 0, 1/4, 1/4.
  np.testing.assert_array_equal(ev.ap_matrix()[cs.THING_CLASSES.index("car")], 0.5)
  m = ev.compute()
  assert m["segm/AP"] == 50.0 and m["segm/AP-car"] == 50.0 and math.isnan(m["segm/AP-bus"])


def test_instance_results_reader(tmp_path):
  masks = np.zeros((2, 4, 6), bool)
  masks[0, :2] = True
  masks[1, 2:, 3:] = True
  txt = _write_instance_results("/x/aachen_000001_000002_leftImg8bit.png", masks, [26, 33],
                                np.array([0.25, 0.123456789], np.float32), tmp_path)
  entries = ce.read_instance_prediction(txt, tmp_path)
  assert [(os.path.basename(p), l, s) for p, l, s in entries] == [
      ("aachen_000001_000002_leftImg8bit_0_car.png", 26, 0.25),
      ("aachen_000001_000002_leftImg8bit_1_bicycle.png", 33, float(np.float32(0.123456789)))]
  np.testing.assert_array_equal(np.array(Image.open(entries[1][0])) != 0, masks[1])
  (tmp_path / "bad.txt").write_text("../outside.png 26 0.5\n")
  with pytest.raises(ValueError, match="outside"):
    ce.read_instance_prediction(tmp_path / "bad.txt", tmp_path)


def test_results_errors(dataset, tmp_path):
  with pytest.raises(FileNotFoundError, match="no prediction"):
    ce.evaluate_semantic_results(dataset["root"], SPLIT, tmp_path)
  with pytest.raises(FileNotFoundError, match="gtFine"):
    ce.evaluate_instance_results(dataset["root"], "train", tmp_path)


def test_cli_round_trips(dataset, tmp_path):
  out = io.StringIO()
  metrics_file = tmp_path / "sem.json"
  assert evaluate_tool.main(["cityscapes-semantic", "--gt", dataset["root"], "--split", SPLIT,
                             "--predictions", dataset["sem_dir"], "--output",
                             str(metrics_file)], out=out) == 0
  written = json.loads(metrics_file.read_text())
  expected = dataset["sem_ev"].compute()
  assert written.keys() == expected.keys()
  assert all(_close(written[k], v, 1e-9) for k, v in expected.items())
  assert "road" in out.getvalue() and "mIoU" in out.getvalue()

  out = io.StringIO()
  metrics_file = tmp_path / "inst.json"
  assert evaluate_tool.main(["cityscapes-instance", "--gt", dataset["root"], "--split", SPLIT,
                             "--predictions", dataset["inst_dir"], "--output",
                             str(metrics_file)], out=out) == 0
  written = json.loads(metrics_file.read_text())
  expected = dataset["inst_ev"].compute()
  assert written.keys() == expected.keys()
  for k, v in expected.items():
    assert (written[k] is None) if math.isnan(v) else _close(written[k], v, 1e-9), k
  assert "bicycle" in out.getvalue()

  assert evaluate_tool.main(["cityscapes-instance", "--gt", str(tmp_path / "nope"),
                             "--predictions", dataset["inst_dir"]]) == 2
