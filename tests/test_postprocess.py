"""Tests of the host postprocess's mask pasting (detectron2 ``paste_masks_in_image``)."""

from __future__ import annotations

import warnings

import numpy as np
import pycocotools.mask as mask_util
import pytest

from pointrend_jax.postprocess import instances, paste_masks, subdivision_stages
from pointrend_jax.parity.compare import compare
from pointrend_jax.parity.ops_boxes import CHECKS


@pytest.mark.parametrize("name", ["out_paste_masks_28", "out_paste_masks_224"])
def test_parity_with_detectron2(ops_golden, name):
  check = CHECKS[name]
  row = compare(name, check, ops_golden[name], check.compute(ops_golden))
  assert row.passed, row


def reference_paste(masks, boxes, hw):
  """Plain 4-tap ``grid_sample`` (float64) over the whole image, written from the spec (§12)."""
  h, w = hw
  d, s, _ = masks.shape
  out = np.zeros((d, h, w))
  for k in range(d):
    x0, y0, x1, y1 = boxes[k].astype(np.float64)
    u = (np.arange(w) + 0.5 - x0) / (x1 - x0) * s - 0.5
    v = (np.arange(h) + 0.5 - y0) / (y1 - y0) * s - 0.5
    padded = np.pad(masks[k].astype(np.float64), 1)  # Zero padding; index shift +1.
    fu, fv = np.floor(u), np.floor(v)
    for dy, wy in ((0, 1 - (v - fv)), (1, v - fv)):
      iy = np.clip(fv + dy, -1, s).astype(int) + 1
      for dx, wx in ((0, 1 - (u - fu)), (1, u - fu)):
        ix = np.clip(fu + dx, -1, s).astype(int) + 1
        out[k] += wy[:, None] * wx[None, :] * padded[iy][:, ix]
  return out


def _smooth_masks(rng, d, s):
  coarse = rng.random((d, 4, 4))
  idx = np.linspace(0, 3, s)
  lo = np.floor(idx).astype(int).clip(0, 2)
  t = idx - lo
  rows = coarse[:, lo] * (1 - t)[None, :, None] + coarse[:, lo + 1] * t[None, :, None]
  return (rows[:, :, lo] * (1 - t) + rows[:, :, lo + 1] * t).astype(np.float32)


def test_exact_on_detectron2_goldens(ops_golden):
  g = ops_golden
  for s in (28, 224):
    out = paste_masks(g[f"in_paste_masks_{s}"], g["in_paste_boxes"],
                      tuple(g["in_paste_image_hw"]))
    np.testing.assert_array_equal(out, g[f"out_paste_masks_{s}"])


def test_matches_reference_on_random_masks():
  rng = np.random.default_rng(0)
  hw = (37, 53)
  masks = _smooth_masks(rng, 6, 28)
  boxes = np.array([[5.2, 3.1, 40.7, 30.3], [-10, -4, 20, 15], [30.5, 20.5, 70, 50],
                    [12, 12, 13.5, 13], [0, 0, 53, 37], [25.25, 1.75, 31.5, 36.0]], np.float32)
  ref = reference_paste(masks, boxes, hw)
  out = paste_masks(masks, boxes, hw)
  assert out.shape == (6,) + hw and out.dtype == bool
  decided = np.abs(ref - 0.5) > 1e-5  # float32 vs float64 may differ right at the threshold.
  np.testing.assert_array_equal(out[decided], ref[decided] >= 0.5)
  assert out.sum() > 100


def test_degenerate_box_gives_empty_mask_and_threshold():
  masks = np.full((2, 14, 14), 0.7, np.float32)
  boxes = np.array([[5, 5, 5, 9], [2, 2, 8, 8]], np.float32)
  out = paste_masks(masks, boxes, (10, 12))
  assert not out[0].any()
  # Exactly the pixels whose centres lie in the box: the next ones out read only zero padding.
  assert out[1, 2:8, 2:8].all() and out[1].sum() == 36
  assert paste_masks(masks, boxes, (10, 12), threshold=0.8).sum() == 0
  # Non-finite boxes give empty masks, without warnings.
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    out = paste_masks(np.ones((2, 28, 28), np.float32),
                      np.array([[5, 5, 5, 9], [np.nan, 0, 3, 3]], np.float32), (10, 10))
  assert not out.any()


def test_instances_at_original_size():
  outputs = dict(
      boxes=np.array([[10., 20., 50., 60.], [0., 0., 0., 0.], [30., 30., 30., 80.]], np.float32),
      scores=np.array([0.9, 0.0, 0.5], np.float32), classes=np.array([2, 0, 1], np.int32),
      valid=np.array([True, False, True]), mask_probs=np.full((3, 28, 28), 0.99, np.float32))
  inst, rows = instances(outputs, (50, 60), (100, 120), ["a", "b", "c"])
  # Row 1 is invalid, row 2 has zero width: one instance, scaled by 0.5.
  np.testing.assert_allclose(inst.boxes, [[5., 10., 25., 30.]])
  assert inst.classes.tolist() == [2] and rows.tolist() == [0] and inst.class_names == ["c"]
  m = inst.masks[0]
  assert m.shape == (50, 60) and m[10:30, 5:25].all() and m.sum() == 400
  np.testing.assert_array_equal(mask_util.decode(inst.rle[0]).astype(bool), m)


def test_subdivision_stages_of_the_kept_rows():
  rng = np.random.default_rng(0)
  d, k = 4, 5
  ups = [rng.normal(size=(d, 6, 6)).astype(np.float32),
         rng.normal(size=(d, 12, 12)).astype(np.float32)]
  outputs = dict(coarse_logits=np.zeros((d, 7, 7), np.float32),
                 init_logits=np.zeros((d, 3, 3), np.float32), upsampled=tuple(ups),
                 indices=tuple(np.stack([rng.permutation(u[0].size)[:k] for _ in range(d)])
                               for u in ups),
                 points=tuple(np.zeros((d, k, 2), np.float32) for _ in ups),
                 point_logits=tuple(rng.normal(size=(d, k)).astype(np.float32) for _ in ups))
  for rows in (np.array([2, 0]), np.array([], np.int64)):
    st = subdivision_stages(outputs, rows, np.zeros((len(rows), 4), np.float32))
    assert [u.shape for u in st.refined] == [(len(rows), 6, 6), (len(rows), 12, 12)]
    assert [p.shape for p in st.points] == [(len(rows), k, 2)] * 2
  st = subdivision_stages(outputs, np.array([2]), np.zeros((1, 4), np.float32))
  ref = ups[1][2].reshape(-1).copy()
  ref[outputs["indices"][1][2]] = outputs["point_logits"][1][2]
  np.testing.assert_array_equal(st.final[0], ref.reshape(12, 12))
  np.testing.assert_array_equal(st.upsampled[1][0], ups[1][2])
