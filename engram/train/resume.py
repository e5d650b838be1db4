"""What a resumed run may change, and the checks that keep a run folder one run.

Resuming compares the run asked for with the one the checkpoint recorded, field by field:

* ``model``: every field must match (the weights are that model's).
* refused (:data:`REFUSED`): fields that shaped the steps already taken in a way the rest of the run cannot
  follow -- the seed (initialisation and data order), the batch shape, the table tier, the optimizer algorithm.
  A change is an error that names the field and both values.
* data (:data:`DATA_FIELDS`): may be spelled differently (a moved folder) but must give the same data: the
  tokenizer fingerprint and the fingerprint of the token streams are compared with the checkpoint's.
* everything else is honoured from the resume step on: evaluation / logging / checkpoint cadence, device,
  ``optim.lr`` and the other optimizer hyper-parameters (the resumed steps use the new values; the optimizer
  moments are kept), and ``train.steps``.

``train.steps`` defines the schedule: the LR factor of step ``s`` is ``lr_factor(s, train.steps)``, a function of
the current total. A run extended from 30 to 80 steps therefore runs steps 31..80 at the factors an
uninterrupted 80-step run has at those steps (its first 30 steps ran under the 30-step schedule; they are not
rerun). ``config.json`` always holds the config the latest steps ran with, and every resume that changed a
field appends a ``{"kind": "resume", "step", "changed"}`` record to ``metrics.jsonl``.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ConfigError

REFUSED = {
    "train.seed": "the seed fixed the initialisation and the data order of the steps already taken",
    "train.batch_size": "the batch shape fixed the data of the steps already taken",
    "train.seq_len": "the batch shape fixed the data of the steps already taken",
    "train.table_tier": "the tables and their optimizer state live in the tier the run started with",
    "train.table_format": "the table rows were rounded to the row format the run started with",
    "optim.muon": "the optimizer state is Muon's or AdamW's, not both",
    "optim.table_optimizer": "the table optimizer state belongs to the algorithm the run started with",
}
DATA_FIELDS = ("train.data", "train.max_bytes", "train.val_fraction", "train.tokenizer", "train.vocab_size")
# Fields that describe where and how a run is launched, not what it computes: never compared.
LAUNCH_FIELDS = ("train.out_dir", "train.resume", "train.resume_from", "train.overwrite", "train.progress")


def data_fingerprint(train_tokens: np.ndarray, val_tokens: np.ndarray) -> str:
    """SHA-256 over both token streams: the same fingerprint means the same data under the same tokenizer."""
    h = hashlib.sha256()
    for tokens in (train_tokens, val_tokens):
        arr = np.ascontiguousarray(tokens)
        h.update(str(arr.dtype).encode() + str(arr.shape).encode())
        flat = arr.reshape(-1)
        for start in range(0, flat.size, 1 << 24):
            h.update(memoryview(flat[start : start + (1 << 24)]).cast("B"))
    return h.hexdigest()


def _flat(config: dict[str, Any], section: str) -> dict[str, Any]:
    return {f"{section}.{k}": v for k, v in (config.get(section) or {}).items()}


def resume_changes(
    saved: dict[str, Any],
    current: dict[str, Any],
    saved_fp: dict[str, str] | None,
    current_fp: dict[str, str],
    where: Path,
    step: int,
) -> dict[str, list]:
    """Check a resume against the policy (module docstring); returns the honoured changes
    ``{"optim.lr": [old, new], ...}``, raises ConfigError naming the first refused one."""
    if saved.get("model") != current["model"]:
        raise ConfigError(
            f"{where} holds checkpoints of a different model config; use another train.out_dir or "
            f"train.resume=false to start over"
        )
    old = {**_flat(saved, "train"), **_flat(saved, "optim")}
    new = {**_flat(current, "train"), **_flat(current, "optim")}
    changed = {
        k: [old.get(k), new.get(k)]
        for k in sorted(set(old) | set(new))
        if k not in LAUNCH_FIELDS and k in old and old.get(k) != new.get(k)
    }
    for key, (was, now) in changed.items():
        if key in REFUSED:
            raise ConfigError(
                f"{where}: {key} was {was!r} when the run started and is {now!r} now; {REFUSED[key]}. "
                f"Resume with {key}={was!r}, or start a new run in another train.out_dir"
            )
    if saved_fp:
        for name, label in (("tokenizer", "tokenizer"), ("data", "training / validation data")):
            if saved_fp.get(name) and saved_fp[name] != current_fp[name]:
                raise ConfigError(
                    f"{where}: the {label} differs from the one the checkpoints were trained on "
                    f"(fingerprint {current_fp[name][:12]} vs {saved_fp[name][:12]}); every hash "
                    f"address and batch would change. Resume with the original train.data / "
                    f"train.tokenizer, or start a new run in another train.out_dir"
                )
    steps = new["train.steps"]
    if steps < step:
        raise ConfigError(
            f"{where}: the checkpoint is at step {step} but train.steps is {steps}; ask for at least "
            f"{step} steps, or resume from an earlier step with train.resume_from"
        )
    return {k: v for k, v in changed.items() if k not in DATA_FIELDS}


RUN_FILES = ("config.json", "metrics.jsonl", "model")


def check_fresh_start(out: Path, config: dict[str, Any], overwrite: bool) -> None:
    """Refuse to start a run at step 0 over the files of a different run (one whose ``config.json`` differs, or
    one without it) unless ``overwrite``; the same run starting over is allowed."""
    present = [n for n in RUN_FILES if (out / n).exists()]
    if not present or overwrite:
        return
    cfg = out / "config.json"
    if cfg.is_file():
        try:
            saved = json.loads(cfg.read_text(encoding="utf-8"))
        except ValueError:
            saved = None
        if isinstance(saved, dict) and _comparable(saved) == _comparable(config):
            return
    raise ConfigError(
        f"{out} already holds another run ({', '.join(present)}) and no checkpoint to resume; starting "
        f"here would overwrite it. Choose another train.out_dir, or pass train.overwrite=true "
        f"(--set train.overwrite=true) to replace it"
    )


def _comparable(config: dict[str, Any]) -> dict[str, Any]:
    launch = {k.split(".", 1)[1] for k in LAUNCH_FIELDS}
    return {**config, "train": {k: v for k, v in (config.get("train") or {}).items() if k not in launch}}
