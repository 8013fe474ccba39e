"""Row-level safetensors I/O without loading whole tensors: positioned reads, pre-laid-out writes.

A safetensors file is an 8-byte header length, a JSON header (name -> dtype, shape, byte range)
and the raw bytes of each tensor, row-major. The merge reads row ranges of input tensors with
`os.pread` (no page-cache mapping counted against the process) and writes merged rows at their
final offsets of an output file whose header is written up front, so no tensor or shard is ever
held whole in memory.
"""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fishmerge.errors import FishmergeError
from fishmerge.io.checkpoint import ITEMSIZE, read_header_and_size, safetensors_files

READABLE = {"F64", "F32", "F16", "BF16", "I64", "I32", "I16", "I8", "U8", "BOOL"}
FLOAT_DTYPES = {"F32", "F16", "BF16", "F64"}
DTYPE_NAMES = {"float32": "F32", "bfloat16": "BF16", "float16": "F16"}  # config `dtype` -> safetensors
_NUMPY = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "I64": np.int64, "I32": np.int32}


@dataclass(frozen=True)
class TensorRef:
    """Where one tensor's bytes live: file, absolute byte offset, dtype, shape."""

    file: str
    offset: int
    dtype: str
    shape: tuple[int, ...]

    @property
    def row_elems(self) -> int:
        """Elements per leading-dimension row (1-D and 0-D tensors: one element per row)."""
        return math.prod(self.shape[1:]) if len(self.shape) > 1 else 1

    @property
    def rows(self) -> int:
        return self.shape[0] if self.shape else 1

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * ITEMSIZE[self.dtype]


def tensor_index(model_dir: str | Path) -> dict[str, TensorRef]:
    """Every tensor of a checkpoint (all shards) by key, without reading tensor data."""
    out: dict[str, TensorRef] = {}
    for f in safetensors_files(model_dir):
        header, size = read_header_and_size(f)
        for key, v in header.items():
            if v["dtype"] not in READABLE:
                raise FishmergeError(f"tensor '{key}' in '{f}' has dtype {v['dtype']}, which fishmerge cannot read")
            out[key] = TensorRef(str(f), 8 + size + v["data_offsets"][0], v["dtype"], tuple(v["shape"]))
    return out


def read_raw(ref: TensorRef, r0: int, r1: int) -> bytes:
    """The raw bytes of rows [r0, r1)."""
    step = ref.row_elems * ITEMSIZE[ref.dtype]
    n = (r1 - r0) * step
    fd = os.open(ref.file, os.O_RDONLY)
    try:
        buf = os.pread(fd, n, ref.offset + r0 * step)
        while len(buf) < n:  # pread may return less on some filesystems
            more = os.pread(fd, n - len(buf), ref.offset + r0 * step + len(buf))
            if not more:
                raise FishmergeError(f"'{ref.file}' is truncated: re-save or re-copy this checkpoint")
            buf += more
    finally:
        os.close(fd)
    return buf


def decode(raw: bytes, dtype: str, shape: tuple[int, ...]) -> np.ndarray:
    """Raw safetensors bytes -> float32 array (bf16 widened exactly by a 16-bit shift)."""
    if dtype == "BF16":
        bits = np.frombuffer(raw, dtype=np.uint16).astype(np.uint32) << 16
        return bits.view(np.float32).reshape(shape)
    return np.frombuffer(raw, dtype=_NUMPY[dtype]).astype(np.float32).reshape(shape)


def read_rows(ref: TensorRef, r0: int, r1: int) -> np.ndarray:
    """Rows [r0, r1) of a tensor as float32, shaped (r1 - r0, *shape[1:])."""
    return decode(read_raw(ref, r0, r1), ref.dtype, (r1 - r0, *ref.shape[1:]))


def encode(values: np.ndarray, dtype: str) -> bytes:
    """float32 values -> raw bytes of `dtype`; bf16 rounds to nearest even, as torch does."""
    v = np.ascontiguousarray(values, dtype=np.float32)
    if dtype == "F32":
        return v.tobytes()
    if dtype == "BF16":
        u = v.view(np.uint32)
        rounded = ((u + np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)).astype(np.uint16)
        nan = np.isnan(v)
        if nan.any():
            rounded[nan] = 0x7FC0
        return rounded.tobytes()
    if dtype in ("F16", "F64"):
        with np.errstate(over="ignore"):  # overflow becomes Inf; the executor refuses it (encode_finite)
            return v.astype(_NUMPY[dtype]).tobytes()
    raise FishmergeError(f"cannot write merged values as {dtype}")


@dataclass
class OutputTensor:
    """One tensor of an output file: key, dtype, shape and its absolute byte offset once laid out."""

    key: str
    dtype: str
    shape: tuple[int, ...]
    offset: int = 0

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * ITEMSIZE[self.dtype]

    @property
    def row_bytes(self) -> int:
        return (math.prod(self.shape[1:]) if len(self.shape) > 1 else 1) * ITEMSIZE[self.dtype]


def layout_file(tensors: list[OutputTensor]) -> tuple[bytes, int]:
    """Header bytes (8-byte length + JSON padded to 8) for these tensors in order; sets their offsets.

    Returns (header, total file size).
    """
    header: dict = {"__metadata__": {"format": "pt"}}
    pos = 0
    for t in tensors:
        header[t.key] = {"dtype": t.dtype, "shape": list(t.shape), "data_offsets": [pos, pos + t.nbytes]}
        t.offset = pos
        pos += t.nbytes
    body = json.dumps(header, separators=(",", ":")).encode()
    body += b" " * (-len(body) % 8)
    start = 8 + len(body)
    for t in tensors:
        t.offset += start
    return struct.pack("<Q", len(body)) + body, start + pos


def create_file(path: Path, header: bytes, size: int) -> None:
    """A file of its final size with its header in place; tensor bytes are filled in later."""
    with open(path, "wb") as f:
        f.write(header)
        f.truncate(size)


def write_rows(path: str, tensor: OutputTensor, r0: int, data: bytes) -> None:
    """Write encoded rows starting at row r0 of `tensor` in place."""
    fd = os.open(path, os.O_WRONLY)
    try:
        pos, view = tensor.offset + r0 * tensor.row_bytes, memoryview(data)
        while view:
            n = os.pwrite(fd, view, pos)
            pos, view = pos + n, view[n:]
    finally:
        os.close(fd)
