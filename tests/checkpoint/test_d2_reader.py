"""Tests for pointrend_jax.checkpoint.d2_reader and .safe_pickle: files, containers, refusals.

No torch: ``torch.save`` files (zip and legacy) and Python-2 style Caffe2 pickles are written by
hand below, opcode for opcode what torch / Detectron write (the writers were checked once against
real torch 2.13: torch.load reads their files, and the reader agrees with torch.load on files
torch wrote). The state-dict manifests and the weights recipe are read from the shared folder
(``<repo>/../shared``).
"""

from __future__ import annotations

import collections
import importlib.util
import io
import os
import pathlib
import pickle
import re
import struct
import zipfile
from typing import Any

import numpy as np
import pytest

from _d2_names import BOTTOM_UP, MANIFESTS, SHARED, load_manifests, to_c2
from pointrend_jax.checkpoint import d2_matching, d2_reader
from pointrend_jax.errors import CheckpointError, UnsafeCheckpointError

_MAKE_WEIGHTS = SHARED / "fixtures" / "detectron2_parity" / "make_weights.py"


@pytest.fixture(scope="module")
def manifests() -> dict[str, dict[str, tuple[int, ...]]]:
  return load_manifests()


# ---------------------------------------------------------------------------------------------
# Hand-written pickles: torch.save (zip, legacy) and Python 2 / Detectron style.
# ---------------------------------------------------------------------------------------------


class Global:
  """Pickles as ``GLOBAL module name`` without importing the module (e.g. torch)."""

  def __init__(self, module: str, name: str):
    self.module, self.name = module, name

  def __call__(self, *args):  # pickle's save_reduce wants a callable
    raise AssertionError("never called")

  def __reduce__(self):
    return self.name  # -> Pickler.save_global(self, name)


class HandPickler(pickle._Pickler):  # pylint: disable=protected-access
  """The pure-Python pickler, writing Global as GLOBAL and Storage as torch persistent ids."""

  legacy = False  # torch legacy format: 6-tuple ids with a view slot

  def save_global(self, obj, name=None):
    if isinstance(obj, Global):
      self.write(pickle.GLOBAL + f"{obj.module}\n{obj.name}\n".encode("ascii"))
      self.memoize(obj)
      return
    super().save_global(obj, name)

  def persistent_id(self, obj):
    if isinstance(obj, Storage):
      pid = ("storage", Global("torch", obj.type_name), obj.key, "cpu", obj.data.size)
      return pid + (None,) if self.legacy else pid
    return None


class Py2Pickler(HandPickler):
  """Writes str and bytes as Python 2 ``str`` (BINSTRING), as Detectron's pickles have them."""

  dispatch = dict(HandPickler.dispatch)

  def _save_py2_str(self, obj):
    data = obj if isinstance(obj, bytes) else obj.encode("latin1")
    if len(data) < 256:
      self.write(pickle.SHORT_BINSTRING + bytes([len(data)]) + data)
    else:
      self.write(pickle.BINSTRING + struct.pack("<i", len(data)) + data)
    self.memoize(obj)

  dispatch[str] = _save_py2_str
  dispatch[bytes] = _save_py2_str


class Py2Array:
  """A numpy array as numpy 1.x / Python 2 pickles it (_reconstruct + BUILD with raw bytes)."""

  def __init__(self, a: np.ndarray):
    self.a = np.ascontiguousarray(a)

  def __reduce__(self):
    dt = (Global("numpy", "dtype"), (self.a.dtype.str[1:], 0, 1),
          (3, "<", None, None, None, -1, -1, 0))
    return (Global("numpy.core.multiarray", "_reconstruct"),
            (Global("numpy", "ndarray"), (0,), b"b"),
            (1, self.a.shape, Reduced(*dt), False, self.a.tobytes()))


class Reduced:
  def __init__(self, *rv):
    self.rv = rv

  def __reduce__(self):
    return self.rv


class Storage:
  _TYPES = {"float32": "FloatStorage", "float16": "HalfStorage", "int64": "LongStorage",
            "float64": "DoubleStorage"}

  def __init__(self, key: str, data: np.ndarray):
    self.key, self.data = key, np.ascontiguousarray(data).reshape(-1)
    self.type_name = self._TYPES[self.data.dtype.name]


class Tensor:
  """A torch tensor view (offset, size, stride in elements) on a Storage."""

  def __init__(self, storage: Storage, offset: int, size, stride=None, param=False):
    if stride is None:
      stride = [int(np.prod(size[i + 1:])) for i in range(len(size))]
    self.storage, self.offset, self.size, self.stride = storage, offset, size, stride
    self.param = param

  def __reduce__(self):
    t = (Global("torch._utils", "_rebuild_tensor_v2"),
         (self.storage, self.offset, tuple(self.size), tuple(self.stride), False,
          collections.OrderedDict()))
    if self.param:
      return (Global("torch._utils", "_rebuild_parameter"),
              (Reduced(*t), True, collections.OrderedDict()))
    return t

  def numpy(self) -> np.ndarray:
    a = self.storage.data
    return np.lib.stride_tricks.as_strided(
        a[self.offset:], self.size, [s * a.itemsize for s in self.stride]).copy()


def _storages(obj: Any, out: dict[str, Storage]) -> dict[str, Storage]:
  if isinstance(obj, Storage):
    out[obj.key] = obj
  elif isinstance(obj, Tensor):
    _storages(obj.storage, out)
  elif isinstance(obj, dict):
    for v in obj.values():
      _storages(v, out)
  elif isinstance(obj, (list, tuple)):
    for v in obj:
      _storages(v, out)
  return out


def write_torch_zip(path, obj, byteorder: str = "little", prefix: str = "archive") -> None:
  buf = io.BytesIO()
  HandPickler(buf, protocol=2).dump(obj)
  with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
    z.writestr(f"{prefix}/data.pkl", buf.getvalue())
    z.writestr(f"{prefix}/byteorder", byteorder)
    for key, st in sorted(_storages(obj, {}).items()):
      data = st.data.astype(st.data.dtype.newbyteorder(">" if byteorder == "big" else "<"))
      z.writestr(f"{prefix}/data/{key}", data.tobytes())
    z.writestr(f"{prefix}/version", "3\n")


def write_torch_legacy(file, obj) -> None:
  """torch < 1.6 format (``_use_new_zipfile_serialization=False``), to a path or a file."""
  if not hasattr(file, "write"):
    with open(file, "wb") as f:
      write_torch_legacy(f, obj)
    return
  pickle.dump(0x1950A86A20F9469CFC6C, file, protocol=2)
  pickle.dump(1001, file, protocol=2)
  pickle.dump({"protocol_version": 1001, "little_endian": True,
               "type_sizes": {"short": 2, "int": 4, "long": 4}}, file, protocol=2)
  p = HandPickler(file, protocol=2)
  p.legacy = True
  p.dump(obj)
  storages = _storages(obj, {})
  keys = sorted(storages)
  pickle.dump(keys, file, protocol=2)
  for key in keys:
    file.write(struct.pack("<q", storages[key].data.size))
    file.write(storages[key].data.tobytes())


class EmbeddedStorage:
  """A storage as plain pickle.dump(tensor) writes it: a nested legacy torch.save in bytes."""

  def __init__(self, storage: Storage):
    self.storage = storage

  def __reduce__(self):
    buf = io.BytesIO()
    write_torch_legacy(buf, self.storage)
    return (Global("torch.storage", "_load_from_bytes"), (buf.getvalue(),))


def _training_checkpoint() -> tuple[dict, dict[str, np.ndarray]]:
  """A detectron2-style training checkpoint with awkward tensors, and the expected arrays."""
  rng = np.random.default_rng(0)
  shared = Storage("0", rng.standard_normal(40).astype(np.float32))
  half = Storage("1", rng.standard_normal(12).astype(np.float16))
  longs = Storage("2", np.arange(-3, 7, dtype=np.int64))
  dbl = Storage("3", rng.standard_normal(5))
  momentum = Storage("4", np.ones(6, np.float32))
  model = collections.OrderedDict()
  # Transposed view (non-contiguous), a window into the same storage, a strided 3-d view.
  model["module.backbone.w_t"] = Tensor(shared, 4, [3, 5], [1, 3])
  model["module.backbone.window"] = Tensor(shared, 20, [6])
  model["module.backbone.strided"] = Tensor(shared, 1, [2, 2, 3], [12, 5, 2])
  model["module.roi_heads.mask_coarse_head.coarse_mask_fc1.weight"] = Tensor(half, 0, [3, 4])
  model["module.roi_heads.mask_point_head.fc1.bias"] = Tensor(half, 9, [2], param=True)
  model["module.steps"] = Tensor(longs, 0, [2, 5])
  model["module.scalar"] = Tensor(longs, 9, [])
  model["module.f64"] = Tensor(dbl, 0, [5])
  model["module.empty"] = Tensor(shared, 0, [0, 4])
  model._metadata = collections.OrderedDict(  # pylint: disable=protected-access
      [("", {"version": 1}), ("module.backbone", {"version": 2})])
  trainer = {"iteration": 4999, "hooks": {"LRScheduler": {"base_lrs": [0.02],
                                                          "last_epoch": 4999}},
             "optimizer": {"state": {0: {"momentum_buffer": Tensor(momentum, 0, [6])}},
                           "param_groups": [{"lr": 0.02, "momentum": 0.9, "params": [0]}]}}
  obj = {"model": model, "trainer": trainer, "iteration": 4999}
  names = {"module.roi_heads.mask_coarse_head.coarse_mask_fc1.weight":
           "roi_heads.mask_head.coarse_head.fc1.weight",
           "module.roi_heads.mask_point_head.fc1.bias": "roi_heads.mask_head.point_head.fc1.bias"}
  expected = {names.get(k, k[len("module."):]): v.numpy() for k, v in model.items()}
  return obj, expected


# ---------------------------------------------------------------------------------------------
# Names
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("blob,converted", [
    ("conv1_w", "stem.conv1.weight"),
    ("res_conv1_bn_s", "stem.conv1.norm.weight"),
    ("res_conv1_bn_b", "stem.conv1.norm.bias"),
    ("res_conv1_bn_rm", "stem.conv1.norm.running_mean"),
    ("res_conv1_bn_riv", "stem.conv1.norm.running_var"),
    ("res2_0_branch1_w", "res2.0.shortcut.weight"),
    ("res2_0_branch1_bn_s", "res2.0.shortcut.norm.weight"),
    ("res2_0_branch2a_w", "res2.0.conv1.weight"),
    ("res2_0_branch2b_w", "res2.0.conv2.weight"),
    ("res5_2_branch2c_bn_b", "res5.2.conv3.norm.bias"),
    ("res4_22_branch2b_bn_running_var", "res4.22.conv2.norm.running_var"),
    ("res3_1_branch2a_bn_gamma", "res3.1.conv1.norm.weight"),
    ("pred_w", "linear.weight"),
    ("pred_b", "linear.bias"),
])
def test_convert_c2_names_spec_table(blob, converted):
  assert d2_reader.convert_c2_names([blob]) == [converted]


def test_canonicalize_refuses_colliding_generations():
  state = {"roi_heads.mask_head.coarse_head.fc1.weight": np.zeros(1),
           "roi_heads.mask_coarse_head.coarse_mask_fc1.weight": np.zeros(1)}
  with pytest.raises(CheckpointError, match="collide"):
    d2_reader.canonicalize_names(state)


def test_module_prefix_only_stripped_when_on_every_key():
  state = {"module.a": np.zeros(1), "b": np.zeros(1)}
  assert list(d2_reader.canonicalize_names(state)) == ["module.a", "b"]


# ---------------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def make_weights():
  spec = importlib.util.spec_from_file_location("make_weights", _MAKE_WEIGHTS)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_model_zoo_pkl_round_trip_is_bit_exact(tmp_path, make_weights, manifests):
  config = "pointrend_rcnn_R_50_FPN_1x_coco"
  weights = make_weights.state_dict_from_manifest(str(MANIFESTS / f"{config}.json"), seed=0)
  path = tmp_path / "model_final.pkl"
  make_weights.write_pkl(weights, str(path), seed=0)
  ckpt = d2_reader.load_detectron2_file(path)
  assert ckpt.format == "d2-model-zoo" and not ckpt.matching_heuristics
  assert ckpt.metadata["author"].startswith("make_weights.py")
  assert list(ckpt.state) == list(weights)
  for name, want in weights.items():
    got = ckpt.state[name]
    assert got.dtype == np.float32 and got.shape == want.shape
    assert got.tobytes() == want.tobytes(), name
  assert make_weights.checksum(ckpt.state) == make_weights.checksum(weights)
  report = d2_matching.match_state_dict(ckpt, manifests[config])
  assert report.ok and not report.filled and len(report.state) == 311


def _write_py2_pickle(path, obj) -> None:
  with open(path, "wb") as f:
    Py2Pickler(f, protocol=2).dump(obj)


@pytest.mark.parametrize("container", ["plain", "blobs", "d2-normalised"])
def test_caffe2_pkl_file(tmp_path, manifests, container):
  """A Detectron-style ImageNet pickle (Python 2 strings, numpy 1.x globals)."""
  shapes = manifests["pointrend_rcnn_R_50_FPN_1x_coco"]
  wanted = [n for n in shapes if n.startswith((BOTTOM_UP + "stem.", BOTTOM_UP + "res2.0."))]
  rng = np.random.default_rng(1)
  arrays = {to_c2(n): rng.standard_normal(shapes[n]).astype(np.float32) for n in wanted}
  blobs = {k: Py2Array(v) for k, v in arrays.items()}
  blobs["conv1_w_momentum"] = Py2Array(np.zeros(3, np.float32))
  blobs["pred_w"] = Py2Array(np.zeros((1000, 2048), np.float32))
  obj = {"plain": blobs, "blobs": {"blobs": blobs, "cfg": "MODEL: {}"},
         # detectron2's own form of a Caffe2 pickle: its names are converted all the same.
         "d2-normalised": {"model": blobs, "__author__": "Caffe2",
                           "matching_heuristics": True}}[container]
  path = tmp_path / "R-50.pkl"
  _write_py2_pickle(path, obj)
  ckpt = d2_reader.load_detectron2_file(path)
  assert ckpt.format == "caffe2" and ckpt.matching_heuristics
  assert ckpt.metadata["dropped"] == ["conv1_w_momentum"]
  assert ckpt.metadata["renamed"]["stem.conv1.weight"] == "conv1_w"
  report = d2_matching.match_state_dict(ckpt, shapes, strict=False, backbone_only=True)
  assert report.ignored == ["linear.weight"] and not report.unexpected
  for name in wanted:
    np.testing.assert_array_equal(report.state[name], arrays[to_c2(name)])
    assert report.sources[name] == name[len(BOTTOM_UP):]
  # FrozenBN stats of the absent blocks are filled (version-less file), the rest is missing.
  absent = {n for n in shapes if n.startswith(BOTTOM_UP)} - set(wanted)
  assert set(report.filled) == {n for n in absent if ".running_" in n}
  assert set(report.missing) == {n for n in absent if ".running_" not in n}


def test_torch_zip_pth(tmp_path):
  obj, expected = _training_checkpoint()
  path = tmp_path / "model_0004999.pth"
  write_torch_zip(path, obj)
  ckpt = d2_reader.load_detectron2_file(path)
  assert ckpt.format == "pth-training"
  assert ckpt.metadata["container"] == "torch-zip"
  assert ckpt.metadata["iteration"] == 4999
  assert ckpt.metadata["module_versions"] == {"": 1, "backbone": 2}  # "module." stripped
  assert ckpt.metadata["renamed"]["roi_heads.mask_head.point_head.fc1.bias"] == (
      "module.roi_heads.mask_point_head.fc1.bias")
  assert list(ckpt.state) == list(expected)
  for name, want in expected.items():
    got = ckpt.state[name]
    assert got.dtype == want.dtype and got.shape == want.shape, name
    assert got.flags.c_contiguous and got.flags.owndata
    np.testing.assert_array_equal(got, want)
  assert ckpt.state["backbone.w_t"].dtype == np.float32
  assert ckpt.state["roi_heads.mask_head.coarse_head.fc1.weight"].dtype == np.float16
  assert ckpt.state["steps"].dtype == np.int64 and ckpt.state["scalar"].shape == ()
  # Three views of one storage, read with their own offsets and strides.
  shared = obj["model"]["module.backbone.window"].storage.data
  np.testing.assert_array_equal(ckpt.state["backbone.window"], shared[20:26])
  np.testing.assert_array_equal(ckpt.state["backbone.w_t"], shared[4:19].reshape(5, 3).T)
  assert ckpt.state["backbone.strided"][1, 1, 2] == shared[1 + 12 + 5 + 4]


def test_torch_zip_big_endian_and_heuristics_query(tmp_path):
  data = np.arange(6, dtype=np.float32) - 2.5
  obj = {"res2.0.conv1.weight": Tensor(Storage("0", data), 0, [2, 3])}
  path = tmp_path / "weights.pth"
  write_torch_zip(path, obj, byteorder="big", prefix="weights")
  ckpt = d2_reader.load_detectron2_file(f"{path}?matching_heuristics=True")
  assert ckpt.format == "pth-state-dict" and ckpt.matching_heuristics
  np.testing.assert_array_equal(ckpt.state["res2.0.conv1.weight"], data.reshape(2, 3))
  report = d2_matching.match_state_dict(
      ckpt, {"backbone.bottom_up.res2.0.conv1.weight": (2, 3)})
  assert report.sources == {"backbone.bottom_up.res2.0.conv1.weight": "res2.0.conv1.weight"}
  assert not d2_reader.load_detectron2_file(path).matching_heuristics


def test_torch_legacy_pth(tmp_path):
  obj, expected = _training_checkpoint()
  path = tmp_path / "model_final.pth"
  write_torch_legacy(path, obj)
  ckpt = d2_reader.load_detectron2_file(path)
  assert ckpt.format == "pth-training" and ckpt.metadata["container"] == "torch-legacy"
  for name, want in expected.items():
    assert ckpt.state[name].dtype == want.dtype
    np.testing.assert_array_equal(ckpt.state[name], want)


@pytest.mark.parametrize("protocol", [2, 3, 4, 5])
def test_numpy_pickle_protocols(tmp_path, protocol):
  """numpy's own pickling: _reconstruct (+ _codecs.encode at protocol 2), _frombuffer (5)."""
  rng = np.random.default_rng(protocol)
  model = {"f32": rng.standard_normal((3, 4)).astype(np.float32),
           "fortran": np.asfortranarray(rng.standard_normal((2, 5))),
           "f16": rng.standard_normal(7).astype(np.float16),
           "i64": np.arange(-4, 4), "bool": np.array([True, False]),
           "scalar": np.float32(2.5), "empty": np.zeros((0, 3), np.float32)}
  path = tmp_path / "zoo.pkl"
  path.write_bytes(pickle.dumps({"model": model, "__author__": "numpy"}, protocol=protocol))
  state = d2_reader.load_detectron2_file(path).state
  for name, want in model.items():
    assert state[name].dtype == want.dtype and state[name].shape == np.shape(want), name
    np.testing.assert_array_equal(state[name], want)


def test_pickled_torch_tensors_in_pkl(tmp_path):
  """pickle.dump of torch tensors (no torch.save): storages embedded as legacy torch bytes."""
  data = np.arange(12, dtype=np.float32)
  st = EmbeddedStorage(Storage("0", data))
  model = {"a": Tensor(st, 2, [2, 3], [1, 2]), "b": Tensor(st, 0, [4])}
  path = tmp_path / "torch_tensors.pkl"
  buf = io.BytesIO()
  HandPickler(buf, protocol=2).dump({"model": model, "__author__": "someone"})
  path.write_bytes(buf.getvalue())
  ckpt = d2_reader.load_detectron2_file(path)
  assert ckpt.format == "d2-model-zoo"
  np.testing.assert_array_equal(ckpt.state["a"], data[2:8].reshape(3, 2).T)
  np.testing.assert_array_equal(ckpt.state["b"], data[:4])


# ---------------------------------------------------------------------------------------------
# Refusals and errors
# ---------------------------------------------------------------------------------------------


class _Evil:

  def __init__(self, fn, arg):
    self.fn, self.arg = fn, arg

  def __reduce__(self):
    return (self.fn, (self.arg,))


def _evil_payloads(marker: pathlib.Path) -> dict[str, bytes]:
  cmd = f"touch {marker}"
  code = f"open({str(marker)!r}, 'w').close()"
  return {
      # Written by pickle itself (protocol 4: STACK_GLOBAL posix.system / builtins.eval).
      "os.system": pickle.dumps({"model": {"w": _Evil(os.system, cmd)}, "__author__": "x"}),
      "builtins.eval": pickle.dumps(_Evil(eval, code), protocol=2),
      # Hand-written protocol 0: GLOBAL, INST.
      "os.system0": f"cos\nsystem\n(S'{cmd}'\ntR.".encode(),
      "subprocess.call": f"(S'{cmd}'\nisubprocess\ncall\n.".encode(),
  }


@pytest.mark.parametrize("payload", ["os.system", "builtins.eval", "os.system0",
                                     "subprocess.call"])
def test_malicious_pickle_is_refused_without_running(tmp_path, payload):
  marker = tmp_path / "pwned"
  path = tmp_path / "evil.pkl"
  path.write_bytes(_evil_payloads(marker)[payload])
  with pytest.raises(UnsafeCheckpointError) as e:
    d2_reader.load_detectron2_file(path)
  assert not marker.exists()
  msg = str(e.value)
  assert f"from {path}: not a tensor/array type allowed in detectron2 checkpoints" in msg
  assert re.search(r"refuses to load (os|posix|builtins|__builtin__|subprocess)\.(system|eval|call) ", msg)


def test_malicious_torch_zip_is_refused(tmp_path):
  marker = tmp_path / "pwned"
  path = tmp_path / "evil.pth"
  with zipfile.ZipFile(path, "w") as z:
    z.writestr("archive/data.pkl", pickle.dumps({"model": _Evil(os.system, f"touch {marker}")},
                                                protocol=2))
    z.writestr("archive/version", "3\n")
  with pytest.raises(UnsafeCheckpointError, match=r"refuses to load (os|posix)\.system"):
    d2_reader.load_detectron2_file(path)
  assert not marker.exists()


def test_build_cannot_patch_allow_listed_objects(tmp_path):
  path = tmp_path / "patch.pkl"
  # BUILD on the numpy.dtype stand-in with slot state {"_fn": 1}: would rebind it process-wide.
  path.write_bytes(b"\x80\x02cnumpy\ndtype\nN}X\x03\x00\x00\x00_fnK\x01s\x86b.")
  with pytest.raises(CheckpointError):
    d2_reader.load_detectron2_file(path)
  good = tmp_path / "good.pkl"
  good.write_bytes(pickle.dumps({"model": {"a": np.arange(3.0)}, "__author__": "t"}))
  np.testing.assert_array_equal(d2_reader.load_detectron2_file(good).state["a"], np.arange(3.0))


def test_object_arrays_are_refused(tmp_path):
  path = tmp_path / "obj.pkl"
  path.write_bytes(pickle.dumps({"model": {"a": np.array([1, "x"], dtype=object)},
                                 "__author__": "t"}))
  with pytest.raises(CheckpointError, match="object arrays"):
    d2_reader.load_detectron2_file(path)


def _truncated_files(tmp_path) -> dict[str, pathlib.Path]:
  obj, _ = _training_checkpoint()
  full = {}
  full["zoo.pkl"] = pickle.dumps({"model": {"a": np.ones((64, 64), np.float32)},
                                  "__author__": "t"}, protocol=4)
  write_torch_zip(tmp_path / "z", obj)
  full["zip.pth"] = (tmp_path / "z").read_bytes()
  write_torch_legacy(tmp_path / "l", obj)
  full["legacy.pth"] = (tmp_path / "l").read_bytes()
  out = {}
  for name, data in full.items():
    out[name] = tmp_path / name
    out[name].write_bytes(data[: len(data) * 2 // 3])
  out["empty.pkl"] = tmp_path / "empty.pkl"
  out["empty.pkl"].write_bytes(b"")
  out["garbage.pth"] = tmp_path / "garbage.pth"
  out["garbage.pth"].write_bytes(b"\x07" + np.random.default_rng(0).bytes(63) + bytes(300))
  return out


def test_truncated_or_corrupt_files_give_one_line_error(tmp_path):
  for name, path in _truncated_files(tmp_path).items():
    with pytest.raises(CheckpointError) as e:
      d2_reader.load_detectron2_file(path)
    msg = str(e.value)
    assert str(path) in msg and "\n" not in msg, (name, msg)
    assert not isinstance(e.value, UnsafeCheckpointError), (name, msg)


def test_missing_file():
  with pytest.raises(FileNotFoundError):
    d2_reader.load_detectron2_file("/nonexistent/model_final.pkl")
