"""The d2_parity command on model fixture folders: both shared fixtures pass end to end; a
perturbed copy, an unknown array and an unsupported weights recipe fail."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from conftest import PARITY_DIR, REPO_ROOT
from pointrend_jax.parity import models
from pointrend_jax.parity.compare import set_match
from pointrend_jax.parity.model_rules import known_name
from pointrend_jax.tools import d2_parity

R50 = PARITY_DIR / "r50_fpn_1x_coco"
SEMANTIC = PARITY_DIR / "semantic_r101_fpn_cityscapes"
_ROW = re.compile(r"^(\S+)\s.*\s(PASS|FAIL)(  \(.*\))?$")


def _rows(text: str) -> dict[str, str]:
  """{array name: PASS/FAIL} of the printed table rows."""
  out = {}
  for line in text.splitlines():
    m = _ROW.match(line)
    if m and m.group(1) != "array":
      out[m.group(1)] = m.group(2)
  return out


def _names(folder) -> list[str]:
  with np.load(folder / "expected.npz") as f:
    return list(f.files)


@pytest.mark.slow
def test_cli_passes_on_both_model_fixtures():
  proc = subprocess.run(
      [sys.executable, "-m", "pointrend_jax.tools.d2_parity", str(R50), str(SEMANTIC)],
      cwd=REPO_ROOT, capture_output=True, text=True, timeout=900,
      env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert proc.returncode == 0, proc.stdout[-5000:] + proc.stderr[-5000:]
  n = len(_names(R50)) + len(_names(SEMANTIC))
  lines = proc.stdout.strip().splitlines()
  assert lines[-1] == f"{n} passed, 0 failed"
  sections = proc.stdout.split("== ")[1:]
  assert len(sections) == 2
  for folder, text in zip((R50, SEMANTIC), sections):
    rows = _rows(text)
    assert set(rows) == set(_names(folder)), set(rows) ^ set(_names(folder))
    assert set(rows.values()) == {"PASS"}
  print(proc.stdout)


def _copy_folder(src, dst, expected=None, meta=None):
  """A fixture folder of symlinks (and a make_weights.py beside it), with replaced files."""
  dst.mkdir(parents=True)
  recipe = dst.parent / "make_weights.py"
  if not recipe.exists():
    recipe.symlink_to(PARITY_DIR / "make_weights.py")
  for name in os.listdir(src):
    if name == "expected.npz" and expected is not None:
      np.savez(dst / name, **expected)
    elif name == "meta.json" and meta is not None:
      (dst / name).write_text(json.dumps(meta))
    else:
      (dst / name).symlink_to(src / name)
  return dst


@pytest.mark.slow
def test_perturbed_unknown_and_unsupported_recipe_fail(tmp_path, capsys):
  golden = dict(np.load(SEMANTIC / "expected.npz"))
  bad = dict(golden)
  bad["coarse_logits"] = golden["coarse_logits"] + np.float32(0.01)
  # Far from any tie: the 5 least uncertain cells replace 5 chosen ones.
  idx = golden["step1_indices"].copy()
  outside = np.setdiff1d(np.arange(256 * 512), idx)[:5]
  idx[0, -5:] = outside
  bad["step1_indices"] = idx
  argmax = golden["sem_seg_argmax"].copy()
  argmax[:8] = (argmax[:8] + 1) % 19  # 8 of 512 rows: 1.6% of the pixels
  bad["sem_seg_argmax"] = argmax
  bad["mystery_array"] = np.zeros(3, np.float32)
  perturbed = _copy_folder(SEMANTIC, tmp_path / "perturbed", expected=bad)
  meta = json.loads((SEMANTIC / "meta.json").read_text())
  refused = _copy_folder(SEMANTIC, tmp_path / "refused",
                         meta=dict(meta, weights_recipe="d2-parity-v9"))

  assert d2_parity.main([str(perturbed), str(refused)]) == 1
  text = capsys.readouterr().out
  sections = text.split("== ")[1:]
  rows = _rows(sections[0])
  failed = sorted(k for k, v in rows.items() if v == "FAIL")
  assert failed == ["coarse_logits", "mystery_array", "sem_seg_argmax", "step1_indices"]
  assert len(rows) == len(golden) + 1
  assert re.search(r"mystery_array .*FAIL  \(no check knows this array\)", sections[0])
  # The recipe is refused before any model work: every array fails, with the reason.
  rows = _rows(sections[1])
  assert set(rows.values()) == {"FAIL"} and len(rows) == len(golden) + 1
  assert "d2-parity-v9" in sections[1] and "not supported" in sections[1]
  n_fail = 4 + len(golden) + 1
  assert text.strip().splitlines()[-1] == f"{len(golden) + 1 - 4} passed, {n_fail} failed"


def test_every_fixture_array_has_a_rule():
  for folder in (R50, SEMANTIC):
    assert [n for n in _names(folder) if not known_name(n)] == []
  assert not known_name("res6_crop_tl") and not known_name("mystery")


def test_set_match_tolerates_order_and_cut_ties_only():
  rng = np.random.default_rng(0)
  xy = rng.uniform(0, 500, (10, 2))
  boxes = np.concatenate([xy, xy + rng.uniform(20, 80, (10, 2))], 1).astype(np.float32)
  scores = np.linspace(0.9, 0.5, 10).astype(np.float32)
  perm = rng.permutation(10)
  sm = set_match(boxes, scores, boxes[perm], scores[perm], capacity=10)
  assert sm.ok and np.array_equal(perm[sm.j], np.arange(10))
  # The last row ties the cut and was replaced by another box of a tied score: allowed at a
  # full cut only, and only when the replacement's score ties the cut too.
  other = boxes.copy()
  other[9] += 200
  ours = scores.copy()
  ours[9] += 5e-5
  assert set_match(boxes, scores, other, ours, capacity=10).ok
  assert not set_match(boxes, scores, other, ours, capacity=20).ok
  ours[9] = 0.3
  assert not set_match(boxes, scores, other, ours, capacity=10).ok
  other[9], other[3] = boxes[9], other[3] + 200  # a confident detection moved
  assert not set_match(boxes, scores, other, scores, capacity=10).ok
  # Classes must agree.
  cls = np.arange(10)
  assert not set_match(boxes, scores, boxes, scores, 10, cls, cls[::-1]).ok


@pytest.mark.parametrize("kind", ["missing_file", "not_a_folder_fixture"])
def test_broken_folders_fail_in_one_row(tmp_path, kind):
  folder = tmp_path / "f"
  if kind == "missing_file":
    _copy_folder(SEMANTIC, folder)
    os.unlink(folder / "config.yaml")
  else:
    folder.mkdir()
  rows = models.check_model_folder(str(folder))
  assert len(rows) == 1 and not rows[0].passed and "missing" in rows[0].note


@pytest.mark.slow
def test_x101_folder_without_goldens_of_the_heads_runs(tmp_path):
  """A ResNeXt (groups 32, stride on the 3x3, PIXEL_STD != 1) zoo-style yaml with a missing
  _BASE_ file, another seed and a resize-free small image: the tool builds, loads and runs it and
  checks the arrays it is given (no detectron2 goldens exist for this config)."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  folder = tmp_path / "x101"
  folder.mkdir()
  (tmp_path / "make_weights.py").symlink_to(PARITY_DIR / "make_weights.py")
  (folder / "config.yaml").write_text(
      "_BASE_: Base-PointRend-RCNN-FPN.yaml\n"
      "MODEL:\n"
      "  PIXEL_STD: [57.375, 57.120, 58.395]\n"
      "  RESNETS: {DEPTH: 101, NUM_GROUPS: 32, WIDTH_PER_GROUP: 8, STRIDE_IN_1X1: False}\n"
      "  ROI_HEADS: {NUM_CLASSES: 80}\n"
      "  POINT_HEAD: {NUM_CLASSES: 80}\n"
      "INPUT: {MIN_SIZE_TEST: 96, MAX_SIZE_TEST: 160}\n")
  rgb = np.asarray(Image.open(R50 / "image.png").convert("RGB"))[2:386:4, 2:578:4]  # 96 x 144
  Image.fromarray(np.ascontiguousarray(rgb)).save(folder / "image.png")
  (folder / "meta.json").write_text(json.dumps({"seed": 3, "weights_recipe": "d2-parity-v2"}))
  # detectron2's input: float32 (x - mean) / std in BGR, NCHW, zero-padded after normalizing.
  bgr = rgb[:, :, ::-1].astype(np.float32)
  x = (bgr - np.float32([103.53, 116.28, 123.675])) / np.float32([57.375, 57.120, 58.395])
  x = np.pad(np.transpose(x[None], (0, 3, 1, 2)), ((0, 0), (0, 0), (0, 0), (0, 16)))

  def summary(a):  # the fixtures' README: float64 [mean, std, min, max, sum(|x|)]
    a = a.astype(np.float64)
    return np.array([a.mean(), a.std(), a.min(), a.max(), np.abs(a).sum()])

  inputs = dict(input_summary=summary(x), input_valid_summary=summary(x[:, :, :, :144]),
                input_crop_tl=x[:, :, :8, :8], input_crop_pad_edge=x[:, :, 48:52, 140:148],
                input_row_sums=x.astype(np.float64).sum(axis=(0, 1, 3)),
                input_col_sums=x.astype(np.float64).sum(axis=(0, 1, 2)))
  np.savez(folder / "expected.npz", image_hw=np.array([96, 144], np.int32),
           resized_hw=np.array([96, 144], np.int32),
           input_shape=np.array([1, 3, 96, 160], np.int32), **inputs)
  rows = models.check_model_folder(str(folder))
  # The summed input views hold detectron2's rounding to atol 1e-6 only with a true division
  # by PIXEL_STD (a reciprocal multiplication is off by up to 2.5e-4 in sum(|x|)).
  assert [(r.name, r.passed) for r in rows] == [
      ("image_hw", True), ("resized_hw", True), ("input_shape", True)] + [
          (name, True) for name in inputs], [r for r in rows if not r.passed]
