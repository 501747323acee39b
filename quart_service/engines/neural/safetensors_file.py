"""The safetensors format: read by mapping the file read-only, written atomically.

A safetensors file is an 8-byte little-endian header length, a JSON header (each
tensor's dtype, shape and byte range, plus an optional ``__metadata__`` of strings),
then the tensors' bytes. Reading maps the whole file read-only (``mmap``) and makes
each tensor a numpy view of its byte range: no read, no copy. The pages are the
kernel's page cache, shared by every process that maps the file, so N workers hold
one copy of the weights per host, and each worker's PSS counts 1/N of them.

The ``safetensors`` package's numpy loader is not used on purpose: ``load_file`` and
``safe_open(...).get_tensor`` both return writeable arrays that own a private copy of
the bytes (measured with 0.8.0: a 64 MB tensor adds 64 MB of anonymous memory per
process), which is exactly the per-worker cost this module avoids.

A mapped file must be replaced by renaming a new file over it, never rewritten in
place: a process reading a page the writer truncated away gets SIGBUS.
"""

from __future__ import annotations

import json
import mmap
import os
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from math import prod
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from ...errors import EngineError

__all__ = ["DTYPES", "MappedSafetensors", "TensorInfo", "write_safetensors"]

# safetensors dtype names and their numpy types (all little-endian); BF16 has no
# numpy type and is read as its raw 16 bits.
DTYPES: dict[str, np.dtype[Any]] = {
    "F64": np.dtype("<f8"),
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype("<u2"),
    "I64": np.dtype("<i8"),
    "I32": np.dtype("<i4"),
    "I16": np.dtype("<i2"),
    "I8": np.dtype("i1"),
    "U8": np.dtype("u1"),
    "BOOL": np.dtype("?"),
}
_NAMES = {dtype: name for name, dtype in DTYPES.items() if name != "BF16"}
# The reference implementation refuses headers over 100 MB; so do we.
_MAX_HEADER = 100 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class TensorInfo:
    """Where one tensor lives in the file: byte range relative to the data section."""

    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int


class MappedSafetensors:
    """A safetensors file mapped read-only; :meth:`tensor` returns zero-copy views."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        try:
            with self.path.open("rb") as handle:
                size = os.fstat(handle.fileno()).st_size
                if size < 8:
                    raise EngineError(f"{self.path}: not a safetensors file (too short)")
                (header_size,) = struct.unpack("<Q", handle.read(8))
                if header_size > min(_MAX_HEADER, size - 8):
                    raise EngineError(
                        f"{self.path}: not a safetensors file (header of {header_size} bytes)"
                    )
                header = _parse_header(self.path, handle.read(header_size))
                # The mapping keeps its own reference to the file; closing ours is fine.
                self._map = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)
        except OSError as exc:
            raise EngineError(f"cannot read weights file {self.path}: {exc}") from exc
        if hasattr(mmap, "MADV_WILLNEED"):
            # Start reading the file into the page cache now, not page by page at the
            # first forward pass (this process's memory is not touched by it).
            self._map.madvise(mmap.MADV_WILLNEED)
        self._data_start = 8 + header_size
        metadata = header.pop("__metadata__", None) or {}
        if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
            raise EngineError(f"{self.path}: __metadata__ must map names to strings")
        self.metadata: dict[str, str] = metadata
        self.tensors: dict[str, TensorInfo] = {
            name: _tensor_info(self.path, name, entry, size - self._data_start)
            for name, entry in header.items()
        }

    def tensor(self, name: str) -> npt.NDArray[Any]:
        """The tensor as a read-only numpy view of the mapped file (no copy)."""
        info = self.tensors[name]
        dtype = DTYPES[info.dtype]
        array = np.frombuffer(
            self._map,
            dtype=dtype,
            count=prod(info.shape),
            offset=self._data_start + info.begin,
        )
        return array.reshape(info.shape)


def _parse_header(path: Path, raw: bytes) -> dict[str, Any]:
    try:
        header = json.loads(raw)
    except ValueError as exc:
        raise EngineError(f"{path}: not a safetensors file (bad JSON header: {exc})") from exc
    if not isinstance(header, dict):
        raise EngineError(f"{path}: not a safetensors file (the header is no object)")
    return header


def _tensor_info(path: Path, name: str, entry: Any, data_size: int) -> TensorInfo:
    try:
        dtype = entry["dtype"]
        shape = tuple(int(n) for n in entry["shape"])
        begin, end = (int(n) for n in entry["data_offsets"])
    except (KeyError, TypeError, ValueError) as exc:
        raise EngineError(f"{path}: tensor {name!r} has a malformed header entry") from exc
    if dtype not in DTYPES:
        raise EngineError(f"{path}: tensor {name!r} has dtype {dtype}, which is not supported")
    expected = prod(shape) * DTYPES[dtype].itemsize
    if not 0 <= begin <= end <= data_size or end - begin != expected or min(shape, default=0) < 0:
        raise EngineError(
            f"{path}: tensor {name!r} ({dtype} {list(shape)}) does not fit its byte range "
            f"[{begin}, {end}) in {data_size} data bytes"
        )
    return TensorInfo(dtype, shape, begin, end)


def write_safetensors(
    path: Path, tensors: Mapping[str, npt.NDArray[Any]], metadata: Mapping[str, str]
) -> None:
    """Write ``tensors`` (in order) and ``metadata`` as a safetensors file.

    Written to a temporary name and renamed over ``path``, so a process that has the
    old file mapped keeps reading it intact. The header is padded to 8 bytes, so
    every tensor starts aligned (as the reference implementation does)."""
    header: dict[str, Any] = {"__metadata__": dict(metadata)} if metadata else {}
    arrays: list[npt.NDArray[Any]] = []
    offset = 0
    for name, value in tensors.items():
        array = np.ascontiguousarray(value, dtype=value.dtype.newbyteorder("<"))
        dtype = _NAMES.get(array.dtype)
        if dtype is None:
            raise EngineError(f"tensor {name!r}: dtype {array.dtype} cannot be written")
        header[name] = {
            "dtype": dtype,
            "shape": list(array.shape),
            "data_offsets": [offset, offset + array.nbytes],
        }
        offset += array.nbytes
        arrays.append(array)
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)
    path = Path(path)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with temporary.open("wb") as handle:
            handle.write(struct.pack("<Q", len(encoded)))
            handle.write(encoded)
            for array in arrays:
                array.tofile(handle)
        temporary.replace(path)
    finally:
        temporary.unlink(missing_ok=True)
