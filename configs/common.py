"""Shared base of the training configs (``ml_collections``); each config file stays short.

Sections (``docs/architecture.md`` says which module reads each one):

* ``seed``: parameter init, point sampling and the data order.
* ``model``: ``zoo`` (a :data:`pointrend_jax.modeling.zoo.ZOO_NAMES` name, or "" for the
  R50-FPN COCO defaults of ``ModelConfig()``), ``num_classes`` (> 0: the class count of the
  heads, the dataset's number of categories; 0 keeps the zoo / ``overrides`` value; the
  command-line way, ``--config.model.num_classes=3``) and ``overrides`` mirroring
  ``ModelConfig``'s sections (``{"rpn": {"nms_thresh": 0.6}}``; ``num_classes`` sets both class
  counts). The ``input`` section (sizes, crop, colour augmentation, flip) also drives the data
  pipeline. Training and evaluation check that the dataset's category count equals the model's.
* ``init.weights``: "" (from scratch), a detectron2 ``.pkl`` / ``.pth`` (ImageNet backbone:
  only ``backbone.bottom_up`` is loaded; full model: strict) or a converted orbax directory
  (``python -m pointrend_jax.tools.convert``).
* ``data.train`` / ``data.val``: ``source`` (coco | cityscapes | tfds | synthetic),
  ``annotations`` (COCO JSON), ``images`` (COCO image folder), ``root`` (Cityscapes root, TFDS
  data dir, or the synthetic cache; "" = ``<workdir>/data``), ``split``; ``tfds_kind`` /
  ``tfds_name`` for TFDS. ``data.synthetic.*``: generator sizes.
* ``solver``: detectron2's SOLVER (see ``pointrend_jax.training.optimizer``); MAX_ITER is
  ``train.max_steps``.
* ``train``: ``max_steps``, ``batch_size`` (global, IMS_PER_BATCH), ``num_replicas_d2``
  (detectron2's GPU count, for its per-GPU loss normalisation), ``checkpoint_every``,
  ``log_every``, ``compute_dtype`` ("float32" or "bfloat16"; parameters stay float32), ...
* ``eval``: ``every`` (steps; 0 = after training only), ``num_images`` (0 = all),
  ``batch_size`` (per process), ``coarse_masks`` (also evaluate the 7x7 coarse masks),
  ``num_visualize`` (prediction / point-stage pictures written after the final evaluation).

Data and weights paths of the zoo configs default to ``$POINTREND_DATASETS`` (``datasets``) and
``$POINTREND_WEIGHTS`` (``weights``), detectron2's layout.
"""

from __future__ import annotations

import os

import ml_collections

# Published checkpoints and results: shared/spec/configs.md.
D2_URL = "https://dl.fbaipublicfiles.com/detectron2/"


def datasets_root() -> str:
  return os.environ.get("POINTREND_DATASETS", "datasets")


def weights_root() -> str:
  return os.environ.get("POINTREND_WEIGHTS", "weights")


def _split(source: str = "", split: str = "", annotations: str = "", images: str = "",
           root: str = "") -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(source=source, annotations=annotations, images=images,
                                        root=root, split=split, tfds_kind="", tfds_name="default"))


def base_config() -> ml_collections.ConfigDict:
  """Every key with detectron2's defaults (spec ``configs.md`` §1)."""
  c = ml_collections.ConfigDict()
  c.seed = 0
  # num_classes: 0 = the zoo / overrides value. A top-level key because ``overrides`` is an
  # empty locked ConfigDict in the zoo configs, so its keys cannot be set on the command line.
  c.model = ml_collections.ConfigDict(dict(zoo="", num_classes=0,
                                           overrides=ml_collections.ConfigDict()))
  c.init = ml_collections.ConfigDict(dict(weights=""))
  c.data = ml_collections.ConfigDict(dict(
      train=_split(), val=_split(),
      synthetic=dict(num_train=400, num_val=100, image_size=(128, 192), seed=0),
      max_instances=100,  # instance slots per image (more: the largest are kept)
      group_by="bucket",  # or "orientation" (detectron2's aspect-ratio groups)
      num_workers=0,  # grain worker processes (0: map in a thread of the main process)
      eval_padding="bucket",  # or "exact" (detectron2's per-image padding)
  ))
  c.solver = ml_collections.ConfigDict(dict(
      base_lr=0.02, steps=(60000, 80000), warmup_iters=1000, warmup_factor=0.001, gamma=0.1,
      momentum=0.9, nesterov=False, weight_decay=1e-4, weight_decay_norm=0.0))
  c.train = ml_collections.ConfigDict(dict(
      max_steps=90000, batch_size=16, num_replicas_d2=8, checkpoint_every=5000, log_every=20,
      max_to_keep=3, async_checkpointing=True, progress_bar=True,
      compute_dtype="float32",  # or "bfloat16" (bf16 activations on GPU/TPU; slower on CPU)
      debug_step_delay_s=0.0,  # tests only: sleep before each step (preemption tests)
  ))
  c.eval = ml_collections.ConfigDict(dict(
      every=0, num_images=0, batch_size=1, coarse_masks=True, num_visualize=0,
      mask_threshold=0.5))
  return c


def coco_data(c: ml_collections.ConfigDict, root: str | None = None) -> None:
  """COCO 2017 as detectron2 lays it out: ``root/annotations``, ``root/{train,val}2017``."""
  root = os.path.join(datasets_root(), "coco") if root is None else root
  for name, split in (("train", "train2017"), ("val", "val2017")):
    c.data[name] = _split("coco", split,
                          os.path.join(root, "annotations", f"instances_{split}.json"),
                          os.path.join(root, split), root)


def cityscapes_data(c: ml_collections.ConfigDict, root: str | None = None) -> None:
  """Cityscapes fine (``root/leftImg8bit``, ``root/gtFine``)."""
  root = os.path.join(datasets_root(), "cityscapes") if root is None else root
  c.data.train = _split("cityscapes", "train", root=root)
  c.data.val = _split("cityscapes", "val", root=root)


def imagenet_weights(name: str) -> str:
  """Local path of ``detectron2://ImageNetPretrained/<name>`` (download from :data:`D2_URL`)."""
  return os.path.join(weights_root(), "ImageNetPretrained", name)


def zoo_schedule(c: ml_collections.ConfigDict, *, zoo: str, weights: str, batch_size: int,
                 base_lr: float, steps: tuple[int, ...], max_steps: int,
                 num_replicas_d2: int = 8) -> ml_collections.ConfigDict:
  """A model-zoo schedule (SOLVER.* of spec ``configs.md`` §2)."""
  c.model.zoo = zoo
  c.init.weights = imagenet_weights(weights)
  c.train.batch_size = batch_size
  c.train.num_replicas_d2 = num_replicas_d2
  c.train.max_steps = max_steps
  c.solver.base_lr = base_lr
  c.solver.steps = tuple(steps)
  return c
