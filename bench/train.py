"""Train-step time of R50-FPN PointRend (COCO) at 800x1344: step time, images/s, compile, memory.

Usage::

  python bench/train.py [--steps 3] [--warmup 1] [--bucket 800x1344] [--per-device-batch 2]
                        [--precisions highest,default] [--dtypes float32,bfloat16]
                        [--instances 20]

What runs: :func:`pointrend_jax.training.step_lib.make_train_step` with
:func:`pointrend_jax.training.losses_instance.instance_loss_fn` and the optimizer of the zoo
schedule (SGD momentum 0.9, wd 1e-4) on the zoo config ``r50_fpn_1x_coco`` (FrozenBN, FREEZE_AT
2, RPN 2000 train proposals/image, 512 ROIs/image, PointRend mask head with 14x14 points).
Data parallel over every device: global batch = ``per-device-batch`` x devices, split into
``devices`` virtual detectron2 replicas (detectron2 trains with 2 images per GPU).

Weights: numpy, well scaled (random init of a ResNet-50 with jax initializers compiles one
program per shape, minutes on CPU). The step's cost does not depend on them: every shape is
static.

Batch: :func:`pointrend_jax.data.batching.make_batch` of synthetic examples (seed 0): images of
800x1067 and 750x1333 (two COCO aspect ratios after ResizeShortestEdge 800 / max 1333) in the
``--bucket`` canvas, ``--instances`` ellipse masks per image (random centres, sizes 16-400 px,
80 classes) with their tight boxes, M = 100 GT slots, bit-packed masks.

Measured per compute dtype and precision (one row each, every dtype x every precision):

* lower (trace) and compile time of the jitted step (ahead of time, ``lower().compile()``);
* step time: median (and min) of ``--steps`` steps after ``--warmup`` steps, each ending in
  ``block_until_ready``; images/s = global batch / median;
* memory: XLA's buffer assignment of the step (``compiled.memory_analysis()``: arguments +
  outputs + temporaries - aliased), and the process peak: ``device.memory_stats()
  ["peak_bytes_in_use"]`` on GPU/TPU, host peak RSS (``getrusage``) on CPU. Both process peaks
  are running maxima: a later row includes the earlier rows' peak.

Precision: ``--dtypes`` sets the model's compute dtype (``build_model(..., dtype=...)``, the
``train.compute_dtype`` config key): ``float32`` (the parity setting) or ``bfloat16`` (bf16
activations and conv / matmul operands; variables, gradients, optimizer state, head outputs and
losses stay float32). Default: ``float32`` on CPU (where XLA has no fast bf16 convs), both
elsewhere. ``--precisions`` sets the conv / matmul precision (``build_model(...,
precision=...)``; ``highest``: true float32, the parity setting; ``default``: the backend's fast
path, TF32 on recent NVIDIA GPUs, bf16 passes on TPU; no effect on CPU; it is about float32
operands).
"""

from __future__ import annotations

import argparse
import math
import os
import resource
import statistics
import sys
import time
import types

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import _harness  # noqa: E402
import jax  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from pointrend_jax.data import batching  # noqa: E402
from pointrend_jax.modeling import layers  # noqa: E402
from pointrend_jax.checkpoint.d2_model import load_d2_model, random_d2_state  # noqa: E402
from pointrend_jax.modeling.meta_arch import abstract_model  # noqa: E402
from pointrend_jax.modeling.zoo import zoo_config  # noqa: E402
from pointrend_jax.training import mesh as mesh_lib  # noqa: E402
from pointrend_jax.training import optimizer as optimizer_lib  # noqa: E402
from pointrend_jax.training import step as step_lib  # noqa: E402
from pointrend_jax.training.losses_instance import (INSTANCE_BATCH_KEYS,  # noqa: E402
                                                    instance_loss_fn)

ZOO = "r50_fpn_1x_coco"
IMAGE_SIZES = ((800, 1067), (750, 1333))
GIB = 1024.0 ** 3


def synthetic_examples(n: int, instances: int, bucket: tuple[int, int], seed: int = 0
                       ) -> list[dict]:
  """``n`` images with ``instances`` ellipse masks each (boxes = the masks' tight boxes), sizes
  from ``IMAGE_SIZES`` cropped to ``bucket``."""
  rng = np.random.default_rng(seed)
  examples = []
  for i in range(n):
    h, w = IMAGE_SIZES[i % len(IMAGE_SIZES)]
    h, w = min(h, bucket[0]), min(w, bucket[1])
    image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    masks, boxes = [], []
    while len(masks) < instances:
      # Log-uniform sizes 16-400 px (COCO has many small objects), anywhere in the image.
      ry, rx = np.exp(rng.uniform(np.log(8), np.log(200), 2))
      cy, cx = rng.uniform(0, h), rng.uniform(0, w)
      y0, y1 = max(int(cy - ry), 0), min(int(math.ceil(cy + ry)) + 1, h)
      x0, x1 = max(int(cx - rx), 0), min(int(math.ceil(cx + rx)) + 1, w)
      yy, xx = np.mgrid[y0:y1, x0:x1] + 0.5
      inside = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 < 1
      if inside.sum() < 16:
        continue
      mask = np.zeros((h, w), bool)
      mask[y0:y1, x0:x1] = inside
      ys, xs = np.nonzero(inside)
      boxes.append([x0 + xs.min(), y0 + ys.min(), x0 + xs.max() + 1, y0 + ys.max() + 1])
      masks.append(mask)
      image[mask] = rng.integers(0, 256, 3, dtype=np.uint8)
    examples.append(dict(image=image, image_size=(h, w), gt_boxes=np.array(boxes, np.float32),
                         gt_classes=rng.integers(0, 80, instances),
                         gt_masks=np.stack(masks)))
  return examples


def solver_config() -> types.SimpleNamespace:
  """The zoo 1x schedule in the shape ``optimizer.make_optimizer`` reads (no ml_collections: the
  device machines do not have it)."""
  return types.SimpleNamespace(
      solver=dict(base_lr=0.02, steps=(60000, 80000), warmup_iters=1000, warmup_factor=0.001,
                  gamma=0.1, momentum=0.9, weight_decay=1e-4, weight_decay_norm=0.0),
      train=types.SimpleNamespace(max_steps=90000))


def peak_memory() -> tuple[str, float]:
  dev = jax.devices()[0]
  stats = dev.memory_stats() if dev.platform != "cpu" else None
  if stats and "peak_bytes_in_use" in stats:
    return "device peak", stats["peak_bytes_in_use"] / GIB
  # Linux reports ru_maxrss in KiB.
  return "host peak RSS", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB


def xla_memory(compiled) -> float:
  """GiB of the step's buffers per device as XLA assigned them (nan if unavailable)."""
  try:
    m = compiled.memory_analysis()
    total = (m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
             - m.alias_size_in_bytes)
    return total / GIB
  except Exception:  # pylint: disable=broad-except
    return float("nan")


def bench_precision(dtype: str, precision: str, model_state, tx, batch, mesh, num_groups: int,
                    warmup: int, steps: int, log) -> dict:
  global_batch = batch["image"].shape[0]
  name = f"{dtype}, {precision}"
  # The same variables in the model built with this dtype and precision.
  graphdef, _, _ = nnx.split(abstract_model(zoo_config(ZOO), dtype=dtype, precision=precision),
                             layers.TRAINABLE, ...)
  model_state = model_state.replace(graphdef=graphdef)
  step = step_lib.make_train_step(instance_loss_fn, tx, mesh=mesh, num_groups=num_groups)
  state = mesh_lib.replicate(model_state, mesh)  # fresh buffers: the step donates its input
  t0 = time.perf_counter()
  # The step's own jit, compiled ahead of time (TrainStep.__call__ would compile lazily).
  lowered = step._jitted.lower(state, batch, None)  # pylint: disable=protected-access
  lower_s = time.perf_counter() - t0
  t0 = time.perf_counter()
  compiled = lowered.compile()
  compile_s = time.perf_counter() - t0
  log(f"[{name}] lower {lower_s:.1f} s, compile {compile_s:.1f} s")
  times, losses = [], []
  for i in range(warmup + steps):
    t0 = time.perf_counter()
    state, metrics = compiled(state, batch, None)
    jax.block_until_ready(metrics)
    dt = time.perf_counter() - t0
    loss = float(metrics["loss"])
    losses.append(loss)
    log(f"[{name}] step {i} ({'warm-up' if i < warmup else 'timed'}): {dt:.2f} s, "
        f"loss {loss:.4f}")
    if i >= warmup:
      times.append(dt)
  if not all(np.isfinite(losses)):
    raise FloatingPointError(f"non-finite loss: {losses}")
  median = statistics.median(times)
  mem_kind, peak = peak_memory()
  return dict(dtype=dtype, precision=precision, lower_s=lower_s, compile_s=compile_s,
              median_s=median, min_s=min(times), runs=len(times),
              images_per_s=global_batch / median, xla_gib=xla_memory(compiled), mem_kind=mem_kind, peak_gib=peak, loss=losses[-1])


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--steps", type=int, default=3, help="timed steps")
  parser.add_argument("--warmup", type=int, default=1, help="untimed steps after compiling")
  parser.add_argument("--bucket", default="800x1344", help="padded canvas HxW")
  parser.add_argument("--per-device-batch", type=int, default=2)
  parser.add_argument("--instances", type=int, default=20, help="GT instances per image")
  parser.add_argument("--precisions", default=None,
                      help="comma-separated conv/matmul precisions (default: 'highest' on CPU, "
                           "'highest,default' elsewhere)")
  parser.add_argument("--dtypes", default=None,
                      help="comma-separated compute dtypes, float32 / bfloat16 (default: "
                           "'float32' on CPU, 'float32,bfloat16' elsewhere)")
  args = parser.parse_args()
  log = lambda s: print(f"  {s}", file=sys.stderr, flush=True)  # noqa: E731

  machine = _harness.machine_description()
  print(f"Machine: {machine}", flush=True)
  n_dev = jax.device_count()
  platform = jax.devices()[0].platform
  precisions = (args.precisions.split(",") if args.precisions
                else ["highest"] if platform == "cpu" else ["highest", "default"])
  dtypes = (args.dtypes.split(",") if args.dtypes
            else ["float32"] if platform == "cpu" else ["float32", "bfloat16"])
  for dtype in dtypes:
    layers.canonical_compute_dtype(dtype)  # fail before building anything
  hb, wb = (int(v) for v in args.bucket.lower().split("x"))
  global_batch = args.per_device_batch * n_dev

  cfg = zoo_config(ZOO)
  t0 = time.perf_counter()
  model = abstract_model(cfg)
  load_d2_model(model, random_d2_state(model, 0, cfg.pixel_std))
  tx, _ = optimizer_lib.make_optimizer(solver_config(), model)
  # Host copy of the initial state; each precision starts from it.
  initial = jax.device_get(step_lib.create_train_state(model, tx, seed=0))
  del model
  n_params = sum(int(np.size(v)) for v in jax.tree.leaves(initial.params))
  log(f"model {ZOO}: {n_params / 1e6:.1f} M trainable parameters, built in "
      f"{time.perf_counter() - t0:.1f} s")

  t0 = time.perf_counter()
  examples = synthetic_examples(global_batch, args.instances, (hb, wb))
  host = batching.make_batch(examples, (hb, wb), max_instances=100, mask_format="packed")
  host = {k: host[k] for k in INSTANCE_BATCH_KEYS}
  mesh = mesh_lib.make_mesh()
  batch = mesh_lib.shard_batch(host, mesh)
  log(f"batch {global_batch} x {hb}x{wb}, {args.instances} instances/image (M=100), made in "
      f"{time.perf_counter() - t0:.1f} s")

  rows = []
  for dtype in dtypes:
    for precision in precisions:
      rows.append(bench_precision(dtype, precision, initial, tx, batch, mesh, n_dev,
                                  args.warmup, args.steps, log))

  print(f"\nR50-FPN PointRend train step ({ZOO}), bucket {hb}x{wb}, global batch {global_batch} "
        f"({args.per_device_batch}/device x {n_dev} device(s), {n_dev} virtual replica(s)), "
        f"{args.instances} GT instances/image in M=100 slots, float32 variables; median of "
        f"{args.steps} steps after {args.warmup} warm-up.\n")
  print("| compute dtype | precision | lower (s) | compile (s) | step median (s) | step min (s) | "
        "images/s | XLA buffers/device (GiB) | peak memory (GiB) | loss |")
  print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
  for r in rows:
    print(f"| {r['dtype']} | {r['precision']} | {r['lower_s']:.1f} | {r['compile_s']:.1f} | "
          f"{r['median_s']:.3f} | {r['min_s']:.3f} | {r['images_per_s']:.2f} | "
          f"{r['xla_gib']:.2f} | {r['peak_gib']:.2f} ({r['mem_kind']}) | {r['loss']:.3f} |")


if __name__ == "__main__":
  main()
