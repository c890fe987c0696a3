"""COCO-format source: records, category mapping, masks of every kind, image decoding, errors."""

import json
import logging

import numpy as np
from PIL import Image
import pycocotools.mask as mask_util
import pytest

from pointrend_jax.data import coco

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

H, W = 6, 8


def _uncompressed_rle(mask):
  flat = mask.ravel(order="F")
  counts, current, run = [], 0, 0
  for v in flat:
    if v == current:
      run += 1
    else:
      counts.append(run)
      current, run = v, 1
  counts.append(run)
  return {"size": list(mask.shape), "counts": [int(c) for c in counts]}


def _mask(rows, cols):
  m = np.zeros((H, W), bool)
  m[rows, cols] = True
  return m


# Expected masks (rows, cols) of the valid annotations of image 1.
SQUARE = _mask(slice(1, 4), slice(1, 5))  # polygon (1,1)-(5,4): centres (1.5..4.5, 1.5..3.5)
UNCOMPRESSED = _mask(slice(0, 2), slice(5, 8))
COMPRESSED = _mask(slice(3, 6), slice(0, 3)) | _mask(slice(5, 6), slice(0, 8))
CROWD = _mask(slice(2, 5), slice(6, 8))


@pytest.fixture()
def dataset_dir(tmp_path):
  images = tmp_path / "images"
  images.mkdir()
  rgb = np.arange(H * W * 3, dtype=np.uint8).reshape(H, W, 3)
  Image.fromarray(rgb).save(images / "rgb.png")
  Image.fromarray(np.full((H, W), 77, np.uint8)).save(images / "gray.png")
  cmyk = np.zeros((H, W, 4), np.uint8)
  cmyk[..., 0] = 100  # C only: R = 255 - 100.
  cmyk[0, 0] = [0, 0, 0, 100]  # K only: every channel 255 - 100.
  Image.fromarray(cmyk, mode="CMYK").save(images / "cmyk.tif")
  g16 = np.zeros((H, W), np.uint16)
  g16[0, :4] = [257, 1000, 65535, 128]
  Image.fromarray(g16).save(images / "gray16.png")
  exif = Image.Exif()
  exif[0x0112] = 6  # Stored rotated: display = rotate 90 degrees clockwise.
  stored = np.ascontiguousarray(np.rot90(rgb, k=1))  # [W, H, 3], counter-clockwise.
  Image.fromarray(stored).save(images / "exif.png", exif=exif)
  (images / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")

  compressed = mask_util.encode(np.asfortranarray(COMPRESSED.astype(np.uint8)))
  anns = [
      {"id": 11, "image_id": 1, "category_id": 10, "bbox": [1, 1, 4, 3], "iscrowd": 0,
       "area": 12.0, "segmentation": [[1, 1, 5, 1, 5, 4, 1, 4], [0, 0, 1, 1]]},
      {"id": 12, "image_id": 1, "category_id": 4, "bbox": [5, 0, 3, 2], "iscrowd": 0,
       "segmentation": _uncompressed_rle(UNCOMPRESSED)},
      {"id": 13, "image_id": 1, "category_id": 10, "bbox": [0, 3, 8, 3], "iscrowd": 0,
       "segmentation": {"size": [H, W], "counts": compressed["counts"].decode()}},
      {"id": 14, "image_id": 1, "category_id": 4, "bbox": [6, 2, 2, 3], "iscrowd": 1,
       "segmentation": _uncompressed_rle(CROWD)},
      {"id": 15, "image_id": 1, "category_id": 4, "bbox": [2, 2, 0, 3], "iscrowd": 0,
       "segmentation": [[2, 2, 3, 2, 3, 3]]},  # Degenerate box.
      {"id": 16, "image_id": 1, "category_id": 4, "bbox": [2, 2, 1, 1], "iscrowd": 0,
       "segmentation": [[2, 2, 3, 3]]},  # A 2-point polygon.
      {"id": 21, "image_id": 2, "category_id": 4, "bbox": [0, 0, 2, 2], "iscrowd": 1,
       "segmentation": _uncompressed_rle(_mask(slice(0, 2), slice(0, 2)))},
  ]
  images_json = [
      {"id": 1, "file_name": "rgb.png", "height": H, "width": W},
      {"id": 2, "file_name": "gray.png", "height": H, "width": W},
      {"id": 5, "file_name": "gray16.png", "height": H, "width": W},
      {"id": 3, "file_name": "cmyk.tif", "height": H, "width": W},
      {"id": 4, "file_name": "exif.png", "height": H, "width": W},
  ]
  gt = {"images": images_json, "annotations": anns,
        "categories": [{"id": 10, "name": "ten"}, {"id": 4, "name": "four"}]}
  path = tmp_path / "instances.json"
  path.write_text(json.dumps(gt))
  return tmp_path, gt, rgb


def test_records_categories_and_skips(dataset_dir, caplog):
  root, _, _ = dataset_dir
  with caplog.at_level(logging.WARNING):
    ds = coco.load_coco_dataset(root / "instances.json", root / "images")
  assert ds.categories.ids == (4, 10) and ds.categories.names == ("four", "ten")
  assert ds.categories.dataset_id_to_contiguous_id == {4: 0, 10: 1}
  assert ds.skipped == {coco.SKIP_DEGENERATE_BOX: [15], coco.SKIP_INVALID_POLYGON: [16]}
  assert "15" in caplog.text and "16" in caplog.text
  assert [r["image_id"] for r in ds.records] == [1, 2, 3, 4, 5]
  r1 = ds.records[0]
  assert r1["file_name"] == str(root / "images" / "rgb.png")
  assert (r1["height"], r1["width"]) == (H, W)
  assert [a["id"] for a in r1["annotations"]] == [11, 12, 13, 14]
  assert [a["category_id"] for a in r1["annotations"]] == [1, 0, 1, 0]
  assert [a["iscrowd"] for a in r1["annotations"]] == [0, 0, 0, 1]
  box = r1["annotations"][0]["bbox"]
  assert box.dtype == np.float32 and box.tolist() == [1, 1, 5, 4]
  # The 4-coordinate polygon of annotation 11 is dropped, the valid one kept.
  assert r1["annotations"][0]["segmentation"] == [[1, 1, 5, 1, 5, 4, 1, 4]]
  # Uncompressed RLE is compressed at load; every RLE has str counts.
  assert all(isinstance(a["segmentation"]["counts"], str) for a in r1["annotations"][1:])


def test_masks_of_every_kind(dataset_dir):
  root, gt, _ = dataset_dir
  r1 = coco.load_coco_dataset(root / "instances.json", root / "images").records[0]
  masks = [coco.decode_segmentation(a["segmentation"], H, W) for a in r1["annotations"]]
  assert all(m.dtype == bool for m in masks)
  for got, want in zip(masks, [SQUARE, UNCOMPRESSED, COMPRESSED, CROWD], strict=True):
    np.testing.assert_array_equal(got, want)
  # The raw JSON forms decode identically (uncompressed RLE, polygons).
  raw = {a["id"]: a["segmentation"] for a in gt["annotations"]}
  np.testing.assert_array_equal(coco.decode_segmentation(raw[12], H, W), UNCOMPRESSED)
  np.testing.assert_array_equal(coco.decode_segmentation(raw[14], H, W), CROWD)
  with pytest.raises(ValueError, match="RLE size"):
    coco.decode_segmentation({"size": [H + 1, W], "counts": "0"}, H, W)


def test_image_modes(dataset_dir):
  root, _, rgb = dataset_dir
  images = root / "images"
  np.testing.assert_array_equal(coco.read_image(images / "rgb.png"), rgb)
  gray = coco.read_image(images / "gray.png")
  assert gray.shape == (H, W, 3) and (gray == 77).all()
  cmyk = coco.read_image(images / "cmyk.tif")
  assert cmyk.dtype == np.uint8 and cmyk.shape == (H, W, 3)
  assert cmyk[0, 0].tolist() == [155, 155, 155] and cmyk[1, 1].tolist() == [155, 255, 255]
  g16 = coco.read_image(images / "gray16.png")
  assert g16[0, :5, 0].tolist() == [1, 4, 255, 0, 0]  # round(v / 257)
  assert (g16[..., 0] == g16[..., 2]).all()
  exif = coco.read_image(images / "exif.png")
  np.testing.assert_array_equal(exif, rgb)  # Orientation 6 undone.
  records = coco.load_coco_dataset(root / "instances.json", images).records
  assert all(coco.load_image(r).shape == (H, W, 3) for r in records)


def test_label_map(tmp_path):
  labels = np.array([[0, 1, 255], [2, 2, 0]], np.uint8)
  Image.fromarray(labels).save(tmp_path / "l.png")
  np.testing.assert_array_equal(coco.read_label_map(tmp_path / "l.png"), labels)
  Image.fromarray(np.zeros((2, 3, 3), np.uint8)).save(tmp_path / "rgb.png")
  with pytest.raises(ValueError, match="single-channel"):
    coco.read_label_map(tmp_path / "rgb.png")


def test_bad_images_name_the_file(dataset_dir):
  root, gt, _ = dataset_dir
  with pytest.raises(ValueError, match="broken.png"):
    coco.read_image(root / "images" / "broken.png")
  with pytest.raises(FileNotFoundError, match="nope.png"):
    coco.read_image(root / "images" / "nope.png")
  gt["images"].append({"id": 9, "file_name": "missing.png", "height": H, "width": W})
  with pytest.raises(FileNotFoundError, match="missing.png"):
    coco.load_coco_dataset(gt, root / "images")
  records = coco.load_coco_dataset(gt, root / "images", check_files=False).records
  with pytest.raises(FileNotFoundError, match="missing.png"):
    coco.load_image(records[-1])
  gt["images"][-1] = {"id": 9, "file_name": "rgb.png", "height": H + 1, "width": W}
  records = coco.load_coco_dataset(gt, root / "images").records
  with pytest.raises(ValueError, match="rgb.png.*size"):
    coco.load_image(records[-1])


def test_bad_annotations_raise_with_the_annotation_id(dataset_dir):
  root, gt, _ = dataset_dir
  unknown = dict(gt, annotations=gt["annotations"] + [
      {"id": 99, "image_id": 1, "category_id": 7, "bbox": [0, 0, 1, 1], "iscrowd": 0}])
  path = root / "unknown_category.json"
  path.write_text(json.dumps(unknown))
  with pytest.raises(ValueError, match="annotation id 99.*category id 7"):
    coco.load_coco_dataset(path, root / "images")
  orphan = dict(gt, annotations=[{"id": 98, "image_id": 42, "category_id": 4,
                                  "bbox": [0, 0, 1, 1]}])
  with pytest.raises(ValueError, match="annotation id 98.*image id 42"):
    coco.load_coco_dataset(orphan, root / "images")
  bad_rle = dict(gt, annotations=[{"id": 97, "image_id": 1, "category_id": 4, "bbox": [0, 0, 1, 1],
                                   "segmentation": {"size": [2, 2], "counts": [4]}}])
  with pytest.raises(ValueError, match="annotation id 97"):
    coco.load_coco_dataset(bad_rle, root / "images")
  no_box = dict(gt, annotations=[{"id": 96, "image_id": 1, "category_id": 4}])
  with pytest.raises(ValueError, match="annotation id 96"):
    coco.load_coco_dataset(no_box, root / "images")
  with pytest.raises(FileNotFoundError, match="absent.json"):
    coco.load_coco_dataset(root / "absent.json", root / "images")
