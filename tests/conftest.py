"""Shared test configuration.

The detectron2 goldens live in ``../shared`` beside the checkout (also in CI); tests read them
from there and never copy them into the project.
"""

import os
import pathlib
import warnings

# Tests are CPU tests; keep them off any accelerator a developer machine might have.
os.environ.setdefault("JAX_PLATFORMS", "cpu")

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
SHARED_DIR = REPO_ROOT.parent / "shared"
PARITY_DIR = SHARED_DIR / "fixtures" / "detectron2_parity"
OPS_GOLDEN = PARITY_DIR / "ops.npz"


import numpy as np  # noqa: E402
import pytest  # noqa: E402


@pytest.fixture(scope="session")
def ops_golden() -> dict:
  """The op-level detectron2 goldens (``ops.npz``) as a dict of numpy arrays."""
  # CI has ../shared beside the checkout: a missing golden is a failure, not a skip.
  assert OPS_GOLDEN.is_file(), f"detectron2 goldens not found at {OPS_GOLDEN}"
  with np.load(OPS_GOLDEN) as data:
    return {k: data[k] for k in data.files}


# ResNet-18 GN, 3 classes, 128x128 test size: an instance model that compiles in seconds.
TINY_YAML = {
    "_BASE_": "Base-PointRend-RCNN-FPN.yaml",
    "MODEL": {
        "RESNETS": {"DEPTH": 18, "NORM": "GN", "RES2_OUT_CHANNELS": 64, "STEM_OUT_CHANNELS": 32},
        "FPN": {"OUT_CHANNELS": 32},
        "RPN": {"PRE_NMS_TOPK_TEST": 200, "POST_NMS_TOPK_TEST": 100},
        "ROI_HEADS": {"NUM_CLASSES": 3},
        "ROI_BOX_HEAD": {"FC_DIM": 64},
        "ROI_MASK_HEAD": {"CONV_DIM": 32, "FC_DIM": 64},
        "POINT_HEAD": {"NUM_CLASSES": 3, "FC_DIM": 32},
    },
    "TEST": {"DETECTIONS_PER_IMAGE": 20},
    "INPUT": {"MIN_SIZE_TEST": 128, "MAX_SIZE_TEST": 128},
}


@pytest.fixture(scope="session")
def tiny_cfg():
  """The model config (frozen, so shared) of :data:`TINY_YAML`."""
  from pointrend_jax.modeling.zoo import from_detectron2_yaml
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # "built-in copy of the _BASE_ file"
    return from_detectron2_yaml(TINY_YAML)
