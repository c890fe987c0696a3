"""``config.model.num_classes``, the dataset-vs-model class count check, and which errors
``launch.py`` reports as one line."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import ml_collections
import numpy as np
import pytest
from absl import flags
from ml_collections import config_flags
from PIL import Image

from conftest import REPO_ROOT
from pointrend_jax.errors import CheckpointError
from pointrend_jax.data import cityscapes, synthetic
from pointrend_jax import errors
from pointrend_jax.modeling import zoo
from pointrend_jax.data import splits
from pointrend_jax.training import train


def _flags_config(*args: str) -> ml_collections.ConfigDict:
  """The config as launch.py parses it (locked, command-line overrides applied)."""
  if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))
  argv = ["launch.py", *args]
  fv = flags.FlagValues()
  # sys_argv: the overrides are found there (default: sys.argv, pytest's).
  config_flags.DEFINE_config_file("config", None, "", flag_values=fv, lock_config=True,
                                  sys_argv=argv)
  fv(argv)
  return fv.config


def _class_counts(mcfg):
  heads = ("sem_seg_head", "point_head") if mcfg.is_semantic else ("roi_heads", "point_head")
  return {h: getattr(mcfg, h).num_classes for h in heads}


@pytest.mark.parametrize("name,default,semantic", [
    ("r50_fpn_1x_coco", 80, False), ("semantic_r101_fpn_cityscapes", 19, True),
    ("synthetic_shapes", 5, False), ("synthetic_semantic", 6, True)])
def test_num_classes_from_the_command_line(name, default, semantic):
  path = str(REPO_ROOT / "configs" / f"{name}.py")
  mcfg = zoo.model_config(_flags_config(f"--config={path}").model)
  assert mcfg.is_semantic == semantic
  assert set(_class_counts(mcfg).values()) == {default}  # 0 keeps the zoo / overrides value
  mcfg = zoo.model_config(_flags_config(f"--config={path}", "--config.model.num_classes=3").model)
  assert set(_class_counts(mcfg).values()) == {3}
  assert mcfg.num_classes == 3


def test_num_classes_wins_over_overrides_and_rejects_negative():
  config = ml_collections.ConfigDict(dict(model=dict(
      zoo="", num_classes=4, overrides=dict(num_classes=7, roi_heads=dict(num_classes=9)))))
  assert _class_counts(zoo.model_config(config.model)) == {"roi_heads": 4, "point_head": 4}
  # num_classes next to a meta architecture change goes to that architecture's heads.
  config = ml_collections.ConfigDict(dict(model=dict(
      zoo="", num_classes=0,
      overrides=dict(num_classes=7, meta_architecture="SemanticSegmentor"))))
  mcfg = zoo.model_config(config.model)
  assert mcfg.is_semantic and _class_counts(mcfg) == {"sem_seg_head": 7, "point_head": 7}
  config.model.num_classes = -1
  with pytest.raises(errors.ConfigError, match="config.model.num_classes"):
    zoo.model_config(config.model)


def _synthetic_config(tmp_path, **model):
  config = ml_collections.ConfigDict(dict(
      model=dict(zoo="", num_classes=0, overrides=dict(num_classes=5), **model),
      data=dict(train=dict(source="synthetic", split="train", root=str(tmp_path / "data")),
                val=dict(source="synthetic", split="val", root=str(tmp_path / "data")),
                synthetic=dict(num_train=2, num_val=1, image_size=(32, 32), seed=0))))
  return config


def test_synthetic_split_class_count_checked(tmp_path):
  config = _synthetic_config(tmp_path)
  split = splits.load_split(config, "train", str(tmp_path), zoo.model_config(config.model))
  assert split.class_names == synthetic.THING_CLASSES
  config.model.num_classes = 3
  with pytest.raises(errors.ConfigError) as e:
    splits.load_split(config, "val", str(tmp_path), zoo.model_config(config.model))
  msg = str(e.value)
  assert "config.data.val" in msg and str(tmp_path / "data") in msg
  assert "has 5 categories but the model has 3 classes (roi_heads.num_classes)" in msg
  assert "--config.model.num_classes=5" in msg


def test_coco_split_class_count_names_annotations_file(tmp_path):
  images = tmp_path / "images"
  images.mkdir()
  Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(images / "a.png")
  ann = tmp_path / "instances_mine.json"
  ann.write_text(json.dumps({
      "images": [{"id": 1, "file_name": "a.png", "height": 8, "width": 8}],
      "annotations": [{"id": 1, "image_id": 1, "category_id": 7, "bbox": [1, 1, 4, 4],
                       "area": 16.0, "iscrowd": 0, "segmentation": [[1, 1, 5, 1, 5, 5]]}],
      "categories": [{"id": i, "name": f"c{i}"} for i in (3, 7, 9)]}))
  config = ml_collections.ConfigDict(dict(
      model=dict(zoo="r50_fpn_1x_coco", num_classes=0, overrides={}),
      data=dict(train=dict(source="coco", split="mine", annotations=str(ann),
                           images=str(images), root="")),
  ))
  with pytest.raises(errors.ConfigError) as e:
    splits.load_split(config, "train", str(tmp_path), zoo.model_config(config.model))
  msg = str(e.value)
  assert f"config.data.train (COCO annotations {ann})" in msg
  assert "3 categories but the model has 80 classes (roi_heads.num_classes)" in msg
  assert "--config.model.num_classes=3" in msg
  config.model.num_classes = 3
  split = splits.load_split(config, "train", str(tmp_path), zoo.model_config(config.model))
  assert split.class_names == ("c3", "c7", "c9")
  assert split.records[0]["annotations"][0]["category_id"] == 1  # contiguous


def test_cityscapes_semantic_needs_19_classes():
  mcfg = zoo.zoo_config("semantic_r101_fpn_cityscapes").replace(
      **{"sem_seg_head.num_classes": 6, "point_head.num_classes": 6})
  split = splits.Split("train", "cityscapes", [], cityscapes.SEM_SEG_CLASSES)
  with pytest.raises(errors.ConfigError,
                     match=r"has 19 semantic classes \(Cityscapes train ids\) but the model has "
                           r"6 classes \(sem_seg_head.num_classes\); set "
                           r"--config.model.num_classes=19"):
    splits.check_num_classes(split, mcfg, "Cityscapes root /data/cityscapes")
  splits.check_num_classes(split, zoo.zoo_config("semantic_r101_fpn_cityscapes"))
  splits.check_num_classes(splits.Split("train", "cityscapes", [], cityscapes.THING_CLASSES),
                         zoo.zoo_config("r50_fpn_1x_cityscapes"))


def test_malformed_dataset_file_is_a_dataset_error(tmp_path):
  ann = tmp_path / "bad.json"
  ann.write_text("{not json")
  (tmp_path / "images").mkdir()
  config = ml_collections.ConfigDict(dict(
      model=dict(zoo="r50_fpn_1x_coco", num_classes=0, overrides={}),
      data=dict(val=dict(source="coco", split="val", annotations=str(ann),
                         images=str(tmp_path / "images"), root=""))))
  with pytest.raises(errors.DatasetError, match=r"bad.json is not valid JSON.*config.data.val"):
    splits.load_split(config, "val", str(tmp_path), zoo.model_config(config.model))


def test_user_errors_are_the_expected_types():
  for exc in (FileNotFoundError, errors.DataError, errors.DatasetError, errors.ConfigError,
              FloatingPointError, CheckpointError, errors.ConfigError):
    assert issubclass(exc, errors.USER_ERRORS), exc
  # Anything else (bugs) keeps its traceback.
  for exc in (ValueError, TypeError, KeyError, RuntimeError):
    assert not issubclass(exc, errors.USER_ERRORS), exc


def test_config_values_rejected_before_training(tmp_path):
  config = _flags_config(f"--config={REPO_ROOT / 'configs' / 'synthetic_shapes.py'}",
                         "--config.train.batch_size=3", "--config.train.num_replicas_d2=2")
  with pytest.raises(errors.ConfigError, match="config.train.batch_size"):
    train.train_and_evaluate(config, tmp_path / "a")
  config = _flags_config(f"--config={REPO_ROOT / 'configs' / 'synthetic_shapes.py'}",
                         "--config.train.compute_dtype=float16")
  with pytest.raises(errors.ConfigError, match="config.train.compute_dtype"):
    train.train_and_evaluate(config, tmp_path / "b")


@pytest.mark.slow
@pytest.mark.parametrize("case", ["class_mismatch", "unknown_override"])
def test_launch_reports_config_errors_in_one_line(tmp_path, case):
  """Both fail before any compilation (about a second each)."""
  extra = {"class_mismatch": ["--config.model.num_classes=3"],
           "unknown_override": ["--config.train.max_stps=3"]}[case]
  res = subprocess.run(
      [sys.executable, "launch.py", "--config=configs/synthetic_shapes.py",
       f"--workdir={tmp_path}", "--config.data.synthetic.num_train=2",
       "--config.data.synthetic.num_val=1", "--config.data.synthetic.image_size=(32, 32)",
       *extra],
      cwd=REPO_ROOT, capture_output=True, text=True, timeout=300,
      env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert res.returncode == 2, res.stderr[-3000:]
  assert "Traceback" not in res.stderr
  errors = [l for l in res.stderr.splitlines() if l.startswith("launch.py: error: ")]
  assert len(errors) == 1, res.stderr[-3000:]
  if case == "class_mismatch":
    assert "has 5 categories but the model has 3 classes" in errors[0]
    assert "--config.model.num_classes=5" in errors[0]
  else:
    assert "max_stps" in errors[0] and "max_steps" in errors[0]
  assert not pathlib.Path(tmp_path, "checkpoints").exists()
