"""Inference time of R50-FPN PointRend (COCO) at 800x1333, and mask-head FLOPs vs a dense head.

Usage::

  python bench/inference.py [--repeats 3]

Weights: the parity fixtures' deterministic ``make_weights.py`` (seed 0; ``../shared`` beside
the checkout) when present, else :func:`pointrend_jax.checkpoint.d2_model.random_d2_state`. Timing does
not depend on the weights (every shape is static: the mask head always runs on
``DETECTIONS_PER_IMAGE`` = 100 rows), but sane weights keep the host postprocessing realistic.

Input: the fixture photo (else a random image) resized to 480x800, which detectron2's test
resize takes to 800x1333; padded to the 800x1344 bucket.

Measured (batch 1, float32):

* compile: ahead-of-time ``lower().compile()`` of the whole predict program for the bucket;
* steady state, device: the compiled program on a prepared input (median of ``--repeats``);
* steady state, end to end: ``Predictor.__call__`` on a uint8 array (PIL resize, padding, device,
  host postprocess: box scaling, mask pasting at 480x800, RLE), and the host postprocess alone;
* breakdown: backbone (normalize + ResNet-50 + FPN), RPN (head + proposals), box head (pooler,
  2 FC, class-aware NMS), mask head (PointRend subdivision), each compiled on its own (no fusion
  across the cuts, so the parts need not add up to the whole).

FLOPs from XLA's cost analysis (``jax.jit(f).lower(...).compile().cost_analysis()["flops"]``;
convolutions / matmuls count 2 per multiply-add, elementwise ops 1 per element, gathers 0):

* PointRend mask head, 100 detections on a 200x336 p2 map: coarse head (p2 sampled on a 14x14
  grid per box, conv 2x2/2 256->256, fc 12544->1024->1024->80*49) + point head on the 28x28
  grid + 3 subdivision steps (x2 upsampling, uncertainty, top-784, point head on 784 points:
  fc (256+80)->256 x3 with the coarse prediction appended, predictor (256+80)->80), with the
  point-head outputs of all 80 classes as detectron2;
* dense "4conv@224": per ROI 4x conv3x3 256->256 + ReLU at 224x224, 1x1 conv 256->80, on
  [100, 224, 224, 256] ROI features;
* dense "paper": the PointRend paper's Mask R-CNN head grown to 224x224 output: 4x conv3x3
  256->256 + ReLU at 112x112, deconv 2x2/2 256->256 + ReLU to 224x224, 1x1 conv 256->80;
* for reference, the standard Mask R-CNN head (the same at 14x14 -> 28x28 output).
Neither dense head counts producing its ROI features (ROIAlign at 112/224): XLA counts that
gather as ~0 flops anyway, and PointRend's own point sampling (also gathers) is included.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import pathlib
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _harness  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402
from PIL import Image  # noqa: E402

from pointrend_jax.inference import Predictor  # noqa: E402
from pointrend_jax.checkpoint.d2_model import d2_model_names  # noqa: E402
from pointrend_jax import postprocess  # noqa: E402
from pointrend_jax.modeling.meta_arch import abstract_model  # noqa: E402
from pointrend_jax.modeling.zoo import zoo_config  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]
PARITY = REPO.parent / "shared" / "fixtures" / "detectron2_parity"
ORIG_HW = (480, 800)


def fixture_weights(cfg):
  """``make_weights.py`` seed-0 weights for our model's names, or None if unavailable."""
  path = PARITY / "make_weights.py"
  if not path.is_file():
    return None
  spec = importlib.util.spec_from_file_location("d2_make_weights", path)
  mw = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mw)
  names = d2_model_names(abstract_model(cfg))
  return {n: mw.make_param(n, s, "float32", 0, list(cfg.pixel_std)) for n, s in names.items()}


def test_image() -> np.ndarray:
  photo = PARITY / "r50_fpn_1x_coco" / "image.png"
  if photo.is_file():
    img = Image.open(photo).convert("RGB").resize((ORIG_HW[1], ORIG_HW[0]), Image.BILINEAR)
    return np.asarray(img)
  return np.random.default_rng(0).integers(0, 256, ORIG_HW + (3,), dtype=np.uint8)


def flops_of(fn, *args) -> float:
  analysis = jax.jit(fn).lower(*args).compile().cost_analysis()
  if isinstance(analysis, (list, tuple)):  # older jax: one dict per program
    analysis = analysis[0]
  return float(analysis["flops"])


def dense_head_flops(num_rois: int, num_classes: int, conv_side: int, upsample: bool) -> float:
  """XLA flops of a dense Mask R-CNN-style mask head (see the module docstring): 4x conv3x3
  256->256 + ReLU at ``conv_side``, optionally deconv 2x2/2 256->256 + ReLU, 1x1 conv
  256->``num_classes``, on ``[num_rois, conv_side, conv_side, 256]`` ROI features."""
  f32 = jnp.float32
  x = jax.ShapeDtypeStruct((num_rois, conv_side, conv_side, 256), f32)
  w3 = [jax.ShapeDtypeStruct((3, 3, 256, 256), f32) for _ in range(4)]
  wd = jax.ShapeDtypeStruct((2, 2, 256, 256), f32)
  wp = jax.ShapeDtypeStruct((1, 1, 256, num_classes), f32)
  dn = ("NHWC", "HWIO", "NHWC")

  def head(x, w3, wd, wp):
    for w in w3:
      x = jax.nn.relu(jax.lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=dn))
    if upsample:
      x = jax.nn.relu(jax.lax.conv_transpose(x, wd, (2, 2), "VALID", dimension_numbers=dn))
    return jax.lax.conv_general_dilated(x, wp, (1, 1), "VALID", dimension_numbers=dn)

  return flops_of(head, x, w3, wd, wp)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--repeats", type=int, default=3)
  args = parser.parse_args()
  machine = _harness.machine_description()
  print(f"Machine: {machine}", flush=True)
  log = lambda s: print(f"  {s}", file=sys.stderr, flush=True)  # noqa: E731

  cfg = zoo_config("r50_fpn_1x_coco")
  t0 = time.perf_counter()
  state = fixture_weights(cfg)
  weights_note = "make_weights.py seed 0" if state is not None else "random_d2_state seed 0"
  predictor = Predictor(cfg, state)
  log(f"weights ({weights_note}) built and loaded in {time.perf_counter() - t0:.1f} s")

  image = test_image()
  resized, orig, hw = predictor._prepare(image)  # pylint: disable=protected-access
  bucket = predictor.bucket_for(*hw)
  log(f"image {orig} -> resized {hw} -> bucket {bucket}")
  program = predictor.program
  program.compile(1, *bucket)
  compile_s = program.compile_seconds[(1,) + bucket]
  log(f"compile {compile_s:.1f} s")
  images = np.zeros((1,) + bucket + (3,), np.uint8)
  images[0, :hw[0], :hw[1]] = resized
  sizes = np.asarray([hw], np.int32)
  dev_med, dev_min = _harness.timed(lambda: program(images, sizes), args.repeats)
  log(f"device steady {dev_med * 1e3:.0f} ms")
  e2e_med, e2e_min = _harness.timed(lambda: predictor(image), args.repeats)
  n_det = len(predictor(image))
  log(f"end-to-end steady {e2e_med * 1e3:.0f} ms ({n_det} detections)")
  assert predictor.num_compiles == 1, program.compile_seconds
  raw = jax.tree.map(lambda a: np.asarray(a)[0], jax.device_get(program(images, sizes)))
  host_med, host_min = _harness.timed(
      lambda: postprocess.instances(raw, orig, hw, predictor.class_names), args.repeats)
  log(f"host postprocess {host_med * 1e3:.0f} ms")

  # Breakdown: each stage compiled on its own, fed the previous stage's outputs.
  graphdef, st = nnx.split(predictor.model)
  m = lambda s: nnx.merge(graphdef, s)  # noqa: E731

  def backbone(s, images, sizes):
    model = m(s)
    return model.features(model.preprocess(images, sizes))[1]

  def rpn(s, feats, sizes):
    p = m(s).proposal_generator(feats, sizes).proposals
    return p.boxes, p.valid

  def box(s, feats, boxes, valid, sizes):
    model = m(s)
    cls, deltas = model.roi_heads.box_outputs(feats, boxes, valid)
    d = model.roi_heads.inference(cls, deltas, boxes, valid, sizes)
    return d.boxes, d.classes

  def mask(s, feats, boxes, classes):
    b, d = classes.shape
    return m(s).mask_head.subdivision_inference(
        feats, boxes.reshape(b * d, 4), jnp.repeat(jnp.arange(b, dtype=jnp.int32), d),
        classes.reshape(b * d))

  # Each stage is compiled here (timed) and its outputs feed the next stage.
  rows = []
  jsizes = jnp.asarray(sizes)
  stages = (("backbone (R50 + FPN)", backbone, lambda: (st, images, jsizes)),
            ("RPN", rpn, lambda: (st, outs["backbone"], jsizes)),
            ("box head + NMS", box, lambda: (st, outs["backbone"], *outs["rpn"], jsizes)),
            ("PointRend mask head", mask, lambda: (st, outs["backbone"], *outs["box"])))
  outs = {}
  for (name, f, make_args), short in zip(stages, ("backbone", "rpn", "box", "mask")):
    f_args = make_args()
    t = time.perf_counter()
    compiled = jax.jit(f).lower(*f_args).compile()
    c = time.perf_counter() - t
    outs[short] = compiled(*f_args)
    med, mn = _harness.timed(lambda: compiled(*f_args), args.repeats)
    rows.append((name, c, med, mn))
    log(f"{name}: compile {c:.1f} s, median {med * 1e3:.0f} ms")
  feats = outs["backbone"]
  dboxes, dclasses = outs["box"]

  # FLOPs.
  p2 = feats["p2"]
  num_classes = cfg.roi_heads.num_classes
  d = cfg.roi_heads.detections_per_image

  def mask_head_only(s, p2, boxes, classes):
    return m(s).mask_head.subdivision_inference(
        p2, boxes, jnp.zeros((boxes.shape[0],), jnp.int32), classes)

  pr_flops = flops_of(mask_head_only, st, p2, dboxes[0], dclasses[0])
  dense224 = dense_head_flops(d, num_classes, 224, upsample=False)
  dense_paper = dense_head_flops(d, num_classes, 112, upsample=True)
  standard28 = dense_head_flops(d, num_classes, 14, upsample=True)

  print(f"\nR50-FPN PointRend (COCO), batch 1, input {orig[0]}x{orig[1]} -> {hw[0]}x{hw[1]} "
        f"(bucket {bucket[0]}x{bucket[1]}), float32, weights: {weights_note}, "
        f"{args.repeats} timed runs after a warm-up.\n")
  print("| what | compile (s) | steady median (ms) | min (ms) |")
  print("| --- | ---: | ---: | ---: |")
  print(f"| whole predict (device) | {compile_s:.1f} | {dev_med * 1e3:.0f} | {dev_min * 1e3:.0f} |")
  print(f"| end to end (resize + device + postprocess + RLE, {n_det} dets) | - | "
        f"{e2e_med * 1e3:.0f} | {e2e_min * 1e3:.0f} |")
  print(f"| host postprocess only (scale boxes, paste {n_det} masks at {orig[0]}x{orig[1]}, RLE) "
        f"| - | {host_med * 1e3:.0f} | {host_min * 1e3:.0f} |")
  for name, c, med, mn in rows:
    print(f"| {name} | {c:.1f} | {med * 1e3:.0f} | {mn * 1e3:.0f} |")
  parts = sum(r[2] for r in rows)
  print(f"| sum of the four parts | - | {parts * 1e3:.0f} | - |")

  g = 1e9
  print(f"\nMask-head FLOPs, {d} detections, {num_classes} classes, 224x224 output "
        "(XLA cost analysis):\n")
  print("| head | GFLOPs total | GFLOPs per ROI | ratio to PointRend |")
  print("| --- | ---: | ---: | ---: |")
  print(f"| PointRend (coarse 7x7 + 28x28 + 3 steps x 784 pts) | {pr_flops / g:.1f} | "
        f"{pr_flops / d / g:.2f} | 1.0 |")
  print(f"| dense paper-style (4 conv@112 + deconv to 224 + 1x1) | {dense_paper / g:.0f} | "
        f"{dense_paper / d / g:.1f} | {dense_paper / pr_flops:.0f}x |")
  print(f"| dense 4 conv@224 + 1x1 | {dense224 / g:.0f} | {dense224 / d / g:.1f} | "
        f"{dense224 / pr_flops:.0f}x |")
  print(f"| (reference) standard Mask R-CNN 28x28 head (4 conv@14 + deconv + 1x1) | "
        f"{standard28 / g:.1f} | {standard28 / d / g:.2f} | {standard28 / pr_flops:.2f}x |")


if __name__ == "__main__":
  main()
