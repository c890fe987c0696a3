"""Cityscapes sources: files, instance records (both detectron2 modes), semantic records, labels."""

import itertools
import json
import os

import numpy as np
from PIL import Image
import pycocotools.mask as mask_util
import pytest

from pointrend_jax.data import cityscapes as cs
from pointrend_jax.data import coco
from cityscapes_gt import write_gt_images

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

H, W = 64, 128


def _rect(x0, y0, x1, y1):
  return [[x0, y0], [x1, y0], [x1, y1], [x0, y1]]


# (city, stem) -> objects in file (= drawing) order: (label, polygon[, deleted]).
IMAGES = {
    ("aachen", "aachen_000000_000019"): [
        ("sky", _rect(0, 0, 127, 15)),
        ("road", _rect(0, 40, 127, 63)),
        ("car", _rect(10, 30, 40, 50)),           # A: partly under B.
        ("car", _rect(30, 35, 60, 55)),           # B: on top of A.
        ("persongroup", _rect(70, 20, 90, 50)),   # Crowd.
        ("person", _rect(95, 20, 105, 50)),       # Cut in two by the pole.
        ("license plate", _rect(40, 45, 50, 50)),  # Id -1: neither drawn nor occluding.
        ("caravan", _rect(110, 30, 125, 50)),     # Instances but ignored in eval.
        ("pole", _rect(98, 10, 100, 60)),         # Stuff on top of the person.
        ("car", _rect(0, 0, 5, 5), True),         # Deleted.
    ],
    ("aachen", "aachen_000001_000019"): [
        ("building", _rect(0, 0, 127, 30)),
        ("bicyclegroup", _rect(5, 35, 30, 60)),
        ("rider", [[50, 20], [70, 22], [65, 55], [48, 50]]),
        ("bicycle", _rect(45, 40, 75, 60)),
        # Zero area: the dilation leaves a 1 px strip (polygon mode); PIL draws one pixel
        # column, dropped from instanceIds (xmax == xmin).
        ("motorcycle", [[120, 10], [120, 20], [120, 15]]),
        # Two points: shapely cannot build it (skipped); PIL draws a one-pixel-high line.
        ("bicycle", [[90, 30], [100, 30]]),
    ],
    ("bremen", "bremen_000000_000019"): [
        ("road", _rect(0, 30, 127, 63)),  # No things.
    ],
}


def build_tree(root, split="val"):
  rng = np.random.default_rng(0)
  for (city, stem), objs in IMAGES.items():
    img_dir = os.path.join(root, "leftImg8bit", split, city)
    gt_dir = os.path.join(root, "gtFine", split, city)
    os.makedirs(img_dir, exist_ok=True)
    os.makedirs(gt_dir, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, (H, W, 3), dtype=np.uint8)).save(
        os.path.join(img_dir, stem + "_leftImg8bit.png"))
    objects = [dict({"label": o[0], "polygon": o[1]}, **({"deleted": 1} if len(o) > 2 else {}))
               for o in objs]
    path = os.path.join(gt_dir, stem + "_gtFine_polygons.json")
    with open(path, "w") as f:
      json.dump({"imgHeight": H, "imgWidth": W, "objects": objects}, f)
    write_gt_images(path)


@pytest.fixture()
def root(tmp_path):
  build_tree(str(tmp_path))
  (tmp_path / "leftImg8bit" / "val" / "aachen" / "notes.txt").write_text("ignored")
  return str(tmp_path)


def _detectron2_reference(json_file, image_file):
  """detectron2's _cityscapes_files_to_dict(from_json=True, to_polygons=True), transcribed
  with cityscapesScripts' labels (box mode XYXY_ABS, contiguous ids mapped as detectron2)."""
  from cityscapesscripts.helpers.labels import labels, name2label
  from shapely.geometry import MultiPolygon, Polygon

  with open(json_file) as f:
    jsonobj = json.load(f)
  ret = {"file_name": image_file, "height": jsonobj["imgHeight"], "width": jsonobj["imgWidth"]}
  polygons_union = Polygon()
  annos = []
  for obj in jsonobj["objects"][::-1]:
    if "deleted" in obj:
      continue
    label_name = obj["label"]
    try:
      label = name2label[label_name]
    except KeyError:
      label = name2label[label_name[:-len("group")]]
    if label.id < 0:
      continue
    poly_coord = np.asarray(obj["polygon"], dtype="f4") + 0.5
    try:
      poly = Polygon(poly_coord).buffer(0.5, quad_segs=4)
    except ValueError:  # detectron2 crashes here; we skip.
      continue
    if not label.hasInstances or label.ignoreInEval:
      polygons_union = polygons_union.union(poly)
      continue
    poly_wo_overlaps = poly.difference(polygons_union)
    if poly_wo_overlaps.is_empty:
      continue
    polygons_union = polygons_union.union(poly)
    poly_list = ([poly_wo_overlaps] if isinstance(poly_wo_overlaps, Polygon)
                 else poly_wo_overlaps.geoms)
    assert isinstance(poly_wo_overlaps, (Polygon, MultiPolygon))
    thing_ids = [l.id for l in labels if l.hasInstances and not l.ignoreInEval]
    annos.append({
        "iscrowd": label_name.endswith("group"),
        "category_id": thing_ids.index(label.id),
        "segmentation": [list(itertools.chain(*p.exterior.coords)) for p in poly_list],
        "bbox": poly_wo_overlaps.bounds,
    })
  ret["annotations"] = annos
  return ret


def test_files_sorted_and_errors(root, tmp_path):
  files = cs.cityscapes_files(root, "val")
  assert [cs.cityscapes_stem(f.image) for f in files] == [
      "aachen_000000_000019", "aachen_000001_000019", "bremen_000000_000019"]
  assert files[0].instance_ids.endswith("gtFine/val/aachen/aachen_000000_000019_gtFine_"
                                        "instanceIds.png")
  with pytest.raises(FileNotFoundError, match="does not exist"):
    cs.cityscapes_files(tmp_path / "nope", "val")
  with pytest.raises(FileNotFoundError, match=r"leftImg8bit/train/<city>/\*_leftImg8bit.png"):
    cs.cityscapes_files(root, "train")
  os.makedirs(os.path.join(root, "leftImg8bit", "test"))
  with pytest.raises(FileNotFoundError, match="gtFine/test"):
    cs.cityscapes_files(root, "test")
  os.makedirs(os.path.join(root, "gtFine", "test"))
  with pytest.raises(FileNotFoundError, match="no Cityscapes images"):
    cs.cityscapes_files(root, "test")


def test_rendering_matches_cityscapesscripts(root):
  # The image-making functions, not json2*Img: those save mode "I" PNGs, which Pillow >= 11
  # refuses to write.
  json2labelImg = pytest.importorskip("cityscapesscripts.preparation.json2labelImg")
  json2instanceImg = pytest.importorskip("cityscapesscripts.preparation.json2instanceImg")
  from cityscapesscripts.helpers.annotation import Annotation
  for f in cs.cityscapes_files(root, "val"):
    annotation = Annotation()
    annotation.fromJsonFile(f.polygons)
    label_ids = np.array(Image.open(f.label_ids))
    np.testing.assert_array_equal(
        label_ids, np.array(json2labelImg.createLabelImage(annotation, "ids")))
    np.testing.assert_array_equal(
        np.array(Image.open(f.instance_ids)),
        np.array(json2instanceImg.createInstanceImage(annotation, "ids")))
    # createTrainIdLabelImgs' output == labelIds through the lookup table.
    np.testing.assert_array_equal(
        cs.label_id_to_train_id(label_ids),
        np.array(json2labelImg.createLabelImage(annotation, "trainIds")))


def test_instances_from_polygons_match_detectron2(root):
  pytest.importorskip("shapely")
  pytest.importorskip("cityscapesscripts")
  records = cs.load_cityscapes_instances(root, "val")
  files = cs.cityscapes_files(root, "val")
  assert [r["image_id"] for r in records] == [0, 1, 2]
  ann_id = 0
  for record, f in zip(records, files):
    ref = _detectron2_reference(f.polygons, f.image)
    assert {k: record[k] for k in ("file_name", "height", "width")} == {
        k: ref[k] for k in ("file_name", "height", "width")}
    assert len(record["annotations"]) == len(ref["annotations"])
    for ann, exp in zip(record["annotations"], ref["annotations"]):
      ann_id += 1
      assert list(ann) == ["id", "bbox", "category_id", "iscrowd", "segmentation"]
      assert ann["id"] == ann_id
      assert ann["bbox"].dtype == np.float32
      np.testing.assert_array_equal(ann["bbox"], np.array(exp["bbox"], np.float32))
      assert (ann["category_id"], ann["iscrowd"]) == (exp["category_id"], int(exp["iscrowd"]))
      assert ann["segmentation"] == exp["segmentation"]
      assert all(type(v) is float for p in ann["segmentation"] for v in p)

  # Hand-checked: reverse order; +0.5 and 0.5 dilation turn [x0, x1] into [x0, x1 + 1].
  anns = records[0]["annotations"]
  names = [cs.THING_CLASSES[a["category_id"]] for a in anns]
  assert names == ["person", "person", "car", "car"]  # caravan, plate, deleted: not annotated.
  assert [a["iscrowd"] for a in anns] == [0, 1, 0, 0]
  np.testing.assert_array_equal(anns[0]["bbox"], [95, 20, 106, 51])
  assert len(anns[0]["segmentation"]) == 2  # The pole splits the person.
  np.testing.assert_array_equal(anns[2]["bbox"], [30, 35, 61, 56])  # Car B, whole.
  np.testing.assert_array_equal(anns[3]["bbox"], [10, 30, 41, 51])  # Car A minus B.
  masks = [coco.decode_segmentation(a["segmentation"], H, W) for a in anns]
  assert not (masks[2] & masks[3]).any()  # Overlaps resolved.
  assert masks[3][32, 20] and not masks[3][45, 45] and masks[2][45, 45]
  # Image 2: the zero-area motorcycle becomes a 1 px strip, the 2-point polygon is skipped.
  anns = records[1]["annotations"]
  assert [cs.THING_CLASSES[a["category_id"]] for a in anns] == [
      "motorcycle", "bicycle", "rider", "bicycle"]
  assert [a["iscrowd"] for a in anns] == [0, 0, 0, 1]
  np.testing.assert_array_equal(anns[0]["bbox"], [120, 10, 121, 21])
  assert records[2]["annotations"] == []


def test_instances_from_instance_ids(root):
  records = cs.load_cityscapes_instances(root, "val", from_json=False, to_polygons=False)
  files = cs.cityscapes_files(root, "val")
  expected_ids = [[24, 24000, 26000, 26001], [33, 25000, 33000], []]  # Sorted ids.
  for record, f, ids in zip(records, files, expected_ids):
    inst = np.array(Image.open(f.instance_ids))
    assert (record["height"], record["width"]) == (H, W)
    assert len(record["annotations"]) == len(ids)
    for ann, inst_id in zip(record["annotations"], ids):
      mask = inst == inst_id
      np.testing.assert_array_equal(mask_util.decode(ann["segmentation"]).astype(bool), mask)
      assert isinstance(ann["segmentation"]["counts"], str)
      ys, xs = np.nonzero(mask)
      np.testing.assert_array_equal(ann["bbox"], [xs.min(), ys.min(), xs.max(), ys.max()])
      assert ann["iscrowd"] == int(inst_id < 1000)
      label_id = inst_id // 1000 if inst_id >= 1000 else inst_id
      assert cs.THING_LABEL_IDS[ann["category_id"]] == label_id
  # The one-pixel-wide motorcycle and one-pixel-high bicycle exist in the PNG but are
  # dropped, as detectron2 does; caravan (29000) is not evaluated.
  inst = np.array(Image.open(files[1].instance_ids))
  assert (inst == 32000).any() and (inst == 33001).any()
  assert records[0]["annotations"][0]["id"] == 1 and records[1]["annotations"][-1]["id"] == 7


def test_instance_errors(root):
  with pytest.raises(ValueError, match="from_json=True, to_polygons=True"):
    cs.load_cityscapes_instances(root, "val", from_json=False, to_polygons=True)
  f = cs.cityscapes_files(root, "val")[1]
  os.remove(f.polygons)
  with pytest.raises(FileNotFoundError, match="polygons JSON not found.*aachen_000001"):
    cs.load_cityscapes_instances(root, "val")
  with open(f.polygons, "w") as fh:
    json.dump({"imgHeight": H, "imgWidth": W, "objects": [{"label": "unicorn",
                                                            "polygon": _rect(0, 0, 5, 5)}]}, fh)
  with pytest.raises(ValueError, match="unknown Cityscapes label 'unicorn'"):
    cs.load_cityscapes_instances(root, "val")


def test_semantic_records_and_train_ids(root):
  with pytest.raises(FileNotFoundError, match="write_train_id_label_maps"):
    cs.load_cityscapes_semantic(root, "val")
  assert cs.write_train_id_label_maps(root, "val") == 3
  assert cs.write_train_id_label_maps(root, "val") == 0  # Kept.
  records = cs.load_cityscapes_semantic(root, "val")
  files = cs.cityscapes_files(root, "val")
  assert records == [{"file_name": f.image, "sem_seg_file_name": f.label_train_ids,
                      "height": H, "width": W, "image_id": i} for i, f in enumerate(files)]
  train = coco.read_label_map(records[0]["sem_seg_file_name"])
  label = np.array(Image.open(files[0].label_ids))
  assert train.dtype == np.uint8
  assert set(np.unique(train).tolist()) == {0, 5, 10, 11, 13, 255}  # road pole sky person car
  np.testing.assert_array_equal(train[label == 26], 13)
  np.testing.assert_array_equal(train[np.isin(label, [0, 29])], 255)  # unlabeled, caravan


def test_label_tables():
  # Spec (checkpoint_format.md 7.3): train id -> label id.
  spec = [7, 8, 11, 12, 13, 17, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 31, 32, 33]
  assert list(cs.SEM_SEG_LABEL_IDS) == spec
  assert cs.SEM_SEG_CLASSES[:3] == ("road", "sidewalk", "building")
  assert cs.THING_CLASSES == ("person", "rider", "car", "truck", "bus", "train", "motorcycle",
                              "bicycle")
  assert cs.THING_CATEGORIES.dataset_id_to_contiguous_id[31] == 5
  label_ids = np.arange(-1, 300)
  train_ids = cs.label_id_to_train_id(label_ids)
  assert [int(train_ids[label_ids == l][0]) for l in spec] == list(range(19))
  assert (train_ids[~np.isin(label_ids, spec)] == 255).all()
  np.testing.assert_array_equal(cs.train_id_to_label_id(np.arange(19)), spec)
  np.testing.assert_array_equal(cs.TRAIN_ID_TO_LABEL_ID[19:], 255)
  with pytest.raises(ValueError, match="0..18"):
    cs.train_id_to_label_id(np.array([0, 19]))
  assert cs.cityscapes_stem("x/aachen_000001_000019_gtFine_labelIds.png") == (
      "aachen_000001_000019")
