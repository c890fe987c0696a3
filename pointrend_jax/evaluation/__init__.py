"""Evaluation: :func:`pointrend_jax.evaluation.inference.inference_on_dataset` (a predict program
over an evaluation loader into a dataset evaluator) and the metric evaluators it wraps
(``add(...)`` per image, then ``compute() -> dict[str, float]``, percent)."""

from pointrend_jax.evaluation.coco_eval import (COCOEvaluator, evaluate_coco_files,
                                                instances_to_coco_results, write_metrics_json,
                                                write_results_json)
from pointrend_jax.evaluation.sem_seg import SemSegEvaluator, confusion_matrix
