"""PointRend R50-FPN 3x on COCO (detectron2 ``pointrend_rcnn_R_50_FPN_3x_coco``)."""

from configs import common


def get_config():
  """R50-FPN, 3x schedule (270k steps, batch 16, lr 0.02, drops at 210k and 250k), COCO 2017.

  Command::

    python launch.py --config configs/r50_fpn_3x_coco.py --workdir runs/r50_3x

  Data / init: as ``r50_fpn_1x_coco`` (ImageNet MSRA R-50).
  Hardware: detectron2 trains it on 8 V100s (~3 days); any device count here.
  Expected: COCO val2017 mask AP 38.3 (model zoo, model id 164955410).
  """
  c = common.base_config()
  common.coco_data(c)
  common.zoo_schedule(c, zoo="r50_fpn_3x_coco", weights="MSRA/R-50.pkl", batch_size=16,
                      base_lr=0.02, steps=(210000, 250000), max_steps=270000)
  return c
