"""Parity checks of the point ops against ``ops.npz`` (detectron2 goldens, NCHW layout).

Each check reads the ``in_*`` arrays, runs the JAX op in NHWC and returns the result in the
golden's layout and dtype. Sizes (grid side, number of points) come from the golden's name or the
input shapes, so an ``ops.npz`` regenerated with other random inputs works unchanged.
"""

from __future__ import annotations

import numpy as np

from pointrend_jax.ops import point_sample as ps
from pointrend_jax.ops import point_selection as sel
from pointrend_jax.parity.compare import FLOAT_TOL, Check, Golden, boxes_by_image, nchw, nhwc

__all__ = ["CHECKS"]


def _suffix_int(name: str) -> int:
  return int(name.rsplit("_", 1)[1].lstrip("n"))


def _point_sample(mode: str):
  def compute(golden: Golden) -> np.ndarray:
    feats = nhwc(golden["in_point_sample_features"])
    out = ps.point_sample(feats, golden["in_point_sample_coords"], mode=mode)  # [N, P, C]
    return np.transpose(np.asarray(out), (0, 2, 1))
  return compute


def _uncertainty_instance(class_agnostic: bool):
  def compute(golden: Golden) -> np.ndarray:
    logits = nhwc(golden["in_uncertainty_logits"])
    classes = golden["in_uncertainty_classes"].astype(np.int32)
    out = sel.instance_uncertainty(logits[..., :1] if class_agnostic else logits, classes)
    return np.asarray(out)[:, None]
  return compute


def _uncertainty_semantic(golden: Golden) -> np.ndarray:
  return np.asarray(sel.semantic_uncertainty(nhwc(golden["in_uncertainty_logits"])))[:, None]


def _grid(name: str, part: int):
  num_points = _suffix_int(name)

  def compute(golden: Golden) -> np.ndarray:
    umap = golden["in_grid_uncertainty_map"][:, 0]
    out = np.asarray(sel.uncertain_points_on_grid(umap, num_points)[part])
    return out.astype(golden[name].dtype)
  return compute


def _regular_grid(name: str):
  side = _suffix_int(name)
  return lambda golden: np.asarray(sel.regular_grid_points(side))


def _fine(part: int):
  def compute(golden: Golden) -> np.ndarray:
    feats = nhwc(golden["in_fine_features_p2"])
    boxes, batch_index = boxes_by_image(golden, "in_fine_boxes")
    out = sel.point_sample_fine_grained_features(
        [feats], [4.0], boxes, batch_index, golden["in_fine_point_coords"])[part]
    out = np.asarray(out)
    return np.transpose(out, (0, 2, 1)) if part == 0 else out  # features -> [R, C, P]
  return compute


def _interp_x2(golden: Golden) -> np.ndarray:
  return nchw(ps.interpolate_bilinear_x2(nhwc(golden["in_interp_x2"])))


CHECKS: dict[str, Check] = {
    "out_point_sample": Check(_point_sample("bilinear"), **FLOAT_TOL),
    "out_point_sample_nearest": Check(_point_sample("nearest"), **FLOAT_TOL),
    "out_uncertainty_instance": Check(_uncertainty_instance(False), **FLOAT_TOL),
    "out_uncertainty_instance_agnostic": Check(_uncertainty_instance(True), **FLOAT_TOL),
    "out_uncertainty_semantic": Check(_uncertainty_semantic, **FLOAT_TOL),
    # The map has distinct values, so top-k order is well defined and compared exactly.
    "out_grid_indices_n40": Check(_grid("out_grid_indices_n40", 0), kind="exact"),
    "out_grid_coords_n40": Check(_grid("out_grid_coords_n40", 1), **FLOAT_TOL),
    "out_grid_indices_n1000": Check(_grid("out_grid_indices_n1000", 0), kind="exact"),
    "out_grid_coords_n1000": Check(_grid("out_grid_coords_n1000", 1), **FLOAT_TOL),
    "out_regular_grid_7": Check(_regular_grid("out_regular_grid_7"), **FLOAT_TOL),
    "out_regular_grid_28": Check(_regular_grid("out_regular_grid_28"), **FLOAT_TOL),
    "out_fine_features": Check(_fine(0), **FLOAT_TOL),
    "out_fine_point_coords_wrt_image": Check(_fine(1), **FLOAT_TOL),
    "out_interp_x2": Check(_interp_x2, **FLOAT_TOL),
}
