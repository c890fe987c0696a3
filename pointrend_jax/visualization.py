"""Pictures of predictions: instance overlays, semantic colour maps, PointRend subdivision panels.

Everything is numpy + PIL (no matplotlib); images are RGB uint8 ``[H, W, 3]`` in and out.

* :func:`draw_instances` / :func:`draw_instance_predictions`: masks blended in distinct colours
  (largest first, so small objects stay visible) with their outlines, box outlines, and a
  "class score" label per box in PIL's default font.
* :func:`colorize_semantic` / :func:`overlay_semantic`: the Cityscapes palette for the 19 train
  ids (:data:`CITYSCAPES_PALETTE`), other ids from :func:`instance_colors`.
* :func:`subdivision_row` / :func:`subdivision_figure`: the PointRend paper's figure of adaptive
  subdivision for chosen instances: image crop with the box, coarse 7x7 prediction (nearest
  upsampling for display), the 28x28 step-0 prediction, each step's x2-upsampled prediction
  with the points selected at that step (red), and the final 224x224 mask. Mask panels show
  ``sigmoid(logit)`` (black = 0, white = 1) in the box frame, stretched to the box's aspect
  ratio so that they line up with the crop.
* :func:`write_pictures`: the pictures of an evaluation's first images
  (:class:`~pointrend_jax.evaluation.inference.InstanceEvaluator` ``visuals``): ground truth |
  PointRend | coarse 7x7 masks side by side, and the subdivision figure of the top detections.
"""

from __future__ import annotations

import colorsys
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

__all__ = ["CITYSCAPES_PALETTE", "instance_colors", "draw_instances", "draw_instance_predictions",
           "colorize_semantic", "overlay_semantic", "draw_semantic_prediction", "subdivision_row",
           "subdivision_figure", "write_pictures"]

# Cityscapes train ids 0..18 (cityscapesScripts label colours; pointrend_jax.data.cityscapes).
CITYSCAPES_PALETTE = np.array([
    (128, 64, 128), (244, 35, 232), (70, 70, 70), (102, 102, 156), (190, 153, 153),
    (153, 153, 153), (250, 170, 30), (220, 220, 0), (107, 142, 35), (152, 251, 152),
    (70, 130, 180), (220, 20, 60), (255, 0, 0), (0, 0, 142), (0, 0, 70), (0, 60, 100),
    (0, 80, 100), (0, 0, 230), (119, 11, 32)], np.uint8)

_POINT_COLOR = (255, 40, 40)
_BOX_COLOR = (255, 200, 0)


def _font(size: int = 13) -> ImageFont.ImageFont:
  try:
    return ImageFont.load_default(size=size)
  except (TypeError, ValueError, OSError, ImportError):  # no FreeType: PIL's bitmap font
    return ImageFont.load_default()


def instance_colors(n: int, seed: int = 0) -> np.ndarray:
  """``n`` distinct, saturated colours ``[n, 3]`` uint8 (golden-ratio hue steps)."""
  hues = (seed * 0.137 + np.arange(n) * 0.618033988749895) % 1.0
  rows = [colorsys.hsv_to_rgb(h, 0.75 if i % 2 else 0.9, 0.95 if i % 3 else 0.8)
          for i, h in enumerate(hues)]
  return (np.asarray(rows, np.float64).reshape(n, 3) * 255 + 0.5).astype(np.uint8)


def _as_rgb(image: np.ndarray) -> np.ndarray:
  image = np.asarray(image)
  if image.ndim == 2:
    image = np.repeat(image[:, :, None], 3, axis=2)
  if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] not in (3, 4):
    raise ValueError(f"expected an RGB uint8 image, got {image.dtype} {image.shape}")
  return np.ascontiguousarray(image[:, :, :3])


def _outline(mask: np.ndarray) -> np.ndarray:
  """Pixels of ``mask`` with a 4-neighbour outside it (a 1-px inner contour)."""
  m = np.pad(mask, 1)
  inner = m[1:-1, 1:-1] & m[:-2, 1:-1] & m[2:, 1:-1] & m[1:-1, :-2] & m[1:-1, 2:]
  return mask & ~inner


def _text_box(draw: ImageDraw.ImageDraw, xy: tuple[float, float], text: str,
              fill: tuple[int, int, int], font: Any, image_size: tuple[int, int]) -> None:
  """Text on a filled rectangle, above ``xy`` if there is room, else below; kept in the image."""
  l, t, r, b = draw.textbbox((0, 0), text, font=font)
  tw, th = r - l + 4, b - t + 2
  x = min(max(0.0, xy[0]), max(0.0, image_size[0] - tw))
  y = xy[1] - th if xy[1] - th >= 0 else min(xy[1] + 1, max(0.0, image_size[1] - th))
  draw.rectangle((x, y, x + tw, y + th), fill=fill)
  text_colour = (0, 0, 0) if sum(fill) > 450 else (255, 255, 255)
  draw.text((x + 2 - l, y + 1 - t), text, fill=text_colour, font=font)


def draw_instances(image: np.ndarray, boxes: np.ndarray | None = None,
                   masks: np.ndarray | None = None, labels: Sequence[str] | None = None,
                   colors: np.ndarray | None = None, alpha: float = 0.5,
                   box_width: int = 2, font_size: int = 13) -> np.ndarray:
  """Overlays instances on an image.

  Args:
    image: ``[H, W, 3]`` (or ``[H, W]``) uint8.
    boxes: ``[n, 4]`` xyxy pixels, or None.
    masks: ``[n, H, W]`` bool, or None.
    labels: ``n`` strings drawn at the boxes' top-left corners (needs ``boxes``).
    colors: ``[n, 3]`` uint8 (default :func:`instance_colors`).
    alpha: mask opacity.
    box_width: box outline width in pixels (0: no boxes).
    font_size: label size (PIL's default font).

  Returns:
    ``[H, W, 3]`` uint8.
  """
  out = _as_rgb(image).astype(np.float32)
  n = len(boxes) if boxes is not None else (len(masks) if masks is not None else 0)
  colors = instance_colors(n) if colors is None else np.asarray(colors, np.uint8)
  if masks is not None and n:
    masks = np.asarray(masks, bool)
    if masks.shape[1:] != out.shape[:2]:
      raise ValueError(f"masks {masks.shape} do not match the image {out.shape}")
    for i in np.argsort(-masks.reshape(n, -1).sum(1), kind="stable"):
      m = masks[i]
      out[m] = out[m] * (1.0 - alpha) + colors[i].astype(np.float32) * alpha
      out[_outline(m)] = colors[i]
  pil = Image.fromarray(np.clip(out + 0.5, 0, 255).astype(np.uint8))
  if boxes is not None and n:
    draw = ImageDraw.Draw(pil)
    font = _font(font_size)
    boxes = np.asarray(boxes, np.float32)
    if box_width > 0:
      for i, b in enumerate(boxes):
        draw.rectangle(tuple(float(v) for v in b), outline=tuple(int(c) for c in colors[i]),
                       width=box_width)
    if labels is not None:
      for i, b in enumerate(boxes):
        _text_box(draw, (float(b[0]), float(b[1])), labels[i],
                  tuple(int(c) for c in colors[i]), font, pil.size)
  return np.asarray(pil)


def draw_instance_predictions(image: np.ndarray, instances: Any, alpha: float = 0.5,
                              max_instances: int | None = None, **kwargs: Any) -> np.ndarray:
  """:func:`draw_instances` of an :class:`~pointrend_jax.postprocess.Instances` (labels
  ``"class score"``; ``max_instances`` highest scores only)."""
  n = len(instances) if max_instances is None else min(len(instances), max_instances)
  labels = [f"{instances.class_names[i]} {instances.scores[i]:.2f}" for i in range(n)]
  return draw_instances(image, instances.boxes[:n], instances.masks[:n], labels,
                        instance_colors(n), alpha, **kwargs)


def colorize_semantic(sem_seg: np.ndarray, palette: np.ndarray | None = None,
                      ignore_value: int = 255) -> np.ndarray:
  """Class map ``[H, W]`` -> colours ``[H, W, 3]`` uint8 (Cityscapes palette for ids < 19,
  :func:`instance_colors` beyond; ``ignore_value`` black)."""
  sem_seg = np.asarray(sem_seg)
  if palette is None:
    top = int(sem_seg.max(initial=0))
    extra = max(0, min(top, 254) + 1 - len(CITYSCAPES_PALETTE))
    palette = np.concatenate([CITYSCAPES_PALETTE, instance_colors(extra, seed=7)])
  palette = np.asarray(palette, np.uint8)
  table = np.zeros((max(256, len(palette)), 3), np.uint8)
  table[:len(palette)] = palette
  if ignore_value < len(table):
    table[ignore_value] = 0
  return table[np.clip(sem_seg, 0, len(table) - 1).astype(np.int64)]


def overlay_semantic(image: np.ndarray, sem_seg: np.ndarray, alpha: float = 0.6,
                     palette: np.ndarray | None = None) -> np.ndarray:
  """Blends :func:`colorize_semantic` over the image."""
  rgb = _as_rgb(image).astype(np.float32)
  colour = colorize_semantic(sem_seg, palette).astype(np.float32)
  return np.clip(rgb * (1 - alpha) + colour * alpha + 0.5, 0, 255).astype(np.uint8)


def draw_semantic_prediction(image: np.ndarray, result: Any, alpha: float = 0.6,
                             font_size: int = 13) -> np.ndarray:
  """:func:`overlay_semantic` of a :class:`~pointrend_jax.postprocess.SemanticResult`
  with a legend of the classes present (top-left)."""
  out = Image.fromarray(overlay_semantic(image, result.sem_seg, alpha))
  draw = ImageDraw.Draw(out)
  font = _font(font_size)
  present = np.flatnonzero(np.bincount(result.sem_seg.ravel(),
                                       minlength=len(result.class_names)))
  colours = colorize_semantic(present.reshape(1, -1))[0]
  y = 2
  for c, colour in zip(present, colours):
    _text_box(draw, (2, y + 20), result.class_names[c], tuple(int(v) for v in colour), font,
              out.size)
    y += font_size + 5
  return np.asarray(out)


# --- Subdivision panels ---


def _sigmoid(x: np.ndarray) -> np.ndarray:
  return 1.0 / (1.0 + np.exp(-np.clip(np.asarray(x, np.float64), -60, 60)))


def _map_panel(logits: np.ndarray, size: tuple[int, int]) -> Image.Image:
  """Logits ``[h, w]`` -> grayscale probabilities, nearest-upsampled to ``size = (W, H)``."""
  gray = (_sigmoid(logits) * 255 + 0.5).astype(np.uint8)
  return Image.fromarray(gray, "L").resize(size, Image.NEAREST).convert("RGB")


def _draw_points(panel: Image.Image, points: np.ndarray, grid: tuple[int, int]) -> None:
  """Red dots at box-frame points ``[K, 2]`` (x, y in [0, 1]) on a panel of a ``grid`` map."""
  w, h = panel.size
  cell = min(w / grid[1], h / grid[0])
  r = max(0.0, cell * 0.3 - 0.5)
  draw = ImageDraw.Draw(panel)
  xs = np.asarray(points[:, 0], np.float64) * w
  ys = np.asarray(points[:, 1], np.float64) * h
  if r < 0.75:  # sub-pixel cells: single pixels
    px = np.array(panel)
    px[np.clip(ys.astype(int), 0, h - 1), np.clip(xs.astype(int), 0, w - 1)] = _POINT_COLOR
    panel.paste(Image.fromarray(px))
    return
  for x, y in zip(xs, ys):
    draw.ellipse((x - r, y - r, x + r, y + r), fill=_POINT_COLOR)


def _titled(panel: Image.Image, title: str, font: Any, title_h: int) -> Image.Image:
  """The panel under its title; the column is widened (panel centred) if the title is wider."""
  l, t, r, _ = ImageDraw.Draw(panel).textbbox((0, 0), title, font=font)
  width = max(panel.size[0], r - l + 6)
  out = Image.new("RGB", (width, panel.size[1] + title_h), (255, 255, 255))
  out.paste(panel, ((width - panel.size[0]) // 2, title_h))
  ImageDraw.Draw(out).text(((width - (r - l)) // 2 - l, 2 - t), title, fill=(0, 0, 0),
                           font=font)
  return out


def subdivision_row(image: np.ndarray, stages: Any, index: int, *, label: str | None = None,
                    panel_height: int = 160, font_size: int = 12,
                    margin: float = 0.15) -> np.ndarray:
  """One instance's subdivision panels side by side, each with a title.

  Panels: image crop (box + ``margin`` of its size on each side) with the box; coarse 7x7;
  step 0 (28x28); for each step the x2-upsampled map with that step's points; the final mask.

  Args:
    image: the original RGB image ``[H, W, 3]`` uint8.
    stages: :class:`~pointrend_jax.postprocess.SubdivisionStages` of that image.
    index: row of ``stages``.
    label: text above the crop (e.g. ``"#0 person 0.93"``).
    panel_height: pixels; widths follow the box's aspect ratio (clamped to [1/3, 3]).
    font_size: title size (PIL's default font).
    margin: crop margin as a fraction of the box size.

  Returns:
    ``[panel_height + title, W, 3]`` uint8.
  """
  image = _as_rgb(image)
  font = _font(font_size)
  title_h = font_size + 6
  x0, y0, x1, y1 = (float(v) for v in stages.boxes[index])
  bw, bh = max(x1 - x0, 1e-3), max(y1 - y0, 1e-3)
  aspect = float(np.clip(bw / bh, 1 / 3, 3))
  size = (max(1, round(panel_height * aspect)), panel_height)

  # Crop (clipped to the image) with the box outline.
  cx0, cy0 = max(0, int(np.floor(x0 - margin * bw))), max(0, int(np.floor(y0 - margin * bh)))
  cx1 = min(image.shape[1], int(np.ceil(x1 + margin * bw)))
  cy1 = min(image.shape[0], int(np.ceil(y1 + margin * bh)))
  crop = Image.fromarray(image[cy0:max(cy1, cy0 + 1), cx0:max(cx1, cx0 + 1)])
  # Same scale as the mask panels: the box itself spans exactly ``size``.
  sx, sy = size[0] / bw, size[1] / bh
  crop_size = (max(1, round(crop.size[0] * sx)), max(1, round(crop.size[1] * sy)))
  crop = crop.resize(crop_size, Image.BILINEAR)
  ImageDraw.Draw(crop).rectangle(((x0 - cx0) * sx, (y0 - cy0) * sy, (x1 - cx0) * sx,
                                  (y1 - cy0) * sy), outline=_BOX_COLOR, width=2)
  panels = [(crop, label or "image crop + box")]

  coarse = stages.coarse[index]
  panels.append((_map_panel(coarse, size), f"coarse {coarse.shape[0]}x{coarse.shape[1]}"))
  init = stages.init[index]
  panels.append((_map_panel(init, size), f"{init.shape[0]}x{init.shape[1]} (step 0)"))
  for up, pts in zip(stages.upsampled, stages.points):
    up, pts = up[index], pts[index]
    panel = _map_panel(up, size)
    _draw_points(panel, pts, up.shape)
    panels.append((panel, f"{up.shape[0]}x{up.shape[1]} + {len(pts)} pts"))
  final = stages.final[index]
  mask = (_sigmoid(final) >= 0.5).astype(np.uint8) * 255
  panels.append((Image.fromarray(mask, "L").resize(size, Image.NEAREST).convert("RGB"),
                 f"final {final.shape[0]}x{final.shape[1]}"))

  return _stack([_titled(p, t, font, title_h) for p, t in panels], gap=6)


def _stack(panels: Sequence[Image.Image], gap: int, vertical: bool = False) -> np.ndarray:
  """Panels side by side (top-aligned) or one below the other (left-aligned), on white."""
  axis = 1 if vertical else 0
  size = [max(p.size[0] for p in panels), max(p.size[1] for p in panels)]
  size[axis] = sum(p.size[axis] for p in panels) + gap * (len(panels) - 1)
  out = Image.new("RGB", tuple(size), (255, 255, 255))
  offset = 0
  for p in panels:
    out.paste(p, (0, offset) if vertical else (offset, 0))
    offset += p.size[axis] + gap
  return np.asarray(out)


def subdivision_figure(image: np.ndarray, instances: Any, stages: Any,
                       indices: Sequence[int] | None = None, *, panel_height: int = 160,
                       font_size: int = 12) -> np.ndarray:
  """:func:`subdivision_row` of several instances stacked vertically (white background).

  Args:
    image: original RGB image.
    instances: the :class:`~pointrend_jax.postprocess.Instances` of ``stages``.
    stages: :class:`~pointrend_jax.postprocess.SubdivisionStages`.
    indices: rows to show (default: the first 3, i.e. the highest scores).
  """
  if indices is None:
    indices = list(range(min(3, len(instances))))
  if not len(indices):
    raise ValueError("no instances to show")
  rows = [subdivision_row(image, stages, i,
                          label=f"#{i} {instances.class_names[i]} {instances.scores[i]:.2f}",
                          panel_height=panel_height, font_size=font_size) for i in indices]
  return _stack([Image.fromarray(r) for r in rows], gap=10, vertical=True)


# --- Evaluation pictures ---


def _ground_truth(record: Mapping[str, Any], zoom: int, class_names: Sequence[str]):
  """The record's non-crowd instances at ``zoom`` times its size: boxes, masks, labels."""
  from pointrend_jax.data import coco
  h, w = int(record["height"]), int(record["width"])
  boxes, masks, labels = [], [], []
  for a in record.get("annotations", ()):
    if a.get("iscrowd", 0) or "segmentation" not in a:
      continue
    m = coco.decode_segmentation(a["segmentation"], h, w).astype(np.uint8)
    masks.append(np.asarray(Image.fromarray(m).resize((w * zoom, h * zoom), Image.NEAREST),
                            bool))
    x, y, bw, bh = (float(v) * zoom for v in a["bbox"])
    boxes.append((x, y, x + bw, y + bh))
    labels.append(class_names[int(a["category_id"])])
  return (np.asarray(boxes, np.float32).reshape(-1, 4),
          np.asarray(masks, bool).reshape(-1, h * zoom, w * zoom), labels)


def write_pictures(visuals: Sequence[Mapping[str, Any]], class_names: Sequence[str],
                   out_dir: str, *, zoom: int | None = None, min_score: float = 0.5,
                   mask_threshold: float = 0.5, max_detections: int = 3) -> list[str]:
  """Writes ``<id>_overlay.png`` and ``<id>_points.png`` per visual.

  ``<id>_overlay.png``: ground truth | PointRend masks | coarse 7x7 masks at ``zoom`` times the
  image size (default: long side about 400 px), detections with ``score >= min_score``. The
  predicted masks are pasted *at the zoomed size* from the box-frame probabilities (224x224
  PointRend vs 7x7 coarse, bilinear, ``mask_threshold``), so the difference in boundary quality is
  visible even for small images. ``<id>_points.png``: :func:`subdivision_figure` of the
  ``max_detections`` highest-scoring detections.

  Args:
    visuals: ``{"record", "results": {"segm"[, "segm_coarse"]: Instances}, "stages":
      SubdivisionStages}`` per image (``InstanceEvaluator.visuals``).
    class_names: contiguous class names.
    out_dir: created.

  Returns:
    The written paths.
  """
  from pointrend_jax.data import coco
  from pointrend_jax.postprocess import paste_masks
  os.makedirs(out_dir, exist_ok=True)
  font = _font(12)
  paths = []
  for vis in visuals:
    record, stages = vis["record"], vis["stages"]
    image = coco.load_image(record)
    h, w = image.shape[:2]
    z = zoom or max(1, int(round(400 / max(h, w))))
    big = np.asarray(Image.fromarray(image).resize((w * z, h * z), Image.BILINEAR))
    panels = [(draw_instances(big, *_ground_truth(record, z, class_names)), "ground truth")]
    for variant, title in (("segm", "PointRend (224x224 -> pasted)"),
                           ("segm_coarse", "coarse 7x7 (bilinear)")):
      inst = vis["results"].get(variant)
      if inst is None:
        continue
      keep = np.flatnonzero(inst.scores >= min_score)
      logits = stages.final if variant == "segm" else stages.coarse
      masks = paste_masks(_sigmoid(logits[keep]).astype(np.float32), inst.boxes[keep] * z,
                          (h * z, w * z), mask_threshold)
      labels = [f"{inst.class_names[i]} {inst.scores[i]:.2f}" for i in keep]
      panels.append((draw_instances(big, inst.boxes[keep] * z, masks, labels), title))
    stem = os.path.join(out_dir, f"{int(record.get('image_id', 0)):06d}")
    Image.fromarray(_stack([_titled(Image.fromarray(p), t, font, 18) for p, t in panels],
                            gap=4)).save(stem + "_overlay.png")
    paths.append(stem + "_overlay.png")
    n = min(max_detections, len(vis["results"]["segm"]))
    if n:
      Image.fromarray(subdivision_figure(image, vis["results"]["segm"], stages, range(n))).save(
          stem + "_points.png")
      paths.append(stem + "_points.png")
  return paths
