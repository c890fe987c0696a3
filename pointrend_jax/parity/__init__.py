"""Comparison of project outputs with detectron2 goldens (used by ``tools/d2_parity`` and tests)."""
