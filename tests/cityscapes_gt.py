"""Cityscapes ground-truth PNGs drawn from a ``*_gtFine_polygons.json``, as cityscapesScripts'
``json2labelImg`` / ``json2instanceImg`` draw them: the tests build small Cityscapes trees from
polygons alone."""

import numpy as np
from PIL import Image, ImageDraw

from pointrend_jax.data import cityscapes as cs


def write_gt_images(polygons_json) -> tuple[str, str]:
  """Writes the ``*_gtFine_labelIds.png`` (8-bit) and ``*_gtFine_instanceIds.png`` (16-bit)
  beside a ``*_gtFine_polygons.json``; returns their paths.

  Objects are filled in file order with PIL (later ones on top; ``deleted`` objects and
  license plates skipped); the background is 0 (unlabeled). Instance ids are
  ``label_id * 1000 + k`` (k counting per class from 0) for thing labels and the plain label
  id for groups and stuff.
  """
  path = str(polygons_json)
  suffix = "_gtFine_polygons.json"
  if not path.endswith(suffix):
    raise ValueError(f"expected a *{suffix} file, got {path}")
  polygons = cs._read_polygons_json(path)  # pylint: disable=protected-access
  size = (polygons["imgWidth"], polygons["imgHeight"])
  label_img = Image.new("L", size, 0)
  inst_img = Image.new("I", size, 0)
  label_draw, inst_draw = ImageDraw.Draw(label_img), ImageDraw.Draw(inst_img)
  counts: dict[str, int] = {}
  for obj in polygons["objects"]:
    if obj.get("deleted"):  # json2*Img test the value, detectron2 the key.
      continue
    label, is_group = cs._label_of(obj["label"], path)  # pylint: disable=protected-access
    if label.id < 0:
      continue
    inst_id = label.id
    if label.has_instances and not is_group:
      inst_id = label.id * 1000 + counts.get(label.name, 0)
      counts[label.name] = counts.get(label.name, 0) + 1
    points = [(p[0], p[1]) for p in obj["polygon"]]
    label_draw.polygon(points, fill=label.id)
    inst_draw.polygon(points, fill=inst_id)
  stem = path[:-len(suffix)]
  label_file, inst_file = stem + "_gtFine_labelIds.png", stem + "_gtFine_instanceIds.png"
  Image.fromarray(np.asarray(label_img, np.uint8)).save(label_file)
  Image.fromarray(np.asarray(inst_img, np.int32).astype(np.uint16)).save(inst_file)
  return label_file, inst_file
