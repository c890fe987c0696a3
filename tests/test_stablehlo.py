"""StableHLO export (tools.export --format stablehlo) and ExportedPredictor against Predictor.

The exported programs run in a fresh process that has no flax and no model code imported; their
results must equal Predictor's on CPU (same HLO, same weights: bit-identical).
"""

import dataclasses
import json
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from pointrend_jax.checkpoint.orbax_io import save_converted
from pointrend_jax.inference import Predictor
from pointrend_jax.modeling import zoo
from pointrend_jax.tools import export as export_tool

sys.path.insert(0, str(pathlib.Path(__file__).parent / "training"))
from _tiny_models import tiny_instance_config, tiny_model, tiny_semantic_config  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]
BUCKETS = "64x64,64x96"


def _images():
  rng = np.random.default_rng(7)
  # Resized to 60x96 and 64x75 (bucket 64x96), and a grayscale 64x64 (bucket 64x64).
  return [rng.integers(0, 256, (50, 80, 3), np.uint8), rng.integers(0, 256, (60, 70, 3), np.uint8),
          rng.integers(0, 256, (64, 64), np.uint8)]


def _exported(tmp_path, config):
  """A converted tiny model (test sizes 64 / 96) exported with the command line tool."""
  mcfg = zoo.model_config(config.model)
  mcfg = dataclasses.replace(mcfg, input=dataclasses.replace(mcfg.input, min_size_test=64,
                                                             max_size_test=96))
  converted = save_converted(tiny_model(config), mcfg, tmp_path / "converted")
  out = tmp_path / "stablehlo"
  assert export_tool.main(["--weights", str(converted), "--format", "stablehlo", "--output",
                           str(out), "--buckets", BUCKETS, "--score-threshold", "0"]) == 0
  return converted, out


# Runs ExportedPredictor in a clean interpreter and reports which modules it needed.
_RUNNER = """
import pickle, sys
import numpy as np
from pointrend_jax.stablehlo import ExportedPredictor
images = list(np.load(sys.argv[2]).values())
predictor = ExportedPredictor(sys.argv[1])
results = predictor(images)
loaded = sorted(m for m in sys.modules
                if m.split(".")[0] in ("flax", "optax", "orbax") or m.startswith("pointrend_jax."))
with open(sys.argv[3], "wb") as f:
  pickle.dump({"results": results, "modules": loaded, "compiles": predictor.num_compiles}, f)
"""


def _run_exported(tmp_path, artifacts):
  np.savez(tmp_path / "images.npz", *_images())
  proc = subprocess.run([sys.executable, "-c", _RUNNER, str(artifacts),
                         str(tmp_path / "images.npz"), str(tmp_path / "out.pkl")],
                        cwd=REPO, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  import pickle
  with open(tmp_path / "out.pkl", "rb") as f:
    return pickle.load(f)


def _no_model_code(modules):
  assert not [m for m in modules if m.split(".")[0] in ("flax", "optax", "orbax")], modules
  assert not [m for m in modules if m.startswith(("pointrend_jax.modeling",
                                                  "pointrend_jax.training",
                                                  "pointrend_jax.checkpoint",
                                                  "pointrend_jax.inference"))], modules


@pytest.mark.slow
def test_instance_export_runs_without_flax_and_equals_predictor(tmp_path):
  converted, artifacts = _exported(tmp_path, tiny_instance_config())
  meta = json.loads((artifacts / "pointrend.json").read_text())
  assert meta["format"] == "pointrend-jax-stablehlo" and meta["kind"] == "instance"
  assert meta["platforms"] == ["cpu", "cuda", "tpu"] and len(meta["programs"]) == 2
  assert meta["resize"]["min_size_test"] == 64 and meta["class_names"] == [
      "class_0", "class_1", "class_2"]
  run = _run_exported(tmp_path, artifacts)
  _no_model_code(run["modules"])
  assert run["compiles"] == 2  # one program per bucket
  expected = Predictor(None, converted, buckets=[(64, 64), (64, 96)], score_threshold=0.0)(
      _images())
  for got, want in zip(run["results"], expected):
    assert len(want) > 0 and len(got) == len(want)
    np.testing.assert_array_equal(got.boxes, want.boxes)
    np.testing.assert_array_equal(got.scores, want.scores)
    np.testing.assert_array_equal(got.classes, want.classes)
    np.testing.assert_array_equal(got.masks, want.masks)
    assert got.rle == want.rle and got.class_names == want.class_names


@pytest.mark.slow
def test_semantic_export_equals_predictor(tmp_path):
  converted, artifacts = _exported(tmp_path, tiny_semantic_config())
  programs = json.loads((artifacts / "pointrend.json").read_text())["programs"]
  assert [p["outputs"]["logits"]["shape"] for p in programs] == [[1, 64, 64, 4], [1, 64, 96, 4]]
  run = _run_exported(tmp_path, artifacts)
  _no_model_code(run["modules"])
  expected = Predictor(None, converted, buckets=[(64, 64), (64, 96)])(_images())
  for got, want in zip(run["results"], expected):
    np.testing.assert_array_equal(got.sem_seg, want.sem_seg)


def test_bad_artifacts_and_sizes_are_one_line_errors(tmp_path, capsys):
  from pointrend_jax.stablehlo import ExportedPredictor
  with pytest.raises(ValueError, match="not a readable artifact description"):
    ExportedPredictor(tmp_path)
  (tmp_path / "pointrend.json").write_text(json.dumps(
      {"format": "pointrend-jax-stablehlo", "format_version": 99}))
  with pytest.raises(ValueError, match="version 99"):
    ExportedPredictor(tmp_path)
  # The command line: --weights that do not exist, the converted format without a workdir.
  assert export_tool.main(["--weights", str(tmp_path / "nope.pkl"), "--format", "stablehlo",
                           "--output", str(tmp_path / "o")]) == 1
  assert export_tool.main(["--weights", str(tmp_path), "--output", str(tmp_path / "o")]) == 1
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 2 and all(line.startswith("export: error: ") for line in err), err
  assert "nope.pkl not found" in err[0] and "--format stablehlo" in err[1]
