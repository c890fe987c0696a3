"""The zoo run configs (``configs/*.py``) against detectron2's resolved settings.

``EXPECTED`` is transcribed by hand from ``shared/spec/configs.md`` (§1 shared settings, §2
per-config tables, §3 schedules, §4 initial weights), independently of ``configs/common.py`` and
``pointrend_jax/modeling/zoo.py``: a typo in either fails here. The values are read where
training reads them: the solver through ``optimizer._solver``, the model and INPUT.* through
``zoo.model_config`` and the data pipeline's ``loader_config``.
"""

from __future__ import annotations

import importlib

import numpy as np
import pytest
from flax import nnx

from pointrend_jax.data import pipeline
from pointrend_jax.modeling import zoo
from pointrend_jax.training import optimizer

# configs.md §1: SOLVER.* shared by all six configs.
SHARED_SOLVER = dict(warmup_iters=1000, warmup_factor=0.001, gamma=0.1, momentum=0.9,
                     nesterov=False, weight_decay=1e-4, weight_decay_norm=0.0,
                     weight_decay_bias=None)
D2_IMAGENET = "detectron2://ImageNetPretrained/"
COCO_TRAIN = (640, 672, 704, 736, 768, 800)
COCO_3X = dict(base_lr=0.02, steps=(210000, 250000), max_iter=270000, ims_per_batch=16)

# configs.md §2 (and §4 for the weights), keyed by configs/<name>.py.
EXPECTED = {
    "r50_fpn_1x_coco": dict(
        stem="pointrend_rcnn_R_50_FPN_1x_coco", base_lr=0.02, steps=(60000, 80000),
        max_iter=90000, ims_per_batch=16, weights="MSRA/R-50.pkl", depth=50, num_groups=1,
        width_per_group=64, stride_in_1x1=True, pixel_std=(1.0, 1.0, 1.0), num_classes=80,
        freeze_at=2, min_size_train=COCO_TRAIN, max_size_train=1333, min_size_test=800,
        max_size_test=1333, crop=None, color_aug_ssd=False, train_source="coco"),
    "r50_fpn_3x_coco": dict(
        stem="pointrend_rcnn_R_50_FPN_3x_coco", **COCO_3X, weights="MSRA/R-50.pkl", depth=50,
        num_groups=1, width_per_group=64, stride_in_1x1=True, pixel_std=(1.0, 1.0, 1.0),
        num_classes=80, freeze_at=2, min_size_train=COCO_TRAIN, max_size_train=1333,
        min_size_test=800, max_size_test=1333, crop=None, color_aug_ssd=False,
        train_source="coco"),
    "r101_fpn_3x_coco": dict(
        stem="pointrend_rcnn_R_101_FPN_3x_coco", **COCO_3X, weights="MSRA/R-101.pkl",
        depth=101, num_groups=1, width_per_group=64, stride_in_1x1=True,
        pixel_std=(1.0, 1.0, 1.0), num_classes=80, freeze_at=2, min_size_train=COCO_TRAIN,
        max_size_train=1333, min_size_test=800, max_size_test=1333, crop=None,
        color_aug_ssd=False, train_source="coco"),
    "x101_32x8d_fpn_3x_coco": dict(
        stem="pointrend_rcnn_X_101_32x8d_FPN_3x_coco", **COCO_3X,
        weights="FAIR/X-101-32x8d.pkl", depth=101, num_groups=32, width_per_group=8,
        stride_in_1x1=False, pixel_std=(57.375, 57.120, 58.395), num_classes=80, freeze_at=2,
        min_size_train=COCO_TRAIN, max_size_train=1333, min_size_test=800, max_size_test=1333,
        crop=None, color_aug_ssd=False, train_source="coco"),
    "r50_fpn_1x_cityscapes": dict(
        stem="pointrend_rcnn_R_50_FPN_1x_cityscapes", base_lr=0.01, steps=(18000,),
        max_iter=24000, ims_per_batch=8, weights="MSRA/R-50.pkl", depth=50, num_groups=1,
        width_per_group=64, stride_in_1x1=True, pixel_std=(1.0, 1.0, 1.0), num_classes=8,
        freeze_at=2, min_size_train=(800, 832, 864, 896, 928, 960, 992, 1024),
        max_size_train=2048, min_size_test=1024, max_size_test=2048, crop=None,
        color_aug_ssd=False, train_source="cityscapes"),
    "semantic_r101_fpn_cityscapes": dict(
        stem="pointrend_semantic_R_101_FPN_1x_cityscapes", base_lr=0.01, steps=(40000, 55000),
        max_iter=65000, ims_per_batch=32, weights="MSRA/R-101.pkl", depth=101, num_groups=1,
        width_per_group=64, stride_in_1x1=True, pixel_std=(1.0, 1.0, 1.0), num_classes=19,
        freeze_at=0, min_size_train=(512, 768, 1024, 1280, 1536, 1792, 2048),
        max_size_train=4096, min_size_test=1024, max_size_test=2048,
        crop=dict(type="absolute", size=(512, 1024), single_category_max_area=0.75),
        color_aug_ssd=True, train_source="cityscapes"),
}


class _NoParams(nnx.Module):
  """A model without parameters: the schedule does not depend on the parameter tree."""


def _config(name: str):
  return importlib.import_module(f"configs.{name}").get_config()


def test_every_zoo_config_is_covered():
  assert set(EXPECTED) == set(zoo.ZOO_NAMES)
  assert {e["stem"] for e in EXPECTED.values()} == set(zoo.ZOO_STEMS.values())
  for name, e in EXPECTED.items():
    assert zoo.ZOO_STEMS[name] == e["stem"], name


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_solver_schedule_and_checkpointing(name):
  e, c = EXPECTED[name], _config(name)
  solver = dict(optimizer._solver(c))
  expected = dict(SHARED_SOLVER, base_lr=e["base_lr"], steps=e["steps"], max_iter=e["max_iter"])
  assert solver == expected, name
  assert c.train.batch_size == e["ims_per_batch"]
  # §3: 8 detectron2 GPUs (2 COCO, 1 Cityscapes-instance, 4 Cityscapes-semantic images each).
  assert c.train.num_replicas_d2 == 8
  assert c.train.batch_size // c.train.num_replicas_d2 == {16: 2, 8: 1, 32: 4}[e["ims_per_batch"]]
  assert c.train.checkpoint_every == 5000  # SOLVER.CHECKPOINT_PERIOD
  assert c.eval.every == 0  # TEST.EVAL_PERIOD 0: evaluate after training only
  assert c.model.zoo == name and c.model.num_classes == 0 and not c.model.overrides
  assert c.init.weights.replace("\\", "/").endswith("ImageNetPretrained/" + e["weights"])
  assert c.data.train.source == c.data.val.source == e["train_source"]


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_learning_rate_at_the_configs_md_iterations(name):
  """§3: linear warmup from 0.001 x base_lr over 1000 iterations, x0.1 at each step."""
  e = EXPECTED[name]
  _, schedule = optimizer.make_optimizer(_config(name), _NoParams())
  lr, steps = e["base_lr"], e["steps"]
  points = {0: lr * 0.001, 500: lr * (0.001 + 0.999 * 0.5), 999: lr * (0.001 + 0.999 * 0.999),
            1000: lr, steps[0] - 1: lr}
  for i, s in enumerate(steps):
    points[s] = lr * 0.1 ** (i + 1)
    points[s - 1] = lr * 0.1 ** i
  points[e["max_iter"] - 1] = lr * 0.1 ** len(steps)
  got = {t: float(schedule(t)) for t in points}
  np.testing.assert_allclose(list(got.values()), list(points.values()), rtol=1e-6,
                             err_msg=f"{name}: lr at {list(points)}")


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_model_and_input_settings(name):
  e, c = EXPECTED[name], _config(name)
  m = zoo.model_config(c.model)
  assert m == zoo.zoo_config(e["stem"])
  assert m.weights == D2_IMAGENET + e["weights"]
  assert m.pixel_mean == (103.530, 116.280, 123.675) and m.pixel_std == e["pixel_std"]
  assert m.input.format == "BGR"  # the mean and std above are in BGR order
  r = m.resnets
  assert (r.depth, r.num_groups, r.width_per_group, r.stride_in_1x1, r.freeze_at) == (
      e["depth"], e["num_groups"], e["width_per_group"], e["stride_in_1x1"], e["freeze_at"])
  assert (r.norm, r.stem_out_channels, r.res2_out_channels, r.res5_dilation) == (
      "FrozenBN", 64, 256, 1)
  assert (m.fpn.out_channels, m.fpn.norm) == (256, "")
  assert m.num_classes == m.point_head.num_classes == e["num_classes"]
  assert m.is_semantic == name.startswith("semantic")

  i = m.input
  assert i.min_size_train == e["min_size_train"] and i.min_size_train_sampling == "choice"
  assert (i.max_size_train, i.min_size_test, i.max_size_test) == (
      e["max_size_train"], e["min_size_test"], e["max_size_test"])
  assert i.random_flip == "horizontal" and i.color_aug_ssd == e["color_aug_ssd"]
  crop = e["crop"]
  assert i.crop_enabled == (crop is not None)
  if crop is not None:
    assert (i.crop_type, tuple(i.crop_size), i.crop_single_category_max_area) == (
        crop["type"], crop["size"], crop["single_category_max_area"])
  # What the data pipeline gets from them.
  lc = pipeline.loader_config(c.data, m)
  assert (lc.min_size_train, lc.max_size_train, lc.min_size_test, lc.max_size_test) == (
      e["min_size_train"], e["max_size_train"], e["min_size_test"], e["max_size_test"])
  assert lc.random_flip and lc.color_aug_ssd == e["color_aug_ssd"]
  assert lc.crop_size == (None if crop is None else crop["size"])
  if crop is not None:
    assert lc.crop_single_category_max_area == crop["single_category_max_area"]


@pytest.mark.parametrize("name", sorted(n for n in EXPECTED if not n.startswith("semantic")))
def test_instance_head_settings(name):
  """§1 instance-model table (the keys the heads and inference read)."""
  m = zoo.model_config(_config(name).model)
  assert m.input.mask_format == "bitmask"
  assert m.roi_heads.detections_per_image == 100
  assert (m.roi_heads.score_thresh_test, m.roi_heads.nms_thresh_test) == (0.05, 0.5)
  assert (m.roi_heads.batch_size_per_image, m.roi_heads.positive_fraction) == (512, 0.25)
  assert (m.rpn.pre_nms_topk_train, m.rpn.pre_nms_topk_test, m.rpn.post_nms_topk_train,
          m.rpn.post_nms_topk_test, m.rpn.nms_thresh) == (2000, 1000, 1000, 1000, 0.7)
  assert m.anchors.sizes == ((32,), (64,), (128,), (256,), (512,))
  assert m.anchors.aspect_ratios == (0.5, 1.0, 2.0) and m.anchors.offset == 0.0
  assert m.box_head.train_on_pred_boxes and m.box_head.pooler_resolution == 7
  assert (m.mask_head.pooler_resolution, m.mask_head.fc_dim, m.mask_head.num_fc,
          m.mask_head.output_side_resolution) == (14, 1024, 2, 7)
  p = m.point_head
  assert (p.fc_dim, p.num_fc, p.train_num_points, p.oversample_ratio,
          p.importance_sample_ratio, p.subdivision_steps, p.subdivision_num_points,
          p.coarse_pred_each_layer) == (256, 3, 196, 3, 0.75, 5, 784, True)


def test_semantic_head_settings():
  """§2.6 head keys."""
  m = zoo.model_config(_config("semantic_r101_fpn_cityscapes").model)
  s, p = m.sem_seg_head, m.point_head
  assert (s.in_features, s.convs_dim, s.common_stride, s.norm, s.ignore_value,
          s.loss_weight) == (("p2", "p3", "p4", "p5"), 128, 4, "GN", 255, 1.0)
  assert (p.fc_dim, p.num_fc, p.in_features, p.coarse_pred_each_layer) == (
      256, 3, ("p2",), False)
  assert (p.train_num_points, p.oversample_ratio, p.importance_sample_ratio,
          p.subdivision_steps, p.subdivision_num_points) == (2048, 3, 0.75, 2, 8192)
