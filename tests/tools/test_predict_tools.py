"""The predict and visualize_points commands on a tiny config (ModelConfig JSON) with random
weights: outputs written, one-line errors for missing / corrupt inputs."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pycocotools.mask as mask_util
import pytest
from PIL import Image

from conftest import REPO_ROOT
from pointrend_jax.tools import predict, visualize_points



def _cli(module: str, *args: str) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, "-m", f"pointrend_jax.tools.{module}", *args],
                        cwd=REPO_ROOT, capture_output=True, text=True, timeout=600,
                        env={**os.environ, "JAX_PLATFORMS": "cpu"})


def _one_line_error(stderr: str, prog: str, *fragments: str) -> None:
  errors = [l for l in stderr.splitlines() if l.startswith(f"{prog}: error: ")]
  assert "Traceback" not in stderr and len(errors) == 1, stderr
  for f in fragments:
    assert f in errors[0], errors[0]


@pytest.fixture(scope="module")
def files(tmp_path_factory, tiny_cfg):
  d = tmp_path_factory.mktemp("inputs")
  (d / "tiny.json").write_text(tiny_cfg.to_json())
  rng = np.random.default_rng(0)
  yy, xx = np.mgrid[0:90, 0:120]
  img = np.stack([xx * 2, yy * 2, (xx + yy)], -1).astype(np.uint8)
  img[20:60, 30:80] = rng.integers(0, 256, 3, dtype=np.uint8)
  Image.fromarray(img).save(d / "scene.png")
  Image.fromarray(img[:70, :50]).save(d / "small.jpg")
  (d / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
  return d


@pytest.mark.slow
def test_predict_cli_writes_png_and_json(files, tmp_path):
  out = tmp_path / "out"
  proc = _cli("predict", "--config", str(files / "tiny.json"), "--weights", "random",
              "--input", str(files / "scene.png"), str(files / "small.jpg"),
              str(files / "broken.png"), "--output", str(out), "--score-threshold", "0.3")
  # The corrupt file is reported on one line, the others are written, the exit status is 1.
  assert proc.returncode == 1
  _one_line_error(proc.stderr, "predict", "broken.png", "cannot decode")
  assert "2/3 images" in proc.stderr
  for stem, hw in (("scene", (90, 120)), ("small", (70, 50))):
    overlay = np.asarray(Image.open(out / f"{stem}.png"))
    assert overlay.shape == hw + (3,)
    rec = json.loads((out / f"{stem}.json").read_text())
    assert (rec["height"], rec["width"]) == hw and rec["file"].endswith(stem + (
        ".png" if stem == "scene" else ".jpg"))
    assert rec["instances"], "random weights give confident detections"
    scores = [r["score"] for r in rec["instances"]]
    assert min(scores) > 0.3 and scores == sorted(scores, reverse=True)
    for r in rec["instances"]:
      assert set(r) == {"box", "score", "class", "class_name", "segmentation"}
      assert r["class_name"] == f"class_{r['class']}" and len(r["box"]) == 4
      assert mask_util.decode(r["segmentation"]).shape == hw
  assert not (out / "broken.png").exists() and not (out / "broken.json").exists()


def test_predict_cli_missing_input_and_help(files, tmp_path):
  proc = _cli("predict", "--config", str(files / "tiny.json"), "--weights", "random",
              "--input", str(files / "scene.png"), str(files / "nope.png"),
              "--output", str(tmp_path / "o"))
  assert proc.returncode == 1
  _one_line_error(proc.stderr, "predict", "input not found", "nope.png")
  assert not (tmp_path / "o").exists()
  proc = _cli("predict", "--config", "no_such_zoo_name", "--weights", "random",
              "--input", str(files / "scene.png"), "--output", str(tmp_path / "o"))
  _one_line_error(proc.stderr, "predict", "no_such_zoo_name")
  proc = _cli("predict", "--help")
  assert proc.returncode == 0
  for flag in ("--config", "--weights", "--input", "--output", "--score-threshold"):
    assert flag in proc.stdout


@pytest.mark.slow
def test_visualize_points_writes_panels(files, tmp_path, capsys):
  out = tmp_path / "panels"
  args = ["--config", str(files / "tiny.json"), "--weights", "random",
          "--input", str(files / "scene.png"), "--output", str(out)]
  assert visualize_points.main(args + ["--instances", "0,2", "--panel-height", "64"]) == 0
  fig = np.asarray(Image.open(out / "scene_subdivision.png"))
  row0 = np.asarray(Image.open(out / "scene_inst0.png"))
  assert (out / "scene_inst2.png").is_file() and not (out / "scene_inst1.png").exists()
  # 7 panels of >= 64 px side by side, two rows.
  assert row0.shape[1] >= 7 * 64 and fig.shape[0] > 2 * 64 and fig.shape[2] == 3
  capsys.readouterr()
  assert visualize_points.main(args + ["--instances", "0,999"]) == 1
  _one_line_error(capsys.readouterr().err, "visualize_points", "999", "out of range")
  assert visualize_points.main(args[:-3] + [str(files / "broken.png"), "--output",
                                            str(out)]) == 1
  _one_line_error(capsys.readouterr().err, "visualize_points", "broken.png")


@pytest.mark.slow
def test_predict_main_in_process_semantic_refused_by_visualize(files, tmp_path, capsys):
  # In-process entry point with a directory input (expanded to its images; broken one fails).
  code = predict.main(["--config", str(files / "tiny.json"), "--weights", "random",
                       "--input", str(files), "--output", str(tmp_path / "d"), "--quiet"])
  assert code == 1
  assert sorted(p.name for p in (tmp_path / "d").iterdir()) == [
      "scene.json", "scene.png", "small.json", "small.png"]
  capsys.readouterr()
  assert visualize_points.main(["--config", "semantic_r101_fpn_cityscapes", "--weights",
                                "random", "--input", str(files / "scene.png"), "--output",
                                str(tmp_path / "v")]) == 1
  _one_line_error(capsys.readouterr().err, "visualize_points", "semantic")
