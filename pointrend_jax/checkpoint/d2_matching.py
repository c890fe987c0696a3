"""Matches a checkpoint's names and shapes against a model's, as detectron2 does but strictly.

:func:`match_state_dict` maps checkpoint entries onto a model's expected ``{name: shape}`` the
way ``DetectionCheckpointer`` does (exact names, or the suffix heuristic of
``shared/spec/checkpoint_format.md`` §4.2), but reports every missing, unexpected and
mis-shaped entry instead of logging it.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Iterable, Mapping, NamedTuple, Sequence

import numpy as np

from pointrend_jax.checkpoint.d2_reader import Detectron2Checkpoint
from pointrend_jax.errors import CheckpointError

__all__ = ["MatchReport", "Mismatch", "match_state_dict"]

# FrozenBatchNorm2d.eps in detectron2; version-<3 files stored running_var without it.
_FROZEN_BN_EPS = 1e-5


class Mismatch(NamedTuple):
  """A checkpoint entry whose shape differs from the model's (it is not loaded)."""

  name: str
  got: tuple[int, ...]
  expected: tuple[int, ...]


def _shape_str(shape: Sequence[int]) -> str:
  return "(" + ", ".join(str(int(s)) for s in shape) + ("," if len(shape) == 1 else "") + ")"


@dataclasses.dataclass
class MatchReport:
  """How a checkpoint's entries map onto a model's expected names and shapes.

  Attributes:
    state: model name -> array for everything that loads (matched entries and filled FrozenBN
      statistics); arrays keep the checkpoint's dtype (torch's ``copy_`` would cast them).
    sources: model name -> checkpoint name it came from (differs under suffix matching).
    missing: model name -> expected shape, for in-scope entries with no checkpoint value.
    unexpected: checkpoint name -> shape, for entries that match no model name.
    mismatched: entries whose shapes differ (model name, checkpoint shape, model shape).
    filled: FrozenBN ``running_mean`` / ``running_var`` absent from a version-less checkpoint,
      set to 0 / 1 as detectron2's ``FrozenBatchNorm2d._load_from_state_dict`` does.
    adjusted: FrozenBN ``running_var`` of module version 1 or 2 (pre-2020 ``.pth``), minus eps.
    ignored: checkpoint names deliberately not used: known extras (``pixel_mean``,
      ``pixel_std``, ``anchor_generator.cell_anchors.*``, the ImageNet classifier ``linear.*``
      when ``backbone_only``) and entries of model parts outside the scope.
    not_loaded: expected names outside the scope (``backbone_only``); they keep their init.
  """

  state: dict[str, np.ndarray]
  sources: dict[str, str]
  missing: dict[str, tuple[int, ...]]
  unexpected: dict[str, tuple[int, ...]]
  mismatched: list[Mismatch]
  filled: list[str]
  adjusted: list[str]
  ignored: list[str]
  not_loaded: list[str]

  @property
  def ok(self) -> bool:
    return not (self.missing or self.unexpected or self.mismatched)

  def format(self, limit: int | None = None) -> str:
    """A readable multi-line summary listing the problems by name with shapes."""
    lines = [f"loaded {len(self.state)} entries: {len(self.missing)} missing, "
             f"{len(self.unexpected)} unexpected, {len(self.mismatched)} shape mismatches, "
             f"{len(self.filled)} FrozenBN stats filled, {len(self.ignored)} ignored, "
             f"{len(self.not_loaded)} outside scope"]

    def section(title: str, rows: list[str]) -> None:
      if rows:
        lines.append(f"{title} ({len(rows)}):")
        shown = rows if limit is None else rows[:limit]
        lines.extend("  " + r for r in shown)
        if len(shown) < len(rows):
          lines.append(f"  ... {len(rows) - len(shown)} more")

    section("missing in checkpoint",
            [f"{n} {_shape_str(s)}" for n, s in self.missing.items()])
    section("unexpected in checkpoint",
            [f"{n} {_shape_str(s)}" for n, s in self.unexpected.items()])
    section("shape mismatch (checkpoint vs model)",
            [f"{m.name}: {_shape_str(m.got)} vs {_shape_str(m.expected)}"
             for m in self.mismatched])
    return "\n".join(lines)


_IGNORED_EXTRAS = re.compile(r"^(pixel_mean|pixel_std)$|anchor_generator\.cell_anchors")
_IMAGENET_CLASSIFIER = re.compile(r"^linear\.(weight|bias)$")
_BACKBONE_PREFIX = "backbone.bottom_up."


def _suffix_match(model_keys: Sequence[str], ckpt_keys: Iterable[str]) -> dict[str, str]:
  """§4.2: model key -> longest checkpoint key equal to it or a dot-bounded suffix of it."""
  ckpt = set(ckpt_keys)
  out = {}
  for key in model_keys:
    parts = key.split(".")
    for i in range(len(parts)):  # longest first
      cand = ".".join(parts[i:])
      if cand in ckpt:
        out[key] = cand
        break
  return out


def _frozen_bn_modules(expected: Mapping[str, Any]) -> list[str]:
  return [n[: -len("running_mean")] for n in expected
          if n.endswith(".running_mean") and n[: -len("running_mean")] + "running_var" in expected]


def match_state_dict(
    state: Mapping[str, np.ndarray] | Detectron2Checkpoint,
    expected: Mapping[str, Sequence[int]],
    strict: bool = True,
    backbone_only: bool = False,
    *,
    heuristics: bool | None = None,
    module_versions: Mapping[str, int] | None = None,
) -> MatchReport:
  """Matches checkpoint entries to a model's expected ``{name: shape}``.

  Args:
    state: canonical names -> arrays, or a :class:`Detectron2Checkpoint` (then ``heuristics``
      and ``module_versions`` default to the checkpoint's).
    expected: the model's state-dict names and shapes
      (:func:`~pointrend_jax.checkpoint.d2_model.d2_model_names`).
    strict: raise :class:`CheckpointError` unless every in-scope name is found exactly once
      with its shape and no checkpoint entry is left over (known extras excepted).
    backbone_only: ImageNet initialization: only ``backbone.bottom_up.*`` is in scope; the rest
      is reported in ``not_loaded``.
    heuristics: detectron2's suffix matching (§4.2) instead of exact names. Default: the
      checkpoint's ``matching_heuristics`` (on for Caffe2 files), for a plain mapping
      ``backbone_only``. (An exact name is always the longest suffix, so turning it on only adds
      matches.)
    module_versions: ``{module: version}`` from the state dict's ``_metadata`` (``None``: no
      metadata, as in every ``.pkl``), which drives FrozenBN's legacy conversions.

  Raises:
    CheckpointError: with ``strict``, if anything is missing, unexpected or mis-shaped (the
      message lists them by name with shapes); always, if one checkpoint entry would load into
      two model entries under suffix matching.
  """
  if isinstance(state, Detectron2Checkpoint):
    if heuristics is None:
      heuristics = state.matching_heuristics
    if module_versions is None:
      module_versions = state.metadata.get("module_versions")
    state = state.state
  heuristics = backbone_only if heuristics is None else bool(heuristics)
  expected = {k: tuple(int(s) for s in v) for k, v in expected.items()}
  in_scope = {k: v for k, v in expected.items()
              if not backbone_only or k.startswith(_BACKBONE_PREFIX)}
  not_loaded = [k for k in expected if k not in in_scope]

  if heuristics:
    pairs = _suffix_match(list(expected), state)
  else:
    pairs = {k: k for k in expected if k in state}

  report = MatchReport(state={}, sources={}, missing={}, unexpected={}, mismatched=[],
                       filled=[], adjusted=[], ignored=[], not_loaded=not_loaded)
  # detectron2 drops mis-shaped pairs first, then refuses a checkpoint entry claimed twice.
  claimed: dict[str, list[str]] = {}
  for model_key, ckpt_key in pairs.items():
    got = tuple(state[ckpt_key].shape)
    if got != expected[model_key]:
      if model_key in in_scope:
        report.mismatched.append(Mismatch(model_key, got, expected[model_key]))
      continue
    claimed.setdefault(ckpt_key, []).append(model_key)
  for ckpt_key, model_keys in claimed.items():
    if len(model_keys) > 1:
      raise CheckpointError(f"checkpoint entry {ckpt_key} matches several model entries: "
                            + ", ".join(model_keys))
  loaded = {m[0]: c for c, m in claimed.items()}
  mismatched_ckpt = {pairs[m.name] for m in report.mismatched}
  for k, v in state.items():
    if k in claimed:
      if claimed[k][0] not in in_scope:
        report.ignored.append(k)
    elif k in mismatched_ckpt:
      continue
    elif _IGNORED_EXTRAS.search(k) or (backbone_only and _IMAGENET_CLASSIFIER.match(k)):
      report.ignored.append(k)
    else:
      report.unexpected[k] = tuple(v.shape)

  values = {m: state[c] for m, c in loaded.items() if m in in_scope}
  _frozen_bn_legacy(values, report, in_scope, module_versions)
  mismatched_names = {m.name for m in report.mismatched}
  for k, shape in in_scope.items():  # expected order
    if k in values:
      report.state[k] = values[k]
      if k in loaded:
        report.sources[k] = loaded[k]
    elif k not in mismatched_names:
      report.missing[k] = shape
  if strict and not report.ok:
    raise CheckpointError("checkpoint does not match the model:\n" + report.format())
  return report


def _frozen_bn_legacy(values: dict[str, np.ndarray], report: MatchReport,
                      in_scope: Mapping[str, tuple[int, ...]],
                      module_versions: Mapping[str, int] | None) -> None:
  """FrozenBatchNorm2d._load_from_state_dict: fill stats (version < 2), eps shift (< 3)."""
  mismatched = {m.name for m in report.mismatched}
  for prefix in _frozen_bn_modules(in_scope):
    version = None if module_versions is None else module_versions.get(prefix[:-1])
    mean, var = prefix + "running_mean", prefix + "running_var"
    if version is None or version < 2:
      for name, fill in ((mean, 0.0), (var, 1.0)):
        if name not in values and name not in mismatched:
          values[name] = np.full(in_scope[name], fill, np.float32)
          report.filled.append(name)
    if version is not None and version < 3 and var in values:
      # Before version 3, running_var was used without + eps.
      v = values[var]
      values[var] = v - v.dtype.type(_FROZEN_BN_EPS)
      report.adjusted.append(var)
