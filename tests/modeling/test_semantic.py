"""Semantic PointRend: detectron2 parity on the R101 Cityscapes fixture, checkpoint names, the
PyTorch bilinear resize, preprocessing and the training forward."""

from __future__ import annotations

import importlib.util
import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from PIL import Image

from pointrend_jax import postprocess
from pointrend_jax.modeling.layers import d2_names_of, load_d2_state
from pointrend_jax.modeling.meta_arch import abstract_model
from pointrend_jax.modeling.semantic import PointRendSemSegHead, resize_bilinear
from pointrend_jax.modeling.zoo import zoo_config
from pointrend_jax.ops.point_sample import interpolate_bilinear_x2

SHARED = Path(__file__).resolve().parents[3] / "shared"
FIXTURES = SHARED / "fixtures" / "detectron2_parity"
FOLDER = FIXTURES / "semantic_r101_fpn_cityscapes"
STEM = "pointrend_semantic_R_101_FPN_1x_cityscapes"
ATOL = RTOL = 1e-3
NUM_POINTS = 8192


def _manifest() -> dict:
  with open(SHARED / "spec" / "checkpoints" / f"{STEM}.json") as f:
    return json.load(f)


def _abstract_segmentor(man: dict):
  # The manifest's pixel statistics are in the model's (BGR) channel order.
  cfg = zoo_config("semantic_r101_fpn_cityscapes").replace(
      pixel_mean=tuple(man["pixel_mean"]), pixel_std=tuple(man["pixel_std"]))
  return abstract_model(cfg)


def _max_err(actual, expected) -> float:
  a, e = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
  return float(np.max(np.abs(a - e))) if a.size else 0.0


def _nchw(a: np.ndarray) -> np.ndarray:
  return np.transpose(a, (0, 3, 1, 2))


# ------------------------------------------------------------------------------------------------
# Parity.
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def golden():
  return dict(np.load(FOLDER / "expected.npz"))


@pytest.fixture(scope="module")
def run():
  man = _manifest()
  spec = importlib.util.spec_from_file_location("d2_make_weights", FIXTURES / "make_weights.py")
  make_weights = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(make_weights)
  weights = make_weights.make_state_dict(man["entries"], seed=0, pixel_std=man["pixel_std"])
  model = _abstract_segmentor(man)
  assert load_d2_state(model, weights) == set(weights)
  del weights

  rgb = np.asarray(Image.open(FOLDER / "image.png").convert("RGB"))
  assert rgb.shape == (512, 1024, 3)
  graphdef, state = nnx.split(model)

  @jax.jit
  def forward(state, images, sizes):
    m = nnx.merge(graphdef, state)
    x = m.preprocess(images, sizes)
    logits, inter = m.sem_seg_head.inference(m.backbone(x), return_intermediates=True)
    keep = {k: inter[k] for k in ("coarse_logits", "fused_features", "uncertainty", "indices",
                                  "point_logits")}
    return dict(input=x, logits=logits, **keep)

  t0 = time.perf_counter()
  out = forward(state, jnp.asarray(rgb)[None], jnp.array([[512, 1024]]))
  out = jax.tree.map(np.asarray, out)
  out["sem_seg"] = postprocess.resize_bilinear(out["logits"][0], (512, 1024))
  print(f"\nR101 semantic 512x1024 compile + forward: {time.perf_counter() - t0:.1f} s")
  return out


def _crops(a: np.ndarray, name: str) -> dict[str, np.ndarray]:
  """The fixture's crop / mean / summary views of an NHWC map (crops NCHW, channels 0..15)."""
  h, w = a.shape[1:3]
  a64 = a.astype(np.float64)
  return {
      f"{name}_shape": np.array([a.shape[0], a.shape[3], h, w]),
      f"{name}_crop_tl": _nchw(a[:, :8, :8, :16]),
      f"{name}_crop_center": _nchw(a[:, h // 2 - 4:h // 2 + 4, w // 2 - 4:w // 2 + 4, :16]),
      f"{name}_crop_br": _nchw(a[:, -8:, -8:, :16]),
      f"{name}_chan_mean": a64.mean(axis=(0, 1, 2)),
      f"{name}_summary": np.array([a64.mean(), a64.std(), a64.min(), a64.max(),
                                   np.abs(a64).sum()]),
  }


def test_semantic_parity(run, golden):
  """Dense values must match; the 8192-point selections may differ only on near-ties (and
  what such a flip changes downstream), so refined maps are compared by agreement."""
  errors = {}

  def check(name, actual, expected=None):
    expected = golden[name] if expected is None else expected
    assert actual.shape == expected.shape, (name, actual.shape, expected.shape)
    errors[name] = _max_err(actual, expected)
    np.testing.assert_allclose(actual, expected, atol=ATOL, rtol=RTOL, err_msg=name)

  def check_agreement(name, actual, expected=None):
    """allclose on >= 99.9 % of the entries, small errors on the rest (top-k flips)."""
    expected = golden[name] if expected is None else expected
    assert actual.shape == expected.shape, (name, actual.shape, expected.shape)
    bad = ~np.isclose(actual, expected, atol=ATOL, rtol=RTOL)
    errors[name] = _max_err(actual[~bad], expected[~bad])
    errors[name + " (entries out of tol)"] = int(bad.sum())
    if bad.any():
      errors[name + " (max err there)"] = _max_err(actual[bad], expected[bad])
    assert bad.mean() <= 1e-3, (name, int(bad.sum()))

  np.testing.assert_array_equal(_nchw(run["input"][:, :8, :8]), golden["input_crop_tl"])
  for key, value in _crops(run["fused_features"], "semseg_fpn_sum").items():
    if key.endswith("_shape"):
      np.testing.assert_array_equal(value, golden[key])
    else:
      check(key, value)
  check("coarse_logits", _nchw(run["coarse_logits"]))

  flipped = False
  for s in (1, 2):
    unc = run["uncertainty"][s - 1][0]
    # A step-1 flip changes the step-2 upsampled map around the flipped cells.
    (check_agreement if flipped else check)(f"step{s}_uncertainty_sub4",
                                            unc[None, None, 2::4, 2::4])
    ours, ref = run["indices"][s - 1][0], golden[f"step{s}_indices"][0]
    common, ours_at, ref_at = np.intersect1d(ours, ref, return_indices=True)
    check(f"step{s}_point_logits (common idx)", run["point_logits"][s - 1][0][ours_at],
          golden[f"step{s}_point_logits"][0].T[ref_at])
    differ = np.setxor1d(ours, ref)
    errors[f"step{s}_indices (cells not shared)"] = len(differ) // 2
    if len(differ):
      assert len(differ) // 2 <= 8, f"step{s}: {len(differ) // 2} cells differ"
      # Each flip is a near-tie at the top-k cut, or follows from a step-1 flip.
      kth = np.sort(unc.ravel())[-NUM_POINTS]
      assert flipped or np.all(np.abs(unc.ravel()[differ] - kth) <= 1e-4), s
      flipped = True

  logits, sem_seg = run["logits"], run["sem_seg"]
  np.testing.assert_array_equal(golden["head_logits_shape"], _nchw(logits).shape)
  np.testing.assert_array_equal(golden["sem_seg_shape"], (sem_seg.shape[2], *sem_seg.shape[:2]))
  check_agreement("head_logits_sub8", _nchw(logits[:, 4::8, 4::8]))
  check_agreement("sem_seg_sub8", np.transpose(sem_seg[4::8, 4::8], (2, 0, 1)))
  for i, (y0, x0) in enumerate(golden["sem_seg_crop_windows"]):
    check_agreement(f"sem_seg_crop{i}",
                    np.transpose(sem_seg[y0:y0 + 64, x0:x0 + 64], (2, 0, 1)))
  s64 = sem_seg.astype(np.float64)
  check("sem_seg_summary", np.array([s64.mean(), s64.std(), s64.min(), s64.max(),
                                     np.abs(s64).sum()]))
  argmax = np.argmax(sem_seg, axis=-1)
  differ = int(np.sum(argmax != golden["sem_seg_argmax"]))
  errors["sem_seg_argmax (pixels differing)"] = differ
  assert differ <= 1e-3 * argmax.size
  hist = np.bincount(argmax.ravel(), minlength=19)
  errors["sem_seg_class_hist (sum |diff|)"] = int(np.abs(hist - golden["sem_seg_class_hist"]).sum())
  assert np.abs(hist - golden["sem_seg_class_hist"]).sum() <= 1e-3 * argmax.size

  print("\nsemantic parity (max abs error):")
  for k, v in errors.items():
    print(f"  {k:44s} {v:.3e}" if isinstance(v, float) else f"  {k:44s} {v}")


# ------------------------------------------------------------------------------------------------
# Checkpoint names.
# ------------------------------------------------------------------------------------------------


def test_manifest_names_and_shapes():
  man = _manifest()
  entries = {e["name"]: tuple(e["shape"]) for e in man["entries"]}
  model = _abstract_segmentor(man)
  assert d2_names_of(model) == entries
  head_entries = {n: s for n, s in entries.items() if n.startswith("sem_seg_head.")}
  assert d2_names_of(model.sem_seg_head, "sem_seg_head.") == head_entries
  state = {n: np.broadcast_to(np.float32(0), s) for n, s in entries.items()}
  assert load_d2_state(model, state) == set(entries)
  assert load_d2_state(model.sem_seg_head, state, "sem_seg_head.") == set(head_entries)
  # Everything is trainable (FREEZE_AT 0, GN affine included).
  trainable = sum(int(np.prod(v.get_value().shape))
                  for _, v in nnx.to_flat_state(nnx.state(model, nnx.Param)))
  assert trainable == man["num_trainable"]


# ------------------------------------------------------------------------------------------------
# Bilinear resize, postprocess, preprocess.
# ------------------------------------------------------------------------------------------------


def _torch_bilinear_reference(x: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
  """Direct float64 loop over PyTorch's ``align_corners=False`` bilinear formula (NHWC)."""
  n, h, w, c = x.shape

  def taps(in_size, out_size, dst):
    src = max(in_size / out_size * (dst + 0.5) - 0.5, 0.0)
    i0 = min(int(np.floor(src)), in_size - 1)
    i1 = i0 + 1 if i0 < in_size - 1 else i0
    l1 = src - i0
    return i0, i1, 1.0 - l1, l1

  out = np.zeros((n, out_h, out_w, c))
  for oy in range(out_h):
    y0, y1, hy0, hy1 = taps(h, out_h, oy)
    for ox in range(out_w):
      x0, x1, wx0, wx1 = taps(w, out_w, ox)
      out[:, oy, ox] = (hy0 * (wx0 * x[:, y0, x0] + wx1 * x[:, y0, x1])
                        + hy1 * (wx0 * x[:, y1, x0] + wx1 * x[:, y1, x1]))
  return out


@pytest.mark.parametrize("in_hw,out_hw", [((7, 9), (17, 5)), ((13, 10), (20, 23)),
                                          ((5, 6), (5, 6)), ((4, 3), (11, 1))])
def test_resize_bilinear_matches_torch_formula(in_hw, out_hw):
  x = np.random.default_rng(0).normal(size=(2, *in_hw, 3)).astype(np.float32)
  ours = np.asarray(jax.jit(resize_bilinear, static_argnums=1)(x, out_hw))
  np.testing.assert_allclose(ours, _torch_bilinear_reference(x.astype(np.float64), *out_hw),
                             atol=2e-6, rtol=1e-6)


def test_resize_bilinear_x2_and_postprocess():
  x = np.random.default_rng(1).normal(size=(1, 6, 5, 4)).astype(np.float32)
  np.testing.assert_array_equal(np.asarray(resize_bilinear(x, (12, 10))),
                                np.asarray(interpolate_bilinear_x2(x)))
  np.testing.assert_array_equal(np.asarray(resize_bilinear(x, (6, 5))), x)
  out = postprocess.resize_bilinear(x[0, :4, :3], (9, 7))
  assert out.shape == (9, 7, 4)
  np.testing.assert_allclose(out, _torch_bilinear_reference(x[:, :4, :3].astype(np.float64),
                                                            9, 7)[0], atol=2e-6)


def test_preprocess_converts_normalizes_and_zero_pads():
  model = _abstract_segmentor({"pixel_mean": [100.0, 110.0, 120.0], "pixel_std": [2.0, 4.0, 8.0]})
  images = np.random.default_rng(2).integers(0, 256, (2, 40, 70, 3)).astype(np.uint8)
  x = np.asarray(model.preprocess(jnp.asarray(images), jnp.array([[40, 70], [30, 50]])))
  assert x.shape == (2, 64, 96, 3)
  ref = (images[..., ::-1].astype(np.float32) - [100.0, 110.0, 120.0]) / [2.0, 4.0, 8.0]
  np.testing.assert_allclose(x[0, :40, :70], ref[0], rtol=1e-6)
  np.testing.assert_allclose(x[1, :30, :50], ref[1, :30, :50], rtol=1e-6)
  assert not x[0, 40:].any() and not x[0, :, 70:].any()
  assert not x[1, 30:].any() and not x[1, :, 50:].any()


# ------------------------------------------------------------------------------------------------
# Tiny random head: inference shapes, training forward and gradients.
# ------------------------------------------------------------------------------------------------


def test_tiny_head_inference_and_train_grads():
  head = nnx.eval_shape(lambda: PointRendSemSegHead(
      5, feature_channels=16, conv_dims=32, point_in_channels=16, fc_dim=16,
      train_num_points=64, subdivision_num_points=32, rngs=nnx.Rngs(0)))
  rng = np.random.default_rng(3)
  load_d2_state(head, {n: rng.normal(0, 0.5, s).astype(np.float32)
                       for n, s in d2_names_of(head).items()})
  keys = jax.random.split(jax.random.key(0), 5)
  features = {f"p{l}": jax.random.normal(keys[l - 2], (2, 64 >> l, 96 >> l, 16))
              for l in (2, 3, 4, 5)}

  @nnx.jit
  def step(head, features, key):
    logits = head.inference(features)

    def loss(head, features):
      o = head.forward_train(features, key)
      return (jnp.mean(jax.nn.logsumexp(o["point_logits"], -1))
              + jnp.mean(o["coarse_logits"] ** 2)), o

    (_, out), grads = nnx.value_and_grad(loss, argnums=(0, 1), has_aux=True)(head, features)
    return logits, out, grads

  logits, out, (g_head, g_feat) = step(head, features, keys[4])
  assert logits.shape == (2, 64, 96, 5)
  assert {k: v.shape for k, v in out.items()} == {
      "coarse_logits": (2, 16, 24, 5), "point_coords": (2, 64, 2), "point_logits": (2, 64, 5)}
  flat = {".".join(map(str, p)): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(g_head)}
  assert all(np.all(np.isfinite(g)) for g in flat.values())
  assert all(np.any(g) for g in flat.values()), [k for k, g in flat.items() if not np.any(g)]
  assert all(np.any(np.asarray(g)) for g in g_feat.values())
