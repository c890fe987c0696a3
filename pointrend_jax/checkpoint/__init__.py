"""Checkpoint reading: detectron2 / Caffe2 / PyTorch files to numpy state dicts (no torch)."""

from pointrend_jax.checkpoint.d2_reader import CheckpointError
from pointrend_jax.checkpoint.d2_reader import Detectron2Checkpoint
from pointrend_jax.checkpoint.d2_reader import MatchReport
from pointrend_jax.checkpoint.d2_reader import Mismatch
from pointrend_jax.checkpoint.d2_reader import UnsafeCheckpointError
from pointrend_jax.checkpoint.d2_reader import canonicalize_names
from pointrend_jax.checkpoint.d2_reader import convert_c2_names
from pointrend_jax.checkpoint.d2_reader import load_detectron2_file
from pointrend_jax.checkpoint.d2_reader import manifest_shapes
from pointrend_jax.checkpoint.d2_reader import match_state_dict

__all__ = [
    "CheckpointError",
    "Detectron2Checkpoint",
    "MatchReport",
    "Mismatch",
    "UnsafeCheckpointError",
    "canonicalize_names",
    "convert_c2_names",
    "load_detectron2_file",
    "manifest_shapes",
    "match_state_dict",
]
