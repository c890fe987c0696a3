"""ImageNet initialisation end to end, as a zoo run starts: a Caffe2 ImageNet pickle (MSRA R-50 /
R-101, FAIR X-101-32x8d; ``shared/spec/checkpoint_format.md`` §1.2, §4: Caffe2 blob names,
detectron2 shapes from ``shared/spec/checkpoints``, FrozenBN ``_bn_{s,b,rm,riv}`` blobs, the
ImageNet classifier) named by ``config.init.weights`` of the zoo run config
(``configs/<name>.py``), loaded by :func:`train.init_weights` into the model of
:func:`train.build_run_model`, then one real step of :func:`train.train_loop` (the functions
``train_and_evaluate`` / ``launch.py`` run) on 2 tiny 64x64 images with the zoo's 80-class heads.

Checked: after init every ``backbone.bottom_up`` variable is its blob (compared here
independently of the loader: Caffe2 names from ``tests/checkpoint/_d2_names.py``, HWIO kernels
transposed back to OIHW) and every other variable keeps its random init; after the step exactly
the res3..res5 convs of the backbone were trained (detectron2's trainable count), the stem, res2
and every FrozenBN statistic are bit-identical, and every trained conv and every FPN / head module
moved by more than its weight decay (a gradient reached it). detectron2's own normalised form of
the pickle (``{"model": blobs, "__author__": "Caffe2", "matching_heuristics": True}``) reads the
same.
"""

from __future__ import annotations

import importlib
import math
import pathlib
import pickle
import sys

import numpy as np
import pytest

REPO = pathlib.Path(__file__).resolve().parents[2]
if str(REPO / "tests" / "checkpoint") not in sys.path:
  sys.path.insert(0, str(REPO / "tests" / "checkpoint"))
from _d2_names import BOTTOM_UP, MANIFESTS, to_c2  # noqa: E402

# run config (configs/<name>.py) -> detectron2 manifest of the same model.
BACKBONES = {
    "r50_fpn_1x_coco": "pointrend_rcnn_R_50_FPN_1x_coco",  # MSRA R-50: STRIDE_IN_1X1, G=1
    "r101_fpn_3x_coco": "pointrend_rcnn_R_101_FPN_3x_coco",  # MSRA R-101: 23 res4 blocks
    "x101_32x8d_fpn_3x_coco": "pointrend_rcnn_X_101_32x8d_FPN_3x_coco",  # FAIR: G=32, 1x1 s1
}


def _imagenet_blobs(manifest: dict, seed: int) -> dict[str, np.ndarray]:
  """The blobs of an ImageNet pickle for the manifest's backbone: Caffe2 names, detectron2
  (OIHW) shapes, float32; centred He-scaled kernels (stem scaled for the config's PIXEL_STD,
  last bottleneck convs 0.5) and FrozenBN entries near identity but distinct from the model's
  defaults; plus the ImageNet classifier ``pred_w`` / ``pred_b``."""
  rng = np.random.default_rng(seed)
  blobs = {}
  for entry in manifest["entries"]:
    name, shape = entry["name"], tuple(entry["shape"])
    if not name.startswith(BOTTOM_UP):
      continue
    if len(shape) == 4:
      fan_in = math.prod(shape[1:])
      gain = (float(np.mean(manifest["pixel_std"])) / 64 if ".stem." in name else
              0.5 if ".conv3." in name else math.sqrt(2.0))
      w = rng.standard_normal((shape[0], fan_in))
      w -= w.mean(axis=1, keepdims=True)
      value = (w * gain / math.sqrt(fan_in)).reshape(shape)
    elif name.endswith("norm.weight"):
      value = rng.uniform(0.8, 1.2, shape)
    elif name.endswith("norm.running_var"):
      value = rng.uniform(0.8, 1.25, shape)
    else:  # norm.bias, norm.running_mean
      value = rng.normal(0.0, 0.05, shape)
    blobs[to_c2(name)] = value.astype(np.float32)
  blobs["pred_w"] = (rng.standard_normal((1000, 2048)) * 0.01).astype(np.float32)
  blobs["pred_b"] = np.zeros(1000, np.float32)
  return blobs


def _flat(tree, prefix: str = "") -> dict[str, np.ndarray]:
  """A pure nested dict of arrays -> ``{dotted path: numpy copy}``."""
  out = {}
  for k, v in tree.items():
    if isinstance(v, dict):
      out.update(_flat(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = np.array(v)
  return out


def _values(model) -> dict[str, np.ndarray]:
  """Every variable of ``model`` (no RNG state), keyed by its module path."""
  from flax import nnx
  return _flat(nnx.to_pure_dict(nnx.state(model, nnx.Not(nnx.RngState))))


def _d2_name(path: str) -> str:
  """Model variable path -> detectron2 name (bottom-up backbone only: no renames needed)."""
  return path[:-len("kernel")] + "weight" if path.endswith(".kernel") else path


def _to_d2_layout(path: str, value: np.ndarray) -> np.ndarray:
  return value.transpose(3, 2, 0, 1) if value.ndim == 4 else value  # HWIO -> OIHW


def _beyond_decay(before: np.ndarray, after: np.ndarray, lr: float, wd: float) -> bool:
  """Whether one SGD step moved ``before`` by more than its weight decay (a gradient did)."""
  rest = np.abs(after.astype(np.float64) - before * (1.0 - lr * wd))
  return float(rest.max()) > 1e-6 * max(float(np.abs(before).max()), 1e-3)


@pytest.mark.slow
@pytest.mark.parametrize("zoo_name", list(BACKBONES))
def test_imagenet_pickle_inits_backbone_and_trains(zoo_name, tmp_path):
  import json

  from _tiny_batches import instance_batch
  from pointrend_jax.checkpoint import d2_reader
  from pointrend_jax.modeling import zoo
  from pointrend_jax.training import train
  from pointrend_jax.training.logging import read_metrics
  from pointrend_jax.training.losses_instance import INSTANCE_BATCH_KEYS, instance_loss_fn

  manifest = json.loads((MANIFESTS / f"{BACKBONES[zoo_name]}.json").read_text())
  blobs = _imagenet_blobs(manifest, seed=1)
  assert {"conv1_w", "res_conv1_bn_s", "res_conv1_bn_b", "res_conv1_bn_rm", "res_conv1_bn_riv",
          "res2_0_branch1_w", "res2_0_branch1_bn_s", "res2_0_branch2a_w", "res5_2_branch2c_bn_b",
          "pred_w", "pred_b"} <= set(blobs)
  # R-50.pkl & co.: a bare {blob: ndarray} pickle (§1.2), Python-2 era protocol.
  weights = tmp_path / "imagenet.pkl"
  with open(weights, "wb") as f:
    pickle.dump(blobs, f, protocol=2)
  # detectron2's own normalised form of that file ({"model", "__author__": "Caffe2",
  # "matching_heuristics": True}) must read the same.
  wrapped = tmp_path / "imagenet_d2_form.pkl"
  with open(wrapped, "wb") as f:
    pickle.dump({"model": blobs, "__author__": "Caffe2", "matching_heuristics": True}, f)
  bare, d2_form = (d2_reader.load_detectron2_file(p) for p in (weights, wrapped))
  assert bare.format == "caffe2" and bare.matching_heuristics
  assert d2_form.matching_heuristics and list(d2_form.state) == list(bare.state)

  # The zoo run config as launch.py loads it; only what 2 images x 1 CPU step needs changes.
  if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
  config = importlib.import_module(f"configs.{zoo_name}").get_config()
  config.init.weights = str(weights)
  config.train.update(max_steps=1, batch_size=2, num_replicas_d2=1, log_every=1,
                      progress_bar=False, async_checkpointing=False)
  config.solver.warmup_iters = 0  # the zoo's base lr at step 0 (warmup would give lr / 1000)
  train.validate_config(config)
  mcfg = zoo.model_config(config.model)
  assert mcfg.resnets.freeze_at == 2 and mcfg.resnets.norm == "FrozenBN"
  assert mcfg.roi_heads.num_classes == 80

  model = train.build_run_model(config, mcfg)
  random_init = _values(model)
  report = train.init_weights(model, config)
  assert "detectron2 backbone (ImageNet) weights" in report, report
  assert ("0 missing, 0 unexpected, 0 shape mismatches, 0 FrozenBN stats filled, 2 ignored"
          in report), report
  loaded = _values(model)
  assert list(loaded) == list(random_init)

  # (a) bottom_up is the file, converted; nothing else came from it.
  bottom_up = [p for p in loaded if p.startswith(BOTTOM_UP)]
  assert len(bottom_up) == len(blobs) - 2
  for path in bottom_up:
    blob = blobs[to_c2(_d2_name(path))]
    np.testing.assert_array_equal(_to_d2_layout(path, loaded[path]), blob, err_msg=path)
  for path in loaded:
    if not path.startswith(BOTTOM_UP):
      np.testing.assert_array_equal(loaded[path], random_init[path], err_msg=path)
  del random_init

  # (b) one step of the training loop.
  batch = {k: v[:2] for k, v in instance_batch().items()}
  state = train.train_loop(config, tmp_path / "run", model, instance_loss_fn,
                           train.InMemoryIterator([batch]), batch_keys=INSTANCE_BATCH_KEYS)
  assert int(state.step) == 1
  (logged,) = [m for m in read_metrics(tmp_path / "run") if "train/loss" in m]
  assert np.isfinite(logged["train/loss"]) and logged["train/loss_mask_point"] > 0, logged
  trained = _values(state.model())
  assert list(trained) == list(loaded)
  trainable = _flat(state.params)  # what the optimizer updates
  assert sum(v.size for v in trainable.values()) == manifest["num_trainable"]

  lr, wd = float(config.solver.base_lr), float(config.solver.weight_decay)
  assert logged["train/lr"] == pytest.approx(lr)
  # FREEZE_AT 2: of the bottom-up backbone exactly the res3..res5 convs train; the stem, res2
  # and every FrozenBN entry (all stages) stay bit-identical.
  assert sorted(p for p in trainable if p.startswith(BOTTOM_UP)) == sorted(
      p for p in bottom_up if p.endswith(".kernel")
      and p.startswith(tuple(f"{BOTTOM_UP}res{s}." for s in (3, 4, 5))))
  for path in loaded:
    if path not in trainable:
      np.testing.assert_array_equal(trained[path], loaded[path], err_msg=path)
  assert all(p.startswith(BOTTOM_UP) for p in loaded if p not in trainable)
  # Every trained backbone conv and every FPN / head module got a gradient.
  for path in trainable:
    if path.startswith(BOTTOM_UP):
      assert _beyond_decay(loaded[path], trained[path], lr, wd), path
  heads: dict[str, bool] = {}
  for path in trainable:
    if not path.startswith(BOTTOM_UP):
      module = path.rsplit(".", 1)[0]
      heads[module] = heads.get(module, False) or _beyond_decay(loaded[path], trained[path],
                                                                 lr, wd)
  assert any(m.startswith("backbone.fpn_") for m in heads) and any(
      m.startswith("mask_head.point_head.") for m in heads), sorted(heads)
  assert all(heads.values()), sorted(m for m, moved in heads.items() if not moved)
