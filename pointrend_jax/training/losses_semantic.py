"""Semantic PointRend losses (spec ``pointrend.md`` §4.3): ``loss_sem_seg``, ``loss_sem_seg_point``.

Both are softmax cross-entropies with ``ignore_index = 255`` averaged over the non-ignored
elements of the batch they are given (in training: one virtual replica, see
:mod:`pointrend_jax.training.train`). Unlike PyTorch (which returns NaN for a mean over zero
elements) an all-ignored batch gives 0, so one empty crop cannot poison a step.
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp

from pointrend_jax.modeling.semantic import resize_bilinear
from pointrend_jax.ops.point_sample import point_sample

__all__ = ["IGNORE_VALUE", "cross_entropy_ignore", "semantic_losses", "semantic_loss_fn"]

IGNORE_VALUE = 255

Array = jax.Array


def cross_entropy_ignore(logits: Array, labels: Array,
                         ignore_value: int = IGNORE_VALUE) -> Array:
  """``F.cross_entropy(logits, labels, ignore_index=ignore_value, reduction="mean")``, 0 if empty.

  ``logits [..., C]``, ``labels [...]`` in ``[0, C)`` or ``ignore_value`` -> float32 scalar.
  """
  logits = logits.astype(jnp.float32)
  labels = labels.astype(jnp.int32)
  valid = labels != ignore_value
  logp = jax.nn.log_softmax(logits, axis=-1)
  safe = jnp.where(valid, labels, 0)
  nll = -jnp.take_along_axis(logp, safe[..., None], axis=-1)[..., 0]
  total = jnp.sum(jnp.where(valid, nll, 0.0))
  count = jnp.sum(valid).astype(jnp.float32)
  return total / jnp.maximum(count, 1.0)


def _padded_targets(sem_seg: Array, image_sizes: Array | None, height: int,
                    width: int) -> Array:
  """Targets ``[B, height, width]`` int32: 255 outside each image and on the padding."""
  t = jnp.asarray(sem_seg).astype(jnp.int32)
  b, h, w = t.shape
  if h > height or w > width:
    raise ValueError(f"targets {h}x{w} larger than the padded input {height}x{width}")
  t = jnp.pad(t, ((0, 0), (0, height - h), (0, width - w)), constant_values=IGNORE_VALUE)
  if image_sizes is not None:
    # The pipeline already writes 255 there; masking again keeps the loss right for any source.
    sizes = jnp.asarray(image_sizes).astype(jnp.int32)
    inside = ((jnp.arange(height)[None, :, None] < sizes[:, 0, None, None])
              & (jnp.arange(width)[None, None, :] < sizes[:, 1, None, None]))
    t = jnp.where(inside, t, IGNORE_VALUE)
  return t


def semantic_losses(outputs: Mapping[str, Array], sem_seg_targets: Array,
                    image_sizes: Array | None = None, *, common_stride: int = 4,
                    loss_weight: float = 1.0) -> dict[str, Array]:
  """The two semantic PointRend losses.

  Args:
    outputs: :meth:`PointRendSemanticSegmentor.forward_train` outputs: ``coarse_logits
      [B, Hp/4, Wp/4, C]``, ``point_coords [B, P, 2]`` (x, y in [0, 1] of the padded image),
      ``point_logits [B, P, C]``.
    sem_seg_targets: ``[B, Ht, Wt]`` uint8 labels, 255 = ignore, top-left aligned with the
      images; padded here with 255 to the model's padded size ``(Hp, Wp)``.
    image_sizes: optional ``[B, 2]`` valid ``(h, w)``; labels outside are ignored.
    common_stride: upsampling factor of the coarse logits (4).
    loss_weight: SEM_SEG_HEAD.LOSS_WEIGHT (1.0), applied to ``loss_sem_seg`` as in detectron2.
  """
  coarse = outputs["coarse_logits"]
  _, hc, wc, _ = coarse.shape
  hp, wp = hc * common_stride, wc * common_stride
  targets = _padded_targets(sem_seg_targets, image_sizes, hp, wp)

  # detectron2 upsamples with scale_factor=4; for integer factors that is this exact size.
  upsampled = resize_bilinear(coarse.astype(jnp.float32), (hp, wp))
  loss_sem_seg = cross_entropy_ignore(upsampled, targets) * loss_weight

  # Labels go through grid_sample as floats in detectron2; labels <= 255 are exact in float32.
  point_labels = point_sample(targets.astype(jnp.float32)[..., None], outputs["point_coords"],
                              mode="nearest")[..., 0]
  point_labels = jnp.round(point_labels).astype(jnp.int32)
  loss_point = cross_entropy_ignore(outputs["point_logits"], point_labels)
  return {"loss_sem_seg": loss_sem_seg, "loss_sem_seg_point": loss_point}


def semantic_loss_fn(model, batch: Mapping[str, Array], key: Array
                     ) -> tuple[Array, dict[str, Array]]:
  """``loss_fn`` for :func:`pointrend_jax.training.step.make_train_step` (semantic models).

  ``model``: a :class:`PointRendSemanticSegmentor`; ``batch``: ``image [B, H, W, 3]``,
  ``image_size [B, 2]``, ``sem_seg [B, H, W]``. Returns ``(total, {loss name: scalar})``.
  """
  sizes = batch.get("image_size")
  outputs = model.forward_train(batch["image"], sizes, key)
  terms = semantic_losses(outputs, batch["sem_seg"], sizes)
  return sum(terms.values()), terms
