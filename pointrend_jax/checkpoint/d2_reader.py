"""Reads detectron2 / Detectron (Caffe2) / PyTorch checkpoints into numpy, without torch.

Containers (``shared/spec/checkpoint_format.md`` §1):

* detectron2 model-zoo ``.pkl``: ``{"model": {name: ndarray}, "__author__": ...}``;
* Caffe2 / Detectron1 ``.pkl`` (ImageNet backbones): ``{blob: ndarray}`` or ``{"blobs": {...}}``;
* ``torch.save`` files (``.pth``): the zip format (torch >= 1.6) and the legacy
  non-zip format; detectron2 training checkpoints keep the state dict under ``"model"``.

Every pickle goes through a restricted :class:`pickle.Unpickler` whose ``find_class`` only admits
the array / tensor reconstruction globals these formats contain, each mapped to a numpy
implementation here: nothing in a file can name a function to run, and torch is never imported.

Names are normalized to the current detectron2 (PointRend "v2") names (§3, §4), and
:func:`match_state_dict` matches them against a model's expected names and shapes the way
``DetectionCheckpointer`` does (exact, or the suffix heuristic of §4.2), but strictly: it reports
every missing, unexpected and mis-shaped entry instead of logging it.

Arrays keep detectron2's PyTorch layouts (OIHW convs, ``(out, in)`` linears) and the dtype they
were stored with; layout transposes belong to the model code.
"""

from __future__ import annotations

import codecs
import collections
import dataclasses
import io
import json
import os
import pathlib
import pickle
import re
import struct
import zipfile
import zlib
from typing import Any, Callable, Iterable, Mapping, NamedTuple, Sequence
from urllib import parse as urllib_parse

import numpy as np

from pointrend_jax.errors import CheckpointError, UnsafeCheckpointError

__all__ = [
    "CheckpointError",
    "Detectron2Checkpoint",
    "MatchReport",
    "Mismatch",
    "UnsafeCheckpointError",
    "canonicalize_names",
    "convert_c2_names",
    "load_detectron2_file",
    "manifest_shapes",
    "match_state_dict",
]

# FrozenBatchNorm2d.eps in detectron2; version-<3 files stored running_var without it.
_FROZEN_BN_EPS = 1e-5
_TORCH_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_TORCH_LEGACY_PROTOCOL = 1001


# --------------------------------------------------------------------------------------------
# dtypes
# --------------------------------------------------------------------------------------------


def _ml_dtype(name: str) -> np.dtype:
  try:
    import ml_dtypes  # pylint: disable=import-outside-toplevel  # ships with jax
  except ImportError as e:  # pragma: no cover - jax always installs it
    raise CheckpointError(f"reading {name} tensors needs the ml_dtypes package") from e
  return np.dtype(getattr(ml_dtypes, name))


_NUMPY_DTYPE_NAMES = {
    "float32": "float32", "float64": "float64", "float16": "float16", "int64": "int64",
    "int32": "int32", "int16": "int16", "int8": "int8", "uint8": "uint8", "bool": "bool",
    "complex64": "complex64", "complex128": "complex128", "uint16": "uint16",
    "uint32": "uint32", "uint64": "uint64",
}
_ML_DTYPE_NAMES = ("bfloat16", "float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz",
                   "float8_e5m2fnuz")
# torch.<X>Storage (legacy typed storages, still what torch.save writes for the common dtypes).
_TORCH_STORAGE_DTYPES = {
    "FloatStorage": "float32", "DoubleStorage": "float64", "HalfStorage": "float16",
    "BFloat16Storage": "bfloat16", "LongStorage": "int64", "IntStorage": "int32",
    "ShortStorage": "int16", "CharStorage": "int8", "ByteStorage": "uint8",
    "BoolStorage": "bool", "ComplexFloatStorage": "complex64",
    "ComplexDoubleStorage": "complex128",
}


def _dtype_by_name(name: str) -> np.dtype:
  if name in _NUMPY_DTYPE_NAMES:
    return np.dtype(_NUMPY_DTYPE_NAMES[name])
  return _ml_dtype(name)


# --------------------------------------------------------------------------------------------
# Safe stand-ins for the globals the pickles name
# --------------------------------------------------------------------------------------------


class _Frozen:
  """Base of the allow-list's objects: a pickle's BUILD must not alter them for later loads."""

  __slots__ = ()

  def __setattr__(self, name: str, value: Any) -> None:
    raise CheckpointError(f"a checkpoint tried to modify {self!r}")

  def __delattr__(self, name: str) -> None:
    raise CheckpointError(f"a checkpoint tried to modify {self!r}")


class _Marker(_Frozen):
  """A named, inert stand-in for a class (numpy.ndarray, torch storage types, dtypes, Tensor)."""

  __slots__ = ("kind", "name")

  def __init__(self, kind: str, name: str):
    object.__setattr__(self, "kind", kind)
    object.__setattr__(self, "name", name)

  def __repr__(self) -> str:
    return f"<{self.kind} {self.name}>"

  @property
  def dtype(self) -> np.dtype:
    if self.kind == "torch storage":
      if self.name == "UntypedStorage":
        return np.dtype("uint8")
      return _dtype_by_name(_TORCH_STORAGE_DTYPES[self.name])
    if self.kind == "torch dtype":
      return _dtype_by_name(self.name)
    raise CheckpointError(f"{self!r} has no dtype")


class _SafeCallable(_Frozen):
  """One of this module's functions, callable from a pickle's REDUCE."""

  __slots__ = ("_fn",)

  def __init__(self, fn: Callable[..., Any]):
    object.__setattr__(self, "_fn", fn)

  def __repr__(self) -> str:
    return f"<safe {getattr(self._fn, '__name__', self._fn)}>"

  def __call__(self, *args: Any) -> Any:
    return self._fn(*args)


def _check_dtype(dt: np.dtype) -> np.dtype:
  if dt.hasobject:
    raise CheckpointError(f"object arrays are not allowed in checkpoints (dtype {dt})")
  return dt


def _np_dtype(obj: Any, align: Any = False, copy: Any = True) -> np.dtype:
  del copy
  if isinstance(obj, bytes):
    obj = obj.decode("latin1")
  if not isinstance(obj, str):
    raise CheckpointError(f"unexpected numpy dtype spec {obj!r}")
  # Always a copy: the BUILD that follows (byte order, fields) must not touch numpy's shared
  # builtin dtype instances. It may still change this one, so the arrays' dtypes are checked
  # again once unpickling is done.
  return _check_dtype(np.dtype(obj, align=bool(align), copy=True))


def _np_reconstruct(subtype: Any, shape: Any, dtype: Any) -> np.ndarray:
  if not (isinstance(subtype, _Marker) and subtype.kind == "numpy class"):
    raise CheckpointError(f"only plain numpy arrays are allowed, got subtype {subtype!r}")
  if isinstance(dtype, bytes):
    dtype = dtype.decode("latin1")
  # ndarray.__setstate__ (BUILD) then fills in shape, dtype and data.
  return np.ndarray.__new__(np.ndarray, shape, _check_dtype(np.dtype(dtype)))


def _np_scalar(dtype: Any, data: Any = None) -> np.generic:
  if not isinstance(dtype, np.dtype):
    raise CheckpointError(f"unexpected numpy scalar dtype {dtype!r}")
  _check_dtype(dtype)
  if isinstance(data, str):  # Python 2 pickles read with encoding="latin1"
    data = data.encode("latin1")
  if not isinstance(data, (bytes, bytearray)) or len(data) != dtype.itemsize:
    raise CheckpointError(f"malformed numpy scalar of dtype {dtype}")
  return np.frombuffer(bytes(data), dtype=dtype, count=1)[0]


def _np_frombuffer(buf: Any, dtype: Any, shape: Any, order: Any) -> np.ndarray:
  if not isinstance(dtype, np.dtype):
    raise CheckpointError(f"unexpected numpy dtype {dtype!r}")
  _check_dtype(dtype)
  if isinstance(buf, pickle.PickleBuffer):
    buf = buf.raw()
  return np.frombuffer(buf, dtype=dtype).reshape(shape, order=order)


def _codecs_encode(obj: Any, encoding: str = "utf-8", errors: str = "strict") -> bytes:
  # Python 3 writes bytes as _codecs.encode(str, "latin1") in protocol-2 pickles.
  if not isinstance(obj, str) or encoding not in ("latin1", "latin-1", "utf-8", "utf8"):
    raise CheckpointError(f"unexpected _codecs.encode({type(obj).__name__}, {encoding!r})")
  return codecs.encode(obj, encoding, errors)


class _RawStore:
  """The raw bytes of one file's storages, by key; zip records are read on first use."""

  def __init__(self, fetch: Callable[[str], bytes] | None = None):
    self.data: dict[str, bytes] = {}
    self.fetch = fetch
    self.byteorder = "little"

  def get(self, key: str) -> bytes:
    raw = self.data.get(key)
    if raw is None:
      if self.fetch is None:
        raise CheckpointError(f"storage {key} has no data")
      try:
        raw = self.data[key] = self.fetch(key)
      except KeyError as e:
        raise CheckpointError(f"storage record data/{key} is missing") from e
    return raw


class _StorageRef:
  """One torch storage: a key into a file's raw data, its element dtype and size."""

  __slots__ = ("store", "key", "dtype", "numel", "elem_offset")

  def __init__(self, store: _RawStore, key: str, dtype: np.dtype, numel: int,
               elem_offset: int = 0):
    self.store = store
    self.key = key
    self.dtype = dtype
    self.numel = numel
    self.elem_offset = elem_offset


class _LazyTensor:
  """A tensor view (offset, size, stride in elements) on a storage, read on demand."""

  __slots__ = ("storage", "offset", "size", "stride", "dtype")

  def __init__(self, storage: _StorageRef, offset: int, size: Sequence[int],
               stride: Sequence[int], dtype: np.dtype):
    if not isinstance(storage, _StorageRef):
      raise CheckpointError(f"tensor built on {type(storage).__name__}, not a storage")
    size = tuple(int(s) for s in size)
    stride = tuple(int(s) for s in stride)
    if len(size) != len(stride) or any(s < 0 for s in size + stride) or int(offset) < 0:
      raise CheckpointError(f"malformed tensor view size={size} stride={stride} "
                            f"offset={offset}")
    self.storage = storage
    self.offset = int(offset)
    self.size = size
    self.stride = stride
    self.dtype = dtype


def _rebuild_tensor(storage: Any, storage_offset: Any, size: Any, stride: Any,
                    *unused: Any) -> _LazyTensor:
  # _rebuild_tensor(storage, offset, size, stride) and _rebuild_tensor_v2(..., requires_grad,
  # backward_hooks[, metadata]): the extras do not affect values.
  del unused
  if not isinstance(storage, _StorageRef):
    raise CheckpointError(f"tensor built on {type(storage).__name__}, not a storage")
  return _LazyTensor(storage, storage_offset, size, stride, storage.dtype)


def _rebuild_tensor_v3(storage: Any, storage_offset: Any, size: Any, stride: Any,
                       requires_grad: Any, backward_hooks: Any, dtype: Any,
                       *unused: Any) -> _LazyTensor:
  # Untyped (byte) storage; offset and strides count elements of `dtype`.
  del requires_grad, backward_hooks, unused
  if not isinstance(dtype, _Marker) or dtype.kind != "torch dtype":
    raise CheckpointError(f"unexpected tensor dtype {dtype!r}")
  return _LazyTensor(storage, storage_offset, size, stride, dtype.dtype)


def _rebuild_parameter(data: Any, *unused: Any) -> Any:
  del unused  # requires_grad, backward hooks, python state
  return data


def _rebuild_from_type_v2(func: Any, new_type: Any, args: Any, state: Any) -> Any:
  del state
  if not (isinstance(new_type, _Marker) and new_type.kind == "torch class"):
    raise CheckpointError(f"tensor subclass {new_type!r} is not supported")
  return func(*args)


def _load_storage_from_bytes(data: Any) -> _StorageRef:
  # pickle.dump(tensor) (not torch.save) embeds each storage as a nested legacy torch.save.
  if not isinstance(data, (bytes, bytearray)):
    raise CheckpointError("torch.storage._load_from_bytes expects bytes")
  obj = _read_torch_legacy(io.BytesIO(bytes(data)), "<embedded torch storage>")
  if not isinstance(obj, _StorageRef):
    raise CheckpointError("embedded torch storage is not a storage")
  return obj


_NUMPY_MODULES = ("numpy.core.multiarray", "numpy._core.multiarray")
_NUMERIC_MODULES = ("numpy.core.numeric", "numpy._core.numeric")
_BUILTIN_MODULES = ("builtins", "__builtin__")


def _allowed_globals() -> dict[tuple[str, str], Any]:
  table: dict[tuple[str, str], Any] = {}
  for m in _NUMPY_MODULES:
    table[(m, "_reconstruct")] = _SafeCallable(_np_reconstruct)
    table[(m, "scalar")] = _SafeCallable(_np_scalar)
  for m in _NUMERIC_MODULES:
    table[(m, "_frombuffer")] = _SafeCallable(_np_frombuffer)
  # Only ever the subtype argument of _reconstruct: a marker, so it cannot be called.
  table[("numpy", "ndarray")] = _Marker("numpy class", "ndarray")
  table[("numpy", "dtype")] = _SafeCallable(_np_dtype)
  table[("collections", "OrderedDict")] = collections.OrderedDict
  # torch MultiStepLR milestones. Wrapped: the class is pure Python, so handing it out would
  # let a pickle's BUILD patch it for the whole process.
  table[("collections", "Counter")] = _SafeCallable(collections.Counter)
  for m in _BUILTIN_MODULES:
    for name, fn in (("set", set), ("frozenset", frozenset), ("bytearray", bytearray),
                     ("bytes", bytes), ("complex", complex)):
      table[(m, name)] = _SafeCallable(fn)
  table[("_codecs", "encode")] = _SafeCallable(_codecs_encode)
  table[("torch._utils", "_rebuild_tensor")] = _SafeCallable(_rebuild_tensor)
  table[("torch._utils", "_rebuild_tensor_v2")] = _SafeCallable(_rebuild_tensor)
  table[("torch._utils", "_rebuild_tensor_v3")] = _SafeCallable(_rebuild_tensor_v3)
  table[("torch._utils", "_rebuild_parameter")] = _SafeCallable(_rebuild_parameter)
  table[("torch._utils", "_rebuild_parameter_with_state")] = _SafeCallable(_rebuild_parameter)
  table[("torch._tensor", "_rebuild_from_type_v2")] = _SafeCallable(_rebuild_from_type_v2)
  table[("torch.storage", "_load_from_bytes")] = _SafeCallable(_load_storage_from_bytes)
  table[("torch", "Size")] = _SafeCallable(tuple)
  for m, n in (("torch", "Tensor"), ("torch._tensor", "Tensor"),
               ("torch.nn.parameter", "Parameter")):
    table[(m, n)] = _Marker("torch class", n)
  for m in ("torch", "torch.cuda"):
    for n in _TORCH_STORAGE_DTYPES:
      table[(m, n)] = _Marker("torch storage", n)
  for m in ("torch", "torch.storage"):
    table[(m, "UntypedStorage")] = _Marker("torch storage", "UntypedStorage")
  for n in tuple(_NUMPY_DTYPE_NAMES) + _ML_DTYPE_NAMES:
    table[("torch", n)] = _Marker("torch dtype", n)
  return table


_ALLOWED_GLOBALS = _allowed_globals()


class _RestrictedUnpickler(pickle.Unpickler):
  """Unpickler that resolves only the allow-listed globals (numpy / torch tensor rebuilders)."""

  def __init__(self, file: Any, path: str,
               persistent_load: Callable[[Any], Any] | None = None):
    super().__init__(file, encoding="latin1")
    self._path = path
    if persistent_load is not None:
      self.persistent_load = persistent_load

  def find_class(self, module: str, name: str) -> Any:
    obj = _ALLOWED_GLOBALS.get((module, name))
    if obj is None:
      raise UnsafeCheckpointError(
          f"pointrend_jax.checkpoint refuses to load {module}.{name} from {self._path}: "
          "not a tensor/array type allowed in detectron2 checkpoints")
    return obj


# --------------------------------------------------------------------------------------------
# Containers
# --------------------------------------------------------------------------------------------


def _torch_persistent_load(store: _RawStore, storages: dict[str, _StorageRef]
                           ) -> Callable[[Any], Any]:
  """torch.save's persistent ids: ("storage", storage type, key, location, numel[, view])."""

  def load(pid: Any) -> _StorageRef:
    if not isinstance(pid, tuple) or not pid or pid[0] != "storage":
      kind = pid[0] if isinstance(pid, tuple) and pid else pid
      raise CheckpointError(f"unsupported torch persistent id {kind!r} (only storages)")
    if len(pid) not in (5, 6):
      raise CheckpointError(f"malformed torch storage id {pid!r}")
    storage_type, key, _, numel = pid[1:5]
    if not isinstance(storage_type, _Marker) or storage_type.kind != "torch storage":
      raise CheckpointError(f"unexpected storage type {storage_type!r}")
    dtype = storage_type.dtype
    key = str(key)
    root = storages.get(key)
    if root is None or root.dtype != dtype:
      # (A second dtype on one key views the same bytes; the first one sizes the record.)
      root = _StorageRef(store, key, dtype, int(numel))
      storages.setdefault(key, root)
    view = pid[5] if len(pid) == 6 else None
    if view is not None:  # legacy (view_key, offset, size): storage views of torch < 1.0
      _, offset, view_size = view
      return _StorageRef(store, key, dtype, int(view_size), root.elem_offset + int(offset))
    return root

  return load


def _read_torch_zip(path: str) -> tuple[Any, Callable[[], None]]:
  """torch >= 1.6: ``<name>/data.pkl`` plus one raw record ``<name>/data/<key>`` per storage."""
  zf = zipfile.ZipFile(path)
  try:
    names = zf.namelist()
    pkl = [n for n in names if n.endswith("/data.pkl") and n.count("/") == 1]
    if len(pkl) != 1:
      raise CheckpointError(f"{path}: zip file is not a torch.save archive "
                            f"(found {len(pkl)} top-level */data.pkl records)")
    prefix = pkl[0][: -len("data.pkl")]
    store = _RawStore(lambda key: zf.read(f"{prefix}data/{key}"))
    if prefix + "byteorder" in names:
      store.byteorder = zf.read(prefix + "byteorder").decode("ascii", "replace").strip()
      if store.byteorder not in ("little", "big"):
        raise CheckpointError(f"{path}: unknown byte order {store.byteorder!r}")
    storages: dict[str, _StorageRef] = {}
    obj = _RestrictedUnpickler(io.BytesIO(zf.read(pkl[0])), path,
                               _torch_persistent_load(store, storages)).load()
  except BaseException:
    zf.close()
    raise
  return obj, zf.close


def _read_torch_legacy(f: Any, path: str) -> Any:
  """torch < 1.6: magic, protocol, sys_info, object, storage keys, then the raw storages."""
  if _RestrictedUnpickler(f, path).load() != _TORCH_LEGACY_MAGIC:
    raise CheckpointError(f"{path}: not a torch legacy file (bad magic number)")
  protocol = _RestrictedUnpickler(f, path).load()
  if protocol != _TORCH_LEGACY_PROTOCOL:
    raise CheckpointError(f"{path}: unsupported torch legacy protocol {protocol!r}")
  sys_info = _RestrictedUnpickler(f, path).load()
  store = _RawStore()
  if isinstance(sys_info, dict) and not sys_info.get("little_endian", True):
    store.byteorder = "big"
  storages: dict[str, _StorageRef] = {}
  obj = _RestrictedUnpickler(f, path, _torch_persistent_load(store, storages)).load()
  keys = _RestrictedUnpickler(f, path).load()
  if not isinstance(keys, list):
    raise CheckpointError(f"{path}: malformed torch legacy storage list")
  for key in keys:
    key = str(key)
    ref = storages.get(key)
    if ref is None:
      raise CheckpointError(f"{path}: storage {key} is listed but never referenced")
    header = f.read(8)
    if len(header) != 8:
      raise EOFError(f"storage {key}: missing size header")
    numel = struct.unpack("<q" if store.byteorder == "little" else ">q", header)[0]
    nbytes = numel * ref.dtype.itemsize
    data = f.read(nbytes) if numel >= 0 else b""
    if numel < 0 or len(data) != nbytes:
      raise EOFError(f"storage {key}: expected {nbytes} bytes, got {len(data)}")
    store.data[key] = data
  return obj


def _materialize(ref: _LazyTensor, cache: dict[int, np.ndarray]) -> np.ndarray:
  """Reads a tensor view out of its storage into an owned, C-contiguous, native-order array."""
  done = cache.get(id(ref))
  if done is not None:
    return done
  st = ref.storage
  raw = st.store.get(st.key)
  start = st.elem_offset * st.dtype.itemsize
  stop = start + st.numel * st.dtype.itemsize
  if stop > len(raw):
    raise CheckpointError(f"storage {st.key} holds {len(raw)} bytes, needs {stop}")
  dtype = ref.dtype
  if st.store.byteorder == "big" and dtype.itemsize > 1:
    dtype = dtype.newbyteorder(">")
  item = dtype.itemsize
  try:
    # np.ndarray checks that the strided view stays inside the buffer.
    view = np.ndarray(ref.size, dtype=dtype, buffer=memoryview(raw)[start:stop],
                      offset=ref.offset * item, strides=[s * item for s in ref.stride])
  except (ValueError, TypeError) as e:
    raise CheckpointError(f"tensor view size={ref.size} stride={ref.stride} offset="
                          f"{ref.offset} does not fit storage {st.key} ({e})") from e
  arr = np.array(view, dtype=ref.dtype, order="C", copy=True)
  cache[id(ref)] = arr
  return arr


def _is_zip(head: bytes) -> bool:
  return head[:4] in (b"PK\x03\x04", b"PK\x05\x06")


def _is_tar(path: str) -> bool:
  with open(path, "rb") as f:
    f.seek(257)
    return f.read(5) == b"ustar"


@dataclasses.dataclass
class Detectron2Checkpoint:
  """A checkpoint's model state, normalized to current detectron2 names.

  Attributes:
    state: canonical detectron2 state-dict name -> array (PyTorch layout, stored dtype). For
      Caffe2 files the names are the converted short names (``res2.0.conv1.weight``) that
      :func:`match_state_dict` suffix-matches against the model.
    format: ``"d2-model-zoo"`` (model-zoo ``.pkl``), ``"caffe2"`` (Caffe2 / Detectron1
      ``.pkl``), ``"pth-training"`` (``torch.save`` of a dict with ``"model"``, e.g. detectron2
      training checkpoints) or ``"pth-state-dict"`` (``torch.save`` of a bare state dict).
    matching_heuristics: whether detectron2 would match names by the suffix heuristic (§4.2).
    metadata: ``container`` (pickle / torch-zip / torch-legacy), ``author``, ``iteration``,
      ``module_versions`` ({module: version} from the state dict's ``_metadata``),
      ``renamed`` ({canonical: original name}), ``dropped`` (``*_momentum`` blobs),
      ``top_level_keys``.
    path: the file read.
  """

  state: dict[str, np.ndarray]
  format: str
  metadata: dict[str, Any]
  matching_heuristics: bool = False
  path: str = ""


def _split_query(path: str) -> tuple[str, dict[str, list[str]]]:
  if os.path.exists(path) or "?" not in path:
    return path, {}
  base, _, query = path.partition("?")
  return base, urllib_parse.parse_qs(query)


def _one_line(e: BaseException) -> str:
  return " ".join(f"{type(e).__name__}: {e}".split())


def load_detectron2_file(path: str | os.PathLike[str]) -> Detectron2Checkpoint:
  """Reads a detectron2 / Caffe2 ``.pkl`` or a ``torch.save`` file without torch.

  The container is recognized from the content (zip, torch legacy magic number, or a plain
  pickle), not from the extension. A trailing ``?matching_heuristics=True`` (detectron2's URL
  query syntax) turns on suffix matching for ``.pth`` files.

  Args:
    path: the checkpoint file.

  Returns:
    The model state with canonical names (see :func:`canonicalize_names`) and metadata.

  Raises:
    CheckpointError: unreadable, truncated or corrupt file, or unsupported content.
    UnsafeCheckpointError: the pickle names a global outside the tensor/array allow-list.
    FileNotFoundError: no such file.
  """
  path, query = _split_query(os.fspath(path))
  path = os.path.expanduser(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"checkpoint file not found: {path}")
  try:
    return _load(path, query)
  except CheckpointError as e:
    msg = " ".join(str(e).split())
    if path not in msg:
      msg = f"{path}: {msg}"
    raise type(e)(msg) from e
  except (EOFError, pickle.UnpicklingError, zipfile.BadZipFile, zlib.error, struct.error,
          ValueError, TypeError, AttributeError, IndexError, KeyError, UnicodeDecodeError,
          OverflowError, MemoryError, RecursionError) as e:
    raise CheckpointError(
        f"{path}: truncated or corrupt checkpoint file ({_one_line(e)})") from e


def _load(path: str, query: Mapping[str, list[str]]) -> Detectron2Checkpoint:
  with open(path, "rb") as f:
    head = f.read(8)
  if not head:
    raise CheckpointError(f"{path}: empty checkpoint file")
  metadata: dict[str, Any] = {}
  closer: Callable[[], None] | None = None
  if _is_zip(head):
    obj, closer = _read_torch_zip(path)
    metadata["container"] = "torch-zip"
  elif _is_tar(path):
    raise CheckpointError(f"{path}: torch tar checkpoints (torch < 0.4) are not supported")
  else:
    with open(path, "rb") as f:
      first = _RestrictedUnpickler(f, path).load()
      if isinstance(first, int) and first == _TORCH_LEGACY_MAGIC:
        f.seek(0)
        obj = _read_torch_legacy(f, path)
        metadata["container"] = "torch-legacy"
      else:
        obj = first
        metadata["container"] = "pickle"
  try:
    if metadata["container"] == "pickle":
      return _from_pickle(path, obj, metadata)
    heuristics = query.get("matching_heuristics", ["False"]) == ["True"]
    return _from_torch(path, obj, metadata, heuristics)
  finally:
    if closer is not None:
      closer()


def _from_pickle(path: str, data: Any, metadata: dict[str, Any]) -> Detectron2Checkpoint:
  if not isinstance(data, dict):
    raise CheckpointError(f"{path}: pickle holds a {type(data).__name__}, not a dict")
  metadata["top_level_keys"] = [str(k) for k in data]
  if "model" in data and "__author__" in data:
    metadata["author"] = data["__author__"]
    heuristics = bool(data.get("matching_heuristics", False))
    state = _check_state(path, data["model"])
    fmt, caffe2 = "d2-model-zoo", False
  else:
    blobs = data["blobs"] if "blobs" in data else data
    if not isinstance(blobs, dict):
      raise CheckpointError(f"{path}: 'blobs' is a {type(blobs).__name__}, not a dict")
    metadata["author"] = "Caffe2"
    metadata["dropped"] = [k for k in blobs if str(k).endswith("_momentum")]
    state = _check_state(path, {k: v for k, v in blobs.items()
                                if not str(k).endswith("_momentum")})
    fmt, caffe2, heuristics = "caffe2", True, True
  canon, renamed = _canonical_mapping(list(state), caffe2=caffe2)
  metadata["renamed"] = renamed
  return Detectron2Checkpoint(
      state={canon[k]: v for k, v in state.items()}, format=fmt, metadata=metadata,
      matching_heuristics=heuristics, path=path)


def _from_torch(path: str, obj: Any, metadata: dict[str, Any],
                heuristics: bool) -> Detectron2Checkpoint:
  if isinstance(obj, dict) and "model" in obj:
    fmt, raw_state = "pth-training", obj["model"]
    metadata["top_level_keys"] = [str(k) for k in obj]
    if isinstance(obj.get("iteration"), int):
      metadata["iteration"] = obj["iteration"]
  elif isinstance(obj, dict):
    fmt, raw_state = "pth-state-dict", obj
  else:
    raise CheckpointError(f"{path}: torch file holds a {type(obj).__name__}, not a dict")
  if not isinstance(raw_state, dict):
    raise CheckpointError(f"{path}: 'model' is a {type(raw_state).__name__}, not a dict")
  versions = _module_versions(getattr(raw_state, "_metadata", None))
  # Only the model's tensors are read; optimizer buffers etc. stay unread in the zip.
  state = _check_state(path, raw_state)
  canon, renamed = _canonical_mapping(list(state), caffe2=False)
  if versions is not None and _all_have_prefix(state, "module."):
    versions = {(m[len("module."):] if m.startswith("module.") else m): v
                for m, v in versions.items()}
  metadata["module_versions"] = versions
  metadata["renamed"] = renamed
  return Detectron2Checkpoint(
      state={canon[k]: v for k, v in state.items()}, format=fmt, metadata=metadata,
      matching_heuristics=heuristics, path=path)


def _module_versions(meta: Any) -> dict[str, int] | None:
  if not isinstance(meta, dict):
    return None
  out = {}
  for module, local in meta.items():
    if isinstance(local, dict) and isinstance(local.get("version"), int):
      out[str(module)] = local["version"]
  return out


def _check_state(path: str, state: Any) -> dict[str, np.ndarray]:
  if not isinstance(state, dict):
    raise CheckpointError(f"{path}: model state is a {type(state).__name__}, not a dict")
  out: dict[str, np.ndarray] = {}
  cache: dict[int, np.ndarray] = {}
  for k, v in state.items():
    if not isinstance(k, str):
      raise CheckpointError(f"{path}: state-dict key {k!r} is not a string")
    if isinstance(v, _LazyTensor):
      v = _materialize(v, cache)
    elif isinstance(v, np.generic):
      v = np.asarray(v)
    if not isinstance(v, np.ndarray):
      raise CheckpointError(f"{path}: unsupported value for {k}: {type(v).__name__} "
                            "(expected an array or tensor)")
    _check_dtype(v.dtype)
    out[k] = v
  return out


# --------------------------------------------------------------------------------------------
# Names
# --------------------------------------------------------------------------------------------

# (regex, replacement), in convert_basic_c2_names order.
_C2_RULES: tuple[tuple[str, str], ...] = (
    (r"\.b$", ".bias"),
    (r"\.w$", ".weight"),
    (r"bn\.s$", "norm.weight"),
    (r"bn\.bias$", "norm.bias"),
    (r"bn\.rm", "norm.running_mean"),
    (r"bn\.running.mean$", "norm.running_mean"),
    (r"bn\.riv$", "norm.running_var"),
    (r"bn\.running.var$", "norm.running_var"),
    (r"bn\.gamma$", "norm.weight"),
    (r"bn\.beta$", "norm.bias"),
    (r"gn\.s$", "norm.weight"),
    (r"gn\.bias$", "norm.bias"),
    (r"^res\.conv1\.norm\.", "conv1.norm."),
    (r"^conv1\.", "stem.conv1."),
)
_C2_BLOCKS = ((".branch1.", ".shortcut."), (".branch2a.", ".conv1."),
              (".branch2b.", ".conv2."), (".branch2c.", ".conv3."))


def convert_c2_names(names: Iterable[str]) -> list[str]:
  """Caffe2 blob names -> detectron2 names, as detectron2's ``convert_basic_c2_names``.

  E.g. ``res2_0_branch2a_bn_s`` -> ``res2.0.conv1.norm.weight``, ``conv1_w`` ->
  ``stem.conv1.weight``, ``pred_w`` -> ``linear.weight`` (the ImageNet classifier). The
  detection-model extras of ``convert_c2_detectron_names`` (RPN, box head, FPN renames and the
  background-row surgery) are not applied: no PointRend weights come from Detectron1.
  """
  out = []
  for k in names:
    k = {"pred_b": "linear_b", "pred_w": "linear_w"}.get(k, k)
    k = k.replace("_", ".")
    for pattern, repl in _C2_RULES:
      k = re.sub(pattern, repl, k)
    for old, new in _C2_BLOCKS:
      k = k.replace(old, new)
    out.append(k)
  return out


# PointRend mask-head key generations v0 / v1 -> v2 (§3).
_POINTREND_PREFIXES = (("roi_heads.mask_coarse_head.", "roi_heads.mask_head.coarse_head."),
                       ("roi_heads.mask_point_head.", "roi_heads.mask_head.point_head."))
_COARSE_FC = ".coarse_head.coarse_mask_fc"


def _pointrend_v2_name(name: str) -> str:
  for old, new in _POINTREND_PREFIXES:
    if name.startswith(old):
      name = new + name[len(old):]
  return name.replace(_COARSE_FC, ".coarse_head.fc")


def _all_have_prefix(names: Iterable[str], prefix: str) -> bool:
  names = list(names)
  return bool(names) and all(n.startswith(prefix) for n in names)


def _canonical_mapping(names: Sequence[str], *, caffe2: bool
                       ) -> tuple[dict[str, str], dict[str, str]]:
  """Returns ({original: canonical}, {canonical: original} for the names that changed)."""
  new = convert_c2_names(names) if caffe2 else list(names)
  # fvcore strips a DDP "module." prefix only when every key has it.
  if _all_have_prefix(new, "module."):
    new = [n[len("module."):] for n in new]
  new = [_pointrend_v2_name(n) for n in new]
  mapping = dict(zip(names, new))
  seen: dict[str, str] = {}
  clashes = []
  for old, n in mapping.items():
    if n in seen:
      clashes.append(f"{seen[n]} and {old} -> {n}")
    seen[n] = old
  if clashes:
    raise CheckpointError("checkpoint names collide after normalization: " + "; ".join(clashes))
  return mapping, {n: o for o, n in mapping.items() if n != o}


def canonicalize_names(state: Mapping[str, Any], *, caffe2: bool = False) -> dict[str, Any]:
  """Renames a state dict's keys to current (v2) detectron2 names, keeping order and values.

  Applied in order: Caffe2 blob conversion (``caffe2=True``, :func:`convert_c2_names`; callers
  drop ``*_momentum`` blobs first); removal of a ``module.`` (DDP) prefix present on every key;
  PointRend mask-head keys of generation v0/v1 -> v2:
  ``roi_heads.mask_coarse_head.`` -> ``roi_heads.mask_head.coarse_head.``,
  ``roi_heads.mask_point_head.`` -> ``roi_heads.mask_head.point_head.``,
  ``.coarse_head.coarse_mask_fc{k}`` -> ``.coarse_head.fc{k}``.

  Raises:
    CheckpointError: two keys map to the same name (e.g. a file mixing generations).
  """
  mapping, _ = _canonical_mapping(list(state), caffe2=caffe2)
  return {mapping[k]: v for k, v in state.items()}


# --------------------------------------------------------------------------------------------
# Matching
# --------------------------------------------------------------------------------------------


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
    expected: the model's state-dict names and shapes (e.g. :func:`manifest_shapes`).
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

  Returns:
    A :class:`MatchReport`.

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


# --------------------------------------------------------------------------------------------
# Manifests
# --------------------------------------------------------------------------------------------


def _manifest_dirs() -> list[pathlib.Path]:
  dirs = []
  if os.environ.get("POINTREND_MANIFEST_DIR"):
    dirs.append(pathlib.Path(os.environ["POINTREND_MANIFEST_DIR"]))
  # The repository is checked out next to the shared folder (X/main, X/shared).
  repo = pathlib.Path(__file__).resolve().parents[2]
  dirs.append(repo.parent / "shared" / "spec" / "checkpoints")
  return dirs


def manifest_shapes(config: str | os.PathLike[str]) -> dict[str, tuple[int, ...]]:
  """``{state-dict name: shape}`` of a config, in state-dict order, from its manifest JSON.

  Args:
    config: a manifest path, or a config stem / config file name such as
      ``pointrend_rcnn_R_50_FPN_1x_coco`` or ``.../pointrend_rcnn_R_50_FPN_1x_coco.yaml``,
      looked up in ``$POINTREND_MANIFEST_DIR`` and ``<repo>/../shared/spec/checkpoints``.
  """
  p = pathlib.Path(os.fspath(config)).expanduser()
  if p.suffix == ".json" and p.is_file():
    path = p
  else:
    stem = p.stem if p.suffix in (".json", ".yaml", ".yml", ".py") else p.name
    candidates = [d / f"{stem}.json" for d in _manifest_dirs()]
    found = [c for c in candidates if c.is_file()]
    if not found:
      raise FileNotFoundError(f"no state-dict manifest for {config!s}; looked for "
                              + ", ".join(str(c) for c in candidates))
    path = found[0]
  with open(path, encoding="utf-8") as f:
    data = json.load(f)
  entries = data["entries"] if isinstance(data, dict) else data
  return {e["name"]: tuple(int(s) for s in e["shape"]) for e in entries}

