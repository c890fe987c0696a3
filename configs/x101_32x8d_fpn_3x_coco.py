"""PointRend X101-32x8d-FPN 3x on COCO (``pointrend_rcnn_X_101_32x8d_FPN_3x_coco``)."""

from configs import common


def get_config():
  """ResNeXt-101 32x8d FPN, 3x schedule (270k steps, batch 16, lr 0.02), COCO 2017.

  Command::

    python launch.py --config configs/x101_32x8d_fpn_3x_coco.py --workdir runs/x101_3x

  Data: as ``r50_fpn_1x_coco``; init: FAIR ImageNet X-101-32x8d
  (https://dl.fbaipublicfiles.com/detectron2/ImageNetPretrained/FAIR/X-101-32x8d.pkl; the zoo
  config sets PIXEL_STD [57.375, 57.120, 58.395] and STRIDE_IN_1X1 False).
  Hardware: detectron2 trains it on 8 V100s; any device count here.
  Expected: COCO val2017 mask AP 41.1 (model zoo, checkpoint 28119989).
  """
  c = common.base_config()
  common.coco_data(c)
  common.zoo_schedule(c, zoo="x101_32x8d_fpn_3x_coco", weights="FAIR/X-101-32x8d.pkl",
                      batch_size=16, base_lr=0.02, steps=(210000, 250000), max_steps=270000)
  return c
