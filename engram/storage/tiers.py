"""Where the rows of an Engram table live: one interface, three tiers.

An Engram table is a ``[num_rows, dim]`` matrix that is only ever read and written by row (paper section 5:
the indices of a step are known from the token ids alone, so rows can be fetched ahead of the compute that
needs them). :class:`RowStore` is that access pattern and nothing more:

    gather(rows)              -> values[rows]                 (rows: LongTensor[n], values: [n, dim])
    scatter(rows, v)          :  values[rows] = v
    apply_update(rows, d, s)  :  values[rows] = s * values[rows] + d   (the optimizer's write, done in the tier)
    read_range / write_range  :  contiguous blocks, for chunked copies between tiers and checkpoints
    save(path)

Tiers:

* :class:`DeviceRowStore`: a tensor on the compute device (HBM). Fastest, smallest.
* :class:`HostRowStore`: a CPU tensor in host DRAM, page-locked (pinned) when CUDA is present so that the
  gathered rows can be copied to the GPU asynchronously. The paper's inference setup (a 100B-parameter table
  in host memory, prefetched over PCIe).
* :class:`DiskRowStore`: a memory-mapped file, for tables larger than host memory. Only the pages holding the
  requested rows are read; the file is created and initialised in chunks and never materialised whole.

A table is created directly in its tier (:func:`create_row_store`): a host or disk table never passes through
accelerator memory, and a device table is filled chunk by chunk. Initialisation is ``normal(0, init_std)``
generated on the CPU in fixed blocks of rows, each from its own seed derived from ``(seed, block)``, so the
same ``(num_rows, dim, init_std, seed)`` gives bit-identical tables in every tier.

Row formats (:mod:`~engram.storage.formats`): every tier keeps its rows encoded in one row format (float32,
bfloat16, ..., or FP8 E4M3 with E8M0 block scales) and ``gather`` / ``read_range`` decode them to the store's compute
dtype :attr:`RowStore.dtype`; writes encode. For a float format whose dtype is the compute dtype both are no-ops.

File formats: device and host tables save to safetensors (one tensor ``"rows"``, the encoded rows, plus metadata);
a disk table *is* its file: a 4096-byte header (magic ``ENGRAMRS``, then JSON with format version, shape and
``dtype``, the name of the row format) followed by the encoded rows, row-major. Opening checks the magic, the
version, the row format and that the file size is exactly header + rows, so a truncated file, a header that does
not match the data or a format this engram does not know is refused before any row is served.

Every write bumps :attr:`RowStore.version`; readers that keep copies of rows (the hot-row cache, in-flight
prefetches) compare it to know whether their copies may be stale.
"""

from __future__ import annotations

import contextlib
import json
import mmap
import os
import warnings
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
from tqdm.auto import tqdm

from ..files import FileLock, lock_path_for
from .formats import FloatFormat, RowFormat, row_format

TIERS = ("device", "host", "disk")

DISK_MAGIC = b"ENGRAMRS"
DISK_FORMAT_VERSION = 1
DISK_HEADER_BYTES = 4096
SAFETENSORS_KEY = "rows"

# the compute dtypes rows are gathered in
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}
_INIT_BLOCK_ELEMENTS = 1 << 20  # rows are initialised in blocks of ~1M values (4 MB in float32)
_COPY_CHUNK_BYTES = 64 << 20  # chunk size for copies between tiers


def dtype_name(dtype: torch.dtype) -> str:
    for name, d in _DTYPES.items():
        if d == dtype:
            return name
    raise TypeError(f"unsupported table dtype {dtype}; use one of {sorted(_DTYPES)}")


def cuda_pinning_default() -> bool:
    """Host buffers are page-locked exactly when there is a GPU to copy them to."""
    return torch.cuda.is_available()


def to_device(t: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """``t.to(device)``, but a CPU -> CUDA copy goes through pinned memory and does not block the host (a copy
    from pageable memory waits for the GPU to drain its stream)."""
    device = torch.device(device)
    if device.type == "cuda" and t.device.type == "cpu":
        return (t if t.is_pinned() else t.pin_memory()).to(device, non_blocking=True)
    return t.to(device)


def _check_shape(num_rows: int, dim: int, dtype: torch.dtype, fmt: RowFormat) -> tuple[int, int, torch.dtype]:
    if int(num_rows) <= 0 or int(dim) <= 0:
        raise ValueError(f"a table needs num_rows > 0 and dim > 0, got num_rows={num_rows}, dim={dim}")
    dtype_name(dtype)
    fmt.check_dim(int(dim))
    return int(num_rows), int(dim), dtype


def _formats(dtype: torch.dtype, fmt: str | RowFormat | None) -> tuple[torch.dtype, RowFormat]:
    """``(compute dtype, row format)`` of a new table: rows are stored as ``dtype`` unless ``fmt`` names a format."""
    dtype_name(dtype)
    return dtype, row_format(dtype if fmt is None else fmt)


def check_rows(rows: torch.Tensor, num_rows: int, unique: bool = False) -> torch.Tensor:
    """Validate a 1-D int64 row index tensor against a table of ``num_rows`` rows."""
    if not isinstance(rows, torch.Tensor):
        raise TypeError(f"rows must be a torch.LongTensor, got {type(rows).__name__}")
    if rows.dtype != torch.int64:
        raise TypeError(f"rows must be int64, got {rows.dtype}")
    if rows.dim() != 1:
        raise ValueError(f"rows must be 1-D [n], got shape {tuple(rows.shape)}")
    if rows.numel():
        lo, hi = int(rows.min()), int(rows.max())
        if lo < 0 or hi >= num_rows:
            raise IndexError(f"row ids must lie in [0, {num_rows}), got min {lo}, max {hi}")
        if unique and torch.unique(rows).numel() != rows.numel():
            raise ValueError("rows must not repeat for a write (which value would win?); coalesce them first")
    return rows


def _block_seed(seed: int, block: int) -> int:
    # splitmix-style mixing so that neighbouring (seed, block) pairs give unrelated generators
    x = (int(seed) * 0x9E3779B97F4A7C15 + int(block) * 0xBF58476D1CE4E5B9 + 0x94D049BB133111EB) % (1 << 64)
    x ^= x >> 31
    return x % (1 << 63)


def init_block_rows(dim: int) -> int:
    """Rows per initialisation block (fixed by ``dim`` only, so every tier draws the same blocks)."""
    return max(1, _INIT_BLOCK_ELEMENTS // dim)


def init_rows(start: int, stop: int, dim: int, init_std: float, seed: int) -> torch.Tensor:
    """The initial values of rows ``[start, stop)``: float32 on the CPU, identical whoever asks."""
    block = init_block_rows(dim)
    out = torch.empty(stop - start, dim, dtype=torch.float32)
    b = start // block
    while b * block < stop:
        b_start, b_stop = b * block, (b + 1) * block
        gen = torch.Generator().manual_seed(_block_seed(seed, b))
        values = torch.randn(b_stop - b_start, dim, generator=gen)  # the whole block, so the draw is fixed
        lo, hi = max(start, b_start), min(stop, b_stop)
        out[lo - start : hi - start] = values[lo - b_start : hi - b_start]
        b += 1
    return out.mul_(init_std)


def _progress(total: int, desc: str, progress: bool | None) -> tqdm:
    # progress=None: tqdm decides (shown on a terminal, hidden in logs and tests)
    return tqdm(total=total, desc=desc, unit="row", unit_scale=True, disable=None if progress is None else not progress)


def copy_in_chunks(
    read: Callable[[int, int], torch.Tensor],
    write: Callable[[int, torch.Tensor], None],
    num_rows: int,
    chunk_rows: int,
    *,
    desc: str = "copy rows",
    progress: bool | None = False,
) -> None:
    """``write(start, read(start, stop))`` over rows ``[0, num_rows)`` in chunks of ``chunk_rows``: the one loop
    behind every copy of a whole table (tier to tier, initialisation, state dicts, checkpoints), so that no copy
    holds more than one chunk besides its source and destination."""
    with _progress(num_rows, desc, progress) as bar:
        for start in range(0, num_rows, chunk_rows):
            stop = min(num_rows, start + chunk_rows)
            write(start, read(start, stop))
            bar.update(stop - start)


def chunk_rows_for(row_bytes: int) -> int:
    """Rows per chunk of a chunked copy (~64 MiB)."""
    return max(1, _COPY_CHUNK_BYTES // row_bytes)


def _fill_initial(store: RowStore, init_std: float, seed: int, progress: bool | None) -> None:
    copy_in_chunks(
        lambda start, stop: init_rows(start, stop, store.dim, init_std, seed),
        store.write_range,
        store.num_rows,
        init_block_rows(store.dim),
        desc=f"init {store.kind} table",
        progress=progress,
    )
    store.version = 0


class RowStore:
    """A ``[num_rows, dim]`` table accessed by row, held in the tensor :attr:`rows`. See the module docstring.

    Every tier keeps its rows in a tensor (on the device, in host memory, or mapping a file), so the row
    operations are implemented here once; a tier adds how it is created, loaded and saved. :attr:`rows` holds
    the rows encoded in :attr:`format` (``[num_rows, format.width(dim)]``); :attr:`dtype` is what they decode to
    (default: the format's own dtype for a float format, float32 for fp8). ``gather`` returns
    rows on :attr:`device`: the CPU for host and disk tables (page-locked when CUDA is present), the table's
    device for a device table, so that a device table's rows never make a round trip through the host. Moving
    host rows to the compute device is the caller's business (:class:`~engram.storage.OffloadedEmbedding` does
    it on a side stream).
    """

    kind: str = ""

    def __init__(self, rows: torch.Tensor, fmt: str | RowFormat | None = None, dtype: torch.dtype | None = None):
        if rows.dim() != 2:
            raise ValueError(f"a table is a 2-D [num_rows, width] tensor, got shape {tuple(rows.shape)}")
        self.format = row_format(rows.dtype if fmt is None else fmt)
        if rows.dtype != self.format.storage_dtype:
            raise TypeError(f"{self.format.name} rows are stored as {self.format.storage_dtype}, got {rows.dtype}")
        dtype = self.format.default_dtype if dtype is None else dtype
        self.num_rows, self.dim, self.dtype = _check_shape(
            rows.shape[0], self.format.dim_of(rows.shape[1]), dtype, self.format
        )
        self.rows = rows
        self.version = 0
        # rows stored exactly as they are gathered: no decoding, and read_range may return a view
        self._plain = isinstance(self.format, FloatFormat) and self.format.storage_dtype == self.dtype
        # the journal of a checkpointed table (engram.storage.journal): its before_write(rows) runs before every
        # write, so that the rows' old values can be recorded first
        self.journal = None

    # ------------------------------------------------------------------ sizes
    @property
    def row_bytes(self) -> int:
        """Bytes of one stored row (264 for a 256-wide fp8 row)."""
        return self.format.row_bytes(self.dim)

    @property
    def nbytes(self) -> int:
        return self.num_rows * self.row_bytes

    @property
    def device(self) -> torch.device:
        """Where :meth:`gather` returns rows."""
        return self.rows.device

    # ------------------------------------------------------------------ row access
    def gather(self, rows: torch.Tensor, out: torch.Tensor | None = None, check: bool = True) -> torch.Tensor:
        """``values[rows]`` as ``[n, dim]`` on :attr:`device` (written into ``out`` when given)."""
        if check:
            check_rows(rows, self.num_rows)
        rows = to_device(rows, self.device)
        if not self._plain:
            values = self.format.decode(self._read_stored_rows(rows), self.dtype)
            if out is None:
                return values.pin_memory() if self.device.type == "cpu" and cuda_pinning_default() else values
            self._check_out(out, rows.numel())
            return out.copy_(values)
        if out is None:
            if self.device.type == "cpu" and cuda_pinning_default():
                # host rows are returned page-locked so that the copy to the GPU can be asynchronous
                out = torch.empty(rows.numel(), self.dim, dtype=self.dtype, pin_memory=True)
                return self._read_stored_rows(rows, out)
            return self._read_stored_rows(rows)
        self._check_out(out, rows.numel())
        return self._read_stored_rows(rows, out)

    def gather_stored(self, rows: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """The encoded rows ``[n, format.width(dim)]`` on :attr:`device` (into ``out`` when given), unchecked: to
        move fewer bytes and decode after the copy with ``format.decode``."""
        return self._read_stored_rows(to_device(rows, self.device), out)

    def scatter_stored(self, rows: torch.Tensor, stored: torch.Tensor) -> None:
        """Rows ``rows`` = rows already encoded in :attr:`format` (``[n, format.width(dim)]``), unchecked: to write
        back bytes read with :meth:`gather_stored` exactly (a journal's before-images)."""
        self._writable()
        self._write_stored_rows(to_device(rows, self.device), to_device(stored, self.device))
        self._bump()

    def _read_stored_rows(self, rows: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """The stored rows ``rows`` (an index on :attr:`device`), into ``out`` when given: every read of single
        rows goes through here, so a tier may read them its own way."""
        return (
            torch.index_select(self.rows, 0, rows) if out is None else torch.index_select(self.rows, 0, rows, out=out)
        )

    def _write_stored_rows(self, rows: torch.Tensor, stored: torch.Tensor) -> None:
        """Stored rows at ``rows`` (an index on :attr:`device`): every write of single rows goes through here, the
        journal (if any) first."""
        if self.journal is not None:
            self.journal.before_write(rows)
        self.rows.index_copy_(0, rows, stored)

    def _check_out(self, out: torch.Tensor, n: int) -> None:
        if out.shape != (n, self.dim) or out.dtype != self.dtype or out.device != self.device:
            raise ValueError(
                f"out must be a [{n}, {self.dim}] {self.dtype} tensor on {self.device}, "
                f"got {tuple(out.shape)} {out.dtype} on {out.device}"
            )

    def scatter(self, rows: torch.Tensor, values: torch.Tensor, check: bool = True) -> None:
        """``values[rows] = values``; rows must not repeat."""
        self._writable()
        if check:
            check_rows(rows, self.num_rows, unique=True)
            self._check_values(values, rows.numel())
        self._write_stored_rows(to_device(rows, self.device), self.format.encode(to_device(values, self.device)))
        self._bump()

    def apply_update(
        self, rows: torch.Tensor, delta: torch.Tensor, scale: float | torch.Tensor | None = None, check: bool = True
    ) -> torch.Tensor:
        """``values[rows] = scale * values[rows] + delta`` computed in float32, stored in :attr:`format`.

        ``scale`` is a number or one factor per row (``[n, 1]``). Rows must not repeat. Returns the new values of
        ``rows`` as stored (decoded to :attr:`dtype`, on :attr:`device`), so that callers holding copies (a cache, a
        prefetch) can refresh them without reading the table again.
        """
        if check:
            check_rows(rows, self.num_rows, unique=True)
        if delta.shape != (rows.numel(), self.dim):
            raise ValueError(f"delta must be [{rows.numel()}, {self.dim}], got {tuple(delta.shape)}")
        rows = to_device(rows, self.device)
        new = self.gather(rows, check=False).float()
        if scale is not None:
            new.mul_(to_device(scale, self.device) if isinstance(scale, torch.Tensor) else scale)
        stored = self.format.encode(new.add_(to_device(delta, self.device).float()))
        self._writable()
        self._write_stored_rows(rows, stored)
        self._bump()
        return self.format.decode(stored, self.dtype)

    def read_range(self, start: int, stop: int) -> torch.Tensor:
        """Rows ``[start, stop)`` on :attr:`device`, decoded to :attr:`dtype` (may be a view; copy before keeping
        it)."""
        stored = self.read_stored(start, stop)
        return stored if self._plain else self.format.decode(stored, self.dtype)

    def write_range(self, start: int, values: torch.Tensor) -> None:
        """Rows ``[start, start + len(values))`` = values (encoded in :attr:`format`)."""
        self._check_values(values, values.shape[0])
        self.write_stored(start, self.format.encode(to_device(values, self.device)))

    def read_stored(self, start: int, stop: int) -> torch.Tensor:
        """Rows ``[start, stop)`` as stored (encoded in :attr:`format`; a view)."""
        self._check_range(start, stop)
        return self.rows[start:stop]

    def write_stored(self, start: int, stored: torch.Tensor) -> None:
        """Rows ``[start, start + len(stored))`` = rows already encoded in :attr:`format`."""
        self._writable()
        self._check_range(start, start + stored.shape[0])
        if stored.shape[1:] != self.rows.shape[1:] or stored.dtype != self.rows.dtype:
            raise ValueError(
                f"stored {self.format.name} rows must be [n, {self.rows.shape[1]}] {self.rows.dtype}, "
                f"got {tuple(stored.shape)} {stored.dtype}"
            )
        if self.journal is not None:
            self.journal.before_write(torch.arange(start, start + stored.shape[0]))
        self.rows[start : start + stored.shape[0]].copy_(stored)
        self._bump()

    # ------------------------------------------------------------------ persistence
    def save(self, path: str | os.PathLike) -> None:
        """Write the table to ``path`` (safetensors for device/host, the raw row file for disk)."""
        _save_safetensors(self, path)

    def flush(self) -> None:
        """Make all writes durable (a no-op for in-memory tiers)."""

    def to_tier(self, tier: str, **kwargs) -> RowStore:
        """A copy of this table in another tier; see :func:`to_tier`."""
        return to_tier(self, tier, **kwargs)

    # ------------------------------------------------------------------ helpers for subclasses
    def _writable(self) -> None:
        """Raise if the table may not be written (a disk table opened read-only)."""

    def _check_range(self, start: int, stop: int) -> None:
        if not 0 <= start <= stop <= self.num_rows:
            raise IndexError(f"row range [{start}, {stop}) is outside the table's [0, {self.num_rows})")

    def _check_values(self, values: torch.Tensor, n: int) -> None:
        if values.shape != (n, self.dim):
            raise ValueError(f"values must be [{n}, {self.dim}], got {tuple(values.shape)}")

    def _bump(self) -> None:
        self.version += 1

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(num_rows={self.num_rows}, dim={self.dim}, format={self.format.name}, "
            f"dtype={dtype_name(self.dtype)}, device={self.device}, {self.nbytes / 2**20:.1f} MiB)"
        )


class DeviceRowStore(RowStore):
    """Rows in a tensor on the compute device (any torch device; ``cpu`` on a machine without accelerator)."""

    kind = "device"

    @classmethod
    def create(
        cls,
        num_rows: int,
        dim: int,
        *,
        dtype: torch.dtype = torch.float32,
        fmt: str | RowFormat | None = None,
        init_std: float = 0.02,
        seed: int = 0,
        device: torch.device | str | None = None,
        progress: bool | None = None,
    ) -> DeviceRowStore:
        dtype, fmt = _formats(dtype, fmt)
        num_rows, dim, dtype = _check_shape(num_rows, dim, dtype, fmt)
        device = torch.device(device) if device is not None else _default_device()
        store = cls(torch.empty(num_rows, fmt.width(dim), dtype=fmt.storage_dtype, device=device), fmt, dtype)
        _fill_initial(store, init_std, seed, progress)
        return store

    @classmethod
    def load(
        cls, path: str | os.PathLike, device: torch.device | str | None = None, dtype: torch.dtype | None = None
    ) -> DeviceRowStore:
        device = torch.device(device) if device is not None else _default_device()
        reader = _SafetensorsReader(path)
        fmt = reader.format
        store = cls(
            torch.empty(reader.num_rows, fmt.width(reader.dim), dtype=fmt.storage_dtype, device=device), fmt, dtype
        )
        reader.copy_into(store)
        return store


class HostRowStore(RowStore):
    """Rows in host DRAM; the tensor is page-locked when CUDA is present (``pin=None``), so that gathered rows
    can be staged in pinned buffers and copied to the GPU without blocking."""

    kind = "host"

    def __init__(self, rows: torch.Tensor, fmt: str | RowFormat | None = None, dtype: torch.dtype | None = None):
        if rows.device.type != "cpu":
            raise ValueError(f"a host table lives on the CPU, got a tensor on {rows.device}; use DeviceRowStore")
        super().__init__(rows, fmt, dtype)

    @staticmethod
    def _allocate(num_rows: int, dim: int, fmt: RowFormat | torch.dtype, pin: bool | None) -> torch.Tensor:
        fmt = row_format(fmt)
        pin = cuda_pinning_default() if pin is None else pin
        return torch.empty(num_rows, fmt.width(dim), dtype=fmt.storage_dtype, pin_memory=pin)

    @classmethod
    def create(
        cls,
        num_rows: int,
        dim: int,
        *,
        dtype: torch.dtype = torch.float32,
        fmt: str | RowFormat | None = None,
        init_std: float = 0.02,
        seed: int = 0,
        pin: bool | None = None,
        progress: bool | None = None,
    ) -> HostRowStore:
        dtype, fmt = _formats(dtype, fmt)
        num_rows, dim, dtype = _check_shape(num_rows, dim, dtype, fmt)
        store = cls(cls._allocate(num_rows, dim, fmt, pin), fmt, dtype)
        _fill_initial(store, init_std, seed, progress)
        return store

    @classmethod
    def load(cls, path: str | os.PathLike, pin: bool | None = None, dtype: torch.dtype | None = None) -> HostRowStore:
        reader = _SafetensorsReader(path)
        store = cls(cls._allocate(reader.num_rows, reader.dim, reader.format, pin), reader.format, dtype)
        reader.copy_into(store)
        return store

    @property
    def pinned(self) -> bool:
        return self.rows.is_pinned()


class DiskRowStore(RowStore):
    """Rows in a memory-mapped file (see the module docstring for the layout).

    ``DiskRowStore(path)`` opens an existing file and checks it; pass ``num_rows`` / ``dim`` / ``fmt`` to also
    require a shape and row format (a table built for another config is refused); ``dtype`` is the compute dtype
    rows are gathered in (default: the format's). :meth:`create` makes a new file.
    Reads touch only the pages that hold the requested rows (one 4 KiB page per row at least, so on NVMe the
    cost is in IOPS, not bytes, for rows smaller than a page).
    """

    kind = "disk"

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        readonly: bool = False,
        num_rows: int | None = None,
        dim: int | None = None,
        fmt: str | RowFormat | None = None,
        dtype: torch.dtype | None = None,
    ):
        self.path = Path(path)
        header = read_disk_header(self.path)
        expected = (num_rows, dim, None if fmt is None else row_format(fmt))
        found = (header["num_rows"], header["dim"], header["format"])
        if any(e is not None and e != f for e, f in zip(expected, found)):
            want = (
                f"[{'*' if num_rows is None else num_rows}, {'*' if dim is None else dim}] "
                f"{'any format' if fmt is None else expected[2].name}"
            )
            raise ValueError(
                f"{self.path} holds a [{found[0]}, {found[1]}] {found[2].name} table, "
                f"expected {want}; it was built for another table config"
            )
        self.readonly = readonly
        self._fd: int | None = None  # a descriptor for pread / pwrite row access (see use_pread)
        self._lock = None if readonly else FileLock(lock_path_for(self.path), f"table file {self.path}")
        # Python's own map of the whole file (public, and it has madvise); the rows start after the header
        with open(self.path, "rb" if readonly else "r+b") as f:
            self._mmap = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ if readonly else mmap.ACCESS_WRITE)
        width = found[2].width(found[1])
        values = np.frombuffer(
            self._mmap, dtype=found[2].numpy_dtype, count=found[0] * width, offset=DISK_HEADER_BYTES
        ).reshape(found[0], width)
        with warnings.catch_warnings():
            # a read-only map gives a non-writable array; torch warns, we refuse writes ourselves
            warnings.simplefilter("ignore", UserWarning)
            super().__init__(torch.from_numpy(values).view(found[2].storage_dtype), found[2], dtype)
        # Rows are read at random: without this hint every page fault also reads the pages around it (hundreds
        # of KiB for one 4 KiB page), which on a table much larger than the page cache multiplies the bytes
        # read, and the time, many times over. Sequential copies ask for their range explicitly (read_range).
        self.advise(getattr(mmap, "MADV_RANDOM", None))

    @classmethod
    def create(
        cls,
        path: str | os.PathLike,
        num_rows: int,
        dim: int,
        *,
        dtype: torch.dtype = torch.float32,
        fmt: str | RowFormat | None = None,
        init_std: float = 0.02,
        seed: int = 0,
        overwrite: bool = False,
        progress: bool | None = None,
    ) -> DiskRowStore:
        """A new table file, initialised chunk by chunk. ``init_std=0`` gives an all-zero table without writing
        any row (a sparse file: instant, and it takes no disk space until rows are written; zero bytes are zero
        rows in every format)."""
        dtype, fmt = _formats(dtype, fmt)
        num_rows, dim, dtype = _check_shape(num_rows, dim, dtype, fmt)
        path = Path(path)
        if path.exists() and not overwrite:
            raise FileExistsError(f"{path} exists; pass overwrite=True to replace it")
        lock = FileLock(lock_path_for(path), f"table file {path}")  # before touching a file another run may own
        if init_std != 0:  # plain file writes, not through the map: the process never holds the table
            write_row_file(
                path,
                num_rows,
                dim,
                fmt,
                lambda start, stop: init_rows(start, stop, dim, init_std, seed),
                chunk_rows=init_block_rows(dim),
                desc="init disk table",
                progress=progress,
            )
        else:
            _write_empty_disk_file(path, num_rows, dim, fmt)
        store = cls(path, dtype=dtype)
        lock.release()
        return store

    @classmethod
    def load(cls, path: str | os.PathLike, readonly: bool = False) -> DiskRowStore:
        return cls(path, readonly=readonly)

    def _writable(self) -> None:
        if self.readonly:
            raise PermissionError(f"{self.path} was opened read-only; open it with readonly=False to write rows")

    def _read_stored_rows(self, rows, out=None):
        if self._fd is None:
            return super()._read_stored_rows(rows, out)
        target = (
            out
            if out is not None and out.is_contiguous()
            else torch.empty(rows.numel(), *self.rows.shape[1:], dtype=self.rows.dtype if out is None else out.dtype)
        )
        if rows.numel():
            buffer = memoryview(_as_numpy(target)).cast("B")  # a view of target: rows are read straight into it
            rb = self.row_bytes
            for i, r in enumerate(rows.tolist()):
                os.preadv(self._fd, [buffer[i * rb : (i + 1) * rb]], DISK_HEADER_BYTES + r * rb)
        return target if out is None or target is out else out.copy_(target)

    def _write_stored_rows(self, rows, stored):
        if self._fd is None:
            return super()._write_stored_rows(rows, stored)
        if self.journal is not None:
            self.journal.before_write(rows)
        if rows.numel():
            data = memoryview(_as_numpy(stored)).cast("B")
            rb = self.row_bytes
            for i, r in enumerate(rows.tolist()):
                os.pwrite(self._fd, data[i * rb : (i + 1) * rb], DISK_HEADER_BYTES + r * rb)

    def use_pread(self, enabled: bool = True) -> None:
        """Read and write single rows with ``pread`` / ``pwrite`` instead of through the map.

        A fault on a file map can map a whole page-cache folio (up to 2 MiB for one row), and mapped pages count
        in the process's resident memory: a long run over a table larger than RAM would look as if it held the
        table. With ``pread`` / ``pwrite`` the rows go through the page cache without being mapped, so the
        process holds only the rows it asked for; ``benchmarks/bench_row_access.py`` measures both ways (and
        dropping the map after every few rows, which is slower than both). Training turns it on
        (:mod:`engram.storage.journal`); sequential copies (``read_range`` / ``write_range``) keep the map.
        """
        if enabled and self._fd is None:
            self._fd = os.open(self.path, os.O_RDONLY if self.readonly else os.O_RDWR)
        elif not enabled and self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def read_range(self, start, stop):
        if (stop - start) * self.row_bytes <= _COPY_CHUNK_BYTES:  # a chunk of a copy: read it ahead in bulk
            self.advise(getattr(mmap, "MADV_WILLNEED", None), start, stop)  # (not a view of the whole table)
        return super().read_range(start, stop)

    def advise(self, option: int | None, start: int = 0, stop: int | None = None) -> None:
        """``madvise`` the pages of rows ``[start, stop)`` (all rows by default) where the platform supports it
        (``option`` None, or a Python without ``mmap.madvise``, does nothing)."""
        if option is None or not hasattr(self._mmap, "madvise"):
            return
        stop = self.num_rows if stop is None else stop
        first = (DISK_HEADER_BYTES + start * self.row_bytes) // mmap.PAGESIZE * mmap.PAGESIZE
        length = DISK_HEADER_BYTES + stop * self.row_bytes - first
        if length > 0:
            self._mmap.madvise(option, first, length)

    def flush(self) -> None:
        if not self.readonly:
            self._mmap.flush()
            if self._fd is not None:  # rows written with pwrite
                os.fsync(self._fd)

    def save(self, path):
        """Flush; to another path, copy the file chunk by chunk (a disk table's checkpoint is its file)."""
        self.flush()
        path = Path(path)
        if path.exists() and path.resolve() == self.path.resolve():
            return
        _write_empty_disk_file(path, self.num_rows, self.dim, self.format)
        copy = DiskRowStore(path, dtype=self.dtype)
        _copy_rows(self, copy, progress=None)
        copy.flush()


# ---------------------------------------------------------------------- disk file format
def _as_numpy(values: torch.Tensor) -> np.ndarray:
    values = values.detach().cpu().contiguous()
    if values.dtype == torch.bfloat16:
        values = values.view(torch.int16)
    return values.numpy()


def _write_empty_disk_file(path: Path, num_rows: int, dim: int, fmt: RowFormat | torch.dtype) -> None:
    fmt = row_format(fmt)
    meta = {"format_version": DISK_FORMAT_VERSION, "num_rows": num_rows, "dim": dim, "dtype": fmt.name}
    header = DISK_MAGIC + json.dumps(meta).encode() + b"\n"
    assert len(header) < DISK_HEADER_BYTES
    with open(path, "wb") as f:
        f.write(header.ljust(DISK_HEADER_BYTES, b"\0"))
        f.truncate(DISK_HEADER_BYTES + num_rows * fmt.row_bytes(dim))  # sparse: unwritten rows read as zeros


@contextlib.contextmanager
def row_file_writer(
    path: str | os.PathLike, num_rows: int, dim: int, dtype: torch.dtype | RowFormat
) -> Iterator[Callable[[int, torch.Tensor], None]]:
    """A new disk table file at ``path`` (rows read as zeros until written) and ``write(start, rows)``, which
    writes rows at ``start`` with plain file writes: not through a map, and no :class:`DiskRowStore` is opened,
    so the process holds only what it passes in, and no lock file is left beside the new file."""
    fmt = row_format(dtype)
    num_rows, dim, _ = _check_shape(num_rows, dim, fmt.default_dtype, fmt)
    path = Path(path)
    _write_empty_disk_file(path, num_rows, dim, fmt)
    row_bytes = fmt.row_bytes(dim)
    with open(path, "r+b") as f:

        def write(start: int, chunk: torch.Tensor) -> None:
            if not 0 <= start <= start + chunk.shape[0] <= num_rows or tuple(chunk.shape[1:]) != (dim,):
                raise ValueError(f"{path}: rows [{start}, {start + chunk.shape[0]}) x {dim} do not fit the table")
            f.seek(DISK_HEADER_BYTES + start * row_bytes)
            f.write(_as_numpy(fmt.encode(chunk)).tobytes())

        yield write


def write_row_file(
    path: str | os.PathLike,
    num_rows: int,
    dim: int,
    dtype: torch.dtype,
    read: Callable[[int, int], torch.Tensor],
    *,
    chunk_rows: int | None = None,
    desc: str = "write table file",
    progress: bool | None = False,
) -> None:
    """A new disk table file at ``path`` whose rows ``[start, stop)`` are ``read(start, stop)``, written chunk by
    chunk through :func:`row_file_writer`: the process holds one chunk at a time."""
    row_bytes = row_format(dtype).row_bytes(dim)
    with row_file_writer(path, num_rows, dim, dtype) as write:
        copy_in_chunks(read, write, num_rows, chunk_rows or chunk_rows_for(row_bytes), desc=desc, progress=progress)


def read_disk_header(path: str | os.PathLike) -> dict:
    """Parse and check a disk table's header against its file size; returns num_rows, dim, format (the
    :class:`~engram.storage.formats.RowFormat` named by the header's ``dtype``) and dtype (the format's default
    compute dtype)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no table file at {path}")
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(DISK_HEADER_BYTES)
    if size < len(DISK_MAGIC):
        raise ValueError(f"{path} is truncated: {size} bytes, too short to hold a table header")
    if not head.startswith(DISK_MAGIC):
        raise ValueError(f"{path} is not an engram disk table (missing the {DISK_MAGIC.decode()} magic)")
    if len(head) < DISK_HEADER_BYTES:
        raise ValueError(f"{path} is truncated: {size} bytes, shorter than the {DISK_HEADER_BYTES}-byte header")
    try:
        meta = json.loads(head[len(DISK_MAGIC) :].split(b"\n", 1)[0])
        version, num_rows, dim = int(meta["format_version"]), int(meta["num_rows"]), int(meta["dim"])
        name = meta["dtype"]
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{path}: unreadable table header ({e})") from e
    if version != DISK_FORMAT_VERSION:
        raise ValueError(f"{path}: table format version {version}, this engram reads version {DISK_FORMAT_VERSION}")
    fmt = row_format(name, str(path))
    if num_rows <= 0 or dim <= 0:
        raise ValueError(f"{path}: header has a non-positive shape [{num_rows}, {dim}]")
    fmt.check_dim(dim)
    expected = DISK_HEADER_BYTES + num_rows * fmt.row_bytes(dim)
    if size < expected:
        raise ValueError(
            f"{path} is truncated: the header describes a [{num_rows}, {dim}] {name} table "
            f"({expected} bytes with the header) but the file has {size} bytes"
        )
    if size > expected:
        raise ValueError(
            f"{path}: the header describes a [{num_rows}, {dim}] {name} table ({expected} bytes with "
            f"the header) but the file has {size} bytes; the header does not match the data"
        )
    return {"num_rows": num_rows, "dim": dim, "format": fmt, "dtype": fmt.default_dtype}


# ---------------------------------------------------------------------- safetensors (device / host)
def _save_safetensors(store: RowStore, path: str | os.PathLike) -> None:
    from safetensors.torch import save_file

    meta = {
        "engram_rowstore": str(DISK_FORMAT_VERSION),
        "num_rows": str(store.num_rows),
        "dim": str(store.dim),
        "dtype": store.format.name,
    }
    save_file({SAFETENSORS_KEY: store.read_stored(0, store.num_rows).contiguous()}, str(path), metadata=meta)


class _SafetensorsReader:
    """Reads a saved device/host table in chunks (the file is never loaded whole)."""

    def __init__(self, path: str | os.PathLike):
        from safetensors import safe_open

        self.path = str(path)
        if not Path(path).is_file():
            raise FileNotFoundError(f"no table file at {path}")
        try:
            self._file = safe_open(self.path, framework="pt", device="cpu")
        except Exception as e:  # safetensors raises its own error types for a bad header
            raise ValueError(f"{path} is not a readable safetensors table ({e})") from e
        meta = self._file.metadata() or {}
        if "engram_rowstore" not in meta or SAFETENSORS_KEY not in self._file.keys():
            raise ValueError(f"{path} is a safetensors file but not an engram table (no 'rows' tensor / metadata)")
        self._slice = self._file.get_slice(SAFETENSORS_KEY)
        shape = self._slice.get_shape()
        self.format = row_format(meta["dtype"], self.path)
        self.num_rows, self.dim = int(meta["num_rows"]), int(meta["dim"])
        width = self.format.width(self.dim)
        if list(shape) != [self.num_rows, width]:
            raise ValueError(
                f"{path}: metadata says a [{self.num_rows}, {self.dim}] {self.format.name} table ({width} stored "
                f"values per row) but the tensor is {list(shape)}"
            )

    def read_stored(self, start: int, stop: int) -> torch.Tensor:
        stored = self._slice[start:stop]
        if stored.dtype != self.format.storage_dtype:
            raise ValueError(
                f"{self.path}: {self.format.name} rows must be {self.format.storage_dtype}, got {stored.dtype}"
            )
        return stored

    def copy_into(self, store: RowStore, progress: bool | None = None) -> None:
        _copy_rows(self, store, progress)
        store.version = 0


# ---------------------------------------------------------------------- creation, conversion, loading
def _default_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def _copy_rows(src, dst: RowStore, progress: bool | None) -> None:
    """Copy every row of ``src`` (a store or a saved table) into ``dst``: the stored bytes when both use the same
    row format, else decoded to float32 and encoded again (the conversion between formats)."""

    def write(start: int, stored: torch.Tensor) -> None:
        stored = stored.to(dst.device)
        if src.format is dst.format:
            dst.write_stored(start, stored)
        else:
            dst.write_range(start, src.format.decode(stored, torch.float32))

    copy_in_chunks(
        src.read_stored,
        write,
        dst.num_rows,
        chunk_rows_for(max(dst.row_bytes, 4 * dst.dim)),  # a chunk may be decoded to float32
        desc=f"copy to {dst.kind} table",
        progress=progress,
    )


def create_row_store(
    tier: str,
    num_rows: int,
    dim: int,
    *,
    dtype: torch.dtype = torch.float32,
    fmt: str | RowFormat | None = None,
    init_std: float = 0.02,
    seed: int = 0,
    device: torch.device | str | None = None,
    path: str | os.PathLike | None = None,
    pin: bool | None = None,
    overwrite: bool = False,
    progress: bool | None = None,
) -> RowStore:
    """A new ``normal(0, init_std)`` table created directly in ``tier`` (``device`` / ``host`` / ``disk``).

    Rows are gathered as ``dtype`` and stored in the row format ``fmt`` (default: as ``dtype``).
    ``device`` is only for the device tier (default: the current CUDA device, else the CPU); ``path`` only and
    always for the disk tier; ``pin`` only for the host tier (default: pinned iff CUDA is available).
    """
    _check_tier_args(tier, device=device, path=path, pin=pin)
    common = dict(dtype=dtype, fmt=fmt, init_std=init_std, seed=seed, progress=progress)
    if tier == "device":
        return DeviceRowStore.create(num_rows, dim, device=device, **common)
    if tier == "host":
        return HostRowStore.create(num_rows, dim, pin=pin, **common)
    return DiskRowStore.create(path, num_rows, dim, overwrite=overwrite, **common)


def to_tier(
    store: RowStore,
    tier: str,
    *,
    device: torch.device | str | None = None,
    path: str | os.PathLike | None = None,
    pin: bool | None = None,
    dtype: torch.dtype | None = None,
    fmt: str | RowFormat | None = None,
    overwrite: bool = False,
    progress: bool | None = None,
) -> RowStore:
    """Copy ``store`` into a new table in ``tier`` (chunk by chunk; the source is never duplicated whole).

    ``fmt`` converts the rows to another row format (``"fp8"``, ``"bfloat16"``, ...) and ``dtype`` sets the dtype
    they are gathered in; given alone, ``dtype`` also stores them as ``dtype``. Both default to the source's. The
    source is left as it is; the copy starts at version 0.
    """
    _check_tier_args(tier, device=device, path=path, pin=pin)
    if fmt is not None:
        fmt = row_format(fmt)
    else:
        fmt = store.format if dtype is None else row_format(dtype)
    dtype = store.dtype if dtype is None else dtype
    _check_shape(store.num_rows, store.dim, dtype, fmt)
    if tier == "device":
        device = torch.device(device) if device is not None else _default_device()
        stored = torch.empty(store.num_rows, fmt.width(store.dim), dtype=fmt.storage_dtype, device=device)
        dst: RowStore = DeviceRowStore(stored, fmt, dtype)
    elif tier == "host":
        dst = HostRowStore(HostRowStore._allocate(store.num_rows, store.dim, fmt, pin), fmt, dtype)
    else:
        path = Path(path)
        if isinstance(store, DiskRowStore) and path.exists() and path.resolve() == store.path.resolve():
            raise ValueError(f"to_tier: {path} is the source table's own file")
        if path.exists() and not overwrite:
            raise FileExistsError(f"{path} exists; pass overwrite=True to replace it")
        _write_empty_disk_file(path, store.num_rows, store.dim, fmt)
        dst = DiskRowStore(path, dtype=dtype)
    _copy_rows(store, dst, progress)
    dst.flush()
    dst.version = 0
    return dst


def load_row_store(
    path: str | os.PathLike,
    tier: str | None = None,
    *,
    device: torch.device | str | None = None,
    pin: bool | None = None,
    disk_path: str | os.PathLike | None = None,
    readonly: bool = False,
    dtype: torch.dtype | None = None,
) -> RowStore:
    """Open a saved table, recognising the file format and the row format from the file.

    A disk table file opens in place (``tier=None`` or ``"disk"``) or is copied into ``host`` / ``device``;
    a safetensors table loads into ``host`` (default) or ``device``, or into a new disk file at ``disk_path``.
    The rows keep their row format; ``dtype`` is the dtype they are gathered in (default: the format's).
    """
    if tier is not None and tier not in TIERS:
        raise ValueError(f"unknown tier {tier!r}; expected one of {TIERS}")
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no table file at {path}")
    with open(path, "rb") as f:
        is_disk = f.read(len(DISK_MAGIC)) == DISK_MAGIC
    if is_disk:
        store = DiskRowStore(path, readonly=readonly or tier not in (None, "disk"), dtype=dtype)
        if tier in (None, "disk"):
            if disk_path is not None:
                raise ValueError("disk_path is for loading a safetensors table into the disk tier")
            return store
        return to_tier(store, tier, device=device, pin=pin)
    tier = tier or "host"
    if tier == "device":
        return DeviceRowStore.load(path, device=device, dtype=dtype)
    if tier == "host":
        return HostRowStore.load(path, pin=pin, dtype=dtype)
    if disk_path is None:
        raise ValueError(f"loading the safetensors table {path} into the disk tier needs disk_path= (a new file)")
    reader = _SafetensorsReader(path)
    _write_empty_disk_file(Path(disk_path), reader.num_rows, reader.dim, reader.format)
    store = DiskRowStore(disk_path, dtype=dtype)
    reader.copy_into(store)
    store.flush()
    return store


def _check_tier_args(tier: str, device=None, path=None, pin=None) -> None:
    if tier not in TIERS:
        raise ValueError(f"unknown tier {tier!r}; expected one of {TIERS}")
    if tier == "disk" and path is None:
        raise ValueError("the disk tier needs path= (the table file)")
    if tier != "disk" and path is not None:
        raise ValueError(f"path= is only for the disk tier, not {tier!r}")
    if tier != "device" and device is not None:
        raise ValueError(f"device= is only for the device tier; a {tier} table lives on the CPU")
    if tier != "host" and pin is not None:
        raise ValueError(f"pin= is only for the host tier, not {tier!r}")


def convert_table_file(
    src: str | os.PathLike, dst: str | os.PathLike, fmt: str | RowFormat, *, progress: bool | None = None
) -> None:
    """Write the saved table ``src`` to ``dst`` as the same kind of file (a disk row file, or a safetensors table)
    with its rows in the row format ``fmt``, chunk by chunk. A disk table is never held in memory; a safetensors
    table is written whole, so its encoded rows are held once (a quarter of the float32 rows for fp8)."""
    src, fmt = Path(src), row_format(fmt)
    if not src.is_file():
        raise FileNotFoundError(f"no table file at {src}")
    with open(src, "rb") as f:
        is_disk = f.read(len(DISK_MAGIC)) == DISK_MAGIC
    source = DiskRowStore(src, readonly=True) if is_disk else _SafetensorsReader(src)
    _check_shape(source.num_rows, source.dim, torch.float32, fmt)
    if is_disk:
        _write_empty_disk_file(Path(dst), source.num_rows, source.dim, fmt)
        out: RowStore = DiskRowStore(dst)
    else:
        out = HostRowStore(HostRowStore._allocate(source.num_rows, source.dim, fmt, False), fmt)
    _copy_rows(source, out, progress)
    out.save(dst)  # a disk table: a flush of the file it already is
