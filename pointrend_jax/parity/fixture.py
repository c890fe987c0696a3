"""A detectron2 model fixture folder: its config, goldens, images and weights recipe.

A folder (``shared/fixtures/detectron2_parity/<name>/``) holds ``config.yaml`` (detectron2
``cfg.dump()``), ``meta.json`` (``seed``, ``weights_recipe``), ``image.png`` (the original
photo), optionally ``model_input.png`` (the resized network input, instance models) and
``expected.npz`` (the goldens); ``make_weights.py`` in the parent folder implements the recipe.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import json
import os
import warnings
from typing import Any

import numpy as np
from PIL import Image

from pointrend_jax.checkpoint.d2_model import d2_model_names, load_d2_model
from pointrend_jax.data.transforms import resize_image, resize_shortest_edge_size
from pointrend_jax.errors import ConfigError
from pointrend_jax.modeling.meta_arch import abstract_model
from pointrend_jax.modeling.zoo import from_detectron2_yaml

__all__ = ["SUPPORTED_RECIPES", "Fixture", "FixtureError", "check_recipe", "fixture_model",
           "load_fixture"]

# Weights recipes (``meta.json`` ``weights_recipe``) this module knows how to call.
SUPPORTED_RECIPES = ("d2-parity-v2",)


class FixtureError(Exception):
  """A fixture folder cannot be used (missing file, unsupported recipe, bad config)."""


@dataclasses.dataclass
class Fixture:
  cfg: Any  # ModelConfig
  golden: dict[str, np.ndarray]
  orig_rgb: np.ndarray  # [H0, W0, 3] uint8
  input_rgb: np.ndarray  # [h, w, 3] uint8, resized network input
  seed: int
  recipe: str
  make_weights_path: str
  key: str  # content hash of everything the model run depends on
  notes: list[str] = dataclasses.field(default_factory=list)  # config warnings


def _sha(h: Any, path: str) -> None:
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
      h.update(chunk)


def _read_rgb(path: str) -> np.ndarray:
  with Image.open(path) as im:
    return np.asarray(im.convert("RGB"))


def load_fixture(path: str) -> Fixture:
  """Reads a fixture folder (config, meta, goldens, images); raises :class:`FixtureError`."""

  files = {n: os.path.join(path, n) for n in ("config.yaml", "meta.json", "expected.npz",
                                                "image.png")}
  for name, p in files.items():
    if not os.path.isfile(p):
      raise FixtureError(f"{path}: missing {name}")
  make_weights_path = os.path.join(os.path.dirname(os.path.abspath(path)), "make_weights.py")
  if not os.path.isfile(make_weights_path):
    raise FixtureError(f"{path}: no weights recipe at {make_weights_path}")
  try:
    with open(files["meta.json"], encoding="utf-8") as f:
      meta = json.load(f)
  except (OSError, ValueError) as e:
    raise FixtureError(f"{files['meta.json']}: {e}") from e
  try:
    with warnings.catch_warnings(record=True) as caught:
      warnings.simplefilter("always")
      cfg = from_detectron2_yaml(files["config.yaml"])
  except (ConfigError, OSError) as e:
    raise FixtureError(f"{files['config.yaml']}: {' '.join(str(e).split())}") from e
  notes = [str(w.message) for w in caught]
  try:
    with np.load(files["expected.npz"], allow_pickle=False) as f:
      golden = {k: f[k] for k in f.files}
  except Exception as e:  # any unreadable npz is a fixture problem, reported in one line
    raise FixtureError(f"{files['expected.npz']}: cannot read ({type(e).__name__}: {e})") from e
  orig = _read_rgb(files["image.png"])
  model_input = os.path.join(path, "model_input.png")
  h = hashlib.sha256()
  for p in (files["config.yaml"], files["image.png"], make_weights_path):
    _sha(h, p)
  if not cfg.is_semantic and os.path.isfile(model_input):
    rgb = _read_rgb(model_input)
    _sha(h, model_input)
  else:
    size = resize_shortest_edge_size(orig.shape[0], orig.shape[1], cfg.input.min_size_test,
                                     cfg.input.max_size_test)
    rgb = resize_image(orig, size)
  seed = meta.get("seed")
  recipe = meta.get("weights_recipe")
  h.update(json.dumps([seed, recipe]).encode())
  return Fixture(cfg=cfg, golden=golden, orig_rgb=orig, input_rgb=rgb, seed=seed, recipe=recipe,
                 make_weights_path=make_weights_path, key=h.hexdigest(), notes=notes)


def check_recipe(fx: Fixture):
  """Imports the fixture's recipe module and checks it is the one meta.json names."""
  if fx.recipe not in SUPPORTED_RECIPES:
    raise FixtureError(f"meta.json weights_recipe {fx.recipe!r} is not supported (supported: "
                       f"{', '.join(SUPPORTED_RECIPES)})")
  if not isinstance(fx.seed, int) or isinstance(fx.seed, bool):
    raise FixtureError(f"meta.json seed must be an integer, got {fx.seed!r}")
  spec = importlib.util.spec_from_file_location("d2_parity_make_weights", fx.make_weights_path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  version = getattr(module, "RECIPE_VERSION", None)
  if version != fx.recipe:
    raise FixtureError(f"{fx.make_weights_path} implements recipe {version!r}, meta.json "
                       f"names {fx.recipe!r}")
  if not callable(getattr(module, "make_param", None)):
    raise FixtureError(f"{fx.make_weights_path} has no make_param(name, shape, dtype, seed, "
                       "pixel_std)")
  return module


def fixture_model(fx: Fixture, make_weights: Any):
  """The fixture's model: built abstractly, every variable loaded from the recipe (strict)."""
  model = abstract_model(fx.cfg)
  state = {name: make_weights.make_param(name, shape, "float32", fx.seed,
                                         tuple(fx.cfg.pixel_std))
           for name, shape in d2_model_names(model).items()}
  load_d2_model(model, state, strict=True)
  return model
