"""The row journal takes a table and its row state back to any kept checkpoint exactly, from any later state of
the live files (further steps, a row write cut short, a half-written checkpoint), writes only the rows touched,
and refuses a damaged, missing or foreign journal with a CheckpointError naming the file."""

import json
import struct

import pytest
import torch

from engram.errors import CheckpointError
from engram.storage import DiskRowStore, HostRowStore, create_row_store
from engram.storage.journal import (
    CURRENT_FILE,
    KIND_ROWS,
    RowJournal,
    ShadowJournal,
    _encode_record,
    _log_header,
    log_name,
)

ROWS, DIM = 64, 8


def disk_stores(folder, num_rows=ROWS):
    table = DiskRowStore.create(folder / "t.rows", num_rows, DIM, seed=1, overwrite=True)
    state = create_row_store("disk", num_rows, 2, init_std=0.0, path=folder / "t.rows.rowstate", overwrite=True)
    return [table, state]


def reopen(folder):
    return [DiskRowStore(folder / "t.rows"), DiskRowStore(folder / "t.rows.rowstate")]


def step(stores, rows, value):
    """What an optimizer step does: the row state, then the table rows, written in place."""
    table, state = stores
    rows = torch.tensor(rows)
    state.scatter(rows, torch.full((len(rows), 2), float(value)))
    table.apply_update(rows, torch.full((len(rows), DIM), float(value)))


def snapshot(stores):
    return [s.read_range(0, s.num_rows).clone() for s in stores]


def assert_state(stores, expected):
    for s, e in zip(stores, expected):
        assert torch.equal(s.read_range(0, s.num_rows), e)


@pytest.fixture
def journaled(tmp_path):
    """Checkpoints at steps 10, 20 and 30 with rows overlapping across intervals, then a step past 30. Returns
    (folder, stores, journal, {step: (record, snapshot)})."""
    stores = disk_stores(tmp_path)
    journal = RowJournal(tmp_path / "j", stores, fresh=True)
    step(stores, [0, 1], 0.5)  # before the first checkpoint: not journaled
    saved = {}
    for k, rows in ((10, [1, 2, 3]), (20, [3, 4, 1]), (30, [5, 1])):
        record = journal.checkpoint(k)
        saved[k] = (record, snapshot(stores))
        step(stores, rows, k)
        step(stores, rows, k + 1)  # a second write of the same rows in the interval logs nothing new
    return tmp_path, stores, journal, saved


@pytest.mark.parametrize("k", [10, 20, 30])
def test_restore_undoes_newest_first_to_any_kept_checkpoint(journaled, k):
    # row 1 changed in every interval: only newest-first undo leaves its value at k
    folder, stores, journal, saved = journaled
    stores = reopen(folder)
    RowJournal(folder / "j", stores, fresh=False).restore(k, saved[k][0])
    assert_state(stores, saved[k][1])
    # training goes on from k: the next checkpoint chains from k, and a restore to it works
    journal = RowJournal(folder / "j", stores, fresh=False)
    step(stores, [1, 7], 99)
    record = journal.checkpoint(k + 5)
    after = snapshot(stores)
    step(stores, [7, 8], 100)
    stores = reopen(folder)
    RowJournal(folder / "j", stores, fresh=False).restore(k + 5, record)
    assert_state(stores, after)


def test_resume_from_an_older_checkpoint_and_then_its_successor_is_refused(journaled):
    folder, stores, journal, saved = journaled
    stores = reopen(folder)
    RowJournal(folder / "j", stores, fresh=False).restore(10, saved[10][0])
    assert_state(stores, saved[10][1])
    # the later intervals were undone and their logs deleted: step 20's state no longer exists
    with pytest.raises(CheckpointError, match="older than|another run|missing"):
        RowJournal(folder / "j", reopen(folder), fresh=False).restore(20, saved[20][0])


def test_each_checkpoint_logs_a_row_once_and_costs_the_rows_touched(journaled):
    folder, stores, journal, saved = journaled
    row_bytes = DIM * 4 + 2 * 4 + 8  # before-images of table row and state row, plus the row id
    # interval 20 touched rows 3, 4, 1 (twice each): one record of 3 rows, plus header, record head and seal
    assert saved[30][0]["rows_touched"] == 3
    undo = saved[30][0]["undo_bytes"]
    assert 3 * row_bytes < undo < 3 * row_bytes + 600
    assert (folder / "j" / log_name(20)).stat().st_size == undo


def test_undo_bytes_do_not_depend_on_the_table_size(tmp_path):
    sizes = {}
    for n in (ROWS, 16 * ROWS):
        folder = tmp_path / str(n)
        folder.mkdir()
        stores = disk_stores(folder, n)
        journal = RowJournal(folder / "j", stores, fresh=True)
        journal.checkpoint(1)
        step(stores, [3, 9, 40], 1.0)
        header = len(_log_header(1, journal.head["id"], journal.layout))  # spells num_rows: a few digits more
        sizes[n] = journal.checkpoint(2)["undo_bytes"] - header
    assert sizes[ROWS] == sizes[16 * ROWS] > 3 * (DIM * 4 + 2 * 4)


def test_a_crash_between_the_undo_record_and_the_row_write_is_undone(journaled):
    folder, stores, journal, saved = journaled
    table, state = stores
    rows = torch.tensor([6, 1])
    journal.before_write(rows)  # the record is durable; the process dies during the in-place write:
    table.rows[6, :3] = 123.0  # row 6 half-written (behind the journal's back, as a torn write would be)
    del journal
    stores = reopen(folder)
    RowJournal(folder / "j", stores, fresh=False).restore(30, saved[30][0])
    assert_state(stores, saved[30][1])


@pytest.mark.parametrize("cut", [10, 40])  # inside the record head, inside the payload
def test_a_record_cut_short_at_the_end_of_the_open_log_is_ignored(journaled, cut):
    folder, stores, journal, saved = journaled
    journal.close()
    log = folder / "j" / log_name(30)
    payload = struct.pack("<Q", 1) + struct.pack("<q", 9) + bytes(DIM * 4 + 2 * 4)
    with open(log, "ab") as f:  # the append of a record for row 9 was killed part way
        f.write(_encode_record(KIND_ROWS, payload)[:cut])
    stores = reopen(folder)
    RowJournal(folder / "j", stores, fresh=False).restore(30, saved[30][0])
    assert_state(stores, saved[30][1])


def test_a_truncated_sealed_log_is_refused_with_its_name(journaled):
    folder, stores, journal, saved = journaled
    log = folder / "j" / log_name(10)
    log.write_bytes(log.read_bytes()[:-30])
    with pytest.raises(CheckpointError, match=log.name + ".*truncated"):
        RowJournal(folder / "j", reopen(folder), fresh=False).restore(10, saved[10][0])


def test_a_corrupt_record_is_refused_with_its_name(journaled):
    folder, stores, journal, saved = journaled
    log = folder / "j" / log_name(20)
    data = bytearray(log.read_bytes())
    data[len(data) // 2] ^= 0xFF
    log.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=log.name + ".*CRC"):
        RowJournal(folder / "j", reopen(folder), fresh=False).restore(10, saved[10][0])
    # nothing was applied: the newer logs are checked before any row is written
    assert_state(reopen(folder), snapshot(stores))


def test_a_missing_log_or_pointer_is_refused(journaled):
    folder, stores, journal, saved = journaled
    (folder / "j" / log_name(20)).unlink()
    with pytest.raises(CheckpointError, match=log_name(20) + ".*missing"):
        RowJournal(folder / "j", reopen(folder), fresh=False).restore(10, saved[10][0])
    (folder / "j" / CURRENT_FILE).unlink()
    with pytest.raises(CheckpointError, match=CURRENT_FILE + ".*missing"):
        RowJournal(folder / "j", reopen(folder), fresh=False).restore(30, saved[30][0])


def test_a_table_changed_outside_the_journal_fails_the_digest(journaled):
    folder, stores, journal, saved = journaled
    record = saved[30][0]
    sampled = next(r for r in record["sample_rows"].tolist() if r not in (5, 1))  # a row the undo does not rewrite
    stores[0].rows[sampled] += 1.0  # not through the store's write path: no undo record
    with pytest.raises(CheckpointError, match="digest"):
        RowJournal(folder / "j", reopen(folder), fresh=False).restore(30, record)


def test_a_journal_of_another_table_is_refused(journaled, tmp_path):
    folder, stores, journal, saved = journaled
    other = tmp_path / "other"
    other.mkdir()
    wide = [DiskRowStore.create(other / "t.rows", ROWS, 2 * DIM, overwrite=True)]
    with pytest.raises(CheckpointError, match="journals tables"):
        RowJournal(folder / "j", wide, fresh=False).restore(30, saved[30][0])


def test_pruning_removes_the_logs_of_pruned_checkpoints_only(journaled):
    folder, stores, journal, saved = journaled
    journal.prune([20, 30])
    assert not (folder / "j" / log_name(10)).exists()
    assert (folder / "j" / log_name(20)).exists() and (folder / "j" / log_name(30)).exists()
    with pytest.raises(CheckpointError, match=log_name(10) + ".*missing"):
        RowJournal(folder / "j", reopen(folder), fresh=False).restore(10, saved[10][0])
    stores = reopen(folder)
    RowJournal(folder / "j", stores, fresh=False).restore(20, saved[20][0])
    assert_state(stores, saved[20][1])


def test_a_crash_after_sealing_and_before_publishing_resumes_the_previous_checkpoint(journaled):
    folder, stores, journal, saved = journaled
    journal.checkpoint(40)  # sealed, current.json moved to 40; the checkpoint of 40 is never published
    assert json.loads((folder / "j" / CURRENT_FILE).read_text())["step"] == 40
    stores = reopen(folder)
    RowJournal(folder / "j", stores, fresh=False).restore(30, saved[30][0])
    assert_state(stores, saved[30][1])


def test_host_tables_restore_from_their_journaled_shadow(tmp_path):
    table = HostRowStore.create(ROWS, DIM, seed=3, pin=False)
    state = HostRowStore.create(ROWS, 2, init_std=0.0, pin=False)
    stores = [table, state]
    journal = ShadowJournal(tmp_path, "layer01", stores, fresh=True)
    step(stores, [1, 2], 1.0)
    rec10 = journal.checkpoint(10)  # the first checkpoint copies the table once
    at10 = snapshot(stores)
    step(stores, [2, 5], 2.0)
    rec20 = journal.checkpoint(20)
    assert rec20["rows_touched"] == 2  # later checkpoints copy only the rows written since
    step(stores, [5, 6], 3.0)
    # a new process: host memory is gone; the shadow goes back to step 10 and is read into the new tables
    fresh_stores = [HostRowStore.create(ROWS, DIM, seed=9, pin=False), HostRowStore.create(ROWS, 2, pin=False)]
    ShadowJournal(tmp_path, "layer01", fresh_stores, fresh=False).restore(10, rec10)
    assert_state(fresh_stores, at10)


def test_journaled_disk_stores_read_and_write_rows_with_pread_like_the_map(tmp_path):
    stores = disk_stores(tmp_path)
    expected = snapshot(stores)
    RowJournal(tmp_path / "j", stores, fresh=True)
    table = stores[0]
    rows = torch.tensor([5, 0, 63, 17])
    assert torch.equal(table.gather(rows), expected[0][rows])
    table.scatter(rows, torch.arange(4 * DIM, dtype=torch.float32).reshape(4, DIM))
    expected[0][rows] = torch.arange(4 * DIM, dtype=torch.float32).reshape(4, DIM)
    assert torch.equal(table.read_range(0, ROWS), expected[0])  # the map sees the pwrite (one page cache)
    assert torch.equal(DiskRowStore(tmp_path / "t.rows", readonly=True).read_range(0, ROWS), expected[0])
