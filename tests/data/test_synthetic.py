"""The synthetic shapes dataset: determinism, caching and exact masks."""

import json
import math
import os
import pathlib

import numpy as np
import pycocotools.mask as mask_util
import pytest

from pointrend_jax.data import coco, synthetic

# pycocotools' decode trips a numpy 2 DeprecationWarning (its issue, harmless).
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

_NUM_TRAIN, _NUM_VAL = 24, 6


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
  return synthetic.ensure_synthetic_dataset(tmp_path_factory.mktemp("cache"), _NUM_TRAIN,
                                            _NUM_VAL, seed=3)


@pytest.fixture(scope="module")
def train_json(dataset):
  with open(dataset.splits["train"].annotations) as f:
    return json.load(f)


def _files(root: pathlib.Path) -> dict[str, bytes]:
  return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_gives_identical_bytes(tmp_path):
  a = synthetic.ensure_synthetic_dataset(tmp_path / "a", 4, 2, image_size=(64, 96), seed=7)
  b = synthetic.ensure_synthetic_dataset(tmp_path / "b", 4, 2, image_size=(64, 96), seed=7)
  assert a.root.name == b.root.name
  files_a, files_b = _files(a.root), _files(b.root)
  assert len(files_a) == 1 + 2 + (4 + 2) * 2  # manifest, 2 JSONs, images + labels.
  assert files_a == files_b


def test_other_seed_differs_and_images_do_not_depend_on_counts(tmp_path):
  a = synthetic.ensure_synthetic_dataset(tmp_path, 2, 1, image_size=(64, 96), seed=7)
  b = synthetic.ensure_synthetic_dataset(tmp_path, 2, 1, image_size=(64, 96), seed=8)
  c = synthetic.ensure_synthetic_dataset(tmp_path, 3, 1, image_size=(64, 96), seed=7)
  assert len({a.root, b.root, c.root}) == 3
  name = "images/train/000001.png"
  assert (a.root / name).read_bytes() != (b.root / name).read_bytes()
  assert (a.root / name).read_bytes() == (c.root / name).read_bytes()


def test_cache_is_reused_and_atomic(tmp_path):
  a = synthetic.ensure_synthetic_dataset(tmp_path, 2, 1, image_size=(64, 96))
  manifest = a.root / "manifest.json"
  stamp = manifest.stat().st_mtime_ns
  (a.root / "marker").write_text("kept")  # Would vanish if the directory were rebuilt.
  again = synthetic.ensure_synthetic_dataset(tmp_path, 2, 1, image_size=(64, 96))
  assert again.root == a.root and manifest.stat().st_mtime_ns == stamp
  assert (a.root / "marker").exists()
  # An incomplete directory (no manifest) is rebuilt; no temporary directory is left behind.
  manifest.unlink()
  rebuilt = synthetic.ensure_synthetic_dataset(tmp_path, 2, 1, image_size=(64, 96))
  assert (rebuilt.root / "manifest.json").exists() and not (rebuilt.root / "marker").exists()
  assert sorted(p.name for p in tmp_path.iterdir()) == [a.root.name]


def test_categories_are_non_contiguous_and_unsorted(train_json):
  ids = [c["id"] for c in train_json["categories"]]
  assert ids != sorted(ids)
  assert sorted(ids) != list(range(1, len(ids) + 1))
  cats = coco.CocoCategories.from_coco(train_json)
  assert cats.names == synthetic.THING_CLASSES


def _inside(shape, x, y):
  """Independent re-statement of the analytic shapes (pixel centres x, y)."""
  if shape["kind"] == "crowd":
    return np.logical_or.reduce([_inside(p, x, y) for p in shape["parts"]])
  dx, dy = x - shape["cx"], y - shape["cy"]
  t = shape["theta"]
  u = dx * math.cos(t) + dy * math.sin(t)
  v = -dx * math.sin(t) + dy * math.cos(t)
  kind = shape["kind"]
  if kind == "ellipse":
    return (u / shape["a"])**2 + (v / shape["b"])**2 < 1
  if kind == "ring":
    s = (u / shape["a"])**2 + (v / shape["b"])**2
    return (s < 1) & (s > shape["q"]**2)
  if kind == "flower":
    return np.sqrt(u * u + v * v) < shape["r0"] * (
        1 + shape["amp"] * np.cos(shape["k"] * np.arctan2(v, u)))
  if kind == "rounded_square":
    return np.abs(u / shape["a"])**shape["n"] + np.abs(v / shape["b"])**shape["n"] < 1
  if kind == "crescent":
    return (u * u + v * v < shape["r"]**2) & ((u - shape["d"])**2 + v * v >= shape["r2"]**2)
  raise AssertionError(kind)


def _full_mask(shape, h, w):
  if "polygon" in shape:
    rle = mask_util.merge(mask_util.frPyObjects([shape["polygon"]], h, w))
    return mask_util.decode(rle).astype(bool)
  y, x = np.mgrid[0:h, 0:w] + 0.5
  return _inside(shape, x, y)


def test_masks_and_semantic_map_are_exact(dataset, train_json):
  split = dataset.splits["train"]
  anns = {a["id"]: a for a in train_json["annotations"]}
  kinds_seen, n_checked = set(), 0
  for img in train_json["images"]:
    h, w = img["height"], img["width"]
    shapes = img["shapes"]
    full = [_full_mask(s, h, w) for s in shapes]
    expected_sem = np.zeros((h, w), np.uint8)
    for k, shape in enumerate(shapes):
      later = np.logical_or.reduce(full[k + 1:]) if k + 1 < len(full) else np.zeros((h, w), bool)
      visible = full[k] & ~later
      cls = synthetic.THING_CLASSES.index(shape.get("class", shape["kind"]))
      expected_sem[visible] = cls + 1
      if shape["annotation_id"] is None:
        assert visible.sum() < synthetic.SyntheticConfig().min_visible_area
        continue
      ann = anns[shape["annotation_id"]]
      decoded = coco.decode_segmentation(ann["segmentation"], h, w)
      np.testing.assert_array_equal(decoded, visible, err_msg=f"annotation {ann['id']}")
      assert ann["area"] == visible.sum()
      ys, xs = np.nonzero(visible)
      assert ann["bbox"] == [xs.min(), ys.min(), xs.max() + 1 - xs.min(), ys.max() + 1 - ys.min()]
      assert ann["category_id"] == synthetic.CATEGORIES[cls]["id"]
      kinds_seen.add(shape["kind"])
      n_checked += 1
    sem = coco.read_label_map(split.sem_seg_dir / img["sem_seg_file_name"])
    np.testing.assert_array_equal(sem, expected_sem)
    image = coco.read_image(split.images_dir / img["file_name"])
    assert image.shape == (h, w, 3)
  assert kinds_seen == set(synthetic.THING_CLASSES) | {"crowd"}
  assert n_checked > 50


def test_annotation_kinds_overlaps_and_sizes(train_json):
  anns = train_json["annotations"]
  kinds = {(type(a["segmentation"]).__name__,
            type(a["segmentation"].get("counts")).__name__ if isinstance(a["segmentation"], dict)
            else None, a["iscrowd"]) for a in anns}
  assert ("dict", "str", 0) in kinds  # compressed RLE
  assert ("list", None, 0) in kinds  # polygons
  assert ("dict", "list", 1) in kinds  # crowd, uncompressed RLE
  by_id = {a["id"]: a for a in anns}
  occluded = [s for img in train_json["images"] for s in img["shapes"]
              if s["annotation_id"] is not None
              and by_id[s["annotation_id"]]["area"] < s["area_full"]]
  assert len(occluded) > 10
  for a in anns:
    if isinstance(a["segmentation"], dict) and isinstance(a["segmentation"]["counts"], str):
      rle = a["segmentation"]
      assert mask_util.area(rle) == a["area"]
      assert mask_util.toBbox(rle).tolist() == a["bbox"]
  lo, hi = synthetic.SyntheticConfig().image_size
  sizes = np.array([(i["height"], i["width"]) for i in train_json["images"]])
  assert sizes.min() >= lo and sizes.max() <= hi and len(np.unique(sizes[:, 0])) > 1


def test_records_loader(dataset):
  records = synthetic.load_synthetic_records(dataset, "val")
  assert len(records) == _NUM_VAL
  for r in records:
    assert os.path.exists(r["sem_seg_file_name"])
    assert coco.load_image(r).shape == (r["height"], r["width"], 3)
    for a in r["annotations"]:
      assert coco.decode_segmentation(a["segmentation"], r["height"], r["width"]).any()
    assert all(0 <= a["category_id"] < len(synthetic.THING_CLASSES) for a in r["annotations"])
