"""Evaluation: :func:`~pointrend_jax.evaluation.inference.inference_on_dataset` runs a predict
program over an evaluation loader into a dataset evaluator, which wraps the metric evaluators
(``add(...)`` per image, then ``compute() -> dict[str, float]``, percent):

* :mod:`~pointrend_jax.evaluation.coco_eval`: COCO box and mask AP (pycocotools or faster-coco-eval);
* :mod:`~pointrend_jax.evaluation.cityscapes_eval`: the official Cityscapes instance AP and
  pixel metrics;
* :mod:`~pointrend_jax.evaluation.sem_seg`: confusion-matrix mIoU.
"""
