"""Instance PointRend losses: numpy references, mask targets, empty cases, tiny-model training."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pointrend_jax.data import batching
from pointrend_jax.ops.roi_align import roi_align_separable
from pointrend_jax.training import losses_instance as L

from _tiny_batches import instance_batch
from _tiny_models import tiny_instance_config, tiny_model

# --------------------------------------------------------------------------------------------------
# numpy references (float64).
# --------------------------------------------------------------------------------------------------


def np_iou(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  lt = np.maximum(a[:, None, :2], b[None, :, :2])
  rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
  wh = np.clip(rb - lt, 0, None)
  inter = wh[..., 0] * wh[..., 1]
  area = lambda x: (x[:, 2] - x[:, 0]) * (x[:, 3] - x[:, 1])
  union = area(a)[:, None] + area(b)[None, :] - inter
  return np.where(inter > 0, inter / np.where(inter > 0, union, 1), 0.0)


def np_match(iou, thresholds, labels, low_quality):
  """detectron2 Matcher on an unpadded [G, A] matrix."""
  g, a = iou.shape
  if g == 0:
    return np.zeros(a, int), np.full(a, labels[0])
  vals, idx = iou.max(0), iou.argmax(0)
  out = np.empty(a, int)
  bounds = [-np.inf] + list(thresholds) + [np.inf]
  for lab, lo, hi in zip(labels, bounds[:-1], bounds[1:]):
    out[(vals >= lo) & (vals < hi)] = lab
  if low_quality:
    best = iou.max(1)
    out[np.any(iou == best[:, None], axis=0)] = 1
  return idx, out


def np_encode(src, dst, w):
  sw, sh = src[:, 2] - src[:, 0], src[:, 3] - src[:, 1]
  dw, dh = dst[:, 2] - dst[:, 0], dst[:, 3] - dst[:, 1]
  scx, scy = src[:, 0] + 0.5 * sw, src[:, 1] + 0.5 * sh
  dcx, dcy = dst[:, 0] + 0.5 * dw, dst[:, 1] + 0.5 * dh
  return np.stack([w[0] * (dcx - scx) / sw, w[1] * (dcy - scy) / sh, w[2] * np.log(dw / sw),
                   w[3] * np.log(dh / sh)], 1)


def np_decode(d, boxes, w):
  bw, bh = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
  cx, cy = boxes[:, 0] + 0.5 * bw, boxes[:, 1] + 0.5 * bh
  clamp = math.log(1000.0 / 16)
  pcx, pcy = d[:, 0] / w[0] * bw + cx, d[:, 1] / w[1] * bh + cy
  pw = np.exp(np.minimum(d[:, 2] / w[2], clamp)) * bw
  ph = np.exp(np.minimum(d[:, 3] / w[3], clamp)) * bh
  return np.stack([pcx - pw / 2, pcy - ph / 2, pcx + pw / 2, pcy + ph / 2], 1)


def np_bce(x, z):
  x = np.asarray(x, np.float64)
  return np.maximum(x, 0) - x * z + np.log1p(np.exp(-np.abs(x)))


def np_roi_align(mask, box, out=7):
  """torchvision roi_align(aligned=True, sampling_ratio=0, scale 1) of one [H, W] map."""
  h, w = mask.shape
  x0, y0, x1, y1 = (float(v) - 0.5 for v in box)
  bw, bh = (x1 - x0) / out, (y1 - y0) / out
  gw, gh = math.ceil(bw), math.ceil(bh)
  res = np.zeros((out, out))
  if gw <= 0 or gh <= 0:
    return res

  def bilinear(y, x):
    if y < -1 or y > h or x < -1 or x > w:
      return 0.0
    y, x = max(y, 0.0), max(x, 0.0)
    yl, xl = int(y), int(x)
    if yl >= h - 1:
      yl = yh = h - 1
      y = float(yl)
    else:
      yh = yl + 1
    if xl >= w - 1:
      xl = xh = w - 1
      x = float(xl)
    else:
      xh = xl + 1
    ly, lx = y - yl, x - xl
    return ((1 - ly) * (1 - lx) * mask[yl, xl] + (1 - ly) * lx * mask[yl, xh] +
            ly * (1 - lx) * mask[yh, xl] + ly * lx * mask[yh, xh])

  for p in range(out):
    for q in range(out):
      acc = 0.0
      for iy in range(gh):
        y = y0 + p * bh + (iy + 0.5) * bh / gh
        for ix in range(gw):
          acc += bilinear(y, x0 + q * bw + (ix + 0.5) * bw / gw)
      res[p, q] = acc / (gh * gw)
  return res


def np_grid_sample_points(mask, pts):
  """point_sample of an [h, w] float map at image points (X, Y) normalised by (w, h)."""
  h, w = mask.shape
  out = np.zeros(len(pts))
  for i, (x, y) in enumerate(np.asarray(pts, np.float64)):
    px, py = x - 0.5, y - 0.5
    xf, yf = math.floor(px), math.floor(py)
    for dy in (0, 1):
      for dx in (0, 1):
        xi, yi = xf + dx, yf + dy
        if 0 <= xi < w and 0 <= yi < h:
          wt = (px - xf if dx else 1 - (px - xf)) * (py - yf if dy else 1 - (py - yf))
          out[i] += wt * mask[yi, xi]
  return out


# --------------------------------------------------------------------------------------------------
# RPN.
# --------------------------------------------------------------------------------------------------


def _rpn_case():
  rng = np.random.default_rng(0)
  centres = rng.uniform(4, 60, (30, 2))
  sizes = rng.uniform(6, 24, (30, 2))
  anchors = np.concatenate([centres - sizes / 2, centres + sizes / 2], 1).astype(np.float32)
  gt = np.zeros((2, 4, 4), np.float32)
  valid = np.zeros((2, 4), bool)
  gt[0, 0] = [10, 12, 30, 28]
  gt[0, 1] = [35, 30, 58, 61]
  gt[0, 2] = [0, 0, 64, 64]  # padding slot: must not match anything
  gt[0, 3] = [20, 20, 20, 40]  # zero width, flagged valid: must be dropped
  valid[0, [0, 1, 3]] = True
  # image 1: no GT at all
  logits = rng.normal(size=(2, 30)).astype(np.float32)
  deltas = rng.normal(scale=0.3, size=(2, 30, 4)).astype(np.float32)
  return anchors, gt, valid, logits, deltas


def test_rpn_losses_match_numpy_when_sampling_is_identity():
  anchors, gt, valid, logits, deltas = _rpn_case()
  s = 64  # >= every anchor: the sampler keeps all labelled anchors (#pos <= 32)
  got = L.rpn_losses(jax.random.key(0), [anchors[:18], anchors[18:]],
                     [logits[:, :18], logits[:, 18:]], [deltas[:, :18], deltas[:, 18:]],
                     gt, valid, batch_size_per_image=s)
  cls_sum = loc_sum = 0.0
  npos_total = 0
  for i in range(2):
    keep = valid[i] & (gt[i, :, 2] > gt[i, :, 0]) & (gt[i, :, 3] > gt[i, :, 1])
    g = gt[i][keep]
    idx, lab = np_match(np_iou(g, anchors), (0.3, 0.7), (0, -1, 1), True)
    pos = lab == 1
    npos_total += pos.sum()
    assert pos.sum() <= s // 2
    cls_sum += np_bce(logits[i], pos)[lab >= 0].sum()
    if len(g):
      tgt = np_encode(anchors.astype(np.float64), g[idx].astype(np.float64), (1, 1, 1, 1))
      loc_sum += np.abs(deltas[i] - tgt)[pos].sum()
  assert npos_total >= 2
  np.testing.assert_allclose(float(got["loss_rpn_cls"]), cls_sum / (2 * s), rtol=1e-5)
  np.testing.assert_allclose(float(got["loss_rpn_loc"]), loc_sum / (2 * s), rtol=1e-5)


def test_rpn_sampling_counts_and_normaliser():
  anchors, gt, valid, _, deltas = _rpn_case()
  s = 16
  zero = np.zeros((2, 30), np.float32)
  got = L.rpn_losses(jax.random.key(3), anchors, zero, deltas, gt, valid,
                     batch_size_per_image=s)
  expected = 0
  for i in range(2):
    keep = valid[i] & (gt[i, :, 2] > gt[i, :, 0])
    _, lab = np_match(np_iou(gt[i][keep], anchors), (0.3, 0.7), (0, -1, 1), True)
    n_pos = min((lab == 1).sum(), s // 2)
    expected += n_pos + min((lab == 0).sum(), s - n_pos)
  # every sampled anchor contributes BCE(0, y) = log 2
  np.testing.assert_allclose(float(got["loss_rpn_cls"]), expected * math.log(2) / (2 * s),
                             rtol=1e-6)


def test_rpn_ignores_degenerate_and_unreachable_gts():
  anchors, gt, valid, logits, deltas = _rpn_case()
  run = lambda g, v: L.rpn_losses(jax.random.key(7), anchors, logits, deltas, g, v,
                                  batch_size_per_image=16)
  base = run(gt, valid)
  gt2, valid2 = gt.copy(), valid.copy()
  gt2[1, 0] = [500, 500, 520, 530]  # overlaps no anchor (would make every anchor positive)
  gt2[1, 1] = [30, 30, 30, 30]  # empty
  valid2[1, :2] = True
  other = run(gt2, valid2)
  for k in base:
    assert float(other[k]) == float(base[k]), k


# --------------------------------------------------------------------------------------------------
# ROI heads.
# --------------------------------------------------------------------------------------------------


def _roi_case():
  rng = np.random.default_rng(1)
  props = np.array([[[10, 10, 30, 30], [12, 11, 31, 29], [40, 40, 60, 62], [0, 0, 20, 20],
                     [41, 38, 58, 60], [0, 0, 0, 0]],
                    [[5, 5, 25, 25], [30, 30, 50, 50], [1, 2, 3, 4], [10, 10, 40, 40],
                     [0, 0, 0, 0], [0, 0, 0, 0]]], np.float32)
  pvalid = np.array([[1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 0, 0]], bool)
  gt = np.array([[[11, 10, 30, 31], [40, 39, 59, 61], [0, 0, 64, 64]],
                 np.zeros((3, 4))], np.float32)
  gvalid = np.array([[1, 1, 0], [0, 0, 0]], bool)
  gcls = np.array([[2, 0, 1], [0, 0, 0]], np.int32)
  k = 3
  cand_logits = rng.normal(size=(2, 9, k + 1)).astype(np.float32)
  cand_deltas = rng.normal(scale=0.5, size=(2, 9, 4 * k)).astype(np.float32)
  return props, pvalid, gt, gvalid, gcls, k, cand_logits, cand_deltas


def test_roi_sampling_and_box_losses_match_numpy():
  props, pvalid, gt, gvalid, gcls, k, cand_logits, cand_deltas = _roi_case()
  s = 32  # >= P + M: every labelled candidate is sampled
  samples = L.sample_proposals(jax.random.key(0), props, pvalid, gt, gcls, gvalid,
                               num_classes=k, batch_size_per_image=s, positive_fraction=0.25)
  index = np.asarray(samples.index)
  take = lambda a: np.take_along_axis(a, index[..., None], axis=1)
  cls_logits, deltas = jnp.asarray(take(cand_logits)), jnp.asarray(take(cand_deltas))
  got = L.roi_box_losses(cls_logits, deltas, samples)
  pred_boxes = np.asarray(L.predict_boxes_for_gt_classes(deltas, samples))

  nll_sum = reg_sum = 0.0
  total = 0
  for i in range(2):
    cand = np.concatenate([props[i][pvalid[i]], gt[i][gvalid[i]]]).astype(np.float64)
    cand_ids = np.concatenate([np.nonzero(pvalid[i])[0], 6 + np.nonzero(gvalid[i])[0]])
    g = gt[i][gvalid[i]].astype(np.float64)
    gc = gcls[i][gvalid[i]]
    if len(g):
      idx, lab = np_match(np_iou(g, cand), (0.5,), (0, 1), False)
      cls = np.where(lab == 1, gc[idx], k)
    else:
      idx, cls = np.zeros(len(cand), int), np.full(len(cand), k)
    n = len(cand)
    total += n
    v = np.asarray(samples.valid[i])
    fg = np.asarray(samples.is_fg[i])
    nfg = (cls < k).sum()
    assert v.sum() == n and fg.sum() == nfg and fg[:nfg].all() and v[:n].all()
    assert sorted(index[i, :n].tolist()) == sorted(cand_ids.tolist())
    assert sorted(index[i, :nfg].tolist()) == sorted(cand_ids[cls < k].tolist())
    order = {c: j for j, c in enumerate(cand_ids)}
    for slot in range(n):
      j = order[index[i, slot]]
      assert int(samples.classes[i, slot]) == cls[j]
      logits = cand_logits[i, index[i, slot]].astype(np.float64)
      lse = np.log(np.exp(logits - logits.max()).sum()) + logits.max()
      nll_sum += lse - logits[cls[j]]
      c = min(cls[j], k - 1)
      d = cand_deltas[i, index[i, slot], 4 * c:4 * c + 4].astype(np.float64)
      np.testing.assert_allclose(pred_boxes[i, slot], np_decode(d[None], cand[j:j + 1],
                                                                (10, 10, 5, 5))[0],
                                 rtol=1e-5, atol=1e-4)
      if cls[j] < k:
        assert int(samples.gt_index[i, slot]) == np.nonzero(gvalid[i])[0][idx[j]]
        tgt = np_encode(cand[j:j + 1], g[idx[j]:idx[j] + 1], (10, 10, 5, 5))[0]
        reg_sum += np.abs(d - tgt).sum()
  assert total == 11  # image 0: 5 proposals + 2 GTs; image 1: 4 proposals
  np.testing.assert_allclose(float(got["loss_cls"]), nll_sum / total, rtol=1e-5)
  np.testing.assert_allclose(float(got["loss_box_reg"]), reg_sum / total, rtol=1e-5)


def test_roi_sampling_respects_fg_fraction():
  props, pvalid, gt, gvalid, gcls, k, *_ = _roi_case()
  samples = L.sample_proposals(jax.random.key(5), props, pvalid, gt, gcls, gvalid,
                               num_classes=k, batch_size_per_image=4, positive_fraction=0.25)
  # image 0: 6 fg candidates (4 proposals + 2 GTs), 1 bg: int(4 * .25) = 1 fg + 1 bg.
  # image 1: no GT, 4 proposals: all background.
  assert np.asarray(samples.is_fg).sum(1).tolist() == [1, 0]
  assert np.asarray(samples.valid).sum(1).tolist() == [2, 4]
  assert bool(samples.is_fg[0, 0]) and int(samples.classes[0, 1]) == k
  assert np.all(np.asarray(samples.classes)[1] == k)


# --------------------------------------------------------------------------------------------------
# Mask targets and point labels from packed masks.
# --------------------------------------------------------------------------------------------------


def _mask_case():
  rng = np.random.default_rng(2)
  hb, wb = 40, 48
  sizes = np.array([[33, 41], [40, 30]], np.int32)
  masks = np.zeros((2, 3, hb, wb), bool)
  for b in range(2):
    h, w = sizes[b]
    yy, xx = np.mgrid[:h, :w] + 0.5
    for m in range(3):
      cx, cy = rng.uniform(0, w), rng.uniform(0, h)
      rx, ry = rng.uniform(4, 20, 2)
      masks[b, m, :h, :w] = ((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2 < 1
    masks[b, 0, :h, w - 1] = True  # touch the right and bottom borders
    masks[b, 0, h - 1, :w] = True
  return sizes, masks, batching.pack_masks(masks)


def test_mask_targets_match_numpy_roialign_incl_image_border():
  sizes, masks, packed = _mask_case()
  boxes = np.array([[3.2, 4.7, 30.1, 28.9],  # inside, adaptive grid 4 x 4
                    [30.5, 20.25, 47.0, 39.5],  # crosses image 0's right/bottom border
                    [-6.0, -3.5, 12.0, 9.0],  # crosses top/left
                    [10.0, 10.0, 10.4, 10.3],  # sub-pixel
                    [20.0, 25.0, 60.0, 44.0],  # image 1: far past the right border
                    [2.0, 30.0, 29.9, 40.0]], np.float32)
  bidx = np.array([0, 0, 0, 1, 1, 1], np.int32)
  gidx = np.array([1, 0, 2, 0, 0, 1], np.int32)
  got = np.asarray(L.crop_and_resize_packed_masks(packed, sizes, bidx, gidx, boxes, 7,
                                                  chunk_size=4))
  for r in range(len(boxes)):
    h, w = sizes[bidx[r]]
    ref = np_roi_align(masks[bidx[r], gidx[r], :h, :w].astype(np.float64), boxes[r])
    np.testing.assert_allclose(got[r], ref, atol=2e-6, err_msg=f"roi {r}")
    decided = np.abs(ref - 0.5) > 1e-5
    assert np.array_equal((got[r] >= 0.5)[decided], (ref >= 0.5)[decided])
  # The border handling matters: ROIAlign on the zero-padded canvas gives other values there.
  canvas = np.asarray(roi_align_separable(masks[bidx, gidx].astype(np.float32), boxes, None, 7))
  assert np.abs(canvas[1] - got[1]).max() > 0.05
  np.testing.assert_allclose(canvas[0], got[0], atol=1e-6)  # inside the image: same op
  # Dense uint8 masks are packed on device to the same bytes.
  dense = L._packed_masks({"gt_masks": jnp.asarray(masks.astype(np.uint8))})  # noqa: SLF001
  np.testing.assert_array_equal(np.asarray(dense), packed)


def test_point_labels_match_numpy_grid_sample():
  sizes, masks, packed = _mask_case()
  rng = np.random.default_rng(3)
  bidx = np.array([0, 1, 1, 0], np.int32)
  gidx = np.array([0, 0, 2, 1], np.int32)
  pts = rng.uniform(-3, 50, (4, 300, 2)).astype(np.float32)  # incl. outside and padding
  pts[:, :4] = [[0.5, 0.5], [0.0, 0.0], [41.0, 33.0], [29.5, 39.7]]
  got = np.asarray(L.point_labels_from_packed_masks(packed, sizes, bidx, gidx, pts))
  for r in range(4):
    h, w = sizes[bidx[r]]
    ref = np_grid_sample_points(masks[bidx[r], gidx[r], :h, :w].astype(np.float64), pts[r])
    np.testing.assert_allclose(got[r], ref, atol=2e-5, err_msg=f"roi {r}")
  assert got.min() >= 0 and got.max() <= 1 and 0 < (got[(got > 0) & (got < 1)]).size


# --------------------------------------------------------------------------------------------------
# Mask losses.
# --------------------------------------------------------------------------------------------------


def test_mask_losses_reference_and_empty():
  rng = np.random.default_rng(4)
  coarse = rng.normal(size=(5, 7, 7)).astype(np.float32)
  pl = rng.normal(size=(5, 10)).astype(np.float32)
  tgt = rng.uniform(size=(5, 7, 7)) > 0.5
  lab = rng.uniform(size=(5, 10)).astype(np.float32)
  lab[:, :3] = 1.0
  valid = np.array([1, 0, 1, 1, 0], bool)
  got = L.mask_losses(coarse, pl, tgt, lab, valid)
  np.testing.assert_allclose(float(got["loss_mask"]), np_bce(coarse, tgt)[valid].mean(),
                             rtol=1e-5)
  np.testing.assert_allclose(float(got["loss_mask_point"]), np_bce(pl, lab)[valid].mean(),
                             rtol=1e-5)
  acc = ((pl > 0) == (lab >= 1))[valid].mean()
  np.testing.assert_allclose(float(got["point/accuracy"]), acc, rtol=1e-6)

  def total(c, p):
    out = L.mask_losses(c, p, tgt, lab, np.zeros(5, bool))
    return out["loss_mask"] + out["loss_mask_point"], out

  (val, out), grads = jax.value_and_grad(total, argnums=(0, 1), has_aux=True)(
      jnp.asarray(coarse) * 1e4, jnp.asarray(pl))
  assert float(val) == 0.0 and float(out["point/accuracy"]) == 0.0
  assert all(np.all(np.asarray(g) == 0) for g in grads)


# --------------------------------------------------------------------------------------------------
# Tiny instance model: overfitting, empty images/batches, no recompilation.
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_run():
  from pointrend_jax.training import mesh as mesh_lib
  from pointrend_jax.training import optimizer
  from pointrend_jax.training import step as step_lib
  config = tiny_instance_config()
  config.solver.update(base_lr=0.005, warmup_iters=0, steps=())
  model = tiny_model(config)
  tx, schedule = optimizer.make_optimizer(config, model)
  mesh = mesh_lib.make_mesh(jax.devices()[:1])
  state = step_lib.create_train_state(model, tx, seed=0, mesh=mesh)
  step = step_lib.make_train_step(L.instance_loss_fn, tx, mesh=mesh, num_groups=2,
                               schedule=schedule)
  batch = instance_batch()
  metrics = []
  for _ in range(14):
    state, m = step(state, batch)
    metrics.append({k: float(v) for k, v in jax.device_get(m).items()})
  # Same shapes: one image without instances (replica 0 keeps 1 of 2), then none at all.
  extra = []
  for empty in ((0,), (0, 1, 2, 3)):
    state, m = step(state, instance_batch(empty))
    extra.append({k: float(v) for k, v in jax.device_get(m).items()})
  return metrics, extra, step


@pytest.mark.slow
def test_tiny_instance_model_overfits(tiny_run):
  metrics, _, _ = tiny_run
  for m in metrics:
    assert set(L.LOSS_NAMES) <= m.keys() and "point/accuracy" in m
    assert all(np.isfinite(v) for v in m.values()), m
    np.testing.assert_allclose(m["loss"], sum(m[k] for k in L.LOSS_NAMES), rtol=1e-5)
  losses = [m["loss"] for m in metrics]
  # Early steps wobble (no warmup); the trend is clear after a dozen steps.
  assert np.mean(losses[-3:]) < 0.75 * np.mean(losses[:3]), losses
  for k in ("loss_rpn_cls", "loss_cls", "loss_mask"):
    assert metrics[-1][k] < metrics[0][k], (k, metrics[0][k], metrics[-1][k])


@pytest.mark.slow
def test_empty_images_and_batches_train_finitely(tiny_run):
  _, extra, _ = tiny_run
  for m in extra:
    assert all(np.isfinite(v) for v in m.values()), m
    assert m["grad_norm"] > 0
  none = extra[1]
  for k in ("loss_rpn_loc", "loss_box_reg", "loss_mask", "loss_mask_point", "point/accuracy"):
    assert none[k] == 0.0, (k, none[k])
  assert none["loss_rpn_cls"] > 0 and none["loss_cls"] > 0


@pytest.mark.slow
def test_second_step_does_not_recompile(tiny_run):
  _, _, step = tiny_run
  assert step.num_traces == 1
  assert step.num_compiled == 1


@pytest.mark.slow
def test_replicas_by_map_and_by_vmap_agree():
  """The two ways of running the virtual replicas (CPU's lax.map for large canvases, vmap on
  GPU/TPU) give the same loss and gradients on the tiny instance model, whose ROIAlign and NMS
  loops get batched trip counts under vmap."""
  from flax import nnx
  from pointrend_jax.modeling import layers
  from pointrend_jax.training import step as step_lib
  model = tiny_model(tiny_instance_config())
  graphdef, params, rest = nnx.split(model, layers.TRAINABLE, ...)
  params, rest = nnx.to_pure_dict(params), nnx.to_pure_dict(rest)
  batch = {k: jnp.asarray(v) for k, v in instance_batch().items()}

  def run(replicas):
    f = lambda p: step_lib.replica_mean_loss(L.instance_loss_fn, graphdef, p, rest, batch,
                                             jax.random.key(3), 2, replicas=replicas)
    return jax.device_get(jax.jit(jax.value_and_grad(f, has_aux=True))(params))

  (loss_m, terms_m), grads_m = run("map")
  (loss_v, terms_v), grads_v = run("vmap")
  np.testing.assert_allclose(loss_m, loss_v, rtol=1e-5)
  for k in terms_m:
    np.testing.assert_allclose(terms_m[k], terms_v[k], rtol=1e-5, atol=1e-6, err_msg=k)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), grads_m,
               grads_v)
