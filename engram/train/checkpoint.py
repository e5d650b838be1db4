"""Checkpoints that survive crashes: atomic step directories, a verified manifest, and an atomic ``latest`` pointer.

Layout of ``directory``::

    step_00001000/
        model.safetensors     state["model"]: the model's tensors, bit-exact
        state.pt              every other key (optimizers, scheduler, rng, data position, ...), torch.save
        meta.json             step, state["config"], state["extra"] (JSON)
        manifest.json         sha256 and size of the three files above; written last
    latest                    "step_00001000\\n"

A save writes into a hidden temporary directory, fsyncs it, renames it to ``step_XXXXXXXX`` in one
``os.replace`` and only then moves the ``latest`` pointer (also write-temp, fsync, ``os.replace``). A crash at any
moment therefore leaves ``latest`` at the previous complete checkpoint. One process (rank 0) writes.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import re
import shutil
import signal
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from ..errors import CheckpointError
from ..files import atomic_write, fsync_dir, fsync_file, set_file_mode, sha256_file

MODEL_FILE, STATE_FILE, META_FILE, MANIFEST_FILE = "model.safetensors", "state.pt", "meta.json", "manifest.json"
LATEST_FILE = "latest"
JSON_KEYS = ("config", "extra")
_STEP_DIR = re.compile(r"^step_(\d{8,})$")
logger = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------------- rng
def capture_rng_state() -> dict[str, Any]:
    """Torch CPU (and every CUDA device), NumPy's global and Python's ``random`` generator states."""
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {
            "name": np_state[0],
            "keys": torch.from_numpy(np_state[1].astype(np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "python": random.getstate(),
    }


def restore_rng_state(state: dict[str, Any]) -> None:
    """Inverse of :func:`capture_rng_state`."""
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    n = state["numpy"]
    np.random.set_state(
        (n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"])
    )
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))


# ---------------------------------------------------------------------------------------------------- files
def _tensors_for_safetensors(tensors: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Detached contiguous CPU tensors; tied weights (shared storage) are cloned, safetensors refuses aliases."""
    out, seen = {}, set()
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"state['model'][{name!r}] is a {type(t).__name__}; model state must hold only tensors")
        t = t.detach().cpu().contiguous()
        key = (t.untyped_storage().data_ptr(), t.device.type)
        if key in seen and t.numel():
            t = t.clone()
        seen.add(key)
        out[name] = t
    return out


# ---------------------------------------------------------------------------------------------------- manager
class CheckpointManager:
    """Save and load training state under ``directory``; keep the newest ``keep_last`` checkpoints.

    ``save(step, state)`` takes a dict with ``"model"`` (a state_dict of tensors), optional ``"config"`` and
    ``"extra"`` (JSON-serialisable) and any other keys (optimizer / scheduler state dicts, ``capture_rng_state()``,
    data position, ...), which go through ``torch.save`` and come back with ``torch.load(weights_only=True)``.
    ``load()`` returns the same dict plus ``"step"``, after checking every file against the manifest.
    """

    def __init__(self, directory: str | os.PathLike[str], keep_last: int | None = 3):
        if keep_last is not None and keep_last < 1:
            raise ValueError(f"keep_last must be >= 1 (or None to keep all), got {keep_last}")
        self.directory = Path(directory)
        self.keep_last = keep_last

    @staticmethod
    def step_dir_name(step: int) -> str:
        return f"step_{step:08d}"

    # ------------------------------------------------------------------ save
    def save(self, step: int, state: dict[str, Any]) -> Path:
        """Write checkpoint ``step`` atomically, point ``latest`` at it, prune old ones; returns its directory."""
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        if "model" not in state:
            raise ValueError("state must contain 'model' (the model's state_dict)")
        self.directory.mkdir(parents=True, exist_ok=True)
        self.remove_stale()
        final = self.directory / self.step_dir_name(step)
        tmp = self.directory / f".tmp-{final.name}-{os.getpid()}"
        tmp.mkdir()
        try:
            self._write_files(tmp, step, state)
            self.publish(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return final

    def publish(self, tmp: Path, final: Path) -> None:
        """Make the complete step folder ``tmp`` the checkpoint ``final``: fsync, one rename, then ``latest``,
        then prune. Until the rename, a crash leaves ``latest`` at the previous complete checkpoint."""
        fsync_dir(tmp)
        if final.exists():  # re-saving a step: move the old one aside first (rename cannot replace a dir)
            old = self.directory / f".old-{final.name}-{os.getpid()}"
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old)
        else:
            os.replace(tmp, final)
        fsync_dir(self.directory)
        atomic_write(self.directory / LATEST_FILE, final.name + "\n")
        self._prune()

    def _write_files(self, folder: Path, step: int, state: dict[str, Any]) -> None:
        save_file(_tensors_for_safetensors(state["model"]), str(folder / MODEL_FILE))
        meta = {"step": int(step), **{k: state[k] for k in JSON_KEYS if k in state}}
        try:
            (folder / META_FILE).write_text(json.dumps(meta, indent=1, sort_keys=True), encoding="utf-8")
        except TypeError as e:
            raise TypeError(f"state['config'] and state['extra'] must be JSON-serialisable: {e}") from e
        torch.save({k: v for k, v in state.items() if k != "model" and k not in JSON_KEYS}, folder / STATE_FILE)
        write_manifest(folder, step, (MODEL_FILE, META_FILE, STATE_FILE))

    def remove_stale(self) -> None:
        """Delete the half-written step folders of a killed save (call while owning the run folder)."""
        for p in self.directory.glob(".tmp-step_*"):
            shutil.rmtree(p, ignore_errors=True)
        for p in self.directory.glob(".old-step_*"):
            shutil.rmtree(p, ignore_errors=True)

    def _prune(self) -> None:
        if self.keep_last is None:
            return
        latest = self.latest_step()
        for step in self.list()[: -self.keep_last]:
            if step != latest:
                shutil.rmtree(self.directory / self.step_dir_name(step), ignore_errors=True)

    # ------------------------------------------------------------------ query
    def list(self) -> list[int]:
        """Steps of the complete checkpoints (those with a manifest), oldest first."""
        if not self.directory.is_dir():
            return []
        steps = []
        for p in self.directory.iterdir():
            m = _STEP_DIR.match(p.name)
            if m and (p / MANIFEST_FILE).is_file():
                steps.append(int(m.group(1)))
        return sorted(steps)

    def latest_step(self) -> int | None:
        """The step ``latest`` points to, or None when nothing has been saved."""
        pointer = self.directory / LATEST_FILE
        if not pointer.is_file():
            return None
        m = _STEP_DIR.match(pointer.read_text(encoding="utf-8").strip())
        if not m:
            raise CheckpointError(f"{pointer} does not name a step directory; delete it to start over")
        return int(m.group(1))

    def intact_steps(self) -> list[int]:
        """Steps of the checkpoints whose every file matches its manifest, oldest first (reads them all)."""
        good = []
        for step in self.list():
            try:
                verify_checkpoint(self.directory / self.step_dir_name(step))
            except CheckpointError:
                continue
            good.append(step)
        return good

    def resume_step(self, which: int | None = None) -> int | None:
        """The step a run resumes from: ``which`` if given (it must be an intact checkpoint), else the one
        ``latest`` names, else -- when ``latest`` is missing but step folders survive -- the newest intact one
        (logged as a warning). None when there is nothing to resume."""
        if which is not None:
            intact = self.intact_steps()
            if which not in intact:
                raise CheckpointError(
                    f"no intact checkpoint of step {which} in {self.directory}; intact steps: {intact or 'none'}"
                )
            return which
        step = self.latest_step()
        if step is not None or not self.list():
            return step
        intact = self.intact_steps()
        if not intact:
            raise CheckpointError(
                f"{self.directory} has step folders {self.list()} but no '{LATEST_FILE}' pointer "
                f"and none of them is intact; delete the folder (or use train.resume=false) to "
                f"start over"
            )
        logger.warning(
            "%s is missing; resuming from the newest intact checkpoint, step %d",
            self.directory / LATEST_FILE,
            intact[-1],
        )
        return intact[-1]

    def discard_after(self, step: int) -> list[int]:
        """Delete the checkpoints newer than ``step`` (a run resumed from an earlier step continues from there,
        and a newer folder would outrank its new checkpoints) and point ``latest`` at ``step``."""
        later = [s for s in self.list() if s > step]
        for s in later:
            shutil.rmtree(self.directory / self.step_dir_name(s))
        atomic_write(self.directory / LATEST_FILE, self.step_dir_name(step) + "\n")
        return later

    # ------------------------------------------------------------------ load
    def resolve(self, which: str | int | os.PathLike[str] = "latest") -> Path:
        """``"latest"``, a step number, or a path to a step directory -> that directory."""
        if isinstance(which, int):
            return self.directory / self.step_dir_name(which)
        if str(which) == "latest":
            step = self.latest_step()
            if step is None:
                raise CheckpointError(
                    f"no checkpoint in {self.directory} (no '{LATEST_FILE}' pointer); "
                    f"train first or pass a checkpoint path"
                )
            return self.directory / self.step_dir_name(step)
        return Path(which)

    def meta(self, which: str | int | os.PathLike[str] = "latest") -> dict[str, Any]:
        """A checkpoint's meta.json (step, config, extra), without loading anything."""
        path = self.resolve(which) / META_FILE
        if not path.is_file():
            raise CheckpointError(f"{path} is missing: the checkpoint is incomplete; load an earlier step")
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except ValueError as e:
            raise CheckpointError(f"{path} is corrupt ({e}); load an earlier step") from e

    def load(self, which: str | int | os.PathLike[str] = "latest") -> dict[str, Any]:
        """Verify and read a checkpoint (tensors on CPU). Raises :class:`CheckpointError` naming the bad file."""
        folder = self.resolve(which)
        try:
            verify_checkpoint(folder)
        except CheckpointError as e:
            earlier = [s for s in self.intact_steps() if s != _step_of(folder)]
            hint = (
                f"; resume from an earlier intact checkpoint with --resume-from {earlier[-1]} "
                f"(train.resume_from={earlier[-1]})"
                if earlier
                else ""
            )
            raise CheckpointError(f"{e}{hint}") from e
        try:
            state = torch.load(folder / STATE_FILE, map_location="cpu", weights_only=True)
            meta = json.loads((folder / META_FILE).read_text(encoding="utf-8"))
            state["model"] = load_file(str(folder / MODEL_FILE), device="cpu")
        except Exception as e:  # verified bytes that still do not parse: written by an incompatible version
            raise CheckpointError(f"cannot read checkpoint {folder}: {e}") from e
        state.update({k: meta[k] for k in JSON_KEYS if k in meta})
        state["step"] = int(meta["step"])
        return state


def _step_of(folder: Path) -> int | None:
    m = _STEP_DIR.match(folder.name)
    return int(m.group(1)) if m else None


def write_manifest(
    folder: Path, step: int, names: tuple[str, ...] | list[str], known: dict[str, dict] | None = None
) -> None:
    """fsync the files ``names`` of a step folder and write ``manifest.json`` (their sha256 and size, plus the
    ``known`` entries other ranks measured) last."""
    files = dict(known or {})
    for name in names:
        set_file_mode(folder / name)
        fsync_file(folder / name)
        files[name] = {"sha256": sha256_file(folder / name), "size": (folder / name).stat().st_size}
    with open(folder / MANIFEST_FILE, "w", encoding="utf-8") as f:  # inside the unpublished folder: no rename
        json.dump({"step": int(step), "files": files}, f, indent=1)
        f.flush()
        os.fsync(f.fileno())


def read_manifest(folder: str | os.PathLike[str]) -> dict[str, dict]:
    """The ``files`` entry of a step folder's manifest; :class:`CheckpointError` when missing or corrupt."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"checkpoint directory {folder} does not exist")
    manifest_path = folder / MANIFEST_FILE
    if not manifest_path.is_file():
        raise CheckpointError(
            f"{manifest_path} is missing: the checkpoint is incomplete (a save was interrupted); load an earlier step"
        )
    try:
        return json.loads(manifest_path.read_text(encoding="utf-8"))["files"]
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{manifest_path} is corrupt ({e}); load an earlier step") from e


def verify_files(folder: Path, files: dict[str, dict], names: list[str] | tuple[str, ...]) -> None:
    """Check the files ``names`` of a step folder against its manifest entries (listed, present, size, SHA-256)."""
    for name in names:
        info = files.get(name)
        path = folder / name
        if info is None:
            raise CheckpointError(f"{folder / MANIFEST_FILE} does not list {name}; the checkpoint is incomplete")
        if not path.is_file():
            raise CheckpointError(f"{path} is missing from the checkpoint; load an earlier step")
        size = path.stat().st_size
        if size != info["size"]:
            raise CheckpointError(
                f"{path} has {size} bytes, the manifest says {info['size']}: truncated or "
                f"overwritten; load an earlier step"
            )
        if sha256_file(path) != info["sha256"]:
            raise CheckpointError(f"{path} fails its SHA-256 check: corrupt; load an earlier step")


def verify_checkpoint(folder: str | os.PathLike[str]) -> None:
    """Check every file of a step directory against its manifest (existence, size, SHA-256)."""
    folder = Path(folder)
    files = read_manifest(folder)
    verify_files(folder, files, sorted({MODEL_FILE, META_FILE, STATE_FILE} | set(files)))


# ---------------------------------------------------------------------------------------------------- signals
class StopFlag:
    """Set by :func:`install_signal_handlers` when SIGINT/SIGTERM arrives."""

    def __init__(self) -> None:
        self.stop_requested = False
        self.signal: int | None = None


@contextlib.contextmanager
def install_signal_handlers(signals: tuple[int, ...] = (signal.SIGINT, signal.SIGTERM)) -> Iterator[StopFlag]:
    """Turn SIGINT/SIGTERM into ``flag.stop_requested = True`` so the loop can save and exit cleanly.

    A second signal while the flag is already set raises ``KeyboardInterrupt`` (a way out when saving hangs).
    The previous handlers are restored on exit. Outside the main thread (where Python cannot install handlers)
    the flag is returned without handlers.
    """
    flag = StopFlag()
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return

    def handler(signum: int, frame: Any) -> None:
        if flag.stop_requested:
            raise KeyboardInterrupt(f"second signal {signum}: stopping without waiting")
        flag.stop_requested = True
        flag.signal = signum

    previous = {s: signal.signal(s, handler) for s in signals}
    try:
        yield flag
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
