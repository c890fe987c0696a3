"""RPN, box head, box inference and postprocess: detectron2 parity on the R50 COCO fixture,
checkpoint names of all instance configs, numpy references on small batches, jit caching and
the no-detection case."""

from __future__ import annotations

import importlib.util
import json
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from PIL import Image

from conftest import PARITY_DIR, SHARED_DIR
from pointrend_jax import postprocess
from pointrend_jax.modeling.fpn import build_resnet_fpn_backbone
from pointrend_jax.modeling.layers import d2_names_of, load_d2_state
from pointrend_jax.modeling.roi_heads import StandardROIHeads, fast_rcnn_inference
from pointrend_jax.modeling.rpn import RPN
from pointrend_jax.ops.poolers import assign_boxes_to_levels
from pointrend_jax.parity.compare import box_iou

MANIFESTS = SHARED_DIR / "spec" / "checkpoints"
R50 = PARITY_DIR / "r50_fpn_1x_coco"
STEM = "pointrend_rcnn_R_50_FPN_1x_coco"
PIXEL_MEAN_BGR = np.array([103.53, 116.28, 123.675], np.float32)
INSTANCE_STEMS = {"pointrend_rcnn_R_50_FPN_1x_coco": 80, "pointrend_rcnn_R_50_FPN_3x_coco": 80,
                  "pointrend_rcnn_R_101_FPN_3x_coco": 80,
                  "pointrend_rcnn_X_101_32x8d_FPN_3x_coco": 80,
                  "pointrend_rcnn_R_50_FPN_1x_cityscapes": 8}
ATOL = RTOL = 1e-3


def _manifest(stem: str) -> dict:
  with open(MANIFESTS / f"{stem}.json") as f:
    return json.load(f)


def _recipe_weights(stem: str, prefixes: tuple[str, ...]) -> dict[str, np.ndarray]:
  """Seed-0 fixture weights (make_weights.py) of the manifest entries under ``prefixes``."""
  spec = importlib.util.spec_from_file_location("d2_make_weights", PARITY_DIR / "make_weights.py")
  make_weights = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(make_weights)
  man = _manifest(stem)
  entries = [e for e in man["entries"] if e["name"].startswith(prefixes)]
  return dict(make_weights.make_state_dict(entries, seed=0, pixel_std=man["pixel_std"]))


def _check(name: str, actual, expected, atol: float = ATOL, rtol: float = RTOL) -> None:
  a, e = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
  assert a.shape == e.shape, (name, a.shape, e.shape)
  np.testing.assert_allclose(a, e, atol=atol, rtol=rtol, err_msg=name)


def _summary(a: np.ndarray) -> np.ndarray:
  a = np.asarray(a, np.float64)
  return np.array([a.mean(), a.std(), a.min(), a.max(), np.abs(a).sum()])


def _match(golden_boxes, boxes, golden_cls=None, cls=None) -> np.ndarray:
  """Index into ``boxes`` of the best IoU (> 0.99, same class) match of each golden box, or -1."""
  iou = box_iou(golden_boxes, boxes)
  if golden_cls is not None:
    iou = np.where(np.asarray(golden_cls)[:, None] == np.asarray(cls)[None, :], iou, 0.0)
  j = iou.argmax(axis=1)
  return np.where(iou[np.arange(len(j)), j] > 0.99, j, -1)


# ------------------------------------------------------------------------------------------------
# Parity on the R50 COCO fixture: one jitted backbone + RPN + box forward.
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def golden():
  return dict(np.load(R50 / "expected.npz"))


@pytest.fixture(scope="module")
def r50(golden):
  """Runs the model once; returns (outputs as numpy, RPN module)."""
  weights = _recipe_weights(STEM, ("backbone.", "proposal_generator.", "roi_heads.box_"))
  abstract = lambda f: nnx.eval_shape(lambda: f(rngs=nnx.Rngs(0)))
  backbone = abstract(lambda rngs: build_resnet_fpn_backbone(depth=50, rngs=rngs))
  rpn = abstract(RPN)
  roi_heads = abstract(lambda rngs: StandardROIHeads(80, rngs=rngs))
  used = (load_d2_state(backbone, weights, "backbone.")
          | load_d2_state(rpn, weights, "proposal_generator.")
          | load_d2_state(roi_heads, weights, "roi_heads."))
  assert used == set(weights)
  del weights

  rgb = np.asarray(Image.open(R50 / "model_input.png").convert("RGB"))
  x = np.zeros((1, 800, 1216, 3), np.float32)
  x[0, :800, :1200] = rgb[:, :, ::-1].astype(np.float32) - PIXEL_MEAN_BGR  # PIXEL_STD = 1.
  image_sizes = np.array([[800, 1200]], np.int32)
  graphdef, state = nnx.split((backbone, rpn, roi_heads))

  @jax.jit
  def forward(state, x, image_sizes, golden_proposals):
    backbone, rpn, roi_heads = nnx.merge(graphdef, state)
    feats = backbone(x)
    out = rpn(feats, image_sizes)
    props = out.proposals
    dets = roi_heads(feats, props.boxes, props.valid, image_sizes)
    # The box branch again on detectron2's own proposals: near-tie order flips in the proposal
    # list cannot blur the box-head comparison.
    gvalid = jnp.ones(golden_proposals.shape[:2], bool)
    pooled = roi_heads.pool_boxes(feats, golden_proposals, gvalid)
    cls_logits, deltas = roi_heads.box_outputs(feats, golden_proposals, gvalid)
    gdets = roi_heads.inference(cls_logits, deltas, golden_proposals, gvalid, image_sizes)
    return dict(logits=out.logits, deltas=out.deltas, proposals=props, dets=dets,
                pooled=pooled, cls_logits=cls_logits, box_deltas=deltas, gdets=gdets)

  t = time.perf_counter()
  out = forward(state, x, image_sizes, golden["proposal_boxes"][None])
  out = jax.tree.map(np.asarray, out)
  print(f"\nR50 backbone+RPN+box (+box on golden proposals) compile + run: "
        f"{time.perf_counter() - t:.1f} s")
  return out, rpn


def _nchw(flat: np.ndarray, h: int, w: int) -> np.ndarray:
  """[1, H*W*A(*4)] anchor-order head output -> detectron2's [1, A(*4), H, W]."""
  return np.transpose(flat.reshape(1, h, w, -1), (0, 3, 1, 2))


def test_rpn_head_parity(r50, golden):
  out, _ = r50
  for i, level in enumerate(("p2", "p3", "p4", "p5", "p6")):
    _, _, h, w = golden[f"rpn_deltas_{level}_shape"]
    logits = _nchw(out["logits"][i], h, w)
    deltas = _nchw(out["deltas"][i].reshape(1, -1), h, w)
    np.testing.assert_array_equal(deltas.shape, golden[f"rpn_deltas_{level}_shape"])
    _check(f"rpn_logits_{level}", logits, golden[f"rpn_logits_{level}"])
    if level in ("p5", "p6"):
      _check(f"rpn_deltas_{level}", deltas, golden[f"rpn_deltas_{level}"])
    else:
      _check(f"rpn_deltas_{level}_crop_tl", deltas[:, :, :8, :8],
             golden[f"rpn_deltas_{level}_crop_tl"])
      _check(f"rpn_deltas_{level}_summary", _summary(deltas), golden[f"rpn_deltas_{level}_summary"],
             rtol=1e-4)


def test_anchors(r50, golden):
  _, rpn = r50
  anchors = rpn.anchors((800, 1216))
  for i, level in enumerate(("p2", "p3", "p4", "p5", "p6")):
    assert anchors[i].shape[0] == golden[f"anchors_{level}_count"]
    np.testing.assert_array_equal(anchors[i][:12], golden[f"anchors_{level}_first12"])
  np.testing.assert_array_equal(anchors[4], golden["anchors_p6"])


def test_proposals_as_sets(r50, golden):
  out, _ = r50
  props = out["proposals"]
  valid = props.valid[0]
  assert valid.sum() == len(golden["proposal_boxes"])
  assert valid.all()  # A prefix mask that is full here.
  boxes, logits = props.boxes[0], props.logits[0]
  assert np.all(np.diff(logits) <= 0)
  j = _match(golden["proposal_boxes"], boxes)
  # Only proposals whose logit ties the 1000th within float noise may swap with a neighbour.
  cutoff = golden["proposal_logits"].min()
  assert np.all((j >= 0) | (golden["proposal_logits"] < cutoff + 1e-4)), np.flatnonzero(j < 0)
  m = j >= 0
  assert len(set(j[m])) == m.sum()
  _check("proposal_boxes (matched)", boxes[j[m]], golden["proposal_boxes"][m], atol=1e-2,
         rtol=1e-5)
  _check("proposal_logits (matched)", logits[j[m]], golden["proposal_logits"][m], atol=1e-4,
         rtol=0)
  # proposal_levels = the pooler level of each golden proposal; ours for the matched ones.
  gl = np.asarray(assign_boxes_to_levels(jnp.asarray(golden["proposal_boxes"])))
  np.testing.assert_array_equal(gl, golden["proposal_levels"])
  ours = np.asarray(assign_boxes_to_levels(jnp.asarray(boxes)))
  np.testing.assert_array_equal(ours[j[m]], golden["proposal_levels"][m])
  # RPN level ids (0 = p2); their exact values are checked by the numpy reference test.
  assert props.levels.min() >= 0 and props.levels.max() <= 4


def test_box_pooler_and_head(r50, golden):
  out, _ = r50
  pooled = out["pooled"]
  _check("box_pooled_first4", np.transpose(pooled[:4], (0, 3, 1, 2)), golden["box_pooled_first4"])
  _check("box_pooled_summary", _summary(np.transpose(pooled, (0, 3, 1, 2))),
         golden["box_pooled_summary"], rtol=1e-4)
  _check("box_cls_logits", out["cls_logits"][0], golden["box_cls_logits"])
  _check("box_deltas", out["box_deltas"][0], golden["box_deltas"])


def _match_detections(golden_boxes, golden_scores, golden_cls, boxes, scores, cls):
  """Set match of detections; only a golden score tying the 100th within 1e-4 may go unmatched."""
  j = _match(golden_boxes, boxes, golden_cls, cls)
  m = j >= 0
  assert np.all(m | (golden_scores < golden_scores.min() + 1e-4)), np.flatnonzero(~m)
  assert len(set(j[m])) == m.sum()
  return j, m


def _check_detections(name, dets, golden, proposals=None):
  valid = dets.valid[0]
  assert valid.sum() == len(golden["det_boxes"]) == 100
  assert valid.all()
  boxes, scores, classes = dets.boxes[0], dets.scores[0], dets.classes[0]
  assert np.all(np.diff(scores) <= 0)
  j, m = _match_detections(golden["det_boxes"], golden["det_scores"], golden["det_classes"],
                           boxes, scores, classes)
  _check(f"{name} det_boxes", boxes[j[m]], golden["det_boxes"][m], atol=1e-2, rtol=1e-5)
  _check(f"{name} det_scores", scores[j[m]], golden["det_scores"][m], atol=1e-4, rtol=0)
  pidx = dets.proposal_index[0][j[m]]
  gidx = golden["det_proposal_index"][m]
  if proposals is None:  # Golden proposals: the indices themselves agree.
    np.testing.assert_array_equal(pidx, gidx)
  else:  # Our proposals: each detection's proposal is detectron2's.
    assert np.all(np.diag(box_iou(proposals[pidx], golden["proposal_boxes"][gidx])) > 0.99)


def test_detections_on_golden_proposals(r50, golden):
  _check_detections("golden-proposals", r50[0]["gdets"], golden)


def test_detections_end_to_end(r50, golden):
  out, _ = r50
  _check_detections("end-to-end", out["dets"], golden, proposals=out["proposals"].boxes[0])


def test_final_after_postprocess(r50, golden):
  out, _ = r50
  dets = out["dets"]
  row = dict(boxes=dets.boxes[0], scores=dets.scores[0], classes=dets.classes[0],
             valid=dets.valid[0], mask_probs=np.zeros((len(dets.scores[0]), 1, 1), np.float32))
  inst, _ = postprocess.instances(row, (400, 600), (800, 1200), [str(c) for c in range(80)])
  final = dict(boxes=inst.boxes, scores=inst.scores, classes=inst.classes)
  assert len(final["boxes"]) == len(golden["final_boxes"])
  j, m = _match_detections(golden["final_boxes"], golden["final_scores"], golden["final_classes"],
                           final["boxes"], final["scores"], final["classes"])
  _check("final_boxes", final["boxes"][j[m]], golden["final_boxes"][m], atol=1e-2, rtol=1e-5)
  _check("final_scores", final["scores"][j[m]], golden["final_scores"][m], atol=1e-4, rtol=0)
  assert final["boxes"][:, 2].max() <= 600 and final["boxes"][:, 3].max() <= 400


# ------------------------------------------------------------------------------------------------
# Checkpoint names of every instance config.
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("stem", sorted(INSTANCE_STEMS))
def test_manifest_names_and_shapes(stem):
  man = _manifest(stem)
  rpn = nnx.eval_shape(lambda: RPN(rngs=nnx.Rngs(0)))
  heads = nnx.eval_shape(lambda: StandardROIHeads(INSTANCE_STEMS[stem], rngs=nnx.Rngs(0)))
  for prefix, module_prefix, module in (("proposal_generator.", "proposal_generator.", rpn),
                                        ("roi_heads.box_", "roi_heads.", heads)):
    expected = {e["name"]: tuple(e["shape"]) for e in man["entries"]
                if e["name"].startswith(prefix)}
    assert d2_names_of(module, module_prefix) == expected
    state = {n: np.broadcast_to(np.float32(0), s) for n, s in expected.items()}
    state["roi_heads.mask_head.coarse_head.fc1.weight"] = np.zeros((1,), np.float32)  # Ignored.
    assert load_d2_state(module, state, module_prefix) == set(expected)
  bad = dict(state)
  bad["roi_heads.box_predictor.cls_score.weight"] = np.zeros((5, 1024), np.float32)
  with pytest.raises(ValueError, match="cls_score"):
    load_d2_state(heads, bad, "roi_heads.")


# ------------------------------------------------------------------------------------------------
# Small random models: numpy references on a batch of 2, jit caching, no detections.
# ------------------------------------------------------------------------------------------------

C = 16


def _small_model(num_classes: int = 3, seed: int = 0):
  rngs = nnx.Rngs(seed)
  rpn = RPN(C, pre_nms_topk=(300, 200), post_nms_topk=(300, 250), rngs=rngs)
  heads = StandardROIHeads(num_classes, C, fc_dim=32, detections_per_image=20, rngs=rngs)
  # Larger weights than detectron2's init, so that boxes move and scores spread.
  rng = np.random.default_rng(seed)
  for m in (rpn.rpn_head.objectness_logits, rpn.rpn_head.anchor_deltas,
            heads.box_predictor.cls_score, heads.box_predictor.bbox_pred):
    m.kernel[...] = jnp.asarray(rng.normal(0, 0.3, m.kernel.shape), jnp.float32)
  return rpn, heads


def _features(b: int, padded_hw: tuple[int, int], seed: int = 1) -> dict[str, jax.Array]:
  rng = np.random.default_rng(seed)
  return {f"p{l}": jnp.asarray(rng.normal(0, 1, (b, -(-padded_hw[0] // 2**l),
                                                  -(-padded_hw[1] // 2**l), C)), jnp.float32)
          for l in range(2, 7)}


def _np_decode(deltas, boxes, weights, clamp=np.log(1000 / 16)):
  deltas, boxes = deltas.astype(np.float32), boxes.astype(np.float32)
  w, h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
  cx, cy = boxes[:, 0] + 0.5 * w, boxes[:, 1] + 0.5 * h
  d = deltas.reshape(len(boxes), -1, 4) / np.asarray(weights, np.float32)
  d[..., 2:] = np.minimum(d[..., 2:], np.float32(clamp))
  pcx, pcy = d[..., 0] * w[:, None] + cx[:, None], d[..., 1] * h[:, None] + cy[:, None]
  pw, ph = np.exp(d[..., 2]) * w[:, None], np.exp(d[..., 3]) * h[:, None]
  return np.stack([pcx - 0.5 * pw, pcy - 0.5 * ph, pcx + 0.5 * pw, pcy + 0.5 * ph], -1)


def _np_nms(boxes, scores, thr):
  order = np.argsort(-scores, kind="stable")
  iou = box_iou(boxes, boxes)
  keep = []
  for i in order:
    if all(iou[i, k] <= thr for k in keep):
      keep.append(i)
  return np.asarray(keep, np.int64)


def _np_proposals(logits, deltas, anchors, hw, pre, post, thr=0.7):
  """detectron2 find_top_rpn_proposals for one image (python loops, float64 IoU)."""
  boxes, scores, levels = [], [], []
  for lvl, (l, d, a) in enumerate(zip(logits, deltas, anchors)):
    idx = np.argsort(-l, kind="stable")[:min(pre, len(l))]
    b = _np_decode(d[idx], a[idx], (1, 1, 1, 1))[:, 0]
    b[:, 0::2] = np.clip(b[:, 0::2], 0, hw[1])
    b[:, 1::2] = np.clip(b[:, 1::2], 0, hw[0])
    ok = (b[:, 2] > b[:, 0]) & (b[:, 3] > b[:, 1])
    b, s = b[ok], l[idx][ok]
    keep = _np_nms(b, s, thr)
    boxes.append(b[keep]), scores.append(s[keep]), levels.append(np.full(len(keep), lvl))
  boxes, scores, levels = map(np.concatenate, (boxes, scores, levels))
  order = np.argsort(-scores, kind="stable")[:post]
  return boxes[order], scores[order], levels[order]


def test_proposals_match_numpy_reference_batch_of_two():
  rpn, _ = _small_model()
  feats = _features(2, (128, 192))
  sizes = np.array([[128, 190], [97, 150]], np.int32)  # Second image smaller than the canvas.
  out = nnx.jit(lambda m, f, s: m(f, s))(rpn, feats, jnp.asarray(sizes))
  anchors = rpn.anchors((128, 192))
  # p6 (2x3 cells, 18 anchors) and p5 (72) are shorter than pre_nms_topk: padded levels.
  assert [len(a) for a in anchors] == [4608, 1152, 288, 72, 18]
  props = jax.tree.map(np.asarray, out.proposals)
  for i in range(2):
    ref_boxes, ref_scores, ref_levels = _np_proposals(
        [np.asarray(l[i]) for l in out.logits], [np.asarray(d[i]) for d in out.deltas], anchors,
        sizes[i], 200, 250)
    n = len(ref_scores)
    assert props.valid[i].sum() == n and props.valid[i, :n].all()
    np.testing.assert_allclose(props.boxes[i, :n], ref_boxes, atol=1e-4, rtol=1e-6)
    np.testing.assert_array_equal(props.logits[i, :n], ref_scores)
    np.testing.assert_array_equal(props.levels[i, :n], ref_levels)
    assert np.all(props.boxes[i, n:] == 0)
    assert props.boxes[i, :n, 2].max() <= sizes[i, 1]
    assert props.boxes[i, :n, 3].max() <= sizes[i, 0]
  # Training mode selects the train top-k (static): 300 rows.
  train = nnx.jit(lambda m, f, s: m(f, s, training=True))(rpn, feats, jnp.asarray(sizes))
  assert train.proposals.boxes.shape == (2, 300, 4)


def _np_box_inference(cls_logits, deltas, proposals, hw, thr=0.05, nms=0.5, topk=20):
  """detectron2 fast_rcnn_inference for one image (exact per-class NMS)."""
  z = cls_logits.astype(np.float64)
  p = np.exp(z - z.max(1, keepdims=True))
  p = (p / p.sum(1, keepdims=True))[:, :-1]
  boxes = _np_decode(deltas, proposals, (10, 10, 5, 5))
  boxes[..., 0::2] = np.clip(boxes[..., 0::2], 0, hw[1])
  boxes[..., 1::2] = np.clip(boxes[..., 1::2], 0, hw[0])
  r, c = np.nonzero(p > thr)
  b, s = boxes[r, c], p[r, c]
  keep = [k for cls in np.unique(c) for k in np.flatnonzero(c == cls)[_np_nms(
      b[c == cls], s[c == cls], nms)]]
  keep = np.asarray(keep, np.int64)[np.argsort(-s[keep], kind="stable")][:topk]
  return b[keep], s[keep], c[keep], r[keep]


def test_box_inference_matches_numpy_reference():
  rng = np.random.default_rng(3)
  b, r, k = 2, 60, 4
  xy = rng.uniform(0, 80, (b, r, 2))
  proposals = np.concatenate([xy, xy + rng.uniform(4, 40, (b, r, 2))], -1).astype(np.float32)
  cls_logits = rng.normal(0, 2, (b, r, k + 1)).astype(np.float32)
  deltas = rng.normal(0, 1, (b, r, 4 * k)).astype(np.float32)
  proposal_valid = np.ones((b, r), bool)
  proposal_valid[1, 50:] = False
  sizes = np.array([[100, 110], [90, 120]], np.int32)
  dets = jax.tree.map(np.asarray, fast_rcnn_inference(
      cls_logits, deltas, proposals, proposal_valid, sizes, topk_per_image=20))
  for i in range(b):
    n = proposal_valid[i].sum()
    ref = _np_box_inference(cls_logits[i, :n], deltas[i, :n], proposals[i, :n], sizes[i])
    m = len(ref[0])
    assert dets.valid[i].sum() == m and dets.valid[i, :m].all()
    np.testing.assert_allclose(dets.boxes[i, :m], ref[0], atol=1e-4, rtol=1e-6)
    np.testing.assert_allclose(dets.scores[i, :m], ref[1], atol=1e-6, rtol=0)
    np.testing.assert_array_equal(dets.classes[i, :m], ref[2])
    np.testing.assert_array_equal(dets.proposal_index[i, :m], ref[3])


def test_single_compile_and_no_detections():
  rpn, heads = _small_model()
  traces = []

  @nnx.jit
  def predict(rpn, heads, feats, sizes):
    traces.append(1)
    props = rpn(feats, sizes).proposals
    return props, heads(feats, props.boxes, props.valid, sizes)

  sizes = jnp.array([[128, 192], [100, 150]], jnp.int32)
  props, dets = predict(rpn, heads, _features(2, (128, 192), seed=1), sizes)
  assert dets.valid.any() and props.valid.all()
  # New values, same shapes (including a different image size): no retrace.
  props, dets = predict(rpn, heads, _features(2, (128, 192), seed=2),
                        jnp.array([[60, 192], [128, 40]], jnp.int32))
  assert len(traces) == 1

  # Background wins everywhere: no detection above 0.05, valid all False, zeros, no error.
  heads.box_predictor.cls_score.bias[...] = jnp.zeros((4,)).at[-1].set(100.0)
  props, dets = predict(rpn, heads, _features(2, (128, 192), seed=1), sizes)
  assert len(traces) == 1  # Weights are state, not constants.
  assert props.valid.any() and not dets.valid.any()
  assert float(jnp.abs(dets.boxes).max()) == 0.0 and float(dets.scores.max()) == 0.0
  row = dict(boxes=np.asarray(dets.boxes[0]), scores=np.asarray(dets.scores[0]),
             classes=np.asarray(dets.classes[0]), valid=np.asarray(dets.valid[0]),
             mask_probs=np.full((20, 28, 28), 0.9, np.float32))
  inst, _ = postprocess.instances(row, (64, 96), sizes[0], ["a", "b", "c"])
  assert inst.masks.shape == (0, 64, 96) and inst.boxes.shape == (0, 4)

  # An empty image (size 0): every proposal is clipped empty, nothing downstream.
  props, dets = predict(rpn, heads, _features(2, (128, 192), seed=1),
                        jnp.array([[0, 0], [0, 0]], jnp.int32))
  assert not props.valid.any() and not dets.valid.any()


def test_postprocess_scales_clips_and_drops_empty():
  row = dict(boxes=np.array([[10., 20., 30., 40.], [-5., 0., 250., 100.], [50., 50., 50., 90.]],
                            np.float32),
             scores=np.ones(3, np.float32), classes=np.zeros(3, np.int32),
             valid=np.ones(3, bool), mask_probs=np.ones((3, 28, 28), np.float32))
  inst, rows = postprocess.instances(row, (50, 100), (100, 200), ["a"])
  assert rows.tolist() == [0, 1]
  np.testing.assert_allclose(inst.boxes, [[5, 10, 15, 20], [0, 0, 100, 50]])
  masks = inst.masks
  assert masks[0, 10:20, 5:15].all() and not masks[0, :, 20:].any()

