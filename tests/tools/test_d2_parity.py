"""The parity command: exit status, per-array rows and the closing count."""

import io
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import OPS_GOLDEN, REPO_ROOT
from pointrend_jax.tools import d2_parity


@pytest.fixture(scope="module")
def golden():
  with np.load(OPS_GOLDEN) as f:
    return {k: f[k] for k in f.files}


@pytest.mark.slow
def test_cli_passes_on_shared_ops_golden():
  proc = subprocess.run(
      [sys.executable, "-m", "pointrend_jax.tools.d2_parity", str(OPS_GOLDEN)],
      cwd=REPO_ROOT, capture_output=True, text=True, timeout=600,
      env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert proc.returncode == 0, proc.stdout + proc.stderr
  lines = proc.stdout.strip().splitlines()
  n_out = sum(1 for k in np.load(OPS_GOLDEN).files if not k.startswith("in_"))
  assert lines[-1] == f"{n_out} passed, 0 failed"
  assert sum(line.rstrip().endswith("PASS") for line in lines) == n_out


def test_every_ops_output_has_a_check(golden):
  checks = d2_parity.ops_checks()
  outputs = {k for k in golden if not k.startswith("in_")}
  assert outputs <= checks.keys(), sorted(outputs - checks.keys())


def _run(tmp_path, arrays):
  path = tmp_path / "g.npz"
  np.savez(path, **arrays)
  out = io.StringIO()
  failed = d2_parity.run([str(path)], out=out)
  return failed, out.getvalue()


def test_unknown_array_fails(tmp_path, golden):
  arrays = {k: v for k, v in golden.items() if k.startswith("in_b2b") or k.startswith("out_get_deltas")}
  arrays["out_something_new"] = np.zeros(3, np.float32)
  failed, text = _run(tmp_path, arrays)
  assert failed == 1
  assert "out_something_new" in text and "no check knows this array" in text
  assert text.strip().splitlines()[-1] == "2 passed, 1 failed"


def test_wrong_values_fail(tmp_path, golden):
  arrays = {k: v for k, v in golden.items() if k.startswith("in_nms") or k.startswith("in_b2b")}
  arrays["out_get_deltas_w1_1_1_1"] = golden["out_get_deltas_w1_1_1_1"] + np.float32(1e-3)
  keep = golden["out_nms_keep_iou05"].copy()
  keep[[0, 1]] = keep[[1, 0]]
  arrays["out_nms_keep_iou05"] = keep
  failed, text = _run(tmp_path, arrays)
  assert failed == 2, text
  assert text.count("FAIL") == 2


def test_missing_path_fails(tmp_path):
  out = io.StringIO()
  assert d2_parity.run([str(tmp_path / "nope.npz")], out=out) == 1
  assert out.getvalue().strip().splitlines()[-1] == "0 passed, 1 failed"
