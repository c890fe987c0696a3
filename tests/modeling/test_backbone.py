"""ResNet / FPN backbone: detectron2 names and shapes, parity with the detectron2 goldens,
training-mode behaviour (GN/BN, frozen stages, gradients) and jit caching."""

from __future__ import annotations

import importlib.util
import json
import math
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from PIL import Image

from pointrend_jax.modeling import layers
from pointrend_jax.modeling.fpn import FPN, build_resnet_fpn_backbone
from pointrend_jax.modeling.layers import (BatchNorm, Conv2d, Frozen, FrozenBatchNorm,
                                           FrozenParam, FrozenStat, GroupNorm, d2_names_of,
                                           load_d2_state)
from pointrend_jax.modeling.resnet import ResNet

SHARED = Path(__file__).resolve().parents[3] / "shared"
FIXTURES = SHARED / "fixtures" / "detectron2_parity"
MANIFESTS = SHARED / "spec" / "checkpoints"
PIXEL_MEAN_BGR = np.array([103.53, 116.28, 123.675], np.float32)
MAPS = ("res2", "res3", "res4", "res5", "p2", "p3", "p4", "p5", "p6")

# build_resnet_fpn_backbone arguments of the six seed configs (configs.md §2).
CONFIGS = {
    "pointrend_rcnn_R_50_FPN_1x_coco": dict(depth=50),
    "pointrend_rcnn_R_50_FPN_3x_coco": dict(depth=50),
    "pointrend_rcnn_R_101_FPN_3x_coco": dict(depth=101),
    "pointrend_rcnn_X_101_32x8d_FPN_3x_coco": dict(
        depth=101, num_groups=32, width_per_group=8, stride_in_1x1=False),
    "pointrend_rcnn_R_50_FPN_1x_cityscapes": dict(depth=50),
    "pointrend_semantic_R_101_FPN_1x_cityscapes": dict(depth=101, freeze_at=0),
}


def _manifest(stem: str) -> dict:
  with open(MANIFESTS / f"{stem}.json") as f:
    return json.load(f)


def _abstract_backbone(**kwargs) -> FPN:
  return nnx.eval_shape(lambda: build_resnet_fpn_backbone(**kwargs, rngs=nnx.Rngs(0)))


def _paths(module: nnx.Module, filt) -> set[str]:
  return {".".join(map(str, p)) for p, _ in nnx.to_flat_state(nnx.state(module, filt))}


def _recipe_weights(stem: str) -> dict[str, np.ndarray]:
  """Seed-0 fixture weights (make_weights.py) of the ``backbone.*`` entries of a manifest."""
  spec = importlib.util.spec_from_file_location("d2_make_weights", FIXTURES / "make_weights.py")
  make_weights = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(make_weights)
  man = _manifest(stem)
  entries = [e for e in man["entries"] if e["name"].startswith("backbone.")]
  return dict(make_weights.make_state_dict(entries, seed=0, pixel_std=man["pixel_std"]))


def _errors(actual: np.ndarray, expected: np.ndarray) -> tuple[float, float]:
  """(max abs error, max abs error / max |expected|)."""
  a, e = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
  err = float(np.max(np.abs(a - e))) if e.size else 0.0
  return err, err / max(float(np.max(np.abs(e))), 1e-12)


def _numpy_init(module: nnx.Module, seed: int = 0) -> None:
  """Fills a (possibly abstract) module with random numpy values via the d2 loader (fast)."""
  rng = np.random.default_rng(seed)
  state = {}
  for name, shape in d2_names_of(module).items():
    if len(shape) == 4:
      state[name] = rng.normal(0, math.sqrt(2 / np.prod(shape[1:])), shape).astype(np.float32)
    elif name.endswith("running_var"):
      state[name] = rng.uniform(0.5, 2.0, shape).astype(np.float32)
    elif name.endswith("weight"):
      state[name] = rng.uniform(0.5, 1.5, shape).astype(np.float32)
    else:
      state[name] = rng.uniform(-0.1, 0.1, shape).astype(np.float32)
  load_d2_state(module, state)


# ------------------------------------------------------------------------------------------------
# (a) detectron2 names / shapes / trainability of all six configs.
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("stem", sorted(CONFIGS))
def test_manifest_backbone_names_and_shapes(stem):
  man = _manifest(stem)
  entries = {e["name"]: e for e in man["entries"] if e["name"].startswith("backbone.")}
  model = _abstract_backbone(**CONFIGS[stem])

  names = d2_names_of(model, "backbone.")
  expected = {n: tuple(e["shape"]) for n, e in entries.items()}
  assert sorted(set(expected) - set(names)) == []
  assert sorted(set(names) - set(expected)) == []
  assert {n: s for n, s in names.items() if s != expected[n]} == {}

  # FrozenBN buffers are exactly the manifest's backbone buffers.
  buffers = {"backbone." + p.replace("kernel", "weight") for p in _paths(model, FrozenStat)}
  assert buffers == {n for n, e in entries.items() if e["kind"] == "buffer"}
  # Trainable numel (FREEZE_AT) = manifest num_trainable minus the (all trainable) non-backbone
  # parameters.
  head_params = sum(e["numel"] for e in man["entries"]
                    if e["kind"] == "parameter" and not e["name"].startswith("backbone."))
  trainable = sum(int(np.prod(v.get_value().shape))
                  for _, v in nnx.to_flat_state(nnx.state(model, nnx.Param)))
  assert trainable == man["num_trainable"] - head_params

  # The loader consumes every name with these shapes (zero-stride arrays: no weight memory).
  state = {n: np.broadcast_to(np.float32(0), s) for n, s in expected.items()}
  state["proposal_generator.rpn_head.conv.weight"] = np.zeros((1,), np.float32)  # ignored
  assert load_d2_state(model, state, "backbone.") == set(expected)


def test_loader_errors_name_the_key():
  model = _abstract_backbone(depth=18, norm="GN", stem_out_channels=32, res2_out_channels=32,
                             out_channels=32)
  names = d2_names_of(model, "backbone.")
  state = {n: np.zeros(s, np.float32) for n, s in names.items()}
  bad = "backbone.bottom_up.res3.0.conv1.weight"
  state[bad] = np.zeros((64, 33, 3, 3), np.float32)
  with pytest.raises(ValueError, match=bad.replace(".", r"\.")):
    load_d2_state(model, state, "backbone.")
  del state[bad]
  with pytest.raises(KeyError, match=bad.replace(".", r"\.")):
    load_d2_state(model, state, "backbone.")
  assert load_d2_state(model, state, "backbone.", strict=False) == set(state)
  # A bare ResNet takes the same names under the prefix "backbone.bottom_up.".
  assert d2_names_of(model.bottom_up, "backbone.bottom_up.") == {
      n: s for n, s in names.items() if n.startswith("backbone.bottom_up.")}


# ------------------------------------------------------------------------------------------------
# (b) parity with detectron2 on the R50-FPN fixture (one jitted forward).
# ------------------------------------------------------------------------------------------------


def _bgr_input(rgb: np.ndarray, pad_to: tuple[int, int]) -> np.ndarray:
  """RGB uint8 (H, W, 3) -> normalized BGR float32 (1, Hp, Wp, 3), zero-padded bottom/right."""
  x = rgb[:, :, ::-1].astype(np.float32) - PIXEL_MEAN_BGR  # PIXEL_STD = 1
  out = np.zeros((1, *pad_to, 3), np.float32)
  out[0, :x.shape[0], :x.shape[1]] = x
  return out


def _run_backbone(model: FPN, x: np.ndarray) -> dict[str, np.ndarray]:
  graphdef, state = nnx.split(model)

  @jax.jit
  def forward(state, x):
    m = nnx.merge(graphdef, state)
    feats = m.bottom_up(x)
    return {**feats, **m.from_features(feats)}

  return {k: np.asarray(v) for k, v in forward(state, jnp.asarray(x)).items()}


def _golden_arrays(out: dict[str, np.ndarray], name: str) -> dict[str, np.ndarray]:
  """The fixture's views of one NHWC map (crops are NCHW, channels 0..15)."""
  a = out[name]
  h, w = a.shape[1:3]
  nchw = lambda v: np.transpose(v[:, :, :, :16], (0, 3, 1, 2))
  a64 = a.astype(np.float64)
  return {
      f"{name}_shape": np.array([a.shape[0], a.shape[3], h, w]),
      f"{name}_crop_tl": nchw(a[:, :8, :8]),
      f"{name}_crop_center": nchw(a[:, h // 2 - 4:h // 2 + 4, w // 2 - 4:w // 2 + 4]),
      f"{name}_crop_br": nchw(a[:, -8:, -8:]),
      f"{name}_chan_mean": a64.mean(axis=(0, 1, 2)),
      f"{name}_summary": np.array([a64.mean(), a64.std(), a64.min(), a64.max(),
                                   np.abs(a64).sum()]),
  }


def _check_maps(out, golden, atol=1e-3, rtol=1e-3) -> dict[str, tuple[float, float]]:
  errors = {}
  for name in MAPS:
    for key, actual in _golden_arrays(out, name).items():
      expected = golden[key]
      if key.endswith("_shape"):
        np.testing.assert_array_equal(actual, expected, err_msg=key)
        continue
      errors[key] = _errors(actual, expected)
      np.testing.assert_allclose(actual, expected, atol=atol, rtol=rtol, err_msg=key)
  return errors


def _report(title: str, errors: dict[str, tuple[float, float]]) -> None:
  print(f"\n{title}: array, max abs err, max abs err / max |expected|")
  for k, (a, r) in errors.items():
    print(f"  {k:24s} {a:.3e} {r:.3e}")


@pytest.fixture(scope="module")
def r50_outputs():
  stem = "pointrend_rcnn_R_50_FPN_1x_coco"
  weights = _recipe_weights(stem)
  model = _abstract_backbone(**CONFIGS[stem])
  assert load_d2_state(model, weights, "backbone.") == set(weights)
  rgb = np.asarray(Image.open(FIXTURES / "r50_fpn_1x_coco" / "model_input.png").convert("RGB"))
  assert rgb.shape == (800, 1200, 3)
  x = _bgr_input(rgb, (800, 1216))
  t = time.perf_counter()
  out = _run_backbone(model, x)
  print(f"\nR50-FPN 800x1216 compile + forward: {time.perf_counter() - t:.1f} s")
  return x, out


@pytest.fixture(scope="module")
def r50_golden():
  return dict(np.load(FIXTURES / "r50_fpn_1x_coco" / "expected.npz"))


def test_r50_input_preprocessing(r50_outputs, r50_golden):
  x, _ = r50_outputs
  g = r50_golden
  np.testing.assert_array_equal(g["input_shape"], [1, 3, 800, 1216])
  nchw = np.transpose(x, (0, 3, 1, 2))
  np.testing.assert_array_equal(nchw[:, :, :8, :8], g["input_crop_tl"])
  np.testing.assert_array_equal(nchw[:, :, 400:404, 1196:1204], g["input_crop_pad_edge"])
  np.testing.assert_allclose(nchw.astype(np.float64).sum(axis=(0, 1, 3)), g["input_row_sums"],
                             rtol=1e-9, atol=1e-6)
  np.testing.assert_allclose(nchw.astype(np.float64).sum(axis=(0, 1, 2)), g["input_col_sums"],
                             rtol=1e-9, atol=1e-6)


def test_r50_fpn_parity(r50_outputs, r50_golden):
  _, out = r50_outputs
  _report("R50-FPN parity (coco fixture)", _check_maps(out, r50_golden))


@pytest.mark.slow
def test_r101_semantic_parity():
  stem = "pointrend_semantic_R_101_FPN_1x_cityscapes"
  folder = FIXTURES / "semantic_r101_fpn_cityscapes"
  golden = dict(np.load(folder / "expected.npz"))
  weights = _recipe_weights(stem)
  model = _abstract_backbone(**CONFIGS[stem])
  assert load_d2_state(model, weights, "backbone.") == set(weights)
  rgb = np.asarray(Image.open(folder / "image.png").convert("RGB"))
  x = _bgr_input(rgb, (512, 1024))
  nchw = np.transpose(x, (0, 3, 1, 2))
  np.testing.assert_array_equal(nchw[:, :, :8, :8], golden["input_crop_tl"])
  np.testing.assert_allclose(nchw.astype(np.float64).sum(axis=(0, 1, 3)),
                             golden["input_row_sums"], rtol=1e-9, atol=1e-6)
  del weights
  _report("R101-FPN parity (semantic fixture)", _check_maps(_run_backbone(model, x), golden))


# ------------------------------------------------------------------------------------------------
# Layers against numpy references (PyTorch semantics).
# ------------------------------------------------------------------------------------------------


def _torch_conv_reference(x_nchw, w_oihw, b, stride, pad, dilation, groups):
  n, c, h, w = x_nchw.shape
  o, cg, kh, kw = w_oihw.shape
  xp = np.pad(x_nchw, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
  ho = (h + 2 * pad - dilation * (kh - 1) - 1) // stride + 1
  wo = (w + 2 * pad - dilation * (kw - 1) - 1) // stride + 1
  out = np.zeros((n, o, ho, wo))
  og = o // groups
  for oc in range(o):
    g = oc // og
    for ky in range(kh):
      for kx in range(kw):
        patch = xp[:, g * cg:(g + 1) * cg,
                   ky * dilation:ky * dilation + stride * (ho - 1) + 1:stride,
                   kx * dilation:kx * dilation + stride * (wo - 1) + 1:stride]
        out[:, oc] += np.einsum("nchw,c->nhw", patch, w_oihw[oc, :, ky, kx])
  return out + b[None, :, None, None]


@pytest.mark.parametrize("stride,pad,dilation,groups", [(2, 1, 1, 4), (1, 2, 2, 2), (2, 3, 1, 1)])
def test_conv2d_matches_torch_semantics(stride, pad, dilation, groups):
  rng = np.random.default_rng(0)
  k = 7 if pad == 3 else 3
  x = rng.normal(size=(2, 8, 11, 10)).astype(np.float32)
  w = rng.normal(size=(12, 8 // groups, k, k)).astype(np.float32)
  b = rng.normal(size=(12,)).astype(np.float32)
  conv = nnx.eval_shape(lambda: Conv2d(8, 12, k, stride=stride, padding=pad, dilation=dilation,
                                       groups=groups, rngs=nnx.Rngs(0)))
  assert load_d2_state(conv, {"weight": w, "bias": b}) == {"weight", "bias"}
  y = np.transpose(np.asarray(conv(jnp.asarray(np.transpose(x, (0, 2, 3, 1))))), (0, 3, 1, 2))
  ref = _torch_conv_reference(x.astype(np.float64), w.astype(np.float64), b, stride, pad,
                              dilation, groups)
  np.testing.assert_allclose(y, ref, atol=1e-4, rtol=1e-4)


def test_norms_and_max_pool_match_numpy():
  rng = np.random.default_rng(1)
  x = rng.normal(1.0, 2.0, size=(2, 5, 6, 64)).astype(np.float32)
  w, b = rng.uniform(0.5, 1.5, 64), rng.normal(size=64)
  mean, var = rng.normal(size=64), rng.uniform(0.5, 2.0, 64)
  x64 = x.astype(np.float64)

  fbn = FrozenBatchNorm(64)
  np.testing.assert_allclose(np.asarray(fbn(x)), x, atol=1e-6)  # fresh = identity (var 1-eps)
  load_d2_state(fbn, {"weight": w, "bias": b, "running_mean": mean, "running_var": var})
  np.testing.assert_allclose(np.asarray(fbn(x)), (x64 - mean) / np.sqrt(var + 1e-5) * w + b,
                             atol=1e-5)

  gn = GroupNorm(32, 64)
  load_d2_state(gn, {"weight": w, "bias": b})
  g = x64.reshape(2, 5, 6, 32, 2)
  ref = ((g - g.mean(axis=(1, 2, 4), keepdims=True))
         / np.sqrt(g.var(axis=(1, 2, 4), keepdims=True) + 1e-5)).reshape(x.shape) * w + b
  np.testing.assert_allclose(np.asarray(gn(x)), ref, atol=1e-5)

  bn = BatchNorm(64)
  y = np.asarray(bn(x))
  np.testing.assert_allclose(y, (x64 - x64.mean((0, 1, 2))) / np.sqrt(x64.var((0, 1, 2)) + 1e-5),
                             atol=1e-5)
  np.testing.assert_allclose(np.asarray(bn.running_var[...]),
                             0.9 + 0.1 * x64.reshape(-1, 64).var(0, ddof=1), rtol=1e-5)
  bn.eval()
  np.testing.assert_allclose(np.asarray(bn(x)), (x64 - bn.running_mean[...])
                             / np.sqrt(np.asarray(bn.running_var[...]) + 1e-5), atol=1e-5)

  neg = -np.abs(x[..., :3])  # -inf padding: a zero pad would win on negative inputs
  pooled = np.asarray(layers.max_pool2d(jnp.asarray(neg), 3, 2, 1))
  padded = np.pad(neg, ((0, 0), (1, 1), (1, 1), (0, 0)), constant_values=-np.inf)
  ref = np.stack([np.stack([padded[:, 2 * i:2 * i + 3, 2 * j:2 * j + 3].max(axis=(1, 2))
                            for j in range(3)], 1) for i in range(3)], 1)
  np.testing.assert_array_equal(pooled, ref)


def test_initializers():
  conv = Conv2d(128, 256, 3, padding=1, rngs=nnx.Rngs(0))  # c2_msra_fill, fan_out = 256 * 9
  std = float(np.std(np.asarray(conv.kernel[...])))
  assert abs(std / math.sqrt(2 / (256 * 9)) - 1) < 0.02
  assert np.all(np.asarray(conv.bias[...]) == 0)
  kernel = np.asarray(layers.c2_xavier_fill(jax.random.key(0), (3, 3, 128, 256)))
  bound = math.sqrt(3 / (128 * 9))
  assert np.abs(kernel).max() <= bound and np.abs(kernel).max() > 0.99 * bound


# ------------------------------------------------------------------------------------------------
# (c) small from-scratch configs: forward, gradients, frozen stages; (d) jit caching.
# ------------------------------------------------------------------------------------------------

_TINY = dict(depth=18, stem_out_channels=32, res2_out_channels=32, out_channels=32, freeze_at=2)


@pytest.fixture(scope="module")
def tiny_gn():
  model = _abstract_backbone(norm="GN", **_TINY)
  _numpy_init(model)
  return model


def _loss(model, x):
  return sum(jnp.mean(jnp.square(v)) for v in model(x).values())


def test_resnet18_gn_forward_grad_and_frozen(tiny_gn):
  model = tiny_gn
  frozen = _paths(model, Frozen)
  trainable = _paths(model, nnx.Param)
  assert frozen and trainable and not frozen & trainable
  assert all(p.startswith(("bottom_up.stem.", "bottom_up.res2.")) for p in frozen)
  assert "bottom_up.stem.conv1.norm.weight" in frozen  # GN affine of a frozen stage
  assert "bottom_up.res3.0.conv1.kernel" in trainable and "fpn_output2.bias" in trainable
  assert not any(p.startswith(("bottom_up.stem.", "bottom_up.res2.")) for p in trainable)
  assert _paths(model, FrozenParam) == frozen  # GN: no FrozenStat

  x = jax.random.normal(jax.random.key(0), (2, 64, 96, 3))
  out = model(x)
  assert {k: v.shape for k, v in out.items()} == {
      "p2": (2, 16, 24, 32), "p3": (2, 8, 12, 32), "p4": (2, 4, 6, 32), "p5": (2, 2, 3, 32),
      "p6": (2, 1, 2, 32)}
  # Differentiate w.r.t. both kinds: frozen kernels must get exactly zero gradient.
  grads = nnx.jit(nnx.grad(_loss, argnums=nnx.DiffState(0, (nnx.Param, FrozenParam))))(model, x)
  flat = {".".join(map(str, p)): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(grads)}
  assert set(flat) == frozen | trainable
  assert all(np.all(np.isfinite(g)) for g in flat.values())
  assert all(not np.any(flat[p]) for p in frozen)
  assert np.any(flat["bottom_up.res3.0.conv1.kernel"]) and np.any(flat["fpn_lateral2.kernel"])
  assert np.any(flat["bottom_up.res5.1.conv2.norm.weight"])


def test_bn_frozen_stages_become_frozen_bn():
  model = _abstract_backbone(norm="BN", **_TINY)
  _numpy_init(model)
  assert isinstance(model.bottom_up.res2[0].conv1.norm, FrozenBatchNorm)
  assert isinstance(model.bottom_up.res3[0].conv1.norm, BatchNorm)
  frozen_before = jax.tree.map(np.asarray, nnx.state(model, Frozen))
  stats_before = np.asarray(model.bottom_up.res3[0].conv1.norm.running_mean[...])
  model(jax.random.normal(jax.random.key(0), (2, 64, 64, 3)))  # train mode updates stats
  assert not np.allclose(model.bottom_up.res3[0].conv1.norm.running_mean[...], stats_before)
  jax.tree.map(np.testing.assert_array_equal, frozen_before,
               jax.tree.map(np.asarray, nnx.state(model, Frozen)))


def test_jit_compiles_once(tiny_gn):
  traces = []

  @nnx.jit
  def forward(model, x):
    traces.append(1)
    return model(x)

  x = jnp.ones((1, 64, 64, 3))
  a = forward(tiny_gn, x)
  b = forward(tiny_gn, 2 * x)
  assert len(traces) == 1
  assert not np.allclose(a["p2"], b["p2"])
  with pytest.raises(ValueError, match="multiple of 32"):
    tiny_gn(jnp.ones((1, 48, 64, 3)))


def test_resnet_out_features_and_strides():
  r = nnx.eval_shape(lambda: ResNet(50, out_features=("stem", "res3"), rngs=nnx.Rngs(0)))
  assert not hasattr(r, "res4")
  assert r.out_feature_strides == {"stem": 4, "res3": 8}
  assert r.out_feature_channels == {"stem": 64, "res3": 512}
  out = nnx.eval_shape(lambda: ResNet(50, out_features=("stem", "res3"), rngs=nnx.Rngs(0))(
      jnp.zeros((1, 64, 64, 3))))
  assert {k: v.shape for k, v in out.items()} == {"stem": (1, 16, 16, 64),
                                                  "res3": (1, 8, 8, 512)}
