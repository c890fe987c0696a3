"""Transforms: resize size rule, exact boxes/masks after resize + flip, crop, colour aug."""

import numpy as np
from PIL import Image
import pycocotools.mask as mask_util
import pytest

from pointrend_jax.data import pipeline
from pointrend_jax.data import transforms as T

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")


@pytest.mark.parametrize("hw, short, max_size, expected", [
    ((480, 640), 800, 1333, (800, 1067)),  # spec §2.2 example (640x480 w x h).
    ((640, 480), 800, 1333, (1067, 800)),
    ((427, 640), 800, 1333, (800, 1199)),
    ((320, 640), 800, 1333, (667, 1333)),  # Long side capped: 666.5 -> int(667.0).
    ((500, 500), 800, 1333, (800, 800)),
    ((1024, 2048), 1024, 2048, (1024, 2048)),
    ((1024, 2048), 512, 4096, (512, 1024)),
    ((1024, 2048), 2048, 4096, (2048, 4096)),
])
def test_resize_shortest_edge_size(hw, short, max_size, expected):
  assert T.resize_shortest_edge_size(*hw, short, max_size) == expected


def test_resize_image_is_pil_bilinear_and_identity_copies():
  rng = np.random.default_rng(0)
  img = rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)
  out = T.resize_image(img, (45, 60))
  np.testing.assert_array_equal(out, np.asarray(Image.fromarray(img).resize((60, 45),
                                                                            Image.BILINEAR)))
  same = T.resize_image(img, (30, 40))
  np.testing.assert_array_equal(same, img)


def _rect(h, w, rows, cols):
  m = np.zeros((h, w), bool)
  m[rows, cols] = True
  return m


def test_boxes_and_masks_after_resize_and_flip_exact():
  h, w = 40, 60
  mask = _rect(h, w, slice(10, 20), slice(10, 30))
  box = np.array([[10, 10, 30, 20]], np.float32)  # Tight box of the mask.
  nh, nw = T.resize_shortest_edge_size(h, w, 80, 1000)
  assert (nh, nw) == (80, 120)
  rmask = T.resize_label_map(mask.astype(np.uint8), (nh, nw)) != 0
  rbox = T.scale_boxes(box, nw / w, nh / h)
  np.testing.assert_array_equal(rmask, _rect(nh, nw, slice(20, 40), slice(20, 60)))
  np.testing.assert_array_equal(rbox, [[20, 20, 60, 40]])
  fmask = T.hflip_image(rmask)
  fbox = T.hflip_boxes(rbox, nw)
  np.testing.assert_array_equal(fmask, _rect(nh, nw, slice(20, 40), slice(60, 100)))
  np.testing.assert_array_equal(fbox, [[60, 20, 100, 40]])
  # The box stays the tight box of the mask's pixels [x0, x1) x [y0, y1).
  ys, xs = np.nonzero(fmask)
  np.testing.assert_array_equal(fbox[0], [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
  polygon = T.transform_polygons([[30.0, 10.0, 50.0, 20.0]], nw / w, nh / h, nw)[0]
  np.testing.assert_array_equal(polygon, [60.0, 20.0, 20.0, 40.0])
  np.testing.assert_array_equal(T.clip_boxes([[-3, -1, 130, 50]], (nh, nw)), [[0, 0, 120, 50]])
  np.testing.assert_array_equal(T.nonempty_boxes([[0, 0, 1, 1], [0, 0, 1e-6, 1]]),
                                [True, False])


def _write_record(tmp_path, flipless_image):
  h, w = flipless_image.shape[:2]
  path = tmp_path / "img.png"
  Image.fromarray(flipless_image).save(path)
  rect = _rect(h, w, slice(10, 20), slice(10, 30))
  rle = mask_util.encode(np.asfortranarray(rect.astype(np.uint8)))
  rle["counts"] = rle["counts"].decode()
  return {
      "file_name": str(path), "height": h, "width": w, "image_id": 7,
      "annotations": [
          {"id": 1, "bbox": np.array([10, 10, 30, 20], np.float32), "category_id": 2,
           "iscrowd": 0, "segmentation": [[10.0, 10.0, 30.0, 10.0, 30.0, 20.0, 10.0, 20.0]]},
          {"id": 2, "bbox": np.array([10, 10, 30, 20], np.float32), "category_id": 4,
           "iscrowd": 0, "segmentation": rle},
          {"id": 3, "bbox": np.array([0, 0, 5, 5], np.float32), "category_id": 1,
           "iscrowd": 1, "segmentation": rle},
      ],
  }


def test_map_example_resize_flip_polygon_and_rle_exact(tmp_path):
  rng = np.random.default_rng(0)
  image = rng.integers(0, 256, (40, 60, 3), dtype=np.uint8)
  record = _write_record(tmp_path, image)
  cfg = pipeline.LoaderConfig(min_size_train=(80,), max_size_train=1000)
  seen = {}
  for seed in range(20):
    ex = pipeline.map_example(record, np.random.default_rng(seed), cfg, training=True)
    flipped = bool(ex["gt_boxes"][0, 0] == 60)
    seen.setdefault(flipped, ex)
    if len(seen) == 2:
      break
  assert set(seen) == {False, True}
  plain, flip = seen[False], seen[True]
  for ex, cols, box in ((plain, slice(20, 60), [20, 20, 60, 40]),
                        (flip, slice(60, 100), [60, 20, 100, 40])):
    assert ex["image_size"] == (80, 120) and ex["orig_size"] == (40, 60)
    np.testing.assert_array_equal(ex["gt_classes"], [2, 4])  # Crowd dropped.
    np.testing.assert_array_equal(ex["gt_boxes"], [box, box])
    assert ex["gt_boxes"].dtype == np.float32
    expected = _rect(80, 120, slice(20, 40), cols)
    np.testing.assert_array_equal(ex["gt_masks"][0], expected)  # Polygon, rasterised.
    np.testing.assert_array_equal(ex["gt_masks"][1], expected)  # RLE, resized NEAREST.
  np.testing.assert_array_equal(flip["image"], plain["image"][:, ::-1])
  np.testing.assert_array_equal(plain["image"], T.resize_image(image, (80, 120)))
  test_ex = pipeline.map_example(record, np.random.default_rng(0), cfg, training=False)
  assert test_ex["image_size"] == T.resize_shortest_edge_size(40, 60, 800, 1333)


def _expected_window(sem, crop, seed, ratio, ignore):
  """Replays the constraint's draws with a generator in the same state."""
  rng = np.random.default_rng(seed)
  h, w = sem.shape
  ch, cw = min(crop[0], h), min(crop[1], w)
  for _ in range(10):
    y0, x0 = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
    labels, counts = np.unique(sem[y0:y0 + ch, x0:x0 + cw], return_counts=True)
    counts = counts[labels != ignore]
    if len(counts) > 1 and counts.max() < counts.sum() * ratio:
      return (y0, x0, ch, cw), True
  return (y0, x0, ch, cw), False


def test_random_crop_category_area_constraint():
  sem = np.zeros((60, 80), np.uint8)
  sem[40:60, 50:80] = 1
  sem[0:10, :] = 255
  accepted = 0
  for seed in range(40):
    window = T.random_crop_category_area(sem, (20, 30), np.random.default_rng(seed), 0.75, 255)
    expected, ok = _expected_window(sem, (20, 30), seed, 0.75, 255)
    assert window == expected
    if ok:
      accepted += 1
      y0, x0, ch, cw = window
      crop = sem[y0:y0 + ch, x0:x0 + cw]
      counts = np.bincount(crop[crop != 255].ravel())
      counts = counts[counts > 0]
      assert len(counts) > 1 and counts.max() < 0.75 * counts.sum()
  assert 0 < accepted < 40  # Both outcomes occur: some runs exhaust the 10 tries.
  # Crop larger than the map: clipped to it. Ratio 1.0: a single plain draw.
  assert T.random_crop_category_area(sem, (100, 100), np.random.default_rng(0))[2:] == (60, 80)
  rng = np.random.default_rng(5)
  window = T.random_crop_category_area(sem, (20, 30), rng, 1.0)
  ref = np.random.default_rng(5)
  assert window == (int(ref.integers(0, 41)), int(ref.integers(0, 51)), 20, 30)
  np.testing.assert_array_equal(T.crop_array(sem, (40, 50, 20, 30)), np.ones((20, 30)))


def test_opencv_hsv_known_values_and_round_trip():
  rgb = np.array([[255, 0, 0], [0, 255, 0], [0, 0, 255], [255, 255, 0], [128, 128, 128],
                  [0, 0, 0], [255, 0, 255], [10, 200, 100]], np.uint8)
  hsv = T.rgb_to_hsv_opencv(rgb)
  np.testing.assert_array_equal(hsv[:7], [[0, 255, 255], [60, 255, 255], [120, 255, 255],
                                          [30, 255, 255], [0, 0, 128], [0, 0, 0],
                                          [150, 255, 255]])
  # (10, 200, 100): max = g, so H = 30 * (b - r + 2 diff) / diff = 74.2 -> 74 (fixed point),
  # S = 255 * diff / V = 242.25 -> 242.
  assert tuple(hsv[7]) == (74, 242, 200)
  np.testing.assert_array_equal(T.hsv_to_rgb_opencv(hsv[:7]), rgb[:7])
  every = np.stack(np.meshgrid(np.arange(0, 256, 5), np.arange(0, 256, 5),
                               np.arange(0, 256, 5), indexing="ij"), -1).reshape(-1, 3)
  every = every.astype(np.uint8)
  back = T.hsv_to_rgb_opencv(T.rgb_to_hsv_opencv(every))
  # uint8 HSV quantises hue to 2 degrees: OpenCV's round trip is off by a few levels at most.
  assert np.abs(back.astype(int) - every).max() <= 8
  assert np.abs(back.astype(int) - every).mean() < 0.6


def test_color_aug_ssd_determinism_and_ranges():
  rng = np.random.default_rng(0)
  img = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
  a = T.color_aug_ssd(img, np.random.default_rng(3))
  b = T.color_aug_ssd(img, np.random.default_rng(3))
  np.testing.assert_array_equal(a, b)
  assert a.dtype == np.uint8 and a.shape == img.shape
  assert any(not np.array_equal(T.color_aug_ssd(img, np.random.default_rng(s)), a)
             for s in range(4, 8))
  # Grey images have S = 0: only brightness (+-32) and contrast (x [0.5, 1.5]) act.
  grey = np.full((2, 2, 3), 128, np.uint8)
  values = []
  for seed in range(400):
    out = T.color_aug_ssd(grey, np.random.default_rng(seed))
    assert (out == out[0, 0, 0]).all()
    values.append(int(out[0, 0, 0]))
  values = np.array(values)
  assert values.min() >= 32 and values.max() <= 240
  assert 0.18 < np.mean(values == 128) < 0.32  # Neither step applied: p = 1/4.
  # Hue alone rotates H by at most 18 (mod 180); S and V stay within rounding.
  colourful = np.array([[[120, 80, 80], [80, 120, 90], [90, 80, 130]]], np.uint8)
  h0 = T.rgb_to_hsv_opencv(colourful)[..., 0].astype(int)
  for seed in range(50):
    h1 = T.rgb_to_hsv_opencv(T.color_aug_ssd(colourful, np.random.default_rng(seed)))
    dh = np.abs(((h1[..., 0].astype(int) - h0 + 90) % 180) - 90)
    assert dh.max() <= 18 + 4  # + truncation and HSV quantisation of the other steps.
