"""Read PyTorch checkpoints (`torch.save` files) into numpy without importing torch.

Both on-disk formats are supported:

* zip (torch >= 1.6): `<archive>/data.pkl` is the object pickle, each storage is the
  raw little-endian bytes in `<archive>/data/<key>`.
* legacy (pre-1.6): a stream of pickles -- magic number, protocol version, sys info,
  the object pickle, the list of storage keys -- then, per key, an int64 element
  count followed by the raw bytes.

`pickle.load` on a file from outside runs whatever the file names (a pickle can call
`os.system`). `_RestrictedUnpickler.find_class` therefore admits only the globals a
tensor state dict needs (tensor/parameter rebuild functions, `torch.*Storage` dtype
markers, `collections.OrderedDict`, `torch.Size`) and refuses everything else before
it is called, naming the global.
"""
import collections
import io
import pickle
import struct
import zipfile

import ml_dtypes
import numpy as np

LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
LEGACY_PROTOCOL = 1001

# torch.<Name>Storage -> numpy dtype. Storages are typed only by these names in files.
STORAGE_DTYPES = {
    "DoubleStorage": np.dtype(np.float64),
    "FloatStorage": np.dtype(np.float32),
    "HalfStorage": np.dtype(np.float16),
    "BFloat16Storage": np.dtype(ml_dtypes.bfloat16),
    "LongStorage": np.dtype(np.int64),
    "IntStorage": np.dtype(np.int32),
    "ShortStorage": np.dtype(np.int16),
    "CharStorage": np.dtype(np.int8),
    "ByteStorage": np.dtype(np.uint8),
    "BoolStorage": np.dtype(np.bool_),
    "ComplexFloatStorage": np.dtype(np.complex64),
    "ComplexDoubleStorage": np.dtype(np.complex128),
    "UntypedStorage": np.dtype(np.uint8),
}


class RefusedGlobalError(pickle.UnpicklingError):
    """The file names a global outside the tensor-rebuild allowlist (never called)."""


class _StorageType:
    """Stands in for `torch.FloatStorage` etc.: only carries the element dtype."""

    def __init__(self, name):
        self.name = name
        self.dtype = STORAGE_DTYPES[name]


class _Storage:
    """A flat typed buffer: `numel` elements of `dtype`, starting `offset` elements into
    the bytes registered under `key` (legacy views share a root key)."""

    def __init__(self, key, dtype, numel, offset=0):
        self.key, self.dtype, self.numel, self.offset = key, dtype, numel, offset


class _LazyTensor:
    """A tensor whose bytes are read after unpickling (legacy files store them after
    the object pickle). `size`/`stride` are in elements, like torch's."""

    def __init__(self, storage, storage_offset, size, stride):
        if not isinstance(storage, _Storage):
            raise pickle.UnpicklingError(
                f"tensor rebuild got {type(storage).__name__}, not a storage")
        for name, v in (("size", size), ("stride", stride)):
            if not (isinstance(v, tuple) and all(isinstance(i, int) and i >= 0 for i in v)):
                raise pickle.UnpicklingError(f"tensor rebuild: bad {name} {v!r}")
        if len(size) != len(stride) or not isinstance(storage_offset, int):
            raise pickle.UnpicklingError(
                f"tensor rebuild: size {size} / stride {stride} / offset {storage_offset!r}")
        self.storage, self.offset = storage, storage_offset
        self.size, self.stride = size, stride

    def materialize(self, buffers):
        """buffers: key -> 1-D uint8 array of the root storage. Returns a contiguous copy."""
        st = self.storage
        flat = buffers[st.key].view(st.dtype)[st.offset:st.offset + st.numel]
        if 0 in self.size:
            return np.zeros(self.size, st.dtype)
        last = self.offset + sum((n - 1) * s for n, s in zip(self.size, self.stride))
        if self.offset < 0 or last >= flat.size:
            raise pickle.UnpicklingError(
                f"tensor of size {self.size} stride {self.stride} offset {self.offset} "
                f"reads past its storage of {flat.size} elements")
        strides = tuple(s * st.dtype.itemsize for s in self.stride)
        view = np.lib.stride_tricks.as_strided(
            flat[self.offset:], shape=self.size, strides=strides, writeable=False)
        return np.array(view, copy=True, order="C")


def _rebuild_tensor(storage, storage_offset, size, stride):
    return _LazyTensor(storage, storage_offset, tuple(size), tuple(stride))


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False,
                       backward_hooks=None, metadata=None):
    del requires_grad, backward_hooks, metadata  # autograd state: meaningless in numpy
    return _rebuild_tensor(storage, storage_offset, size, stride)


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None, state=None):
    del requires_grad, backward_hooks, state
    if not isinstance(data, _LazyTensor):
        raise pickle.UnpicklingError(f"parameter rebuild got {type(data).__name__}")
    return data


_ALLOWED_GLOBALS = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("torch", "Size"): tuple,
}


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that resolves only tensor-rebuild globals; storages come through
    `persistent_load` as `_Storage` descriptors (no bytes are read here)."""

    def __init__(self, file, legacy):
        super().__init__(file)
        self.legacy = legacy
        self.storages = {}  # root key -> _Storage spanning the whole root buffer

    def find_class(self, module, name):
        if module == "torch" and name in STORAGE_DTYPES:
            return _StorageType(name)
        fn = _ALLOWED_GLOBALS.get((module, name))
        if fn is None:
            raise RefusedGlobalError(
                f"refusing global '{module}.{name}': only tensor state dicts are loaded "
                "(allowed: torch tensor/parameter rebuilds, torch.*Storage, "
                "collections.OrderedDict)")
        return fn

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and pid and pid[0] in ("storage", b"storage")):
            raise pickle.UnpicklingError(f"unknown persistent id {pid!r:.80}")
        if self.legacy:
            if len(pid) != 6:
                raise pickle.UnpicklingError(f"legacy storage id of length {len(pid)}")
            _, stype, key, _location, numel, view = pid
        else:
            if len(pid) != 5:
                raise pickle.UnpicklingError(f"storage id of length {len(pid)}")
            _, stype, key, _location, numel = pid
            view = None
        if not isinstance(stype, _StorageType) or not isinstance(numel, int) or numel < 0:
            raise pickle.UnpicklingError(f"bad storage id {pid!r:.120}")
        key = str(key)
        root = self.storages.setdefault(key, _Storage(key, stype.dtype, numel))
        if view is None:
            return root
        _view_key, offset, view_size = view
        return _Storage(key, stype.dtype, view_size, offset)


def _flatten(obj, prefix, out):
    """Nested mappings -> {'a.b.c': array}; non-tensor leaves (epochs, configs) dropped."""
    if isinstance(obj, _LazyTensor):
        out[prefix] = obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            _flatten(v, f"{prefix}.{k}" if prefix else str(k), out)


def _check_little_endian(byteorder, path):
    if byteorder not in (None, "little"):
        raise ValueError(f"{path}: big-endian torch checkpoints are not supported")


def _load_zip(path, zf):
    names = zf.namelist()
    pkl = [n for n in names if n.endswith("/data.pkl") and n.count("/") == 1]
    if len(pkl) != 1:
        raise ValueError(f"{path}: zip archive without a single '<archive>/data.pkl' "
                         f"(is it a TorchScript or non-torch zip?), found {names[:8]}")
    root = pkl[0][: -len("data.pkl")]
    if root + "byteorder" in names:
        _check_little_endian(zf.read(root + "byteorder").decode().strip(), path)
    unpickler = _RestrictedUnpickler(io.BytesIO(zf.read(pkl[0])), legacy=False)
    obj = unpickler.load()
    buffers = {}
    for key, st in unpickler.storages.items():
        raw = zf.read(f"{root}data/{key}")
        if len(raw) < st.numel * st.dtype.itemsize:
            raise ValueError(f"{path}: storage {key} holds {len(raw)} bytes, "
                             f"expected {st.numel * st.dtype.itemsize}")
        buffers[key] = np.frombuffer(raw, np.uint8)
    return obj, buffers


def _load_legacy(path, f):
    try:
        magic = _RestrictedUnpickler(f, legacy=True).load()
    except RefusedGlobalError:
        raise
    except Exception as e:  # e.g. a pre-0.4 tar checkpoint or a random file
        raise ValueError(f"{path}: neither a zip nor a legacy torch checkpoint ({e})") from None
    if magic != LEGACY_MAGIC:
        raise ValueError(f"{path}: not a torch checkpoint (bad magic number {magic!r:.40})")
    protocol = _RestrictedUnpickler(f, legacy=True).load()
    if protocol != LEGACY_PROTOCOL:
        raise ValueError(f"{path}: unsupported legacy protocol version {protocol}")
    sys_info = _RestrictedUnpickler(f, legacy=True).load()
    _check_little_endian("little" if sys_info.get("little_endian", True) else "big", path)
    unpickler = _RestrictedUnpickler(f, legacy=True)
    obj = unpickler.load()
    keys = _RestrictedUnpickler(f, legacy=True).load()
    buffers = {}
    for key in keys:
        key = str(key)
        st = unpickler.storages.get(key)
        if st is None:
            raise ValueError(f"{path}: storage key {key} listed but never used")
        (numel,) = struct.unpack("<q", f.read(8))
        nbytes = numel * st.dtype.itemsize
        raw = f.read(nbytes)
        if numel != st.numel or len(raw) != nbytes:
            raise ValueError(f"{path}: storage {key} is truncated or inconsistent "
                             f"({len(raw)} bytes read, {st.numel} elements expected)")
        buffers[key] = np.frombuffer(raw, np.uint8)
    return obj, buffers


def load_torch_pickle(path):
    """Loads the tensors of a `torch.save` file (zip or legacy format) without torch.

    Args:
      path: a `.pt` / `.pth` / `.bin` file holding a (possibly nested) dict of tensors.
    Returns:
      {name: np.ndarray} in the file's order; nested dicts are joined with '.',
      non-tensor entries are dropped. bfloat16 comes back as `ml_dtypes.bfloat16`.
    Raises:
      RefusedGlobalError (a pickle.UnpicklingError) naming the global if the file
      references anything besides tensor-rebuild functions (nothing it names is ever
      called); ValueError for files that are not torch checkpoints.
    """
    path = str(path)
    with open(path, "rb") as f:
        if zipfile.is_zipfile(f):
            f.seek(0)
            with zipfile.ZipFile(f) as zf:
                obj, buffers = _load_zip(path, zf)
        else:
            f.seek(0)
            obj, buffers = _load_legacy(path, f)
    if isinstance(obj, _LazyTensor):
        raise ValueError(f"{path}: holds a single tensor, expected a dict of tensors")
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: top-level object is {type(obj).__name__}, expected a dict")
    lazy = {}
    _flatten(obj, "", lazy)
    return {k: t.materialize(buffers) for k, t in lazy.items()}
