"""Streaming safetensors I/O: read headers, read one tensor, write shards tensor by tensor from a pool of threads.

A safetensors file is an 8-byte little-endian header length, a JSON header mapping each tensor name to its dtype,
shape and byte range, then the raw little-endian bytes. Because every output tensor keeps its input shape and
dtype, a shard's header can be written before any data, and every tensor's place in the file is known; each
tensor's bytes are then either copied from the input file by byte range (bit-identical, never decoded, in the
kernel) or produced by an edit and written at their offset. Tensors are written by several threads at once, so
copies, reads, edits and writes overlap; the bytes do not depend on the order. Memory use is the edited tensors in
flight (bounded by a budget of about the largest one) plus a small copy buffer, whatever the shard or model size.
No mmap is used, so reading a shard does not leave its pages counted in the process's resident memory.
`read_header` is the one reader of safetensors headers (checkpoints, and the checks before a push).
"""

from __future__ import annotations

import errno
import json
import mmap
import os
import struct
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor, as_completed
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from abliterate.errors import UserError

# Safetensors dtype codes that abliterate can decode and edit; every other dtype is copied as raw bytes only.
FLOAT_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
TORCH_TO_CODE = {dtype: code for code, dtype in FLOAT_DTYPES.items()}
_MAX_HEADER_BYTES = 100 * 2**20  # safetensors itself refuses headers above 100 MB
_COPY_CHUNK_BYTES = 64 * 2**20
# Threads writing tensors: enough to keep the disk, the kernel's copies and one edit per core busy at once.
WRITE_WORKERS = min(8, (os.cpu_count() or 1) + 2)
# Edited tensors held in memory at once (at least the largest one, which then goes alone).
EDIT_BUDGET_BYTES = 256 * 2**20


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


def read_header(path: Path, fix: str = "re-download the checkpoint") -> tuple[list[StoredTensor], dict[str, str]]:
    """The tensors of one safetensors file in storage order, and its `__metadata__`; `fix` ends the error messages."""
    try:
        with open(path, "rb") as handle:
            size = os.fstat(handle.fileno()).st_size
            (header_bytes,) = struct.unpack("<Q", handle.read(8))
            if header_bytes > min(_MAX_HEADER_BYTES, size - 8):
                raise ValueError(f"header length {header_bytes} does not fit the file")
            header = json.loads(handle.read(header_bytes))
    except (OSError, struct.error, ValueError, UnicodeDecodeError) as error:
        raise UserError(f"{path} is not a readable safetensors file ({error}); {fix}.") from None
    metadata = header.pop("__metadata__", None) or {}
    data_start = 8 + header_bytes
    tensors = []
    for name, info in header.items():
        try:
            (begin, end), dtype, shape = info["data_offsets"], str(info["dtype"]), tuple(int(n) for n in info["shape"])
        except (KeyError, TypeError, ValueError):
            raise UserError(f"{path} has a corrupt header entry for {name}; {fix}.") from None
        if not 0 <= begin <= end <= size - data_start:
            raise UserError(f"{path} is truncated or corrupt (tensor {name} lies outside the file); {fix}.")
        tensors.append(StoredTensor(name, path, dtype, shape, data_start + begin, data_start + end))
    return sorted(tensors, key=lambda t: t.start), metadata


def read_tensor(stored: StoredTensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """Load one float tensor from disk into `out` (contiguous, of its dtype and shape) or a fresh CPU tensor."""
    if stored.dtype not in FLOAT_DTYPES:
        raise UserError(f"Tensor {stored.name} is stored as {stored.dtype}; abliterate edits only float16, bfloat16 "
                        "and float32 weights. Dequantize the checkpoint first.")
    target = torch.empty(stored.shape, dtype=FLOAT_DTYPES[stored.dtype]) if out is None else out
    view = memoryview(target.reshape(-1).view(torch.uint8).numpy())  # [nbytes], the tensor's own memory
    with open(stored.path, "rb", buffering=0) as handle:
        handle.seek(stored.start)
        done = 0
        while done < stored.nbytes:
            got = handle.readinto(view[done:done + _COPY_CHUNK_BYTES])
            if not got:
                raise UserError(f"{stored.path} ended early while reading {stored.name}; re-download the checkpoint.")
            done += got
    return target


@dataclass(frozen=True)
class OutputTensor:
    """One tensor of an output shard: its name, where its bytes come from, and the edit to apply (if any)."""

    name: str
    source: StoredTensor
    edit: object | None = None  # an architectures.TensorEdit; None means copy the bytes unchanged


# Produces the edited tensor for an OutputTensor whose `edit` is set. Its second argument is the tensor's place in
# the output file (its dtype and shape): read into it and edit it in place, or return another tensor to be copied in.
EditFn = Callable[[OutputTensor, torch.Tensor], torch.Tensor]


def write_shards(shards: dict[Path, list[OutputTensor]], metadata: dict[str, str], edit_fn: EditFn,
                 progress: Callable[[Iterator[Future]], Iterator[Future]] = iter,
                 workers: int | None = None) -> None:
    """Write safetensors files: each header first, then every tensor's bytes at its offset, copied or edited.

    The tensors of all files are written by a pool of threads, each at its own offset (copy_file_range takes one,
    an edit writes into its mapped place), so kernel copies, reads and edits overlap instead of waiting on each
    other; the bytes are the same in any order. Edits in flight hold at most max(largest edited tensor, EDIT_BUDGET_BYTES) of tensors.
    """
    descriptors: list[int] = []
    jobs: list[tuple[int, int, OutputTensor]] = []
    try:
        for path, tensors in shards.items():
            descriptor = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o666)  # read too: mmap needs it
            descriptors.append(descriptor)
            offset = _write_header(descriptor, tensors, metadata)
            for tensor in tensors:
                jobs.append((descriptor, offset, tensor))
                offset += tensor.source.nbytes
            _reserve(descriptor, offset, path)
        edited = [tensor.source.nbytes for _, _, tensor in jobs if tensor.edit is not None]
        budget = _Budget(max([EDIT_BUDGET_BYTES, *edited]))
        with _single_threaded_torch(), \
                ThreadPoolExecutor(workers or WRITE_WORKERS, thread_name_prefix="abliterate-write") as pool:
            futures = [pool.submit(_write_job, descriptor, offset, tensor, edit_fn, budget)
                       for descriptor, offset, tensor in jobs]
            try:
                for future in progress(as_completed(futures)):
                    future.result()
            except BaseException:
                for future in futures:
                    future.cancel()
                raise
    finally:
        for descriptor in descriptors:
            os.close(descriptor)


def _write_header(descriptor: int, tensors: list[OutputTensor], metadata: dict[str, str]) -> int:
    """Write the 8-byte length and JSON header of a shard holding `tensors` in order; return where data starts."""
    header: dict[str, dict] = {"__metadata__": metadata}
    offset = 0
    for tensor in tensors:
        source = tensor.source
        header[tensor.name] = {"dtype": source.dtype, "shape": list(source.shape),
                               "data_offsets": [offset, offset + source.nbytes]}
        offset += source.nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # pad with spaces so the data starts 8-byte aligned, as safetensors does
    _pwrite_all(descriptor, memoryview(struct.pack("<Q", len(blob)) + blob), 0)
    return 8 + len(blob)


def _reserve(descriptor: int, size: int, path: Path) -> None:
    """Give the file its full size, with its disk blocks allocated, before any tensor is written.

    A write through a memory mapping cannot report a full disk (the process gets SIGBUS instead), so the space is
    taken here, where running out is a clear error before gigabytes are written.
    """
    try:
        os.posix_fallocate(descriptor, 0, size)
    except OSError as error:
        if error.errno in (errno.ENOSPC, errno.EDQUOT):
            folder = path.parent.parent
            raise UserError(f"Not enough free disk space in {folder} for the output ({size / 1e9:.2f} GB more are "
                            "needed for one shard); free some space there or choose another --out.") from None
        os.ftruncate(descriptor, size)  # this file system cannot preallocate: the size alone lets the file be mapped


class _Budget:
    """Bytes of edited tensors in flight: a job waits until its tensor fits, and one alone always fits."""

    def __init__(self, limit_bytes: int) -> None:
        self.limit_bytes, self.used_bytes = limit_bytes, 0
        self.condition = threading.Condition()

    def take(self, nbytes: int) -> None:
        with self.condition:
            self.condition.wait_for(lambda: self.used_bytes == 0 or self.used_bytes + nbytes <= self.limit_bytes)
            self.used_bytes += nbytes

    def give(self, nbytes: int) -> None:
        with self.condition:
            self.used_bytes -= nbytes
            self.condition.notify_all()


@contextmanager
def _single_threaded_torch() -> Iterator[None]:
    """One torch thread per writer thread while writing: the pool runs several edits at once instead.

    Torch's own threads wait for each other by spinning, so on a loaded machine (a descheduled thread, or several
    pools sharing the cores) a block edit ran 3 to 10 times slower with two threads than with one. Writer threads
    are new for each write and take the thread count when they first call torch, so they start single-threaded.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _write_job(descriptor: int, offset: int, tensor: OutputTensor, edit_fn: EditFn, budget: _Budget) -> None:
    """Copy or edit one tensor into its place in the file."""
    if tensor.edit is None:
        _copy_range(tensor.source, descriptor, offset)
        return
    budget.take(tensor.source.nbytes)
    try:
        place = _mapped(descriptor, offset, tensor.source)
        mapped = place is not None
        if not mapped:  # a buffer of its own, written at its offset once edited
            place = torch.empty(tensor.source.shape, dtype=FLOAT_DTYPES[tensor.source.dtype])
        edited = edit_fn(tensor, place)
        _check_edited(edited, tensor.source)
        if not mapped:
            _pwrite_all(descriptor, memoryview(edited.contiguous().reshape(-1).view(torch.uint8).numpy()), offset)
        elif edited.data_ptr() != place.data_ptr():
            place.copy_(edited)
        del edited, place  # the last views of the mapping: it is unmapped here, its pages stay in the page cache
    finally:
        budget.give(tensor.source.nbytes)


def _mapped(descriptor: int, offset: int, source: StoredTensor) -> torch.Tensor | None:
    """The place of a tensor in an output file as a writable tensor of its dtype and shape (a shared mapping that
    lives as long as the tensor); None where the file cannot be mapped (some network and FUSE file systems)."""
    dtype = FLOAT_DTYPES[source.dtype]
    if source.nbytes == 0:
        return torch.empty(source.shape, dtype=dtype)
    start = offset - offset % mmap.ALLOCATIONGRANULARITY  # a mapping starts on a page boundary
    try:
        mapping = mmap.mmap(descriptor, offset + source.nbytes - start, offset=start)  # MAP_SHARED, read and write
    except OSError:
        return None
    place = torch.frombuffer(mapping, dtype=torch.uint8, count=source.nbytes, offset=offset - start)  # [nbytes]
    return place.view(dtype).reshape(source.shape)


def _check_edited(tensor: torch.Tensor, source: StoredTensor) -> None:
    """An edit must keep the stored dtype and shape, or the header written up front would lie."""
    if TORCH_TO_CODE.get(tensor.dtype) != source.dtype or tuple(tensor.shape) != source.shape:
        raise RuntimeError(f"edit of {source.name} returned {tensor.dtype} {tuple(tensor.shape)}, expected "
                           f"{source.dtype} {source.shape}; this is a bug in abliterate")


def _pwrite_all(descriptor: int, data: memoryview, offset: int) -> None:
    view = data.cast("B")  # [nbytes]
    while view.nbytes:
        written = os.pwrite(descriptor, view[:_COPY_CHUNK_BYTES], offset)
        view, offset = view[written:], offset + written


def _copy_range(source: StoredTensor, descriptor: int, offset: int) -> None:
    """Copy a tensor's bytes unchanged to `offset`, in the kernel when it can (copy_file_range), else by chunks."""
    with open(source.path, "rb", buffering=0) as handle:
        remaining, position = source.nbytes, source.start
        while remaining:
            try:
                copied = os.copy_file_range(handle.fileno(), descriptor, min(remaining, 2**30), position, offset)
            except (OSError, AttributeError):
                copied = 0
            if not copied:  # unsupported here (or cross-device on an old kernel): copy through a buffer instead
                chunk = os.pread(handle.fileno(), min(remaining, _COPY_CHUNK_BYTES), position)
                if not chunk:
                    raise UserError(f"{source.path} ended early while copying {source.name}; re-download it.")
                _pwrite_all(descriptor, memoryview(chunk), offset)
                copied = len(chunk)
            remaining -= copied
            position += copied
            offset += copied
