"""A restricted unpickler: a pickle becomes plain data, tensors and inert records, never code.

`restricted_load(path, allowed, ...)` unpickles with an allow-list of globals instead of importing
what the file names: TENSOR_GLOBALS rebuilds tensors (storages read with torch.load(weights_only=True)),
plain containers, numpy scalars and small numeric arrays (read without numpy), and turns stock torch
containers into inert records of their state; a format adds the stand-ins of its own classes
(edm.models.nvlabs). Any other global is refused with an UnpicklingError that names it.
"""

from __future__ import annotations

import collections
import io
import math
import os
import pickle
import struct
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

import torch
from torch import Tensor

__all__ = ["TorchModuleRecord", "TENSOR_GLOBALS", "RestrictedUnpickler", "restricted_load", "array_values"]


class TorchModuleRecord:
    """Inert stand-in for a stock torch container (ModuleDict, ...): holds the pickled `__dict__`."""

    def __init__(self, *args: Any) -> None:
        self.state: dict = {}

    def __setstate__(self, state: Any) -> None:
        if not isinstance(state, dict):
            raise pickle.UnpicklingError(f"torch module state of type {type(state).__name__}")
        self.state = state


# numpy dtype codes (kind + item size) that may hold a scalar hyper-parameter, as struct formats.
_NUMPY_FORMATS = MappingProxyType({
    "f8": "d", "f4": "f", "f2": "e", "i8": "q", "i4": "i", "i2": "h", "i1": "b",
    "u8": "Q", "u4": "I", "u2": "H", "u1": "B", "b1": "?",
})


class _NumpyDType:
    """Stand-in for numpy.dtype(code, align, copy): records the code and, via __setstate__, the byte order."""

    def __init__(self, code: Any = None, align: Any = False, copy: Any = False) -> None:
        if code not in _NUMPY_FORMATS:
            raise pickle.UnpicklingError(f"numpy dtype {code!r} is not a numeric scalar type")
        self.code = code
        self.byteorder = "<"

    def __setstate__(self, state: Any) -> None:
        if isinstance(state, tuple) and len(state) > 1 and state[1] in ("<", ">", "|", "="):
            self.byteorder = state[1]


def _numpy_scalar(dtype: Any, data: Any = None) -> int | float | bool:
    """Stand-in for numpy.core.multiarray.scalar(dtype, bytes): decode to the Python number."""
    if not isinstance(dtype, _NumpyDType) or not isinstance(data, bytes):
        raise pickle.UnpicklingError("numpy scalar with an unsupported dtype or payload")
    order = ">" if dtype.byteorder == ">" else "<"
    fmt = order + _NUMPY_FORMATS[dtype.code]
    if len(data) != struct.calcsize(fmt):
        raise pickle.UnpicklingError(f"numpy scalar of dtype {dtype.code} has {len(data)} bytes")
    return struct.unpack(fmt, data)[0]


class _NumpyArray:
    """Stand-in for numpy.core.multiarray._reconstruct(ndarray, shape, dtype) + its __setstate__: the raw
    bytes of a small numeric array, decoded by array_values (edm2's VAE encoder stores its scale and bias so)."""

    def __init__(self, subtype: Any = None, shape: Any = None, dtype: Any = None) -> None:
        if subtype is not _NDARRAY:
            raise pickle.UnpicklingError("numpy array of a subtype other than ndarray")
        self.shape: tuple = ()
        self.dtype: _NumpyDType | None = None
        self.data = b""

    def __setstate__(self, state: Any) -> None:
        if not (isinstance(state, tuple) and len(state) == 5 and isinstance(state[2], _NumpyDType)
                and isinstance(state[4], bytes) and all(isinstance(v, int) for v in state[1])):
            raise pickle.UnpicklingError("numpy array state is not (version, shape, dtype, fortran, bytes)")
        self.shape, self.dtype, self.data = tuple(state[1]), state[2], state[4]


_NDARRAY = object()  # what the pickle's numpy.ndarray global resolves to: only _NumpyArray accepts it


def array_values(array: Any) -> list | float | None:
    """The numbers of a _NumpyArray (a flat list, or a float for a 0-d array); None if absent."""
    if array is None:
        return None
    if isinstance(array, (int, float)):
        return float(array)
    if not isinstance(array, _NumpyArray) or array.dtype is None:
        raise ValueError(f"expected a numeric numpy array, found {type(array).__name__}")
    order = ">" if array.dtype.byteorder == ">" else "<"
    count = math.prod(array.shape)
    fmt = f"{order}{count}{_NUMPY_FORMATS[array.dtype.code]}"
    if len(array.data) != struct.calcsize(fmt):
        raise ValueError(f"numpy array of shape {array.shape} has {len(array.data)} bytes")
    values = [float(v) for v in struct.unpack(fmt, array.data)]
    return values if array.shape else values[0]


def _storage_from_bytes(data: Any) -> Any:
    """Safe `torch.storage._load_from_bytes`: the storage blob is read with weights_only=True."""
    if not isinstance(data, bytes):
        raise pickle.UnpicklingError(f"storage payload of type {type(data).__name__}")
    try:
        storage = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as err:  # torch's safe unpickler refused or failed: name it
        raise pickle.UnpicklingError(f"tensor storage blob refused by torch.load(weights_only=True): {err}") from None
    if not isinstance(storage, (torch.TypedStorage, torch.UntypedStorage)):
        raise pickle.UnpicklingError(f"tensor storage blob holds a {type(storage).__name__}, not a storage")
    return storage


def _rebuild_tensor(
    storage: Any, storage_offset: Any, size: Any, stride: Any, requires_grad: Any = False,
    backward_hooks: Any = None, metadata: Any = None,
) -> Tensor:
    """`torch._utils._rebuild_tensor_v2` on a checked storage; hooks and metadata are dropped."""
    if not isinstance(storage, (torch.TypedStorage, torch.UntypedStorage)):
        raise pickle.UnpicklingError(f"tensor rebuilt from a {type(storage).__name__}, not a storage")
    if not isinstance(storage_offset, int) or not all(isinstance(v, int) for v in (*size, *stride)):
        raise pickle.UnpicklingError("tensor with a non-integer offset, size or stride")
    no_hooks = collections.OrderedDict()
    return torch._utils._rebuild_tensor_v2(storage, storage_offset, tuple(size), tuple(stride), False, no_hooks)


def _rebuild_parameter(data: Any, requires_grad: Any = False, backward_hooks: Any = None, state: Any = None) -> Tensor:
    """`torch._utils._rebuild_parameter(_with_state)`: we only need the tensor."""
    if not isinstance(data, Tensor):
        raise pickle.UnpicklingError(f"parameter rebuilt from a {type(data).__name__}")
    return data


# (module, name) -> harmless stand-in: the globals that tensors, containers and numpy numbers need.
TENSOR_GLOBALS: Mapping[tuple[str, str], Any] = MappingProxyType({
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("torch.storage", "_load_from_bytes"): _storage_from_bytes,
    ("torch.nn.modules.container", "ModuleDict"): TorchModuleRecord,
    ("torch.nn.modules.container", "ModuleList"): TorchModuleRecord,
    ("torch.nn.modules.container", "Sequential"): TorchModuleRecord,
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("numpy", "dtype"): _NumpyDType,
    ("numpy.core.multiarray", "scalar"): _numpy_scalar,
    ("numpy._core.multiarray", "scalar"): _numpy_scalar,
    ("numpy.core.multiarray", "_reconstruct"): _NumpyArray,
    ("numpy._core.multiarray", "_reconstruct"): _NumpyArray,
    ("numpy", "ndarray"): _NDARRAY,
})


class RestrictedUnpickler(pickle.Unpickler):
    """pickle.Unpickler that resolves globals only through `allowed` and has no persistent ids; `what` names the
    kind of file for the messages."""

    def __init__(self, file: Any, allowed: Mapping[tuple[str, str], Any], what: str) -> None:
        super().__init__(file)
        self.allowed, self.what = allowed, what

    def find_class(self, module: str, name: str) -> Any:
        try:
            return self.allowed[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(
                f"refusing global {module}.{name}: {self.what} references only its records, tensors and plain "
                "containers, and loading this one would call other code"
            ) from None

    def persistent_load(self, pid: Any) -> Any:
        raise pickle.UnpicklingError(f"persistent id {pid!r}: {self.what} has none (a torch.save file?)")


_ZIP_MAGIC = b"PK\x03\x04"
_TORCH_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C


def restricted_load(path: str | os.PathLike, allowed: Mapping[tuple[str, str], Any], what: str,
                    error: type[Exception] = pickle.UnpicklingError) -> Any:
    """The object stored in pickle file `path`, built only from `allowed`; `error` (naming the file and the
    cause) for anything else: a missing, empty, truncated or torch.save file, or a refused global."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise error(f"{path}: no such file")
    with open(path, "rb") as f:
        head = f.read(4)
        if not head:
            raise error(f"{path}: the file is empty, not {what}")
        if head == _ZIP_MAGIC:
            raise error(f"{path}: this is a zip archive (a torch.save checkpoint), not {what}; an edm checkpoint "
                        "needs no conversion: pass it as checkpoint= to any command (edm-export writes its model "
                        "folder), or load it with edm.models.checkpoint.load_denoiser")
        f.seek(0)
        try:
            obj = RestrictedUnpickler(f, allowed, what).load()
        except EOFError:
            raise error(f"{path}: the pickle ends early (truncated download?)") from None
        except Exception as err:  # any failure of the restricted unpickler: report it with the file name
            raise error(f"{path}: not a loadable {what.removeprefix('an ').removeprefix('a ')}: "
                        f"{type(err).__name__}: {err}") from None
    if isinstance(obj, int) and obj == _TORCH_LEGACY_MAGIC:
        raise error(f"{path}: this is a legacy torch.save file, not {what}")
    return obj
