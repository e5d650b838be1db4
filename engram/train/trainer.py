"""The training loop: data -> model -> optimizers -> checkpoints -> metrics, written once.

Everything a run needs is in :class:`RunConfig` (model, train and optimizer sections), which is what YAML
configs hold. A run directory contains ``config.json``, ``metrics.jsonl``, ``checkpoints/`` and, at the end,
``model/`` (a :func:`engram.model.save_model` folder). The process that trains owns the folder (an OS lock,
``.lock``); a second one is refused with the owner's pid.

What a single process and a ``torchrun`` job do differently (devices, per-rank batches, wrapping, reductions,
the stop flag, the checkpoint store, the final gather) is a *plan* object: :class:`SingleProcess` here,
:class:`engram.distributed.train.DataParallel` for torchrun. :func:`train` takes either. Resume rules:
:mod:`.resume`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from tqdm.auto import tqdm

from ..errors import ConfigError, DivergenceError
from ..files import FileLock, atomic_write, fault_point, remove_stale_temps, write_json
from ..model.config import ModelConfig
from ..model.io import save_model
from ..model.model import EngramLM
from ..model.params import count_params
from ..storage.formats import check_trainable, row_format
from ..storage.journal import TableJournals
from ..storage.optim import SparseRowOptimizer
from ..table import TableFactory
from ..tokenizer import CompressedTokenizer
from ..yamlio import dataclass_from_dict
from .checkpoint import CheckpointManager, capture_rng_state, install_signal_handlers, restore_rng_state
from .data import TextTokenizer, TokenizedCorpus, build_token_files, load_corpus, load_tokenizer, random_batch
from .evaluate import evaluate
from .extend import load_initial_weights
from .metrics import MetricsLog
from .optim import LRSchedule, OptimConfig, build_optimizers, build_table_optimizer, clip_grad_norm
from .resume import check_fresh_start, data_fingerprint, resume_changes

logger = logging.getLogger(__name__)


@dataclass
class TrainConfig:
    """Run length, batch shape, data, logging and checkpoint cadence."""

    out_dir: str = "runs/default"
    steps: int = 500
    batch_size: int = 16
    seq_len: int = 128
    eval_every: int = 100
    eval_batches: int = 20
    log_every: int = 10
    ckpt_every: int = 250
    keep_last: int = 2
    seed: int = 0
    device: str = "auto"  # auto = cuda if available
    data: str | None = None  # None = the Python standard library corpus
    text_field: str = "text"  # the text column when data is a Hugging Face dataset (save_to_disk, parquet, csv)
    max_bytes: int | None = 4_000_000
    val_fraction: float = 0.05
    tokenizer: str = "bpe"
    vocab_size: int = 4096  # for tokenizer = "bpe"
    cache_dir: str | None = None
    resume: bool = True
    resume_from: int | None = None  # resume from this checkpoint step instead of the latest (later ones dropped)
    overwrite: bool = False  # start a new run over another run's files in out_dir
    progress: bool = True
    # Engram tables: "device" (nn.Parameter, trained by the table optimizer of optim) or "host" / "disk"
    # (created in that tier, trained row-wise in place by engram.storage.SparseRowOptimizer: needs
    # optim.table_optimizer=rowwise, the row-wise Adam rule that device tables get with the same setting)
    table_tier: str = "device"
    table_dir: str | None = None  # disk tier: folder of the table files (default out_dir/tables)
    table_cache_bytes: int = 0  # host / disk tiers: hot-row cache per table on the compute device
    # host / disk tiers: row format of the tables, float32 or bfloat16 (fp8 cannot be trained: see docs/offload.md)
    table_format: str = "float32"
    data_parallel: str = "fsdp"  # under torchrun: backbone "fsdp" (FSDP2 fully_shard) or "ddp"; tables row-sharded
    compile: bool = False  # run the training forward / backward through torch.compile (evaluation stays eager)
    # write out_dir/model at the end; false keeps a disk table too big to copy only in the run's own table file
    save_model: bool = True
    # weights to start from at step 0 (context extension, engram.train.extend): a model folder, a run folder or a
    # checkpoint step folder of a run whose model differs from this one only in max_seq_len / rope_scaling
    init_from: str | None = None

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "seq_len", "eval_every", "log_every", "ckpt_every", "keep_last"):
            if getattr(self, name) <= 0:
                raise ValueError(f"train.{name} must be positive, got {getattr(self, name)}")
        if self.data_parallel not in ("fsdp", "ddp"):
            raise ValueError(f"train.data_parallel must be 'fsdp' or 'ddp', got {self.data_parallel!r}")
        if self.table_tier not in ("device", "host", "disk"):
            raise ValueError(f"train.table_tier must be 'device', 'host' or 'disk', got {self.table_tier!r}")
        if self.table_dir is not None and self.table_tier != "disk":
            raise ValueError("train.table_dir is the folder of disk tables; set train.table_tier=disk or drop it")
        if self.resume_from is not None and (self.resume_from < 0 or not self.resume):
            raise ConfigError(
                f"train.resume_from must be a checkpoint step >= 0 with train.resume=true, got "
                f"{self.resume_from} (resume={self.resume})"
            )
        fmt = row_format(self.table_format, "train.table_format")
        check_trainable(fmt, "train.table_format")
        if fmt.name != "float32" and self.table_tier == "device":
            raise ConfigError(
                f"train.table_format={self.table_format!r} is for host and disk tables (a device table is a "
                f"parameter of the model's dtype); set train.table_tier=host or drop train.table_format"
            )
        if self.init_from is not None and self.table_tier != "device":
            raise ConfigError(
                f"train.init_from copies weights into device tables; got train.table_tier={self.table_tier!r}"
            )
        if self.table_cache_bytes < 0 or (self.table_cache_bytes and self.table_tier == "device"):
            raise ValueError(
                f"train.table_cache_bytes must be >= 0 and is for host / disk tables, got "
                f"{self.table_cache_bytes} with table_tier={self.table_tier!r}"
            )


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.model.to_dict(), "train": dataclasses.asdict(self.train), "optim": self.optim.to_dict()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "RunConfig":
        """The run config of a YAML / JSON mapping with sections ``model`` (Engram shape in ``model.engram``),
        ``train`` and ``optim``; the one schema every command reads."""
        if isinstance(d, dict) and "engram" in d:
            raise ConfigError(
                "a top-level 'engram:' section is the old sweep / compare schema; move it under "
                "model: as model.engram (with --set: model.engram.FIELD=VALUE)"
            )
        return dataclass_from_dict(cls, d)


@dataclass
class TrainResult:
    model: EngramLM
    out_dir: Path
    history: list[dict]  # one record per logged step
    evals: list[dict]  # one record per evaluation
    final: dict  # last evaluation
    tokens_per_s: float
    steps_done: int
    interrupted: bool = False
    signal: int | None = None  # the signal (SIGINT / SIGTERM) that stopped the run, if one did


def pick_device(spec: str) -> torch.device:
    """``"auto"`` (CUDA when available, else CPU) or a torch device name that must exist on this machine."""
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    where = f"device {spec!r} (train.device / --device)"
    try:
        device = torch.device(spec)
    except RuntimeError as e:
        raise ConfigError(f"{where} is not a device name ({e}); use auto, cpu, cuda or cuda:N") from e
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"{where}: CUDA is not available on this machine; use auto or cpu")
    n_cuda = torch.cuda.device_count() if device.type == "cuda" else 0
    if device.type == "cuda" and device.index is not None and device.index >= n_cuda:
        raise ConfigError(f"{where}: this machine has {n_cuda} CUDA device(s); use cuda:0..cuda:{n_cuda - 1} or auto")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"{where}: MPS is not available on this machine; use auto or cpu")
    return device


def prepare_data(tcfg: TrainConfig) -> tuple[TextTokenizer, TokenizedCorpus]:
    """Load the corpus, get the tokenizer (training a BPE if asked), tokenise once into cached token files."""
    corpus = load_corpus(
        tcfg.data, max_bytes=tcfg.max_bytes, val_fraction=tcfg.val_fraction, text_field=tcfg.text_field
    )
    cache_root = Path(tcfg.cache_dir) if tcfg.cache_dir else None
    tok = load_tokenizer(
        tcfg.tokenizer,
        corpus.train,
        vocab_size=tcfg.vocab_size,
        cache_dir=None if cache_root is None else cache_root / "tokenizers",
    )
    key = f"{corpus.fingerprint('train')[:12]}-{corpus.fingerprint('val')[:8]}-{tok.fingerprint[:12]}"
    from .data import default_cache_dir

    token_dir = (cache_root or default_cache_dir()) / "tokens" / key
    return tok, build_token_files(corpus, tok, token_dir, progress=tcfg.progress)


def model_config_for(cfg: ModelConfig, tok: TextTokenizer) -> tuple[ModelConfig, CompressedTokenizer | None]:
    """The model config for this tokenizer (vocab size and Engram pad id follow it) and, for Engram, its
    compressed tokenizer: everything but the weights (the hasher is ``engram_hasher(cfg, ctok)``)."""
    changes: dict[str, Any] = {"vocab_size": tok.vocab_size}
    if cfg.engram is not None:
        changes["engram"] = {**cfg.engram.to_dict(), "pad_id": tok.pad_id}
    cfg = cfg.replace(**changes)
    ctok = CompressedTokenizer(tok.hf) if cfg.family == "engram" else None
    if ctok is not None and ctok.vocab_size != cfg.vocab_size:
        # tokenizers with id gaps: the compressed table covers the decoded range; pad it to the embedding size
        raise ValueError(f"tokenizer reports {ctok.vocab_size} ids but its largest id implies {cfg.vocab_size}")
    return cfg, ctok


def build_model(cfg: ModelConfig, tok: TextTokenizer, table_factory: TableFactory | None = None) -> EngramLM:
    """The model for this tokenizer (:func:`model_config_for`). ``table_factory`` builds the Engram tables in
    their tier (see :class:`EngramLM`)."""
    cfg, ctok = model_config_for(cfg, tok)
    return EngramLM(cfg, ctok, table_factory=table_factory)


def disk_table_dir(tcfg: TrainConfig) -> Path | None:
    """The folder of a disk-tier run's table files (``train.table_dir``, default ``out_dir/tables``); None for
    the other tiers."""
    if tcfg.table_tier != "disk":
        return None
    return Path(tcfg.table_dir) if tcfg.table_dir else Path(tcfg.out_dir) / "tables"


def offloaded_table_factory(tcfg: TrainConfig, reopen: bool = False) -> TableFactory | None:
    """The table factory for ``train.table_tier`` (None for device tables). Tables are seeded from
    ``train.seed``; a disk run creates its table files, and a resume (``reopen``) opens them as they are: their
    journals (:mod:`engram.storage.journal`) take them back to the checkpoint."""
    if tcfg.table_tier == "device":
        return None
    from ..storage import table_factory

    return table_factory(
        tcfg.table_tier,
        path_dir=disk_table_dir(tcfg),
        cache_bytes=tcfg.table_cache_bytes,
        fmt=tcfg.table_format,
        seed=tcfg.seed,
        overwrite=True,
        progress=tcfg.progress,
        reopen=reopen and tcfg.table_tier == "disk",
    )


def table_journal_dir(tcfg: TrainConfig) -> Path:
    """Where host tables keep their checkpoint shadow and journal (disk tables journal beside their file)."""
    return Path(tcfg.out_dir) / "tables"


class SingleProcess:
    """The plan of a run in one process: one device, the whole batch, plain checkpoints. A distributed plan
    (:class:`engram.distributed.train.DataParallel`) overrides what differs under torchrun."""

    rank, world_size = 0, 1

    def __init__(self, device: str = "auto"):
        self.device = pick_device(device)

    @property
    def is_main(self) -> bool:
        """The process that writes the run folder's shared files (config, metrics, model)."""
        return self.rank == 0

    def label(self, family: str) -> str:
        return family

    def lock_run_folder(self, out: Path) -> FileLock | None:
        out.mkdir(parents=True, exist_ok=True)
        return FileLock(out / ".lock", f"run folder {out}")

    def prepare_data(self, tcfg: TrainConfig) -> tuple[TextTokenizer, TokenizedCorpus]:
        return prepare_data(tcfg)

    def reopens_tables(self, ckpt: CheckpointManager, resume_at: int | None) -> bool:
        """Whether the run's host / disk tables are opened as they are (a resume: their journals take them back
        to the checkpoint) rather than created."""
        return resume_at is not None

    def table_factory(self, tcfg: TrainConfig, reopen: bool = False) -> TableFactory | None:
        return offloaded_table_factory(tcfg, reopen)

    def table_journals(
        self, model: EngramLM, table_opt: SparseRowOptimizer, tcfg: TrainConfig, fresh: bool
    ) -> TableJournals:
        """The journals that checkpoint the host / disk tables (see :mod:`engram.storage.journal`)."""
        return TableJournals(model, table_opt, table_journal_dir(tcfg), fresh=fresh)

    def wrap(self, model: EngramLM) -> torch.nn.Module:
        """The module the training forward runs through."""
        return model

    def batch(self, tokens, tcfg: TrainConfig, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        return random_batch(tokens, tcfg.batch_size, tcfg.seq_len, gen)

    def clip_grad_norm(self, model: EngramLM, params: list, max_norm: float) -> torch.Tensor:
        return clip_grad_norm(params, max_norm)

    def sync_expert_counts(self, model: EngramLM) -> None:
        """MoE expert loads of this step, summed over the processes that share the batch (none here)."""

    def loss_value(self, loss: torch.Tensor) -> float:
        return loss.item()

    def agree_to_stop(self, stop: bool, signum: int | None) -> tuple[bool, int | None]:
        return stop, signum

    def barrier(self) -> None:
        """Wait for every process of the run (none other here)."""

    def checkpoints(self, directory: Path, keep_last: int) -> CheckpointManager:
        return CheckpointManager(directory, keep_last=keep_last)

    def save_checkpoint(
        self, ckpt: CheckpointManager, step: int, model: EngramLM, optimizers: list, state: dict[str, Any]
    ) -> None:
        ckpt.save(step, {"model": model.state_dict(), "optimizers": [o.state_dict() for o in optimizers], **state})

    def load_checkpoint(self, ckpt: CheckpointManager, step: int, model: EngramLM, optimizers: list) -> dict:
        state = ckpt.load(step)
        model.load_state_dict(state.pop("model"))
        for o, s in zip(optimizers, state.pop("optimizers")):
            o.load_state_dict(s)
        return state

    def final_model(self, model: EngramLM, run: RunConfig, tok: TextTokenizer) -> EngramLM | None:
        """The single-process model to save and return (None on processes that do not write it)."""
        return model

    def close(self) -> None:
        """Leave whatever the plan joined (nothing here)."""


def _hyperparameters(optimizers: list) -> list[list[dict]]:
    return [[{k: v for k, v in g.items() if k != "params"} for g in o.param_groups] for o in optimizers]


def _clear_for_fresh_start(out: Path, ckpt: CheckpointManager) -> None:
    """Step 0 in a folder that may hold this run's earlier attempt: drop its old checkpoints (they would outrank
    the new run's) and model."""
    if ckpt.list() or (ckpt.directory / "latest").exists():
        logger.warning(
            "%s: starting over at step 0 (train.resume=false or train.overwrite=true); removing the old checkpoints",
            out,
        )
        shutil.rmtree(ckpt.directory)
    shutil.rmtree(out / "model", ignore_errors=True)


def train(
    run: RunConfig,
    *,
    data: tuple[TextTokenizer, TokenizedCorpus] | None = None,
    stop_after: int | None = None,
    desc: str | None = None,
    on_eval: Callable[[dict], None] | None = None,
    plan: SingleProcess | None = None,
) -> TrainResult:
    """Train ``run.model`` for ``run.train.steps`` steps, resuming from ``out_dir`` when it holds checkpoints
    (checked by :mod:`.resume`; ``train.resume_from`` picks an earlier one).

    ``stop_after`` ends the run early after that many steps *of this call* (with a checkpoint), as an interrupt
    would; tests use it to check that resuming reproduces an uninterrupted run. ``plan`` says how the run is
    spread over processes (default: this one).
    """
    plan = plan or SingleProcess(run.train.device)
    out = Path(run.train.out_dir)
    lock = None
    try:
        lock = plan.lock_run_folder(out)
        return _train_locked(run, plan, data, stop_after, desc, on_eval, out)
    finally:
        if lock is not None:
            lock.release()
        plan.close()


def _train_locked(run: RunConfig, plan: SingleProcess, data, stop_after, desc, on_eval, out: Path) -> TrainResult:
    tcfg = run.train
    device = plan.device
    ckpt = plan.checkpoints(out / "checkpoints", tcfg.keep_last)
    if plan.is_main:  # this process owns the folder: temporaries in it are a killed run's
        for folder in (out, out / "model", ckpt.directory):
            remove_stale_temps(folder)
        if ckpt.directory.is_dir():
            ckpt.remove_stale()
    torch.manual_seed(tcfg.seed)
    tok, tokens = data or plan.prepare_data(tcfg)
    fingerprints = {"tokenizer": tok.fingerprint, "data": data_fingerprint(tokens.train.tokens, tokens.val.tokens)}
    run = dataclasses.replace(run, model=model_config_for(run.model, tok)[0])
    config_dict = run.to_dict()
    changed: dict[str, list] = {}
    resume_at = ckpt.resume_step(tcfg.resume_from) if tcfg.resume else None
    # before any table file is created or reopened (every rank reads the same files: the same verdict)
    if resume_at is None:
        check_fresh_start(out, config_dict, tcfg.overwrite)
    else:
        meta = ckpt.meta(resume_at)
        changed = resume_changes(
            meta.get("config") or {},
            config_dict,
            (meta.get("extra") or {}).get("fingerprints"),
            fingerprints,
            out,
            resume_at,
        )
    reopen = plan.reopens_tables(ckpt, resume_at)  # a resume trains the live table files on, journaled
    model = build_model(run.model, tok, plan.table_factory(tcfg, reopen=reopen))
    model.to(device)
    train_model = plan.wrap(model)
    if tcfg.compile:  # the compiled module shares the parameters; checkpoints still save `model`
        train_model = torch.compile(train_model)
    amp = torch.bfloat16 if device.type == "cuda" else None
    optimizers = build_optimizers(model, run.optim)
    table_opt = build_table_optimizer(model, run.optim, reopen=reopen)  # row-wise, in their tier
    # host / disk tables are checkpointed by their journals (the rows touched since the previous checkpoint)
    journals = plan.table_journals(model, table_opt, tcfg, fresh=not reopen) if table_opt else None

    def no_rows() -> contextlib.AbstractContextManager:
        return journals.rows_left_out() if journals else contextlib.nullcontext()

    stepped = optimizers + ([table_opt] if table_opt is not None else [])
    schedule = LRSchedule(stepped, run.optim, tcfg.steps)
    gen = torch.Generator().manual_seed(tcfg.seed)
    start = 0
    history: list[dict] = []
    evals: list[dict] = []
    if resume_at is not None:
        fresh = _hyperparameters(stepped)  # the values asked for now: honoured over the saved ones
        with no_rows():
            state = plan.load_checkpoint(ckpt, resume_at, model, optimizers)
            if (table_opt is None) != ("table_optimizer" not in state):
                raise ConfigError(
                    f"{out} holds checkpoints written with other table storage than "
                    f"train.table_tier={tcfg.table_tier!r}; resume with the tier the run started with"
                )
            if table_opt is not None:
                table_opt.load_state_dict(state["table_optimizer"])
        for o, groups in zip(stepped, fresh):
            for g, f in zip(o.param_groups, groups):
                g.update(f)
        schedule.load_state_dict(state["schedule"])
        gen.set_state(state["data_generator"])
        restore_rng_state(state["rng"])
        start = int(state["step"])
        history = [h for h in state["extra"].get("history", []) if h["step"] <= start]
        evals = [e for e in state["extra"].get("evals", []) if e["step"] <= start]
        # a journaled table is undone to resume_at, so no later step folder may survive (even one that a killed
        # save published without moving `latest` to it): its tables would no longer exist
        later = journals and any(s > resume_at for s in ckpt.list())
        if plan.is_main and (ckpt.latest_step() != resume_at or later):
            dropped = ckpt.discard_after(resume_at)
            logger.warning("%s: resumed from step %d; removed the later checkpoints %s", out, resume_at, dropped)
        plan.barrier()
        if journals:  # after discard_after: a crash in between resumes to this step again
            journals.restore(resume_at, state.get("table_journal"))
    else:
        if tcfg.init_from is not None:  # a new stage (context extension): start from another run's weights
            source = load_initial_weights(model, tcfg.init_from, tok.fingerprint)
            logger.info("%s: starting from the weights of %s", out, source)
        plan.barrier()
        if plan.is_main:
            _clear_for_fresh_start(out, ckpt)
        plan.barrier()
    log = None
    if plan.is_main:
        write_json(out / "config.json", config_dict)
        log = MetricsLog(out / "metrics.jsonl", start)
        if changed:
            log.write({"kind": "resume", "step": start, "changed": changed})

    def save(step: int) -> None:
        t0 = time.perf_counter()
        journal_record = {"table_journal": journals.checkpoint(step)} if journals else {}
        fault_point(f"checkpoint-{step}")
        with no_rows():
            save_state(step, journal_record)
        if journals:
            journals.prune(ckpt.list())
        if log is not None:
            records = journal_record.get("table_journal", {}).values()
            folder = ckpt.directory / ckpt.step_dir_name(step)
            log.write(
                {
                    "kind": "checkpoint",
                    "step": step,
                    "seconds": time.perf_counter() - t0,
                    "folder_bytes": sum(p.stat().st_size for p in folder.iterdir()) if folder.is_dir() else None,
                    "undo_bytes": sum(r["undo_bytes"] for r in records),
                    "rows_touched": sum(r["rows_touched"] for r in records),
                }
            )

    def save_state(step: int, journal_record: dict) -> None:
        plan.save_checkpoint(
            ckpt,
            step,
            model,
            optimizers,
            {
                "config": config_dict,
                "schedule": schedule.state_dict(),
                **({"table_optimizer": table_opt.state_dict()} if table_opt is not None else {}),
                **journal_record,
                "data_generator": gen.get_state(),
                "rng": capture_rng_state(),
                "extra": {
                    "history": history,
                    "evals": evals,
                    "fingerprints": fingerprints,
                    "world_size": plan.world_size,
                },
            },
        )

    def run_eval(step: int) -> dict:
        r = evaluate(
            model,
            tokens.val,
            batch_size=tcfg.batch_size,
            seq_len=tcfg.seq_len,
            max_batches=tcfg.eval_batches,
            device=device,
            autocast_dtype=amp,
        )
        rec = {
            "kind": "eval",
            "step": step,
            "val_loss": r["loss"],
            "val_ppl": r["ppl"],
            "val_bpb": r["bpb"],
            "expert_load": r["expert_load"],
            "gates": r["gates"],
        }
        evals.append(rec)
        if log is not None:
            log.write(rec)
        if on_eval is not None:
            on_eval(rec)
        return rec

    model.train()
    tokens_per_step = tcfg.batch_size * tcfg.seq_len
    steps_this_call = 0
    interrupted = False
    signum = None
    t_train = 0.0
    bar = tqdm(
        total=tcfg.steps,
        initial=start,
        desc=desc or plan.label(run.model.family),
        disable=not tcfg.progress or not plan.is_main,
        unit="step",
        dynamic_ncols=True,
    )
    with install_signal_handlers() as stop:
        for step in range(start, tcfg.steps):
            t0 = time.perf_counter()
            x, y = plan.batch(tokens.train.tokens, tcfg, gen)
            x, y = x.to(device), y.to(device)
            with torch.autocast(device_type=device.type, dtype=amp, enabled=amp is not None):
                loss = train_model(x, y).loss
            for o in optimizers:
                o.zero_grad(set_to_none=True)
            loss.backward()
            clipped = [*model.parameters(), *(table_opt.grad_tensors() if table_opt is not None else [])]
            gnorm = plan.clip_grad_norm(model, clipped, run.optim.grad_clip) if run.optim.grad_clip else None
            for o in optimizers:
                o.step()
            if table_opt is not None:  # after the step: its gradients belong to this step's forward
                table_opt.step()
                table_opt.zero_grad()
            lr, factor = stepped[0].param_groups[0]["lr"], schedule.factor  # what this step used
            schedule.step()
            plan.sync_expert_counts(model)
            model.update_moe_biases()
            loss_v = plan.loss_value(loss)
            if not math.isfinite(loss_v):
                raise DivergenceError(
                    f"loss became {loss_v} at step {step + 1} with optim.lr={run.optim.lr:g}; "
                    f"lower it (e.g. --set optim.lr={run.optim.lr / 3:.2g}) or check the data"
                )
            dt = time.perf_counter() - t0
            t_train += dt
            steps_this_call += 1
            done = step + 1
            bar.update(1)
            if done % tcfg.log_every == 0 or done == tcfg.steps:
                rec = {
                    "kind": "train",
                    "step": done,
                    "loss": loss_v,
                    "lr_factor": factor,
                    "lr": lr,
                    "tokens_per_s": tokens_per_step / dt,
                    "grad_norm": None if gnorm is None else float(gnorm),
                }
                history.append(rec)
                if log is not None:
                    log.write(rec)
                bar.set_postfix(loss=f"{loss_v:.3f}", tok_s=f"{tokens_per_step * steps_this_call / t_train:,.0f}")
            if done % tcfg.eval_every == 0 or done == tcfg.steps:
                run_eval(done)
            last = done == tcfg.steps
            stopping, signum = plan.agree_to_stop(
                stop.stop_requested or (stop_after is not None and steps_this_call >= stop_after), stop.signal
            )
            if done % tcfg.ckpt_every == 0 or last or stopping:
                save(done)
            if stopping and not last:
                interrupted = True
                break
    bar.close()
    if log is not None:
        log.close()
    final = evals[-1] if evals else {}
    result_model = model
    if journals:
        journals.close()
    if not interrupted and tcfg.save_model:
        full = plan.final_model(model, run, tok)
        if full is not None and plan.is_main:
            result_model = full
            save_model(full, out / "model")
            save_text_tokenizer(tok, out / "model")
        plan.barrier()
    if steps_this_call:
        tok_s = tokens_per_step * steps_this_call / t_train
    else:  # nothing left to do (resumed a finished run): report what the logged steps measured
        tok_s = sum(h["tokens_per_s"] for h in history) / max(len(history), 1)
    return TrainResult(
        model=result_model,
        out_dir=out,
        history=history,
        evals=evals,
        final=final,
        tokens_per_s=tok_s,
        steps_done=start + steps_this_call,
        interrupted=interrupted,
        signal=signum if interrupted else None,
    )


def save_text_tokenizer(tok: TextTokenizer, directory: Path) -> None:
    """Store the text tokenizer beside the weights so ``load_tokenizer(directory)`` gets it back."""
    from tokenizers import Tokenizer

    if isinstance(tok.hf, Tokenizer):
        atomic_write(directory / "tokenizer.json", lambda p: tok.hf.save(str(p)))
        special = {"eos_token": tok.hf.id_to_token(tok.eos_id), "pad_token": tok.hf.id_to_token(tok.pad_id)}
        write_json(directory / "tokenizer_config.json", special)
    else:
        tok.hf.save_pretrained(str(directory))


def describe(model: EngramLM) -> dict:
    c = count_params(model.cfg)
    return {"family": model.cfg.family, **c.as_dict()}
