"""Data benchmarks: mask-target representation study, training-pipeline throughput, COCO eval time.

Usage::

  python bench/data.py [--parts masks,pipeline,eval] [--quick]

Parts (each prints a markdown table, headed by the machine):

* ``masks``: memory of the mask-target layouts at COCO sizes (B=2 per device, M=100), and the
  error of box-cropped fixed-size masks against the exact full-image bitmask on what PointRend
  reads from it -- bilinear point labels (196 points per ROI: 147 "uncertain" + 49 uniform,
  mimicking its importance sampling) and the 7x7 ROIAlign coarse target -- plus the error of
  clamping that ROIAlign at the padded canvas instead of the image (see ``batching``).
* ``pipeline``: images/s of :func:`build_train_loader` (COCO input settings, 2 images per
  batch) on ~30 made-up COCO-sized JPEGs (480x640, ~7 polygon instances each) with 0, 1 and 2
  grain workers.
* ``eval``: time to evaluate 5000 images' worth of detections (100 per image, RLE masks) with
  ``pointrend_jax.evaluation.coco_eval`` against synthetic ground truth.

``--quick`` shrinks every part (for checking the script, not for numbers).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import pathlib
import sys
import tempfile
import time
from typing import Any

import numpy as np
from PIL import Image, ImageDraw
import pycocotools.mask as mask_util

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from pointrend_jax.data import batching  # noqa: E402
from pointrend_jax.data import coco  # noqa: E402
from pointrend_jax.data import pipeline  # noqa: E402
from pointrend_jax.data import transforms as T  # noqa: E402

# ------------------------------------------------------------------------------------------------
# Made-up COCO-like data.


def _random_polygon(rng: np.random.Generator, height: int, width: int) -> list[float]:
  """A star-convex blob with a COCO-like size distribution (small / medium / large)."""
  side = min(height, width)
  r = side * math.exp(rng.uniform(math.log(0.02), math.log(0.45)))
  cx, cy = rng.uniform(0.1, 0.9) * width, rng.uniform(0.1, 0.9) * height
  k = 32
  phase = rng.uniform(0, 2 * math.pi, size=3)
  ang = np.linspace(0, 2 * math.pi, k, endpoint=False)
  rad = r * (1 + 0.25 * np.sin(2 * ang + phase[0]) + 0.15 * np.sin(3 * ang + phase[1]) +
             0.08 * np.sin(5 * ang + phase[2]))
  xs = np.clip(cx + rad * np.cos(ang), 0, width)
  ys = np.clip(cy + rad * np.sin(ang), 0, height)
  return np.round(np.stack([xs, ys], 1).reshape(-1), 2).tolist()


def make_coco_like(root: pathlib.Path, num_images: int, size=(480, 640), instances: int = 7,
                   seed: int = 0, num_classes: int = 80) -> tuple[pathlib.Path, pathlib.Path]:
  """Writes JPEG images + a COCO instances JSON with polygon annotations."""
  rng = np.random.default_rng(seed)
  h, w = size
  images_dir = root / "images"
  images_dir.mkdir(parents=True, exist_ok=True)
  images, anns = [], []
  for i in range(num_images):
    base = rng.integers(0, 256, size=(h // 8, w // 8, 3), dtype=np.uint8)
    img = Image.fromarray(base).resize((w, h), Image.BILINEAR)
    draw = ImageDraw.Draw(img)
    n = max(1, int(rng.poisson(instances)))
    for _ in range(n):
      poly = _random_polygon(rng, h, w)
      draw.polygon(poly, fill=tuple(int(c) for c in rng.integers(0, 256, 3)))
      rle = mask_util.merge(mask_util.frPyObjects([poly], h, w))
      area = float(mask_util.area(rle))
      if area < 4:
        continue
      bbox = [float(v) for v in mask_util.toBbox(rle)]
      anns.append({"id": len(anns) + 1, "image_id": i + 1, "category_id":
                   int(rng.integers(1, num_classes + 1)), "bbox": bbox, "area": area,
                   "iscrowd": 0, "segmentation": [poly]})
    name = f"{i + 1:06d}.jpg"
    img.save(images_dir / name, quality=90)
    images.append({"id": i + 1, "file_name": name, "height": h, "width": w})
  ann_file = root / "instances.json"
  ann_file.write_text(json.dumps({
      "images": images, "annotations": anns,
      "categories": [{"id": c, "name": f"c{c}"} for c in range(1, num_classes + 1)]}))
  return ann_file, images_dir


# ------------------------------------------------------------------------------------------------
# Part 1: mask-target representation.


def _roi_align_axis(lo: float, hi: float, size: int, pooled: int) -> tuple[np.ndarray, int]:
  """torchvision ROIAlign (aligned, adaptive, scale 1) row weights ``[pooled, size]`` summed over
  each bin's samples (spec mask_rcnn_fpn.md §7.1), and the grid count."""
  start, end = lo - 0.5, hi - 0.5
  bin_size = (end - start) / pooled
  grid = int(math.ceil((end - start) / pooled)) if end > start else 0
  a = np.zeros((pooled, size))
  if grid == 0:
    return a, 0
  p = np.repeat(np.arange(pooled), grid)
  k = np.tile(np.arange(grid), pooled)
  y = start + p * bin_size + (k + 0.5) * bin_size / grid
  ok = (y >= -1.0) & (y <= size)
  y = np.maximum(y, 0.0)
  y_lo = np.floor(y).astype(np.int64)
  top = y_lo >= size - 1
  y_lo = np.where(top, size - 1, y_lo)
  y_hi = np.where(top, size - 1, y_lo + 1)
  y = np.where(top, y_lo, y)
  ly = y - y_lo
  np.add.at(a, (p[ok], y_lo[ok]), (1 - ly)[ok])
  np.add.at(a, (p[ok], y_hi[ok]), ly[ok])
  return a, grid


def roi_align_mask(mask: np.ndarray, box: np.ndarray, pooled: int = 7,
                   map_hw: tuple[int, int] | None = None) -> np.ndarray:
  """ROIAlign of one float mask; ``map_hw`` = the size the clamping uses (default: mask's)."""
  h, w = map_hw or mask.shape
  m = mask[:h, :w].astype(np.float64)
  ay, gh = _roi_align_axis(box[1], box[3], h, pooled)
  ax, gw = _roi_align_axis(box[0], box[2], w, pooled)
  return ay @ m @ ax.T / max(gh * gw, 1)


def bilinear_zero(mask: np.ndarray, px: np.ndarray, py: np.ndarray) -> np.ndarray:
  """grid_sample-style bilinear read at continuous pixel positions; out-of-map taps read 0."""
  h, w = mask.shape
  x0, y0 = np.floor(px).astype(np.int64), np.floor(py).astype(np.int64)
  fx, fy = px - x0, py - y0
  out = np.zeros(px.shape)
  for dy, wy in ((0, 1 - fy), (1, fy)):
    for dx, wx in ((0, 1 - fx), (1, fx)):
      yy, xx = y0 + dy, x0 + dx
      ok = (yy >= 0) & (yy < h) & (xx >= 0) & (xx < w)
      out += np.where(ok, wy * wx * mask[np.clip(yy, 0, h - 1), np.clip(xx, 0, w - 1)], 0.0)
  return out


def _crop_mask(mask: np.ndarray, box: np.ndarray, side: int, binary: bool) -> np.ndarray:
  """Box-cropped fixed-size mask as Mask R-CNN builds it (ROIAlign of the bitmask, >= 0.5)."""
  c = roi_align_mask(mask, box, side)
  return (c >= 0.5).astype(np.float64) if binary else np.round(c * 255) / 255


def mask_study(num_images: int, rois_per_gt: int, seed: int = 0) -> dict[str, Any]:
  """Errors of box-cropped masks (and of canvas clamping) on PointRend's targets."""
  rng = np.random.default_rng(seed)
  oh, ow = 480, 640
  nh, nw = T.resize_shortest_edge_size(oh, ow, 800, 1333)  # 800 x 1067
  canvas = (800, 1088)
  variants = [("crop 56 binary", 56, True), ("crop 112 binary", 112, True),
              ("crop 112 uint8", 112, False), ("crop 224 binary", 224, True)]
  err = {v[0]: {"abs": [], "flip": [], "t7": [], "abs_large": [], "flip_large": []}
         for v in variants}
  clamp = {"t7": [], "t7_border": [], "soft_border": []}
  sx, sy = nw / ow, nh / oh
  for _ in range(num_images):
    for _ in range(max(1, int(rng.poisson(7)))):
      poly = _random_polygon(rng, oh, ow)
      orig_area = float(mask_util.area(mask_util.merge(mask_util.frPyObjects([poly], oh, ow))))
      if orig_area < 4:
        continue
      scaled = T.transform_polygons([poly], sx, sy)[0].tolist()
      mask = coco.decode_segmentation([scaled], nh, nw).astype(np.float64)
      ys, xs = np.nonzero(mask)
      gt_box = np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], np.float64)
      bw, bh = gt_box[2] - gt_box[0], gt_box[3] - gt_box[1]
      large = orig_area > 96**2
      padded = np.zeros(canvas)
      padded[:nh, :nw] = mask
      crops = {name: _crop_mask(mask, gt_box, side, binary) for name, side, binary in variants}
      for _ in range(rois_per_gt):
        # A regressed box: the GT box with ~10% noise per side (unclipped, as in training).
        roi = gt_box + rng.normal(0, 0.1, 4) * np.array([bw, bh, bw, bh])
        roi[2:] = np.maximum(roi[2:], roi[:2] + 1)
        rw, rh = roi[2] - roi[0], roi[3] - roi[1]
        exact7 = roi_align_mask(mask, roi)
        # Points: 147 of 588 uniform candidates with the most uncertain coarse value + 49 uniform.
        cand = rng.random((588, 2))
        coarse = bilinear_zero(exact7, cand[:, 0] * 7 - 0.5, cand[:, 1] * 7 - 0.5)
        pts = np.concatenate([cand[np.argsort(np.abs(coarse - 0.5))[:147]], rng.random((49, 2))])
        x, y = roi[0] + pts[:, 0] * rw, roi[1] + pts[:, 1] * rh
        exact = bilinear_zero(mask, x - 0.5, y - 0.5)
        for name, side, _ in variants:
          c = crops[name]
          approx = bilinear_zero(c, (x - gt_box[0]) / bw * side - 0.5,
                                 (y - gt_box[1]) / bh * side - 0.5)
          d = np.abs(approx - exact)
          flips = (approx >= 0.5) != (exact >= 0.5)
          croi = (roi - gt_box[[0, 1, 0, 1]]) * np.array([side / bw, side / bh] * 2)
          t7 = (roi_align_mask(c, croi) >= 0.5) != (exact7 >= 0.5)
          err[name]["abs"].append(d.mean())
          err[name]["flip"].append(flips.mean())
          err[name]["t7"].append(t7.mean())
          if large:
            err[name]["abs_large"].append(d.mean())
            err[name]["flip_large"].append(flips.mean())
        canvas7 = roi_align_mask(padded, roi)
        bad = ((canvas7 >= 0.5) != (exact7 >= 0.5)).mean()
        clamp["t7"].append(bad)
        if roi[3] > nh - 1 or roi[2] > nw - 1:
          clamp["t7_border"].append(bad)
          clamp["soft_border"].append(np.abs(canvas7 - exact7).max())
  return {"errors": err, "clamp": clamp}


def mask_memory_rows() -> list[tuple[str, str, float]]:
  rows = []
  b, m = 2, 100
  for hb, wb in ((800, 1088), (800, 1344), (1344, 1344)):
    n = b * m * hb * wb
    rows.append((f"{hb}x{wb}", "full-image uint8 [B,M,H,W]", n / 1e6))
    rows.append((f"{hb}x{wb}", "full-image bit-packed [B,M,H,W/8]", n / 8 / 1e6))
  for side in (56, 112, 224):
    rows.append(("any", f"box crop uint8 [B,M,{side},{side}]", b * m * side * side / 1e6))
  return rows


def run_masks(quick: bool) -> None:
  print("\n### Mask-target memory (B=2 images per device, M=100 instance slots)\n")
  print("| canvas | layout | MB per batch |\n| --- | --- | ---: |")
  for canvas, layout, mb in mask_memory_rows():
    print(f"| {canvas} | {layout} | {mb:.1f} |")
  # Measured: one real batch through make_batch at the COCO landscape buckets.
  ex = {"image": np.zeros((800, 1067, 3), np.uint8), "image_size": (800, 1067),
        "gt_boxes": np.zeros((7, 4), np.float32), "gt_classes": np.zeros(7, np.int32),
        "gt_masks": np.ones((7, 800, 1067), bool)}
  for fmt in ("packed", "dense"):
    t0 = time.perf_counter()
    bt = batching.make_batch([ex, ex], (800, 1344), mask_format=fmt)
    dt = time.perf_counter() - t0
    nb = batching.batch_nbytes(bt)
    masks_mb = nb.get("gt_masks_packed", nb.get("gt_masks")) / 1e6
    print(f"\nmake_batch(2 x 800x1067, 7 instances, bucket 800x1344, {fmt}): total "
          f"{nb['total'] / 1e6:.1f} MB, masks {masks_mb:.1f} MB, {dt * 1e3:.0f} ms")

  t0 = time.perf_counter()
  res = mask_study(num_images=4 if quick else 30, rois_per_gt=2 if quick else 8)
  err, clamp = res["errors"], res["clamp"]
  n_rois = len(clamp["t7"])
  print(f"\n### Box-cropped masks vs exact full-image bitmask ({n_rois} ROIs, 196 points each; "
        f"{time.perf_counter() - t0:.0f} s)\n")
  print("| representation | point label mean abs err | point label flips (>=0.5) | "
        "large objects: abs err / flips | 7x7 target cells wrong |")
  print("| --- | ---: | ---: | ---: | ---: |")
  for name, e in err.items():
    print(f"| {name} | {np.mean(e['abs']):.4f} | {100 * np.mean(e['flip']):.2f}% | "
          f"{np.mean(e['abs_large']):.4f} / {100 * np.mean(e['flip_large']):.2f}% | "
          f"{100 * np.mean(e['t7']):.2f}% |")
  print("| full-image bitmask (exact) | 0 | 0% | 0 / 0% | 0% |")
  print(f"\n7x7 target with ROIAlign clamping at the padded canvas (800x1088) instead of the "
        f"image (800x1067): {100 * np.mean(clamp['t7']):.3f}% of cells wrong over all ROIs, "
        f"{100 * np.mean(clamp['t7_border']) if clamp['t7_border'] else 0:.2f}% over the "
        f"{len(clamp['t7_border'])} ROIs reaching the last row/column (largest change of a "
        f"soft cell value there: {max(clamp['soft_border'], default=0):.3f}).")


# ------------------------------------------------------------------------------------------------
# Part 2: training pipeline throughput.


def run_pipeline(quick: bool, tmp: pathlib.Path) -> None:
  ann, images = make_coco_like(tmp / "coco_like", 8 if quick else 30)
  records = coco.load_coco_dataset(ann, images).records
  n_inst = sum(len(r["annotations"]) for r in records)
  batches = 4 if quick else 40
  print(f"\n### Training pipeline throughput ({len(records)} JPEGs 480x640, "
        f"{n_inst / len(records):.1f} polygon instances/image; COCO input settings, 2 images "
        f"per batch, packed masks, M=100; {batches} batches after the first)\n")
  print("| worker_count | startup + first batch (s) | images/s | ms per batch |")
  print("| ---: | ---: | ---: | ---: |")
  for workers in (0, 1, 2):
    t0 = time.perf_counter()
    it = pipeline.build_train_loader(records, batch_size_per_process=2, seed=0,
                                     config=pipeline.LoaderConfig(),  # COCO's INPUT.* defaults
                                     process_index=0, process_count=1, worker_count=workers)
    next(it)
    t1 = time.perf_counter()
    for _ in range(batches):
      next(it)
    t2 = time.perf_counter()
    it.close()
    print(f"| {workers} | {t1 - t0:.2f} | {2 * batches / (t2 - t1):.1f} | "
          f"{1e3 * (t2 - t1) / batches:.0f} |", flush=True)


# ------------------------------------------------------------------------------------------------
# Part 3: COCO evaluation time.


def run_eval(quick: bool) -> None:
  from pointrend_jax.evaluation import coco_eval  # pylint: disable=g-import-not-at-top

  n_images = 200 if quick else 5000
  rng = np.random.default_rng(0)
  h, w = 480, 640
  t0 = time.perf_counter()
  images, anns, results = [], [], []
  for i in range(1, n_images + 1):
    images.append({"id": i, "file_name": f"{i}.jpg", "height": h, "width": w})
    gts = []
    for _ in range(max(1, int(rng.poisson(7)))):
      poly = _random_polygon(rng, h, w)
      rle = mask_util.merge(mask_util.frPyObjects([poly], h, w))
      area = float(mask_util.area(rle))
      if area < 4:
        continue
      bbox = [float(v) for v in mask_util.toBbox(rle)]
      cat = int(rng.integers(1, 81))
      anns.append({"id": len(anns) + 1, "image_id": i, "category_id": cat, "bbox": bbox,
                   "area": area, "iscrowd": 0, "segmentation": [poly]})
      gts.append((poly, bbox, cat))
    # 100 detections: a perturbed copy of each GT, the rest random boxes (box-shaped masks).
    dets_poly = []
    for poly, bbox, cat in gts:
      p = np.array(poly).reshape(-1, 2) + rng.normal(0, 0.05 * math.sqrt(bbox[2] * bbox[3]) + 1,
                                                     2)
      p[:, 0] = np.clip(p[:, 0], 0, w)
      p[:, 1] = np.clip(p[:, 1], 0, h)
      dets_poly.append((p.reshape(-1).tolist(), cat))
    n_rand = 100 - len(dets_poly)
    xy = rng.uniform(0, 1, (n_rand, 2)) * [w, h]
    wh = np.exp(rng.uniform(np.log(8), np.log(300), (n_rand, 2)))
    boxes = np.concatenate([xy, np.minimum(wh, [w, h] - xy)], 1)
    rles = mask_util.frPyObjects(boxes, h, w) if n_rand else []
    masks = [mask_util.merge(mask_util.frPyObjects([p], h, w)) for p, _ in dets_poly] + list(rles)
    cats = [c for _, c in dets_poly] + rng.integers(1, 81, n_rand).tolist()
    scores = np.sort(rng.random(100))[::-1]
    for k, (rle, cat) in enumerate(zip(masks, cats)):
      bb = mask_util.toBbox(rle).tolist()
      results.append({"image_id": i, "category_id": int(cat), "bbox": bb,
                      "score": float(scores[k]),
                      "segmentation": {"size": [h, w], "counts": rle["counts"].decode()}})
  gt = {"images": images, "annotations": anns,
        "categories": [{"id": c, "name": f"c{c}"} for c in range(1, 81)]}
  t1 = time.perf_counter()
  evaluator = coco_eval.COCOEvaluator(gt)
  evaluator.add(results)
  t2 = time.perf_counter()
  times = {}
  for task in ("bbox", "segm"):
    ev = coco_eval.COCOEvaluator(gt, tasks=(task,))
    ev.add(results)
    ts = time.perf_counter()
    metrics = ev.compute()
    times[task] = (time.perf_counter() - ts, metrics[f"{task}/AP"])
  print(f"\n### COCO evaluation ({n_images} images, {len(anns)} GT instances, {len(results)} "
        f"detections with RLE masks, 80 classes)\n")
  print("| step | seconds |\n| --- | ---: |")
  print(f"| make synthetic GT + detections (not part of evaluation) | {t1 - t0:.1f} |")
  print(f"| COCOEvaluator(gt) + add(results) | {t2 - t1:.1f} |")
  for task, (sec, ap) in times.items():
    print(f"| compute() {task} (AP {ap:.1f}) | {sec:.1f} |")
  total = t2 - t1 + sum(t for t, _ in times.values())
  print(f"| total evaluation (add + bbox + segm) | {total:.1f} |")


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--parts", default="masks,pipeline,eval")
  parser.add_argument("--quick", action="store_true")
  args = parser.parse_args()
  import _harness  # pylint: disable=g-import-not-at-top
  print(f"Machine: {_harness.machine_description()}", flush=True)
  parts = args.parts.split(",")
  with tempfile.TemporaryDirectory() as tmp:
    if "masks" in parts:
      run_masks(args.quick)
    if "pipeline" in parts:
      run_pipeline(args.quick, pathlib.Path(tmp))
    if "eval" in parts:
      run_eval(args.quick)


if __name__ == "__main__":
  main()
