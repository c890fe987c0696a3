"""Our array_record TFDS datasets: built from tiny sources, read back without TensorFlow."""

import importlib.util
import json
import os
import sys

import grain
import numpy as np
from PIL import Image
import pycocotools.mask as mask_util
import pytest
import tensorflow_datasets as tfds

from pointrend_jax.data import cityscapes as cs
from pointrend_jax.data import coco
from pointrend_jax.data import synthetic
from pointrend_jax.data import tfds_builders as tb
from cityscapes_gt import write_gt_images

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

H, W = 40, 80


def _rect(x0, y0, x1, y1):
  return [[x0, y0], [x1, y0], [x1, y1], [x0, y1]]


def _cityscapes_tree(root):
  """Two cities, three images: overlapping cars, a crowd, a person split by a pole."""
  images = {
      ("aachen", "aachen_000000_000019"): [
          ("road", _rect(0, 20, 79, 39)), ("car", _rect(5, 15, 30, 30)),
          ("car", _rect(20, 18, 45, 35)), ("persongroup", _rect(50, 5, 60, 30)),
          ("person", _rect(65, 5, 75, 30)), ("pole", _rect(69, 0, 70, 39))],
      ("aachen", "aachen_000001_000019"): [("sky", _rect(0, 0, 79, 10))],
      ("bochum", "bochum_000000_000019"): [
          ("building", _rect(0, 0, 79, 20)), ("bicycle", _rect(10, 10, 40, 30))],
  }
  rng = np.random.default_rng(0)
  for (city, stem), objs in images.items():
    for sub in ("leftImg8bit", "gtFine"):
      os.makedirs(os.path.join(root, sub, "val", city), exist_ok=True)
    Image.fromarray(rng.integers(0, 256, (H, W, 3), dtype=np.uint8)).save(
        os.path.join(root, "leftImg8bit", "val", city, stem + "_leftImg8bit.png"))
    path = os.path.join(root, "gtFine", "val", city, stem + "_gtFine_polygons.json")
    with open(path, "w") as f:
      json.dump({"imgHeight": H, "imgWidth": W,
                 "objects": [{"label": l, "polygon": p} for l, p in objs]}, f)
    write_gt_images(path)


def _extra_coco(root):
  """A JPEG with EXIF rotation, an annotation without segmentation or area, an empty image."""
  images = root / "images"
  images.mkdir()
  rgb = np.random.default_rng(1).integers(0, 256, (12, 20, 3), dtype=np.uint8)
  exif = Image.Exif()
  exif[0x0112] = 6
  Image.fromarray(rgb).save(images / "a.jpg", exif=exif, quality=90)
  Image.fromarray(rgb[:5, :6]).save(images / "b.png")
  rle = mask_util.encode(np.asfortranarray(np.eye(20, 12, dtype=np.uint8)))
  coco_json = {
      "categories": [{"id": 9, "name": "nine"}, {"id": 3, "name": "three"}],
      "images": [{"id": 7, "file_name": "a.jpg", "height": 20, "width": 12},
                 {"id": 2, "file_name": "b.png", "height": 5, "width": 6}],
      "annotations": [
          {"id": 1, "image_id": 7, "category_id": 9, "bbox": [1.25, 2, 3, 4.5], "iscrowd": 0},
          {"id": 2, "image_id": 7, "category_id": 3, "bbox": [0, 0, 12, 20], "iscrowd": 1,
           "area": 12.0, "segmentation": {"size": [20, 12], "counts": rle["counts"].decode()}},
          {"id": 3, "image_id": 7, "category_id": 3, "bbox": [1, 1, 5, 5], "area": 1 / 3,
           "segmentation": [[1.1, 1.2, 5.3, 1.4, 5.5, 5.6], [0.1, 0.2, 0.3, 0.4, 0.5, 0.6]]},
      ],
  }
  ann = root / "instances.json"
  ann.write_text(json.dumps(coco_json))
  return str(ann), str(images)


def _assert_same_records(from_tfds, direct):
  assert len(from_tfds) == len(direct)
  for rec, exp in zip(from_tfds, direct):
    rec = dict(rec)
    image_bytes = rec.pop("image_bytes")
    sem_bytes = rec.pop("sem_seg_bytes", None)
    assert rec.keys() == exp.keys()
    for key, value in exp.items():
      if key != "annotations":
        assert rec[key] == value and type(rec[key]) is type(value), key
    for ann, exp_ann in zip(rec.get("annotations", ()), exp.get("annotations", ())):
      assert list(ann) == list(exp_ann)
      for key, value in exp_ann.items():
        if key == "bbox":
          assert ann[key].dtype == value.dtype and ann[key].tolist() == value.tolist()
        else:
          assert ann[key] == value and type(ann[key]) is type(value), key
    assert len(rec.get("annotations", ())) == len(exp.get("annotations", ()))
    # Decoded images / label maps equal the files' (EXIF orientation included).
    np.testing.assert_array_equal(coco.load_image(dict(rec, image_bytes=image_bytes)),
                                  coco.load_image(exp))
    if sem_bytes is not None:
      np.testing.assert_array_equal(coco.load_label_map(dict(rec, sem_seg_bytes=sem_bytes)),
                                    coco.read_label_map(exp["sem_seg_file_name"]))


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("tfds_sources")
  shapes = synthetic.ensure_synthetic_dataset(
      tmp / "synthetic", num_train=4, num_val=2, image_size=(40, 56),
      config=synthetic.SyntheticConfig(polygon_fraction=0.8, crowd_probability=1.0,
                                       min_visible_area=8))
  extra = tmp / "extra"
  extra.mkdir()
  root = str(tmp / "cityscapes")
  _cityscapes_tree(root)
  cs.write_train_id_label_maps(root, "val")
  return {"shapes": shapes, "extra": _extra_coco(extra), "cityscapes": root,
          "data_dir": str(tmp / "tfds")}


def test_coco_instances_round_trip(sources):
  shapes = sources["shapes"]
  split_sources = {s: (str(shapes.splits[s].annotations), str(shapes.splits[s].images_dir))
                   for s in ("train", "val")}
  builder = tb.prepare_tfds("coco_instances", split_sources, sources["data_dir"], name="shapes")
  assert builder.info.splits["train"].num_examples == 4
  names, ids = tb.class_metadata(builder)
  assert (names, ids) == (list(synthetic.THING_CLASSES), [2, 3, 7, 11, 13])
  tb.prepare_tfds("coco_instances", {"val": sources["extra"]}, sources["data_dir"],
                  name="extra")
  kinds = set()
  for name, split, (ann, images) in [("shapes", s, v) for s, v in split_sources.items()] + [
      ("extra", "val", sources["extra"])]:
    direct = coco.load_coco_dataset(ann, images).records
    records = list(tb.TfdsRecords(sources["data_dir"], "coco_instances", split, name=name))
    _assert_same_records(records, direct)
    kinds |= {type(a.get("segmentation")).__name__ for r in direct for a in r["annotations"]}
  assert kinds == {"dict", "list", "NoneType"}  # RLE, polygons and none were exercised.
  # Same through tfds.data_source by name, and through a grain MapDataset.
  source = tfds.data_source("pointrend_instances/extra", split="val",
                            data_dir=sources["data_dir"])
  rec = tb.example_to_record(source[0], "coco_instances")
  assert rec["image_id"] == 2 and rec["annotations"] == []
  ds = grain.MapDataset.source(tb.TfdsRecords(sources["data_dir"], "coco_instances", "val",
                                              name="extra"))
  assert ds[1]["annotations"][2]["area"] == 1 / 3
  assert ds[1]["annotations"][2]["segmentation"][0] == [1.1, 1.2, 5.3, 1.4, 5.5, 5.6]
  # Splits with different categories cannot share contiguous ids.
  with pytest.raises(Exception, match="contiguous ids would differ"):
    tb.prepare_tfds("coco_instances", dict(split_sources, extra=sources["extra"]),
                    sources["data_dir"], name="mixed")


def test_cityscapes_round_trips(sources):
  root, data_dir = sources["cityscapes"], sources["data_dir"]
  tb.prepare_tfds("cityscapes_instances", {"val": root}, data_dir, name="tiny")
  direct = cs.load_cityscapes_instances(root, "val")
  assert sum(len(r["annotations"]) for r in direct) == 5
  _assert_same_records(list(tb.TfdsRecords(data_dir, "cityscapes_instances", "val",
                                            name="tiny")), direct)
  builder = tb.prepare_tfds("cityscapes_semantic", {"val": root}, data_dir, name="tiny")
  # A dataset read back from its folder alone (no builder class) keeps the class metadata.
  folder = tfds.builder_from_directory(os.path.join(data_dir, "pointrend_cityscapes_semantic",
                                                    "tiny", "1.0.0"))
  assert tb.class_metadata(folder) == tb.class_metadata(builder) == (
      list(cs.SEM_SEG_CLASSES), list(cs.SEM_SEG_LABEL_IDS))
  records = tb.TfdsRecords(data_dir, "cityscapes_semantic", "val", name="tiny")
  assert len(records) == 3
  _assert_same_records(list(records), cs.load_cityscapes_semantic(root, "val"))


def test_reuse_overwrite_and_errors(sources, tmp_path):
  root = sources["cityscapes"]
  data_dir = str(tmp_path / "tfds")
  tb.prepare_tfds("cityscapes_semantic", {"val": root}, data_dir)
  shard = os.path.join(data_dir, "pointrend_cityscapes_semantic", "default", "1.0.0",
                       "pointrend_cityscapes_semantic-val.array_record-00000-of-00001")
  mtime = os.stat(shard).st_mtime_ns
  tb.prepare_tfds("cityscapes_semantic", {"val": root}, data_dir)  # Reused.
  assert os.stat(shard).st_mtime_ns == mtime
  tb.prepare_tfds("cityscapes_semantic", {"val": root}, data_dir, overwrite=True)
  assert os.stat(shard).st_mtime_ns != mtime
  with pytest.raises(ValueError, match="unknown kind"):
    tb.prepare_tfds("voc", {"val": root}, data_dir)
  with pytest.raises(FileNotFoundError, match="gtFine/train"):
    os.makedirs(os.path.join(root, "leftImg8bit", "train"), exist_ok=True)
    tb.prepare_tfds("cityscapes_semantic", {"train": root}, data_dir)
  with pytest.raises(FileNotFoundError, match="annotations file not found"):
    tb.prepare_tfds("coco_instances", {"val": (str(tmp_path / "x.json"), str(tmp_path))},
                    data_dir)


def test_no_tensorflow(sources):
  # Everything above ran without TensorFlow: not installed, and nothing imported a stand-in.
  assert importlib.util.find_spec("tensorflow") is None
  assert not any(m == "tensorflow" or m.startswith("tensorflow.") for m in sys.modules)


def _batches(loader, n):
  out = []
  for _ in range(n):
    out.append({k: np.asarray(v) for k, v in next(loader).items()})
  return out


def test_tfds_records_feed_the_pipeline_like_the_files(sources):
  """Batches built from TFDS records (images decoded from the stored bytes) equal those built
  from the COCO files: same boxes, classes, masks after resize and flip, same images."""
  from pointrend_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  shapes = sources["shapes"]
  split = shapes.splits["train"]
  tb.prepare_tfds("coco_instances", {"train": (str(split.annotations), str(split.images_dir))},
                  sources["data_dir"], name="feed")
  direct = coco.load_coco_dataset(str(split.annotations), str(split.images_dir)).records
  from_tfds = list(tb.TfdsRecords(sources["data_dir"], "coco_instances", "train", name="feed"))
  # The stored bytes, not the files, must be what is decoded.
  from_tfds = [dict(r, file_name="/nonexistent/" + os.path.basename(r["file_name"]))
               for r in from_tfds]
  cfg = pipeline.LoaderConfig(min_size_train=(48, 64), max_size_train=96, min_size_test=64,
                             max_size_test=96, max_instances=12)
  a = _batches(pipeline.build_train_loader(direct, batch_size_per_process=2, seed=3,
                                           config=cfg, read_threads=0), 3)
  b = _batches(pipeline.build_train_loader(from_tfds, batch_size_per_process=2, seed=3,
                                           config=cfg, read_threads=0), 3)
  for batch_a, batch_b in zip(a, b):
    assert batch_a.keys() == batch_b.keys()
    for key in batch_a:
      np.testing.assert_array_equal(batch_a[key], batch_b[key], err_msg=key)
  assert any(batch["gt_valid"].any() for batch in a)
