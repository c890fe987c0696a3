"""Worker of ``test_multiprocess.py``: a few train steps in one process of a multi-process run.

Usage::

  python _multiprocess_worker.py OUT.json [--models semantic,instance]
      [--coordinator 127.0.0.1:PORT --num-processes N --process-id P]

Without ``--coordinator`` it is the single-process reference (all of the global batch fed by
this process). With it, :func:`pointrend_jax.training.mesh.initialize_distributed` starts JAX's
multi-process runtime (CPU collectives: gloo over TCP) and process ``P`` feeds rows
``[P*B/N, (P+1)*B/N)`` of the same global batch. Every process builds the same initial model
(same seed). Writes ``{"process_count", "device_count", ..., model: {mesh size: {"metrics": [per step
{name: float}], "param_sq": {leaf: sum of squares after the last step}, ...}}}``.

The number of local CPU devices is set by the caller (``JAX_NUM_CPU_DEVICES``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

from _tiny_batches import semantic_pair
from _tiny_models import tiny_instance_config, tiny_semantic_config, tiny_model

STEPS = 2


def numpy_init(build, seed: int = 0):
  """``build()`` under ``nnx.eval_shape``, filled with numpy weights through the d2 loader.

  Eager jax random init compiles one small program per parameter shape (seconds per model on
  CPU); numpy is instant and identical in every process. He-normal kernels, unit norm scales
  and running variances, zero biases and running means.
  """
  from flax import nnx
  from pointrend_jax.checkpoint.d2_model import d2_model_names, load_d2_model
  model = nnx.eval_shape(build)
  rng = np.random.default_rng(seed)
  state = {}
  for name, shape in sorted(d2_model_names(model).items()):
    if len(shape) >= 2:
      fan_in = int(np.prod(shape[1:]))
      state[name] = (rng.standard_normal(shape) * np.sqrt(2.0 / fan_in)).astype(np.float32)
    elif name.endswith("running_var") or name.endswith("weight"):
      state[name] = np.ones(shape, np.float32)
    else:
      state[name] = np.zeros(shape, np.float32)
  load_d2_model(model, state)
  return model


def semantic_setup():
  from pointrend_jax.training.losses_semantic import semantic_loss_fn
  config = tiny_semantic_config()
  config.model.overrides.point_head.train_num_points = 48
  config.solver.update(base_lr=0.001, warmup_iters=0, steps=())
  config.train.update(batch_size=8, num_replicas_d2=4)
  images, labels = semantic_pair()
  hw = images.shape[1]
  image = np.concatenate([images] * 4)
  sem_seg = np.concatenate([labels] * 4)
  for i in range(8):  # replicas (and processes) see different numbers of labelled pixels
    sem_seg[i, : 2 * i] = 255
  batch = {"image": image, "image_size": np.full((8, 2), hw, np.int32), "sem_seg": sem_seg}
  model = numpy_init(lambda: tiny_model(config))
  return config, model, semantic_loss_fn, batch


def instance_setup():
  from pointrend_jax.data import batching
  from pointrend_jax.training import losses_instance as L
  config = tiny_instance_config()
  config.solver.update(base_lr=0.001, warmup_iters=0, steps=())
  rng = np.random.default_rng(0)
  exs = []
  for i in range(4):  # 4 distinct images, one without instances
    h, w = ((56, 60), (64, 48), (60, 64), (48, 56))[i]
    img = rng.integers(0, 50, (h, w, 3)).astype(np.uint8)
    yy, xx = np.mgrid[:h, :w] + 0.5
    m1 = ((xx - 18 - i) / 12) ** 2 + ((yy - 22) / 9) ** 2 < 1
    m2 = (xx > 26 + 2 * i) & (xx < 46) & (yy > 28) & (yy < 47)
    img[m1] = (200, 40, 40)
    img[m2] = (40, 200, 60)
    masks = np.stack([m1, m2])
    boxes = []
    for m in masks:
      ys, xs = np.nonzero(m)
      boxes.append([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
    ex = dict(image=img, image_size=(h, w), gt_boxes=np.array(boxes, np.float32),
              gt_classes=np.array([0, 1 + i % 2]), gt_masks=masks)
    if i == 3:
      ex.update(gt_boxes=np.zeros((0, 4), np.float32), gt_classes=np.zeros(0, int),
                gt_masks=np.zeros((0, h, w), bool))
    exs.append(ex)
  full = batching.make_batch(exs, (64, 64), max_instances=3)
  batch = {k: full[k] for k in L.INSTANCE_BATCH_KEYS}
  model = numpy_init(lambda: tiny_model(config))
  return config, model, L.instance_loss_fn, batch


def run_model(name: str, args, mesh_sizes) -> dict:
  """``STEPS`` train steps of model ``name`` on a mesh of the first ``n`` global devices, for
  each ``n`` of ``mesh_sizes`` (0: all), each from the same initial state."""
  import jax
  from pointrend_jax.training import mesh as mesh_lib
  from pointrend_jax.training import optimizer
  from pointrend_jax.training import step as step_lib
  config, model, loss_fn, global_batch = SETUPS[name]()
  n = next(iter(global_batch.values())).shape[0]
  per = n // args.num_processes
  p = args.process_id
  local_batch = {k: v[p * per:(p + 1) * per] for k, v in global_batch.items()}
  tx, schedule = optimizer.make_optimizer(config, model)
  initial = jax.device_get(step_lib.create_train_state(model, tx, seed=0))  # host copy

  results = {}
  for size in mesh_sizes:
    mesh = mesh_lib.make_mesh(jax.devices()[:size] if size else None)
    state = mesh_lib.replicate(initial, mesh)  # fresh buffers: the step donates its input
    step = step_lib.make_train_step(loss_fn, tx, mesh=mesh,
                                 num_groups=config.train.num_replicas_d2, schedule=schedule)
    metrics = []
    for _ in range(STEPS):
      state, m = step(state, local_batch)  # shard_batch: make_array_from_process_local_data
      metrics.append({k: float(np.asarray(v)) for k, v in m.items()})
    flat = jax.tree_util.tree_flatten_with_path(state.params)[0]
    param_sq = {jax.tree_util.keystr(path): float(np.sum(np.square(
        np.asarray(leaf.addressable_data(0), np.float64)))) for path, leaf in flat}
    results[str(mesh.devices.size)] = {
        "metrics": metrics, "param_sq": param_sq, "num_traces": step.num_traces,
        "local_batch_size": per, "params_sharding": str(flat[0][1].sharding)}
  return results


def main() -> None:
  parser = argparse.ArgumentParser()
  parser.add_argument("out")
  parser.add_argument("--models", default="semantic,instance")
  parser.add_argument("--coordinator", default=None)
  parser.add_argument("--num-processes", type=int, default=1)
  parser.add_argument("--process-id", type=int, default=0)
  parser.add_argument("--meshes", default="0",
                      help="comma-separated mesh sizes (first n global devices; 0: all)")
  args = parser.parse_args()

  import jax
  if args.coordinator is not None:
    # gloo (TCP) is jax 0.10's default CPU collectives; explicit, it must precede the backend.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    from pointrend_jax.training import mesh as mesh_lib
    mesh_lib.initialize_distributed(args.coordinator, args.num_processes, args.process_id)
  assert jax.process_count() == args.num_processes, (jax.process_count(), args.num_processes)

  out = {"process_index": jax.process_index(), "process_count": jax.process_count(),
         "device_count": jax.device_count(), "local_device_count": jax.local_device_count()}
  for name in args.models.split(","):
    out[name] = run_model(name, args, [int(v) for v in args.meshes.split(",")])
  with open(args.out, "w") as f:
    json.dump(out, f)
  if args.coordinator is not None:
    jax.distributed.shutdown()


SETUPS = {"semantic": semantic_setup, "instance": instance_setup}


if __name__ == "__main__":
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(
      __file__)))))
  main()
