"""engram.files: an atomic write replaces a file whole or not at all, with the permissions open() would give, and
leaves temporaries only a crash can leave, which remove_stale_temps recognises."""

import os

import pytest

from engram.files import atomic_write, remove_stale_temps, temp_path, write_json


def test_atomic_write_replaces_whole_files_with_umask_permissions(tmp_path):
    old = os.umask(0o022)
    try:
        path = atomic_write(tmp_path / "a.txt", "first")
        assert path.read_text() == "first" and path.stat().st_mode & 0o777 == 0o644
        atomic_write(path, lambda p: p.write_bytes(b"second"))
        assert path.read_bytes() == b"second"
        write_json(tmp_path / "b.json", {"path": tmp_path})
        assert str(tmp_path) in (tmp_path / "b.json").read_text()
    finally:
        os.umask(old)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt", "b.json"]


def test_a_failing_writer_leaves_the_old_file_and_no_temporary(tmp_path):
    path = atomic_write(tmp_path / "a.txt", "good")

    def half(p):
        p.write_text("ha")
        raise OSError("disk full (simulated)")

    with pytest.raises(OSError, match="simulated"):
        atomic_write(path, half)
    assert path.read_text() == "good" and [p.name for p in tmp_path.iterdir()] == ["a.txt"]


def test_remove_stale_temps_removes_only_temporaries(tmp_path):
    keep = atomic_write(tmp_path / "model.safetensors", b"x")
    stale_file = temp_path(keep)
    stale_file.write_bytes(b"half")
    stale_dir = tmp_path / ".tables.tmp-123-4"
    stale_dir.mkdir()
    (tmp_path / ".hidden").write_text("not ours")
    assert set(remove_stale_temps(tmp_path)) == {stale_file, stale_dir}
    assert sorted(p.name for p in tmp_path.iterdir()) == [".hidden", "model.safetensors"]


def test_a_lock_is_counted_per_process_and_a_refused_one_releases_nothing(tmp_path):
    import subprocess
    import sys

    from engram.files import FileLock, LockedError

    path = tmp_path / "x.lock"
    a = FileLock(path, "folder x")
    b = FileLock(path, "folder x")  # the same process: counted
    a.release()
    probe = [sys.executable, "-c", f"from engram.files import FileLock\nFileLock({str(path)!r}, 'folder x')"]
    refused = subprocess.run(probe, capture_output=True, text=True)
    assert refused.returncode != 0 and f"folder x is in use by pid {os.getpid()}" in refused.stderr
    b.release()
    assert not path.exists()
    assert subprocess.run(probe, capture_output=True, text=True).returncode == 0
    c = FileLock(path, "folder x")
    assert path.read_text().startswith(f"pid {os.getpid()} ")
    c.release()
    with pytest.raises(LockedError, match="in use"):
        holder = subprocess.Popen(
            [
                sys.executable,
                "-c",
                f"from engram.files import FileLock\nimport time\n"
                f"l = FileLock({str(path)!r}, 'folder x')\nprint('held', flush=True)\n"
                f"time.sleep(60)",
            ],
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            assert holder.stdout.readline().strip() == "held"
            FileLock(path, "folder x")
        finally:
            holder.kill()
            holder.wait()
