"""Hand-made tiny batches shared by the training tests and their subprocess workers.

Plain numpy, importable from pytest (tests/training is on ``sys.path``) and from the worker
scripts run as ``python tests/training/<script>.py``.
"""

import numpy as np


def instance_batch(empty=()):
  """4 images (2 distinct, repeated), 64x64 canvas, unpadded sizes < canvas, 2 instances each.

  Images whose index is in ``empty`` have no instances. Returns the instance training keys of a
  packed-mask :func:`pointrend_jax.data.batching.make_batch` batch.
  """
  from pointrend_jax.data import batching
  from pointrend_jax.training.losses_instance import INSTANCE_BATCH_KEYS
  rng = np.random.default_rng(0)
  exs = []
  for i in range(4):
    j = i % 2
    h, w = ((56, 60), (64, 48))[j]
    img = rng.integers(0, 50, (h, w, 3)).astype(np.uint8)
    yy, xx = np.mgrid[:h, :w] + 0.5
    m1 = ((xx - 20) / 12) ** 2 + ((yy - 22) / 9) ** 2 < 1
    m2 = (xx > 28 + 4 * j) & (xx < 46) & (yy > 30) & (yy < 50)
    img[m1] = (200, 40, 40)
    img[m2] = (40, 200, 60)
    masks = np.stack([m1, m2])
    boxes = []
    for m in masks:
      ys, xs = np.nonzero(m)
      boxes.append([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
    ex = dict(image=img, image_size=(h, w), gt_boxes=np.array(boxes, np.float32),
              gt_classes=np.array([0, 1 + j]), gt_masks=masks)
    if i in empty:
      ex.update(gt_boxes=np.zeros((0, 4), np.float32), gt_classes=np.zeros(0, int),
                gt_masks=np.zeros((0, h, w), bool))
    exs.append(ex)
  batch = batching.make_batch(exs, (64, 64), max_instances=3)
  return {k: batch[k] for k in INSTANCE_BATCH_KEYS}


def semantic_pair(hw: int = 32) -> tuple[np.ndarray, np.ndarray]:
  """Two ``hw x hw`` images with 4 label regions: ``(images [2, hw, hw, 3] uint8,
  labels [2, hw, hw] uint8)``."""
  rng = np.random.default_rng(0)
  labels = np.zeros((2, hw, hw), np.uint8)
  labels[0, :, hw // 2:] = 1
  labels[1, hw // 2:] = 2
  labels[1, :8, :8] = 3
  images = (labels[..., None] * 60 + rng.integers(0, 40, (2, hw, hw, 3))).astype(np.uint8)
  return images, labels
