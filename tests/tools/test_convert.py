"""The convert command: detectron2 .pkl -> orbax checkpoint + config, round trip, and one-line
errors for refused / broken / mismatched files."""

from __future__ import annotations

import importlib.util
import json
import os
import pickle
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import nnx

from conftest import PARITY_DIR, REPO_ROOT, SHARED_DIR
from pointrend_jax.checkpoint.d2_model import load_d2_model
from pointrend_jax.checkpoint.orbax_io import load_converted
from pointrend_jax.modeling.zoo import zoo_config
from pointrend_jax.modeling.meta_arch import PointRendRCNN, abstract_model
from pointrend_jax.tools import convert

STEM = "pointrend_rcnn_R_50_FPN_1x_coco"


def _cli(*args: str) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, "-m", "pointrend_jax.tools.convert", *args],
                        cwd=REPO_ROOT, capture_output=True, text=True, timeout=600,
                        env={**os.environ, "JAX_PLATFORMS": "cpu"})


def _assert_one_line_error(proc: subprocess.CompletedProcess, *fragments: str) -> None:
  assert proc.returncode != 0
  err = proc.stderr.strip()
  assert "Traceback" not in proc.stderr and len(err.splitlines()) == 1, proc.stderr
  assert err.startswith("convert: error: ")
  for f in fragments:
    assert f in err, err


@pytest.fixture(scope="module")
def r50_pkl(tmp_path_factory):
  """The seed-0 fixture weights of the R50 COCO model as a detectron2 .pkl."""
  spec = importlib.util.spec_from_file_location("d2_make_weights", PARITY_DIR / "make_weights.py")
  make_weights = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(make_weights)
  path = tmp_path_factory.mktemp("weights") / "r50.pkl"
  make_weights.write_pkl(
      make_weights.state_dict_from_manifest(str(SHARED_DIR / "spec" / "checkpoints"
                                                / f"{STEM}.json"), seed=0), str(path))
  return path


@pytest.mark.slow
def test_convert_infers_config_and_round_trips(r50_pkl, tmp_path):
  out = tmp_path / "converted"
  proc = _cli(str(r50_pkl), str(out))
  assert proc.returncode == 0, proc.stderr
  assert "inferred: instance, R-50, 80 classes" in proc.stdout
  meta = json.loads((out / "config.json").read_text())
  assert meta["format"] == "pointrend-jax-converted" and meta["source"]["format"] == "d2-model-zoo"

  cfg, model = load_converted(out)
  assert cfg == zoo_config("r50_fpn_1x_coco") and isinstance(model, PointRendRCNN)
  with open(r50_pkl, "rb") as f:
    weights = pickle.load(f)["model"]
  ref = abstract_model(cfg)
  load_d2_model(ref, weights)
  del weights
  ours = nnx.to_flat_state(nnx.state(model))
  theirs = dict(nnx.to_flat_state(nnx.state(ref)))
  assert len(ours) == len(theirs) == 311
  for path, var in ours:
    assert type(var) is type(theirs[path]), path  # Param / FrozenParam / FrozenStat kept
    np.testing.assert_array_equal(np.asarray(var.get_value()),
                                  np.asarray(theirs[path].get_value()), err_msg=str(path))
  assert all(isinstance(v.get_value(), jax.Array) for _, v in ours)

  # A second conversion into the same folder needs --force.
  proc = _cli(str(r50_pkl), str(out))
  _assert_one_line_error(proc, "not empty")


def test_mismatched_config_is_one_line(r50_pkl, tmp_path, capsys):
  rc = convert.main([str(r50_pkl), str(tmp_path / "x"), "--config", "r50_fpn_1x_cityscapes"])
  err = capsys.readouterr().err.strip()
  assert rc == 1 and len(err.splitlines()) == 1
  assert "11 shape mismatches" in err and "bbox_pred.bias checkpoint [320] vs model [32]" in err
  rc = convert.main([str(r50_pkl), str(tmp_path / "y"), "--config", "no_such_config"])
  assert rc == 1 and "neither a file nor a zoo config" in capsys.readouterr().err
  assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


@pytest.mark.slow
def test_malicious_and_truncated_files_are_refused(r50_pkl, tmp_path):
  marker = tmp_path / "pwned"

  class Payload:
    def __reduce__(self):
      return (os.system, (f"touch {marker}",))

  evil = tmp_path / "evil.pkl"
  with open(evil, "wb") as f:
    pickle.dump({"model": {"backbone.x": Payload()}, "__author__": "x"}, f)
  proc = _cli(str(evil), str(tmp_path / "out1"))
  _assert_one_line_error(proc, "evil.pkl")
  assert not marker.exists()

  truncated = tmp_path / "truncated.pkl"
  with open(r50_pkl, "rb") as src:
    truncated.write_bytes(src.read(1 << 20))
  proc = _cli(str(truncated), str(tmp_path / "out2"))
  _assert_one_line_error(proc, "truncated")
  assert not (tmp_path / "out1").exists() and not (tmp_path / "out2").exists()

  _assert_one_line_error(_cli(str(tmp_path / "absent.pkl"), str(tmp_path / "out3")), "not found")
