"""StableHLO artifacts of a model, and :class:`ExportedPredictor`, which runs them with jax only.

An artifact directory (``docs/export.md``) holds:

* ``pointrend.json``: what a runtime needs (format and versions, model kind, class names, input
  layout, resize rule, buckets, thresholds, output shapes);
* ``weights.npz``: the model's variables ``w0000, w0001, ...`` (the programs' first argument,
  in that order);
* ``predict_<B>x<H>x<W>.jax``: per bucket, one serialized :func:`jax.export.export` of the
  predict program for every platform asked for (``cpu``, ``cuda``, ``tpu``): ``(weights,
  images [B, H, W, 3] uint8, image_sizes [B, 2] int32) -> predictions``.

:func:`write_artifacts` writes them from a :class:`~pointrend_jax.inference.Predictor`;
:class:`ExportedPredictor` reads them. This module imports neither flax nor the model code:
a server needs jax, numpy, pillow and pycocotools (for RLE), and this package for the host
steps it shares with :class:`~pointrend_jax.inference.Predictor` (image reading, resizing,
padding, postprocessing).
"""

from __future__ import annotations

import datetime
import json
import os
import pathlib
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

from pointrend_jax import __version__
from pointrend_jax.image_predictor import ImagePredictor

__all__ = ["FORMAT", "FORMAT_VERSION", "ExportedPredictor", "write_artifacts"]

FORMAT = "pointrend-jax-stablehlo"
# Bumped when a reader of the previous version could misread a new artifact.
FORMAT_VERSION = 1
METADATA = "pointrend.json"
WEIGHTS = "weights.npz"


def _program_file(batch: int, height: int, width: int) -> str:
  return f"predict_{batch}x{height}x{width}.jax"


def write_artifacts(predictor: Any, output: str | os.PathLike[str], *,
                    platforms: Sequence[str] = ("cpu", "cuda", "tpu"),
                    buckets: Sequence[tuple[int, int]] | None = None,
                    model_name: str = "", compute_dtype: str = "float32",
                    log=print) -> pathlib.Path:
  """Writes the StableHLO artifacts of ``predictor``'s model (its dtype, class names, batch
  size, thresholds and resize rule).

  Args:
    predictor: a :class:`~pointrend_jax.inference.Predictor`.
    output: the directory (created; existing artifact files are replaced).
    platforms: lowering platforms, all in each program.
    buckets: ``(H, W)`` canvases; default: the predictor's buckets.
    model_name, compute_dtype: recorded in the metadata (the predictor's model computes in
      ``compute_dtype``).
  """
  if buckets is None:
    if isinstance(predictor.buckets, str):
      raise ValueError("buckets='exact' has no fixed canvases: pass buckets to export")
    buckets = predictor.buckets
  buckets = [(int(h), int(w)) for h, w in buckets]
  cfg, program, bs = predictor.cfg, predictor.program, predictor.batch_size
  out = pathlib.Path(os.fspath(output)).expanduser()
  out.mkdir(parents=True, exist_ok=True)
  weights = [np.asarray(w) for w in jax.device_get(program.weights())]
  np.savez(out / WEIGHTS, **{f"w{i:04d}": w for i, w in enumerate(weights)})
  entries = []
  for h, w in buckets:
    exported = program.export(bs, h, w, platforms=tuple(platforms))
    (out / _program_file(bs, h, w)).write_bytes(exported.serialize())
    avals = jax.tree.unflatten(exported.out_tree, exported.out_avals)
    entries.append({"batch": bs, "height": h, "width": w, "file": _program_file(bs, h, w),
                    "outputs": {k: {"shape": list(a.shape), "dtype": str(a.dtype)}
                                for k, a in avals.items()}})
    log(f"exported {bs}x{h}x{w} for {', '.join(platforms)}")
  meta = {
      "format": FORMAT, "format_version": FORMAT_VERSION,
      "versions": {"pointrend_jax": __version__, "jax": jax.__version__,
                   "jax_export_calling_convention": exported.calling_convention_version},
      "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
      "model": model_name, "kind": "semantic" if cfg.is_semantic else "instance",
      "compute_dtype": compute_dtype, "platforms": list(platforms),
      "class_names": list(predictor.class_names),
      "input": {"images": "uint8 [B, H, W, 3] RGB, each image top-left on a zero canvas",
                "image_sizes": "int32 [B, 2] (h, w) of each resized image; blank slots: (H, W)",
                "pixels": f"normalised inside the program: channels in {cfg.input.format} order, "
                          f"(x - {list(cfg.pixel_mean)}) / {list(cfg.pixel_std)}"},
      "resize": {"rule": "ResizeShortestEdge", "min_size_test": cfg.input.min_size_test,
                 "max_size_test": cfg.input.max_size_test, "interpolation": "PIL bilinear",
                 "size_divisibility": cfg.size_divisibility},
      "score_threshold": predictor.score_threshold, "mask_threshold": predictor.mask_threshold,
      "weights": WEIGHTS, "programs": entries,
  }
  (out / METADATA).write_text(json.dumps(meta, indent=1) + "\n", encoding="utf-8")
  return out


class _ExportedProgram:
  """The deserialized programs of one artifact directory, called as a PredictProgram is."""

  def __init__(self, directory: pathlib.Path, entries: list[dict], weights: list[jax.Array]):
    self._dir, self._weights = directory, weights
    self._files = {(e["batch"], e["height"], e["width"]): e["file"] for e in entries}
    self._calls: dict[tuple[int, int, int], Any] = {}
    self.compile_seconds: dict[tuple[int, int, int], float] = {}

  def __call__(self, images: np.ndarray, image_sizes: np.ndarray) -> dict[str, jax.Array]:
    key = tuple(int(v) for v in images.shape[:3])
    if key not in self._calls:
      if key not in self._files:
        raise ValueError(f"no exported program for batch {key[0]} at {key[1]}x{key[2]} in "
                         f"{self._dir}; exported: {sorted(self._files)}")
      exported = jax.export.deserialize(bytearray((self._dir / self._files[key]).read_bytes()))
      self._calls[key] = jax.jit(exported.call)
      self.compile_seconds[key] = 0.0
    return self._calls[key](self._weights, images, image_sizes)


class ExportedPredictor(ImagePredictor):
  """:class:`~pointrend_jax.inference.Predictor`'s calls and results from StableHLO artifacts.

  Args:
    directory: written by :func:`write_artifacts` (``python -m pointrend_jax.tools.export
      --format stablehlo``).
    score_threshold, mask_threshold: default: the values stored at export.

  Images are read, resized and padded as :class:`~pointrend_jax.inference.Predictor` does; an
  image whose resized size fits none of the exported buckets raises ``ValueError`` (a new
  canvas needs a new export).
  """

  def __init__(self, directory: str | os.PathLike[str], *, score_threshold: float | None = None,
               mask_threshold: float | None = None):
    path = pathlib.Path(os.fspath(directory)).expanduser()
    try:
      meta = json.loads((path / METADATA).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
      raise ValueError(f"{path / METADATA}: not a readable artifact description ({e})") from e
    if meta.get("format") != FORMAT or int(meta.get("format_version", 0)) > FORMAT_VERSION:
      raise ValueError(f"{path}: format {meta.get('format')!r} version "
                       f"{meta.get('format_version')} is not {FORMAT!r} <= {FORMAT_VERSION}; "
                       "update pointrend_jax or re-export")
    self.metadata = meta
    with np.load(path / meta["weights"]) as npz:
      weights = [jax.device_put(npz[f"w{i:04d}"]) for i in range(len(npz.files))]
    entries = meta["programs"]
    batch = {e["batch"] for e in entries}
    if len(batch) != 1:
      raise ValueError(f"{path}: programs of several batch sizes {sorted(batch)}")
    resize = meta["resize"]
    super().__init__(
        class_names=meta["class_names"], is_semantic=meta["kind"] == "semantic",
        min_size_test=resize["min_size_test"], max_size_test=resize["max_size_test"],
        divisor=resize["size_divisibility"],
        buckets=[(e["height"], e["width"]) for e in entries], exact_fallback=False,
        batch_size=batch.pop(),
        score_threshold=meta["score_threshold"] if score_threshold is None else score_threshold,
        mask_threshold=meta["mask_threshold"] if mask_threshold is None else mask_threshold)
    self.program = _ExportedProgram(path, entries, weights)
