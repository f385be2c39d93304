"""The safetensors file format, read and written by hand.

A file is: 8-byte little-endian header length H, H bytes of JSON (``{name: {dtype, shape, data_offsets}}`` plus an
optional ``__metadata__``), then the tensor bytes; offsets are relative to the end of the header.

Reading goes through the header and ``pread`` at each tensor's offsets, never an mmap of the whole file (a private
mapping of a 25 GB shard counts against host memory). Writing streams: the header is known from the plan before
any data exists, so a shard of any size is written with one tensor in memory at a time.
"""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass
from functools import lru_cache

import torch

from .errors import KitError

# safetensors dtype name -> (torch dtype, bytes per element)
DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "F8_E8M0": torch.float8_e8m0fnu,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
HEADER_LIMIT = 100 * 1024 * 1024  # safetensors' own bound on the JSON header


class SafetensorsError(KitError, ValueError):
    """A file that is not valid safetensors; the message names the file (and tensor)."""


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives: enough to read it without touching any other byte of the file."""

    name: str
    file: str  # absolute path of the shard
    dtype: str  # safetensors dtype name
    shape: tuple[int, ...]
    begin: int  # absolute byte offset in the file
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]


@lru_cache(maxsize=None)  # called per tensor: 145k headers must not each allocate a torch tensor
def element_size(dtype: str) -> int:
    return torch.empty((), dtype=DTYPES[dtype]).element_size()


def read_header(path: str) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Tensors and ``__metadata__`` of one file, checked for consistency against the file size."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise SafetensorsError(f"{path}: shorter than the 8-byte header length ({size} bytes)")
            (hlen,) = struct.unpack("<Q", raw)
            if hlen > HEADER_LIMIT or 8 + hlen > size:
                raise SafetensorsError(f"{path}: header length {hlen} does not fit in a file of {size} bytes")
            header = json.loads(f.read(hlen))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SafetensorsError(f"{path}: header is not valid JSON ({e})") from None
    if not isinstance(header, dict):
        raise SafetensorsError(f"{path}: header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    base = 8 + hlen
    tensors: dict[str, TensorInfo] = {}
    for name, entry in header.items():
        try:
            dtype, shape, (b, e) = entry["dtype"], tuple(int(d) for d in entry["shape"]), entry["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise SafetensorsError(f"{path}: tensor {name}: malformed header entry {entry!r}") from None
        if dtype not in DTYPES:
            raise SafetensorsError(f"{path}: tensor {name}: unknown dtype {dtype!r}")
        if e - b != math.prod(shape) * element_size(dtype) or b < 0:
            raise SafetensorsError(f"{path}: tensor {name}: data_offsets [{b}, {e}] do not fit {dtype} {list(shape)}")
        if base + e > size:
            raise SafetensorsError(
                f"{path}: tensor {name} ends at byte {base + e} but the file has {size} bytes (truncated shard?)"
            )
        tensors[name] = TensorInfo(name, os.path.abspath(path), dtype, shape, base + b, base + e)
    return tensors, metadata


def read_tensor(info: TensorInfo, fd: int | None = None) -> torch.Tensor:
    """Read one tensor with ``pread`` into a fresh CPU tensor."""
    out = torch.empty(info.shape, dtype=info.torch_dtype)
    read_into(info, out, fd)
    return out


def read_into(info: TensorInfo, out: torch.Tensor, fd: int | None = None) -> None:
    """Fill ``out`` (contiguous CPU, e.g. a pinned buffer) with the tensor's bytes."""
    view = memoryview(out.reshape(-1).view(torch.uint8).numpy())
    assert len(view) >= info.nbytes
    own = fd is None
    if own:
        fd = os.open(info.file, os.O_RDONLY)
    try:
        done = 0
        while done < info.nbytes:
            n = os.preadv(fd, [view[done : info.nbytes]], info.begin + done)
            if n <= 0:
                raise SafetensorsError(f"{info.file}: tensor {info.name}: file ended while reading (truncated shard?)")
            done += n
    finally:
        if own:
            os.close(fd)


@dataclass(frozen=True)
class TensorSpec:
    """An output tensor known before its data exists."""

    name: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * element_size(self.dtype)


def encode_header(specs: list[TensorSpec], metadata: dict[str, str] | None = None) -> bytes:
    """The 8-byte length plus JSON header for tensors laid out in the given order, padded to 8 bytes."""
    header: dict[str, object] = {"__metadata__": metadata or {"format": "pt"}}
    offset = 0
    for s in specs:
        header[s.name] = {"dtype": s.dtype, "shape": list(s.shape), "data_offsets": [offset, offset + s.nbytes]}
        offset += s.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """The raw bytes of a CPU tensor, little-endian as safetensors stores them."""
    t = t.detach().contiguous()
    return memoryview(t.reshape(-1).view(torch.uint8).numpy())


def spec_of(name: str, t: torch.Tensor) -> TensorSpec:
    return TensorSpec(name, DTYPE_NAMES[t.dtype], tuple(t.shape))


def save_file(tensors: dict[str, torch.Tensor], path: str, metadata: dict[str, str] | None = None) -> None:
    """Write a whole safetensors file from in-memory tensors (small files: the generator and tests)."""
    specs = [spec_of(n, t) for n, t in tensors.items()]
    with open(path, "wb") as f:
        f.write(encode_header(specs, metadata))
        for n in tensors:
            f.write(tensor_bytes(tensors[n].cpu()))
