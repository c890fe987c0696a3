"""How each golden array of a model fixture is compared: one rule per name pattern.

A rule takes ``(name, match, expected, ctx)`` and returns a :class:`~pointrend_jax.parity.
compare.Row`; :data:`RULES` lists them with the docs of ``docs/parity.md`` ("Model goldens"),
which also explains the tolerances below. :class:`Ctx` holds one run's outputs and derived values
(set matches, top-k flip analysis) computed once per fixture.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Callable
from typing import Any

import numpy as np

from pointrend_jax.data.batching import unpack_masks
from pointrend_jax.ops.poolers import assign_boxes_to_levels
from pointrend_jax.parity.compare import (MIN_AGREEMENT, TIE_TOL, MATCH_IOU, Row, SetMatch,
                                          agreement_row, box_iou, close_row, exact_row, fail_row,
                                          matched_row, mostly_close_row, nchw, set_match)
from pointrend_jax.parity.fixture import Fixture

__all__ = ["Ctx", "RULES", "check_array", "known_name"]

DENSE = dict(atol=1e-3, rtol=1e-3)       # feature maps, head outputs
SUMMARY = dict(atol=1e-3, rtol=1e-4)     # float64 [mean, std, min, max, sum|x|] of a map
INPUT_TOL = dict(atol=1e-6, rtol=1e-9)   # normalized input (exact up to float64 summation)
BOX_TOL = dict(atol=1e-2, rtol=1e-5)     # matched boxes, pixels
SCORE_TOL = dict(atol=1e-4, rtol=0.0)    # matched scores / objectness logits
FOLLOW_ON_FLIPS = 0.01                   # flips allowed after an earlier flip, fraction of k


def _summary(a: np.ndarray) -> np.ndarray:
  a = np.asarray(a, np.float64)
  return np.array([a.mean(), a.std(), a.min(), a.max(), np.abs(a).sum()])


class Ctx:
  """The outputs of one run, the golden arrays, and derived values computed on demand."""

  def __init__(self, fx: Fixture, res: dict[str, Any]):
    self.fx = fx
    self.g = fx.golden
    self.res = res
    self.kind = res["kind"]
    self._memo: dict[str, Any] = {}

  def memo(self, key: str, fn: Callable[[], Any]) -> Any:
    if key not in self._memo:
      self._memo[key] = fn()
    return self._memo[key]

  def need(self, kind: str, *names: str) -> None:
    """Skips the rule unless a ``kind`` model made the run and the goldens hold ``names``."""
    if self.kind != kind:
      raise _Skip(f"not produced by {'an' if self.kind == 'instance' else 'a'} {self.kind} model")
    missing = [n for n in names if n not in self.g]
    if missing:
      raise _Skip(f"needs golden {', '.join(missing)}")

  # ---- views ----
  def input_nchw(self) -> np.ndarray:
    x = self.res["inter"]["input"] if self.kind == "instance" else self.res["input"]
    return nchw(x)

  def maps(self) -> dict[str, np.ndarray]:
    if self.kind == "instance":
      m = dict(self.res["inter"]["features"])
    else:
      m = dict(self.res["features"])
      m["semseg_fpn_sum"] = self.res["inter"]["fused_features"]
    return m


class _Skip(Exception):
  """A rule cannot compute its array (reported as a failed row with the reason)."""


# Rules. Each takes (name, match, expected, ctx) and returns a Row.

Rule = Callable[[str, re.Match, np.ndarray, Ctx], Row]
RULES: list[tuple[re.Pattern, Rule, str]] = []


def rule(pattern: str, doc: str):
  def register(fn: Rule) -> Rule:
    RULES.append((re.compile(pattern), fn, doc))
    return fn
  return register


# ---- sizes and input -----------------------------------------------------------------------------


@rule(r"image_hw|resized_hw|input_shape",
      "original image (height, width), resized network input (h, w), padded NCHW input shape: "
      "exact")
def _sizes(name, mt, e, c):
  sizes = {"image_hw": np.array(c.fx.orig_rgb.shape[:2]), "resized_hw": c.res["sizes"][0],
           "input_shape": np.array(c.input_nchw().shape)}
  return exact_row(name, e, sizes[name])


@rule(r"input_(summary|valid_summary|crop_tl|crop_pad_edge|row_sums|col_sums)",
      "normalized input views: allclose atol 1e-6 rtol 1e-9")
def _input_views(name, mt, e, c):
  x = c.input_nchw()
  h, w = (int(v) for v in c.res["sizes"][0])
  views = {
      "summary": lambda: _summary(x),
      "valid_summary": lambda: _summary(x[:, :, :h, :w]),
      "crop_tl": lambda: x[:, :, :8, :8],
      # rows from mid-height, columns straddling the right edge
      "crop_pad_edge": lambda: x[:, :, h // 2:h // 2 + 4, w - 4:w + 4],
      "row_sums": lambda: x.astype(np.float64).sum(axis=(0, 1, 3)),
      "col_sums": lambda: x.astype(np.float64).sum(axis=(0, 1, 2))}
  return close_row(name, e, views[mt.group(1)](), **INPUT_TOL)


# ---- feature maps --------------------------------------------------------------------------------


@rule(r"(res[2-5]|p[2-6]|semseg_fpn_sum)_(shape|crop_tl|crop_center|crop_br|chan_mean|summary)",
      "feature-map views (NCHW crops of channels 0..15): shape exact, dense allclose 1e-3, "
      "summary atol 1e-3 rtol 1e-4")
def _map_views(name, mt, e, c):
  maps = c.maps()
  key, what = mt.group(1), mt.group(2)
  if key not in maps:
    raise _Skip(f"{key} is not produced by this model")
  a = maps[key]
  h, w = a.shape[1:3]
  if what == "shape":
    return exact_row(name, e, np.array([a.shape[0], a.shape[3], h, w]))
  if what == "summary":
    return close_row(name, e, _summary(a), **SUMMARY)
  if what == "chan_mean":
    return close_row(name, e, a.astype(np.float64).mean(axis=(0, 1, 2)), **DENSE)
  crop = {"crop_tl": a[:, :8, :8],
          "crop_center": a[:, h // 2 - 4:h // 2 + 4, w // 2 - 4:w // 2 + 4],
          "crop_br": a[:, -8:, -8:]}[what]
  return close_row(name, e, nchw(crop[..., :16]), **DENSE)


# ---- RPN and anchors -----------------------------------------------------------------------------


def _rpn_level(c: Ctx, level: str) -> int:
  c.need("instance")
  feats = list(c.res["rpn_features"])
  if level not in feats:
    raise _Skip(f"{level} is not an RPN level of this model")
  return feats.index(level)


def _rpn_nchw(c: Ctx, which: str, i: int) -> np.ndarray:
  flat = c.res["inter"][which][i]
  level = c.res["rpn_features"][i]
  h, w = c.maps()[level].shape[1:3]
  return nchw(flat.reshape(1, h, w, -1))


@rule(r"rpn_logits_(p[2-6])", "full objectness logits (A, H, W): allclose 1e-3")
def _rpn_logits(name, mt, e, c):
  return close_row(name, e, _rpn_nchw(c, "rpn_logits", _rpn_level(c, mt.group(1))), **DENSE)


@rule(r"rpn_deltas_(p[2-6])(_shape|_crop_tl|_summary)?",
      "anchor deltas (4A, H, W): full map / crop allclose 1e-3, shape exact, summary rtol 1e-4")
def _rpn_deltas(name, mt, e, c):
  d = _rpn_nchw(c, "rpn_deltas", _rpn_level(c, mt.group(1)))
  what = mt.group(2)
  if what == "_shape":
    return exact_row(name, e, np.array(d.shape))
  if what == "_summary":
    return close_row(name, e, _summary(d), **SUMMARY)
  if what == "_crop_tl":
    return close_row(name, e, d[:, :, :8, :8], **DENSE)
  return close_row(name, e, d, **DENSE)


@rule(r"anchors_(p[2-6])(_first12|_count)?",
      "anchors of a level (xyxy, resized pixels): allclose atol 1e-4, count exact")
def _anchors(name, mt, e, c):
  a = c.res["anchors"][_rpn_level(c, mt.group(1))]
  what = mt.group(2)
  if what == "_count":
    return exact_row(name, e, np.array(len(a)))
  if what == "_first12":
    a = a[:12]
  return close_row(name, e, a, atol=1e-4, rtol=0.0)


# ---- proposals -----------------------------------------------------------------------------------


def _proposal_match(c: Ctx) -> tuple[SetMatch, dict[str, np.ndarray]]:
  c.need("instance", "proposal_boxes", "proposal_logits")

  def fn():
    p = c.res["inter"]["proposals"]
    valid = p.valid[0]
    ours = dict(boxes=p.boxes[0][valid], logits=p.logits[0][valid])
    sm = set_match(c.g["proposal_boxes"], c.g["proposal_logits"], ours["boxes"], ours["logits"],
                   c.res["capacity_proposals"])
    return sm, ours
  return c.memo("proposals", fn)


def _level_of(boxes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """FPN pooler level (float32, as detectron2) and the float64 distance to a level boundary."""
  levels = np.asarray(assign_boxes_to_levels(np.asarray(boxes, np.float32)))
  b = np.asarray(boxes, np.float64)
  t = 4 + np.log2(np.sqrt(np.maximum((b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1]), 0)) / 224 + 1e-8)
  return levels, np.abs(t - np.round(t))


@rule(r"proposal_levels",
      "ROIAlign level of each matched proposal: exact, except boxes within 1e-4 of a level "
      "boundary")
def _proposal_levels(name, mt, e, c):
  sm, ours = _proposal_match(c)
  ours, _ = _level_of(ours["boxes"])
  _, border = _level_of(c.g["proposal_boxes"])
  ours = ours[np.maximum(sm.j, 0)]
  diff = sm.m & (ours != e)
  allowed = diff & (border < 1e-4)
  bad = int((diff & ~allowed).sum())
  note = "; ".join(x for x in (sm.note, f"{int(sm.m.sum())} matched",
                               f"{int(allowed.sum())} boundary flips" if allowed.any() else "",
                               f"{bad} differing" if bad else "") if x)
  return Row(name, float(bad), float(bad), "exact", sm.ok and bad == 0, note)


# ---- box branch on the golden proposals ----------------------------------------------------------


@rule(r"box_(pooled_first4|pooled_summary|cls_logits|deltas)",
      "ROIAlignV2 features of the golden proposals (first rows allclose 1e-3, summary rtol 1e-4) "
      "and the box head outputs on them (allclose 1e-3)")
def _box_branch(name, mt, e, c):
  c.need("instance", "proposal_boxes")
  what = mt.group(1)
  if what == "pooled_summary":
    return close_row(name, e, _summary(nchw(c.res["pooled"])), **SUMMARY)
  if what == "pooled_first4":
    return close_row(name, e, nchw(c.res["pooled"])[:len(e)], **DENSE)
  return close_row(name, e, c.res["gcls" if what == "cls_logits" else "gdeltas"], **DENSE)


# ---- detections ----------------------------------------------------------------------------------


def _det_match(c: Ctx) -> tuple[SetMatch, dict[str, np.ndarray]]:
  c.need("instance", "det_boxes", "det_scores", "det_classes")

  def fn():
    o = c.res["out"]
    valid = o["valid"][0]
    ours = dict(boxes=o["boxes"][0][valid], scores=o["scores"][0][valid],
                classes=o["classes"][0][valid],
                proposal_index=c.res["inter"]["proposal_index"][0][valid])
    sm = set_match(c.g["det_boxes"], c.g["det_scores"], ours["boxes"], ours["scores"],
                   c.res["capacity_dets"], c.g["det_classes"], ours["classes"])
    return sm, ours
  return c.memo("dets", fn)


@rule(r"det_proposal_index",
      "proposal of each detection: exact on the golden-proposal run, and end to end our "
      "proposal of each matched detection is detectron2's (IoU > 0.99)")
def _det_proposal_index(name, mt, e, c):
  sm, ours = _det_match(c)
  c.need("instance", "proposal_boxes")
  gd = c.res["gdets"]
  gvalid = gd.valid[0]
  sm_g = set_match(c.g["det_boxes"], c.g["det_scores"], gd.boxes[0][gvalid],
                   gd.scores[0][gvalid], c.res["capacity_dets"], c.g["det_classes"],
                   gd.classes[0][gvalid])
  idx_g = gd.proposal_index[0][gvalid]
  exact_bad = int(np.sum(idx_g[sm_g.j[sm_g.m]] != e[sm_g.m]))
  props = c.res["inter"]["proposals"].boxes[0]
  ours_props = props[ours["proposal_index"][sm.j[sm.m]]]
  gprops = c.g["proposal_boxes"][e[sm.m]]
  e2e_bad = int(np.sum(np.diag(box_iou(ours_props, gprops)) <= MATCH_IOU)) if sm.m.any() else 0
  ok = sm.ok and sm_g.ok and exact_bad == 0 and e2e_bad == 0
  note = (f"golden proposals: {exact_bad} differing of {int(sm_g.m.sum())}; end to end: "
          f"{e2e_bad} different proposals of {int(sm.m.sum())}")
  for extra in (sm_g.note, sm.note):
    if extra:
      note += f"; {extra}"
  return Row(name, float(exact_bad + e2e_bad), float(exact_bad + e2e_bad), "exact / IoU", ok,
             note)


# ---- mask head on the golden detections ----------------------------------------------------------


def _mask_inter(c: Ctx) -> dict[str, Any]:
  c.need("instance", "det_boxes", "det_classes")
  return c.res["gmask_inter"]


@rule(r"coarse_mask_logits_(det_class|top\d+_all_classes)|point_init_logits_det_class",
      "coarse head and step-0 point-head logits on the regular grid (golden detections): "
      "allclose 1e-3")
def _mask_head_start(name, mt, e, c):
  inter = _mask_inter(c)
  if name == "point_init_logits_det_class":
    return close_row(name, e, inter["init_logits"], **DENSE)
  if mt.group(1) == "det_class":
    return close_row(name, e, inter["coarse_logits_class"], **DENSE)
  return close_row(name, e, nchw(inter["coarse_logits"][:len(e)]), **DENSE)


def _flip_analysis(c: Ctx) -> dict[int, dict[str, Any]]:
  """Per subdivision step: rows whose top-k sets differ and whether every difference is
  explained (a near-tie of the cut, or a bounded follow-on of an earlier flip in that row)."""

  def fn():
    out: dict[int, dict[str, Any]] = {}
    instance = c.kind == "instance"
    inter = c.res["gmask_inter" if instance else "inter"]
    ours_idx = inter["indices"]
    steps = len(ours_idx)
    key = "step{}_indices_top5" if instance else "step{}_indices"
    if instance:
      # uncertainty = -|logit of the class| of the upsampled map (larger = more uncertain).
      unc = [-np.abs(u) for u in inter["upsampled"]]
      golden_unc = {s: -np.abs(c.g[f"step{s}_upsampled_top5"]) for s in range(1, steps + 1)
                    if f"step{s}_upsampled_top5" in c.g}
    else:
      unc, golden_unc = list(inter["uncertainty"]), {}
    k = c.res["subdivision_num_points"]
    flipped_before = None
    for s in range(1, steps + 1):
      name = key.format(s)
      if name not in c.g:
        break
      ref = c.g[name]
      ours = ours_idx[s - 1][:len(ref)]
      rows = len(ref)
      if flipped_before is None:
        flipped_before = np.zeros(rows, bool)
      umap = golden_unc.get(s, unc[s - 1][:rows])
      flipped = np.zeros(rows, bool)
      counts, problems = [], []
      for r in range(rows):
        differ = np.setxor1d(ours[r], ref[r])
        n = len(differ) // 2
        counts.append(n)
        if not n:
          continue
        flipped[r] = True
        flat = umap[r].ravel()
        kth = np.sort(flat)[-min(k, flat.size)]
        near = np.abs(flat[differ] - kth) <= TIE_TOL
        if near.all():
          continue
        if flipped_before[r] and n <= max(1, FOLLOW_ON_FLIPS * k):
          continue
        problems.append(f"row {r}: {n} cells differ, not near-ties")
      out[s] = dict(flipped_before=flipped_before.copy(), flipped=flipped, counts=counts,
                    problems=problems)
      flipped_before = flipped_before | flipped
    out[0] = dict(flipped_ever=flipped_before)
    return out
  return c.memo("flips", fn)


def _step_info(c: Ctx, s: int) -> dict[str, Any]:
  info = _flip_analysis(c)
  if s not in info:
    raise _Skip(f"needs the golden step{s} indices (and steps before)")
  return info[s]


@rule(r"step(\d+)_indices(_top\d+)?",
      "subdivision top-k cells as sets per row; differing cells must be near-ties of the cut "
      "(within 1e-4) or a bounded follow-on (<= 1% of k) of an earlier flip in that row")
def _step_indices(name, mt, e, c):
  s = int(mt.group(1))
  c.need("instance" if mt.group(2) else "semantic")
  info = _step_info(c, s)
  n = sum(info["counts"])
  note = f"{n} cells not shared" if n else ""
  if info["problems"]:
    note = "; ".join([note] + info["problems"][:3])
  return Row(name, float(n), float(n), "set (near-ties)", not info["problems"], note)


@rule(r"step(\d+)_point_logits(_top\d+)?",
      "point-head logits at the cells both sides selected: allclose 1e-3")
def _step_point_logits(name, mt, e, c):
  s, top = int(mt.group(1)), mt.group(2) or ""
  c.need("instance" if top else "semantic", f"step{s}_indices{top}")
  ref_idx = c.g[f"step{s}_indices{top}"]
  inter = c.res["gmask_inter" if top else "inter"]
  ours_idx, ours_val = inter["indices"][s - 1], inter["point_logits"][s - 1]  # [N, K, C]
  expected_rows = e if top else np.transpose(e, (0, 2, 1))  # semantic goldens: [N, C, K]
  a_all, e_all, shared = [], [], 0
  for r in range(len(ref_idx)):
    _, ours_at, ref_at = np.intersect1d(ours_idx[r], ref_idx[r], return_indices=True)
    a_all.append(ours_val[r][ours_at])
    e_all.append(expected_rows[r][ref_at])
    shared += len(ref_at)
  return close_row(name, np.concatenate(e_all), np.concatenate(a_all), **DENSE,
                note=f"{shared} of {ref_idx.size} cells shared")


@rule(r"step(\d+)_(upsampled_top\d+|uncertainty_sub4)",
      "the maps the points are chosen on (x2-upsampled logits before the scatter; semantic: "
      "uncertainty at [2::4, 2::4]): allclose 1e-3; after a top-k flip by agreement (instance "
      "rows without a flip: allclose)")
def _step_map(name, mt, e, c):
  s, semantic = int(mt.group(1)), mt.group(2) == "uncertainty_sub4"
  if semantic:
    c.need("semantic")
  maps = c.res["inter"]["uncertainty"] if semantic else _mask_inter(c)["upsampled"]
  if s > len(maps):
    raise _Skip(f"the model has only {len(maps)} subdivision steps")
  a = maps[s - 1][:, None, 2::4, 2::4] if semantic else maps[s - 1][:len(e)]
  if s > 1:
    info = _step_info(c, s - 1)
    before = info["flipped_before"] | info["flipped"]
    if before.any():
      return mostly_close_row(name, e, a, **DENSE, strict_rows=None if semantic else ~before)
  return close_row(name, e, a, **DENSE)


@rule(r"point_mask_logits_(top\d+|det_class_sub8)",
      "final 224x224 logits (golden detections): allclose 1e-3 on rows without a top-k flip, "
      ">= 99.9% within tolerance overall")
def _point_mask(name, mt, e, c):
  c.need("instance", "det_boxes", "det_classes")
  mask = c.res["gmask"]
  if mt.group(1) == "det_class_sub8":
    return mostly_close_row(name, e, mask[:, 4::8, 4::8], **DENSE)
  flipped = _flip_analysis(c)[0]["flipped_ever"]  # None when the fixture has no step indices
  strict = None if flipped is None else ~flipped
  return mostly_close_row(name, e, mask[:len(e)], **DENSE, strict_rows=strict)


# ---- final instances -----------------------------------------------------------------------------


def _final_match(c: Ctx) -> tuple[SetMatch, dict[str, np.ndarray]]:
  c.need("instance", "final_boxes", "final_scores", "final_classes")

  def fn():
    f = c.res["final"]
    sm = set_match(c.g["final_boxes"], c.g["final_scores"], f["boxes"], f["scores"],
                   c.res["capacity_dets"], c.g["final_classes"], f["classes"])
    return sm, f
  return c.memo("final", fn)


@rule(r"proposal_(boxes|logits)|(det|final)_(boxes|scores|classes)",
      "RPN proposals, end-to-end detections and postprocessed instances (original size) as sets "
      "matched by IoU > 0.99 (and class; unmatched only as near-ties of the cut): boxes atol "
      "1e-2 px, logits / scores atol 1e-4, classes exact")
def _set_matched(name, mt, e, c):
  stage, what = name.split("_", 1)
  sm, ours = {"proposal": _proposal_match, "det": _det_match, "final": _final_match}[stage](c)
  e, a = e[sm.m], ours[what][sm.j[sm.m]]
  if what == "classes":
    return matched_row(exact_row(name, e, a), sm)
  return matched_row(close_row(name, e, a, **(BOX_TOL if what == "boxes" else SCORE_TOL)), sm)


@rule(r"final_masks_shape", "(instances, height, width): exact")
def _final_masks_shape(name, mt, e, c):
  c.need("instance")
  return exact_row(name, e, np.array(c.res["final"]["masks"].shape))


@rule(r"final_masks_packed",
      "pasted masks of the matched instances: >= 99.9% equal pixels, and per mask at most 1% "
      "of its union + 2 pixels differing")
def _final_masks(name, mt, e, c):
  sm, f = _final_match(c)
  gm = unpack_masks(e, int(c.fx.orig_rgb.shape[1]))
  ours = f["masks"]
  if gm.shape[1:] != ours.shape[1:]:
    return fail_row(name, f"mask size {ours.shape[1:]} != golden {gm.shape[1:]}")
  a, b = gm[sm.m], ours[sm.j[sm.m]]
  diff = (a != b).reshape(len(a), -1).sum(axis=1)
  union = (a | b).reshape(len(a), -1).sum(axis=1)
  frac_equal = 1.0 - diff.sum() / max(a.size, 1)
  worst = float(np.max(diff / np.maximum(union, 1))) if len(a) else 0.0
  per_mask_ok = bool(np.all(diff <= 0.01 * union + 2))
  ok = sm.ok and frac_equal >= MIN_AGREEMENT and per_mask_ok
  note = (f"{int(diff.sum())} differing pixels over {int(sm.m.sum())} matched masks; worst "
          f"{worst:.3%} of a union")
  if sm.note:
    note += f"; {sm.note}"
  return Row(name, float(diff.sum()), worst, f">={MIN_AGREEMENT:.1%}, <=1%+2px/mask",
             ok, note)


@rule(r"final_mask_areas",
      "pixel count of the matched masks: within 1% + 2 px")
def _final_mask_areas(name, mt, e, c):
  sm, f = _final_match(c)
  ours = f["masks"].reshape(len(f["masks"]), -1).sum(axis=1)
  row = close_row(name, e[sm.m], ours[sm.j[sm.m]], atol=2.0, rtol=0.01,
               note=f"{int(sm.m.sum())} matched")
  return dataclasses.replace(row, passed=row.passed and sm.ok)


# ---- semantic head -------------------------------------------------------------------------------


@rule(r"coarse_logits", "SemSegFPNHead coarse logits (C, H/4, W/4): allclose 1e-3")
def _coarse_logits(name, mt, e, c):
  c.need("semantic")
  return close_row(name, e, nchw(c.res["inter"]["coarse_logits"]), **DENSE)


@rule(r"(head_logits|sem_seg)_(shape|sub8)|"
      r"sem_seg_(summary|crop_windows|crop\d+|argmax|class_hist)",
      "padded head output (1, C, H, W) and final sem_seg (C, H0, W0): shape exact; sub8 "
      "([4::8, 4::8]) / crops >= 99.9% within 1e-3; summary atol 1e-3 rtol 1e-4; argmax >= 99.9% "
      "equal; class histogram within 0.1% of the pixels; crop windows are inputs (checked to lie "
      "inside)")
def _sem_seg(name, mt, e, c):
  c.need("semantic")
  if mt.group(1) == "head_logits":
    s = nchw(c.res["logits"])
  else:
    s = np.transpose(c.res["sem_seg"], (2, 0, 1))
  what = mt.group(2) or mt.group(3)
  if what == "shape":
    return exact_row(name, e, np.array(s.shape))
  if what == "sub8":
    return mostly_close_row(name, e, s[..., 4::8, 4::8], **DENSE)
  if what == "summary":
    return close_row(name, e, _summary(s), **SUMMARY)
  if what == "crop_windows":
    crops = [c.g[k] for k in sorted(c.g) if re.fullmatch(r"sem_seg_crop\d+", k)]
    hw = crops[0].shape[1:] if crops else (0, 0)
    inside = all(0 <= y and 0 <= x and y + hw[0] <= s.shape[1] and x + hw[1] <= s.shape[2]
                 for y, x in np.asarray(e).reshape(-1, 2))
    return Row(name, 0.0, 0.0, "input", bool(inside),
               "window positions of sem_seg_crop*" if inside else "a window lies outside")
  if what.startswith("crop"):
    c.need("semantic", "sem_seg_crop_windows")
    i = int(what[4:])
    y, x = (int(v) for v in c.g["sem_seg_crop_windows"][i])
    return mostly_close_row(name, e, s[:, y:y + e.shape[1], x:x + e.shape[2]], **DENSE)
  argmax = np.argmax(s, axis=0)
  if what == "argmax":
    return agreement_row(name, e, argmax.astype(e.dtype))
  hist = np.bincount(argmax.ravel(), minlength=s.shape[0])
  if hist.shape != e.shape:
    return fail_row(name, f"shape {hist.shape} != expected {e.shape}")
  l1 = int(np.abs(hist - e).sum())
  return Row(name, float(l1), l1 / argmax.size, "sum|diff| <= 0.1% of pixels",
             l1 <= 1e-3 * argmax.size, f"{l1} pixels moved" if l1 else "")


def known_name(name: str) -> bool:
  return any(p.fullmatch(name) for p, _, _ in RULES)


def check_array(name: str, expected: np.ndarray, c: Ctx) -> Row:
  """The row of one golden array, by the first rule whose pattern matches its name."""
  for pattern, fn, _ in RULES:
    mt = pattern.fullmatch(name)
    if mt:
      try:
        return fn(name, mt, expected, c)
      except _Skip as e:
        return fail_row(name, str(e))
      except Exception as e:  # a broken rule is a failed row, not a crashed report
        if os.environ.get("D2_PARITY_DEBUG"):
          raise
        return fail_row(name, " ".join(f"{type(e).__name__}: {e}".split())[:200])
  return fail_row(name, "no check knows this array")
