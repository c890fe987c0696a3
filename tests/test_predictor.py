"""Predictor (images of any size/kind -> results at original resolution), host postprocessing,
subdivision stages and the visualization helpers, on tiny configs with random weights."""

from __future__ import annotations

import subprocess
import sys
import warnings

import numpy as np
import pycocotools.mask as mask_util
import pytest
from PIL import Image

from conftest import REPO_ROOT
from pointrend_jax import visualization as vis
from pointrend_jax.inference import Predictor, to_rgb_uint8
from pointrend_jax.postprocess import Instances, SemanticResult, paste_masks
from pointrend_jax.modeling.zoo import from_detectron2_yaml

TINY_SEMANTIC_YAML = {
    "_BASE_": "Base-PointRend-Semantic-FPN.yaml",
    "MODEL": {
        "RESNETS": {"DEPTH": 18, "NORM": "GN", "RES2_OUT_CHANNELS": 64, "STEM_OUT_CHANNELS": 32},
        "FPN": {"OUT_CHANNELS": 32},
        "SEM_SEG_HEAD": {"NUM_CLASSES": 19, "CONVS_DIM": 32},
        "POINT_HEAD": {"NUM_CLASSES": 19, "FC_DIM": 32, "SUBDIVISION_NUM_POINTS": 256},
    },
    "INPUT": {"MIN_SIZE_TEST": 64, "MAX_SIZE_TEST": 96},
}


@pytest.fixture(scope="module")
def predictor(tiny_cfg) -> Predictor:
  return Predictor(tiny_cfg, None, seed=0)


def _image(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
  """Smooth blobs (not white noise) so that masks have some structure."""
  yy, xx = np.mgrid[0:h, 0:w]
  img = np.zeros((h, w, 3), np.float64)
  for _ in range(4):
    cy, cx, r = rng.uniform(0, h), rng.uniform(0, w), rng.uniform(0.2, 0.6) * max(h, w)
    img += rng.uniform(0, 255, 3) * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / r ** 2)[..., None]
  return np.clip(img, 0, 255).astype(np.uint8)


def _check_instances(res: Instances, hw: tuple[int, int], num_classes: int = 3) -> None:
  n = len(res)
  assert res.image_size == hw
  assert res.boxes.shape == (n, 4) and res.boxes.dtype == np.float32
  assert res.scores.shape == (n,) and res.classes.shape == (n,)
  assert res.masks.shape == (n,) + hw and res.masks.dtype == bool
  assert len(res.rle) == n and len(res.class_names) == n
  assert np.all(np.diff(res.scores) <= 0)
  assert np.all((res.classes >= 0) & (res.classes < num_classes))
  assert np.all(res.boxes[:, [0, 2]] <= hw[1]) and np.all(res.boxes[:, [1, 3]] <= hw[0])
  assert np.all(res.boxes >= 0)
  assert np.all(res.boxes[:, 2] > res.boxes[:, 0]) and np.all(res.boxes[:, 3] > res.boxes[:, 1])
  for i in range(n):
    assert res.rle[i]["size"] == list(hw) and isinstance(res.rle[i]["counts"], str)
    np.testing.assert_array_equal(mask_util.decode(res.rle[i]).astype(bool), res.masks[i])
    assert res.class_names[i] == f"class_{res.classes[i]}"


def _same(a: Instances, b: Instances) -> None:
  np.testing.assert_array_equal(a.boxes, b.boxes)
  np.testing.assert_array_equal(a.scores, b.scores)
  np.testing.assert_array_equal(a.masks, b.masks)


def test_images_of_any_kind_one_compilation(predictor, tmp_path):
  rng = np.random.default_rng(0)
  odd = _image(rng, 37, 53)
  tall = _image(rng, 300, 17)
  gray = _image(rng, 45, 61)[..., 0]
  rgba = np.concatenate([_image(rng, 50, 40), np.full((50, 40, 1), 7, np.uint8)], axis=2)
  sixteen = (rng.integers(0, 65536, (33, 70))).astype(np.uint16)
  Image.fromarray(sixteen).save(tmp_path / "sixteen.png")
  Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
  Image.fromarray(odd).save(tmp_path / "odd.png")
  assert Image.open(tmp_path / "sixteen.png").mode.startswith("I;16")

  results = predictor([odd, tall, gray, rgba, tmp_path / "sixteen.png",
                       str(tmp_path / "rgba.png"), tmp_path / "odd.png"])
  sizes = [(37, 53), (300, 17), (45, 61), (50, 40), (33, 70), (50, 40), (37, 53)]
  assert [r.image_size for r in results] == sizes
  for r, hw in zip(results, sizes):
    _check_instances(r, hw)
  assert len(results[0]) > 0 and len(results[1]) > 0  # random weights: confident detections
  # A path and the array it holds; RGBA drops alpha (file and array alike); 16-bit as round(/257).
  _same(results[6], results[0])
  _same(results[5], results[3])
  _same(results[3], predictor(rgba[..., :3]))
  _same(results[2], predictor(np.repeat(gray[..., None], 3, axis=2)))
  _same(results[4], predictor(((sixteen.astype(np.int64) * 255 + 32767) // 65535)
                              .astype(np.uint8)))
  # All resized sizes fit the single 128x128 bucket: one compilation, reused by every call.
  assert predictor.num_compiles == 1
  assert list(predictor.program.compile_seconds) == [(1, 128, 128)]
  single = predictor(_image(rng, 90, 91))  # a new image of the same bucket: no recompile
  assert isinstance(single, Instances) and predictor.num_compiles == 1


def test_bad_inputs_name_the_file(predictor, tmp_path):
  garbage = tmp_path / "garbage.jpg"
  garbage.write_bytes(b"this is not an image")
  truncated = tmp_path / "truncated.png"
  Image.fromarray(np.zeros((64, 64, 3), np.uint8) + 100).save(tmp_path / "full.png")
  truncated.write_bytes((tmp_path / "full.png").read_bytes()[:80])
  before = predictor.num_compiles
  for bad in (garbage, truncated):
    with pytest.raises(ValueError, match=str(bad)):
      predictor([np.zeros((20, 20, 3), np.uint8), bad])
  with pytest.raises(FileNotFoundError, match="missing.png"):
    predictor(tmp_path / "missing.png")
  with pytest.raises(TypeError, match="float"):
    predictor(np.zeros((8, 8, 3), np.float32))
  with pytest.raises(ValueError, match="shape"):
    predictor(np.zeros((8, 8, 2), np.uint8))
  assert predictor.num_compiles == before


def test_no_detections_batched_exact_padding(tiny_cfg):
  cfg = tiny_cfg.replace(**{"roi_heads.score_thresh_test": 1.0})  # no prob exceeds 1
  p = Predictor(cfg, None, batch_size=2, buckets="exact")
  rng = np.random.default_rng(1)
  images = [_image(rng, 37, 53), _image(rng, 40, 57), _image(rng, 35, 50)]
  assert {p.bucket_for(*p.resized_size(*im.shape[:2])) for im in images} == {(96, 128)}
  results = p(images)
  for r, im in zip(results, images):
    hw = im.shape[:2]
    assert len(r) == 0 and r.boxes.shape == (0, 4) and r.scores.shape == (0,)
    assert r.classes.shape == (0,) and r.masks.shape == (0,) + hw and r.rle == []
    assert r.to_json() == {"height": hw[0], "width": hw[1], "instances": []}
  assert p.num_compiles == 1 and list(p.program.compile_seconds) == [(2, 96, 128)]


def test_score_threshold_filters_on_host(predictor):
  image = _image(np.random.default_rng(3), 64, 64)
  full = predictor(image)
  thr = float(np.median(full.scores))
  predictor.score_threshold = thr
  try:
    part = predictor(image)
  finally:
    predictor.score_threshold = None
  keep = full.scores > thr
  np.testing.assert_array_equal(part.scores, full.scores[keep])
  np.testing.assert_array_equal(part.masks, full.masks[keep])


def test_weights_from_pkl_converted_dir_and_state_dict(predictor, tmp_path):
  import pickle
  import jax
  from flax import nnx
  from pointrend_jax.checkpoint.orbax_io import save_converted
  from pointrend_jax.checkpoint.d2_model import random_d2_state
  state = random_d2_state(predictor.model, seed=0)
  with open(tmp_path / "w.pkl", "wb") as f:
    pickle.dump({"model": state, "__author__": "test"}, f)
  save_converted(predictor.model, predictor.cfg, tmp_path / "converted")
  want = nnx.to_pure_dict(nnx.state(predictor.model))
  for p in (Predictor(predictor.cfg, tmp_path / "w.pkl"), Predictor(predictor.cfg, state),
            Predictor(None, tmp_path / "converted"),
            Predictor(tmp_path / "converted", str(tmp_path / "converted"))):
    assert p.cfg == predictor.cfg and p.num_compiles == 0
    jax.tree.map(np.testing.assert_array_equal, nnx.to_pure_dict(nnx.state(p.model)), want)
  with pytest.raises(FileNotFoundError, match="nope.pkl"):
    Predictor(predictor.cfg, tmp_path / "nope.pkl")
  with pytest.raises(ValueError, match="config"):
    Predictor(None, tmp_path / "w.pkl")


def test_subdivision_stages_are_consistent(predictor):
  import jax.numpy as jnp
  from pointrend_jax.ops.point_sample import interpolate_bilinear_x2
  image = _image(np.random.default_rng(4), 80, 100)
  inst, st = predictor.predict_with_stages(image)
  n = len(inst)
  assert n > 0
  _same(inst, predictor(image))
  assert st.coarse.shape == (n, 7, 7) and st.init.shape == (n, 28, 28)
  assert [u.shape[1:] for u in st.upsampled] == [(56, 56), (112, 112), (224, 224)]
  assert [p.shape for p in st.points] == [(n, 784, 2)] * 3
  prev = st.init
  for up, ref, idx, pts in zip(st.upsampled, st.refined, st.indices, st.points):
    expect = np.asarray(interpolate_bilinear_x2(jnp.asarray(prev)[..., None]))[..., 0]
    np.testing.assert_allclose(up, expect, atol=1e-5)
    side = up.shape[-1]
    # Points are the centres of the chosen cells.
    np.testing.assert_allclose(pts[..., 0], (idx % side + 0.5) / side, atol=1e-6)
    np.testing.assert_allclose(pts[..., 1], (idx // side + 0.5) / side, atol=1e-6)
    changed = (ref != up).reshape(n, -1)
    assert changed.sum(1).max() <= 784
    prev = ref
  # The final stage pasted is the returned mask.
  probs = 1.0 / (1.0 + np.exp(-st.final.astype(np.float64)))
  pasted = paste_masks(probs.astype(np.float32), inst.boxes, inst.image_size)
  assert (pasted != inst.masks).sum() <= 2
  fig = vis.subdivision_figure(image, inst, st, [0, n - 1], panel_height=64)
  assert fig.dtype == np.uint8 and fig.ndim == 3 and fig.shape[1] > 7 * 64


def test_semantic_predictor():
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # "built-in copy of the _BASE_ file"
    p = Predictor(from_detectron2_yaml(TINY_SEMANTIC_YAML), None)
  rng = np.random.default_rng(5)
  a, b = _image(rng, 37, 53), _image(rng, 30, 41)
  ra, rb = p([a, b], return_logits=True)
  assert p.num_compiles == 1  # both land in the 64x96 bucket
  for r, im in ((ra, a), (rb, b)):
    assert isinstance(r, SemanticResult) and r.image_size == im.shape[:2]
    assert r.sem_seg.shape == im.shape[:2] and r.logits.shape == im.shape[:2] + (19,)
    np.testing.assert_array_equal(r.sem_seg, r.logits.argmax(-1))
    assert r.class_names[0] == "road" and len(r.class_names) == 19
  assert p(a).logits is None
  np.testing.assert_array_equal(p(a).sem_seg, ra.sem_seg)
  summary = ra.to_json()
  assert abs(sum(summary["pixel_fraction"].values()) - 1.0) < 1e-9
  colour = vis.overlay_semantic(a, ra.sem_seg)
  assert colour.shape == a.shape and colour.dtype == np.uint8


def test_to_rgb_uint8_conversions():
  g = np.arange(12, dtype=np.uint8).reshape(3, 4)
  np.testing.assert_array_equal(to_rgb_uint8(g), np.repeat(g[..., None], 3, 2))
  np.testing.assert_array_equal(to_rgb_uint8(g[..., None]), to_rgb_uint8(g))
  np.testing.assert_array_equal(to_rgb_uint8(Image.fromarray(g)), to_rgb_uint8(g))
  assert to_rgb_uint8(np.full((2, 2), 65535, np.uint16)).max() == 255
  assert to_rgb_uint8(np.full((2, 2), 128, np.uint16)).max() == 0  # round(128 / 257)
  with pytest.raises(ValueError, match="0..255"):
    to_rgb_uint8(np.full((2, 2), 300, np.int32))


def test_visualization_helpers():
  from pointrend_jax.data.cityscapes import LABELS
  expect = [l.color for l in sorted((l for l in LABELS if 0 <= l.train_id < 255),
                                    key=lambda l: l.train_id)]
  np.testing.assert_array_equal(vis.CITYSCAPES_PALETTE, np.asarray(expect, np.uint8))
  colours = vis.instance_colors(20)
  assert len({tuple(c) for c in colours}) == 20
  img = np.full((40, 60, 3), 128, np.uint8)
  masks = np.zeros((2, 40, 60), bool)
  masks[0, 5:20, 5:30] = True
  masks[1, 25:35, 40:55] = True
  out = vis.draw_instances(img, np.array([[5, 5, 30, 20], [40, 25, 55, 35]], np.float32),
                           masks, ["a 0.9", "b 0.5"], alpha=0.5)
  assert out.shape == img.shape and out.dtype == np.uint8
  assert not np.array_equal(out[12, 15], img[12, 15])  # inside mask 0: tinted
  np.testing.assert_array_equal(out[38, 2], img[38, 2])  # untouched background
  sem = vis.colorize_semantic(np.array([[0, 18], [255, 3]]))
  np.testing.assert_array_equal(sem[0, 0], vis.CITYSCAPES_PALETTE[0])
  np.testing.assert_array_equal(sem[1, 0], [0, 0, 0])


def test_import_is_lazy():
  code = ("import sys, pointrend_jax; assert 'jax' not in sys.modules; "
          "from pointrend_jax import Predictor; from pointrend_jax.inference import Predictor as P;"
          " assert Predictor is P")
  proc = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True,
                        text=True, timeout=120)
  assert proc.returncode == 0, proc.stderr


def test_package_exports_the_modules():
  import pointrend_jax  # pylint: disable=g-import-not-at-top
  from pointrend_jax.modeling import meta_arch  # pylint: disable=g-import-not-at-top
  assert pointrend_jax.PointRendRCNN is meta_arch.PointRendRCNN
  for name in pointrend_jax.__all__:
    assert getattr(pointrend_jax, name) is not None, name


def test_write_pictures_of_evaluation_visuals(predictor, tmp_path):
  image = _image(np.random.default_rng(6), 60, 80)
  Image.fromarray(image).save(tmp_path / "a.png")
  inst, stages = predictor.predict_with_stages(image)
  assert len(inst) > 0
  record = {"image_id": 3, "file_name": str(tmp_path / "a.png"), "height": 60, "width": 80,
            "annotations": [{"bbox": [10, 10, 20, 15], "category_id": 1,
                             "segmentation": [[10, 10, 30, 10, 30, 25, 10, 25]]}]}
  visuals = [{"record": record, "results": {"segm": inst, "segm_coarse": inst},
              "stages": stages}]
  paths = vis.write_pictures(visuals, predictor.class_names, str(tmp_path / "pictures"),
                             min_score=0.0)
  assert [p.rsplit("/", 1)[1] for p in paths] == ["000003_overlay.png", "000003_points.png"]
  overlay = np.asarray(Image.open(paths[0]))
  assert overlay.shape[1] > 3 * 80 * 5  # three panels at zoom 5 (long side ~400 px)
