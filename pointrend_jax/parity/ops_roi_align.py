"""Parity checks of ROIAlign and the FPN pooler against ``ops.npz`` (detectron2 goldens, NCHW).

Parameters come from the golden layout, not from constants of this particular file: the output
size from the output's shape, the pooler's image size from p2's shape (stride 4), the level
scales from the map sizes. ROIAlign uses ``spatial_scale=0.25`` as the fixture README states.
"""

from __future__ import annotations

import numpy as np

from pointrend_jax.ops import poolers
from pointrend_jax.ops import roi_align as ra
from pointrend_jax.parity.compare import FLOAT_TOL, Check, Golden, boxes_by_image, nchw, nhwc

__all__ = ["CHECKS"]

_ROI_ALIGN_SCALE = 0.25  # ops.npz README §4: ROIAlign((7, 7), spatial_scale=0.25, ...).
_POOLER_LEVELS = (2, 3, 4, 5)


def _roi_align(sampling_ratio: int):
  name = f"out_roi_align_sr{sampling_ratio}"

  def compute(golden: Golden) -> np.ndarray:
    rois = golden["in_roi_align_rois"]  # [R, 5]: batch index, x0, y0, x1, y1.
    out = ra.roi_align(nhwc(golden["in_roi_align_features"]), rois[:, 1:],
                       rois[:, 0].astype(np.int32), golden[name].shape[-2:], _ROI_ALIGN_SCALE,
                       sampling_ratio=sampling_ratio, aligned=True)
    return nchw(out).astype(golden[name].dtype)

  return compute


def _pooler_inputs(golden: Golden):
  feats = [nhwc(golden[f"in_pooler_features_p{l}"]) for l in _POOLER_LEVELS]
  boxes, batch_index = boxes_by_image(golden, "in_pooler_boxes")
  image_h, image_w = 4 * feats[0].shape[1], 4 * feats[0].shape[2]  # p2 has stride 4.
  scales = [f.shape[1] / image_h for f in feats]
  return feats, boxes, batch_index, scales, (image_h, image_w)


def _pooler_levels(golden: Golden) -> np.ndarray:
  _, boxes, _, scales, _ = _pooler_inputs(golden)
  lo, hi = poolers.levels_from_scales(scales)
  levels = poolers.assign_boxes_to_levels(boxes, lo, hi)
  return np.asarray(levels).astype(golden["out_pooler_levels"].dtype)


def _pooler(golden: Golden) -> np.ndarray:
  feats, boxes, batch_index, scales, _ = _pooler_inputs(golden)
  # No sample cap: some golden boxes extend past the image, where an image-size cap is not
  # guaranteed exact.
  out = poolers.multilevel_roi_align(feats, boxes, batch_index, scales,
                                     output_size=golden["out_pooler"].shape[-2:],
                                     sampling_ratio=0, aligned=True)
  return nchw(out).astype(golden["out_pooler"].dtype)


CHECKS: dict[str, Check] = {
    "out_roi_align_sr0": Check(_roi_align(0), **FLOAT_TOL),
    "out_roi_align_sr2": Check(_roi_align(2), **FLOAT_TOL),
    "out_pooler_levels": Check(_pooler_levels, kind="exact"),
    "out_pooler": Check(_pooler, **FLOAT_TOL),
}
