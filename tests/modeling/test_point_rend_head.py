"""PointRend instance mask head: detectron2 parity on the R50 COCO fixture, checkpoint names,
jit caching, the predicted-class shortcut and the training forward."""

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

from pointrend_jax.modeling.fpn import build_resnet_fpn_backbone
from pointrend_jax.modeling.layers import d2_names_of, load_d2_state
from pointrend_jax.modeling.point_rend import PointRendMaskHead, subdivision_schedule
from pointrend_jax.ops.point_sample import interpolate_bilinear_x2
from pointrend_jax.ops.point_selection import regular_grid_points, uncertain_points_on_grid

SHARED = Path(__file__).resolve().parents[3] / "shared"
FIXTURES = SHARED / "fixtures" / "detectron2_parity"
MASK_HEAD = "roi_heads.mask_head."
MANIFESTS = SHARED / "spec" / "checkpoints"
PIXEL_MEAN_BGR = np.array([103.53, 116.28, 123.675], np.float32)
INSTANCE_STEMS = ("pointrend_rcnn_R_50_FPN_1x_coco", "pointrend_rcnn_R_50_FPN_3x_coco",
                  "pointrend_rcnn_R_101_FPN_3x_coco", "pointrend_rcnn_X_101_32x8d_FPN_3x_coco",
                  "pointrend_rcnn_R_50_FPN_1x_cityscapes")
ATOL = RTOL = 1e-3


def _manifest(stem: str) -> dict:
  with open(MANIFESTS / f"{stem}.json") as f:
    return json.load(f)


def _recipe_weights(stem: str, prefixes: tuple[str, ...]) -> dict[str, np.ndarray]:
  """Seed-0 fixture weights (make_weights.py) of the manifest entries under ``prefixes``."""
  spec = importlib.util.spec_from_file_location("d2_make_weights", FIXTURES / "make_weights.py")
  make_weights = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(make_weights)
  man = _manifest(stem)
  entries = [e for e in man["entries"] if e["name"].startswith(prefixes)]
  return dict(make_weights.make_state_dict(entries, seed=0, pixel_std=man["pixel_std"]))


def _abstract_head(num_classes: int, **kwargs) -> PointRendMaskHead:
  return nnx.eval_shape(lambda: PointRendMaskHead(num_classes, rngs=nnx.Rngs(0), **kwargs))


def _max_err(actual, expected) -> float:
  a, e = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
  return float(np.max(np.abs(a - e)))


# ------------------------------------------------------------------------------------------------
# Parity on the R50 COCO fixture.
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def golden():
  return dict(np.load(FIXTURES / "r50_fpn_1x_coco" / "expected.npz"))


@pytest.fixture(scope="module")
def r50(golden):
  """Runs backbone (jit) + mask head (jit) on the fixture; returns outputs and the jitted head."""
  stem = "pointrend_rcnn_R_50_FPN_1x_coco"
  weights = _recipe_weights(stem, ("backbone.", "roi_heads.mask_head."))
  backbone = nnx.eval_shape(lambda: build_resnet_fpn_backbone(depth=50, rngs=nnx.Rngs(0)))
  head = _abstract_head(80)
  used = load_d2_state(backbone, weights, "backbone.") | load_d2_state(head, weights, MASK_HEAD)
  assert used == set(weights)
  del weights

  rgb = np.asarray(Image.open(FIXTURES / "r50_fpn_1x_coco" / "model_input.png").convert("RGB"))
  x = np.zeros((1, 800, 1216, 3), np.float32)
  x[0, :800, :1200] = rgb[:, :, ::-1].astype(np.float32) - PIXEL_MEAN_BGR

  t0 = time.perf_counter()
  p2 = jax.jit(lambda m, x: m(x)["p2"])(backbone, jnp.asarray(x))
  p2.block_until_ready()
  t_backbone = time.perf_counter() - t0

  traces = []
  graphdef, state = nnx.split(head)

  @jax.jit
  def run_head(state, p2, boxes, batch_index, classes):
    traces.append(1)
    m = nnx.merge(graphdef, state)
    return m.subdivision_inference(p2, boxes, batch_index, classes, return_intermediates=True)

  args = (jnp.asarray(golden["det_boxes"]), jnp.zeros((100,), jnp.int32),
          jnp.asarray(golden["det_classes"]))
  t0 = time.perf_counter()
  out = jax.block_until_ready(run_head(state, p2, *args))
  t_head_first = time.perf_counter() - t0
  print(f"\nR50 backbone 800x1216 compile+run {t_backbone:.1f} s; "
        f"mask head D=100 compile+run {t_head_first:.1f} s")
  return dict(out=jax.tree.map(np.asarray, out), run_head=run_head, traces=traces,
              state=state, p2=p2, args=args)


def _near_tie(uncertainty_abs: np.ndarray, cells, k: int, tol: float = 1e-4) -> bool:
  """Whether every cell's ``|logit|`` is within ``tol`` of the k-th smallest (the top-k cut)."""
  kth = np.sort(uncertainty_abs.ravel())[k - 1]
  return all(abs(uncertainty_abs.ravel()[c] - kth) <= tol for c in cells)


def test_r50_mask_head_parity(r50, golden):
  """Dense values must match; top-k selections may differ only on near-ties (and what a flip
  changes downstream), so the final maps are compared by agreement within the tolerance."""
  mask, inter = r50["out"]
  errors = {}

  def check(name, actual, expected=None):
    expected = golden[name] if expected is None else expected
    assert actual.shape == expected.shape, (name, actual.shape, expected.shape)
    errors[name] = _max_err(actual, expected)
    np.testing.assert_allclose(actual, expected, atol=ATOL, rtol=RTOL, err_msg=name)

  check("coarse_mask_logits_det_class", inter["coarse_logits_class"])
  check("coarse_mask_logits_top5_all_classes",
        np.transpose(inter["coarse_logits"][:5], (0, 3, 1, 2)))
  check("point_init_logits_det_class", inter["init_logits"])
  for s in (1, 2):
    check(f"step{s}_upsampled_top5", inter["upsampled"][s - 1][:5])

  flipped_rows = set()
  for s in (1, 2, 3):
    ours_idx, ours_val = inter["indices"][s - 1][:5], inter["point_logits"][s - 1][:5]
    ref_idx, ref_val = golden[f"step{s}_indices_top5"], golden[f"step{s}_point_logits_top5"]
    flips, err = 0, 0.0
    for r in range(5):
      common, ours_at, ref_at = np.intersect1d(ours_idx[r], ref_idx[r], return_indices=True)
      np.testing.assert_allclose(ours_val[r, ours_at], ref_val[r, ref_at], atol=ATOL, rtol=RTOL,
                                 err_msg=f"step{s}_point_logits_top5 row {r}")
      err = max(err, _max_err(ours_val[r, ours_at], ref_val[r, ref_at]))
      differ = set(ours_idx[r].tolist()) ^ set(ref_idx[r].tolist())
      if not differ:
        continue
      flips += len(differ) // 2
      assert len(differ) <= 4, f"step{s} row {r}: {len(differ) // 2} cells differ"
      # A flip is either a near-tie of the reference's own uncertainty (steps 1, 2 have the
      # golden map) or a consequence of an earlier flip of the same row.
      if s < 3:
        assert _near_tie(np.abs(golden[f"step{s}_upsampled_top5"][r]), differ, 784), (s, r)
      else:
        assert r in flipped_rows or _near_tie(np.abs(inter["upsampled"][2][r]), differ, 784)
      flipped_rows.add(r)
    errors[f"step{s}_point_logits_top5 (common idx)"] = err
    errors[f"step{s}_indices_top5 (cells not shared)"] = flips

  for name, ours in (("point_mask_logits_top5", mask[:5]),
                     ("point_mask_logits_det_class_sub8", mask[:, 4::8, 4::8])):
    expected = golden[name]
    assert ours.shape == expected.shape
    bad = ~np.isclose(ours, expected, atol=ATOL, rtol=RTOL)
    errors[name] = _max_err(ours[~bad], expected[~bad])
    errors[name + " (cells out of tol)"] = int(bad.sum())
    errors[name + " (max err there)"] = _max_err(ours[bad], expected[bad]) if bad.any() else 0.0
    assert bad.mean() <= 1e-3, (name, int(bad.sum()))
    assert not bad.any() or _max_err(ours[bad], expected[bad]) < 0.05
    if name.endswith("top5"):
      assert set(np.nonzero(bad)[0].tolist()) <= flipped_rows
  print("\nmask head parity (max abs error):")
  for k, v in errors.items():
    print(f"  {k:52s} {v:.3e}" if isinstance(v, float) else f"  {k:52s} {v}")


def test_r50_mask_head_does_not_retrace(r50):
  boxes, batch_index, classes = r50["args"]
  assert len(r50["traces"]) == 1
  t0 = time.perf_counter()
  mask = r50["run_head"](r50["state"], r50["p2"], boxes[::-1], batch_index, classes[::-1])[0]
  mask = np.asarray(mask)
  print(f"\nmask head D=100 cached run {time.perf_counter() - t0:.2f} s")
  assert len(r50["traces"]) == 1
  np.testing.assert_allclose(mask[::-1], r50["out"][0], atol=1e-5)


# ------------------------------------------------------------------------------------------------
# Checkpoint names of all instance configs.
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("stem", INSTANCE_STEMS)
def test_manifest_mask_head_names_and_shapes(stem):
  entries = {e["name"]: tuple(e["shape"]) for e in _manifest(stem)["entries"]
             if e["name"].startswith("roi_heads.mask_head.")}
  num_classes = entries["roi_heads.mask_head.point_head.predictor.bias"][0]
  head = _abstract_head(num_classes)
  assert d2_names_of(head, MASK_HEAD) == entries
  state = {n: np.broadcast_to(np.float32(0), s) for n, s in entries.items()}
  state["roi_heads.box_head.fc1.weight"] = np.zeros((1,), np.float32)  # not ours: ignored
  assert load_d2_state(head, state, MASK_HEAD) == set(entries)
  assert head.point_head.fc1.kernel[...].shape == (256 + num_classes, 256)
  assert head.coarse_head.fc1.kernel[...].shape == (12544, 1024)

  bad = dict(state)
  bad["roi_heads.mask_head.point_head.fc2.weight"] = np.zeros((256, 256 + num_classes, 2))
  with pytest.raises(ValueError, match=r"point_head\.fc2\.weight"):
    load_d2_state(head, bad, MASK_HEAD)
  del bad["roi_heads.mask_head.coarse_head.fc1.bias"]
  bad["roi_heads.mask_head.point_head.fc2.weight"] = state["roi_heads.mask_head.point_head."
                                                           "fc2.weight"]
  with pytest.raises(KeyError, match=r"coarse_head\.fc1\.bias"):
    load_d2_state(head, bad, MASK_HEAD)


def test_layouts_follow_pytorch():
  """fc1 reads (C, H, W)-flattened features; Conv1d weights are (out, in, 1)."""
  head = _abstract_head(2, in_channels=4, conv_dim=4, fc_dims=(3,), point_fc_dim=5,
                        point_num_fc=1)
  rng = np.random.default_rng(0)
  state = {n: rng.normal(size=s).astype(np.float32) for n, s in d2_names_of(head, MASK_HEAD).items()}
  load_d2_state(head, state, MASK_HEAD)
  p = "roi_heads.mask_head."
  x = rng.normal(size=(2, 14, 14, 4)).astype(np.float32)
  # numpy reference of ConvFCHead in NCHW.
  xc = np.transpose(x, (0, 3, 1, 2)).astype(np.float64)
  w, b = state[p + "coarse_head.reduce_spatial_dim_conv.weight"], \
      state[p + "coarse_head.reduce_spatial_dim_conv.bias"]
  patches = xc.reshape(2, 4, 7, 2, 7, 2)
  y = np.maximum(np.einsum("nchpwq,ocpq->nohw", patches, w) + b[None, :, None, None], 0)
  y = np.maximum(y.reshape(2, -1) @ state[p + "coarse_head.fc1.weight"].T
                 + state[p + "coarse_head.fc1.bias"], 0)
  y = (y @ state[p + "coarse_head.prediction.weight"].T
       + state[p + "coarse_head.prediction.bias"]).reshape(2, 2, 7, 7)
  ours = np.transpose(np.asarray(head.coarse_head(jnp.asarray(x))), (0, 3, 1, 2))
  np.testing.assert_allclose(ours, y, atol=1e-4, rtol=1e-4)

  fine = rng.normal(size=(2, 6, 4)).astype(np.float32)
  coarse = rng.normal(size=(2, 6, 2)).astype(np.float32)
  h = np.concatenate([fine, coarse], -1).astype(np.float64)
  h = np.maximum(np.einsum("rpi,oi->rpo", h, state[p + "point_head.fc1.weight"][..., 0])
                 + state[p + "point_head.fc1.bias"], 0)
  h = np.concatenate([h, coarse], -1)
  ref = (np.einsum("rpi,oi->rpo", h, state[p + "point_head.predictor.weight"][..., 0])
         + state[p + "point_head.predictor.bias"])
  np.testing.assert_allclose(np.asarray(head.point_head(fine, coarse)), ref, atol=1e-4)


# ------------------------------------------------------------------------------------------------
# Tiny random head: schedule, shortcut exactness, training forward and gradients.
# ------------------------------------------------------------------------------------------------

_TINY = dict(in_channels=16, conv_dim=16, fc_dims=(32, 32), point_fc_dim=16)


@pytest.fixture(scope="module")
def tiny():
  head = _abstract_head(3, **_TINY)
  # numpy fill (eager jax.random inits compile per shape); predictors larger than detectron2's
  # N(0, 0.001) init so that the masks have structure.
  rng = np.random.default_rng(1)
  load_d2_state(head, {n: rng.normal(0, 0.3 if "pred" in n else 1 / np.sqrt(np.prod(s[1:])),
                                     s).astype(np.float32)
                       for n, s in d2_names_of(head, MASK_HEAD).items()}, MASK_HEAD)
  k1, k2 = jax.random.split(jax.random.key(2))
  p2 = jax.random.normal(k1, (2, 16, 20, 16))
  boxes = jnp.array([[3., 4., 40., 50.], [0., 0., 80., 64.], [-5., 10., 20., 70.],
                     [30., 2., 31.5, 3.], [60., 40., 90., 70.]])
  return head, p2, boxes, jnp.array([0, 1, 0, 1, 1], jnp.int32), jnp.array([2, 0, 1, 2, 0])


def test_subdivision_schedule():
  assert subdivision_schedule(7, 5, 784) == (28, 3)
  assert subdivision_schedule(7, 5, 196) == (14, 4)
  assert subdivision_schedule(7, 3, 100) == (7, 3)
  assert subdivision_schedule(7, 1, 196) == (14, 0)
  with pytest.raises(ValueError):
    subdivision_schedule(7, 1, 784)


def test_predicted_class_shortcut_is_exact(tiny):
  """The single-channel subdivision equals detectron2's all-channel procedure."""
  head, p2, boxes, batch_index, classes = tiny

  @nnx.jit
  def both(head, p2, boxes, batch_index, classes):
    mask = head.subdivision_inference(p2, boxes, batch_index, classes)
    d, c = boxes.shape[0], head.num_mask_classes
    coarse = head.coarse_logits(p2, boxes, batch_index)
    grid = jnp.broadcast_to(regular_grid_points(28), (d, 784, 2))
    full = head.point_logits(p2, boxes, batch_index, grid, coarse).reshape(d, 28, 28, c)
    for _ in range(3):
      full = interpolate_bilinear_x2(full)
      h, w = full.shape[1:3]
      picked = jnp.take_along_axis(full, classes[:, None, None, None], axis=-1)[..., 0]
      idx, pts = uncertain_points_on_grid(-jnp.abs(picked), 784)
      vals = head.point_logits(p2, boxes, batch_index, pts, coarse)
      full = full.reshape(d, h * w, c).at[jnp.arange(d)[:, None], idx].set(vals)
      full = full.reshape(d, h, w, c)
    return mask, jnp.take_along_axis(full, classes[:, None, None, None], axis=-1)[..., 0]

  mask, ref = both(head, p2, boxes, batch_index, classes)
  assert mask.shape == (5, 224, 224)
  np.testing.assert_array_equal(np.asarray(mask), np.asarray(ref))


def test_forward_train_shapes_and_grads(tiny):
  head, p2, boxes, batch_index, gt_classes = tiny
  key = jax.random.key(3)
  forward = nnx.jit(lambda m, f: m.forward_train(f, boxes, batch_index, gt_classes, key))
  out = forward(head, p2)
  assert {k: v.shape for k, v in out.items()} == {
      "coarse_logits": (5, 7, 7, 3), "point_coords": (5, 196, 2),
      "points_in_image": (5, 196, 2), "point_logits": (5, 196)}
  pts = np.asarray(out["point_coords"])
  assert pts.min() >= 0 and pts.max() < 1
  np.testing.assert_allclose(
      np.asarray(out["points_in_image"]),
      np.asarray(boxes)[:, None, :2] + pts * np.asarray(boxes[:, 2:] - boxes[:, :2])[:, None],
      rtol=1e-6, atol=1e-4)
  # Same key, same points; the FPN dict works as well as the bare p2 map.
  again = forward(head, {"p2": p2})
  np.testing.assert_array_equal(pts, np.asarray(again["point_coords"]))

  def losses(model, p2):
    o = model.forward_train(p2, boxes, batch_index, gt_classes, key)
    # Stand-ins for the two BCE losses.
    point = jnp.mean(jax.nn.softplus(o["point_logits"]))
    return point + jnp.mean(o["coarse_logits"] ** 2), point

  @nnx.jit
  def grads(model, p2):
    full = nnx.grad(lambda m, x: losses(m, x)[0], argnums=(0, 1))(model, p2)
    point_only = nnx.grad(lambda m: losses(m, p2)[1])(model)
    return full, point_only

  (g_model, g_p2), g_point = grads(head, p2)
  flat = {".".join(map(str, p)): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(g_model)}
  assert all(np.all(np.isfinite(g)) for g in flat.values())
  assert all(np.any(g) for g in flat.values()), [k for k, g in flat.items() if not np.any(g)]
  assert np.all(np.isfinite(g_p2)) and np.any(g_p2)
  # The point loss alone trains the coarse head through the sampled coarse logits.
  assert np.any(np.asarray(g_point.coarse_head.fc1.kernel.get_value()))
