"""PointRend R50-FPN 1x on Cityscapes instances (``pointrend_rcnn_R_50_FPN_1x_cityscapes``)."""

from configs import common


def get_config():
  """R50-FPN, 24k steps, batch 8 (1 image per detectron2 GPU), lr 0.01 dropped at 18k.

  Command::

    python launch.py --config configs/r50_fpn_1x_cityscapes.py --workdir runs/r50_cityscapes

  Data: Cityscapes fine, ``$POINTREND_DATASETS/cityscapes/{leftImg8bit,gtFine}`` (polygons
  JSON for training, ``*_gtFine_instanceIds.png`` for the official instance AP); init: ImageNet
  MSRA R-50 (not COCO). Inputs: short side 800..1024 (train), 1024 (test), max 2048.
  Hardware: detectron2 trains it on 8 V100s; any device count here.
  Expected: Cityscapes val mask AP 35.9 (model zoo, model id 164255101).
  """
  c = common.base_config()
  common.cityscapes_data(c)
  common.zoo_schedule(c, zoo="r50_fpn_1x_cityscapes", weights="MSRA/R-50.pkl", batch_size=8,
                      base_lr=0.01, steps=(18000,), max_steps=24000)
  return c
