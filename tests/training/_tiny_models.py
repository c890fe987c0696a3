"""Minutes-on-CPU models for the training tests, as run configs in the layout of
``configs/*.py`` (``model.zoo`` / ``num_classes`` / ``overrides``, ``solver``, ``train``), built
by the package's one builder (``zoo.model_config`` -> ``meta_arch.build_model``)."""

from __future__ import annotations

import ml_collections
from flax import nnx

from pointrend_jax.modeling import meta_arch, zoo


def _run_config(model: dict) -> ml_collections.ConfigDict:
  """detectron2's schedule shape (warmup, one lr drop) scaled down; batch 4 on 2 virtual GPUs."""
  return ml_collections.ConfigDict(dict(
      seed=0, model=model,
      solver=dict(base_lr=0.01, steps=(80,), warmup_iters=10, warmup_factor=0.001, gamma=0.1,
                  momentum=0.9, weight_decay=1e-4, weight_decay_norm=0.0),
      train=dict(max_steps=100, batch_size=4, num_replicas_d2=2, log_every=10,
                 checkpoint_every=50, max_to_keep=3, async_checkpointing=True,
                 progress_bar=True),
      eval=dict(every=0)))


def tiny_instance_config() -> ml_collections.ConfigDict:
  """R18-GN FPN-64, 3 classes, anchors 4x smaller than COCO's for ~64 px images, small ROI
  and point counts."""
  return _run_config(dict(zoo="", num_classes=3, overrides=dict(
      resnets=dict(depth=18, norm="GN", freeze_at=0, res2_out_channels=64),
      fpn=dict(out_channels=64),
      anchors=dict(sizes=((8.0,), (16.0,), (32.0,), (64.0,), (128.0,))),
      rpn=dict(pre_nms_topk_train=200, post_nms_topk_train=64, pre_nms_topk_test=200,
               post_nms_topk_test=64, batch_size_per_image=64),
      roi_heads=dict(batch_size_per_image=64, detections_per_image=16),
      box_head=dict(fc_dim=128),
      mask_head=dict(conv_dim=64, fc_dim=128),
      point_head=dict(fc_dim=64, train_num_points=196, subdivision_steps=3,
                      subdivision_num_points=196))))


def tiny_semantic_config() -> ml_collections.ConfigDict:
  """Semantic PointRend: R18-GN FPN, 4 classes, 64 training / subdivision points."""
  return _run_config(dict(zoo="", num_classes=4, overrides=dict(
      meta_architecture="SemanticSegmentor",
      resnets=dict(depth=18, norm="GN", freeze_at=0, res2_out_channels=64),
      point_head=dict(coarse_pred_each_layer=False, train_num_points=64, subdivision_steps=2,
                      subdivision_num_points=64))))


def tiny_model(config: ml_collections.ConfigDict, *, seed: int | None = None, **build_kwargs):
  """The randomly initialised model of ``config.model`` (seed ``config.seed`` by default)."""
  seed = int(config.seed) if seed is None else seed
  return meta_arch.build_model(zoo.model_config(config.model), rngs=nnx.Rngs(seed),
                               **build_kwargs)
