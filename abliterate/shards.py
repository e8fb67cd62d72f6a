"""Streaming safetensors I/O: read headers, read one tensor, write a shard one tensor at a time.

A safetensors file is an 8-byte little-endian header length, a JSON header mapping each tensor name to its dtype,
shape and byte range, then the raw little-endian bytes. Because every output tensor keeps its input shape and
dtype, a shard's header can be written before any data; each tensor's bytes are then either copied from the
input file by byte range (bit-identical, never decoded) or produced by an edit and written at once. Memory use is
therefore one edited tensor at a time plus a small copy buffer, whatever the shard or model size.
No mmap is used, so reading a shard does not leave its pages counted in the process's resident memory.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from abliterate.errors import UserError

# Safetensors dtype codes that abliterate can decode and edit; every other dtype is copied as raw bytes only.
FLOAT_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
TORCH_TO_CODE = {dtype: code for code, dtype in FLOAT_DTYPES.items()}
_MAX_HEADER_BYTES = 100 * 2**20  # safetensors itself refuses headers above 100 MB
_COPY_CHUNK_BYTES = 64 * 2**20


@dataclass(frozen=True)
class StoredTensor:
    """Where one tensor lives on disk: file, dtype code (e.g. "BF16"), shape and absolute byte range."""

    name: str
    path: Path
    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start


def read_header(path: Path) -> tuple[list[StoredTensor], dict[str, str]]:
    """The tensors of one safetensors file in storage order, and its `__metadata__`."""
    try:
        with open(path, "rb") as handle:
            size = os.fstat(handle.fileno()).st_size
            (header_bytes,) = struct.unpack("<Q", handle.read(8))
            if header_bytes > min(_MAX_HEADER_BYTES, size - 8):
                raise ValueError(f"header length {header_bytes} does not fit the file")
            header = json.loads(handle.read(header_bytes))
    except (OSError, struct.error, ValueError, UnicodeDecodeError) as error:
        raise UserError(f"{path} is not a readable safetensors file ({error}); re-download the checkpoint.") from None
    metadata = header.pop("__metadata__", None) or {}
    data_start = 8 + header_bytes
    tensors = []
    for name, info in header.items():
        try:
            (begin, end), dtype, shape = info["data_offsets"], str(info["dtype"]), tuple(int(n) for n in info["shape"])
        except (KeyError, TypeError, ValueError):
            raise UserError(f"{path} has a corrupt header entry for {name}; re-download the checkpoint.") from None
        if not 0 <= begin <= end <= size - data_start:
            raise UserError(f"{path} is truncated or corrupt (tensor {name} lies outside the file); re-download it.")
        tensors.append(StoredTensor(name, path, dtype, shape, data_start + begin, data_start + end))
    return sorted(tensors, key=lambda t: t.start), metadata


def read_tensor(stored: StoredTensor) -> torch.Tensor:
    """Load one float tensor from disk into a fresh CPU tensor of its stored dtype."""
    if stored.dtype not in FLOAT_DTYPES:
        raise UserError(f"Tensor {stored.name} is stored as {stored.dtype}; abliterate edits only float16, bfloat16 "
                        "and float32 weights. Dequantize the checkpoint first.")
    buffer = torch.empty(stored.nbytes, dtype=torch.uint8)
    view = memoryview(buffer.numpy())
    with open(stored.path, "rb", buffering=0) as handle:
        handle.seek(stored.start)
        done = 0
        while done < stored.nbytes:
            got = handle.readinto(view[done:done + _COPY_CHUNK_BYTES])
            if not got:
                raise UserError(f"{stored.path} ended early while reading {stored.name}; re-download the checkpoint.")
            done += got
    return buffer.view(FLOAT_DTYPES[stored.dtype]).reshape(stored.shape)


@dataclass(frozen=True)
class OutputTensor:
    """One tensor of an output shard: its name, where its bytes come from, and the edit to apply (if any)."""

    name: str
    source: StoredTensor
    edit: object | None = None  # an architectures.TensorEdit; None means copy the bytes unchanged


# Produces the edited tensor for an OutputTensor whose `edit` is set.
EditFn = Callable[[OutputTensor], torch.Tensor]


def write_shard(path: Path, tensors: list[OutputTensor], metadata: dict[str, str], edit_fn: EditFn,
                progress: Callable[[Iterator[OutputTensor]], Iterator[OutputTensor]] = iter) -> None:
    """Write one safetensors file: header first, then each tensor's bytes, copied or edited, in order."""
    header: dict[str, dict] = {"__metadata__": metadata}
    offset = 0
    for tensor in tensors:
        source = tensor.source
        header[tensor.name] = {"dtype": source.dtype, "shape": list(source.shape),
                               "data_offsets": [offset, offset + source.nbytes]}
        offset += source.nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # pad with spaces so the data starts 8-byte aligned, as safetensors does
    with open(path, "wb", buffering=0) as out:
        _write_all(out, struct.pack("<Q", len(blob)) + blob)
        for tensor in progress(iter(tensors)):
            if tensor.edit is None:
                _copy_range(tensor.source, out)
            else:
                _write_tensor(out, edit_fn(tensor), tensor.source)


def _write_tensor(out, tensor: torch.Tensor, source: StoredTensor) -> None:
    """Write an edited tensor's bytes after checking it kept the stored dtype and shape."""
    if TORCH_TO_CODE.get(tensor.dtype) != source.dtype or tuple(tensor.shape) != source.shape:
        raise RuntimeError(f"edit of {source.name} returned {tensor.dtype} {tuple(tensor.shape)}, expected "
                           f"{source.dtype} {source.shape}; this is a bug in abliterate")
    data = tensor.contiguous().reshape(-1).view(torch.uint8).numpy()  # [nbytes]
    _write_all(out, memoryview(data))


def _write_all(out, data: bytes | memoryview) -> None:
    view = memoryview(data).cast("B")
    while view.nbytes:
        written = out.write(view[:_COPY_CHUNK_BYTES])
        view = view[written:]


def _copy_range(source: StoredTensor, out) -> None:
    """Copy a tensor's bytes unchanged, in the kernel when it can (copy_file_range), else by chunks."""
    with open(source.path, "rb", buffering=0) as handle:
        remaining, position = source.nbytes, source.start
        while remaining:
            try:
                copied = os.copy_file_range(handle.fileno(), out.fileno(), min(remaining, 2**30), position)
            except (OSError, AttributeError):
                copied = 0
            if not copied:  # unsupported here (or cross-device on an old kernel): copy through a buffer instead
                handle.seek(position)
                chunk = handle.read(min(remaining, _COPY_CHUNK_BYTES))
                if not chunk:
                    raise UserError(f"{source.path} ended early while copying {source.name}; re-download it.")
                _write_all(out, chunk)
                copied = len(chunk)
            remaining -= copied
            position += copied
