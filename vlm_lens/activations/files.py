"""The on-disk pieces: safetensors written from parts without copies, read back as memory maps, and
atomic writes (temporary name, fsync, rename) so a crash never leaves a file that looks complete.

The safetensors format is an 8-byte little-endian header length, a JSON header (per tensor: dtype,
shape, byte range; plus ``__metadata__``, strings only), then the raw bytes. Writing it here, rather
than through ``safetensors.torch.save_file``, lets a shard be written from the list of per-batch parts
(no concatenated copy) and a hook's shards be joined with file-to-file copies in bounded memory.
"""

from __future__ import annotations

import json
import os
import struct
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

_CODES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
          torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
          torch.bool: "BOOL"}
_DTYPES = {code: dtype for dtype, code in _CODES.items()}
# numpy has no bfloat16: its bytes are mapped as int16 and viewed as bfloat16 in torch
_NUMPY = {"F32": np.float32, "F16": np.float16, "BF16": np.int16, "F64": np.float64, "I64": np.int64,
          "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}
COPY_CHUNK = 16 * 2**20


def dtype_code(dtype: torch.dtype) -> str:
    if dtype not in _CODES:
        raise ValueError(f"dtype {dtype} cannot be stored; use one of {sorted(map(str, _CODES))}.")
    return _CODES[dtype]


def torch_dtype(code: str) -> torch.dtype:
    return _DTYPES[code]


def _as_bytes(part: torch.Tensor) -> np.ndarray:
    part = part.detach().contiguous()
    return (part.view(torch.int16) if part.dtype == torch.bfloat16 else part).numpy()


def _header_bytes(header: dict[str, Any]) -> bytes:
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned, so every dtype can be memory-mapped
    return struct.pack("<Q", len(raw)) + raw


def write_safetensors(path: Path, tensors: dict[str, tuple[torch.dtype, tuple[int, ...], Sequence[torch.Tensor]]],
                      metadata: dict[str, str]) -> None:
    """Write ``{name: (dtype, shape, parts)}`` to ``path`` atomically; each tensor is its parts, in order."""
    header: dict[str, Any] = {"__metadata__": metadata}
    offset = 0
    for name, (dtype, shape, parts) in tensors.items():
        size = int(np.prod(shape, dtype=np.int64)) * torch.empty(0, dtype=dtype).element_size()
        got = sum(p.numel() * p.element_size() for p in parts)
        if got != size:
            raise ValueError(f"tensor {name!r}: its parts hold {got} bytes, shape {shape} needs {size}.")
        header[name] = {"dtype": dtype_code(dtype), "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    with atomic_file(path) as f:
        f.write(_header_bytes(header))
        for _, _, parts in tensors.values():
            for part in parts:
                f.write(_as_bytes(part))


def read_header(path: Path) -> tuple[dict[str, Any], int]:
    """(header, byte offset where the data starts) of a safetensors file."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        return json.loads(f.read(n)), 8 + n


def memmap(path: Path, name: str) -> torch.Tensor:
    """Tensor ``name`` of a safetensors file as a copy-on-write memory map (nothing is read until used;
    writes to it stay in this process)."""
    header, start = read_header(path)
    info = header[name]
    shape = tuple(info["shape"])
    begin, end = info["data_offsets"]
    if begin == end:
        return torch.empty(shape, dtype=torch_dtype(info["dtype"]))
    array = np.memmap(path, dtype=_NUMPY[info["dtype"]], mode="c", offset=start + begin, shape=shape)
    tensor = torch.from_numpy(array)
    return tensor.view(torch.bfloat16) if info["dtype"] == "BF16" else tensor


def join_safetensors(path: Path, name: str, sources: Sequence[Path], dtype: torch.dtype, tail: Sequence[int],
                     metadata: dict[str, str]) -> int:
    """Write one tensor ``name`` [rows, *tail] to ``path``: the rows of tensor ``name`` of each source, in
    order, copied file to file in bounded memory (the folder is not fsynced: the caller does it once).
    Returns the number of rows."""
    code, tail = dtype_code(dtype), list(tail)
    pieces, rows = [], 0
    for src in sources:
        header, start = read_header(src)
        info = header[name]
        if not info["shape"][0]:
            continue
        if (info["dtype"], info["shape"][1:]) != (code, tail):
            raise ValueError(f"{src} holds {name!r} as {info['dtype']} {info['shape'][1:]}, expected {code} {tail}.")
        begin, end = info["data_offsets"]
        pieces.append((src, start + begin, end - begin))
        rows += info["shape"][0]
    size = sum(n for _, _, n in pieces)
    header = {"__metadata__": metadata, name: {"dtype": code, "shape": [rows, *tail], "data_offsets": [0, size]}}
    with atomic_file(path, sync_dir=False) as out:
        out.write(_header_bytes(header))
        out.flush()
        for src, offset, n in pieces:
            with open(src, "rb") as f:
                _copy_range(f, out, offset, n)
    return rows


def _copy_range(src: Any, dst: Any, offset: int, n: int) -> None:
    """Append ``n`` bytes of ``src`` from ``offset`` to ``dst``: in the kernel (``copy_file_range``) where the
    system has it, else through a bounded buffer."""
    if hasattr(os, "copy_file_range"):
        try:
            while n:
                got = os.copy_file_range(src.fileno(), dst.fileno(), n, offset)
                if not got:
                    raise ValueError(f"{src.name} ends early: {n} bytes are missing.")
                offset, n = offset + got, n - got
            return
        except OSError:  # e.g. across file systems on older kernels: fall back to reading
            pass
    src.seek(offset)
    buffer = memoryview(bytearray(min(COPY_CHUNK, n)))
    while n:
        got = src.readinto(buffer[:min(n, len(buffer))])
        if not got:
            raise ValueError(f"{src.name} ends early: {n} bytes are missing.")
        dst.write(buffer[:got])
        offset, n = offset + got, n - got


class atomic_file:
    """``with atomic_file(path) as f``: write ``path + '.<unique>.tmp'``, fsync it, rename it over ``path`` and
    fsync the folder (unless ``sync_dir=False``: the caller fsyncs it once after several files); on an
    error the temporary file is removed and ``path`` is untouched."""

    def __init__(self, path: Path, sync_dir: bool = True):
        self.path, self.sync_dir = Path(path), sync_dir
        # unique, so two readers joining the same file at once do not write into one temporary file
        self.tmp = self.path.with_name(f"{self.path.name}.{uuid.uuid4().hex[:12]}.tmp")

    def __enter__(self) -> Any:
        self.file = open(self.tmp, "wb")
        return self.file

    def __exit__(self, exc_type: Any, *_: Any) -> None:
        if exc_type is not None:
            self.file.close()
            self.tmp.unlink(missing_ok=True)
            return
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        os.replace(self.tmp, self.path)
        if self.sync_dir:
            fsync_dir(self.path.parent)


def write_json(path: Path, data: Any) -> None:
    with atomic_file(path) as f:
        f.write(json.dumps(data, indent=1, sort_keys=True).encode())


def read_json(path: Path) -> Any:
    return json.loads(Path(path).read_text())


def fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
