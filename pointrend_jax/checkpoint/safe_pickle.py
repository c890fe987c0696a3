"""A pickle reader for checkpoint files that runs no code from the file and needs no torch.

Every pickle goes through :class:`RestrictedUnpickler`, whose ``find_class`` only admits the
array / tensor reconstruction globals of numpy pickles and ``torch.save`` files, each mapped to a
numpy implementation here: nothing in a file can name a function to run, and torch is never
imported. Containers (``shared/spec/checkpoint_format.md`` §1): plain pickles (detectron2 /
Caffe2 ``.pkl``), the ``torch.save`` zip format (torch >= 1.6) and its legacy non-zip format.

:func:`read_container` reads a file into Python objects with lazy tensors; :func:`state_arrays`
turns a state dict of them into owned numpy arrays (stored dtype, PyTorch layout).
"""

from __future__ import annotations

import codecs
import collections
import dataclasses
import io
import pickle
import struct
import zipfile
from typing import Any, Callable, Sequence

import ml_dtypes
import numpy as np

from pointrend_jax.errors import CheckpointError, UnsafeCheckpointError

__all__ = ["RestrictedUnpickler", "read_container", "state_arrays"]

_TORCH_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_TORCH_LEGACY_PROTOCOL = 1001


# Element types by torch / numpy name; the ml_dtypes ones (bfloat16, float8) ship with jax.
_NUMPY_DTYPE_NAMES = ("float32", "float64", "float16", "int64", "int32", "int16", "int8", "uint8",
                      "bool", "complex64", "complex128", "uint16", "uint32", "uint64")
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
  return np.dtype(name if name in _NUMPY_DTYPE_NAMES else getattr(ml_dtypes, name))


# Safe stand-ins for the globals the pickles name.


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


@dataclasses.dataclass(slots=True, eq=False)  # hashed by identity: a pickle may use it as a key
class _StorageRef:
  """One torch storage: a key into a file's raw data, its element dtype and size."""

  store: _RawStore
  key: str
  dtype: np.dtype
  numel: int
  elem_offset: int = 0


class _LazyTensor:
  """A tensor view (offset, size, stride in elements) on a storage, read on demand."""

  __slots__ = ("storage", "offset", "size", "stride", "dtype")

  def __init__(self, storage: _StorageRef, offset: int, size: Sequence[int],
               stride: Sequence[int], dtype: np.dtype | None = None):
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
    self.dtype = storage.dtype if dtype is None else dtype  # None: the typed storage's


def _rebuild_tensor(storage: Any, storage_offset: Any, size: Any, stride: Any,
                    *unused: Any) -> _LazyTensor:
  # _rebuild_tensor(storage, offset, size, stride) and _rebuild_tensor_v2(..., requires_grad,
  # backward_hooks[, metadata]): the extras do not affect values.
  del unused
  return _LazyTensor(storage, storage_offset, size, stride)


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
  for n in _NUMPY_DTYPE_NAMES + _ML_DTYPE_NAMES:
    table[("torch", n)] = _Marker("torch dtype", n)
  return table


_ALLOWED_GLOBALS = _allowed_globals()


class RestrictedUnpickler(pickle.Unpickler):
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


# Containers.


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
    obj = RestrictedUnpickler(io.BytesIO(zf.read(pkl[0])), path,
                               _torch_persistent_load(store, storages)).load()
  except BaseException:
    zf.close()
    raise
  return obj, zf.close


def _read_torch_legacy(f: Any, path: str) -> Any:
  """torch < 1.6: magic, protocol, sys_info, object, storage keys, then the raw storages."""
  if RestrictedUnpickler(f, path).load() != _TORCH_LEGACY_MAGIC:
    raise CheckpointError(f"{path}: not a torch legacy file (bad magic number)")
  protocol = RestrictedUnpickler(f, path).load()
  if protocol != _TORCH_LEGACY_PROTOCOL:
    raise CheckpointError(f"{path}: unsupported torch legacy protocol {protocol!r}")
  sys_info = RestrictedUnpickler(f, path).load()
  store = _RawStore()
  if isinstance(sys_info, dict) and not sys_info.get("little_endian", True):
    store.byteorder = "big"
  storages: dict[str, _StorageRef] = {}
  obj = RestrictedUnpickler(f, path, _torch_persistent_load(store, storages)).load()
  keys = RestrictedUnpickler(f, path).load()
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


def read_container(path: str) -> tuple[Any, str, Callable[[], None] | None]:
  """Unpickles a checkpoint file: ``(object, container, close)``.

  The container (``"pickle"``, ``"torch-zip"`` or ``"torch-legacy"``) is recognized from the
  content, not the extension. Tensors in the object are lazy; ``close`` (zip files) releases the
  file once they are read (:func:`state_arrays`).
  """
  with open(path, "rb") as f:
    head = f.read(262)
  if not head:
    raise CheckpointError(f"{path}: empty checkpoint file")
  if head[:4] in (b"PK\x03\x04", b"PK\x05\x06"):
    obj, close = _read_torch_zip(path)
    return obj, "torch-zip", close
  if head[257:262] == b"ustar":
    raise CheckpointError(f"{path}: torch tar checkpoints (torch < 0.4) are not supported")
  with open(path, "rb") as f:
    first = RestrictedUnpickler(f, path).load()
    if isinstance(first, int) and first == _TORCH_LEGACY_MAGIC:
      f.seek(0)
      return _read_torch_legacy(f, path), "torch-legacy", None
  return first, "pickle", None


def state_arrays(path: str, state: Any) -> dict[str, np.ndarray]:
  """A state dict of arrays and lazy tensors -> ``{name: owned numpy array}``."""
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

