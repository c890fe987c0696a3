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
