"""Parity checks of box coding, NMS and mask pasting against ``ops.npz`` (detectron2 goldens).

Each check reads the ``in_*`` arrays and returns the golden's layout and dtype. Parameters (box
coding weights, IoU threshold, mask size) are parsed from the golden array's name, so an
``ops.npz`` regenerated with other random inputs of the same layout works unchanged.
"""

from __future__ import annotations

import re

import numpy as np

from pointrend_jax.postprocess import paste_masks
from pointrend_jax.ops import boxes as box_ops
from pointrend_jax.ops import nms as nms_ops
from pointrend_jax.parity.compare import FLOAT_TOL, Check, Golden

__all__ = ["CHECKS"]


def _weights(name: str) -> tuple[float, ...]:
  """``out_get_deltas_w10_10_5_5`` -> ``(10., 10., 5., 5.)``."""
  m = re.search(r"_w(\d+(?:_\d+){3})$", name)
  if not m:
    raise ValueError(f"no box weights in {name!r}")
  return tuple(float(v) for v in m.group(1).split("_"))


def _iou_threshold(name: str) -> float:
  """``out_nms_keep_iou05`` -> ``0.5`` (first digit is the integer part)."""
  m = re.search(r"_iou(\d)(\d+)$", name)
  if not m:
    raise ValueError(f"no IoU threshold in {name!r}")
  return float(f"{m.group(1)}.{m.group(2)}")


def _get_deltas(name: str):
  weights = _weights(name)
  return lambda g: np.asarray(box_ops.encode_boxes(g["in_b2b_src"], g["in_b2b_target"], weights))


def _apply_deltas(name: str):
  weights = _weights(name)
  return lambda g: np.asarray(box_ops.decode_boxes(g["in_b2b_deltas"], g["in_b2b_src"], weights))


def _kept(keep, keep_valid) -> np.ndarray:
  # torchvision returns int64 indices.
  return np.asarray(keep)[np.asarray(keep_valid)].astype(np.int64)


def _nms(name: str):
  thr = _iou_threshold(name)

  def compute(g: Golden) -> np.ndarray:
    n = g["in_nms_scores"].shape[0]
    return _kept(*nms_ops.nms(g["in_nms_boxes"], g["in_nms_scores"], thr, n))
  return compute


def _batched_nms(name: str):
  thr = _iou_threshold(name)

  def compute(g: Golden) -> np.ndarray:
    n = g["in_nms_scores"].shape[0]
    # Exact per-class semantics; torchvision used its coordinate trick for these 36 boxes,
    # which only differs for IoUs within ~1e-4 of the threshold.
    return _kept(*nms_ops.batched_nms(g["in_nms_boxes"], g["in_nms_scores"],
                                      g["in_nms_classes"].astype(np.int32), thr, n))
  return compute


def _paste(name: str):
  size = int(name.rsplit("_", 1)[1])

  def compute(g: Golden) -> np.ndarray:
    hw = tuple(int(v) for v in g["in_paste_image_hw"])
    return paste_masks(g[f"in_paste_masks_{size}"], g["in_paste_boxes"], hw, threshold=0.5)
  return compute


def _build() -> dict[str, Check]:
  checks: dict[str, Check] = {}
  for w in ("w10_10_5_5", "w1_1_1_1"):
    checks[f"out_get_deltas_{w}"] = Check(_get_deltas(f"out_get_deltas_{w}"), **FLOAT_TOL)
    checks[f"out_apply_deltas_{w}"] = Check(_apply_deltas(f"out_apply_deltas_{w}"), **FLOAT_TOL)
  for t in ("05", "07"):
    checks[f"out_nms_keep_iou{t}"] = Check(_nms(f"out_nms_keep_iou{t}"), kind="exact")
    checks[f"out_batched_nms_keep_iou{t}"] = Check(_batched_nms(f"out_batched_nms_keep_iou{t}"),
                                                   kind="exact")
  for s in (28, 224):
    checks[f"out_paste_masks_{s}"] = Check(_paste(f"out_paste_masks_{s}"), kind="exact")
  return checks


CHECKS: dict[str, Check] = _build()
