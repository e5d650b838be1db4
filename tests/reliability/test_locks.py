"""One owner per run folder and per disk table file: a second process is refused with the owner's pid, and the
lock dies with its owner (kill -9 included)."""

import signal
import subprocess
import sys
import textwrap

import pytest
import torch

from engram.files import LockedError
from engram.storage import DiskRowStore
from engram.train.trainer import train


def hold(code: str, ready: str) -> subprocess.Popen:
    """A separate Python process that runs ``code`` (which takes a lock), prints ``ready``, then sleeps."""
    proc = subprocess.Popen(
        [
            sys.executable,
            "-c",
            textwrap.dedent(code) + f"\nprint({ready!r}, flush=True)\nimport time\ntime.sleep(120)\n",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    line = proc.stdout.readline().strip()
    assert line == ready, f"the holder process failed to start (printed {line!r})"
    return proc


def test_a_second_process_is_refused_a_run_folder_and_gets_it_once_the_owner_is_killed(tmp_path, tiny_run):
    out = tmp_path / "run"
    out.mkdir()
    owner = hold(f"from engram.files import FileLock\nlock = FileLock({str(out / '.lock')!r}, 'run folder')", "held")
    try:
        with pytest.raises(LockedError, match=f"pid {owner.pid}"):
            train(tiny_run(out, steps=2))
        assert not (out / "metrics.jsonl").exists() and not (out / "checkpoints").exists()
    finally:
        owner.send_signal(signal.SIGKILL)
        owner.wait()
    r = train(tiny_run(out, steps=2))  # the kernel released the dead owner's lock
    assert r.steps_done == 2 and (out / "model").is_dir()
    assert not (out / ".lock").exists(), "a finished run releases (and removes) its lock file"


def test_a_second_process_cannot_reinitialise_a_live_disk_table(tmp_path):
    path = tmp_path / "layer01.rows"
    owner = hold(
        f"""
        from engram.storage import DiskRowStore
        store = DiskRowStore.create({str(path)!r}, 64, 4, init_std=0.5, seed=1)
        store.flush()
    """,
        "created",
    )
    try:
        before = path.read_bytes()
        with pytest.raises(LockedError, match=f"table file .*layer01.rows is in use by pid {owner.pid}"):
            DiskRowStore.create(path, 64, 4, init_std=0.5, seed=2, overwrite=True)
        with pytest.raises(LockedError, match=f"pid {owner.pid}"):
            DiskRowStore(path)  # opening it for writing is refused too
        assert path.read_bytes() == before, "the refused process must not touch the owner's rows"
        reader = DiskRowStore(path, readonly=True)  # reading is fine
        assert reader.read_range(0, 64).abs().sum() > 0
    finally:
        owner.send_signal(signal.SIGKILL)
        owner.wait()
    store = DiskRowStore.create(path, 64, 4, init_std=0.0, overwrite=True)
    assert torch.equal(store.read_range(0, 64), torch.zeros(64, 4))


def test_two_runs_sharing_a_table_dir_are_refused(tmp_path, tiny_run):
    tables = tmp_path / "shared-tables"
    tables.mkdir()
    owner = hold(
        f"""
        from engram.storage import DiskRowStore
        store = DiskRowStore.create({str(tables / "layer01.rows")!r}, 8, 4)
    """,
        "created",
    )
    try:
        with pytest.raises(LockedError, match=f"pid {owner.pid}"):
            train(tiny_run(tmp_path / "second", steps=2, table_tier="disk", table_dir=str(tables)))
    finally:
        owner.send_signal(signal.SIGKILL)
        owner.wait()


def test_the_same_process_may_reopen_what_it_owns(tmp_path):
    path = tmp_path / "t.rows"
    a = DiskRowStore.create(path, 8, 4)
    b = DiskRowStore(path)
    b.write_range(0, torch.ones(1, 4))
    assert torch.equal(a.read_range(0, 1), torch.ones(1, 4))
    assert (tmp_path / "t.rows.lock").exists()
    del a, b  # the last holder in this process lets go: lock released and its file removed
    assert not (tmp_path / "t.rows.lock").exists()
