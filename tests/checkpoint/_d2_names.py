"""Shared by the checkpoint tests: the zoo configs' manifests and detectron2 names written in
older generations (spec §3, §4.1), independently of the reader."""

from __future__ import annotations

import json
import pathlib
import re

import numpy as np

SHARED = pathlib.Path(__file__).resolve().parents[3] / "shared"
MANIFESTS = SHARED / "spec" / "checkpoints"
CONFIGS = (
    "pointrend_rcnn_R_50_FPN_1x_coco",
    "pointrend_rcnn_R_50_FPN_3x_coco",
    "pointrend_rcnn_R_101_FPN_3x_coco",
    "pointrend_rcnn_X_101_32x8d_FPN_3x_coco",
    "pointrend_rcnn_R_50_FPN_1x_cityscapes",
    "pointrend_semantic_R_101_FPN_1x_cityscapes",
)
BOTTOM_UP = "backbone.bottom_up."


def to_v1(name: str) -> str:
  """Current (v2) PointRend name -> v1 (Nov 2020 - Apr 2021, CoarseMaskHead)."""
  return re.sub(r"^roi_heads\.mask_head\.coarse_head\.fc(\d)\.",
                r"roi_heads.mask_head.coarse_head.coarse_mask_fc\1.", name)


def to_v0(name: str) -> str:
  """Current (v2) PointRend name -> v0 (PointRendROIHeads, Jan - Nov 2020)."""
  name = to_v1(name)
  name = name.replace("roi_heads.mask_head.coarse_head.", "roi_heads.mask_coarse_head.")
  return name.replace("roi_heads.mask_head.point_head.", "roi_heads.mask_point_head.")


_C2_NORM = {"weight": "s", "bias": "b", "running_mean": "rm", "running_var": "riv"}
_C2_BRANCH = {"shortcut": "branch1", "conv1": "branch2a", "conv2": "branch2b", "conv3": "branch2c"}


def to_c2(name: str) -> str:
  """``backbone.bottom_up.*`` name -> the Caffe2 ImageNet blob name (MSRA / FAIR pickles)."""
  assert name.startswith(BOTTOM_UP), name
  rest = name[len(BOTTOM_UP):]
  if rest == "stem.conv1.weight":
    return "conv1_w"
  m = re.fullmatch(r"stem\.conv1\.norm\.(\w+)", rest)
  if m:
    return "res_conv1_bn_" + _C2_NORM[m.group(1)]
  m = re.fullmatch(r"res(\d)\.(\d+)\.(\w+)\.weight", rest)
  if m:
    return f"res{m.group(1)}_{m.group(2)}_{_C2_BRANCH[m.group(3)]}_w"
  m = re.fullmatch(r"res(\d)\.(\d+)\.(\w+)\.norm\.(\w+)", rest)
  assert m, name
  return f"res{m.group(1)}_{m.group(2)}_{_C2_BRANCH[m.group(3)]}_bn_{_C2_NORM[m.group(4)]}"


def marked_state(names_shapes, rename=lambda n: n) -> dict[str, np.ndarray]:
  """Entry i is a zero-memory array of the right shape, every element equal to i."""
  return {rename(n): np.broadcast_to(np.float32(i), s) for i, (n, s) in
          enumerate(names_shapes.items())}


def mark(a: np.ndarray) -> float:
  return float(a.reshape(-1)[0])


def load_manifests() -> dict[str, dict[str, tuple[int, ...]]]:
  """``{config: {state-dict name: shape}}``, in state-dict order, from the manifests."""
  entries = {c: json.loads((MANIFESTS / f"{c}.json").read_text())["entries"] for c in CONFIGS}
  return {c: {e["name"]: tuple(e["shape"]) for e in es} for c, es in entries.items()}
