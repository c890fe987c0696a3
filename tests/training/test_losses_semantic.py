"""Semantic PointRend losses vs an independent numpy reference."""

import jax
import jax.numpy as jnp
import numpy as np

from pointrend_jax.training import losses_semantic


def _np_upsample(x, factor):
  """PyTorch bilinear, align_corners=False, integer scale; x [N, H, W, C] float64."""
  def axis_taps(n):
    pos = np.maximum((np.arange(n * factor) + 0.5) / factor - 0.5, 0.0)
    i0 = np.minimum(np.floor(pos).astype(int), n - 1)
    i1 = np.minimum(i0 + 1, n - 1)
    l1 = pos - i0
    return i0, i1, 1.0 - l1, l1
  n, h, w, c = x.shape
  i0, i1, a0, a1 = axis_taps(w)
  x = x[:, :, i0] * a0[None, None, :, None] + x[:, :, i1] * a1[None, None, :, None]
  i0, i1, a0, a1 = axis_taps(h)
  return x[:, i0] * a0[None, :, None, None] + x[:, i1] * a1[None, :, None, None]


def _np_ce(logits, labels):
  logits = logits.reshape(-1, logits.shape[-1]).astype(np.float64)
  labels = labels.reshape(-1)
  keep = labels != 255
  if not keep.any():
    return 0.0
  logits, labels = logits[keep], labels[keep]
  m = logits.max(-1, keepdims=True)
  logp = logits - m - np.log(np.exp(logits - m).sum(-1, keepdims=True))
  return float(-logp[np.arange(len(labels)), labels].mean())


def _np_nearest(targets, coords):
  n, h, w = targets.shape
  out = np.zeros(coords.shape[:2], np.int64)
  for b in range(n):
    px = np.round(coords[b, :, 0].astype(np.float32) * w - 0.5).astype(int)
    py = np.round(coords[b, :, 1].astype(np.float32) * h - 0.5).astype(int)
    out[b] = targets[b, np.clip(py, 0, h - 1), np.clip(px, 0, w - 1)]
  return out


def _case(seed=0, n=2, hc=5, wc=6, c=4, p=50):
  rng = np.random.default_rng(seed)
  coarse = rng.standard_normal((n, hc, wc, c)).astype(np.float32) * 3
  coords = rng.uniform(0, 1, (n, p, 2)).astype(np.float32)
  point_logits = rng.standard_normal((n, p, c)).astype(np.float32)
  # Targets smaller than the padded size (padding is filled with 255 by the loss).
  targets = rng.integers(0, c, (n, hc * 4 - 3, wc * 4 - 2)).astype(np.uint8)
  targets[rng.uniform(size=targets.shape) < 0.3] = 255
  return coarse, coords, point_logits, targets


def test_semantic_losses_match_numpy():
  coarse, coords, point_logits, targets = _case()
  sizes = np.array([[17, 22], [12, 20]], np.int32)
  out = losses_semantic.semantic_losses(
      {"coarse_logits": jnp.asarray(coarse), "point_coords": jnp.asarray(coords),
       "point_logits": jnp.asarray(point_logits)}, jnp.asarray(targets), jnp.asarray(sizes))

  n, hc, wc, _ = coarse.shape
  padded = np.full((n, hc * 4, wc * 4), 255, np.int64)
  padded[:, :targets.shape[1], :targets.shape[2]] = targets
  for b, (h, w) in enumerate(sizes):
    padded[b, h:] = 255
    padded[b, :, w:] = 255
  ref_sem = _np_ce(_np_upsample(coarse.astype(np.float64), 4), padded)
  ref_point = _np_ce(point_logits, _np_nearest(padded, coords))
  np.testing.assert_allclose(float(out["loss_sem_seg"]), ref_sem, rtol=1e-5)
  np.testing.assert_allclose(float(out["loss_sem_seg_point"]), ref_point, rtol=1e-5)


def test_all_ignored_gives_zero_and_finite_gradient():
  coarse, coords, point_logits, targets = _case(1)
  targets[:] = 255

  def total(c, pl):
    out = losses_semantic.semantic_losses(
        {"coarse_logits": c, "point_coords": jnp.asarray(coords), "point_logits": pl},
        jnp.asarray(targets))
    return out["loss_sem_seg"] + out["loss_sem_seg_point"], out

  (value, out), grads = jax.value_and_grad(total, argnums=(0, 1), has_aux=True)(
      jnp.asarray(coarse), jnp.asarray(point_logits))
  assert float(out["loss_sem_seg"]) == 0.0 and float(out["loss_sem_seg_point"]) == 0.0
  assert float(value) == 0.0
  assert all(np.isfinite(np.asarray(g)).all() and not np.asarray(g).any() for g in grads)


def test_cross_entropy_ignore_single_element():
  logits = jnp.array([[2.0, 0.0, -1.0], [0.0, 0.0, 0.0]])
  labels = jnp.array([0, 255])
  expected = -np.log(np.exp(2.0) / (np.exp(2.0) + 1.0 + np.exp(-1.0)))
  np.testing.assert_allclose(float(losses_semantic.cross_entropy_ignore(logits, labels)),
                             expected, rtol=1e-6)
