"""Row-journaled checkpoints: a checkpoint of a host or disk table costs the rows touched since the previous one.

Design (undo journal, in place). A disk table and its row-optimizer state (``[num_rows, 2]``: v_r, n_r) are
files that training updates in place, through their memory maps. Checkpoint ``k`` is not a copy of them: it is
the state those files had when the checkpoint was taken. Between checkpoint ``k`` and the next one (interval
``k``), the first time a row is about to be written its *before-image* -- the row and its optimizer state, as
they were at checkpoint ``k`` -- is appended to the undo log ``undo-<k>.log`` and the log is fsynced *before*
the in-place write (the pages of a shared memory map may reach the file at any moment, so the undo record must
be there first). Later writes of that row in the same interval log nothing. Checkpoint ``k+1`` then costs:

1. ``msync`` of the two files (the dirty pages: rows touched in interval ``k``),
2. a seal record closing ``undo-<k>.log`` (``k+1`` and its journal id), and ``current.json`` = ``{k+1, id}``,
3. the usual small checkpoint files (model without the table, optimizer hyper-parameters, this module's
   record: journal id, store layout, a SHA-256 of a sample of the rows touched in interval ``k``).

The undo log of interval ``k`` belongs to checkpoint ``k`` and is removed when checkpoint ``k`` is pruned
(:meth:`RowJournal.prune`). No interval is journaled before the first checkpoint: a run killed before it starts
over, table included.

Resume to checkpoint ``s`` (:meth:`RowJournal.restore`), from a live file in any later state -- killed mid-step
with a row half-written, mid-checkpoint, or after further checkpoints (``train.resume_from``): follow the chain
``undo-<s>.log`` -> seal -> next log ... up to ``current.json`` (each log's header names the checkpoint id it
starts from; a missing, unsealed or foreign link is a :class:`CheckpointError`), apply the before-images of the
logs newest first (the oldest log holding a row has its value at ``s``; a row in no log never changed), msync,
check the sample digest, then delete the applied logs newest first and set ``current.json`` back to ``s``.
Applying is idempotent, so a crash during a restore is repaired by the next one. A record cut short at the end
of the *open* log (the process died while appending it) is ignored: its in-place write had not started, since
the write waits for the fsync. Any other short or CRC-failing record, a bad header or a layout that does not
match the table is a :class:`CheckpointError` naming the file; nothing is applied silently.

The trainer must make a rollback past later checkpoints durable in the right order: ``discard_after(s)`` (the
``latest`` pointer to ``s``) before :meth:`restore`, so that a crash in between resumes to ``s`` again.

Host tier (:class:`ShadowJournal`). A host table has no durable file, so its checkpoint keeps one: the
*shadow*, a disk table file (plus one for the row state) under the journal folder. The first checkpoint copies
the whole table into it (once, table-sized); every later one copies only the rows written since the previous
checkpoint (tracked per row) into the shadow through a :class:`RowJournal`, so the shadow is journaled exactly
like a disk table, and a crash in the middle of that copy is undone like any other. Resume restores the shadow
to the checkpoint and reads it back into host memory (a resume reads the table; a checkpoint does not).

Log format (``undo-<base step, 8 digits>.log``): ``ENGRAMUJ``, u32 version, u32 length, a JSON header
(``base_step``, ``base_id``, the stores' file names and shapes), u32 CRC-32 of the JSON; then records of
``u32 kind, u64 payload length, u32 CRC-32(payload), u32 CRC-32(the three fields before), payload``. Kind 1
= ``u64 n, int64 rows[n]`` then each store's ``n`` rows as raw bytes; kind 2 = seal, JSON ``{end_step, end_id,
records}``, always the last record. A record cut short leaves a prefix of its bytes, so a complete record head
that fails its CRC is damage, not a torn append.

API. A table tier opts in by giving its stores the hook :attr:`RowStore.journal` (an object with
``before_write(rows)``): :class:`RowJournal` sets it on disk stores, :class:`ShadowJournal` on host stores;
every write path of a store (``scatter``, ``apply_update``, ``write_range``) calls it first. The trainer uses
:class:`TableJournals` (one journal per offloaded table of the model, over the table and its
:class:`~engram.storage.SparseRowOptimizer` state)::

    journals = TableJournals(model, table_opt, directory, fresh=not resuming)
    # checkpoint at step k:
    record = journals.checkpoint(k)                    # flush + seal; small, goes into the checkpoint state
    with journals.rows_left_out():                     # model / row-optimizer state dicts without the rows
        save the checkpoint (with record)
    journals.prune(checkpoint_steps_kept)
    # resume at step s:
    with journals.rows_left_out():
        load the checkpoint
    checkpoints.discard_after(s)                       # if later checkpoints exist
    journals.restore(s, record_of_s)

A sharded table gives each rank's row shard its own :class:`RowJournal` (its own files, its own folder).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import mmap
import struct
import uuid
import zlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..errors import CheckpointError
from ..files import AppendOnlyFile, atomic_write, remove_durably
from .embedding import OffloadedEmbedding
from .optim import SparseRowOptimizer
from .tables import offloaded_tables
from .tiers import DiskRowStore, HostRowStore, RowStore, _as_numpy, chunk_rows_for, write_row_file

logger = logging.getLogger(__name__)

LOG_MAGIC = b"ENGRAMUJ"
LOG_VERSION = 1
CURRENT_FILE = "current.json"
KIND_ROWS, KIND_SEAL = 1, 2
SAMPLE_ROWS = 4096  # rows of an interval whose bytes a checkpoint's digest covers (verification on resume)
_PREFIX = struct.Struct("<8sII")  # magic, version, JSON header length
_U32 = struct.Struct("<I")
_RECORD = struct.Struct("<IQII")  # kind, payload length, CRC-32 of the payload, CRC-32 of the first three fields
_U64 = struct.Struct("<Q")


def log_name(base_step: int) -> str:
    return f"undo-{base_step:08d}.log"


def _log_base(path: Path) -> int | None:
    stem = path.name
    if stem.startswith("undo-") and stem.endswith(".log") and stem[5:-4].isdigit():
        return int(stem[5:-4])
    return None


def _layout(stores: list[RowStore]) -> list[dict]:
    return [
        {
            "file": s.path.name if isinstance(s, DiskRowStore) else s.kind,
            "num_rows": s.num_rows,
            "dim": s.dim,
            "format": s.format.name,
            "row_bytes": s.row_bytes,
        }
        for s in stores
    ]


def _rows_digest(stores: list[RowStore], rows: np.ndarray) -> str:
    h = hashlib.sha256(rows.astype("<i8").tobytes())
    index = torch.from_numpy(rows)
    for s in stores:
        h.update(_as_numpy(s.gather_stored(index)).tobytes())
    return h.hexdigest()


def _sample(rows: np.ndarray) -> np.ndarray:
    """At most SAMPLE_ROWS of the sorted ``rows``, spread over them."""
    if rows.size <= SAMPLE_ROWS:
        return rows
    return rows[np.linspace(0, rows.size - 1, SAMPLE_ROWS).astype(np.int64)]


class _TouchedRows:
    """The rows written in the current interval: a per-row flag (one byte a row) plus the list of rows set, so
    that clearing costs the rows touched, not the table."""

    def __init__(self, num_rows: int):
        self.flags = np.zeros(num_rows, dtype=bool)
        self.chunks: list[np.ndarray] = []

    def new(self, rows: torch.Tensor) -> np.ndarray:
        """The rows of ``rows`` not yet touched, sorted, unique (not yet marked)."""
        r = rows.detach().cpu().numpy().astype(np.int64, copy=False)
        return np.unique(r[~self.flags[r]])

    def mark(self, rows: np.ndarray) -> None:
        if rows.size:
            self.flags[rows] = True
            self.chunks.append(rows)

    def all(self) -> np.ndarray:
        return np.sort(np.concatenate(self.chunks)) if self.chunks else np.zeros(0, dtype=np.int64)

    def clear(self) -> None:
        for rows in self.chunks:
            self.flags[rows] = False
        self.chunks = []


# ---------------------------------------------------------------------------------------------------- log files
def _encode_record(kind: int, payload: bytes) -> bytes:
    fields = struct.pack("<IQI", kind, len(payload), zlib.crc32(payload))
    return fields + _U32.pack(zlib.crc32(fields)) + payload


def _log_header(base_step: int, base_id: str, layout: list[dict]) -> bytes:
    meta = json.dumps({"base_step": base_step, "base_id": base_id, "stores": layout}).encode()
    return _PREFIX.pack(LOG_MAGIC, LOG_VERSION, len(meta)) + meta + _U32.pack(zlib.crc32(meta))


class _LogReader:
    """Reads and checks one undo log: header, row records, seal."""

    def __init__(self, path: Path, layout: list[dict], open_log: bool):
        self.path = path
        self.layout = layout
        self.open_log = open_log  # the log of the interval the live table is in: its tail may be cut short
        try:
            self._f = open(path, "rb")
        except FileNotFoundError:
            raise CheckpointError(f"undo log {path} is missing; the table cannot be taken back to the checkpoint")
        self.size = path.stat().st_size
        head = self._f.read(_PREFIX.size)
        if len(head) < _PREFIX.size:
            raise CheckpointError(f"undo log {path} is truncated inside its header ({self.size} bytes)")
        magic, version, n = _PREFIX.unpack(head)
        if magic != LOG_MAGIC:
            raise CheckpointError(f"{path} is not an engram undo log (missing the {LOG_MAGIC.decode()} magic)")
        if version != LOG_VERSION:
            raise CheckpointError(f"undo log {path} has format version {version}; this engram reads {LOG_VERSION}")
        meta, crc = self._f.read(n), self._f.read(_U32.size)
        if len(meta) < n or len(crc) < _U32.size or zlib.crc32(meta) != _U32.unpack(crc)[0]:
            raise CheckpointError(f"undo log {path} has a corrupt header (CRC mismatch or truncated)")
        header = json.loads(meta)
        self.base_step, self.base_id = int(header["base_step"]), str(header["base_id"])
        if header["stores"] != layout:
            raise CheckpointError(
                f"undo log {path} journals tables {header['stores']}, but the live tables are {layout}; it "
                f"belongs to another table config"
            )
        self.row_bytes = [d["row_bytes"] for d in layout]
        self.seal: dict | None = None

    def records(self) -> Iterator[tuple[np.ndarray, list[bytes]]]:
        """Yield ``(rows, [bytes per store])`` of every row record; sets :attr:`seal` when the seal is read."""
        while True:
            offset = self._f.tell()
            head = self._f.read(_RECORD.size)
            if not head:
                return
            if len(head) < _RECORD.size:
                self._cut_short(offset)
                return
            kind, length, crc, head_crc = _RECORD.unpack(head)
            if zlib.crc32(head[: _RECORD.size - _U32.size]) != head_crc:  # a torn write leaves a prefix: this is damage
                raise CheckpointError(f"undo log {self.path}: the record head at byte {offset} fails its CRC: corrupt")
            payload = self._f.read(length)
            if len(payload) < length:
                self._cut_short(offset)
                return
            if zlib.crc32(payload) != crc:
                raise CheckpointError(f"undo log {self.path}: the record at byte {offset} fails its CRC: corrupt")
            if self.seal is not None:
                raise CheckpointError(f"undo log {self.path}: a record follows the seal at byte {offset}: corrupt")
            if kind == KIND_SEAL:
                self.seal = json.loads(payload)
                continue
            if kind != KIND_ROWS:
                raise CheckpointError(f"undo log {self.path}: unknown record kind {kind} at byte {offset}")
            (n,) = _U64.unpack_from(payload)
            rows = np.frombuffer(payload, dtype="<i8", count=n, offset=_U64.size)
            pos = _U64.size + 8 * n
            parts = []
            for rb in self.row_bytes:
                parts.append(payload[pos : pos + n * rb])
                pos += n * rb
            if pos != len(payload) or (n and (rows.min() < 0 or rows.max() >= self.layout[0]["num_rows"])):
                raise CheckpointError(f"undo log {self.path}: the record at byte {offset} does not match its tables")
            yield rows, parts

    def _cut_short(self, offset: int) -> None:
        if not self.open_log:
            raise CheckpointError(
                f"undo log {self.path} is truncated at byte {offset} ({self.size} bytes), though it was sealed "
                f"or is not the last one: the journal is damaged"
            )
        logger.warning(
            "%s: ignoring the record cut short at byte %d (the run died while writing it)", self.path, offset
        )

    def close(self) -> None:
        self._f.close()


def _stored(part: bytes, n: int, store: RowStore) -> torch.Tensor:
    """Stored rows of ``store`` from their raw bytes (bfloat16 travels as int16, as :func:`_as_numpy` writes it)."""
    storage = store.rows.dtype
    if n == 0:
        return torch.empty(0, *store.rows.shape[1:], dtype=storage)
    raw = torch.int16 if storage == torch.bfloat16 else storage
    return torch.frombuffer(bytearray(part), dtype=raw).reshape(n, *store.rows.shape[1:]).view(storage)


# ---------------------------------------------------------------------------------------------------- disk
class RowJournal:
    """The undo journal of a group of disk stores with the same rows (a table and its row-optimizer state),
    in ``directory``. See the module docstring. ``fresh=True`` starts a new journal (deleting an old one);
    otherwise the journal in ``directory`` is continued, and :meth:`restore` must run before any write."""

    def __init__(self, directory: str | Path, stores: list[DiskRowStore], *, fresh: bool):
        if not stores or len({s.num_rows for s in stores}) != 1:
            raise ValueError("a RowJournal covers one or more disk stores with the same number of rows")
        self.directory = Path(directory)
        self.stores = stores
        self.layout = _layout(stores)
        self.num_rows = stores[0].num_rows
        self._touched = _TouchedRows(self.num_rows)
        self._log: AppendOnlyFile | None = None
        self._records = 0
        self._paused = False
        if fresh:
            remove_durably(_journal_files(self.directory))
            self.head: dict | None = None  # no checkpoint yet: nothing to undo to
        else:
            self.head = self._read_current()
        self.directory.mkdir(parents=True, exist_ok=True)
        for s in stores:
            s.journal = self
            s.use_pread()  # a training process must not fill with mapped table pages (DiskRowStore.use_pread)

    # ------------------------------------------------------------------ writes
    def before_write(self, rows: torch.Tensor) -> None:
        """Called by a store before it writes ``rows``: log the before-images of the rows not yet logged in this
        interval and make the log durable, so that the write may follow."""
        if self._paused:
            return
        new = self._touched.new(rows)
        if new.size == 0:
            return
        if self.head is not None:
            if self._log is None:
                self._log = AppendOnlyFile(
                    self.directory / log_name(self.head["step"]),
                    _log_header(self.head["step"], self.head["id"], self.layout),
                )
            index = torch.from_numpy(new)
            parts = [_U64.pack(new.size), new.astype("<i8").tobytes()]
            parts += [_as_numpy(s.gather_stored(index)).tobytes() for s in self.stores]
            self._log.append(_encode_record(KIND_ROWS, b"".join(parts)))
            self._records += 1
        self._touched.mark(new)

    # ------------------------------------------------------------------ checkpoints
    def checkpoint(self, step: int) -> dict:
        """Make the stores durable as the state of checkpoint ``step``, close this interval's log and start the
        next interval. Returns the record the checkpoint must keep (small: no rows)."""
        for s in self.stores:
            s.flush()
        new_id = uuid.uuid4().hex
        if self.head is not None:
            if self._log is None:  # an interval without writes is still a link of the chain
                self._log = AppendOnlyFile(
                    self.directory / log_name(self.head["step"]),
                    _log_header(self.head["step"], self.head["id"], self.layout),
                )
            seal = {"end_step": int(step), "end_id": new_id, "records": self._records}
            self._log.append(_encode_record(KIND_SEAL, json.dumps(seal).encode()))
        undo_bytes = self._log.path.stat().st_size if self._log is not None else 0
        self._close_log()
        touched = self._touched.all()
        sample = _sample(touched)
        record = {
            "id": new_id,
            "step": int(step),
            "stores": self.layout,
            "sample_rows": torch.from_numpy(sample.copy()),
            "sample_sha256": _rows_digest(self.stores, sample),
            "rows_touched": int(touched.size),  # rows written in the interval: what the msync flushed
            "undo_bytes": int(undo_bytes),  # the interval's undo log, kept with the previous checkpoint
        }
        self._set_current(int(step), new_id)
        self._touched.clear()
        self.release_pages()
        return record

    def restore(self, step: int, record: dict) -> None:
        """Bring the stores back to the state of checkpoint ``step`` (whose :meth:`checkpoint` returned
        ``record``), whatever later state the live files are in. Raises :class:`CheckpointError` naming the file
        when the journal cannot do it exactly."""
        if record.get("stores") != self.layout or int(record.get("step", -1)) != step:
            raise CheckpointError(
                f"the checkpoint of step {step} journals tables {record.get('stores')} at step "
                f"{record.get('step')}, but the live tables in {self.directory.parent} are {self.layout}"
            )
        head = self._read_current()
        if head is None:
            raise CheckpointError(
                f"{self.directory / CURRENT_FILE} is missing: the live table files were not written by the run "
                f"whose checkpoint of step {step} is resumed; start over with train.resume=false"
            )
        chain = self._chain(step, record["id"], head)
        self._paused = True
        try:
            for path in reversed(chain):
                self._apply(path, open_log=path == chain[-1] and _log_base(path) == head["step"])
            for s in self.stores:
                s.flush()
        finally:
            self._paused = False
        rows = record["sample_rows"].numpy()
        if _rows_digest(self.stores, rows) != record["sample_sha256"]:
            raise CheckpointError(
                f"after undoing to step {step}, rows of {[s.path for s in self.stores]} differ from the checkpoint's "
                f"digest: the table files were changed outside this run's journal; start over with "
                f"train.resume=false"
            )
        self._close_log()
        remove_durably(sorted((p for p in self._logs() if _log_base(p) >= step), key=_log_base, reverse=True))
        self._set_current(step, record["id"])
        self._touched.clear()
        self.release_pages()

    def prune(self, kept_steps: list[int]) -> None:
        """Delete the logs of intervals older than the oldest kept checkpoint (nobody can go back to them)."""
        if not kept_steps:
            return
        oldest = min(kept_steps)
        remove_durably([p for p in self._logs() if _log_base(p) < oldest])

    def release_pages(self) -> None:
        """Drop the table pages this process has mapped (they stay in the page cache and the file), so the
        resident memory of training stays the pages touched since the last checkpoint, not the table."""
        for s in self.stores:
            s.advise(getattr(mmap, "MADV_DONTNEED", None))

    def close(self) -> None:
        self._close_log()
        for s in self.stores:
            if s.journal is self:
                s.journal = None
                s.use_pread(False)

    # ------------------------------------------------------------------ helpers
    def _logs(self) -> list[Path]:
        if not self.directory.is_dir():
            return []
        return sorted((p for p in self.directory.iterdir() if _log_base(p) is not None), key=_log_base)

    def _read_current(self) -> dict | None:
        path = self.directory / CURRENT_FILE
        if not path.is_file():
            return None
        try:
            head = json.loads(path.read_text(encoding="utf-8"))
            return {"step": int(head["step"]), "id": str(head["id"])}
        except (ValueError, KeyError, TypeError) as e:
            raise CheckpointError(f"{path} is corrupt ({e}); the journal cannot be trusted") from e

    def _set_current(self, step: int, journal_id: str) -> None:
        atomic_write(self.directory / CURRENT_FILE, json.dumps({"step": step, "id": journal_id}))
        self.head = {"step": step, "id": journal_id}
        self._records = 0

    def _close_log(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None

    def _chain(self, step: int, journal_id: str, head: dict) -> list[Path]:
        """The logs from checkpoint ``step`` to the live state, oldest first (checked link by link)."""
        if head["step"] < step:
            raise CheckpointError(
                f"{self.directory / CURRENT_FILE} says the live tables are at step {head['step']}, older than "
                f"the checkpoint of step {step}: the table files are not this checkpoint's"
            )
        chain: list[Path] = []
        base, base_id = step, journal_id
        while True:
            path = self.directory / log_name(base)
            if base == head["step"]:
                if base_id != head["id"]:
                    raise CheckpointError(
                        f"{self.directory / CURRENT_FILE} names journal id {head['id']} at step {base}, the "
                        f"checkpoint chain reaches id {base_id}: the table files belong to another run"
                    )
                if path.exists():  # the open log: checked through too, so that nothing is applied from a bad chain
                    reader = _LogReader(path, self.layout, open_log=True)
                    try:
                        for _ in reader.records():
                            pass
                    finally:
                        reader.close()
                    chain.append(path)
                return chain
            reader = _LogReader(path, self.layout, open_log=False)
            try:
                if reader.base_id != base_id:
                    raise CheckpointError(
                        f"undo log {path} starts from journal id {reader.base_id}, the checkpoint of step {base} "
                        f"has id {base_id}: the log belongs to another run"
                    )
                for _ in reader.records():
                    pass
            finally:
                reader.close()
            if reader.seal is None:
                raise CheckpointError(f"undo log {path} has no seal, but later intervals follow it: damaged")
            chain.append(path)
            base, base_id = int(reader.seal["end_step"]), str(reader.seal["end_id"])
            if base > head["step"]:
                raise CheckpointError(f"undo log {path} is sealed at step {base}, past the live tables' step")

    def _apply(self, path: Path, open_log: bool) -> None:
        reader = _LogReader(path, self.layout, open_log=open_log)
        try:
            for rows, parts in reader.records():
                index = torch.from_numpy(rows.copy())
                for s, part in zip(self.stores, parts):
                    s.scatter_stored(index, _stored(part, rows.size, s))
        finally:
            reader.close()


# ---------------------------------------------------------------------------------------------------- host
class ShadowJournal:
    """Journaled checkpoints of host stores (a host table and its row state): a disk shadow of each store in
    ``directory``, journaled by a :class:`RowJournal`, refreshed at every checkpoint with the rows written since
    the previous one (the first checkpoint copies them all). See the module docstring."""

    def __init__(self, directory: str | Path, name: str, stores: list[HostRowStore], *, fresh: bool):
        if not stores or len({s.num_rows for s in stores}) != 1:
            raise ValueError("a ShadowJournal covers one or more host stores with the same number of rows")
        self.directory = Path(directory)
        self.stores = stores
        self.paths, self._journal_dir = shadow_files(self.directory, name, len(stores))
        self._touched = _TouchedRows(stores[0].num_rows)
        self._paused = False
        self.journal: RowJournal | None = None
        if fresh:
            remove_durably([*self.paths, *_journal_files(self._journal_dir)])
        elif all(p.is_file() for p in self.paths):
            self.journal = RowJournal(self._journal_dir, self._open_shadows(), fresh=False)
        for s in stores:
            s.journal = self

    def before_write(self, rows: torch.Tensor) -> None:
        if not self._paused:
            self._touched.mark(self._touched.new(rows))

    def checkpoint(self, step: int) -> dict:
        if self.journal is None:  # the first checkpoint: the shadow is the whole table, copied once
            self.directory.mkdir(parents=True, exist_ok=True)
            for s, p in zip(self.stores, self.paths):  # plain file writes: the copy never sits in this process
                write_row_file(p, s.num_rows, s.dim, s.format, s.read_range)
            shadows = self._open_shadows()
            self.journal = RowJournal(self._journal_dir, shadows, fresh=True)
        else:
            rows = self._touched.all()
            chunk = chunk_rows_for(sum(s.row_bytes for s in self.stores))
            for start in range(0, rows.size, chunk):
                index = torch.from_numpy(rows[start : start + chunk])
                for s, shadow in zip(self.stores, self.journal.stores):
                    shadow.scatter_stored(index, s.gather_stored(index))
        self._touched.clear()
        return self.journal.checkpoint(step)

    def restore(self, step: int, record: dict) -> None:
        if self.journal is None:
            missing = [str(p) for p in self.paths if not p.is_file()]
            raise CheckpointError(
                f"the host table's checkpoint files {missing} are missing; the checkpoint of step {step} cannot be "
                f"restored (start over with train.resume=false)"
            )
        self.journal.restore(step, record)
        self._paused = True
        try:
            for s, shadow in zip(self.stores, self.journal.stores):
                chunk = chunk_rows_for(s.row_bytes)
                for start in range(0, s.num_rows, chunk):
                    s.write_stored(start, shadow.read_stored(start, min(s.num_rows, start + chunk)))
        finally:
            self._paused = False
        self.journal.release_pages()
        self._touched.clear()

    def prune(self, kept_steps: list[int]) -> None:
        if self.journal is not None:
            self.journal.prune(kept_steps)

    def close(self) -> None:
        if self.journal is not None:
            self.journal.close()
        for s in self.stores:
            if s.journal is self:
                s.journal = None

    def _open_shadows(self) -> list[DiskRowStore]:
        return [
            DiskRowStore(p, num_rows=s.num_rows, dim=s.dim, fmt=s.format, dtype=s.dtype)
            for s, p in zip(self.stores, self.paths)
        ]


def shadow_files(directory: str | Path, name: str, count: int) -> tuple[list[Path], Path]:
    """The shadow files of a :class:`ShadowJournal` named ``name`` over ``count`` host stores, and its journal
    folder (a resharded resume reads another layout's shadows through them)."""
    directory = Path(directory)
    return [directory / f"{name}.shadow{i}.rows" for i in range(count)], directory / f"{name}.journal"


def disk_journal_dir(path: str | Path) -> Path:
    """The journal folder of the disk table file ``path`` (``<file>.journal``, beside it)."""
    path = Path(path)
    return path.with_name(path.name + ".journal")


def _journal_files(directory: Path) -> list[Path]:
    if not directory.is_dir():
        return []
    logs = sorted((p for p in directory.iterdir() if _log_base(p) is not None), key=_log_base, reverse=True)
    return [*logs, directory / CURRENT_FILE]


# ---------------------------------------------------------------------------------------------------- trainer
class TableJournals:
    """The journals of every host / disk table of ``model`` with its row-optimizer state in ``table_opt``: the
    object the trainer checkpoints and restores (module docstring, API). Disk tables keep their journal next to
    the table file (``<file>.journal/``); host tables keep their shadow files and journal in ``directory``.
    ``tables`` (``{key: (layer_id, table)}``, default :func:`offloaded_tables` of the model) names other tables to
    journal: a sharded model's row shards (:class:`engram.distributed.ShardedEmbedding`)."""

    def __init__(
        self,
        model: nn.Module,
        table_opt: SparseRowOptimizer,
        directory: str | Path,
        *,
        fresh: bool,
        tables: dict[str, tuple[int, OffloadedEmbedding]] | None = None,
    ):
        self.table_opt = table_opt
        self.tables: list[OffloadedEmbedding] = []
        self.journals: dict[str, RowJournal | ShadowJournal] = {}
        tables = offloaded_tables(model) if tables is None else tables  # a sharded model names its shards' tables
        for key, (layer_id, table) in tables.items():
            if table.store.kind == "device":
                continue
            index = next(i for i, t in enumerate(table_opt.tables) if t is table)
            stores = [table.store, table_opt.row_state[index]]
            if table.store.kind == "disk":
                assert isinstance(table.store, DiskRowStore)
                folder = disk_journal_dir(table.store.path)
                self.journals[key] = RowJournal(folder, stores, fresh=fresh)
            else:
                self.journals[key] = ShadowJournal(directory, f"layer{layer_id:02d}", stores, fresh=fresh)
            self.tables.append(table)

    def __bool__(self) -> bool:
        return bool(self.journals)

    @contextlib.contextmanager
    def rows_left_out(self) -> Iterator[None]:
        """Model and row-optimizer state dicts without the journaled rows (the journal holds them)."""
        for t in self.tables:
            t.rows_in_state_dict = False
        self.table_opt.row_state_in_state_dict = False
        try:
            yield
        finally:
            for t in self.tables:
                t.rows_in_state_dict = True
            self.table_opt.row_state_in_state_dict = True

    def checkpoint(self, step: int) -> dict:
        for t in self.tables:
            t.wait_for_prefetches()
        return {key: j.checkpoint(step) for key, j in self.journals.items()}

    def restore(self, step: int, records: dict | None) -> None:
        if records is None or set(records) != set(self.journals):
            raise CheckpointError(
                f"the checkpoint of step {step} journals the tables {sorted(records or {})}, this run has "
                f"{sorted(self.journals)}; resume with the table config the run started with"
            )
        for t in self.tables:
            t.wait_for_prefetches()
        for key, j in self.journals.items():
            j.restore(step, records[key])

    def prune(self, kept_steps: list[int]) -> None:
        for j in self.journals.values():
            j.prune(kept_steps)

    def close(self) -> None:
        for j in self.journals.values():
            j.close()
