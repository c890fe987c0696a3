"""PointRend R50-FPN 1x on COCO (detectron2 ``pointrend_rcnn_R_50_FPN_1x_coco``)."""

from configs import common


def get_config():
  """R50-FPN, 1x schedule (90k steps, batch 16, lr 0.02, drops at 60k and 80k), COCO 2017.

  Command::

    python launch.py --config configs/r50_fpn_1x_coco.py --workdir runs/r50_1x

  Data: ``$POINTREND_DATASETS/coco/{annotations,train2017,val2017}``; init: the MSRA ImageNet
  R-50 (``$POINTREND_WEIGHTS/ImageNetPretrained/MSRA/R-50.pkl``, from
  https://dl.fbaipublicfiles.com/detectron2/ImageNetPretrained/MSRA/R-50.pkl).
  Hardware: detectron2 trains it on 8 V100s (2 images each, ~1 day); here any device count
  (the loss normalisation follows detectron2's 8 GPUs through ``train.num_replicas_d2``),
  e.g. 8 GPUs with ``--config.eval.batch_size=1`` per process.
  Expected: COCO val2017 mask AP 36.2 (model zoo, model id 164254221).
  """
  c = common.base_config()
  common.coco_data(c)
  common.zoo_schedule(c, zoo="r50_fpn_1x_coco", weights="MSRA/R-50.pkl", batch_size=16,
                      base_lr=0.02, steps=(60000, 80000), max_steps=90000)
  return c
