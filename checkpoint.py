"""Read and write Grok-1 checkpoints in the released `ckpt-0` format.

The released checkpoint is a directory of `tensor00000_000` ... `tensorNNNNN_000`
files. File `i` contains leaf `i` of the parameter tree flattened the way JAX
flattens a dict (keys sorted as strings, `QuantizedWeight8bit` as one leaf).
Each file is one protocol-4 pickle of a numpy array (float32 in the release)
or of a `__main__.QuantizedWeight8bit` with an int8 `weight` and bfloat16
`scales`. `tensor_pickle.py` parses these pickles without executing them and
writes them byte for byte as xAI's code (CPython 3.11 `pickle.dump` of numpy
1.26 arrays) does. Only these globals are accepted:

    __main__.QuantizedWeight8bit
    numpy.core.multiarray._reconstruct    (numpy 1.x writers)
    numpy._core.multiarray._reconstruct   (numpy 2.x writers)
    numpy.ndarray, numpy.dtype
    ml_dtypes.bfloat16, jax.numpy.bfloat16

This module adds the file and directory level:

- `parse_tensor_file`, `read_tensor`, `write_tensor_file`: one file, with
  errors that name the file and describe what it contains instead (empty, Git LFS
  pointer, HTML page, zero-filled, truncated, disallowed global, ...).
- `resolve_checkpoint_dir`, `validate_checkpoint`: find the directory and
  check every file against the model's parameter shapes, reading only pickle
  headers, and report every problem in one error.
- `load_checkpoint`: validate first, then read the files in a few threads and
  place each array with `jax.make_array_from_callback`. A process reads only
  the rows (lines along the last axis) that the shards of its own devices
  touch, and of those rows the columns from the first to the last they hold.
- `save_checkpoint`: write a parameter tree in the released format.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import logging
import math
import mmap
import os
import re
import threading
import time
from pathlib import Path
from typing import Any, Optional, Union

import jax
import ml_dtypes
import numpy as np

from model import QuantizedWeight8bit
from tensor_pickle import (
    DTYPE_CODE_PATTERN,
    ArrayInfo,
    ArraySpec,
    DisallowedGlobal,
    InvalidPickle,
    PickleGraph,
    PickleParser,
    PickleWriter,
    QuantizedInfo,
    TensorInfo,
    TruncatedPickle,
)

logger = logging.getLogger(__name__)

SHARD_SUFFIX = "_000"
TENSOR_FILE_PATTERN = re.compile(r"^tensor(\d{5})_(\d{3})$")

# Number of problems listed in a validation error before the rest are counted.
MAX_LISTED_PROBLEMS = 40

DOWNLOAD_HELP = (
    "Put the released weights in checkpoints/ckpt-0 (770 files tensor00000_000 ... "
    "tensor00769_000, 318 GB). Download them with the torrent linked from the README of "
    "github.com/xai-org/grok-1, or from the Hugging Face repository xai-org/grok-1: "
    "`hf download xai-org/grok-1 --repo-type model --include 'ckpt-0/*' "
    "--local-dir checkpoints`."
)

# File name endings that download tools give to unfinished files.
PARTIAL_DOWNLOAD_SUFFIXES = (".part", ".partial", ".incomplete", ".crdownload", ".!qB", ".aria2", ".tmp")


class CheckpointError(ValueError):
    """A checkpoint directory or file is missing, damaged, unsafe or does not fit the model."""


def tensor_file_name(index: int) -> str:
    """Return the file name of leaf `index`, e.g. `tensor00026_000`."""
    return f"tensor{index:05d}{SHARD_SUFFIX}"


# ---------------------------------------------------------------------------
# Recognizing what a broken file is instead of a pickle

_HEAD_BYTES = 4096


def _describe_non_pickle(head: bytes, tail: bytes, size: int) -> str:
    """Name what a file that does not start with a pickle header is, and what to do.

    `head` and `tail` are the first and last (up to) `_HEAD_BYTES` bytes.
    """
    stripped = head.lstrip(b"\xef\xbb\xbf \t\r\n")
    lowered = stripped[:1024].lower()
    if stripped.startswith(b"version https://git-lfs"):
        pointed = re.search(rb"\nsize (\d+)", head)
        target = f" to a {int(pointed.group(1)):,}-byte file" if pointed else ""
        return (
            f"is a Git LFS pointer ({size} bytes){target}: the download fetched the pointer, "
            "not the data. Run `git lfs pull` in the clone, or download the file with "
            "`hf download` (see the README of github.com/xai-org/grok-1)"
        )
    if lowered.startswith((b"<!doctype", b"<html", b"<head", b"<?xml", b"<!--")) or b"<html" in lowered:
        return (
            f"is an HTML/XML document ({size:,} bytes), not tensor data: an error or login page "
            "was saved in place of the file. Download it again"
        )
    if not any(head):
        checked = "first and last" if not any(tail) else "first"
        return (
            f"is zero-filled (its {checked} {len(head):,} bytes are 0): the download reserved "
            "the file but did not write it. Download it again"
        )
    try:
        text = stripped[:200].decode("utf-8")
    except UnicodeDecodeError:
        text = ""
    if text and all(c.isprintable() or c in "\r\n\t" for c in text):
        first_line = text.splitlines()[0]
        return f"is a text file, not a pickle (first line: {first_line[:80]!r}). Download it again"
    return (
        f"is not a pickle: it starts with bytes {head[:8].hex(' ')} instead of the protocol "
        "header 80 04. Download it again"
    )


def _describe_zero_tail(data, offset: int, size: int) -> Optional[str]:
    """Return a description if the file is all zeros from `offset` on (an unwritten tail)."""
    sample = data[offset:min(size, offset + _HEAD_BYTES)]
    tail = data[max(offset, size - _HEAD_BYTES):size]
    if any(sample) or any(tail):
        return None
    return (
        f"is zero-filled from byte {offset:,} to its end ({size:,} bytes): the download never "
        "wrote the end of the file. Download it again"
    )


def _parse_open_file(file) -> TensorInfo:
    """Parse the tensor pickle in the open binary `file`; raise `InvalidPickle` or `TruncatedPickle`."""
    size = os.fstat(file.fileno()).st_size
    if size == 0:
        raise InvalidPickle("is empty (0 bytes). Download it again")

    head = os.pread(file.fileno(), min(size, _HEAD_BYTES), 0)
    if head[:1] != b"\x80":
        tail = os.pread(file.fileno(), min(size, _HEAD_BYTES), max(0, size - _HEAD_BYTES))
        description = _describe_non_pickle(head, tail, size)
        if head[:1] == b"c":
            # Protocol 0 and 1 pickles have no PROTO header and usually start
            # with a GLOBAL opcode: name the global if it is not allowed.
            try:
                PickleParser(head, len(head)).parse_global_at(0)
            except DisallowedGlobal as error:
                raise InvalidPickle(f"is not a valid tensor file: {error}") from None
            except (InvalidPickle, TruncatedPickle):
                pass
        raise InvalidPickle(description)

    with mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ) as data:
        parser = PickleParser(data, size)
        try:
            return parser.parse()
        except InvalidPickle as error:
            zero_tail = _describe_zero_tail(data, parser.pos - 1, size) if parser.pos > 0 else None
            if zero_tail is not None:
                raise InvalidPickle(zero_tail) from None
            raise InvalidPickle(f"is not a valid tensor file: {error}") from None


def parse_tensor_file(path: Union[str, os.PathLike]) -> TensorInfo:
    """Parse one tensor file's pickle without executing it and return where its arrays lie.

    Reads only the pickle opcodes (the first and last pages of a large file).
    Raises `CheckpointError` naming the file for an unreadable, truncated or
    non-pickle file, a disallowed global or an unsupported opcode.
    """
    path = Path(path)
    try:
        with open(path, "rb") as file:
            return _parse_open_file(file)
    except OSError as error:
        raise CheckpointError(f"{path} cannot be read: {error}") from None
    except InvalidPickle as error:
        raise CheckpointError(f"{path} {error}") from None
    except TruncatedPickle as error:
        raise CheckpointError(f"{path} is truncated: {_truncation_detail(path, error, None)}") from None


def _truncation_detail(path: Path, error: TruncatedPickle, expected_size: Optional[int]) -> str:
    try:
        actual = path.stat().st_size
    except OSError:
        actual = -1
    detail = f"{error.detail}, so the file needs at least {error.required:,} bytes but has {actual:,}"
    if expected_size is not None:
        detail += f" (a complete file of this parameter has {expected_size:,} bytes)"
    return detail + ". Download it again"


# ---------------------------------------------------------------------------
# Reading array bytes


def _c_contiguous_range(shape: tuple[int, ...], index) -> Optional[tuple[int, int, tuple[int, ...]]]:
    """Return `(first element, element count, result shape)` if `index` selects one C-order run.

    `index` is a tuple of slices, as `jax.make_array_from_callback` passes.
    Returns None when the selection is strided or spans several runs.
    """
    if len(index) != len(shape) or not all(isinstance(s, slice) for s in index):
        return None
    bounds = [s.indices(dim) for s, dim in zip(index, shape)]
    if any(step != 1 for _, _, step in bounds):
        return None
    lengths = tuple(max(0, stop - start) for start, stop, _ in bounds)
    if 0 in lengths:
        return 0, 0, lengths

    # The selection is one run when every axis after some axis k is selected
    # whole and every axis before k selects a single element.
    k = len(shape) - 1
    while k >= 0 and lengths[k] == shape[k]:
        k -= 1
    if any(lengths[j] != 1 for j in range(max(k, 0))):
        return None

    strides = [math.prod(shape[j + 1:]) for j in range(len(shape))]
    first = sum(start * stride for (start, _, _), stride in zip(bounds, strides))
    count = math.prod(lengths)
    return first, count, lengths


def _pread_into(fd: int, buffer: memoryview, offset: int, path: Path) -> None:
    """Fill `buffer` from file offset `offset`, looping over short reads."""
    done = 0
    while done < len(buffer):
        if hasattr(os, "preadv"):
            count = os.preadv(fd, [buffer[done:]], offset + done)
        else:
            chunk = os.pread(fd, len(buffer) - done, offset + done)
            buffer[done:done + len(chunk)] = chunk
            count = len(chunk)
        if count == 0:
            raise CheckpointError(
                f"{path} ended at byte {offset + done:,} while reading; it changed or was "
                "truncated after validation. Download it again"
            )
        done += count


# XLA:CPU adopts a host buffer aligned to 64 bytes as device memory without
# copying it (measured with jax 0.10.2). numpy's own allocations are only
# 16-byte aligned, which makes every CPU transfer a second copy.
_BUFFER_ALIGNMENT = 64


def _empty_aligned(shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    """Return an uninitialized C-order array whose data starts on a `_BUFFER_ALIGNMENT` boundary."""
    nbytes = math.prod(shape) * dtype.itemsize
    raw = np.empty(nbytes + _BUFFER_ALIGNMENT, np.uint8)
    start = (-raw.ctypes.data) % _BUFFER_ALIGNMENT
    return raw[start:start + nbytes].view(dtype).reshape(shape)


# Size of the per-thread buffer through which regions that are not one
# contiguous run (e.g. column blocks) are read.
_BOUNCE_BYTES = 32 * 1024 * 1024
_thread_state = threading.local()


def _bounce_buffer(nbytes: int) -> np.ndarray:
    """Return this thread's reusable aligned uint8 buffer of at least `nbytes` bytes."""
    buffer = getattr(_thread_state, "bounce", None)
    if buffer is None or buffer.nbytes < nbytes:
        buffer = _empty_aligned((max(nbytes, _BOUNCE_BYTES),), np.dtype(np.uint8))
        _thread_state.bounce = buffer
    return buffer[:nbytes]


RegionKey = tuple[tuple[int, int, int], ...]


def region_key(shape: tuple[int, ...], index) -> RegionKey:
    """Normalize a tuple of slices to `((start, stop, step), ...)` for `shape`."""
    if len(index) != len(shape) or not all(isinstance(s, slice) for s in index):
        raise TypeError(f"expected {len(shape)} slices for an array of shape {shape}, got {index!r}")
    return tuple(s.indices(dim) for s, dim in zip(index, shape))


class _PayloadReader:
    """Reads regions of the arrays of one open tensor file into new aligned arrays.

    - A region that is one C-order run (a whole array, or a block of leading
      rows) is read with `preadv` straight into its result.
    - Other regions of C-order arrays (e.g. column blocks) are read in one
      pass over the rows they touch, through a per-thread buffer of those
      rows (last-axis lines) or, where the regions cover only some columns,
      of the column span they cover, and copied out. Rows no requested
      region touches are not read.
    - Regions of Fortran-order arrays, and strided regions, are copied out of
      a numpy view over an mmap of the file.

    Results never alias the file, so it can be closed afterwards.
    """

    def __init__(self, path: Path, file):
        self.path = path
        self.fd = file.fileno()
        self._mmap: Optional[mmap.mmap] = None

    def close(self) -> None:
        if self._mmap is not None:
            self._mmap.close()

    def read(self, info: ArrayInfo, index=None) -> np.ndarray:
        """Return a copy of `array[index]` (the whole array when `index` is None)."""
        if index is None:
            index = tuple(slice(None) for _ in info.shape)
        return self.read_regions(info, [index])[region_key(info.shape, index)]

    def read_regions(self, info: ArrayInfo, indices) -> dict[RegionKey, np.ndarray]:
        """Read each distinct region in `indices` once; return them by `region_key`."""
        results: dict[RegionKey, np.ndarray] = {}
        row_regions: list[RegionKey] = []
        for index in indices:
            key = region_key(info.shape, index)
            if key in results or key in row_regions:
                continue
            strided = any(step != 1 for _, _, step in key)
            run = None if info.fortran_order or strided else _c_contiguous_range(info.shape, index)
            if run is not None:
                results[key] = self._read_run(info, *run)
            elif info.fortran_order or strided:
                results[key] = self._copy_from_mmap(info, key)
            else:
                row_regions.append(key)
        if row_regions:
            results.update(self._read_rows(info, row_regions))

        native = info.dtype.newbyteorder("=")
        for key, result in results.items():
            if result.dtype != native:
                results[key] = result.astype(native)
        return results

    def _read_run(self, info: ArrayInfo, first: int, count: int, shape: tuple[int, ...]) -> np.ndarray:
        result = _empty_aligned(shape, info.dtype)
        buffer = memoryview(result.reshape(-1).view(np.uint8))
        _pread_into(self.fd, buffer, info.offset + first * info.dtype.itemsize, self.path)
        return result

    def _copy_from_mmap(self, info: ArrayInfo, key: RegionKey) -> np.ndarray:
        if self._mmap is None:
            self._mmap = mmap.mmap(self.fd, 0, access=mmap.ACCESS_READ)
        order = "F" if info.fortran_order else "C"
        view = np.ndarray(info.shape, info.dtype, buffer=self._mmap, offset=info.offset, order=order)
        region = view[tuple(slice(*bounds) for bounds in key)]
        result = _empty_aligned(region.shape, info.dtype)
        np.copyto(result, region)
        del view, region  # release the mmap's exported buffer so that close() succeeds
        return result

    def _read_rows(self, info: ArrayInfo, keys: list[RegionKey]) -> dict[RegionKey, np.ndarray]:
        """Read regions of a C-order array (2 or more axes) in one pass over the rows they touch.

        A row is one line along the last axis. Each region is `rows x [c0, c1)`.
        """
        row_length = info.shape[-1]
        row_bytes = row_length * info.dtype.itemsize
        leading_shape = info.shape[:-1]

        # Per region: its row ids (ascending), column range and [rows, columns] result.
        plans = []
        rows_by_leading_bounds: dict[RegionKey, np.ndarray] = {}
        for key in keys:
            leading = key[:-1]
            rows = rows_by_leading_bounds.get(leading)
            if rows is None:
                grids = np.ix_(*[np.arange(start, stop) for start, stop, _ in leading])
                rows = np.ravel_multi_index(grids, leading_shape).reshape(-1)
                rows_by_leading_bounds[leading] = rows
            column_start, column_stop, _ = key[-1]
            shape = tuple(stop - start for start, stop, _ in key)
            result = _empty_aligned(shape, info.dtype)
            plans.append((key, rows, column_start, column_stop, result.reshape(len(rows), shape[-1])))

        if len(rows_by_leading_bounds) == 1:
            needed = next(iter(rows_by_leading_bounds.values()))
        else:
            needed = np.unique(np.concatenate(list(rows_by_leading_bounds.values())))
        spans = np.split(needed, np.flatnonzero(np.diff(needed) != 1) + 1)

        # Read only the columns some region needs: where the model axis spans
        # processes, this process's shards cover part of each row. Whole rows
        # are read in one call per chunk; partial rows take one call per row.
        read_start = min(plan[2] for plan in plans)
        read_stop = max(plan[3] for plan in plans)
        width = read_stop - read_start
        width_bytes = width * info.dtype.itemsize

        rows_per_chunk = max(1, _BOUNCE_BYTES // width_bytes)
        for span in spans:
            for first in range(int(span[0]), int(span[-1]) + 1, rows_per_chunk):
                stop = min(first + rows_per_chunk, int(span[-1]) + 1)
                chunk = _bounce_buffer((stop - first) * width_bytes)
                if width == row_length:
                    _pread_into(self.fd, memoryview(chunk), info.offset + first * row_bytes, self.path)
                else:
                    row_offset = info.offset + read_start * info.dtype.itemsize
                    for row in range(first, stop):
                        target = memoryview(chunk)[(row - first) * width_bytes:(row - first + 1) * width_bytes]
                        _pread_into(self.fd, target, row_offset + row * row_bytes, self.path)
                block = chunk.view(info.dtype).reshape(stop - first, width)  # columns read_start ...
                for _, rows, column_start, column_stop, out in plans:
                    column_start, column_stop = column_start - read_start, column_stop - read_start
                    begin, end = np.searchsorted(rows, [first, stop])
                    if begin == end:
                        continue
                    local = rows[begin:end] - first
                    if local[-1] - local[0] + 1 == len(local):
                        out[begin:end] = block[local[0]:local[-1] + 1, column_start:column_stop]
                    else:
                        np.take(block[:, column_start:column_stop], local, axis=0, out=out[begin:end], mode="clip")

        return {key: out.reshape(tuple(stop - start for start, stop, _ in key)) for key, _, _, _, out in plans}


def read_tensor(path: Union[str, os.PathLike]) -> Union[np.ndarray, QuantizedWeight8bit]:
    """Read one tensor file into numpy: an array, or a `QuantizedWeight8bit` of two arrays.

    The pickle is parsed without executing it (see `parse_tensor_file`). Arrays
    keep their stored dtype, converted to native byte order.
    """
    path = Path(path)
    info = parse_tensor_file(path)
    with open(path, "rb") as file:
        reader = _PayloadReader(path, file)
        try:
            if isinstance(info, QuantizedInfo):
                return QuantizedWeight8bit(weight=reader.read(info.weight), scales=reader.read(info.scales))
            return reader.read(info)
        finally:
            reader.close()


# ---------------------------------------------------------------------------
# Writing tensor files


def _check_writable_dtype(dtype: np.dtype, label: str) -> None:
    bfloat16 = np.dtype(ml_dtypes.bfloat16)
    if dtype.newbyteorder("=") == bfloat16:
        return
    if not DTYPE_CODE_PATTERN.match(f"{dtype.kind}{dtype.itemsize}") or dtype.fields is not None:
        raise CheckpointError(
            f"{label} has dtype {dtype}; a checkpoint stores only bool, integer, float and bfloat16 arrays"
        )


def _to_numpy(value, label: str) -> np.ndarray:
    if isinstance(value, jax.ShapeDtypeStruct):
        raise CheckpointError(f"{label} is an abstract ShapeDtypeStruct; save_checkpoint needs concrete arrays")
    array = np.asarray(value)
    _check_writable_dtype(array.dtype, label)
    return array


def _tensor_graph(value, label: str):
    graph = PickleGraph()
    if isinstance(value, QuantizedWeight8bit):
        return graph.quantized(_to_numpy(value.weight, label + " weight"), _to_numpy(value.scales, label + " scales"))
    return graph.array(_to_numpy(value, label))


def write_tensor_file(path: Union[str, os.PathLike], value) -> None:
    """Write one array or `QuantizedWeight8bit` to `path` in the released file format.

    The bytes go to a hidden temporary file in the same directory, which is
    flushed, fsynced and then renamed to `path`, so a crash never leaves a
    partial file under the final name.
    """
    path = Path(path)
    graph = _tensor_graph(value, path.name)
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}-{threading.get_ident()}")
    try:
        with open(temporary, "wb") as file:
            PickleWriter(file.write).dump(graph)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def released_file_size(leaf) -> int:
    """Return the size in bytes of the file that numpy 1.x and CPython write for `leaf`.

    `leaf` is anything with `.shape` and `.dtype` (e.g. a `jax.ShapeDtypeStruct`)
    or a `QuantizedWeight8bit` of such leaves. Files written by numpy 2 are one
    byte longer (`numpy._core` in place of `numpy.core`).
    """
    graph = PickleGraph()
    if isinstance(leaf, QuantizedWeight8bit):
        obj = graph.quantized(ArraySpec(leaf.weight.shape, leaf.weight.dtype), ArraySpec(leaf.scales.shape, leaf.scales.dtype))
    else:
        obj = graph.array(ArraySpec(leaf.shape, leaf.dtype))
    writer = PickleWriter(sink=None)
    writer.dump(obj)
    return writer.size


# ---------------------------------------------------------------------------
# Parameter trees


def _is_quantized(x) -> bool:
    return isinstance(x, QuantizedWeight8bit)


def _key_name(key) -> str:
    for attribute in ("key", "name", "idx"):
        if hasattr(key, attribute):
            return str(getattr(key, attribute))
    return str(key)


def flatten_parameters(tree) -> tuple[list[tuple[str, Any]], Any]:
    """Flatten a parameter tree in checkpoint file order.

    Returns `([(parameter path, leaf), ...], treedef)`, where a
    `QuantizedWeight8bit` is one leaf and the path joins the Haiku module path
    and the parameter name, e.g. `transformer/decoder_layer_0/moe/linear/w`.
    """
    leaves, treedef = jax.tree_util.tree_flatten_with_path(tree, is_leaf=_is_quantized)
    named = [("/".join(_key_name(k) for k in keypath), leaf) for keypath, leaf in leaves]
    return named, treedef


# ---------------------------------------------------------------------------
# Locating and validating a checkpoint directory


def _has_tensor_files(directory: Path) -> bool:
    with os.scandir(directory) as entries:
        return any(TENSOR_FILE_PATTERN.match(entry.name) for entry in entries)


def resolve_checkpoint_dir(path: Union[str, os.PathLike]) -> Path:
    """Return the directory that contains the tensor files for `path`.

    Accepts the directory of the files itself, or a parent that contains
    `ckpt-0/` or the older name `ckpt/` (the Hugging Face repository was first
    published with `ckpt/`), e.g. `checkpoints/` or `checkpoints/ckpt-0`. A
    missing `.../ckpt-0` whose sibling `.../ckpt` exists resolves to the
    sibling. Raises `CheckpointError` with download instructions otherwise.
    """
    path = Path(path)
    if not path.exists():
        if path.name == "ckpt-0" and (path.parent / "ckpt").is_dir():
            logger.info("%s does not exist; using %s (the older directory name)", path, path.parent / "ckpt")
            return path.parent / "ckpt"
        raise CheckpointError(f"Checkpoint directory {path} not found. {DOWNLOAD_HELP}")
    if not path.is_dir():
        raise CheckpointError(
            f"Checkpoint path {path} is a file; pass the directory that contains the "
            f"tensor files (e.g. checkpoints/ckpt-0). {DOWNLOAD_HELP}"
        )
    if _has_tensor_files(path):
        return path

    candidates = [path / name for name in ("ckpt-0", "ckpt") if (path / name).is_dir()]
    for candidate in candidates:
        if _has_tensor_files(candidate):
            if candidate.name == "ckpt":
                logger.info("Using %s (the older directory name of ckpt-0)", candidate)
            return candidate
    if candidates:
        # An empty ckpt-0/: validation reports the missing files.
        return candidates[0]
    raise CheckpointError(
        f"Checkpoint directory {path} contains no tensor files (tensor00000_000 ...) and no "
        f"ckpt-0/ subdirectory. {DOWNLOAD_HELP}"
    )


@dataclasses.dataclass(frozen=True)
class TensorFile:
    """A validated tensor file: its path, parameter path, parsed contents and size in bytes."""

    path: Path
    parameter: str
    info: TensorInfo
    size: int


def _shape_dtype(leaf) -> tuple[tuple[int, ...], np.dtype]:
    return tuple(int(d) for d in leaf.shape), np.dtype(leaf.dtype)


def _compare_array(info: ArrayInfo, leaf, label: str) -> list[str]:
    shape, dtype = _shape_dtype(leaf)
    problems = []
    if info.shape != shape:
        problems.append(f"{label}has shape {list(info.shape)}, the model expects {list(shape)}")
    if info.dtype.newbyteorder("=") != dtype:
        problems.append(f"{label}has dtype {info.dtype}, the model expects {dtype}")
    return problems


def _compare_with_model(info: TensorInfo, leaf) -> list[str]:
    """List the differences between a parsed file and the model's parameter `leaf`."""
    if isinstance(leaf, QuantizedWeight8bit):
        if not isinstance(info, QuantizedInfo):
            shape, dtype = _shape_dtype(leaf.weight)
            return [
                f"stores a plain {info.dtype} array {list(info.shape)}, the model expects a "
                f"QuantizedWeight8bit with {dtype} weight {list(shape)}"
            ]
        return _compare_array(info.weight, leaf.weight, "weight ") + _compare_array(info.scales, leaf.scales, "scales ")
    if isinstance(info, QuantizedInfo):
        shape, dtype = _shape_dtype(leaf)
        return [
            f"stores a QuantizedWeight8bit with weight {list(info.weight.shape)}, the model "
            f"expects a plain {dtype} array {list(shape)}"
        ]
    return _compare_array(info, leaf, "")


def _inspect_file(path: Path, leaf) -> tuple[Optional[TensorFile], list[str], bool]:
    """Parse one file and compare it with the model.

    Returns the file record (None on problems), the problems, and whether the
    file is a valid tensor file whose shapes or dtypes differ from the model's.
    """
    try:
        if path.is_symlink() and not path.exists():
            return None, [f"is a broken symbolic link to {os.readlink(path)}. Download the file again"], False
        with open(path, "rb") as file:
            size = os.fstat(file.fileno()).st_size
            info = _parse_open_file(file)
    except OSError as error:
        return None, [f"cannot be read: {error}"], False
    except InvalidPickle as error:
        return None, [str(error)], False
    except TruncatedPickle as error:
        return None, [f"is truncated: {_truncation_detail(path, error, released_file_size(leaf))}"], False

    problems = _compare_with_model(info, leaf)
    if problems:
        return None, problems, True
    return TensorFile(path=path, parameter="", info=info, size=size), [], False


def _unexpected_entries(directory: Path, expected_names: set[str], count: int) -> list[tuple[str, str]]:
    """Return `(name, problem)` for each directory entry that is not an expected tensor file."""
    unexpected = []
    for entry in sorted(os.scandir(directory), key=lambda e: e.name):
        name = entry.name
        if name in expected_names:
            continue
        if name.startswith("."):
            # Hidden entries: tool metadata such as .cache/ and temporary files of save_checkpoint.
            logger.debug("Ignoring hidden entry %s in %s", name, directory)
            continue
        match = TENSOR_FILE_PATTERN.match(name)
        if name.endswith(PARTIAL_DOWNLOAD_SUFFIXES):
            problem = "is an unfinished download; finish or restart the download and remove it"
        elif match and match.group(2) != SHARD_SUFFIX[1:]:
            problem = f"is shard {match.group(2)}; this loader reads single-shard checkpoints (_000 files only)"
        elif match:
            problem = (
                f"is not part of this model's checkpoint: the model has {count} parameters "
                f"({tensor_file_name(0)} ... {tensor_file_name(count - 1)}). Check the model "
                "configuration, or remove the file"
            )
        elif entry.is_dir():
            problem = "is an unexpected subdirectory; remove it"
        else:
            problem = "is an unexpected file; remove it"
        unexpected.append((name, problem))
    return unexpected


def _format_problems(directory: Path, problems: list[str], hints: list[str]) -> str:
    listed = problems[:MAX_LISTED_PROBLEMS]
    count = f"{len(problems)} problem" + ("s" if len(problems) != 1 else "")
    lines = [f"Checkpoint {directory} failed validation with {count}; nothing was loaded:"]
    lines += [f"  - {problem}" for problem in listed]
    if len(problems) > len(listed):
        lines.append(f"  ... and {len(problems) - len(listed)} more problems")
    return "\n".join(lines + hints)


def validate_checkpoint(directory: Union[str, os.PathLike], params_shape_tree) -> list[TensorFile]:
    """Check every file of `directory` against the model before anything is loaded.

    `params_shape_tree` is the model's parameter tree of `jax.ShapeDtypeStruct`
    (or arrays), with `QuantizedWeight8bit` leaves for quantized weights.
    Checks that exactly the expected files exist and that each one is a
    tensor pickle of the expected shapes and dtypes whose payloads fit in the
    file. Reads only pickle headers. Returns the files in leaf order, or raises
    one `CheckpointError` that lists every problem found (up to
    `MAX_LISTED_PROBLEMS`).
    """
    start = time.monotonic()
    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"Checkpoint directory {directory} not found. {DOWNLOAD_HELP}")
    named_leaves, _ = flatten_parameters(params_shape_tree)
    count = len(named_leaves)
    expected_names = {tensor_file_name(i) for i in range(count)}

    problems: list[str] = []
    missing = 0
    mismatched = 0
    files: list[TensorFile] = []
    for index, (parameter, leaf) in enumerate(named_leaves):
        name = tensor_file_name(index)
        path = directory / name
        if not os.path.lexists(path):
            missing += 1
            problems.append(f"{name} ({parameter}) is missing")
            continue
        record, file_problems, is_mismatch = _inspect_file(path, leaf)
        mismatched += is_mismatch
        for problem in file_problems:
            problems.append(f"{name} ({parameter}) {problem}")
        if record is not None:
            files.append(dataclasses.replace(record, parameter=parameter))

    unexpected = _unexpected_entries(directory, expected_names, count)
    if not problems and not unexpected:
        total = sum(f.size for f in files)
        logger.info(
            "Validated %d tensor files (%s) in %s in %.2f s",
            count, _format_size(total), directory, time.monotonic() - start,
        )
        return files

    hints = []
    if missing == count:
        problems = [f"all {count} tensor files ({tensor_file_name(0)} ... {tensor_file_name(count - 1)}) are missing"]
        hints.append(DOWNLOAD_HELP)
    problems += [f"{name} {problem}" for name, problem in unexpected]

    present = count - missing + sum(1 for name, _ in unexpected if TENSOR_FILE_PATTERN.match(name))
    if 0 < present != count:
        hints.append(
            f"The directory has {present} tensor files but the model has {count} parameters: "
            "if no file is missing by accident, the checkpoint was written for a different model "
            "configuration."
        )
    if mismatched > 1:
        hints.append(
            f"{mismatched} files differ from the model's shapes or dtypes: check that the model "
            "configuration is the one the checkpoint was saved with."
        )
    raise CheckpointError(_format_problems(directory, problems, hints))


# ---------------------------------------------------------------------------
# Loading onto devices


def _format_size(nbytes: float) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if nbytes >= scale:
            return f"{nbytes / scale:.2f} {unit}"
    return f"{int(nbytes)} B"


def _format_rate(bytes_per_second: float) -> str:
    if bytes_per_second >= 1e9:
        return f"{bytes_per_second / 1e9:.2f} GB/s"
    return f"{bytes_per_second / 1e6:.1f} MB/s"


def _format_duration(seconds: float) -> str:
    if seconds >= 60:
        return f"{int(seconds // 60)} min {int(seconds % 60)} s"
    return f"{seconds:.0f} s"


class _LoadProgress:
    """Thread-safe counters of a load that log at most every `interval_s` seconds, and at the end."""

    def __init__(self, total_files: int, total_bytes: int, interval_s: float):
        self.total_files = total_files
        self.total_bytes = total_bytes
        self.interval_s = interval_s
        self.files = 0
        self.bytes = 0
        self.start = time.monotonic()
        self.last_log = self.start
        self.lock = threading.Lock()

    def add_file(self, nbytes: int) -> None:
        with self.lock:
            self.files += 1
            self.bytes += nbytes
            now = time.monotonic()
            if now - self.last_log < self.interval_s or self.files == self.total_files:
                return
            self.last_log = now
            elapsed = now - self.start
            rate = self.bytes / elapsed if elapsed > 0 else 0.0
            remaining = (self.total_bytes - self.bytes) / rate if rate > 0 else float("inf")
            logger.info(
                "Loaded %d/%d files, %s/%s (%.0f%%), %s, about %s left",
                self.files, self.total_files, _format_size(self.bytes),
                _format_size(self.total_bytes), 100.0 * self.bytes / max(self.total_bytes, 1),
                _format_rate(rate), _format_duration(remaining),
            )

    def finish(self) -> None:
        elapsed = time.monotonic() - self.start
        logger.info(
            "Loaded %d/%d files, %s in %.1f s (%s)",
            self.files, self.total_files, _format_size(self.bytes), elapsed,
            _format_rate(self.bytes / elapsed if elapsed > 0 else 0.0),
        )


def _place_array(reader: _PayloadReader, info: ArrayInfo, sharding) -> jax.Array:
    """Create the global array of `info` on `sharding`, reading only this process's shards.

    All shards of this process are read in one pass before the transfer, and
    a shard that several devices hold (a replicated mesh axis) is read once.
    """
    indices = list(sharding.addressable_devices_indices_map(info.shape).values())
    shards = reader.read_regions(info, indices)

    def shard_for(index) -> np.ndarray:
        key = region_key(info.shape, index)
        if key not in shards:
            shards[key] = reader.read(info, index)
        return shards[key]

    return jax.make_array_from_callback(
        info.shape, sharding, shard_for, dtype=info.dtype.newbyteorder("=")
    )


def _load_tensor_file(tensor_file: TensorFile, sharding) -> Any:
    """Read one validated file onto its devices; returns a jax.Array or QuantizedWeight8bit of them."""
    path = tensor_file.path
    with open(path, "rb") as file:
        size = os.fstat(file.fileno()).st_size
        if size != tensor_file.size:
            # Reading a shrunk file through mmap would crash the process with SIGBUS.
            raise CheckpointError(
                f"{path} ({tensor_file.parameter}) changed size from {tensor_file.size:,} to "
                f"{size:,} bytes after validation. Check that no download is still writing to it"
            )
        reader = _PayloadReader(path, file)
        try:
            info = tensor_file.info
            if isinstance(info, QuantizedInfo):
                weight_sharding, scales_sharding = (
                    (sharding.weight, sharding.scales) if _is_quantized(sharding) else (sharding, sharding)
                )
                value = QuantizedWeight8bit(
                    weight=_place_array(reader, info.weight, weight_sharding),
                    scales=_place_array(reader, info.scales, scales_sharding),
                )
            else:
                value = _place_array(reader, info, sharding)
            # Wait for the transfers so that at most `num_workers` tensors are
            # held in host memory at a time.
            jax.block_until_ready(value)
            return value
        finally:
            reader.close()


def _sharding_leaves(shardings_tree, named_leaves: list[tuple[str, Any]], treedef) -> list:
    """Flatten `shardings_tree` like the parameter tree and check that the two match."""
    if isinstance(shardings_tree, jax.sharding.Sharding):
        return [shardings_tree] * len(named_leaves)
    leaves, sharding_treedef = jax.tree_util.tree_flatten(shardings_tree, is_leaf=_is_quantized)
    if sharding_treedef != treedef:
        raise CheckpointError(
            f"the shardings tree does not have the structure of the parameter tree: "
            f"{sharding_treedef} vs {treedef}"
        )
    for (parameter, leaf), sharding in zip(named_leaves, leaves):
        if _is_quantized(sharding) and not _is_quantized(leaf):
            raise CheckpointError(
                f"the sharding of {parameter} is a QuantizedWeight8bit but the parameter is a plain array"
            )
        if not isinstance(sharding, (jax.sharding.Sharding, QuantizedWeight8bit)):
            raise CheckpointError(
                f"the sharding of {parameter} is {type(sharding).__name__}, not a jax.sharding.Sharding"
            )
    return leaves


def load_checkpoint(
    path: Union[str, os.PathLike],
    params_shape_tree,
    shardings_tree,
    *,
    num_workers: int = 4,
    log_interval_s: float = 2.0,
):
    """Validate and load a checkpoint; return the parameter tree of `jax.Array`s.

    path: a checkpoint directory as accepted by `resolve_checkpoint_dir`.
    params_shape_tree: the model's parameter tree of `jax.ShapeDtypeStruct`,
        e.g. from `jax.eval_shape` of the Haiku `init`.
    shardings_tree: the same structure with a `jax.sharding.Sharding` per leaf,
        and a `QuantizedWeight8bit(weight=sharding, scales=sharding)` for each
        quantized leaf; or one `Sharding` used for every array.
    num_workers: files read at the same time; it also bounds how many tensors
        are held in host memory at once.

    Every file is validated first (see `validate_checkpoint`), so a damaged
    checkpoint fails before any payload is read or device memory allocated.
    Arrays keep their stored dtypes. Each process reads only the regions of
    the shards that its devices hold.
    """
    directory = resolve_checkpoint_dir(path)
    named_leaves, treedef = flatten_parameters(params_shape_tree)
    shardings = _sharding_leaves(shardings_tree, named_leaves, treedef)
    files = validate_checkpoint(directory, params_shape_tree)

    total_bytes = sum(f.size for f in files)
    logger.info(
        "Loading %d tensor files (%s) from %s with %d threads",
        len(files), _format_size(total_bytes), directory, num_workers,
    )
    progress = _LoadProgress(len(files), total_bytes, log_interval_s)
    values: list[Any] = [None] * len(files)

    with concurrent.futures.ThreadPoolExecutor(max_workers=num_workers, thread_name_prefix="ckpt-load") as pool:
        futures = {
            pool.submit(_load_tensor_file, tensor_file, sharding): index
            for index, (tensor_file, sharding) in enumerate(zip(files, shardings))
        }
        try:
            for future in concurrent.futures.as_completed(futures):
                index = futures[future]
                values[index] = future.result()
                progress.add_file(files[index].size)
        except BaseException:
            pool.shutdown(wait=True, cancel_futures=True)
            raise

    progress.finish()
    return jax.tree_util.tree_unflatten(treedef, values)


# ---------------------------------------------------------------------------
# Saving


def save_checkpoint(directory: Union[str, os.PathLike], params) -> list[Path]:
    """Write `params` as a checkpoint directory in the released format; return the file paths.

    `params` is a parameter tree of numpy or jax arrays and `QuantizedWeight8bit`
    leaves. Leaf `i` (in `flatten_parameters` order) goes to
    `tensor{i:05d}_000`, each written through a temporary file and a rename
    (see `write_tensor_file`). Raises `CheckpointError` before writing anything
    if a leaf has an unsupported dtype or if the directory already contains
    tensor files beyond the new leaf count.
    """
    directory = Path(directory)
    named_leaves, _ = flatten_parameters(params)
    for parameter, leaf in named_leaves:
        arrays = (leaf.weight, leaf.scales) if _is_quantized(leaf) else (leaf,)
        for array in arrays:
            if isinstance(array, jax.ShapeDtypeStruct):
                raise CheckpointError(f"{parameter} is an abstract ShapeDtypeStruct; save_checkpoint needs arrays")
            dtype = np.dtype(array.dtype) if hasattr(array, "dtype") else np.asarray(array).dtype
            _check_writable_dtype(dtype, parameter)

    directory.mkdir(parents=True, exist_ok=True)
    expected = {tensor_file_name(i) for i in range(len(named_leaves))}
    stale = sorted(
        entry.name for entry in os.scandir(directory)
        if TENSOR_FILE_PATTERN.match(entry.name) and entry.name not in expected
    )
    if stale:
        raise CheckpointError(
            f"{directory} already contains tensor files beyond the {len(named_leaves)} being written "
            f"({', '.join(stale[:5])}{' ...' if len(stale) > 5 else ''}); remove them or choose an empty directory"
        )

    start = time.monotonic()
    paths = []
    for index, (parameter, leaf) in enumerate(named_leaves):
        path = directory / tensor_file_name(index)
        write_tensor_file(path, leaf)
        logger.debug("Wrote %s (%s)", path, parameter)
        paths.append(path)

    _fsync_directory(directory)
    logger.info("Saved %d tensor files to %s in %.1f s", len(paths), directory, time.monotonic() - start)
    return paths


def _fsync_directory(directory: Path) -> None:
    """Persist the renames in `directory` (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
