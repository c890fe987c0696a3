"""PointRend R101-FPN 3x on COCO (detectron2 ``pointrend_rcnn_R_101_FPN_3x_coco``)."""

from configs import common


def get_config():
  """R101-FPN, 3x schedule (270k steps, batch 16, lr 0.02, drops at 210k and 250k), COCO 2017.

  Command::

    python launch.py --config configs/r101_fpn_3x_coco.py --workdir runs/r101_3x

  Data: as ``r50_fpn_1x_coco``; init: ImageNet MSRA R-101
  (https://dl.fbaipublicfiles.com/detectron2/ImageNetPretrained/MSRA/R-101.pkl).
  Hardware: detectron2 trains it on 8 V100s; any device count here.
  Expected: COCO val2017 mask AP 40.1 (model zoo, checkpoint 28119983).
  """
  c = common.base_config()
  common.coco_data(c)
  common.zoo_schedule(c, zoo="r101_fpn_3x_coco", weights="MSRA/R-101.pkl", batch_size=16,
                      base_lr=0.02, steps=(210000, 250000), max_steps=270000)
  return c
