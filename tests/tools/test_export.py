"""A trained model reaches Predictor / tools.predict: ``<workdir>/model`` at the end of
training, and ``tools.export`` for any checkpoint of a workdir.

One tiny in-process training run (the synthetic shapes config at 64x64, batch 2, 2 steps) is
shared by the tests; most of the time is XLA compiling the train step and the predictors.
"""

from __future__ import annotations

import importlib.util
import json
import sys

import jax
import numpy as np
import pytest
from flax import nnx

from conftest import REPO_ROOT
from pointrend_jax.checkpoint import workdir as workdir_lib
from pointrend_jax.data import synthetic
from pointrend_jax.inference import Predictor
from pointrend_jax.tools import export as export_tool
from pointrend_jax.modeling import zoo
from pointrend_jax.training import train

pytestmark = pytest.mark.slow  # every test uses the tiny training run


def _tiny_config():
  if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))
  spec = importlib.util.spec_from_file_location(
      "_config_synthetic_shapes", REPO_ROOT / "configs" / "synthetic_shapes.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  c = module.get_config()
  c.data.synthetic.update(num_train=4, num_val=2, image_size=(64, 64))
  c.model.overrides.input.update(min_size_train=(64,), max_size_train=64, min_size_test=64,
                                 max_size_test=64)
  c.train.update(batch_size=2, num_replicas_d2=2, max_steps=2, checkpoint_every=1, log_every=1,
                 progress_bar=False, async_checkpointing=False)
  c.solver.update(warmup_iters=1, steps=(5,))
  c.eval.update(every=0, num_visualize=0)
  return c


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """``(workdir, config, the in-memory final model train_and_evaluate exported)``."""
  workdir = tmp_path_factory.mktemp("run")
  captured = {}
  original = workdir_lib.export_trained_model

  def capture(model, mcfg, out_dir, **kwargs):
    captured.update(model=model, mcfg=mcfg)
    return original(model, mcfg, out_dir, **kwargs)

  config = _tiny_config()
  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(workdir_lib, "export_trained_model", capture)
    train.train_and_evaluate(config, workdir, evaluate_after=False)
  return workdir, config, captured


def _image(workdir):
  (path,) = sorted((workdir / "data").glob("*/images/val/*.png"))[:1]
  return str(path)


def _assert_same_instances(a, b):
  assert len(a) == len(b)
  np.testing.assert_array_equal(a.boxes, b.boxes)
  np.testing.assert_array_equal(a.scores, b.scores)
  np.testing.assert_array_equal(a.classes, b.classes)
  np.testing.assert_array_equal(a.masks, b.masks)


def test_training_exports_final_model_for_predictor(trained):
  workdir, config, captured = trained
  model_dir = workdir / workdir_lib.EXPORT_DIR
  meta = json.loads((model_dir / "config.json").read_text())
  assert meta["source"]["step"] == 2
  # The synthetic config's model is all overrides: the stored config is the full ModelConfig.
  assert meta["config"] == zoo.model_config(config.model).to_dict()
  assert meta["config"]["roi_heads"]["num_classes"] == 5
  exported = Predictor(None, str(model_dir))
  assert exported.class_names == list(synthetic.THING_CLASSES)
  in_memory = Predictor(captured["mcfg"], captured["model"])
  image = _image(workdir)
  a, b = exported(image), in_memory(image)
  assert len(a) > 0  # an untrained-ish model still scores boxes above SCORE_THRESH_TEST
  _assert_same_instances(a, b)


def test_restore_model_matches_final_state(trained):
  workdir, config, captured = trained
  step, model = workdir_lib.restore_trained_model(workdir, captured["mcfg"])
  assert step == 2
  ours = nnx.to_pure_dict(nnx.state(model))
  theirs = nnx.to_pure_dict(nnx.state(captured["model"]))
  assert jax.tree.structure(ours) == jax.tree.structure(theirs)
  for x, y in zip(jax.tree.leaves(ours), jax.tree.leaves(theirs)):
    np.testing.assert_array_equal(x, y)


def test_export_tool_writes_any_step(trained, tmp_path, capsys):
  workdir, config, captured = trained
  out = tmp_path / "step1"
  assert export_tool.main(["--workdir", str(workdir), "--step", "1", "--output", str(out)]) == 0
  assert "restored checkpoint 1" in capsys.readouterr().out
  meta = json.loads((out / "config.json").read_text())
  assert meta["source"]["step"] == 1 and meta["class_names"] == list(synthetic.THING_CLASSES)
  # The checkpoint's values (Predictor on an exported directory: the first test).
  _, step1 = workdir_lib.restore_trained_model(workdir, captured["mcfg"], 1)
  predictor = Predictor(None, str(out))
  assert predictor.cfg == captured["mcfg"]
  exported = jax.tree.leaves(nnx.to_pure_dict(nnx.state(predictor.model)))
  for x, y in zip(exported, jax.tree.leaves(nnx.to_pure_dict(nnx.state(step1)))):
    np.testing.assert_array_equal(x, y)
  # Step 1 is not the final model.
  final = jax.tree.leaves(nnx.to_pure_dict(nnx.state(captured["model"])))
  assert any(not np.array_equal(x, y) for x, y in zip(exported, final))
  # An existing output needs --force.
  assert export_tool.main(["--workdir", str(workdir), "--output", str(out)]) == 1
  assert "--force" in capsys.readouterr().err
  assert export_tool.main(["--workdir", str(workdir), "--output", str(out), "--force"]) == 0
  assert json.loads((out / "config.json").read_text())["source"]["step"] == 2


@pytest.mark.parametrize("case", ["no_workdir", "no_step", "no_config"])
def test_export_tool_one_line_errors(trained, tmp_path, capsys, case):
  workdir, _, _ = trained
  args = {"no_workdir": ["--workdir", str(tmp_path / "nowhere")],
          "no_step": ["--workdir", str(workdir), "--step", "7"],
          "no_config": ["--workdir", str(tmp_path)]}[case]
  assert export_tool.main([*args, "--output", str(tmp_path / "out")]) == 1
  err = capsys.readouterr().err
  lines = err.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("export: error: "), err
  expected = {"no_workdir": "workdir not found", "no_step": "no checkpoint 7",
              "no_config": "no config.json"}[case]
  assert expected in lines[0]
  if case == "no_step":
    assert "available: 1, 2" in lines[0]
  assert not (tmp_path / "out").exists()


def test_evaluate_restores_the_newest_checkpoint(trained, tmp_path):
  workdir, config, captured = trained
  from pointrend_jax.training.evaluator import Evaluator
  want = Evaluator(config, str(tmp_path), captured["mcfg"])(captured["model"], 2, final=True)
  got = train.evaluate(config, workdir)
  assert got.keys() == want.keys() and want["eval/bbox/AP"] > 0  # not an all-zero comparison
  np.testing.assert_array_equal([got[k] for k in sorted(got)], [want[k] for k in sorted(want)])
