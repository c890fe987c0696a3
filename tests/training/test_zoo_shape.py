"""Two train steps of the real ``r50_fpn_1x_coco`` model at a zoo-like shape: ResNet-50 FPN with
FrozenBN, 2000 pre-NMS / 1000 post-NMS RPN proposals per image, 512 sampled ROIs per image, the
PointRend mask head with 14x14 training points, 2 images on a 640x800 canvas in one detectron2
replica. Losses are finite and fall on a repeated batch, and the second step reuses the first
step's program."""

import numpy as np
import pytest


def _batch():
  """2 images (640x800 and 600x800) with 12 filled ellipses each, COCO's 80 classes."""
  from pointrend_jax.data import batching
  from pointrend_jax.training.losses_instance import INSTANCE_BATCH_KEYS
  rng = np.random.default_rng(0)
  examples = []
  for h, w in ((640, 800), (600, 800)):
    image = rng.integers(0, 60, (h, w, 3), dtype=np.uint8)
    yy, xx = np.mgrid[:h, :w] + 0.5
    masks, boxes = [], []
    for _ in range(12):
      cy, cx = rng.uniform(60, h - 60), rng.uniform(60, w - 60)
      ry, rx = rng.uniform(12, 60, 2)
      m = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 < 1
      ys, xs = np.nonzero(m)
      boxes.append([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
      masks.append(m)
      image[m] = rng.integers(100, 256, 3, dtype=np.uint8)
    examples.append(dict(image=image, image_size=(h, w), gt_boxes=np.array(boxes, np.float32),
                         gt_classes=rng.integers(0, 80, 12), gt_masks=np.stack(masks)))
  batch = batching.make_batch(examples, (640, 800), max_instances=100, mask_format="packed")
  return {k: batch[k] for k in INSTANCE_BATCH_KEYS}


@pytest.mark.slow
def test_two_zoo_shape_steps_are_finite_fall_and_compile_once():
  import types

  import jax
  from pointrend_jax.checkpoint.d2_model import load_d2_model, random_d2_state
  from pointrend_jax.modeling.meta_arch import abstract_model
  from pointrend_jax.modeling.zoo import zoo_config
  from pointrend_jax.training import mesh as mesh_lib
  from pointrend_jax.training import optimizer
  from pointrend_jax.training import step as step_lib
  from pointrend_jax.training.losses_instance import instance_loss_fn

  cfg = zoo_config("r50_fpn_1x_coco")
  assert (cfg.rpn.pre_nms_topk_train, cfg.rpn.post_nms_topk_train,
          cfg.roi_heads.batch_size_per_image) == (2000, 1000, 512)
  model = abstract_model(cfg)
  load_d2_model(model, random_d2_state(model, 0, cfg.pixel_std))
  # The zoo's optimizer with a constant lr (no warmup), so two steps move the loss.
  config = types.SimpleNamespace(
      solver=dict(base_lr=0.01, steps=(), warmup_iters=0, momentum=0.9, weight_decay=1e-4),
      train=types.SimpleNamespace(max_steps=2))
  tx, _ = optimizer.make_optimizer(config, model)
  mesh = mesh_lib.make_mesh(jax.devices()[:1])
  state = step_lib.create_train_state(model, tx, mesh=mesh)
  step = step_lib.make_train_step(instance_loss_fn, tx, mesh=mesh, num_groups=1)
  batch = _batch()
  metrics = []
  for _ in range(3):
    state, m = step(state, batch)
    metrics.append({k: float(v) for k, v in jax.device_get(m).items()})
  for m in metrics:
    assert all(np.isfinite(v) for v in m.values()), m
    assert m["loss_mask"] > 0 and m["loss_mask_point"] > 0 and m["loss_rpn_cls"] > 0
  assert metrics[2]["loss"] < metrics[0]["loss"], [m["loss"] for m in metrics]
  assert step.num_traces == 1 and step.num_compiled == 1
