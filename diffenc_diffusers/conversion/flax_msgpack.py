"""Reading and writing the msgpack files of `flax.serialization` without JAX.

`flax.training.checkpoints.save_checkpoint` (legacy, non-Orbax format, as flax 0.6 writes it) and clu's
`Checkpoint` (`ckpt-N.flax`) store ``flax.serialization.to_bytes(state)``: a msgpack map of the state dict
(nested string-keyed maps; tuples and lists become maps with keys "0", "1", ...) whose array leaves are msgpack
extension objects:

- type 1 (ndarray): the payload is itself msgpack, the array ``[shape, dtype_name, C-order bytes]``;
- type 3 (numpy scalar): the same payload for a 0-d array;
- type 2 (complex): the payload is msgpack ``[real, imag]``.

Arrays larger than 2**30 bytes are stored as a map ``{"__msgpack_chunked_array__": True, "shape": {...},
"chunks": {"0": flat array, ...}}``. Nothing here unpickles or executes anything from the file: only numeric
dtypes are decoded.
"""

from __future__ import annotations

import math
import mmap
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

EXT_NDARRAY = 1
EXT_COMPLEX = 2
EXT_NPSCALAR = 3
CHUNKED_ARRAY_KEY = "__msgpack_chunked_array__"

DECODABLE_DTYPES = frozenset(
    ["bool", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64", "float16", "float32", "float64"]
)
"""dtype names whose arrays are decoded; any other (e.g. JAX's bfloat16) becomes an `UndecodedArray`."""


@dataclass(frozen=True)
class UndecodedArray:
    """An array leaf whose dtype is not one of :data:`DECODABLE_DTYPES` (kept undecoded; using it is an error)."""

    dtype_name: str
    shape: tuple[int, ...]


def _msgpack():
    try:
        import msgpack
    except ImportError as error:
        raise ImportError(
            "Reading flax checkpoints needs the `msgpack` package: pip install 'diffenc-diffusers[convert]' "
            "(or pip install 'msgpack>=1.0')."
        ) from error
    return msgpack


def _decode_array(payload: bytes) -> np.ndarray | UndecodedArray:
    msgpack = _msgpack()
    shape, dtype_name, buffer = msgpack.unpackb(payload, raw=False)
    if isinstance(dtype_name, bytes):
        dtype_name = dtype_name.decode("ascii")
    shape = tuple(int(size) for size in shape)
    if dtype_name not in DECODABLE_DTYPES:
        return UndecodedArray(str(dtype_name), shape)
    dtype = np.dtype(dtype_name)
    if len(buffer) != math.prod(shape) * dtype.itemsize:
        raise ValueError(
            f"an array of shape {shape} and dtype {dtype_name} holds {len(buffer)} bytes instead of "
            f"{math.prod(shape) * dtype.itemsize}"
        )
    return np.frombuffer(buffer, dtype=dtype).reshape(shape)


def _ext_hook(code: int, payload: bytes) -> Any:
    msgpack = _msgpack()
    if code == EXT_NDARRAY:
        return _decode_array(payload)
    if code == EXT_NPSCALAR:
        array = _decode_array(payload)
        return array if isinstance(array, UndecodedArray) else array[()]
    if code == EXT_COMPLEX:
        real, imag = msgpack.unpackb(payload)
        return complex(real, imag)
    raise ValueError(f"unknown msgpack extension type {code} (flax writes types 1, 2 and 3)")


def _unchunk(tree: Any) -> Any:
    if not isinstance(tree, dict):
        return tree
    if tree.get(CHUNKED_ARRAY_KEY) is True:
        shape = tuple(int(tree["shape"][str(i)]) for i in range(len(tree["shape"])))
        chunks = [tree["chunks"][str(i)] for i in range(len(tree["chunks"]))]
        return np.concatenate(chunks).reshape(shape)
    return {key: _unchunk(value) for key, value in tree.items()}


def load_flax_msgpack(path: str | os.PathLike) -> dict[str, Any]:
    """Decode a file written by `flax.serialization.to_bytes` / `msgpack_serialize` into nested dicts of numpy
    arrays (read-only views of the file's bytes), Python numbers and strings.

    Raises:
        ImportError: `msgpack` is not installed.
        FileNotFoundError: `path` does not exist.
        IsADirectoryError: `path` is a folder (an Orbax checkpoint is a folder; it is not this format).
        ValueError: The file is empty, truncated, corrupted, or not a msgpack map.
    """
    msgpack = _msgpack()
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(
            f"{str(path)!r} is a folder; expected a flax msgpack checkpoint file (checkpoint_<step> or "
            "ckpt-<n>.flax). Orbax checkpoint folders are not supported: save with "
            "flax.config.update('flax_use_orbax_checkpointing', False) or convert them to msgpack first."
        )
    if not path.is_file():
        raise FileNotFoundError(f"No checkpoint file at {str(path)!r}.")
    if path.stat().st_size == 0:
        raise ValueError(f"{str(path)!r} is empty; expected a flax msgpack checkpoint.")
    with path.open("rb") as handle, mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as buffer:
        try:
            tree = msgpack.unpackb(buffer, ext_hook=_ext_hook, raw=False, strict_map_key=False)
        except (msgpack.ExtraData, msgpack.FormatError, msgpack.StackError, ValueError, TypeError) as error:
            raise ValueError(
                f"{str(path)!r} is not a readable flax msgpack checkpoint (truncated or corrupted?): {error}"
            ) from error
    if not isinstance(tree, dict):
        raise ValueError(
            f"{str(path)!r} decodes to a {type(tree).__name__}, not a map; it is not a flax state dict."
        )
    try:
        return _unchunk(tree)
    except (KeyError, TypeError, ValueError) as error:
        raise ValueError(f"{str(path)!r} holds a malformed chunked array: {error}") from error


def _ext_default(value: Any) -> Any:
    msgpack = _msgpack()
    if isinstance(value, np.ndarray):
        if value.dtype.name not in DECODABLE_DTYPES:
            raise TypeError(f"cannot write an array of dtype {value.dtype}")
        payload = msgpack.packb((value.shape, value.dtype.name, value.tobytes("C")), use_bin_type=True)
        return msgpack.ExtType(EXT_NDARRAY, payload)
    if isinstance(value, np.generic):
        payload = msgpack.packb((tuple(), value.dtype.name, np.asarray(value).tobytes("C")), use_bin_type=True)
        return msgpack.ExtType(EXT_NPSCALAR, payload)
    if isinstance(value, complex):
        return msgpack.ExtType(EXT_COMPLEX, msgpack.packb((value.real, value.imag)))
    raise TypeError(f"cannot write a {type(value).__name__} into a flax msgpack file")


def save_flax_msgpack(path: str | os.PathLike, tree: dict[str, Any]) -> None:
    """Write nested dicts of numpy arrays and Python scalars in the format of `flax.serialization.to_bytes`
    (arrays below 2**30 bytes only; no chunking). Used by the tests to build checkpoints without JAX."""
    msgpack = _msgpack()
    Path(path).write_bytes(msgpack.packb(tree, default=_ext_default, strict_types=True))
