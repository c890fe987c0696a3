"""The predict program: a padded batch in, padded predictions out, on the device.

:func:`predict` is the one device function of inference; :class:`PredictProgram` compiles it
once per input bucket. :class:`~pointrend_jax.inference.Predictor`, the dataset evaluation
(:func:`pointrend_jax.evaluation.inference.inference_on_dataset`) and the StableHLO export all
run it, and :mod:`pointrend_jax.postprocess` turns its outputs into per-image results at
the original image size on the host.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from pointrend_jax.modeling.semantic import PointRendSemanticSegmentor

Array = jax.Array

__all__ = ["predict", "PredictProgram"]

logger = logging.getLogger(__name__)


def predict(model: nnx.Module, images: Array, image_sizes: Array, *, stages: bool = False
            ) -> dict[str, Array]:
  """Predictions of a padded batch, every output of a fixed shape.

  Args:
    model: a :class:`~pointrend_jax.modeling.meta_arch.PointRendRCNN` or
      :class:`~pointrend_jax.modeling.semantic.PointRendSemanticSegmentor`.
    images: ``[B, H, W, 3]`` RGB uint8, each image top-left aligned.
    image_sizes: ``[B, 2]`` int32 valid (resized, unpadded) ``(h, w)``.
    stages: instance models: add the mask head's subdivision steps.

  Returns:
    Instance models: ``boxes [B, D, 4]`` (resized-image pixels), ``scores [B, D]``,
    ``classes [B, D]`` int32, ``valid [B, D]`` bool, ``mask_probs [B, D, S, S]`` and
    ``coarse_probs [B, D, 7, 7]`` (box frame, predicted class; PointRend's and the coarse
    head's masks). With ``stages``: ``coarse_logits [B, D, 7, 7]``, ``init_logits
    [B, D, 28, 28]`` (step 0) and per subdivision step tuples ``upsampled [B, D, H_s, W_s]``
    (x2 upsampling of the previous step), ``indices [B, D, K]`` (its recomputed cells, flat),
    ``points [B, D, K, 2]`` (their centres, ``(x, y)`` in the box) and ``point_logits
    [B, D, K]`` (the point head's logits there).
    Semantic models: ``logits [B, H, W, C]`` on the padded canvas.
  """
  if isinstance(model, PointRendSemanticSegmentor):
    return {"logits": model(images, image_sizes)}
  out = model.predict(images, image_sizes, return_intermediates=True)
  m = out["intermediates"]["mask"]
  b, d = out["valid"].shape
  split = lambda a: a.reshape((b, d) + a.shape[1:])  # noqa: E731
  res = {k: out[k] for k in ("boxes", "scores", "classes", "valid")}
  res["mask_probs"] = jax.nn.sigmoid(out["mask_logits"])
  res["coarse_probs"] = jax.nn.sigmoid(split(m["coarse_logits_class"]))
  if stages:
    res.update(coarse_logits=split(m["coarse_logits_class"]), init_logits=split(m["init_logits"]),
               upsampled=tuple(split(a) for a in m["upsampled"]),
               indices=tuple(split(a) for a in m["indices"]),
               points=tuple(split(a) for a in m["points_in_box"]),
               point_logits=tuple(split(a) for a in m["point_logits"]))
  return res


class PredictProgram:
  """:func:`predict` of one model, compiled once per input shape ``(B, H, W)`` and cached.

  The weights are split off the model when the program is built (:meth:`update` swaps in the
  current weights of the same model); calls with a new batch shape compile (logged, timed in
  :attr:`compile_seconds`), later calls of that shape reuse the executable.

  Args:
    model: the model.
    stages: compile :func:`predict` with ``stages=True``.

  Attributes:
    compile_seconds: ``{(B, H, W): seconds}`` of every compilation.
  """

  def __init__(self, model: nnx.Module, *, stages: bool = False):
    self.stages = bool(stages)
    self._graphdef, self._state = nnx.split(model)
    graphdef, flag = self._graphdef, self.stages
    self._jit = jax.jit(lambda state, images, sizes: predict(
        nnx.merge(graphdef, state), images, sizes, stages=flag))
    self._compiled: dict[tuple[int, ...], Any] = {}
    self.compile_seconds: dict[tuple[int, ...], float] = {}

  def update(self, model: nnx.Module) -> None:
    """Uses ``model``'s current weights (a model of the same structure) from now on."""
    self._state = nnx.state(model)

  def lower(self, batch: int, height: int, width: int) -> jax.stages.Lowered:
    """The lowered program of a ``batch x height x width`` uint8 bucket."""
    images = jax.ShapeDtypeStruct((batch, height, width, 3), jnp.uint8)
    sizes = jax.ShapeDtypeStruct((batch, 2), jnp.int32)
    return self._jit.lower(self._state, images, sizes)

  def export(self, batch: int, height: int, width: int, *,
             platforms: tuple[str, ...] | None = None) -> jax.export.Exported:
    """The :mod:`jax.export` of a ``batch x height x width`` bucket, for ``platforms`` (default:
    this backend) -- a program that needs neither flax nor this package to run.

    Its arguments are ``(weights, images [B, H, W, 3] uint8, image_sizes [B, 2] int32)``;
    ``weights`` is the list :meth:`weights` returns. Its results are :func:`predict`'s.
    """
    leaves, treedef = jax.tree.flatten(self._state)
    graphdef, flag = self._graphdef, self.stages

    def program(weights, images, image_sizes):
      model = nnx.merge(graphdef, jax.tree.unflatten(treedef, weights))
      return predict(model, images, image_sizes, stages=flag)

    specs = [jax.ShapeDtypeStruct(jnp.shape(v), v.dtype) for v in leaves]
    return jax.export.export(jax.jit(program), platforms=platforms)(
        specs, jax.ShapeDtypeStruct((batch, height, width, 3), jnp.uint8),
        jax.ShapeDtypeStruct((batch, 2), jnp.int32))

  def weights(self) -> list[Array]:
    """The model's variables as the flat list :meth:`export`'s programs take."""
    return jax.tree.leaves(self._state)

  def _executable(self, key: tuple[int, ...], lower: Callable[[], jax.stages.Lowered]) -> Any:
    key = tuple(int(v) for v in key)
    if key not in self._compiled:
      logger.info("compiling predict for bucket %dx%d (batch %d)", key[1], key[2], key[0])
      t0 = time.perf_counter()
      self._compiled[key] = lower().compile()
      self.compile_seconds[key] = time.perf_counter() - t0
    return self._compiled[key]

  def compile(self, batch: int, height: int, width: int) -> Any:
    """The executable of a ``batch x height x width`` bucket (unsharded inputs), compiled on
    first use."""
    return self._executable((batch, height, width), lambda: self.lower(batch, height, width))

  def __call__(self, images: Array, image_sizes: Array) -> dict[str, Array]:
    """:func:`predict` of ``images [B, H, W, 3]`` uint8, ``image_sizes [B, 2]`` int32 (numpy or
    device arrays; sharded arrays keep their sharding)."""
    fn = self._executable(images.shape[:3],
                          lambda: self._jit.lower(self._state, images, image_sizes))
    return fn(self._state, images, image_sizes)
