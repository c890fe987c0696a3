"""Model config (detectron2 yaml, zoo configs), whole-model building, checkpoint names and
loading, and the jitted instance predict on a tiny config."""

from __future__ import annotations

import json
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import yaml
from flax import nnx

from conftest import PARITY_DIR, SHARED_DIR
from pointrend_jax.checkpoint.d2_model import d2_model_names, load_d2_model
from pointrend_jax.errors import CheckpointError
from pointrend_jax.errors import ConfigError
from pointrend_jax import postprocess
from pointrend_jax.modeling import zoo as zoo_lib
from pointrend_jax.modeling.config import ModelConfig
from pointrend_jax.modeling.zoo import ZOO_NAMES, ZOO_STEMS, from_detectron2_yaml, zoo_config
from pointrend_jax.modeling.meta_arch import PointRendRCNN, abstract_model
from pointrend_jax.modeling.predict import PredictProgram
from pointrend_jax.modeling.semantic import PointRendSemanticSegmentor

MANIFESTS = SHARED_DIR / "spec" / "checkpoints"



def _manifest(stem: str) -> dict:
  with open(MANIFESTS / f"{stem}.json") as f:
    return json.load(f)


# ------------------------------------------------------------------------------------------------
# Zoo configs: names and shapes of the built models.
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ZOO_NAMES)
def test_zoo_model_names_equal_manifest(name):
  man = _manifest(ZOO_STEMS[name])
  cfg = zoo_config(name)
  model = abstract_model(cfg)
  assert isinstance(model, PointRendSemanticSegmentor if cfg.is_semantic else PointRendRCNN)
  assert d2_model_names(model) == {e["name"]: tuple(e["shape"]) for e in man["entries"]}
  assert list(cfg.pixel_std) == man["pixel_std"] and list(cfg.pixel_mean) == man["pixel_mean"]
  assert cfg.input.format == man["input_format"]
  # FREEZE_AT: the trainable variables are exactly detectron2's trainable parameters.
  trainable = sum(int(np.prod(v.get_value().shape))
                  for _, v in nnx.to_flat_state(nnx.state(model, nnx.Param)))
  assert trainable == man["num_trainable"]


def test_zoo_config_values():
  x101 = zoo_config("pointrend_rcnn_X_101_32x8d_FPN_3x_coco")
  assert x101 == zoo_config("x101_32x8d_fpn_3x_coco")
  assert (x101.resnets.depth, x101.resnets.num_groups, x101.resnets.width_per_group,
          x101.resnets.stride_in_1x1) == (101, 32, 8, False)
  assert x101.pixel_std == (57.375, 57.12, 58.395)
  city = zoo_config("r50_fpn_1x_cityscapes")
  assert city.num_classes == 8 and city.point_head.num_classes == 8
  assert (city.input.min_size_test, city.input.max_size_test) == (1024, 2048)
  sem = zoo_config("semantic_r101_fpn_cityscapes")
  assert sem.is_semantic and sem.resnets.freeze_at == 0 and sem.num_classes == 19
  assert not sem.point_head.coarse_pred_each_layer
  assert (sem.point_head.subdivision_steps, sem.point_head.subdivision_num_points) == (2, 8192)
  assert sem.point_head.train_num_points == 2048
  r50 = zoo_config("r50_fpn_1x_coco")
  assert (r50.rpn.pre_nms_topk_test, r50.rpn.post_nms_topk_test) == (1000, 1000)
  assert r50.box_head.train_on_pred_boxes and r50.size_divisibility == 32
  for name in ZOO_NAMES:  # JSON round trip (converted checkpoints store the config so)
    cfg = zoo_config(name)
    assert ModelConfig.from_dict(json.loads(cfg.to_json())) == cfg
  with pytest.raises(ConfigError, match="unknown zoo config"):
    zoo_config("mask_rcnn_R_50_FPN_1x")


# ------------------------------------------------------------------------------------------------
# detectron2 yaml parsing.
# ------------------------------------------------------------------------------------------------


def test_fixture_config_dumps_parse():
  r50 = from_detectron2_yaml(PARITY_DIR / "r50_fpn_1x_coco" / "config.yaml")
  assert r50 == zoo_config("r50_fpn_1x_coco").replace(weights="")
  sem = from_detectron2_yaml(PARITY_DIR / "semantic_r101_fpn_cityscapes" / "config.yaml")
  # The fixture overrode the test sizes (no resize of its 512x1024 image).
  assert sem == zoo_config("semantic_r101_fpn_cityscapes").replace(
      weights="", **{"input.min_size_test": 512, "input.max_size_test": 1024})


def _write_yaml(path, data) -> None:
  path.write_text(yaml.safe_dump(data, sort_keys=False))


def test_base_chain_from_files_and_builtin(tmp_path):
  zoo = zoo_lib.zoo_yaml("r50_fpn_3x_coco")
  zoo["SOLVER"]["STEPS"] = "(210000, 250000)"  # yacs-style tuple string
  zoo["INPUT"] = {"MIN_SIZE_TRAIN": "(640, 672, 704, 736, 768, 800)"}
  _write_yaml(tmp_path / "pointrend_rcnn_R_50_FPN_3x_coco.yaml", zoo)
  # No base files beside it: built-in copies are used, with a warning naming the file.
  with pytest.warns(UserWarning, match="Base-PointRend-RCNN-FPN.yaml"):
    cfg = from_detectron2_yaml(tmp_path / "pointrend_rcnn_R_50_FPN_3x_coco.yaml")
  assert cfg == zoo_config("r50_fpn_3x_coco")
  # The real layout: Base-PointRend-RCNN-FPN.yaml -> ../../../../configs/Base-RCNN-FPN.yaml.
  proj = tmp_path / "projects" / "PointRend" / "configs" / "InstanceSegmentation"
  proj.mkdir(parents=True)
  (tmp_path / "configs").mkdir()
  _write_yaml(tmp_path / "configs" / "Base-RCNN-FPN.yaml", zoo_lib._BASE_RCNN_FPN)
  _write_yaml(proj / "Base-PointRend-RCNN-FPN.yaml", zoo_lib._BASE_POINTREND_RCNN_FPN)
  changed = dict(zoo, MODEL=dict(zoo["MODEL"], ROI_HEADS={"NUM_CLASSES": 5},
                                 POINT_HEAD={"NUM_CLASSES": 5}))
  _write_yaml(proj / "custom.yaml", changed)
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    cfg = from_detectron2_yaml(proj / "custom.yaml")
  assert cfg == zoo_config("r50_fpn_3x_coco").replace(
      **{"roi_heads.num_classes": 5, "point_head.num_classes": 5})
  # An edited base file is honoured.
  base = dict(zoo_lib._BASE_RCNN_FPN)
  base["MODEL"] = dict(base["MODEL"], RPN=dict(base["MODEL"]["RPN"], NMS_THRESH=0.6))
  _write_yaml(tmp_path / "configs" / "Base-RCNN-FPN.yaml", base)
  assert from_detectron2_yaml(proj / "custom.yaml").rpn.nms_thresh == 0.6
  # A missing base without a built-in copy is an error.
  _write_yaml(tmp_path / "orphan.yaml", {"_BASE_": "Base-Unknown.yaml"})
  with pytest.raises(ConfigError, match="Base-Unknown.yaml"):
    from_detectron2_yaml(tmp_path / "orphan.yaml")


@pytest.mark.parametrize("key,value,match", [
    ("MODEL.META_ARCHITECTURE", "RetinaNet", r"MODEL\.META_ARCHITECTURE.*RetinaNet"),
    ("MODEL.ROI_MASK_HEAD.NAME", "MaskRCNNConvUpsampleHead", r"MODEL\.ROI_MASK_HEAD\.NAME"),
    ("MODEL.RESNETS.DEFORM_ON_PER_STAGE", [False, True, True, True],
     r"MODEL\.RESNETS\.DEFORM_ON_PER_STAGE"),
    ("MODEL.ROI_HEADS.NAME", "CascadeROIHeads", r"MODEL\.ROI_HEADS\.NAME"),
    ("MODEL.RESNETS.DEPTH", 42, r"MODEL\.RESNETS\.DEPTH"),
    ("MODEL.POINT_HEAD.NUM_CLASSES", 81, r"MODEL\.POINT_HEAD\.NUM_CLASSES"),
    ("MODEL.PIXEL_STD", [1.0, 1.0], r"MODEL\.PIXEL_STD"),
    ("MODEL.RPN.PRE_NMS_TOPK_TEST", "many", r"MODEL\.RPN\.PRE_NMS_TOPK_TEST"),
])
def test_unsupported_values_name_the_key(key, value, match):
  data = zoo_lib.zoo_yaml("r50_fpn_1x_coco")
  node = data
  *parents, leaf = key.split(".")
  for p in parents:
    node = node.setdefault(p, {})
  node[leaf] = value
  with pytest.raises(ConfigError, match=match):
    from_detectron2_yaml(data)


def test_config_replace_and_dict_errors():
  cfg = zoo_config("r50_fpn_1x_coco")
  assert cfg.replace(**{"rpn.nms_thresh": 0.6}).rpn.nms_thresh == 0.6
  with pytest.raises(ConfigError, match="no field"):
    cfg.replace(**{"rpn.nms": 0.6})
  d = cfg.to_dict()
  d["rpn"]["bogus"] = 1
  with pytest.raises(ConfigError, match="rpn.bogus"):
    ModelConfig.from_dict(d)


# ------------------------------------------------------------------------------------------------
# Loading detectron2 state dicts.
# ------------------------------------------------------------------------------------------------


def test_load_d2_model_reports_by_name(tiny_cfg):
  model = abstract_model(tiny_cfg)
  names = d2_model_names(model)
  assert "roi_heads.mask_head.point_head.fc1.weight" in names
  assert names["roi_heads.mask_head.point_head.fc1.weight"] == (32, 32 + 3, 1)
  rng = np.random.default_rng(0)
  state = {n: rng.normal(size=s).astype(np.float16 if "fpn" in n else np.float32)
           for n, s in names.items()}
  state["pixel_mean"] = np.zeros(3, np.float32)  # a known extra: ignored
  report = load_d2_model(model, state)
  assert report.ok and report.ignored == ["pixel_mean"]
  kernel = model.backbone.fpn_lateral2.kernel[...]
  assert kernel.dtype == jnp.float32  # float16 cast
  np.testing.assert_array_equal(
      np.asarray(kernel), np.transpose(state["backbone.fpn_lateral2.weight"], (2, 3, 1, 0)))

  bad = dict(state)
  del bad["roi_heads.box_head.fc1.bias"]
  bad["roi_heads.mask_head.coarse_head.prediction.weight"] = np.zeros((7, 64), np.float32)
  bad["roi_heads.extra.weight"] = np.zeros((2, 2), np.float32)
  with pytest.raises(CheckpointError) as err:
    load_d2_model(abstract_model(tiny_cfg), bad)
  msg = str(err.value)
  assert "roi_heads.box_head.fc1.bias (64,)" in msg
  assert "roi_heads.extra.weight (2, 2)" in msg
  assert "roi_heads.mask_head.coarse_head.prediction.weight: (7, 64) vs (147, 64)" in msg
  # Backbone-only (ImageNet init): heads keep their values, the report lists them.
  before = np.asarray(model.roi_heads.box_head.fc1.kernel[...])
  backbone = {n: -v for n, v in state.items() if n.startswith("backbone.bottom_up.")}
  report = load_d2_model(model, backbone, backbone_only=True)
  assert report.ok and report.not_loaded and all(
      not n.startswith("backbone.bottom_up.") for n in report.not_loaded)
  np.testing.assert_array_equal(np.asarray(model.roi_heads.box_head.fc1.kernel[...]), before)
  np.testing.assert_array_equal(
      np.asarray(model.backbone.bottom_up.stem.conv1.kernel[...]),
      -np.transpose(state["backbone.bottom_up.stem.conv1.weight"], (2, 3, 1, 0)))


# ------------------------------------------------------------------------------------------------
# Tiny model: predict (jit, fixed shapes), no retrace, no detections, postprocess.
# ------------------------------------------------------------------------------------------------


def _numpy_init(model, seed: int = 0) -> None:
  """detectron2-like random weights, filled from numpy (eager jax inits compile per shape)."""
  rng = np.random.default_rng(seed)
  state = {}
  for name, shape in d2_model_names(model).items():
    if len(shape) == 1:
      state[name] = np.full(shape, 1.0 if name.endswith("norm.weight") else 0.0, np.float32)
      continue
    std = np.sqrt(2.0 / np.prod(shape[1:]))
    if "cls_score" in name:
      std = 0.01
    elif "bbox_pred" in name or "predict" in name:
      std = 0.001
    state[name] = rng.normal(0.0, std, shape).astype(np.float32)
  load_d2_model(model, state)


def test_tiny_predict_compiles_once_and_handles_no_detections(tiny_cfg):
  model = abstract_model(tiny_cfg)
  _numpy_init(model)
  program = PredictProgram(model)
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (2, 128, 128, 3), dtype=np.uint8)
  sizes = np.array([[128, 128], [100, 90]], np.int32)
  out = program(images, sizes)
  d, s = 20, model.mask_head.output_side
  assert s == 224
  assert {k: v.shape for k, v in out.items()} == {
      "boxes": (2, d, 4), "scores": (2, d), "classes": (2, d), "valid": (2, d),
      "mask_probs": (2, d, s, s), "coarse_probs": (2, d, 7, 7)}
  # detectron2's init gives near-uniform class scores (1/4 > 0.05): there are detections.
  assert bool(out["valid"].all())
  boxes = np.asarray(out["boxes"])
  assert boxes[1, :, 2].max() <= 90 and boxes[1, :, 3].max() <= 100

  # Background wins everywhere: nothing passes the score threshold; same compiled program.
  model.roi_heads.box_predictor.cls_score.bias[...] = jnp.zeros((4,)).at[3].set(100.0)
  program.update(model)
  sizes = np.array([[64, 128], [128, 32]], np.int32)
  out = program(rng.integers(0, 256, (2, 128, 128, 3), dtype=np.uint8), sizes)
  assert list(program.compile_seconds) == [(2, 128, 128)]
  assert not bool(out["valid"].any()) and float(jnp.abs(out["boxes"]).max()) == 0.0
  assert np.isfinite(np.asarray(out["mask_probs"])).all()
  out = {k: np.asarray(v) for k, v in out.items()}
  for i, orig in enumerate([(32, 64), (256, 64)]):
    inst, _ = postprocess.instances({k: v[i] for k, v in out.items()}, orig, sizes[i],
                                    ["a", "b", "c"])
    assert inst.masks.shape == (0,) + orig and inst.boxes.shape == (0, 4)


# ------------------------------------------------------------------------------------------------
# Input normalisation.
# ------------------------------------------------------------------------------------------------


# X101's ImageNet statistics (RGB order; configs.md §2.4 lists them reversed, in BGR order).
_X101_MEAN_RGB = (123.675, 116.28, 103.53)
_X101_STD_RGB = (58.395, 57.12, 57.375)


@pytest.mark.parametrize("fmt", ["RGB", "BGR"])
@pytest.mark.parametrize("meta", ["GeneralizedRCNN", "SemanticSegmentor"])
def test_preprocess_is_bit_exact_with_non_unit_std(tiny_cfg, fmt, meta):
  """detectron2 ``preprocess_image``: ``(x - pixel_mean) / pixel_std`` on the image in
  INPUT.FORMAT order, float32 with a true (correctly rounded) division, then zero padding."""
  order = slice(None) if fmt == "RGB" else slice(None, None, -1)
  mean = _X101_MEAN_RGB[order]
  std = _X101_STD_RGB[order]
  cfg = tiny_cfg.replace(meta_architecture=meta, pixel_mean=mean, pixel_std=std,
                         **{"input.format": fmt})
  model = abstract_model(cfg)
  assert isinstance(model, PointRendSemanticSegmentor if cfg.is_semantic else PointRendRCNN)
  rng = np.random.default_rng(11)
  rgb = rng.integers(0, 256, (2, 50, 70, 3), dtype=np.uint8)
  sizes = np.array([[50, 70], [37, 45]], np.int32)
  # detectron2 sees the image in INPUT.FORMAT order; its mean / std buffers are float32.
  d2 = (rgb[..., order].astype(np.float32) - np.asarray(mean, np.float32)) \
      / np.asarray(std, np.float32)
  # The reciprocal multiplication XLA would substitute differs on many pixels: the check bites.
  assert (d2 != (rgb[..., order].astype(np.float32) - np.asarray(mean, np.float32))
          * (1 / np.asarray(std, np.float32))).sum() > 100
  for fn in (model.preprocess, jax.jit(lambda im, s: model.preprocess(im, s))):
    x = np.asarray(fn(jnp.asarray(rgb), jnp.asarray(sizes)))
    assert x.shape == (2, 64, 96, 3) and x.dtype == np.float32
    np.testing.assert_array_equal(x[0, :50, :70], d2[0])
    np.testing.assert_array_equal(x[1, :37, :45], d2[1, :37, :45])
    assert not x[0, 50:].any() and not x[0, :, 70:].any()
    assert not x[1, 37:].any() and not x[1, :, 45:].any()


def test_preprocess_unit_std_is_the_mean_subtraction(tiny_cfg):
  """PIXEL_STD 1 (the MSRA configs): the input is exactly ``x - mean`` in BGR order."""
  model = abstract_model(tiny_cfg)
  assert tiny_cfg.pixel_std == (1.0, 1.0, 1.0) and tiny_cfg.input.format == "BGR"
  rgb = np.random.default_rng(12).integers(0, 256, (1, 64, 64, 3), dtype=np.uint8)
  x = np.asarray(model.preprocess(jnp.asarray(rgb)))
  np.testing.assert_array_equal(
      x, rgb[..., ::-1].astype(np.float32) - np.asarray(tiny_cfg.pixel_mean, np.float32))
