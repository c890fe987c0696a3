"""Whole-model parity against a detectron2 model fixture folder.

For a fixture folder (its files: :mod:`~pointrend_jax.parity.fixture`),
:func:`check_model_folder`:

1. builds the model from ``config.yaml`` abstractly (no random init) and loads the fixture
   weights: ``make_weights.py`` of the folder's parent, called for every detectron2 name/shape
   of *our* model with the fixture's seed and the config's ``MODEL.PIXEL_STD``;
2. prepares the input like detectron2's ``DefaultPredictor`` (``model_input.png`` if present,
   else PIL resize of ``image.png`` per ``INPUT.MIN/MAX_SIZE_TEST``), padded exactly to
   multiples of 32 (bit-level parity needs detectron2's own padded extent);
3. runs one jitted function: the end-to-end model with its intermediates, plus the box branch on
   the golden proposals and the mask head on the golden detections (the goldens of those heads
   are defined on detectron2's own inputs, so order flips upstream cannot blur them);
4. compares every golden array with the rule registered for its name
   (:data:`~pointrend_jax.parity.model_rules.RULES`); a name no rule knows is a failed row.

The rules and their tolerances are documented in ``docs/parity.md`` ("Model goldens"). Results of
step 3 are cached per process by the content of the inputs, so a folder that only differs in
``expected.npz`` does not rerun the model.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pointrend_jax.data.batching import ceil_to
from pointrend_jax import postprocess
from pointrend_jax.parity.compare import Row, fail_row
from pointrend_jax.parity.fixture import (Fixture, FixtureError, check_recipe, fixture_model,
                                          load_fixture)
from pointrend_jax.parity.model_rules import Ctx, check_array

__all__ = ["check_model_folder", "compute"]


def _padded(rgb: np.ndarray, divisor: int = 32) -> tuple[np.ndarray, np.ndarray]:
  h, w = rgb.shape[:2]
  images = np.zeros((1, ceil_to(h, divisor), ceil_to(w, divisor), 3), np.uint8)
  images[0, :h, :w] = rgb
  return images, np.array([[h, w]], np.int32)


def _np(tree: Any) -> Any:
  return jax.tree.map(np.asarray, tree)


def run_instance(model: Any, fx: Fixture) -> dict[str, Any]:
  """End-to-end run + box branch on the golden proposals + mask head on the golden detections."""

  g = fx.golden
  images, sizes = _padded(fx.input_rgb, model.size_divisibility)
  orig = np.array([fx.orig_rgb.shape[:2]], np.int32)
  gprops = np.asarray(g.get("proposal_boxes", np.zeros((1, 4))), np.float32).reshape(1, -1, 4)
  gdet_boxes = np.asarray(g.get("det_boxes", np.zeros((1, 4))), np.float32).reshape(-1, 4)
  gdet_classes = np.asarray(g.get("det_classes", np.zeros((len(gdet_boxes),))), np.int32)
  graphdef, state = nnx.split(model)

  @jax.jit
  def forward(state, images, sizes, gprops, gdet_boxes, gdet_classes):
    m = nnx.merge(graphdef, state)
    out = m.predict(images, sizes, return_proposals=True, return_intermediates=True)
    feats = out["intermediates"]["features"]
    gvalid = jnp.ones(gprops.shape[:2], bool)
    pooled = m.roi_heads.pool_boxes(feats, gprops, gvalid)
    gcls, gdeltas = m.roi_heads.box_predictor(m.roi_heads.box_head(pooled))
    gcls = gcls.reshape(gprops.shape[:2] + (-1,))
    gdeltas = gdeltas.reshape(gprops.shape[:2] + (-1,))
    gdets = m.roi_heads.inference(gcls, gdeltas, gprops, gvalid, sizes)
    gmask, gmask_inter = m.mask_head.subdivision_inference(
        feats, gdet_boxes, jnp.zeros(gdet_boxes.shape[:1], jnp.int32), gdet_classes,
        return_intermediates=True)
    return dict(out=out, pooled=pooled, gcls=gcls[0], gdeltas=gdeltas[0], gdets=gdets,
                gmask=gmask, gmask_inter=gmask_inter)

  res = forward(state, images, sizes, gprops, gdet_boxes, gdet_classes)
  row = {k: np.asarray(res["out"][k][0]) for k in ("boxes", "scores", "classes", "valid")}
  row["mask_probs"] = np.asarray(jax.nn.sigmoid(res["out"]["mask_logits"][0]))
  inst, _ = postprocess.instances(row, orig[0], sizes[0],
                                  [str(c) for c in range(model.cfg.num_classes)])
  final = dict(boxes=inst.boxes, scores=inst.scores, classes=inst.classes, masks=inst.masks)
  res = _np(res)
  out = res.pop("out")
  inter = out.pop("intermediates")
  return dict(kind="instance", sizes=sizes, out=out, inter=inter,
              anchors=model.proposal_generator.anchors(images.shape[1:3]),
              rpn_features=model.proposal_generator.in_features,
              capacity_proposals=model.proposal_generator.post_nms_topk[1],
              capacity_dets=model.roi_heads.detections_per_image,
              subdivision_num_points=model.mask_head.subdivision_num_points,
              final=final, **res)


def run_semantic(model: Any, fx: Fixture) -> dict[str, Any]:
  """End-to-end run of the semantic segmentor with the head's intermediates."""

  images, sizes = _padded(fx.input_rgb, model.backbone.size_divisibility)
  resized = tuple(int(v) for v in sizes[0])
  orig = tuple(int(v) for v in fx.orig_rgb.shape[:2])
  graphdef, state = nnx.split(model)

  @jax.jit
  def forward(state, images, sizes):
    m = nnx.merge(graphdef, state)
    x = m.preprocess(images, sizes)
    bottom_up = m.backbone.bottom_up(x)
    feats = m.backbone.from_features(bottom_up)
    logits, inter = m.sem_seg_head.inference(feats, return_intermediates=True)
    return dict(input=x, features={**bottom_up, **feats}, logits=logits, inter=inter)

  res = _np(forward(state, images, sizes))
  res["sem_seg"] = postprocess.resize_bilinear(res["logits"][0, :resized[0], :resized[1]], orig)
  res["inter"].pop("upsampled")
  return dict(kind="semantic", sizes=sizes,
              subdivision_num_points=model.sem_seg_head.subdivision_num_points, **res)


_RUN_CACHE: dict[str, dict[str, Any]] = {}


def compute(fx: Fixture, log: Callable[[str], None] = lambda s: None) -> dict[str, Any]:
  """Builds the model, loads the recipe weights and runs it (cached by the inputs' content)."""
  if fx.key in _RUN_CACHE:
    log("model outputs reused from an identical fixture run")
    return _RUN_CACHE[fx.key]
  make_weights = check_recipe(fx)
  t0 = time.perf_counter()
  model = fixture_model(fx, make_weights)
  t1 = time.perf_counter()
  res = (run_semantic if fx.cfg.is_semantic else run_instance)(model, fx)
  t2 = time.perf_counter()
  log(f"weights ({fx.recipe}, seed {fx.seed}) {t1 - t0:.1f} s; model compile + run "
      f"{t2 - t1:.1f} s")
  _RUN_CACHE.clear()  # one fixture's outputs at a time (they are large)
  _RUN_CACHE[fx.key] = res
  return res


def check_model_folder(path: str, log: Callable[[str], None] = lambda s: None) -> list[Row]:
  """Runs the model of a fixture folder and compares every golden array (one row each)."""
  try:
    fx = load_fixture(path)
  except FixtureError as e:
    return [fail_row(os.path.basename(os.path.normpath(path)) or path, str(e))]
  for note in fx.notes:
    log(note)
  try:
    res = compute(fx, log)
  except FixtureError as e:
    note = str(e)
    return ([fail_row("meta.json:weights_recipe", note)]
            + [fail_row(n, "not computed (fixture refused)") for n in sorted(fx.golden)])
  c = Ctx(fx, res)
  return [check_array(name, fx.golden[name], c) for name in fx.golden]
