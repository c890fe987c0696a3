"""The train state and the data-parallel train step (model-agnostic).

* **State.** The NNX model is split once (``nnx.split``) into a static ``GraphDef``, the
  trainable ``nnx.Param`` values and every other variable (frozen parameters, FrozenBN
  buffers). Both value trees are kept as pure nested dicts (``nnx.to_pure_dict``), so the
  :class:`TrainState` is a plain pytree of arrays that optax, ``jax.jit`` shardings and orbax
  handle without NNX types; the model is rebuilt inside traced code with
  ``nnx.merge(graphdef, params, model_state, copy=True)``.
* **Data parallelism.** ``jax.jit`` over global arrays: the batch is split over the mesh axis
  ``'data'``, the state is replicated, XLA inserts the gradient all-reduce.
* **detectron2's per-GPU normalisation** (spec ``mask_rcnn_fpn.md`` §15.3). detectron2 trains
  on ``G`` GPUs (``config.train.num_replicas_d2``, 8 in the model zoo); each computes losses
  normalised over *its own* ``batch_size / G`` images and DDP averages the gradients. The step
  reproduces that independently of the real device count: the global batch is reshaped to
  ``[G, batch_size / G, ...]``, ``loss_fn`` runs on each of the ``G`` virtual replicas, and the
  loss is the mean of the ``G`` replica losses. 1 or 8 devices run the same program on the
  same numbers; only the partitioning differs.
* **Precision** belongs to the model: it computes in the ``dtype`` it was built with
  (:func:`~pointrend_jax.modeling.meta_arch.build_model`, from ``train.compute_dtype``).
  Parameters are float32 variables cast inside the layers, so gradients, optimizer state and
  the loss stay float32.
* **Randomness.** Step ``t`` uses ``fold_in(key(seed), t)``, split into one key per virtual
  replica, so a resumed run and any device count draw the same points.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx, struct

from pointrend_jax.modeling import layers
from pointrend_jax.training import mesh as mesh_lib

__all__ = ["TrainState", "LossFn", "create_train_state", "replica_mean_loss", "TrainStep",
           "make_train_step", "SEQUENTIAL_REPLICAS_MIN_PIXELS"]

logger = logging.getLogger(__name__)

Array = jax.Array
Batch = Mapping[str, Array]
# loss_fn(model, batch_of_one_virtual_replica, key) -> (total loss, {term name: scalar}).
LossFn = Callable[[nnx.Module, Batch, Array], tuple[Array, Mapping[str, Array]]]


# --- Train state ---


class TrainState(struct.PyTreeNode):
  """Everything that changes during training, as a pytree of arrays.

  Attributes:
    step: int32 scalar, iterations done (the next iteration's 0-based index).
    params: pure nested dict of the ``nnx.Param`` values (trained).
    opt_state: optax state for ``params``.
    model_state: pure nested dict of all other variables (frozen parameters, FrozenBN
      buffers); constant during training.
    rng: uint32 ``[2]`` raw data of the base PRNG key (stored raw so it checkpoints as an array).
    graphdef: static structure of the model.
  """

  step: Array
  params: Any
  opt_state: Any
  model_state: Any
  rng: Array
  graphdef: nnx.GraphDef = struct.field(pytree_node=False)

  def model(self) -> nnx.Module:
    """A fresh module holding (copies of references to) the current values."""
    return nnx.merge(self.graphdef, self.params, self.model_state, copy=True)

  def checkpoint_tree(self) -> dict[str, Any]:
    """The checkpointed pytree (no static parts)."""
    return {"step": self.step, "params": self.params, "opt_state": self.opt_state,
            "model_state": self.model_state, "rng": self.rng}

  def with_checkpoint_tree(self, tree: Mapping[str, Any]) -> "TrainState":
    return self.replace(step=tree["step"], params=tree["params"], opt_state=tree["opt_state"],
                        model_state=tree["model_state"], rng=tree["rng"])


def create_train_state(model: nnx.Module, tx: optax.GradientTransformation, *,
                       seed: int = 0, mesh: jax.sharding.Mesh | None = None) -> TrainState:
  """Splits ``model`` once and builds the initial state, replicated over ``mesh``."""
  graphdef, params, rest = nnx.split(model, layers.TRAINABLE, ...)
  if jax.tree.leaves(nnx.state(model, nnx.BatchStat)):
    # The vmap over virtual replicas treats non-trainable variables as constants.
    raise NotImplementedError("models with trainable BatchNorm statistics are not supported; "
                              "detectron2's configs use FrozenBN or GN")
  params = nnx.to_pure_dict(params)
  rest = nnx.to_pure_dict(rest)
  rng = jax.random.key_data(jax.random.key(seed))
  state = TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                     model_state=rest, rng=rng, graphdef=graphdef)
  if mesh is not None:
    state = mesh_lib.replicate(state, mesh)
  return state


# --- Train step ---


def _split_replicas(batch: Batch, num_groups: int, mesh: jax.sharding.Mesh | None) -> Batch:
  def split(x):
    if x.shape[0] % num_groups:
      raise ValueError(f"batch of {x.shape[0]} not divisible into {num_groups} replicas")
    y = x.reshape((num_groups, x.shape[0] // num_groups) + x.shape[1:])
    if mesh is not None and num_groups % mesh.devices.size == 0:
      # Whole replicas per device: the per-replica work never crosses devices.
      y = jax.lax.with_sharding_constraint(y, mesh_lib.data_sharding(mesh))
    return y
  return jax.tree.map(split, dict(batch))


# Canvas size (H * W) from which one CPU device runs the virtual replicas by lax.map instead of
# vmap: 2.2x faster for 800x1344 R50 steps, 25% slower for the demo's 128x128 steps (small maps
# batch better and their loop carries are small). See docs/performance.md.
SEQUENTIAL_REPLICAS_MIN_PIXELS = 256 * 256


def replica_mean_loss(loss_fn: LossFn, graphdef: nnx.GraphDef, params: Any, model_state: Any,
                      batch: Batch, key: Array, num_groups: int,
                      mesh: jax.sharding.Mesh | None = None, *, replicas: str | None = None
                      ) -> tuple[Array, dict[str, Array]]:
  """Mean over ``num_groups`` virtual replicas of ``loss_fn`` on each replica's images.

  Args:
    replicas: ``"vmap"`` (batched), ``"map"`` (one after the other, ``lax.map``) or None: chosen
      per platform when the program is lowered -- ``map`` on CPU for one device and canvases of
      at least ``SEQUENTIAL_REPLICAS_MIN_PIXELS``, ``vmap`` otherwise and on GPU/TPU. The two
      give the same numbers up to float summation order.

  Returns:
    ``(loss, terms)``: the mean total loss and the mean of each loss term.
  """
  grouped = _split_replicas(batch, num_groups, mesh)
  keys = jax.random.split(key, num_groups)

  def one_replica(replica_batch, replica_key):
    model = nnx.merge(graphdef, params, model_state, copy=True)
    loss, terms = loss_fn(model, replica_batch, replica_key)
    return loss, dict(terms)

  def sequential(grouped, keys):
    # Under vmap every data-dependent loop of the model (ROIAlign's tap slots and its backward
    # scatter, NMS) gets a batched trip count, and JAX then selects the whole loop carry on each
    # iteration: for ROIAlign's [maps, 256] gradient buffer that cost 10 s of a 42 s R50 step on
    # CPU (docs/performance.md). XLA:GPU/TPU run the batched form well, and vmap keeps the
    # replicas' work in one kernel launch per op.
    return jax.lax.map(lambda args: one_replica(*args), (grouped, keys))

  batched = jax.vmap(one_replica)
  if replicas is None:
    image = batch.get("image")
    pixels = 0 if image is None else int(np.prod(image.shape[1:3]))
    if (mesh is None or mesh.devices.size == 1) and pixels >= SEQUENTIAL_REPLICAS_MIN_PIXELS:
      losses, terms = jax.lax.platform_dependent(grouped, keys, cpu=sequential, default=batched)
    else:
      losses, terms = batched(grouped, keys)
  elif replicas in ("map", "vmap"):
    losses, terms = (sequential if replicas == "map" else batched)(grouped, keys)
  else:
    raise ValueError(f"replicas={replicas!r}: expected 'map', 'vmap' or None")
  return jnp.mean(losses), {k: jnp.mean(v) for k, v in terms.items()}


class TrainStep:
  """Jitted ``(state, batch, key=None) -> (state, metrics)`` with compile tracking.

  ``batch`` holds global arrays split over ``'data'`` (see
  :func:`~pointrend_jax.training.mesh.shard_batch`; host numpy batches are sharded on the
  way in). With ``key=None`` the step's key is ``fold_in(key(state.rng), state.step)``.
  ``metrics`` (replicated scalars): ``loss``, each loss term, ``lr`` (of this step) and
  ``grad_norm``. The input state is donated.

  Attributes:
    num_traces: how many times the step was traced (one per new batch shape).
  """

  def __init__(self, loss_fn: LossFn, tx: optax.GradientTransformation, *, mesh: jax.sharding.Mesh,
               num_groups: int = 1, schedule: optax.Schedule | None = None, donate: bool = True):
    self.loss_fn = loss_fn
    self.tx = tx
    self.mesh = mesh
    self.num_groups = int(num_groups)
    self.schedule = schedule
    self.num_traces = 0
    self._signatures: set[tuple[Any, ...]] = set()
    replicated = mesh_lib.replicated_sharding(mesh)
    self._jitted = jax.jit(
        self._step,
        in_shardings=(replicated, mesh_lib.data_sharding(mesh), replicated),
        out_shardings=(replicated, replicated),
        donate_argnums=(0,) if donate else ())

  def _step(self, state: TrainState, batch: Batch, key: Array | None
            ) -> tuple[TrainState, dict[str, Array]]:
    self.num_traces += 1  # runs at trace time only
    if key is None:
      key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)

    def loss_of(params):
      return replica_mean_loss(self.loss_fn, state.graphdef, params, state.model_state, batch,
                               key, self.num_groups, self.mesh)

    (loss, terms), grads = jax.value_and_grad(loss_of, has_aux=True)(state.params)
    updates, opt_state = self.tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {"loss": loss, **terms, "grad_norm": optax.tree.norm(grads)}
    if self.schedule is not None:
      metrics["lr"] = jnp.asarray(self.schedule(state.step), jnp.float32)
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics

  def __call__(self, state: TrainState, batch: Mapping[str, Any], key: Array | None = None
               ) -> tuple[TrainState, dict[str, Array]]:
    if any(not isinstance(v, jax.Array) for v in batch.values()):
      batch = mesh_lib.shard_batch(batch, self.mesh)
    signature = tuple(sorted((k, v.shape, str(v.dtype)) for k, v in batch.items()))
    if signature not in self._signatures:
      self._signatures.add(signature)
      image = batch.get("image")
      bucket = (f"{image.shape[1]}x{image.shape[2]}" if image is not None and image.ndim >= 3
                else "?")
      logger.info("compiling train step for bucket %s (global batch %d, %d virtual replicas, "
                   "%d devices)", bucket, next(iter(batch.values())).shape[0], self.num_groups,
                   self.mesh.devices.size)
    return self._jitted(state, batch, key)

  def lower(self, state: TrainState, batch: Mapping[str, Any], key: Array | None = None
            ) -> jax.stages.Lowered:
    """The step lowered for this backend (``.compile()`` it for a cost or memory analysis)."""
    return self._jitted.lower(state, batch, key)

  def export(self, state: TrainState, batch: Mapping[str, Any], *,
             platforms: tuple[str, ...]) -> jax.export.Exported:
    """The step exported (lowered) for ``platforms``, e.g. ``("cuda",)``, from any machine.
    ``state`` and ``batch`` may be arrays or ``jax.ShapeDtypeStruct``s."""
    return jax.export.export(self._jitted, platforms=platforms)(state, batch, None)

  @property
  def num_compiled(self) -> int:
    """Entries in the jit cache (compiled shape signatures)."""
    return self._jitted._cache_size()  # pylint: disable=protected-access


def make_train_step(loss_fn: LossFn, optimizer: optax.GradientTransformation, *,
                    mesh: jax.sharding.Mesh | None = None, num_groups: int = 1,
                    schedule: optax.Schedule | None = None, donate: bool = True) -> TrainStep:
  """The jitted data-parallel train step; see :class:`TrainStep`.

  ``loss_fn`` runs on one virtual replica's images; ``num_groups`` is detectron2's GPU count
  ``G`` (virtual replicas per global batch); ``mesh`` defaults to all devices; ``schedule`` only
  reports ``lr`` in the metrics.
  """
  return TrainStep(loss_fn, optimizer, mesh=mesh or mesh_lib.make_mesh(),
                   num_groups=num_groups, schedule=schedule, donate=donate)
