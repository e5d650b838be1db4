"""File utilities every layer shares: atomic writes, fsync, checksums, and the ownership lock of a folder or file.

* :func:`atomic_write` is the one way the package replaces a file: the bytes go to a hidden temporary file in the
  same folder, are fsynced, get the permissions a plain ``open()`` would give (``0666 & ~umask``, so files are
  readable by others under the usual umask), and are renamed over the target in one ``os.replace``. A crash at
  any moment leaves either the old file or the new one.
* :func:`remove_stale_temps` deletes the temporaries a killed process left behind; call it only while holding
  the folder's :class:`FileLock`, so no live writer owns them.
* :class:`FileLock` is an OS lock (``fcntl.flock``) that the kernel releases when its holder exits, however it
  exits; a second process asking for it is refused with a :class:`LockedError` naming the holder's pid. Locks
  belong to a process: the same process may take a lock it already holds (it is counted, and released when the
  last holder lets go), so one program can open a table it is already training.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import socket
import threading
import time
from pathlib import Path
from typing import Callable

from .errors import EngramError

TEMP_MARK = ".tmp-"  # temporaries are ".<name>.tmp-<pid>-<n>"
_TEMP_NAME = re.compile(r"^\..+\.tmp-\d+-\d+$")
_counter = iter(range(1 << 62))
_counter_lock = threading.Lock()


class LockedError(EngramError, RuntimeError):
    """Another process owns the folder or file (the message names its pid)."""


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def file_mode() -> int:
    """The mode ``open()`` gives a new file under the current umask (0644 under the usual 022)."""
    return 0o666 & ~_umask()


def set_file_mode(path: str | os.PathLike) -> None:
    """Give a file written by a library that creates it private (safetensors writes 0600) the mode ``open()``
    would have given it."""
    os.chmod(path, file_mode())


def fsync_dir(path: str | os.PathLike) -> None:
    """Make a rename or a new entry in ``path`` durable (no-op where directories cannot be opened)."""
    if os.name == "nt":
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_file(path: str | os.PathLike) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def temp_path(path: str | os.PathLike) -> Path:
    """A fresh hidden temporary beside ``path`` that :func:`remove_stale_temps` recognises."""
    path = Path(path)
    with _counter_lock:
        n = next(_counter)
    return path.with_name(f".{path.name}{TEMP_MARK}{os.getpid()}-{n}")


def atomic_write(path: str | os.PathLike, content: str | bytes | Callable[[Path], object]) -> Path:
    """Replace ``path`` atomically with ``content``: text (UTF-8), bytes, or a function that writes the file at
    the temporary path it is given (``lambda p: save_file(tensors, p)``). Returns ``path``."""
    path = Path(path)
    tmp = temp_path(path)
    try:
        if callable(content):
            content(tmp)
        else:
            with open(tmp, "wb") as f:
                f.write(content.encode("utf-8") if isinstance(content, str) else content)
        fsync_file(tmp)
        set_file_mode(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    fsync_dir(path.parent)
    return path


def write_json(path: str | os.PathLike, obj: object, indent: int = 2) -> Path:
    """:func:`atomic_write` of ``obj`` as JSON (values JSON cannot hold, such as paths, as their ``str``)."""
    return atomic_write(path, json.dumps(obj, indent=indent, default=str))


def remove_stale_temps(folder: str | os.PathLike) -> list[Path]:
    """Delete the temporaries (:func:`temp_path` names, files or folders) directly in ``folder``; returns them."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    removed = []
    for p in folder.iterdir():
        if _TEMP_NAME.match(p.name):
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)
            removed.append(p)
    return removed


# ---------------------------------------------------------------------------------------------------- locks
_held: dict[str, list] = {}  # lock file path -> [fd, count], for the locks this process holds
_held_lock = threading.Lock()


def lock_path_for(path: str | os.PathLike) -> Path:
    """The lock file of a data file (``layer01.rows`` -> ``layer01.rows.lock``)."""
    path = Path(path)
    return path.with_name(path.name + ".lock")


class FileLock:
    """An exclusive OS lock on ``path`` (a lock file, created if needed) for ``what`` ("run folder runs/x").

    Taken by the constructor; refused with :class:`LockedError` when another process holds it. Released by
    :meth:`release`, on leaving a ``with`` block, when the object is garbage collected, or by the kernel when the
    process dies. The lock file holds the owner's pid and host (for the refusal message); a release removes it,
    a crash leaves it behind, which is harmless: only the kernel's lock counts.
    """

    def __init__(self, path: str | os.PathLike, what: str):
        import fcntl

        self.path = Path(path)
        self.what = what
        self._key = str(self.path.resolve())
        self._released = True  # until taken: a refused lock must never release someone else's count
        with _held_lock:
            entry = _held.get(self._key)
            if entry is not None:
                entry[1] += 1
                self._released = False
                return
            while True:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, file_mode())
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except OSError:
                    holder = os.read(fd, 4096).decode("utf-8", "replace").strip()
                    os.close(fd)
                    owner = holder or "a process that is starting (pid not yet written)"
                    raise LockedError(
                        f"{what} is in use by {owner} (lock file {self.path}); wait for it to finish "
                        f"or stop it, or use another folder"
                    ) from None
                try:  # the holder we waited on may have removed the file between our open and our lock
                    same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
                except FileNotFoundError:
                    same = False
                if same:
                    break
                os.close(fd)
            os.ftruncate(fd, 0)
            os.write(
                fd, f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%dT%H:%M:%S')}\n".encode()
            )
            _held[self._key] = [fd, 1]
            self._released = False

    def release(self) -> None:
        if self._released:
            return
        self._released = True
        with _held_lock:
            entry = _held.get(self._key)
            if entry is None:
                return
            entry[1] -= 1
            if entry[1] == 0:
                del _held[self._key]
                self.path.unlink(missing_ok=True)  # while still locked: no one else holds this file
                os.close(entry[0])  # closing the descriptor drops the flock

    def __enter__(self) -> FileLock:
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):  # at interpreter exit the module may be gone; the kernel frees it
            self.release()


# ---------------------------------------------------------------------------------------------------- append-only
class AppendOnlyFile:
    """A new file that only grows, each :meth:`append` durable (written and fsynced) when it returns: the
    write-ahead rule of a journal, whose records must be on disk before the writes they protect.

    ``AppendOnlyFile(path, header)`` creates ``path`` (it must not exist), writes ``header``, fsyncs the file and
    its folder (so the new name survives a crash too).
    """

    def __init__(self, path: str | os.PathLike, header: bytes):
        self.path = Path(path)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND, file_mode())
        self.append(header)
        fsync_dir(self.path.parent)

    def append(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            view = view[os.write(self._fd, view) :]
        os.fsync(self._fd)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.close()


def remove_durably(paths: list[Path]) -> None:
    """Delete ``paths`` in the given order, making each removal durable (folder fsync) before the next: a crash
    leaves a prefix of the list removed, never a later file removed before an earlier one."""
    for p in paths:
        if p.exists():
            p.unlink()
            fsync_dir(p.parent)


# ---------------------------------------------------------------------------------------------------- crash tests
FAULT_ENV, FAULT_MARKER_ENV = "ENGRAM_FAULT", "ENGRAM_FAULT_MARKER"


def fault_point(name: str) -> None:
    """A place where crash tests kill the process. When the environment variable ``ENGRAM_FAULT`` equals
    ``name``, write this process's pid to the file ``ENGRAM_FAULT_MARKER`` names (durably) and wait to be
    killed; otherwise do nothing. The points: ``checkpoint-<step>`` (the trainer, inside the save of that
    checkpoint: table journals sealed, step folder not yet published) and ``row-update-<n>`` (the n-th step of a
    :class:`~engram.storage.SparseRowOptimizer` in this process, after the row state was written in place and
    before the table rows are: a table half-updated)."""
    if os.environ.get(FAULT_ENV) != name:
        return
    marker = os.environ.get(FAULT_MARKER_ENV)
    if marker:
        atomic_write(marker, str(os.getpid()))
    while True:
        time.sleep(3600)
