"""Benchmarks of NMS at the sizes the model uses (see ``bench/ops.py``).

Inputs are synthetic but shaped like the real ones: boxes come in overlapping clusters around
"objects" (so NMS really suppresses), scores are distinct.

* RPN: per-level NMS (IoU 0.7) vmapped over 5 levels of 1,000 (test) or 2,000 (train) pre-NMS
  boxes. ``keep1000`` keeps at most 1,000 per level, which is exact for detectron2's final
  top-1,000 over all levels (the 1,001st survivor of a level has 1,000 better boxes beside it).
* Box inference: class-aware NMS (IoU 0.5) of the (proposal, class) candidates above the 0.05
  score threshold, top 100 kept; once as a tight 6,000-candidate list, once as the static
  1000 x 80 = 80,000 slots with 6,000 valid, which is what a jitted model without a host sync
  passes.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from pointrend_jax.ops import nms as nms_ops

IMAGE_HW = (800, 1200)


def _clustered_boxes(rng: np.random.Generator, n: int, n_obj: int, scale: float,
                     hw=IMAGE_HW) -> tuple[np.ndarray, np.ndarray]:
  h, w = hw
  centres = rng.uniform([0, 0], [w, h], (n_obj, 2))
  sizes = scale * np.exp(rng.normal(0, 0.5, (n_obj, 2)))
  obj = rng.integers(0, n_obj, n)
  ctr = centres[obj] + rng.normal(0, 0.15, (n, 2)) * sizes[obj]
  wh = sizes[obj] * np.exp(rng.normal(0, 0.15, (n, 2)))
  boxes = np.concatenate([ctr - wh / 2, ctr + wh / 2], 1)
  boxes[:, 0::2] = boxes[:, 0::2].clip(0, w)
  boxes[:, 1::2] = boxes[:, 1::2].clip(0, h)
  return boxes.astype(np.float32), rng.permutation(n).astype(np.float32) / n


def _rpn_inputs(rng, per_level: int):
  data = [_clustered_boxes(rng, per_level, per_level // 25, 32 * 2 ** lvl) for lvl in range(5)]
  return (jnp.asarray(np.stack([d[0] for d in data])), jnp.asarray(np.stack([d[1] for d in data])),
          jnp.ones((5, per_level), bool))


def _rpn_nms(max_output: int) -> Callable[..., Any]:
  def fn(boxes, scores, valid):
    return jax.vmap(lambda b, s, v: nms_ops.nms(b, s, 0.7, max_output, v))(boxes, scores, valid)
  return fn


def _det_inputs(rng, n_valid: int, n_slots: int):
  boxes, _ = _clustered_boxes(rng, n_slots, 40, 120.0)
  # Detection scores: a few confident candidates, many just above the 0.05 threshold.
  scores = (0.05 + 0.95 * rng.random(n_slots) ** 4).astype(np.float32)
  classes = np.minimum(rng.geometric(0.15, n_slots) - 1, 79).astype(np.int32)
  valid = np.zeros(n_slots, bool)
  valid[rng.permutation(n_slots)[:n_valid]] = True
  return jnp.asarray(boxes), jnp.asarray(scores), jnp.asarray(classes), jnp.asarray(valid)


def _det_nms(boxes, scores, classes, valid):
  return nms_ops.batched_nms(boxes, scores, classes, 0.5, 100, valid)


def benchmarks() -> list[tuple[str, Callable[..., Any], tuple[Any, ...]]]:
  """``(name, fn, args)`` entries; ``fn`` is jitted by the harness with all ``args`` traced."""
  rng = np.random.default_rng(0)
  rpn_test = _rpn_inputs(rng, 1000)
  rpn_train = _rpn_inputs(rng, 2000)
  return [
      ("nms_rpn_5x1000_iou0.7", _rpn_nms(1000), rpn_test),
      ("nms_rpn_5x2000_iou0.7_keep1000", _rpn_nms(1000), rpn_train),
      ("nms_rpn_5x2000_iou0.7_keepall", _rpn_nms(2000), rpn_train),
      ("batched_nms_det_6000cand_80cls_top100", _det_nms, _det_inputs(rng, 6000, 6000)),
      ("batched_nms_det_80000slots_6000valid_top100", _det_nms, _det_inputs(rng, 6000, 80000)),
  ]

