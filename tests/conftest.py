"""Shared test configuration.

The detectron2 goldens live in ``../shared`` beside the checkout (also in CI); tests read them
from there and never copy them into the project.
"""

import os
import pathlib

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
