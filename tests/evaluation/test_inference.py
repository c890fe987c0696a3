"""inference_on_dataset with a stand-in predict program: host postprocess at the original size,
padding images skipped, COCO instance AP and semantic mIoU."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from pointrend_jax.evaluation.inference import (InstanceEvaluator, SemanticEvaluator,
                                                inference_on_dataset)

GT = {
    "images": [{"id": 1, "height": 20, "width": 30, "file_name": "a.png"}],
    "annotations": [{"id": 1, "image_id": 1, "category_id": 7, "bbox": [4, 6, 12, 8],
                     "area": 96, "iscrowd": 0,
                     "segmentation": [[4, 6, 16, 6, 16, 14, 4, 14]]}],
    "categories": [{"id": 7, "name": "thing"}],
}


def _instance_program(images, sizes):
  b = len(images)
  # The model saw the image at twice its size: boxes are scaled by 0.5 to the original.
  return dict(boxes=np.tile(np.array([[[8., 12., 32., 28.], [0., 0., 0., 0.]]], np.float32),
                            (b, 1, 1)),
              scores=np.tile(np.array([[0.9, 0.0]], np.float32), (b, 1)),
              classes=np.zeros((b, 2), np.int32), valid=np.tile([[True, False]], (b, 1)),
              mask_probs=np.ones((b, 2, 28, 28), np.float32),
              coarse_probs=np.ones((b, 2, 7, 7), np.float32),
              # stages=True: per subdivision step tuples
              coarse_logits=np.zeros((b, 2, 7, 7), np.float32),
              init_logits=np.zeros((b, 2, 3, 3), np.float32),
              upsampled=(np.zeros((b, 2, 6, 6), np.float32),),
              indices=(np.zeros((b, 2, 4), np.int32),), points=(np.zeros((b, 2, 4, 2)),),
              point_logits=(np.ones((b, 2, 4), np.float32),))


def test_instances_coco_ap_and_coarse(tmp_path):
  records = [{"image_id": 1, "height": 20, "width": 30}]
  ev = InstanceEvaluator(records, ["thing"], coco_gt=GT, coarse=True, output_dir=str(tmp_path),
                         num_visualize=1)
  batch = dict(image=np.zeros((2, 64, 64, 3), np.uint8),
               image_size=np.array([[40, 60], [64, 64]], np.int32),
               orig_size=np.array([[20, 30], [64, 64]], np.int32),
               record_index=np.array([0, 0]), valid=np.array([True, False]))
  metrics = inference_on_dataset(_instance_program, [batch], ev)
  for task in ("bbox", "segm", "segm_coarse"):
    assert metrics[f"eval/{task}/AP"] == pytest.approx(100.0), task
  (vis,) = ev.visuals
  assert len(vis["results"]["segm"]) == 1 and vis["stages"].final.shape == (1, 6, 6)
  assert sorted(p.name for p in tmp_path.iterdir()) == [
      "coco_instances_results.json", "coco_instances_results_coarse.json"]


def test_semantic_miou_at_original_size(tmp_path):
  labels = [np.zeros((6, 8), np.uint8), np.ones((6, 8), np.uint8)]
  labels[0][:, 4:] = 1
  records = []
  for i, lab in enumerate(labels):
    Image.fromarray(lab).save(tmp_path / f"{i}.png")
    records.append({"image_id": i, "sem_seg_file_name": str(tmp_path / f"{i}.png")})

  def program(images, sizes):
    # Logits at half the original size on a padded 8x8 canvas; padding holds garbage.
    logits = np.full((len(images), 8, 8, 2), 9.0, np.float32)
    logits[:, :3, :4] = np.eye(2, dtype=np.float32)[np.stack(labels)[:, ::2, ::2]] * 4 - 2
    return {"logits": logits}

  batch = dict(image=np.zeros((2, 8, 8, 3), np.uint8), image_size=np.array([[3, 4]] * 2),
               orig_size=np.array([[6, 8]] * 2), record_index=np.array([0, 1]),
               valid=np.array([True, True]))
  metrics = inference_on_dataset(program, [batch], SemanticEvaluator(records, ["a", "b"]))
  assert metrics["eval/sem_seg/mIoU"] > 50.0
