"""``launch.py`` end to end (subprocesses) and the config files.

Tiny synthetic runs (8 train images of 64x64, batch 2, a few steps) keep the whole file at a
couple of minutes on a 2-core CPU; most of it is XLA compiling the train and predict steps.
"""

import importlib.util
import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from pointrend_jax.training.logging import read_metrics

REPO = pathlib.Path(__file__).resolve().parents[2]
CONFIGS = sorted(p for p in (REPO / "configs").glob("*.py")
                 if p.name not in ("__init__.py", "common.py"))
LOSSES = ("loss_rpn_cls", "loss_rpn_loc", "loss_cls", "loss_box_reg", "loss_mask",
          "loss_mask_point")

TINY = [
    "--config=configs/synthetic_shapes.py",
    "--config.data.synthetic.num_train=8",
    "--config.data.synthetic.num_val=4",
    "--config.data.synthetic.image_size=(64, 64)",
    "--config.model.overrides.input.min_size_train=(64,)",
    "--config.model.overrides.input.max_size_train=64",
    "--config.model.overrides.input.min_size_test=64",
    "--config.model.overrides.input.max_size_test=64",
    "--config.train.batch_size=2",
    "--config.train.num_replicas_d2=2",
    "--config.train.max_steps=6",
    "--config.train.checkpoint_every=2",
    "--config.train.log_every=1",
    "--config.train.progress_bar=False",
    "--config.solver.warmup_iters=2",
    "--config.solver.steps=(5,)",
    "--config.eval.every=0",
    "--config.eval.num_images=4",
    "--config.eval.batch_size=4",
    "--config.eval.num_visualize=1",
]


def _env():
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1")
  env.pop("XLA_FLAGS", None)
  return env


def _cmd(workdir, *extra, mode="train_and_eval"):
  return [sys.executable, "launch.py", f"--workdir={workdir}", f"--mode={mode}", *TINY, *extra]


def _run(cmd, timeout=300):
  return subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True,
                        timeout=timeout)


def _losses(workdir):
  """Last logged value per step (a resumed run re-logs the steps after its checkpoint)."""
  return {r["step"]: r["train/loss"] for r in read_metrics(workdir) if "train/loss" in r}


def _wait_for(predicate, proc, timeout=600, what=""):
  end = time.time() + timeout
  while time.time() < end:
    if predicate():
      return
    if proc.poll() is not None:
      out, err = proc.communicate()
      pytest.fail(f"process ended (rc {proc.returncode}) before {what}:\n{err[-3000:]}")
    time.sleep(0.05)
  proc.kill()
  pytest.fail(f"timed out waiting for {what}")


def test_help():
  res = _run([sys.executable, "launch.py", "--help"], timeout=120)
  assert res.returncode == 0, res.stderr
  for flag in ("--config", "--workdir", "--mode", "--coordinator_address", "--num_processes",
               "--process_id", "distributed", "train_and_eval"):
    assert flag in res.stdout, flag


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
  """The uninterrupted tiny run: 6 steps, checkpoints at 2, 4, 6, evaluation at the end."""
  workdir = tmp_path_factory.mktemp("reference")
  res = _run(_cmd(workdir))
  assert res.returncode == 0, res.stderr[-5000:]
  return workdir, res


@pytest.mark.slow
def test_tiny_run_logs_losses_eval_and_pictures(reference_run):
  workdir, res = reference_run
  records = read_metrics(workdir)
  train = [r for r in records if "train/loss" in r]
  assert [r["step"] for r in train] == [1, 2, 3, 4, 5, 6]
  for r in train:
    for key in ("train/loss", "train/lr", *(f"train/{k}" for k in LOSSES)):
      assert np.isfinite(r[key]), (key, r)
    np.testing.assert_allclose(r["train/loss"], sum(r[f"train/{k}"] for k in LOSSES),
                               rtol=1e-5)
  evals = [r for r in records if "eval/segm/AP" in r]
  assert len(evals) == 1 and evals[0]["step"] == 6
  for key in ("eval/bbox/AP", "eval/segm/AP75", "eval/segm_coarse/AP", "eval/segm_coarse/AP75"):
    assert key in evals[0], key
  assert sorted(os.listdir(workdir / "checkpoints")) == ["2", "4", "6"]
  results = json.loads((workdir / "eval" / "coco_instances_results.json").read_text())
  assert isinstance(results, list)
  # One visualised image: its overlay, and its point stages when it has detections.
  pictures = set(os.listdir(workdir / "pictures"))
  assert "000001_overlay.png" in pictures <= {"000001_overlay.png", "000001_points.png"}
  summary = json.loads((workdir / "summary.json").read_text())
  assert summary["step"] == 6 and "eval/segm/AP" in summary["metrics"]
  assert "mask AP, PointRend 224x224" in res.stdout and "coarse 7x7" in res.stdout
  # The log says when XLA compiles.
  assert "compiling train step for bucket 64x64" in res.stderr
  assert "compiling predict for bucket 64x64" in res.stderr
  from tensorboard.backend.event_processing import event_accumulator
  events = event_accumulator.EventAccumulator(str(workdir / "tensorboard"))
  events.Reload()
  assert "eval/segm/AP" in events.Tags()["scalars"]


@pytest.mark.slow
def test_resume_after_sigkill_is_exact(reference_run, tmp_path):
  ref_dir, _ = reference_run
  workdir = tmp_path / "killed"
  # Slow steps so that the kill lands between the step-4 checkpoint and step 5.
  proc = subprocess.Popen(_cmd(workdir, "--config.train.debug_step_delay_s=1.5", mode="train"),
                          cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True)
  _wait_for(lambda: (workdir / "checkpoints" / "4").is_dir(), proc, what="checkpoint 4")
  proc.send_signal(signal.SIGKILL)
  proc.communicate()
  assert proc.returncode == -signal.SIGKILL
  assert 5 not in _losses(workdir)
  res = _run(_cmd(workdir, mode="train"))
  assert res.returncode == 0, res.stderr[-5000:]
  assert "resuming at step 4" in res.stderr
  ref, resumed = _losses(ref_dir), _losses(workdir)
  for step in (5, 6):
    assert abs(resumed[step] - ref[step]) <= 1e-6, (step, resumed[step], ref[step])


@pytest.mark.slow
def test_sigterm_saves_checkpoint_and_exits_cleanly(tmp_path):
  workdir = tmp_path / "term"
  proc = subprocess.Popen(_cmd(workdir, "--config.train.debug_step_delay_s=1.5", mode="train"),
                          cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True)
  metrics = workdir / "metrics.jsonl"
  _wait_for(lambda: metrics.exists() and 2 in _losses(workdir), proc, what="step 2")
  proc.send_signal(signal.SIGTERM)
  _, err = proc.communicate(timeout=120)
  assert proc.returncode == 0, err[-3000:]
  assert "stopping at step" in err
  steps = sorted(int(s) for s in os.listdir(workdir / "checkpoints") if s.isdigit())
  assert steps and 2 < steps[-1] < 6, steps
  assert max(_losses(workdir)) == steps[-1]


@pytest.mark.slow
def test_eval_with_missing_coco_fails_helpfully(tmp_path):
  missing = tmp_path / "nowhere" / "instances_val2017.json"
  res = _run([sys.executable, "launch.py", "--config=configs/r50_fpn_1x_coco.py",
              f"--workdir={tmp_path / 'run'}", "--mode=eval",
              f"--config.data.val.annotations={missing}"], timeout=120)
  assert res.returncode != 0
  assert f"expected COCO annotations at {missing}" in res.stderr
  assert "config.data.val.annotations" in res.stderr
  assert "download COCO 2017" in res.stderr
  assert "Traceback" not in res.stderr


def _load_config(path):
  if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
  spec = importlib.util.spec_from_file_location(f"_config_{path.stem}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_config_loads_with_required_keys(path):
  from pointrend_jax.data import pipeline
  from pointrend_jax.modeling import zoo
  from pointrend_jax.data import splits
  module = _load_config(path)
  doc = module.get_config.__doc__
  assert "python launch.py --config configs/" in doc and "Expected" in doc
  assert "Hardware" in doc
  config = module.get_config()
  for key in ("seed", "train.max_steps", "train.batch_size", "train.checkpoint_every",
              "train.log_every", "eval.every", "init.weights", "solver.base_lr"):
    node = config
    for part in key.split("."):
      node = node[part]
  for which in ("train", "val"):
    for key in ("source", "annotations", "images", "root", "split"):
      assert key in config.data[which], (which, key)
    assert config.data[which].source in splits.SOURCES
  assert config.train.batch_size % config.train.num_replicas_d2 == 0
  mcfg = zoo.model_config(config.model)
  pipeline.loader_config(config.data, mcfg)
  if not path.stem.startswith("synthetic"):
    assert config.model.zoo == path.stem  # the zoo configs use their model-zoo names
    assert config.init.weights.endswith(".pkl")
  assert mcfg.is_semantic == ("semantic" in path.stem)


@pytest.mark.slow
def test_semantic_synthetic_run(tmp_path):
  res = _run([sys.executable, "launch.py", "--config=configs/synthetic_semantic.py",
              f"--workdir={tmp_path}", "--config.data.synthetic.num_train=4",
              "--config.data.synthetic.num_val=2",
              "--config.data.synthetic.image_size=(64, 64)",
              "--config.model.overrides.input.min_size_train=(64,)",
              "--config.model.overrides.input.max_size_train=64",
              "--config.model.overrides.input.min_size_test=64",
              "--config.model.overrides.input.max_size_test=64",
              "--config.train.batch_size=2", "--config.train.max_steps=2",
              "--config.train.log_every=1", "--config.train.progress_bar=False",
              "--config.eval.num_images=2", "--config.eval.batch_size=2"])
  assert res.returncode == 0, res.stderr[-5000:]
  records = read_metrics(tmp_path)
  train = [r for r in records if "train/loss" in r]
  assert [r["step"] for r in train] == [1, 2]
  assert all(np.isfinite(r["train/loss_sem_seg"]) and np.isfinite(r["train/loss_sem_seg_point"])
             for r in train)
  evals = [r for r in records if "eval/sem_seg/mIoU" in r]
  assert len(evals) == 1 and 0.0 <= evals[0]["eval/sem_seg/mIoU"] <= 100.0
  assert "mIoU" in res.stdout


@pytest.mark.slow
def test_init_weights_backbone_full_and_orbax(tmp_path):
  import pickle
  from flax import nnx
  import jax
  from pointrend_jax.checkpoint import orbax_io
  from pointrend_jax.checkpoint.d2_model import d2_model_names
  from pointrend_jax.modeling import meta_arch
  from pointrend_jax.modeling import zoo
  from pointrend_jax import errors
  from pointrend_jax.training import train
  config = _load_config(REPO / "configs" / "synthetic_shapes.py").get_config()
  mcfg = zoo.model_config(config.model)
  model = train.build_run_model(config, mcfg)
  rng = np.random.default_rng(0)
  full = {k: rng.standard_normal(s).astype(np.float32)
          for k, s in d2_model_names(model).items()}
  stem = "backbone.bottom_up.stem.conv1.weight"

  def kernel(m):  # OIHW, as detectron2 stores it
    return np.asarray(m.backbone.bottom_up.stem.conv1.kernel[...]).transpose(3, 2, 0, 1)

  backbone_file = tmp_path / "imagenet.pkl"
  with open(backbone_file, "wb") as f:
    pickle.dump({"__author__": "test", "model": {
        k: v for k, v in full.items() if k.startswith("backbone.bottom_up.")}}, f)
  config.init.weights = str(backbone_file)
  rpn_before = np.asarray(model.proposal_generator.rpn_head.conv.kernel[...]).copy()
  assert "backbone (ImageNet)" in train.init_weights(model, config)
  np.testing.assert_array_equal(kernel(model), full[stem])
  np.testing.assert_array_equal(model.proposal_generator.rpn_head.conv.kernel[...], rpn_before)

  full_file = tmp_path / "model_final.pkl"
  with open(full_file, "wb") as f:
    pickle.dump({"__author__": "test", "model": full}, f)
  config.init.weights = str(full_file)
  assert "full detectron2 model" in train.init_weights(model, config)
  head = "proposal_generator.rpn_head.conv.weight"
  np.testing.assert_array_equal(
      np.asarray(model.proposal_generator.rpn_head.conv.kernel[...]).transpose(3, 2, 0, 1),
      full[head])

  converted = orbax_io.save_converted(model, mcfg, tmp_path / "converted")
  other = meta_arch.build_model(mcfg, rngs=nnx.Rngs(7))
  config.init.weights = str(converted)
  assert "orbax" in train.init_weights(other, config)
  for a, b in zip(jax.tree.leaves(nnx.to_pure_dict(nnx.state(model))),
                  jax.tree.leaves(nnx.to_pure_dict(nnx.state(other)))):
    np.testing.assert_array_equal(a, b)

  config.init.weights = str(tmp_path / "missing.pkl")
  with pytest.raises(errors.DataError, match="config.init.weights"):
    train.init_weights(model, config)
  config.init.weights = "detectron2://ImageNetPretrained/MSRA/R-50.pkl"
  with pytest.raises(errors.DataError, match="dl.fbaipublicfiles.com"):
    train.init_weights(model, config)
