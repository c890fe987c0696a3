"""bench/device.py on tiny models: the lowering check for CUDA and TPU and the device benchmark
run end to end on CPU, importing none of the packages the device machines lack."""

import json
import pathlib
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[2]
# Not installed on the device machines: the benchmark must not need them.
ABSENT = ("ml_collections", "grain", "tensorflow_datasets", "tensorflow", "pycocotools")


def _run(tmp_path, *flags):
  code = ("import runpy, sys\n"
          f"sys.modules.update(dict.fromkeys({ABSENT!r}))\n"
          f"sys.argv = ['bench/device.py', '--smoke', '--out', {str(tmp_path)!r}, *{flags!r}]\n"
          "try:\n"
          "  runpy.run_path('bench/device.py', run_name='__main__')\n"
          "except SystemExit as e:\n"
          "  sys.exit(e.code)\n")
  return subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                        timeout=900)


@pytest.mark.slow
def test_lower_only_for_cuda_and_tpu(tmp_path):
  proc = _run(tmp_path, "--lower-only", "--platforms", "cuda,tpu")
  assert proc.returncode == 0, proc.stderr[-3000:]
  rows = json.loads((tmp_path / "device_lower.json").read_text())["rows"]
  # {instance, semantic} x {predict, train step} x {float32, bfloat16} x {cuda, tpu}
  assert len(rows) == 16 and all(r["ok"] for r in rows), rows
  assert {r["platform"] for r in rows} == {"cuda", "tpu"}
  for r in rows:
    assert r["ops"] > 1000 and not r["custom_calls"], r
    if r["program"].startswith("train step"):
      assert r["case"] > 0, r  # the per-platform conv backward left its (folded) choice
  assert "| train step tiny_instance | 2x64x64 | bfloat16 | tpu | yes |" in proc.stdout
  assert (tmp_path / "device_lower.md").read_text().count("| yes |") == 16


@pytest.mark.slow
def test_device_benchmark_end_to_end_on_cpu(tmp_path):
  proc = _run(tmp_path, "--repeats", "1", "--steps", "1")
  assert proc.returncode == 0, proc.stderr[-3000:]
  rows = json.loads((tmp_path / "device_device.json").read_text())["rows"]
  assert [(r["bench"], r["dtype"]) for r in rows] == [
      ("predict", "float32"), ("train", "float32"), ("predict", "bfloat16")]
  assert all(r["compile_s"] > 0 and r["peak"][1] > 0 for r in rows), rows
  assert rows[0]["ms_per_image"] > 0 and rows[1]["images_per_s_per_device"] > 0
  assert rows[1]["loss"] > 0
  assert "images/s/device" in (tmp_path / "device_device.md").read_text()
