"""Docs and docstrings pair each detectron2 ``model_final_<hash>.pkl`` with its own config.

The released files (spec ``configs.md`` §3): an example that loads the 3x file into the 1x
config would fail (or, for same-shape models, silently report the other model's AP).
"""

from __future__ import annotations

import os
import re

from conftest import REPO_ROOT

# model_final hash -> zoo config, normalised (lower case, no "_" / "-").
RELEASED = {
    "736f5a": "r50fpn1xcoco",
    "edd263": "r50fpn3xcoco",
    "3f4d2a": "r101fpn3xcoco",
    "ba17b9": "x10132x8dfpn3xcoco",
    "115bfb": "r50fpn1xcityscapes",
    "cf6ac1": "semanticr101fpn1xcityscapes",
}
# Zoo names and detectron2 stems, normalised; "semantic_r101_fpn_cityscapes" has no "1x".
_CONFIG = re.compile(r"semanticr101fpn(?:1x)?cityscapes|x10132x8dfpn3xcoco|r101fpn3xcoco|"
                     r"r50fpn[13]xcoco|r50fpn1xcityscapes")
_HASH = re.compile(r"model_final_([0-9a-f]{6})")
_SKIP_DIRS = {".git", ".venv", "runs", "node_modules", "__pycache__"}


def _normalise(text: str) -> str:
  return re.sub(r"[_\-]", "", text.lower())


def _files():
  for root, dirs, files in os.walk(REPO_ROOT):
    dirs[:] = [d for d in dirs if d not in _SKIP_DIRS and not d.endswith(".egg-info")]
    for f in files:
      if f.endswith((".py", ".md", ".yaml", ".txt")):
        yield os.path.join(root, f)


def test_examples_pair_checkpoints_with_their_configs():
  wrong = []
  checked = 0
  for path in _files():
    with open(path, encoding="utf-8", errors="replace") as f:
      lines = f.read().splitlines()
    for i, line in enumerate(lines):
      for h in _HASH.findall(line):
        if h not in RELEASED:
          continue  # the pre-2020-11 links etc. are described, not used
        # The config named nearest before the file name, on its line or the two above.
        before = _normalise("\n".join(lines[max(0, i - 2):i] + [line[:line.find(h)]]))
        configs = _CONFIG.findall(before)
        if not configs:
          continue
        checked += 1
        config = configs[-1].replace("semanticr101fpncityscapes", "semanticr101fpn1xcityscapes")
        if config != RELEASED[h]:
          wrong.append(f"{os.path.relpath(path, REPO_ROOT)}:{i + 1}: model_final_{h} is "
                       f"{RELEASED[h]}, used with {configs[-1]}")
  assert not wrong, "\n".join(wrong)
  assert checked >= 1  # the Predictor docstring example at least


def test_predictor_docstring_example_uses_the_1x_file():
  from pointrend_jax import inference
  assert 'Predictor("r50_fpn_1x_coco", "model_final_736f5a.pkl")' in inference.__doc__
