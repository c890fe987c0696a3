"""PointRend semantic FPN R101 on Cityscapes (``pointrend_semantic_R_101_FPN_1x_cityscapes``)."""

from configs import common


def get_config():
  """Semantic FPN + PointRend, R101, 65k steps, batch 32 (4 per detectron2 GPU), lr 0.01.

  Command::

    python launch.py --config configs/semantic_r101_fpn_cityscapes.py --workdir runs/sem_r101

  Data: Cityscapes fine with ``*_gtFine_labelTrainIds.png`` (make them with
  ``pointrend_jax.data.cityscapes.write_train_id_label_maps(root, split)``); 512x1024 crops
  (single-category area <= 0.75), SSD colour augmentation, flip. Init: ImageNet MSRA R-101,
  FREEZE_AT 0. LR drops at 40k and 55k.
  Hardware: detectron2 trains it on 8 V100s; any device count here.
  Expected: Cityscapes val mIoU 78.9 (model zoo, model id 202576688).
  """
  c = common.base_config()
  common.cityscapes_data(c)
  common.zoo_schedule(c, zoo="semantic_r101_fpn_cityscapes", weights="MSRA/R-101.pkl",
                      batch_size=32, base_lr=0.01, steps=(40000, 55000), max_steps=65000)
  c.eval.coarse_masks = False
  return c
