"""Semantic PointRend end to end: overfitting, 1 vs 8 devices, no recompilation.

One worker subprocess (8 forced host CPU devices) trains the tiny R18-GN semantic model on a
fixed global batch of 8 images (2 distinct images, different ignore regions) with 4 virtual
replicas, once on a 1-device mesh and once on all 8 devices, from the same initial state.
"""

import json
import os
import subprocess
import sys

import numpy as np

from _tiny_batches import semantic_pair
from _tiny_models import tiny_semantic_config, tiny_model
import pytest

pytestmark = pytest.mark.slow  # one training subprocess with 8 host devices

STEPS_1 = 6  # steps on the 1-device mesh (overfitting check)
STEPS_8 = 2  # steps on the 8-device mesh (compared with the first two 1-device steps)


def _worker(out_path):
  import jax
  from pointrend_jax.training import mesh as mesh_lib
  from pointrend_jax.training import optimizer
  from pointrend_jax.training import step as step_lib
  from pointrend_jax.training.losses_semantic import semantic_loss_fn

  assert jax.device_count() == 8, jax.devices()
  config = tiny_semantic_config()
  config.model.overrides.point_head.train_num_points = 48
  config.solver.update(base_lr=0.001, warmup_iters=0, steps=())
  config.train.update(batch_size=8, num_replicas_d2=4)

  images, labels = semantic_pair()
  hw = images.shape[1]
  image = np.concatenate([images] * 4)
  sem_seg = np.concatenate([labels] * 4)
  for i in range(8):  # replicas see different numbers of labelled pixels
    sem_seg[i, : 2 * i] = 255
  batch = {"image": image, "image_size": np.full((8, 2), hw, np.int32), "sem_seg": sem_seg}

  model = tiny_model(config)
  tx, schedule = optimizer.make_optimizer(config, model)
  initial = jax.device_get(step_lib.create_train_state(model, tx, seed=0))
  results = {}
  for n, steps in ((1, STEPS_1), (8, STEPS_8)):
    mesh = mesh_lib.make_mesh(jax.devices()[:n])
    state = mesh_lib.replicate(initial, mesh)  # fresh buffers (the step donates its input)
    step = step_lib.make_train_step(semantic_loss_fn, tx, mesh=mesh,
                                 num_groups=config.train.num_replicas_d2, schedule=schedule)
    metrics = []
    for _ in range(steps):
      state, m = step(state, batch)
      metrics.append({k: float(v) for k, v in jax.device_get(m).items()})
    results[n] = {"metrics": metrics, "num_traces": step.num_traces,
                  "num_compiled": step.num_compiled,
                  "params_sharding": str(jax.tree.leaves(state.params)[0].sharding)}
  results["toy"] = _toy_replica_per_device(jax, mesh_lib, optimizer, step_lib)
  with open(out_path, "w") as f:
    json.dump(results, f)


def _toy_replica_per_device(jax, mesh_lib, optimizer, step_lib):
  """8 virtual replicas on 1 and on 8 devices (one whole replica per device)."""
  import jax.numpy as jnp
  import ml_collections
  from flax import nnx
  from pointrend_jax.modeling import layers
  from pointrend_jax.training.losses_semantic import cross_entropy_ignore

  class Toy(nnx.Module):

    def __init__(self, rngs):
      self.conv = layers.Conv2d(3, 32, 3, padding=1, use_bias=False,
                                norm=layers.GroupNorm(32, 32), rngs=rngs)
      self.head = layers.Conv2d(32, 4, 1, rngs=rngs)

  def loss_fn(model, batch, key):
    del key
    logits = model.head(jax.nn.relu(model.conv(batch["image"].astype(jnp.float32) / 255)))
    ce = cross_entropy_ignore(logits, batch["sem_seg"])
    return ce, {"ce": ce}

  rng = np.random.default_rng(1)
  sem = rng.integers(0, 4, (16, 8, 8)).astype(np.uint8)
  sem[rng.uniform(size=sem.shape) < rng.uniform(size=(16, 1, 1))] = 255
  batch = {"image": (sem[..., None] * 40 + rng.integers(0, 60, (16, 8, 8, 3))).astype(np.uint8),
           "sem_seg": sem}
  config = ml_collections.ConfigDict({"solver": {"base_lr": 0.1, "steps": ()},
                                     "train": {"max_steps": 10}})
  model = Toy(nnx.Rngs(0))
  tx, _ = optimizer.make_optimizer(config, model)
  initial = jax.device_get(step_lib.create_train_state(model, tx))
  out = {}
  for n in (1, 8):
    mesh = mesh_lib.make_mesh(jax.devices()[:n])
    state = mesh_lib.replicate(initial, mesh)
    step = step_lib.make_train_step(loss_fn, tx, mesh=mesh, num_groups=8)
    losses = []
    for _ in range(2):
      state, m = step(state, batch)
      losses.append(float(m["loss"]))
    out[n] = losses
  return out


@pytest.fixture(scope="module")
def worker_results(tmp_path_factory):
  out = tmp_path_factory.mktemp("devices") / "results.json"
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS=(os.environ.get("XLA_FLAGS", "") +
                        " --xla_force_host_platform_device_count=8").strip())
  root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  proc = subprocess.run([sys.executable, os.path.abspath(__file__), str(out)], env=env,
                        cwd=root, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-4000:]
  with open(out) as f:
    return {(int(k) if k.isdigit() else k): v for k, v in json.load(f).items()}


def test_tiny_semantic_model_overfits(worker_results):
  losses = [m["loss"] for m in worker_results[1]["metrics"]]
  assert all(np.isfinite(losses))
  assert losses[-1] < 0.5 * losses[0], losses
  for m in worker_results[1]["metrics"]:
    np.testing.assert_allclose(m["loss"], m["loss_sem_seg"] + m["loss_sem_seg_point"],
                               rtol=1e-5)


def test_one_vs_eight_devices_same_losses(worker_results):
  one, eight = worker_results[1]["metrics"], worker_results[8]["metrics"]
  assert "'data': 8" in worker_results[8]["params_sharding"]  # really ran on 8 devices
  for a, b in zip(one[:STEPS_8], eight):
    for k in ("loss", "loss_sem_seg", "loss_sem_seg_point"):
      np.testing.assert_allclose(b[k], a[k], rtol=1e-5, atol=1e-6, err_msg=k)


def test_one_vs_eight_devices_whole_replica_per_device(worker_results):
  toy = worker_results["toy"]
  np.testing.assert_allclose(toy["8"], toy["1"], rtol=1e-5)


def test_second_step_does_not_recompile(worker_results):
  for n in (1, 8):
    assert worker_results[n]["num_traces"] == 1
    assert worker_results[n]["num_compiled"] == 1


if __name__ == "__main__":
  _worker(sys.argv[1])
