"""Tests of ``pointrend_jax.ops.anchors`` against detectron2's anchors of the r50 fixture."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import PARITY_DIR
from pointrend_jax.ops import anchors as A

R50 = PARITY_DIR / "r50_fpn_1x_coco" / "expected.npz"


@pytest.fixture(scope="module")
def expected():
  # CI has ../shared beside the checkout: a missing golden is a failure.
  assert R50.is_file(), f"detectron2 goldens not found at {R50}"
  with np.load(R50) as data:
    return {k: data[k] for k in data.files if k.startswith("anchors_") or k == "input_shape"}


def test_fpn_anchors_match_detectron2_bitwise(expected):
  padded_hw = tuple(int(v) for v in expected["input_shape"][2:])  # (800, 1216)
  levels = A.fpn_anchors(padded_hw)
  assert len(levels) == 5
  for lvl, anchors in zip(range(2, 7), levels):
    assert anchors.dtype == np.float32
    assert anchors.shape == (int(expected[f"anchors_p{lvl}_count"]), 4)
    np.testing.assert_array_equal(anchors[:12], expected[f"anchors_p{lvl}_first12"])
  np.testing.assert_array_equal(levels[4], expected["anchors_p6"])


def test_cell_anchors_and_layout():
  cells = A.cell_anchors((32,), (0.5, 1.0, 2.0))
  np.testing.assert_allclose(cells[1], [-16, -16, 16, 16])
  np.testing.assert_allclose(cells[0], [-22.627417, -11.313708, 22.627417, 11.313708], rtol=1e-7)
  grid = A.grid_anchors((2, 3), 8, cells)
  assert grid.shape == (2 * 3 * 3, 4)
  # Index ((y * W) + x) * A + a: location (y=1, x=2), cell anchor 1.
  np.testing.assert_array_equal(grid[(1 * 3 + 2) * 3 + 1], [16 - 16, 8 - 16, 16 + 16, 8 + 16])
  half = A.grid_anchors((1, 1), 8, cells, offset=0.5)
  np.testing.assert_array_equal(half[1], [-12, -12, 20, 20])


def test_level_sizes_are_ceil_of_stride():
  assert A.level_hw((800, 1216), 64) == (13, 19)
  assert A.level_hw((64, 96), 4) == (16, 24)
  assert [a.shape[0] for a in A.fpn_anchors((64, 96))] == [16 * 24 * 3, 8 * 12 * 3, 4 * 6 * 3,
                                                            2 * 3 * 3, 1 * 2 * 3]
