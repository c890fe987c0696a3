"""grain input pipelines: records -> transformed images -> static-shape :data:`Batch` es.

Training (:func:`build_train_loader`), as detectron2's ``TrainingSampler`` +
``AspectRatioGroupedDataset`` + ``DatasetMapper``:

1. **Records.** Crowd annotations are dropped by the mapper; with instance targets, images
   without any non-crowd annotation are removed up front (FILTER_EMPTY_ANNOTATIONS). Records are
   pickled into one flat byte buffer (like detectron2's serialized ``DatasetFromList``) so that
   worker processes receive one array, not 100k Python objects.
2. **Stream.** An infinite sequence of epochs; epoch ``e`` is the permutation
   ``default_rng(SeedSequence([seed, 0, e])).permutation(N)`` of the (filtered) records.
3. **Grouping** (static shapes). Each record gets, up front from its ``(height, width)``, the
   largest size its transforms can produce (largest short side) and from it a bucket from a fixed
   list (:func:`train_buckets`). The stream is grouped like detectron2's
   ``AspectRatioGroupedDataset``: each image goes to its group's buffer, and a group emits a
   *global* batch (``batch_size_per_process * process_count`` images) when its buffer is full;
   leftovers carry over into the next epoch. Groups are buckets (``group_by="bucket"``, default:
   least padding) or detectron2's orientation groups ``w > h`` / not (``"orientation"``: same
   batch composition as detectron2; the batch then uses the smallest bucket holding all its
   images). Every process computes the same global batches (index arithmetic only) and takes
   its slice ``[p*B, (p+1)*B)``, so all processes use the same bucket at every step -- required
   for SPMD, where one program runs on all hosts. (detectron2 groups each GPU's own stream
   independently; over an epoch both feed every image exactly once.)
4. **Mapping** (in grain workers): read the image, ResizeShortestEdge (short side drawn from
   ``min_size_train``), optional semantic crop and colour augmentation, horizontal flip,
   annotation transforms; masks are bit-packed at the image size. The consumer process pads
   the examples into the Batch (:func:`~pointrend_jax.data.batching.make_batch`), so only the
   compact examples cross the process boundary. The randomness
   of image ``r`` drawn in epoch ``e`` is ``default_rng(SeedSequence([seed, 1, e, r]))``: it
   does not depend on the worker count, the prefetching or where training resumed.
5. **State.** The loader is a grain ``MapDataset`` whose element ``k`` is global step ``k``'s
   batch, so the iterator's state is just the next step (plus per-worker positions with
   workers); ``get_state()`` / ``set_state()`` resume on the exact next batch.

Evaluation (:func:`build_eval_loader`): every record (empty images included) in dataset order,
test-time resize only, grouped by bucket (or by exact ``ceil32`` size with
``padding="exact"``, detectron2's padding, one compilation per distinct size); each group's
last global batch is padded with ``valid = False`` images, and every process gets the same
number of batches.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import logging
import pickle
import sys
import threading
from typing import Any, Iterator, Mapping, Sequence

import grain
import numpy as np

from pointrend_jax.data import batching
from pointrend_jax.data import coco
from pointrend_jax.data import transforms as T
from pointrend_jax.modeling.config import ModelConfig

logger = logging.getLogger(__name__)

__all__ = ["LoaderConfig", "loader_config", "train_buckets", "eval_buckets", "max_train_size",
           "map_example", "build_train_loader", "build_eval_loader", "EvalLoader"]

Record = Mapping[str, Any]
Size = tuple[int, int]

_SHUFFLE_DOMAIN = 0
_AUGMENT_DOMAIN = 1
_GROUP_BY = ("bucket", "orientation")


@dataclasses.dataclass(frozen=True)
class LoaderConfig:
  """The loaders' settings (detectron2's ``INPUT.*`` plus the static-shape choices), from
  :func:`loader_config`.

  Attributes:
    min_size_train: short sides drawn uniformly per image ("choice" sampling).
    max_size_train: cap on the long side in training.
    min_size_test: test short side.
    max_size_test: test long-side cap.
    random_flip: horizontal flip with p = 0.5 in training.
    crop_size: ``(h, w)`` absolute crop after resizing (semantic training), or None.
    crop_single_category_max_area: the crop's category-area constraint (1.0 = plain crop).
    color_aug_ssd: PointRend's ``ColorAugSSDTransform`` in training.
    instance_targets: emit ``gt_boxes/gt_classes/gt_valid`` (+ masks); drops crowd
      annotations and (training) filters images without usable annotations.
    semantic_targets: emit ``sem_seg`` (records need ``sem_seg_file_name``).
    mask_format: ``"packed"``, ``"dense"`` or ``"none"`` (see ``batching``).
    max_instances: instance slots per image (see ``batching`` for the overflow policy).
    ignore_label: semantic ignore / padding value.
    size_divisibility: bucket sides are multiples of this (the FPN's largest stride).
    group_by: ``"bucket"`` or ``"orientation"`` (see the module docstring).
  """
  min_size_train: tuple[int, ...] = (640, 672, 704, 736, 768, 800)
  max_size_train: int = 1333
  min_size_test: int = 800
  max_size_test: int = 1333
  random_flip: bool = True
  crop_size: tuple[int, int] | None = None
  crop_single_category_max_area: float = 1.0
  color_aug_ssd: bool = False
  instance_targets: bool = True
  semantic_targets: bool = False
  mask_format: str = "packed"
  max_instances: int = 100
  ignore_label: int = batching.IGNORE_LABEL
  size_divisibility: int = batching.SIZE_DIVISIBILITY
  group_by: str = "bucket"

  def __post_init__(self):
    object.__setattr__(self, "min_size_train", tuple(int(s) for s in self.min_size_train))
    if not self.min_size_train or min(self.min_size_train) <= 0:
      raise ValueError(f"min_size_train must be positive sizes, got {self.min_size_train}")
    if self.mask_format not in batching.MASK_FORMATS:
      raise ValueError(f"mask_format must be one of {batching.MASK_FORMATS}")
    if self.group_by not in _GROUP_BY:
      raise ValueError(f"group_by must be one of {_GROUP_BY}, got {self.group_by!r}")
    if self.crop_size is not None:
      object.__setattr__(self, "crop_size", tuple(int(s) for s in self.crop_size))
      if self.instance_targets or not self.semantic_targets:
        # detectron2 would recompute boxes from cropped masks; no seed config needs it.
        raise NotImplementedError("crop_size is supported for semantic-only inputs")
    if self.mask_format == "packed" and self.size_divisibility % 8:
      raise ValueError("packed masks need size_divisibility to be a multiple of 8")


def loader_config(data: Mapping[str, Any], mcfg: ModelConfig) -> LoaderConfig:
  """The loaders' settings: the model config's ``input`` section (detectron2's INPUT.*) plus the
  run config's ``data`` section (``max_instances``, ``group_by``); the one place they are read.

  Raises:
    NotImplementedError: an INPUT option this pipeline does not implement (named).
  """
  inp = mcfg.input
  if inp.min_size_train_sampling != "choice":
    raise NotImplementedError(f"INPUT.MIN_SIZE_TRAIN_SAMPLING {inp.min_size_train_sampling!r} "
                              "(only 'choice' is supported)")
  if inp.random_flip not in ("horizontal", "none"):
    raise NotImplementedError(f"INPUT.RANDOM_FLIP {inp.random_flip!r}")
  crop = None
  if inp.crop_enabled:
    if inp.crop_type != "absolute":
      raise NotImplementedError(f"INPUT.CROP.TYPE {inp.crop_type!r} (only 'absolute')")
    crop = tuple(int(s) for s in inp.crop_size)
  semantic = mcfg.is_semantic
  return LoaderConfig(
      min_size_train=tuple(inp.min_size_train), max_size_train=inp.max_size_train,
      min_size_test=inp.min_size_test, max_size_test=inp.max_size_test,
      random_flip=inp.random_flip == "horizontal", crop_size=crop,
      crop_single_category_max_area=inp.crop_single_category_max_area,
      color_aug_ssd=inp.color_aug_ssd, instance_targets=not semantic,
      semantic_targets=semantic, mask_format="none" if semantic else "packed",
      max_instances=int(data.get("max_instances", 100)),
      group_by=str(data.get("group_by", "bucket")))


def train_buckets(cfg: LoaderConfig) -> tuple[Size, ...]:
  """Training canvases: one crop-sized bucket with a crop, else ``bucket_sizes`` (7 for COCO)."""
  d = cfg.size_divisibility
  if cfg.crop_size is not None:
    return ((batching.ceil_to(cfg.crop_size[0], d), batching.ceil_to(cfg.crop_size[1], d)),)
  return batching.bucket_sizes(cfg.min_size_train, cfg.max_size_train, d)


def eval_buckets(cfg: LoaderConfig) -> tuple[Size, ...]:
  """Evaluation canvases for ``padding="bucket"``."""
  return batching.bucket_sizes(cfg.min_size_test, cfg.max_size_test, cfg.size_divisibility)


def max_train_size(height: int, width: int, cfg: LoaderConfig) -> Size:
  """Largest ``(h, w)`` the training transforms can give an ``height x width`` image."""
  sizes = [T.resize_shortest_edge_size(height, width, s, cfg.max_size_train)
           for s in cfg.min_size_train]
  h, w = max(s[0] for s in sizes), max(s[1] for s in sizes)
  if cfg.crop_size is not None:
    h, w = min(h, cfg.crop_size[0]), min(w, cfg.crop_size[1])
  return h, w


# The mapper (detectron2's DatasetMapper), one image.


def _transform_mask(ann: Record, orig: Size, new: Size, flip: bool) -> np.ndarray:
  """One annotation's mask at the transformed size, as detectron2 builds BitMasks.

  Polygons are scaled (and flipped) and then rasterised at the new size; RLE / array masks are
  decoded to uint8 at the original size, resized as a label map (NEAREST) and flipped.
  """
  segm = ann.get("segmentation")
  if segm is None or (isinstance(segm, (list, tuple)) and not segm):
    raise ValueError(f"annotation id {ann.get('id')} has no segmentation (masks are on)")
  (oh, ow), (nh, nw) = orig, new
  try:
    if isinstance(segm, (list, tuple)):
      polys = T.transform_polygons(segm, nw / ow, nh / oh, nw if flip else None)
      return coco.decode_segmentation(polys, nh, nw)
    mask = coco.decode_segmentation(segm, oh, ow).astype(np.uint8)
    mask = T.resize_label_map(mask, (nh, nw)) != 0
    return T.hflip_image(mask) if flip else mask
  except (ValueError, TypeError) as e:
    raise ValueError(f"annotation id {ann.get('id')}: {e}") from e


def map_example(record: Record,
                rng: np.random.Generator,
                cfg: LoaderConfig,
                *,
                training: bool,
                record_index: int = -1,
                with_targets: bool = True) -> batching.Example:
  """Reads and transforms one record into an :data:`~pointrend_jax.data.batching.Example`.

  Order of operations and random draws (detectron2's augmentation list): resize (short side),
  [crop], [colour], flip; then the annotations follow the image's geometric transforms.

  ``record`` is in the ``coco`` module's format (``sem_seg_file_name`` for semantic); ``rng`` is
  this image's randomness (unused at test time); ``training`` applies the training
  augmentations (else test-time resize only); ``with_targets`` produces the targets ``cfg`` asks
  for.
  """
  image = coco.load_image(record)
  oh, ow = image.shape[:2]
  want_inst = with_targets and cfg.instance_targets
  want_sem = with_targets and cfg.semantic_targets
  sem = None
  if want_sem:
    sem = coco.load_label_map(record)
    if sem.shape != (oh, ow):
      raise ValueError(f"{record.get('sem_seg_file_name')}: label map {sem.shape} != image "
                       f"{oh}x{ow} of {record.get('file_name')}")

  if training:
    short = int(cfg.min_size_train[int(rng.integers(len(cfg.min_size_train)))])
    nh, nw = T.resize_shortest_edge_size(oh, ow, short, cfg.max_size_train)
  else:
    nh, nw = T.resize_shortest_edge_size(oh, ow, cfg.min_size_test, cfg.max_size_test)
  image = T.resize_image(image, (nh, nw))
  if sem is not None:
    sem = T.resize_label_map(sem, (nh, nw))
  if training and cfg.crop_size is not None:
    window = T.random_crop_category_area(sem, cfg.crop_size, rng,
                                         cfg.crop_single_category_max_area, cfg.ignore_label)
    image, sem = T.crop_array(image, window), T.crop_array(sem, window)
  if training and cfg.color_aug_ssd:
    image = T.color_aug_ssd(image, rng)
  flip = bool(training and cfg.random_flip and rng.random() < 0.5)
  if flip:
    image = T.hflip_image(image)
    sem = T.hflip_image(sem) if sem is not None else None
  h, w = image.shape[:2]

  example: batching.Example = {
      "image": image,
      "image_size": (h, w),
      "orig_size": (int(record["height"]), int(record["width"])),
      "image_id": record.get("image_id", -1),
      "record_index": int(record_index),
  }
  if sem is not None:
    example["sem_seg"] = sem
  if want_inst:
    anns = [a for a in record.get("annotations", ()) if not a.get("iscrowd", 0)]
    boxes = np.array([np.asarray(a["bbox"], np.float64) for a in anns],
                     np.float64).reshape(-1, 4)
    boxes = T.scale_boxes(boxes, nw / ow, nh / oh)
    if flip:
      boxes = T.hflip_boxes(boxes, w)
    boxes = T.clip_boxes(boxes, (h, w)).astype(np.float32)
    classes = np.array([int(a["category_id"]) for a in anns], np.int32)
    keep = T.nonempty_boxes(boxes)
    masks = None
    if cfg.mask_format != "none":
      masks = np.zeros((len(anns), h, w), bool)
      for k, ann in enumerate(anns):
        masks[k] = _transform_mask(ann, (oh, ow), (nh, nw), flip)
      keep &= masks.reshape(len(anns), h * w).any(axis=1)
    example["gt_boxes"] = boxes[keep]
    example["gt_classes"] = classes[keep]
    if masks is not None:
      example["gt_masks"] = masks[keep]
  return example


# Records in one flat buffer.


class _RecordStore:
  """Records pickled into one uint8 array + offsets; ``store[i]`` unpickles record ``i``."""

  def __init__(self, records: Sequence[Record]):
    blobs = [pickle.dumps(dict(r), protocol=pickle.HIGHEST_PROTOCOL) for r in records]
    self._offsets = np.cumsum([0] + [len(b) for b in blobs], dtype=np.int64)
    self._data = np.frombuffer(b"".join(blobs), np.uint8)

  def __getitem__(self, i: int) -> dict[str, Any]:
    return pickle.loads(memoryview(self._data[self._offsets[i]:self._offsets[i + 1]]))


# Deterministic grouping of the infinite shuffled stream.


class _TrainSource:
  """grain random-access source: element ``k`` = this process's part of global step ``k``.

  Global batches of the infinite shuffled stream, grouped by key: simulates detectron2's
  ``AspectRatioGroupedDataset`` over the stream of shuffled epochs, one epoch at a time with
  numpy: a key's images are chunked in stream order (after the previous epoch's leftovers of
  that key), each chunk is emitted at the stream position of its last image, and chunks of all
  keys are ordered by that position. Steps ``k`` are served from a small cache of simulated
  epochs; asking for an earlier step than the cache holds re-simulates from the start (index
  arithmetic: ~3 ms per epoch of 117k images, 0.1 s to reach step 270k of COCO 3x).
  """

  def __init__(self, seed: int, keys: np.ndarray, bounds: np.ndarray,
               buckets: Sequence[Size], group_by: str, batch_size: int, process_index: int,
               process_count: int, cache_epochs: int = 3):
    self._seed = int(seed)
    self._keys = np.asarray(keys, np.int64)
    self._num_keys = int(self._keys.max()) + 1
    self._g = batch_size * process_count
    self._bounds = bounds
    self._buckets = tuple(tuple(b) for b in buckets)
    self._group_by = group_by
    self._part = slice(process_index * batch_size, (process_index + 1) * batch_size)
    self._cache_epochs = cache_epochs
    self._lock = threading.Lock()  # grain's prefetch threads read steps concurrently.
    self._reset()

  def __getstate__(self) -> dict[str, Any]:
    state = dict(self.__dict__)
    del state["_lock"]  # Not picklable; worker processes get their own.
    return state

  def __setstate__(self, state: dict[str, Any]) -> None:
    self.__dict__.update(state)
    self._lock = threading.Lock()

  def __len__(self) -> int:
    return sys.maxsize  # Infinite stream; grain needs a length.

  def _reset(self) -> None:
    self._next_epoch = 0
    self._next_step = 0
    empty = np.zeros((0,), np.int64)
    self._left = [(empty, empty) for _ in range(self._num_keys)]  # (items, epochs) per key.
    self._cache: collections.OrderedDict[int, tuple[int, np.ndarray, np.ndarray]] = (
        collections.OrderedDict())

  def _simulate_epoch(self) -> None:
    e = self._next_epoch
    rng = np.random.default_rng(np.random.SeedSequence([self._seed, _SHUFFLE_DOMAIN, e]))
    perm = rng.permutation(len(self._keys))
    keys = self._keys[perm]
    chunk_items, chunk_epochs, emit = [], [], []
    for g in range(self._num_keys):
      sel = np.flatnonzero(keys == g)
      left_items, left_epochs = self._left[g]
      items = np.concatenate([left_items, perm[sel]])
      epochs = np.concatenate([left_epochs, np.full(len(sel), e, np.int64)])
      # Positions are only compared within this epoch; leftovers precede every new image.
      pos = np.concatenate([np.full(len(left_items), -1, np.int64), sel])
      full = len(items) // self._g * self._g
      if full:
        chunk_items.append(items[:full].reshape(-1, self._g))
        chunk_epochs.append(epochs[:full].reshape(-1, self._g))
        emit.append(pos[self._g - 1:full:self._g])
      self._left[g] = (items[full:], epochs[full:])
    if chunk_items:
      order = np.argsort(np.concatenate(emit), kind="stable")
      items = np.concatenate(chunk_items)[order]
      epochs = np.concatenate(chunk_epochs)[order]
    else:
      items = epochs = np.zeros((0, self._g), np.int64)
    self._cache[e] = (self._next_step, items, epochs)
    while len(self._cache) > self._cache_epochs:
      self._cache.popitem(last=False)
    self._next_step += len(items)
    self._next_epoch += 1

  def _global_batch(self, step: int) -> tuple[np.ndarray, np.ndarray]:
    """Record positions ``[G]`` and the epochs they were drawn in ``[G]`` of global step."""
    with self._lock:
      if self._cache and step < next(iter(self._cache.values()))[0]:
        self._reset()
      while step >= self._next_step:
        self._simulate_epoch()
      for start, items, epochs in self._cache.values():
        if start <= step < start + len(items):
          return items[step - start], epochs[step - start]
    raise AssertionError("unreachable: step not in the simulated epochs")

  def __getitem__(self, step: int) -> dict[str, Any]:
    items, epochs = self._global_batch(int(step))
    if self._group_by == "bucket":
      bucket = self._buckets[int(self._keys[items[0]])]
    else:
      hw = self._bounds[items].max(axis=0)
      bucket = batching.choose_bucket(int(hw[0]), int(hw[1]), self._buckets)
    return {"positions": items[self._part], "epochs": epochs[self._part],
            "bucket": np.array(bucket, np.int64)}


def _map_examples(element: Mapping[str, Any], *, store: _RecordStore,
                  record_indices: np.ndarray, cfg: LoaderConfig, seed: int, training: bool,
                  with_targets: bool) -> dict[str, Any]:
  """grain map function (runs in the workers): ``{"positions", "epochs", "bucket"}`` ->
  ``{"examples": [compact examples], "bucket"}``.

  Examples leave the workers with masks bit-packed at the image size, not padded: a padded COCO
  batch of 2 is ~33 MB (M=100 packed canvases) against ~7 MB of examples, and the padding is
  mostly zeros that the consumer gets for free from ``np.zeros``.
  """
  examples = []
  for pos, epoch in zip(element["positions"], element["epochs"]):
    if pos < 0:
      continue  # Padding slot (evaluation).
    index = int(record_indices[pos])
    rng = np.random.default_rng(np.random.SeedSequence([seed, _AUGMENT_DOMAIN, int(epoch), index]))
    example = map_example(store[int(pos)], rng, cfg, training=training, record_index=index,
                          with_targets=with_targets)
    examples.append(batching.compact_example(example))
  return {"examples": examples, "bucket": element["bucket"]}


def _collate(element: Mapping[str, Any], *, cfg: LoaderConfig, batch_size: int,
             with_targets: bool) -> batching.Batch:
  """grain map function (runs in the consumer): examples -> padded :data:`Batch`."""
  inst = with_targets and cfg.instance_targets
  return batching.make_batch(
      element["examples"], tuple(int(v) for v in element["bucket"]), batch_size=batch_size,
      max_instances=cfg.max_instances, mask_format=cfg.mask_format if inst else "none",
      instance_targets=inst, semantic_targets=with_targets and cfg.semantic_targets,
      ignore_label=cfg.ignore_label)


def _process_info(process_index: int | None, process_count: int | None) -> tuple[int, int]:
  if process_index is None or process_count is None:
    import jax  # pylint: disable=g-import-not-at-top  (grain imports jax anyway)
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index {process_index} not in [0, {process_count})")
  return int(process_index), int(process_count)


def _dataset(source: Sequence[Mapping[str, Any]], records: Sequence[Record],
             record_indices: np.ndarray, cfg: LoaderConfig, *, seed: int, training: bool,
             with_targets: bool, batch_size: int, worker_count: int, read_threads: int,
             prefetch: int, worker_buffer_size: int) -> grain.IterDataset:
  """``source`` elements -> compact examples (in the workers) -> padded Batches."""
  ds = grain.MapDataset.source(source).map(functools.partial(
      _map_examples, store=_RecordStore(records), record_indices=record_indices, cfg=cfg,
      seed=int(seed), training=training, with_targets=with_targets))
  ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=read_threads,
                                            prefetch_buffer_size=prefetch))
  if worker_count > 0:
    # grain's process prefetch reads its absl flags; outside an absl app (tests, notebooks,
    # benchmarks) nobody parsed them and the read raises. Marking them parsed keeps defaults.
    from absl import flags  # pylint: disable=g-import-not-at-top
    if not flags.FLAGS.is_parsed():
      flags.FLAGS.mark_as_parsed()
    ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count,
                                                     per_worker_buffer_size=worker_buffer_size))
  return ds.map(functools.partial(_collate, cfg=cfg, batch_size=batch_size,
                                  with_targets=with_targets))


def build_train_loader(records: Sequence[Record],
                       *,
                       batch_size_per_process: int,
                       seed: int,
                       config: LoaderConfig,
                       process_index: int | None = None,
                       process_count: int | None = None,
                       worker_count: int = 0,
                       read_threads: int = 1,
                       prefetch_buffer_size: int = 2,
                       worker_buffer_size: int = 1) -> grain.DatasetIterator:
  """The infinite training iterator of Batches (see the module docstring).

  Args:
    records: dataset records (``coco`` format; ``sem_seg_file_name`` for semantic inputs).
    batch_size_per_process: images per process and step (all devices of the process).
    seed: the data seed (shuffling and augmentations); non-negative.
    config: transforms and batch layout.
    process_index: this process (default ``jax.process_index()``).
    process_count: processes (default ``jax.process_count()``).
    worker_count: grain worker processes (0 = map in this process). Results do not depend on it.
    read_threads: threads per process (or worker) prefetching elements; 0 = synchronous.
    prefetch_buffer_size: elements prefetched by those threads (an element is one batch of
      compact examples, ~3.5 MB per COCO image; padding happens on ``next``).
    worker_buffer_size: batches buffered per worker process.

  Returns:
    A grain ``DatasetIterator``: ``next(it)`` is a Batch; ``it.get_state()`` /
    ``it.set_state(state)`` checkpoint and restore the position; call ``it.close()`` when done
    if ``worker_count > 0``.
  """
  cfg = config
  pi, pc = _process_info(process_index, process_count)
  if batch_size_per_process <= 0:
    raise ValueError(f"batch_size_per_process must be positive, got {batch_size_per_process}")
  if seed < 0:
    raise ValueError(f"seed must be non-negative, got {seed}")
  indices = np.arange(len(records))
  if cfg.instance_targets:
    indices = np.array([i for i, r in enumerate(records)
                        if any(not a.get("iscrowd", 0) for a in r.get("annotations", ()))],
                       np.int64)
    logger.info("removed %d images with no usable annotations; %d images left",
                len(records) - len(indices), len(indices))
  if not len(indices):
    raise ValueError("no training images (after filtering images without annotations)")
  kept = [records[i] for i in indices]

  buckets = train_buckets(cfg)
  bounds = np.array([max_train_size(int(r["height"]), int(r["width"]), cfg) for r in kept],
                    np.int64).reshape(-1, 2)
  if cfg.group_by == "bucket":
    index = {b: k for k, b in enumerate(buckets)}
    keys = np.array([index[batching.choose_bucket(int(h), int(w), buckets)] for h, w in bounds],
                    np.int64)
  else:  # detectron2's aspect-ratio groups.
    keys = np.array([0 if int(r["width"]) > int(r["height"]) else 1 for r in kept], np.int64)
  counts = collections.Counter(buckets[k] if cfg.group_by == "bucket" else k for k in keys)
  logger.info("training buckets %s; images per group: %s", list(buckets), dict(counts))

  source = _TrainSource(seed, keys, bounds, buckets, cfg.group_by, batch_size_per_process, pi,
                        pc)
  return iter(_dataset(source, kept, indices, cfg, seed=seed, training=True, with_targets=True,
                       batch_size=batch_size_per_process, worker_count=worker_count,
                       read_threads=read_threads, prefetch=prefetch_buffer_size,
                       worker_buffer_size=worker_buffer_size))


@dataclasses.dataclass
class EvalLoader:
  """An iterable of evaluation Batches; each ``iter()`` starts a fresh pass.

  Attributes:
    dataset: the grain ``IterDataset``.
    num_batches: batches per pass (the same on every process).
    buckets: the distinct canvases used, in first-use order.
  """
  dataset: grain.IterDataset
  num_batches: int
  buckets: tuple[Size, ...]

  def __iter__(self) -> Iterator[batching.Batch]:
    return iter(self.dataset)

  def __len__(self) -> int:
    return self.num_batches


def build_eval_loader(records: Sequence[Record],
                      batch_size: int,
                      *,
                      config: LoaderConfig,
                      process_index: int | None = None,
                      process_count: int | None = None,
                      worker_count: int = 0,
                      padding: str = "bucket",
                      with_targets: bool = False,
                      read_threads: int = 1,
                      prefetch_buffer_size: int = 2,
                      worker_buffer_size: int = 1) -> EvalLoader:
  """Evaluation batches over every record (test-time resize only, no flip).

  Args:
    records: dataset records, empty images included.
    batch_size: images per process and batch.
    config: test sizes, batch layout.
    process_index, process_count: as :func:`build_train_loader`.
    worker_count: grain worker processes.
    padding: ``"bucket"`` (canvases from :func:`eval_buckets`: few compilations) or
      ``"exact"`` (``ceil32(h) x ceil32(w)`` per image, as detectron2 at batch size 1: exact
      border behaviour, one compilation per distinct size).
    with_targets: also emit the config's targets (crowd annotations dropped, no filtering).
    read_threads, prefetch_buffer_size, worker_buffer_size: as :func:`build_train_loader`.
  """
  cfg = config
  pi, pc = _process_info(process_index, process_count)
  if batch_size <= 0:
    raise ValueError(f"batch_size must be positive, got {batch_size}")
  if padding not in ("bucket", "exact"):
    raise ValueError(f"padding must be 'bucket' or 'exact', got {padding!r}")
  d = cfg.size_divisibility
  all_buckets = eval_buckets(cfg)
  sizes = [T.resize_shortest_edge_size(int(r["height"]), int(r["width"]), cfg.min_size_test,
                                       cfg.max_size_test) for r in records]
  if padding == "bucket":
    image_buckets = [batching.choose_bucket(h, w, all_buckets) for h, w in sizes]
  else:
    image_buckets = [(batching.ceil_to(h, d), batching.ceil_to(w, d)) for h, w in sizes]

  # Stream grouping in dataset order; each group's last batch is padded with -1 slots.
  g = batch_size * pc
  buffers: dict[Size, list[int]] = {}
  chunks: list[tuple[int, Size, list[int]]] = []  # (emit position, bucket, positions)
  for pos, b in enumerate(image_buckets):
    buf = buffers.setdefault(b, [])
    buf.append(pos)
    if len(buf) == g:
      chunks.append((pos, b, buf))
      buffers[b] = []
  for b, buf in buffers.items():
    if buf:
      chunks.append((len(records), b, buf + [-1] * (g - len(buf))))
  chunks.sort(key=lambda c: c[0])
  used = tuple(dict.fromkeys(c[1] for c in chunks))
  logger.info("evaluation: %d images, %d batches of %d per process, buckets %s", len(records),
              len(chunks), batch_size, list(used))

  part = slice(pi * batch_size, (pi + 1) * batch_size)
  source = [{"positions": np.array(positions[part], np.int64),
             "epochs": np.zeros(batch_size, np.int64), "bucket": np.array(b, np.int64)}
            for _, b, positions in chunks]
  ds = _dataset(source, records, np.arange(len(records)), cfg, seed=0, training=False,
                with_targets=with_targets, batch_size=batch_size, worker_count=worker_count,
                read_threads=read_threads, prefetch=prefetch_buffer_size,
                worker_buffer_size=worker_buffer_size)
  return EvalLoader(dataset=ds, num_batches=len(chunks), buckets=used)
