"""grain pipelines on the synthetic dataset: determinism, sharding, resume, workers, evaluation."""

import collections
import copy

import numpy as np
import pytest

from pointrend_jax.data import pipeline, synthetic

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

CFG = pipeline.LoaderConfig(min_size_train=(96, 128), max_size_train=192, min_size_test=128,
                           max_size_test=192, max_instances=12)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
  return synthetic.ensure_synthetic_dataset(tmp_path_factory.mktemp("cache"), 24, 8)


@pytest.fixture(scope="module")
def train_records(dataset):
  return synthetic.load_synthetic_records(dataset, "train")


@pytest.fixture(scope="module")
def val_records(dataset):
  return synthetic.load_synthetic_records(dataset, "val")


def _loader(records, **kwargs):
  # No prefetch threads by default: they would keep mapping after a test ends.
  kwargs = {"batch_size_per_process": 2, "seed": 0, "config": CFG, "process_index": 0,
            "process_count": 1, "read_threads": 0, **kwargs}
  return pipeline.build_train_loader(records, **kwargs)


def _take(it, n):
  return [next(it) for _ in range(n)]


def _assert_same(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for k in x:
      np.testing.assert_array_equal(np.asarray(x[k]), np.asarray(y[k]), err_msg=k)


def test_batches_are_static_and_bucketed(train_records):
  buckets = set(pipeline.train_buckets(CFG))
  for batch in _take(_loader(train_records), 8):
    assert tuple(batch["image"].shape[1:3]) in buckets
    assert batch["gt_masks_packed"].shape[:2] == (2, 12)
    assert batch["valid"].all()
    for hw, bound in zip(batch["image_size"], [batch["image"].shape[1:3]] * 2):
      assert 0 < hw[0] <= bound[0] and 0 < hw[1] <= bound[1]
      assert min(hw) in (96, 128) or max(hw) == 192  # ResizeShortestEdge scales.


def test_deterministic_from_seed(train_records):
  a = _take(_loader(train_records), 6)
  _assert_same(a, _take(_loader(train_records), 6))
  other = _take(_loader(train_records, seed=1), 6)
  assert any(not np.array_equal(x["record_index"], y["record_index"]) for x, y in zip(a, other))


def test_process_shards_are_disjoint_and_cover(train_records):
  """Process p's batch k is slice p of global batch k: the 2-process shards of every step
  together equal the single-process batch of twice the size (same images, same augmentations)."""
  single = _take(_loader(train_records, batch_size_per_process=4), 12)
  p0 = _take(_loader(train_records, process_index=0, process_count=2), 12)
  p1 = _take(_loader(train_records, process_index=1, process_count=2), 12)
  seen = collections.Counter()
  for s, a, b in zip(single, p0, p1):
    assert a["image"].shape == b["image"].shape  # Same bucket on every process.
    for key in ("record_index", "image", "image_size", "gt_boxes", "gt_masks_packed"):
      np.testing.assert_array_equal(np.concatenate([a[key], b[key]]), s[key], err_msg=key)
    seen.update(a["record_index"].tolist() + b["record_index"].tolist())
  # 48 stream elements = 2 epochs of 24: every image is fed, none more than twice plus the
  # few leftovers of its group.
  assert set(seen) == set(range(len(train_records)))
  assert max(seen.values()) <= 4


def test_state_restore_gives_exact_next_batches(train_records):
  it = _loader(train_records)
  _take(it, 3)
  state = it.get_state()
  expected = _take(it, 4)
  resumed = _loader(train_records)
  resumed.set_state(copy.deepcopy(state))
  _assert_same(_take(resumed, 4), expected)


def test_workers_match_in_process_and_resume(train_records):
  reference = _take(_loader(train_records), 6)
  it = _loader(train_records, worker_count=2, read_threads=1)
  try:
    first = _take(it, 3)
    state = it.get_state()
    _assert_same(first + _take(it, 3), reference)
  finally:
    it.close()
  resumed = _loader(train_records, worker_count=2, read_threads=1)
  try:
    resumed.set_state(state)
    _assert_same(_take(resumed, 3), reference[3:])
  finally:
    resumed.close()


def test_training_drops_crowd_and_empty_images(train_records):
  records = copy.deepcopy(train_records[:6])
  records[1]["annotations"] = []
  records[4]["annotations"] = [dict(a, iscrowd=1) for a in records[4]["annotations"]]
  seen = set()
  for batch in _take(_loader(records), 8):
    seen.update(batch["record_index"].tolist())
  assert seen == {0, 2, 3, 5}


def test_eval_loader_keeps_every_image_and_pads(val_records):
  records = copy.deepcopy(val_records) + [dict(copy.deepcopy(val_records[0]), annotations=[],
                                               image_id=999)]
  loader = pipeline.build_eval_loader(records, 3, config=CFG, process_index=0,
                                      process_count=1)
  batches = list(loader)
  assert len(batches) == len(loader)
  found = []
  for batch in batches:
    assert set(batch) == {"image", "image_size", "orig_size", "image_id", "record_index", "valid"}
    for i in range(3):
      if not batch["valid"][i]:
        assert batch["record_index"][i] == -1 and not batch["image"][i].any()
        continue
      k = int(batch["record_index"][i])
      found.append(k)
      ex = pipeline.map_example(records[k], np.random.default_rng(0), CFG, training=False)
      h, w = ex["image_size"]
      np.testing.assert_array_equal(batch["image"][i, :h, :w], ex["image"])  # No flip.
      np.testing.assert_array_equal(batch["image_size"][i], (h, w))
      np.testing.assert_array_equal(batch["orig_size"][i], ex["orig_size"])
      assert batch["image_id"][i] == records[k]["image_id"]
  assert sorted(found) == list(range(len(records)))  # Empty image 8 included, each once.
  assert sum((~b["valid"]).sum() for b in batches) == 3 * len(batches) - len(records)

  # Two processes: the same number of batches, disjoint valid images covering everything.
  parts = [list(pipeline.build_eval_loader(records, 2, config=CFG, process_index=p,
                                           process_count=2)) for p in range(2)]
  assert len(parts[0]) == len(parts[1])
  ids = [int(r) for part in parts for b in part for r, v in zip(b["record_index"], b["valid"])
         if v]
  assert sorted(ids) == list(range(len(records)))
  for a, b in zip(*parts):
    assert a["image"].shape == b["image"].shape

  exact = pipeline.build_eval_loader(records, 1, config=CFG, process_index=0,
                                     process_count=1, padding="exact")
  for batch in exact:
    h, w = batch["image_size"][0]
    assert batch["image"].shape[1:3] == (-(-h // 32) * 32, -(-w // 32) * 32)


def test_semantic_training_crop_and_colour(train_records):
  cfg = pipeline.LoaderConfig(min_size_train=(128, 192), max_size_train=384, crop_size=(96, 128),
                             crop_single_category_max_area=0.75, color_aug_ssd=True,
                             instance_targets=False, semantic_targets=True, mask_format="none")
  assert pipeline.train_buckets(cfg) == ((96, 128),)
  batches = _take(_loader(train_records, config=cfg, batch_size_per_process=3), 3)
  for batch in batches:
    assert set(batch) == {"image", "image_size", "orig_size", "image_id", "record_index",
                          "valid", "sem_seg"}
    assert batch["sem_seg"].shape == (3, 96, 128)
    np.testing.assert_array_equal(batch["image_size"], [[96, 128]] * 3)
    assert set(np.unique(batch["sem_seg"])) <= set(range(6))
  _assert_same(batches, _take(_loader(train_records, config=cfg,
                                      batch_size_per_process=3), 3))


def test_orientation_grouping(train_records):
  cfg = pipeline.LoaderConfig(min_size_train=(96, 128), max_size_train=192, max_instances=12,
                             group_by="orientation")
  by_index = {i: r for i, r in enumerate(train_records)}
  for batch in _take(_loader(train_records, config=cfg), 8):
    landscape = {by_index[int(i)]["width"] > by_index[int(i)]["height"]
                 for i in batch["record_index"]}
    assert len(landscape) == 1  # detectron2's groups: w > h, or not.
    hb, wb = batch["image"].shape[1:3]
    assert (hb, wb) in pipeline.train_buckets(cfg)
    assert (batch["image_size"] <= [hb, wb]).all()
