"""The device benchmark of R50-FPN PointRend, and its portability check from any machine.

Usage::

  python bench/device.py [--out DIR]                 # on a GPU/TPU machine: everything, < 6 min
  python bench/device.py --lower-only [--platforms cuda,tpu]    # on any machine, CPU is enough
  python bench/device.py --memory                    # XLA's train-step buffers, zoo configs
  python bench/device.py --smoke [...]               # the same on tiny models (the tests)

``--lower-only`` lowers, with :mod:`jax.export` (no device of that kind needed), the predict
program of ``r50_fpn_1x_coco`` (1 x 800x1344) and of ``semantic_r101_fpn_cityscapes``
(1 x 1024x2048), and the full train step of ``r50_fpn_1x_coco`` (2 images at 800x1344, SGD
update included), each in float32 and bfloat16 compute, for every ``--platforms`` entry, and
prints per program and platform: success, StableHLO op count, ``while`` loops, ``case`` ops
(the per-platform choices that remain in a multi-platform program) and custom calls. Exits 1
if any program fails to lower.

``--memory`` compiles the train step of each zoo config at 2 images/device on this backend and
reports XLA's buffer assignment (``compiled.memory_analysis()``: temporaries, and arguments +
outputs + temporaries - aliased), float32 and bfloat16: the estimate to hold against a card's
memory. Canvases: COCO 800x1344, Cityscapes instance 1024x2048, Cityscapes semantic 512x1024
(the crop).

No flag: the device benchmark (written for one GPU or TPU, any backend works). In order of
importance, each result written to ``DIR/device.json`` and ``DIR/device.md`` as soon as it is
measured (a timeout still leaves numbers): predict program ms/image for ``r50_fpn_1x_coco`` at
800x1333 (bucket 800x1344) for batch 1 and 8, float32 and bfloat16, compile time apart; train
images/s/device at 2 images/device, float32 and bfloat16, conv/matmul precision ``default``
and ``highest``; the device's peak memory after each row; compile times. The predict program
is the device part of inference (no image decoding, resizing or host postprocessing).

Dependencies: jax, flax, optax, numpy and PyYAML (a flax dependency) and this checkout; not
ml_collections, grain, tensorflow_datasets or pycocotools (a test runs it with those blocked).
On a device machine without this package installed, run it from the repository root (the
script puts the checkout on ``sys.path``).

Weights are random but well scaled (:func:`~pointrend_jax.checkpoint.d2_model.random_d2_state`):
every shape is static, so the time does not depend on them. Train batches are
``bench/train.py``'s synthetic COCO-like images with 20 instances each.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import sys
import time
import traceback

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import _harness  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

import train as train_bench  # noqa: E402  (bench/train.py)
from pointrend_jax.checkpoint.d2_model import load_d2_model, random_d2_state  # noqa: E402
from pointrend_jax.data import batching  # noqa: E402
from pointrend_jax.modeling import zoo  # noqa: E402
from pointrend_jax.modeling.meta_arch import abstract_model  # noqa: E402
from pointrend_jax.modeling.predict import PredictProgram  # noqa: E402
from pointrend_jax.training import mesh as mesh_lib  # noqa: E402
from pointrend_jax.training import optimizer as optimizer_lib  # noqa: E402
from pointrend_jax.training import step as step_lib  # noqa: E402
from pointrend_jax.training.losses_instance import INSTANCE_BATCH_KEYS, instance_loss_fn  # noqa: E402
from pointrend_jax.training.losses_semantic import semantic_loss_fn  # noqa: E402

GIB = 1024.0 ** 3
DTYPES = ("float32", "bfloat16")

# name: (model config, predict bucket (H, W), train canvas (H, W)).
FULL = {
    "r50_fpn_1x_coco": (lambda: zoo.zoo_config("r50_fpn_1x_coco"), (800, 1344), (800, 1344)),
    "semantic_r101_fpn_cityscapes": (lambda: zoo.zoo_config("semantic_r101_fpn_cityscapes"),
                                     (1024, 2048), (512, 1024)),
}
MEMORY = {
    "r50_fpn_1x_coco": (800, 1344), "r101_fpn_3x_coco": (800, 1344),
    "x101_32x8d_fpn_3x_coco": (800, 1344), "r50_fpn_1x_cityscapes": (1024, 2048),
    "semantic_r101_fpn_cityscapes": (512, 1024),
}
_TINY_BACKBONE = dict(resnets=dict(depth=18, norm="GN", freeze_at=0, res2_out_channels=64),
                      fpn=dict(out_channels=64))
SMOKE = {
    "tiny_instance": (lambda: zoo.model_config({"num_classes": 3, "overrides": dict(
        _TINY_BACKBONE, anchors=dict(sizes=((8.0,), (16.0,), (32.0,), (64.0,), (128.0,))),
        rpn=dict(pre_nms_topk_train=200, post_nms_topk_train=64, pre_nms_topk_test=200,
                 post_nms_topk_test=64, batch_size_per_image=64),
        roi_heads=dict(batch_size_per_image=64, detections_per_image=16),
        box_head=dict(fc_dim=128), mask_head=dict(conv_dim=64, fc_dim=128),
        point_head=dict(fc_dim=64, train_num_points=196, subdivision_steps=3,
                        subdivision_num_points=196))}), (64, 64), (64, 64)),
    "tiny_semantic": (lambda: zoo.model_config({"num_classes": 4, "overrides": dict(
        _TINY_BACKBONE, meta_architecture="SemanticSegmentor",
        point_head=dict(coarse_pred_each_layer=False, train_num_points=64, subdivision_steps=2,
                        subdivision_num_points=64))}), (64, 64), (64, 64)),
}


def log(message: str) -> None:
  print(f"  {message}", file=sys.stderr, flush=True)


# --- Building the programs ---


def loaded_model(cfg, dtype: str, precision: str | None = None) -> nnx.Module:
  model = abstract_model(cfg, dtype=dtype, precision=precision)
  load_d2_model(model, random_d2_state(model, 0, cfg.pixel_std))
  return model


def train_batch(cfg, n: int, canvas: tuple[int, int]) -> dict[str, np.ndarray]:
  """``n`` synthetic training images on ``canvas`` (instances, or a semantic label map)."""
  instances = 4 if canvas[0] * canvas[1] <= 64 * 64 else 20
  examples = train_bench.synthetic_examples(n, instances, canvas)
  for ex in examples:  # synthetic_examples draws COCO's 80 classes
    ex["gt_classes"] = ex["gt_classes"] % cfg.num_classes
  if cfg.is_semantic:
    for ex in examples:
      label = np.full(ex["image_size"], 255, np.uint8)
      for c, m in zip(ex.pop("gt_classes"), ex.pop("gt_masks")):
        label[m] = c
      ex.pop("gt_boxes")
      ex["sem_seg"] = label
    host = batching.make_batch(examples, canvas, instance_targets=False, semantic_targets=True,
                               mask_format="none")
    return {k: host[k] for k in ("image", "image_size", "sem_seg")}
  host = batching.make_batch(examples, canvas, max_instances=100, mask_format="packed")
  return {k: host[k] for k in INSTANCE_BATCH_KEYS}


def train_program(cfg, dtype: str, per_device: int, canvas: tuple[int, int],
                  precision: str | None = None, abstract: bool = False):
  """``(TrainStep, initial state, sharded batch)`` of ``cfg`` at ``per_device`` images/device
  (one detectron2 replica per device, as the zoo's 2 images per GPU)."""
  n_dev = jax.device_count()
  model = (abstract_model(cfg, dtype=dtype, precision=precision) if abstract
           else loaded_model(cfg, dtype, precision))
  tx, schedule = optimizer_lib.make_optimizer(train_bench.solver_config(), model)
  mesh = mesh_lib.make_mesh()
  loss_fn = semantic_loss_fn if cfg.is_semantic else instance_loss_fn
  step = step_lib.make_train_step(loss_fn, tx, mesh=mesh, num_groups=n_dev, schedule=schedule)
  if abstract:
    state = jax.eval_shape(lambda: step_lib.create_train_state(model, tx))
  else:
    state = step_lib.create_train_state(model, tx, mesh=mesh)
  host = train_batch(cfg, per_device * n_dev, canvas)
  batch = ({k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in host.items()} if abstract
           else mesh_lib.shard_batch(host, mesh))
  return step, state, batch


# --- --lower-only ---


def stablehlo_summary(text: str) -> dict:
  ops = re.findall(r"\b(stablehlo|chlo)\.([a-z_0-9]+)", text)
  calls = collections.Counter(re.findall(r"stablehlo\.custom_call @([\w.$-]+)", text))
  return {"ops": sum(1 for _, name in ops if name != "return"),
          "while": text.count("stablehlo.while"), "case": text.count("stablehlo.case"),
          "custom_calls": dict(sorted(calls.items()))}


def lower_all(programs: dict, platforms: list[str], emit) -> list[dict]:
  rows = []
  for name, (make_cfg, bucket, canvas) in programs.items():
    cfg = make_cfg()
    for dtype in DTYPES:
      jobs = [("predict", f"1x{bucket[0]}x{bucket[1]}",
               lambda p: PredictProgram(abstract_model(cfg, dtype=dtype)).export(
                   1, *bucket, platforms=(p,)))]
      if not cfg.is_semantic or programs is SMOKE:
        jobs.append(("train step", f"2x{canvas[0]}x{canvas[1]}", lambda p: _export_train(
            cfg, dtype, canvas, p)))
      for kind, shape, export in jobs:
        for platform in platforms:
          row = dict(program=f"{kind} {name}", shape=shape, dtype=dtype, platform=platform)
          t0 = time.perf_counter()
          try:
            row.update(ok=True, **stablehlo_summary(export(platform).mlir_module()))
          except Exception as e:  # pylint: disable=broad-except  # reported, exit status 1
            row.update(ok=False, error=f"{type(e).__name__}: {' '.join(str(e).split())[:300]}")
          row["seconds"] = time.perf_counter() - t0
          rows.append(row)
          emit(rows)
  return rows


def _export_train(cfg, dtype, canvas, platform):
  step, state, batch = train_program(cfg, dtype, 2, canvas, abstract=True)
  return step.export(state, batch, platforms=(platform,))


def lower_table(rows: list[dict]) -> str:
  lines = ["| program | shape | dtype | platform | lowers | StableHLO ops | while | case | "
           "custom calls | lower (s) |", "| --- | --- | --- | --- | --- | ---: | ---: | ---: | "
           "--- | ---: |"]
  for r in rows:
    if r["ok"]:
      calls = ", ".join(f"{k} x{v}" for k, v in r["custom_calls"].items()) or "none"
      lines.append(f"| {r['program']} | {r['shape']} | {r['dtype']} | {r['platform']} | yes | "
                   f"{r['ops']} | {r['while']} | {r['case']} | {calls} | {r['seconds']:.1f} |")
    else:
      lines.append(f"| {r['program']} | {r['shape']} | {r['dtype']} | {r['platform']} | "
                   f"**no**: {r['error']} | | | | | {r['seconds']:.1f} |")
  return "\n".join(lines)


# --- --memory ---


def memory_rows(configs: dict, emit) -> list[dict]:
  rows = []
  for name, canvas in configs.items():
    cfg = (SMOKE[name][0] if name in SMOKE else lambda: zoo.zoo_config(name))()
    for dtype in DTYPES:
      t0 = time.perf_counter()
      step, state, batch = train_program(cfg, dtype, 2, canvas, abstract=True)
      m = step.lower(state, batch).compile().memory_analysis()
      rows.append(dict(config=name, canvas=f"{canvas[0]}x{canvas[1]}", dtype=dtype,
                       temp_gib=m.temp_size_in_bytes / GIB,
                       total_gib=(m.argument_size_in_bytes + m.output_size_in_bytes
                                  + m.temp_size_in_bytes - m.alias_size_in_bytes) / GIB,
                       seconds=time.perf_counter() - t0))
      log(f"memory {name} {dtype}: {rows[-1]['total_gib']:.2f} GiB "
          f"({rows[-1]['seconds']:.0f} s)")
      emit(rows)
  return rows


def memory_table(rows: list[dict]) -> str:
  lines = ["| config | canvas (2 images/device) | compute dtype | temporaries (GiB) | "
           "arguments + outputs + temporaries - aliased (GiB) |", "| --- | --- | --- | ---: | ---: |"]
  lines += [f"| {r['config']} | {r['canvas']} | {r['dtype']} | {r['temp_gib']:.2f} | "
            f"{r['total_gib']:.2f} |" for r in rows]
  return "\n".join(lines)


# --- The device benchmark ---


def bench_predict(cfg, name: str, dtype: str, batch: int, bucket, size, repeats: int) -> dict:
  program = PredictProgram(loaded_model(cfg, dtype))
  program.compile(batch, *bucket)
  rng = np.random.default_rng(0)
  images = np.zeros((batch,) + tuple(bucket) + (3,), np.uint8)
  images[:, :size[0], :size[1]] = rng.integers(0, 256, (batch,) + tuple(size) + (3,))
  images, sizes = jnp.asarray(images), jnp.asarray([size] * batch, jnp.int32)
  seconds, _ = _harness.timed(lambda: program(images, sizes), repeats)
  return dict(bench="predict", config=name, dtype=dtype, batch=batch,
              shape=f"{batch}x{bucket[0]}x{bucket[1]}",
              compile_s=program.compile_seconds[(batch,) + tuple(bucket)],
              ms_per_image=1e3 * seconds / batch)


def bench_train(cfg, name: str, dtype: str, precision: str, canvas, steps: int) -> dict:
  step, state, batch = train_program(cfg, dtype, 2, canvas, precision=precision)
  t0 = time.perf_counter()
  compiled = step.lower(state, batch).compile()
  compile_s = time.perf_counter() - t0
  times, loss = [], float("nan")
  for i in range(1 + steps):
    t0 = time.perf_counter()
    state, metrics = compiled(state, batch, None)
    loss = float(jax.block_until_ready(metrics)["loss"])
    if i:
      times.append(time.perf_counter() - t0)
  if not np.isfinite(loss):
    raise FloatingPointError(f"non-finite loss {loss}")
  return dict(bench="train", config=name, dtype=dtype, precision=precision,
              shape=f"2x{canvas[0]}x{canvas[1]}/device", compile_s=compile_s,
              step_s=float(np.median(times)), images_per_s_per_device=2 / np.median(times),
              xla_gib=train_bench.xla_memory(compiled), loss=loss)


def device_rows(programs: dict, repeats: int, steps: int, emit) -> list[dict]:
  name, (make_cfg, bucket, canvas) = next(iter(programs.items()))
  cfg = make_cfg()
  size = (bucket[0], bucket[1] - 11) if programs is FULL else tuple(v - 4 for v in bucket)
  plan = [("predict", "float32", 1), ("train", "float32", "default"),
          ("predict", "bfloat16", 1), ("train", "bfloat16", "default"),
          ("predict", "float32", 8), ("predict", "bfloat16", 8),
          ("train", "float32", "highest"), ("train", "bfloat16", "highest")]
  if programs is SMOKE:  # every kind of row once, in CPU-test time
    plan = plan[:3]
  rows = []
  for kind, dtype, arg in plan:
    t0 = time.perf_counter()
    try:
      if kind == "predict":
        row = bench_predict(cfg, name, dtype, arg, bucket, size, repeats)
      else:
        row = bench_train(cfg, name, dtype, arg, canvas, steps)
    except Exception as e:  # pylint: disable=broad-except  # one failed row, not the rest
      traceback.print_exc()
      row = dict(bench=kind, config=name, dtype=dtype, arg=arg,
                 error=f"{type(e).__name__}: {' '.join(str(e).split())[:300]}")
    row["peak"] = train_bench.peak_memory()
    row["seconds"] = time.perf_counter() - t0
    rows.append(row)
    log(json.dumps(row))
    emit(rows)
  return rows


def device_table(rows: list[dict]) -> str:
  lines = ["| benchmark | dtype | precision | shape | compile (s) | result | XLA buffers (GiB) | "
           "peak memory (GiB) |", "| --- | --- | --- | --- | ---: | ---: | ---: | ---: |"]
  for r in rows:
    peak = f"{r['peak'][1]:.2f} ({r['peak'][0]})"
    if "error" in r:
      lines.append(f"| {r['bench']} | {r['dtype']} | | | | **failed**: {r['error']} | | {peak} |")
    elif r["bench"] == "predict":
      lines.append(f"| predict {r['config']} | {r['dtype']} | default | {r['shape']} | "
                   f"{r['compile_s']:.1f} | {r['ms_per_image']:.1f} ms/image | | {peak} |")
    else:
      lines.append(f"| train step {r['config']} | {r['dtype']} | {r['precision']} | "
                   f"{r['shape']} | {r['compile_s']:.1f} | {r['images_per_s_per_device']:.2f} "
                   f"images/s/device ({r['step_s']:.3f} s/step) | {r['xla_gib']:.2f} | {peak} |")
  return "\n".join(lines)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--lower-only", action="store_true",
                      help="lower every program for --platforms with jax.export and exit")
  parser.add_argument("--platforms", default="cuda,tpu", help="for --lower-only")
  parser.add_argument("--memory", action="store_true",
                      help="XLA's train-step buffers of the zoo configs on this backend")
  parser.add_argument("--smoke", action="store_true", help="tiny models and canvases (tests)")
  parser.add_argument("--out", default="bench/results", help="directory for device.json/.md")
  parser.add_argument("--repeats", type=int, default=5, help="timed predict calls")
  parser.add_argument("--steps", type=int, default=3, help="timed train steps")
  args = parser.parse_args(argv)
  programs = SMOKE if args.smoke else FULL
  machine = _harness.machine_description()
  print(f"Machine: {machine}", flush=True)
  os.makedirs(args.out, exist_ok=True)
  mode = "lower" if args.lower_only else "memory" if args.memory else "device"
  stem = os.path.join(args.out, f"device_{mode}")
  title = {"lower": f"jax.export lowering for {args.platforms}",
           "memory": "train-step memory (XLA buffer assignment), 2 images/device",
           "device": "device benchmark"}[mode]
  table = {"lower": lower_table, "memory": memory_table, "device": device_table}[mode]

  def emit(rows):
    with open(stem + ".json.tmp", "w") as f:
      json.dump({"machine": machine, "rows": rows}, f, indent=1, default=str)
    os.replace(stem + ".json.tmp", stem + ".json")
    with open(stem + ".md", "w") as f:
      f.write(f"### {title}\n\nMachine: {machine}\n\n{table(rows)}\n")

  t0 = time.perf_counter()
  if mode == "lower":
    rows = lower_all(programs, args.platforms.split(","), emit)
  elif mode == "memory":
    rows = memory_rows({k: v[2] for k, v in SMOKE.items()} if args.smoke else MEMORY, emit)
  else:
    rows = device_rows(programs, args.repeats, args.steps, emit)
  print(f"\n{table(rows)}\n\n({time.perf_counter() - t0:.0f} s; {stem}.md, {stem}.json)")
  failed = [r for r in rows if r.get("ok") is False or "error" in r]
  return 1 if failed else 0


if __name__ == "__main__":
  sys.exit(main())
