"""Static-shape batches: bucket list and choice, padding, validity, packed masks, instance cap."""

import logging

import numpy as np
import pytest

from pointrend_jax.data import batching


def test_bucket_lists_of_the_seed_configs():
  coco = batching.bucket_sizes((640, 672, 704, 736, 768, 800), 1333)
  assert coco == ((800, 800), (800, 1088), (1088, 800), (800, 1216), (1216, 800), (800, 1344),
                  (1344, 800))
  assert batching.bucket_sizes(800, 1333) == coco  # Test settings: the same canvases.
  cityscapes = batching.bucket_sizes((800, 1024), 2048)
  assert cityscapes == ((1024, 1024), (1024, 1376), (1376, 1024), (1024, 1536), (1536, 1024),
                        (1024, 2048), (2048, 1024))
  assert all(h % 32 == 0 and w % 32 == 0 for h, w in coco + cityscapes)


@pytest.mark.parametrize("hw, bucket", [
    ((800, 1067), (800, 1088)),  # COCO 640x480 at 800.
    ((1067, 800), (1088, 800)),
    ((800, 1199), (800, 1216)),  # 640x427.
    ((800, 800), (800, 800)),
    ((667, 1333), (800, 1344)),  # Capped long side.
    ((640, 853), (800, 1088)),  # Smaller train scales use the same bucket.
])
def test_choose_bucket_smallest_that_holds(hw, bucket):
  coco = batching.bucket_sizes(800, 1333)
  assert batching.choose_bucket(*hw, coco) == bucket


def test_choose_bucket_errors_when_nothing_fits():
  with pytest.raises(ValueError, match="no bucket"):
    batching.choose_bucket(900, 900, batching.bucket_sizes(800, 1333))


def _example(h, w, n, seed, image_id=1):
  rng = np.random.default_rng(seed)
  masks = rng.random((n, h, w)) < 0.3
  boxes = rng.uniform(0, min(h, w) / 2, (n, 4)).astype(np.float32)
  boxes[:, 2:] += boxes[:, :2]
  return {"image": rng.integers(1, 256, (h, w, 3), dtype=np.uint8), "image_size": (h, w),
          "orig_size": (h // 2, w // 2), "image_id": image_id, "record_index": seed,
          "gt_boxes": boxes, "gt_classes": np.arange(n, dtype=np.int32) + 1, "gt_masks": masks,
          "sem_seg": rng.integers(0, 5, (h, w), dtype=np.uint8)}


def test_make_batch_shapes_padding_validity():
  a, b = _example(50, 70, 3, 0, image_id=11), _example(64, 60, 1, 1, image_id=12)
  bucket = (64, 96)
  batch = batching.make_batch([a, b], bucket, batch_size=3, max_instances=5,
                              semantic_targets=True)
  expected = {
      "image": ((3, 64, 96, 3), np.uint8), "image_size": ((3, 2), np.int32),
      "orig_size": ((3, 2), np.int32), "image_id": ((3,), np.int32),
      "record_index": ((3,), np.int32), "valid": ((3,), np.bool_),
      "gt_boxes": ((3, 5, 4), np.float32), "gt_classes": ((3, 5), np.int32),
      "gt_valid": ((3, 5), np.bool_), "gt_masks_packed": ((3, 5, 64, 12), np.uint8),
      "sem_seg": ((3, 64, 96), np.uint8)}
  assert {k: (v.shape, v.dtype) for k, v in batch.items()} == expected
  np.testing.assert_array_equal(batch["valid"], [True, True, False])
  np.testing.assert_array_equal(batch["image_size"], [[50, 70], [64, 60], [64, 96]])
  np.testing.assert_array_equal(batch["orig_size"][:2], [[25, 35], [32, 30]])
  np.testing.assert_array_equal(batch["image_id"], [11, 12, -1])
  np.testing.assert_array_equal(batch["record_index"], [0, 1, -1])
  np.testing.assert_array_equal(batch["gt_valid"], [[1, 1, 1, 0, 0], [1, 0, 0, 0, 0],
                                                    [0, 0, 0, 0, 0]])
  np.testing.assert_array_equal(batch["gt_classes"][0], [1, 2, 3, 0, 0])
  np.testing.assert_array_equal(batch["gt_boxes"][0, :3], a["gt_boxes"])
  assert not batch["gt_boxes"][0, 3:].any() and not batch["gt_boxes"][2].any()
  for i, ex in enumerate((a, b)):
    h, w = ex["image_size"]
    np.testing.assert_array_equal(batch["image"][i, :h, :w], ex["image"])
    assert not batch["image"][i, h:].any() and not batch["image"][i, :, w:].any()
    np.testing.assert_array_equal(batch["sem_seg"][i, :h, :w], ex["sem_seg"])
    assert (batch["sem_seg"][i, h:] == 255).all() and (batch["sem_seg"][i, :, w:] == 255).all()
    n = len(ex["gt_boxes"])
    unpacked = batching.unpack_masks(batch["gt_masks_packed"][i], 96)
    np.testing.assert_array_equal(unpacked[:n, :h, :w], ex["gt_masks"])
    assert not unpacked[:n, h:].any() and not unpacked[:n, :, w:].any() and not unpacked[n:].any()
  assert not batch["image"][2].any() and (batch["sem_seg"][2] == 255).all()


def test_packed_bit_layout_and_dense_format():
  ex = _example(40, 45, 2, 3)
  packed = batching.make_batch([ex], (64, 64))["gt_masks_packed"]
  dense = batching.make_batch([ex], (64, 64), mask_format="dense")["gt_masks"]
  assert dense.dtype == np.uint8
  i, j = np.meshgrid(np.arange(64), np.arange(64), indexing="ij")
  p = packed[0]
  bits = (p[:, i, j >> 3] >> (7 - (j & 7))[None]) & 1  # The documented tap formula.
  np.testing.assert_array_equal(bits, dense[0])
  np.testing.assert_array_equal(dense[0, :2, :40, :45], ex["gt_masks"])
  boxes_only = batching.make_batch([ex], (64, 64), mask_format="none")
  assert "gt_masks" not in boxes_only and "gt_masks_packed" not in boxes_only


def test_max_instances_keeps_largest_in_order(caplog):
  ex = _example(20, 24, 5, 4)
  masks = np.zeros((5, 20, 24), bool)
  for k, area_rows in enumerate([1, 8, 0, 5, 3]):
    masks[k, :area_rows + 1] = True  # Areas 24, 216, 24, 144, 96: the first 24 wins the tie.
  ex["gt_masks"] = masks
  np.testing.assert_array_equal(batching.select_instances(np.array([24, 216, 24, 144, 96]), 3),
                                [1, 3, 4])
  np.testing.assert_array_equal(batching.select_instances(np.array([24, 216, 24, 144]), 4),
                                [0, 1, 2, 3])
  np.testing.assert_array_equal(batching.select_instances(np.array([5, 9, 5, 1]), 3), [0, 1, 2])
  with caplog.at_level(logging.WARNING, logger="pointrend_jax.data.batching"):
    batch = batching.make_batch([ex], (32, 32), max_instances=3, mask_format="dense")
  np.testing.assert_array_equal(batch["gt_classes"][0], ex["gt_classes"][[1, 3, 4]])
  np.testing.assert_array_equal(batch["gt_boxes"][0], ex["gt_boxes"][[1, 3, 4]])
  np.testing.assert_array_equal(batch["gt_masks"][0, :, :20, :24], masks[[1, 3, 4]])
  assert batch["gt_valid"].all()
  assert "5 instances > max_instances=3" in caplog.text
  assert "truncated images so far in this process" in caplog.text


def test_make_batch_rejects_bad_inputs():
  ex = _example(40, 45, 1, 5)
  with pytest.raises(ValueError, match="does not fit"):
    batching.make_batch([ex], (32, 64))
  with pytest.raises(ValueError, match="batch_size"):
    batching.make_batch([ex, ex], (64, 64), batch_size=1)
  with pytest.raises(ValueError, match="divisible by 8"):
    batching.make_batch([ex], (64, 60))
  with pytest.raises(ValueError, match="no sem_seg"):
    batching.make_batch([dict(ex, sem_seg=None)], (64, 64), semantic_targets=True)


def test_compact_examples_give_the_same_batch():
  examples = [_example(30, 45, 4, 6), _example(32, 29, 2, 7)]
  compact = [batching.compact_example(ex) for ex in examples]
  assert "gt_masks" not in compact[0] and compact[0]["gt_masks_packed"].shape == (4, 30, 6)
  for fmt in ("packed", "dense"):
    for m in (5, 3):  # With and without truncation (areas from the packed bits).
      ref = batching.make_batch(examples, (32, 64), mask_format=fmt, max_instances=m)
      got = batching.make_batch(compact, (32, 64), mask_format=fmt, max_instances=m)
      assert ref.keys() == got.keys()
      for k in ref:
        np.testing.assert_array_equal(got[k], ref[k], err_msg=f"{fmt} {m} {k}")
