"""Tests for pointrend_jax.checkpoint.d2_matching: manifests, names of every generation and
Caffe2 blobs matched against a model, FrozenBN legacy handling, strict reports."""

from __future__ import annotations

import json

import numpy as np
import pytest

from _d2_names import (BOTTOM_UP, CONFIGS, MANIFESTS, load_manifests, mark, marked_state, to_c2,
                       to_v0, to_v1)
from pointrend_jax.checkpoint import d2_matching, d2_reader
from pointrend_jax.errors import CheckpointError


@pytest.fixture(scope="module")
def manifests() -> dict[str, dict[str, tuple[int, ...]]]:
  return load_manifests()


@pytest.mark.parametrize("config", CONFIGS)
def test_manifest_shapes(config, manifests):
  data = json.loads((MANIFESTS / f"{config}.json").read_text())
  shapes = manifests[config]
  assert list(shapes) == [e["name"] for e in data["entries"]]
  assert len(shapes) == data["num_entries"]
  assert sum(int(np.prod(s)) for s in shapes.values()) == data["total_numel"]


@pytest.mark.parametrize("config", CONFIGS)
def test_every_manifest_name_maps(config, manifests):
  """Current, v1, v0 and DDP-prefixed names all load every entry, each from the right key."""
  shapes = manifests[config]
  for rename in (lambda n: n, to_v1, to_v0, lambda n: "module." + to_v0(n)):
    state = marked_state(shapes, rename)
    canon = d2_reader.canonicalize_names(state)
    assert list(canon) == list(shapes)
    report = d2_matching.match_state_dict(canon, shapes)  # strict
    assert report.ok and not report.filled and not report.ignored
    assert list(report.state) == list(shapes)
    assert [mark(v) for v in report.state.values()] == list(range(len(shapes)))
  if "rcnn" in config:  # the old generations really differ for the instance models
    assert sum(to_v0(n) != n for n in shapes) == 16
    assert sum(to_v1(n) != to_v0(n) for n in shapes) == 16
    assert sum(to_v1(n) != n for n in shapes) == 4


@pytest.mark.parametrize("config", CONFIGS)
def test_caffe2_imagenet_names_map_to_bottom_up(config, manifests):
  """Caffe2 blobs of the ImageNet backbone (R-50 / R-101 / X-101-32x8d) -> backbone.bottom_up.*."""
  shapes = manifests[config]
  backbone = {n: s for n, s in shapes.items() if n.startswith(BOTTOM_UP)}
  blobs = marked_state(backbone, to_c2)
  blobs["pred_w"] = np.zeros((1000, 2048), np.float32)
  blobs["pred_b"] = np.zeros((1000,), np.float32)
  canon = d2_reader.canonicalize_names(blobs, caffe2=True)
  assert all(not n.startswith("backbone.") for n in canon)  # prefixes come from matching
  report = d2_matching.match_state_dict(canon, shapes, backbone_only=True, heuristics=True)
  assert report.ok
  assert list(report.state) == list(backbone)
  assert [mark(v) for v in report.state.values()] == list(range(len(backbone)))
  assert sorted(report.ignored) == ["linear.bias", "linear.weight"]
  assert report.not_loaded == [n for n in shapes if not n.startswith(BOTTOM_UP)]
  # Without the restriction the rest of the model is missing, which strict refuses.
  with pytest.raises(CheckpointError, match="missing in checkpoint"):
    d2_matching.match_state_dict(canon, shapes, heuristics=True)


def test_caffe2_without_running_stats_fills_zero_one(manifests):
  """§4.2: FrozenBN stats absent from a version-less checkpoint are mean 0 / var 1."""
  shapes = manifests["pointrend_rcnn_R_101_FPN_3x_coco"]
  backbone = {n: s for n, s in shapes.items() if n.startswith(BOTTOM_UP)}
  blobs = {k: v for k, v in marked_state(backbone, to_c2).items()
           if not k.endswith(("_rm", "_riv"))}
  canon = d2_reader.canonicalize_names(blobs, caffe2=True)
  report = d2_matching.match_state_dict(canon, shapes, backbone_only=True, heuristics=True)
  stats = [n for n in backbone if n.endswith(("running_mean", "running_var"))]
  assert len(stats) == 2 * 104 and sorted(report.filled) == sorted(stats)
  for n in stats:
    assert report.state[n].dtype == np.float32
    assert np.all(report.state[n] == (0.0 if n.endswith("mean") else 1.0))
  assert list(report.state) == list(backbone)


def test_full_checkpoint_with_backbone_only(manifests):
  shapes = manifests["pointrend_rcnn_R_50_FPN_3x_coco"]
  report = d2_matching.match_state_dict(marked_state(shapes), shapes, backbone_only=True)
  rest = [n for n in shapes if not n.startswith(BOTTOM_UP)]
  assert report.ok and report.not_loaded == rest and sorted(report.ignored) == sorted(rest)
  assert list(report.state) == [n for n in shapes if n.startswith(BOTTOM_UP)]


def test_frozen_bn_module_versions():
  """FrozenBatchNorm2d: version < 3 stored running_var without eps; >= 3 is used as is."""
  shapes = {"res2.norm.weight": (2,), "res2.norm.bias": (2,), "res2.norm.running_mean": (2,),
            "res2.norm.running_var": (2,)}
  state = {k: np.full(s, 2.0, np.float32) for k, s in shapes.items()}
  v2 = d2_matching.match_state_dict(state, shapes, module_versions={"res2.norm": 2})
  assert v2.adjusted == ["res2.norm.running_var"]
  np.testing.assert_array_equal(v2.state["res2.norm.running_var"],
                                np.float32(2.0) - np.float32(1e-5))
  v3 = d2_matching.match_state_dict(state, shapes, module_versions={"res2.norm": 3})
  assert not v3.adjusted and np.all(v3.state["res2.norm.running_var"] == 2.0)
  partial = {k: v for k, v in state.items() if "running" not in k}
  with pytest.raises(CheckpointError, match=r"res2\.norm\.running_mean \(2,\)"):
    d2_matching.match_state_dict(partial, shapes, module_versions={"res2.norm": 3})


def test_strict_report_lists_names_with_shapes():
  expected = {"a.weight": (4, 3), "a.bias": (4,), "b.weight": (2, 2), "c.weight": (5,)}
  state = {"a.weight": np.zeros((4, 3)), "a.bias": np.zeros(3), "b.weight": np.zeros((2, 2)),
           "z.extra": np.zeros((7, 1)), "pixel_mean": np.zeros(3),
           "proposal_generator.anchor_generator.cell_anchors.0": np.zeros((3, 4))}
  with pytest.raises(CheckpointError) as e:
    d2_matching.match_state_dict(state, expected)
  msg = str(e.value)
  assert "missing in checkpoint (1):\n  c.weight (5,)" in msg
  assert "unexpected in checkpoint (1):\n  z.extra (7, 1)" in msg
  assert "a.bias: (3,) vs (4,)" in msg
  report = d2_matching.match_state_dict(state, expected, strict=False)
  assert report.missing == {"c.weight": (5,)}
  assert report.unexpected == {"z.extra": (7, 1)}
  assert report.mismatched == [d2_matching.Mismatch("a.bias", (3,), (4,))]
  assert sorted(report.ignored) == ["pixel_mean",
                                    "proposal_generator.anchor_generator.cell_anchors.0"]
  assert list(report.state) == ["a.weight", "b.weight"] and not report.ok


def test_suffix_matching_prefers_longest_and_refuses_ambiguity():
  expected = {"backbone.bottom_up.stem.conv1.weight": (1,), "x.res2.conv1.weight": (1,),
              "x.conv1.weight": (1,)}
  state = {"conv1.weight": np.zeros(1), "res2.conv1.weight": np.ones(1),
           "stem.conv1.weight": np.full(1, 2.0)}
  report = d2_matching.match_state_dict(state, expected, heuristics=True)
  assert report.sources == {"backbone.bottom_up.stem.conv1.weight": "stem.conv1.weight",
                            "x.res2.conv1.weight": "res2.conv1.weight",
                            "x.conv1.weight": "conv1.weight"}
  with pytest.raises(CheckpointError, match="matches several model entries"):
    d2_matching.match_state_dict({"conv1.weight": np.zeros(1)},
                               {"a.conv1.weight": (1,), "b.conv1.weight": (1,)},
                               heuristics=True, strict=False)
