"""``metrics.jsonl``: one JSON record per line (train steps, evaluations, resumes), appended as a run goes.

A kill or a full disk can leave the last line half-written. Reading tolerates exactly that (the torn line is
dropped with a warning); a bad line anywhere else is corruption and is reported with its file and line number.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from ..errors import DataError
from ..files import atomic_write

logger = logging.getLogger(__name__)


def read_metrics(path: str | Path) -> list[dict]:
    """The records of a metrics file, without a torn final line."""
    path = Path(path)
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    records = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except ValueError as e:
            if i == len(lines) - 1:
                logger.warning(
                    "%s: the last line (%d) is incomplete (the run was killed while writing it); ignoring it",
                    path,
                    i + 1,
                )
                break
            raise DataError(
                f"{path}, line {i + 1}: not a JSON record ({e}); the file is corrupt: remove the line or the file"
            ) from e
    return records


class MetricsLog:
    """Appends records to ``path`` (and TensorBoard under ``tb/`` when installed). Opening it for a run that
    resumes at ``resume_step`` keeps the records up to that step and drops the rest (they belong to steps that
    will be run again); a new run (``resume_step`` 0) starts an empty file."""

    def __init__(self, path: Path, resume_step: int):
        self.path = path
        kept = []
        if path.exists() and resume_step > 0:
            kept = [r for r in read_metrics(path) if r.get("step", 0) <= resume_step]
        atomic_write(path, "".join(json.dumps(r) + "\n" for r in kept))
        self.tb = None
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(path.parent / "tb"))
        except Exception:  # tensorboard is optional
            self.tb = None

    def write(self, rec: dict) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(rec) + "\n")
        if self.tb is not None:
            for k, v in rec.items():
                if isinstance(v, (int, float)) and k != "step":
                    self.tb.add_scalar(f"{rec.get('kind', 'train')}/{k}", v, rec["step"])

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
