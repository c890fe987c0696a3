"""Semantic PointRend on the synthetic shapes dataset, from scratch on a CPU."""

from configs import common


def get_config():
  """Semantic FPN + PointRend, R18-GN, 6 classes (background + 5 shapes), from scratch.

  Command::

    python launch.py --config configs/synthetic_semantic.py --workdir runs/synthetic_semantic

  Hardware: 2 CPU cores, no accelerator: about 7 minutes (1500 steps of 8 images).
  Expected (measured): val mIoU 28.9 (15.9 at step 500, 20.8 at 1000, 28.9 at 1500; it jumps
  after the lr drops and is still far from converged -- a from-scratch semantic model learns
  the shape classes much more slowly than the instance model).
  """
  c = common.base_config()
  c.data.train.update(source="synthetic", split="train")
  c.data.val.update(source="synthetic", split="val")
  c.data.synthetic.update(num_train=400, num_val=50, image_size=(128, 128), seed=0)
  c.model.zoo = "semantic_r101_fpn_cityscapes"
  c.model.overrides = dict(
      num_classes=6,
      pixel_std=(57.375, 57.12, 58.395),
      resnets=dict(depth=18, norm="GN", freeze_at=0, stem_out_channels=32, res2_out_channels=32),
      fpn=dict(out_channels=64, norm="GN"),
      sem_seg_head=dict(convs_dim=64),
      point_head=dict(fc_dim=64, train_num_points=256, subdivision_steps=2,
                      subdivision_num_points=1024),
      input=dict(min_size_train=(128,), max_size_train=128, min_size_test=128,
                 max_size_test=128, crop_enabled=False, color_aug_ssd=False),
  )
  c.solver.update(base_lr=0.05, steps=(1100, 1350), warmup_iters=100)
  c.train.update(max_steps=1500, batch_size=8, num_replicas_d2=2, checkpoint_every=500,
                 log_every=20)
  c.eval.update(every=500, num_images=50, batch_size=8, coarse_masks=False)
  return c
