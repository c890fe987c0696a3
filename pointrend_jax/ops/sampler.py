"""Positive/negative subsampling (detectron2 ``subsample_labels``) with static output sizes.

detectron2 draws ``randperm`` subsets; here every candidate gets an i.i.d. uniform key and the
``k`` largest keys of each group are taken, which is also a uniformly random ``k``-subset. The
random streams differ from PyTorch's, only the distribution matches.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _group_counts(labels: jnp.ndarray, num_samples: int, positive_fraction: float,
                  bg_label: int):
  is_pos = (labels != -1) & (labels != bg_label)
  is_neg = labels == bg_label
  max_pos = int(num_samples * positive_fraction)
  n_pos = jnp.minimum(jnp.sum(is_pos, dtype=jnp.int32), max_pos)
  n_neg = jnp.minimum(jnp.sum(is_neg, dtype=jnp.int32), num_samples - n_pos)
  return is_pos, is_neg, max_pos, n_pos, n_neg


def _random_top(key: jax.Array, member: jnp.ndarray, k: int) -> jnp.ndarray:
  """Indices of ``k`` uniformly random members (members first, in random order)."""
  k = min(k, member.shape[0])
  if k == 0:
    return jnp.zeros((0,), jnp.int32)
  # 31-bit integer keys for members, -1 for the rest: non-members can only fill the tail, which
  # the caller's counts mark invalid. (Float keys have 2^23 levels and would tie far more often
  # among ~200k anchors; ties fall back to index order.)
  bits = jax.random.bits(key, member.shape, jnp.uint32) >> 1
  _, idx = jax.lax.top_k(jnp.where(member, bits.astype(jnp.int32), -1), k)
  return idx.astype(jnp.int32)


def _take_slots(idx: jnp.ndarray, pos: jnp.ndarray) -> jnp.ndarray:
  if idx.shape[0] == 0:
    return jnp.zeros_like(pos)
  return jnp.take(idx, jnp.clip(pos, 0, idx.shape[0] - 1))


def subsample_labels(key: jax.Array, labels: jnp.ndarray, num_samples: int,
                     positive_fraction: float, bg_label: int
                     ) -> tuple[jnp.ndarray, jnp.ndarray, jnp.ndarray]:
  """Samples a fixed-size, fg-first set of indices.

  Positives are ``labels`` not in ``{-1, bg_label}``, negatives ``labels == bg_label``, ``-1`` is
  ignored. ``n_pos = min(#pos, int(num_samples * positive_fraction))`` positives and
  ``n_neg = min(#neg, num_samples - n_pos)`` negatives are drawn uniformly without replacement.

  Args:
    key: PRNG key; the result is a deterministic function of ``(key, labels)``.
    labels: ``[A]`` integer labels (RPN: 1/0/-1 with ``bg_label=0``; ROI heads: class ids with
      background ``bg_label=K``).
    num_samples: static output size (RPN 256, ROI heads 512).
    positive_fraction: RPN 0.5, ROI heads 0.25.
    bg_label: the negative label.

  Returns:
    ``indices`` ``[num_samples]`` int32: slots ``[0, n_pos)`` positives, then ``n_neg``
    negatives, then padding (index 0); ``is_positive`` ``[num_samples]`` bool; ``valid``
    ``[num_samples]`` bool (``is_positive`` implies ``valid``).
  """
  labels = jnp.asarray(labels)
  is_pos, is_neg, max_pos, n_pos, n_neg = _group_counts(labels, num_samples, positive_fraction,
                                                        bg_label)
  k_pos, k_neg = jax.random.split(key)
  pos_idx = _random_top(k_pos, is_pos, max_pos)
  neg_idx = _random_top(k_neg, is_neg, num_samples)
  slot = jnp.arange(num_samples, dtype=jnp.int32)
  is_positive = slot < n_pos
  valid = slot < n_pos + n_neg
  indices = jnp.where(is_positive, _take_slots(pos_idx, slot),
                      jnp.where(valid, _take_slots(neg_idx, slot - n_pos), 0))
  return indices, is_positive, valid


def sample_mask(key: jax.Array, labels: jnp.ndarray, num_samples: int, positive_fraction: float,
                bg_label: int) -> tuple[jnp.ndarray, jnp.ndarray]:
  """Per-element form of :func:`subsample_labels` (what the RPN loss needs).

  Returns:
    ``pos_mask``, ``neg_mask``: ``[A]`` bool, the sampled positives and negatives; identical to
    scattering the output of :func:`subsample_labels` with the same ``key``.
  """
  labels = jnp.asarray(labels)
  a = labels.shape[0]
  indices, is_positive, valid = subsample_labels(key, labels, num_samples, positive_fraction,
                                                 bg_label)
  # Padding slots point past the end and are dropped, so they cannot clear a real entry.
  pos_target = jnp.where(is_positive, indices, a)
  neg_target = jnp.where(valid & ~is_positive, indices, a)
  pos_mask = jnp.zeros((a,), bool).at[pos_target].set(True, mode="drop")
  neg_mask = jnp.zeros((a,), bool).at[neg_target].set(True, mode="drop")
  return pos_mask, neg_mask
