"""``engram train`` under ``torchrun``: the trainer's loop with the model parallelised from outside.

    torchrun --nproc_per_node 8 $(which engram) train --config run.yaml
    torchrun --nnodes 4 --nproc_per_node 8 --rdzv_backend c10d --rdzv_endpoint HOST:29500 $(which engram) train ...

What changes against :func:`engram.train.trainer.train` (everything else is the same code: data, model,
optimizers, schedule, evaluation, metrics):

* ``train.batch_size`` is the *global* batch. Every rank draws the same start offsets for all of it and keeps
  its own ``batch_size / world_size`` rows (:func:`~engram.train.data.random_batch` with ``rank``), so the
  data a step sees does not depend on the number of ranks, and a run resumed on another number of ranks
  continues on the same batches.
* The Engram tables are built sharded (:func:`sharded_table_factory`, each rank initialises only its rows) and
  the backbone is data-parallel (``train.data_parallel``: FSDP2 or DDP); see :mod:`.parallelize`.
* Gradient clipping uses the global norm, MoE expert loads are summed over ranks before the bias update, the
  logged loss is the global-batch mean, and an interrupt on any rank stops every rank at the same step.
* Checkpoints are :class:`ShardedCheckpointManager` directories (resumable on any number of ranks).
* Evaluation runs the same validation batches on every rank (the sharded tables need every rank in each
  lookup), so every rank gets the numbers a single process would.
* At the end rank 0 gathers the model and writes the usual ``model/`` folder (``engram eval`` / ``generate``).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from datetime import timedelta
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from ..errors import DivergenceError
from ..model.io import save_model
from ..train.checkpoint import capture_rng_state, install_signal_handlers, restore_rng_state
from ..train.data import TextTokenizer, TokenizedCorpus, random_batch
from ..train.evaluate import evaluate
from ..train.optim import LRSchedule, build_optimizers
from ..train.trainer import (
    RunConfig,
    TrainResult,
    _MetricsLog,
    build_model,
    prepare_data,
    save_text_tokenizer,
)
from .checkpoint import ShardedCheckpointManager, gather_full_state_dict
from .parallelize import apply_data_parallel, clip_grad_norm_, global_mean, sync_expert_counts
from .sharded_table import sharded_table_factory


def launched_distributed() -> bool:
    """True when a launcher (``torchrun``) started this process as one rank of a job."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def is_main_process() -> bool:
    """True outside a distributed job and on its rank 0: the process that prints and writes shared files."""
    return os.environ.get("RANK", "0") == "0"


def init_distributed(device_spec: str = "auto") -> torch.device:
    """Join the job's process group (from torchrun's environment) unless already in one; returns this rank's
    device: ``cuda:LOCAL_RANK`` with ``nccl`` where CUDA is available (or asked for), else the CPU with ``gloo``."""
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device_spec == "auto":
        device = torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    else:
        device = torch.device(device_spec)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        if not launched_distributed():
            raise RuntimeError("no process group: launch with torchrun (it sets RANK, WORLD_SIZE, MASTER_ADDR, ...) "
                               "or call torch.distributed.init_process_group first")
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, timeout=timedelta(minutes=30),
                                device_id=device if device.type == "cuda" else None)
    return device


def _rank0_first(fn: Callable):
    """Run ``fn`` on rank 0, then on the others (a cache rank 0 fills is then read by the rest)."""
    if dist.get_rank() != 0:
        dist.barrier()
    result = fn()
    if dist.get_rank() == 0:
        dist.barrier()
    return result


def train_distributed(run: RunConfig, *, data: tuple[TextTokenizer, TokenizedCorpus] | None = None,
                      stop_after: int | None = None, desc: str | None = None,
                      on_eval: Callable[[dict], None] | None = None) -> TrainResult:
    """One rank's part of a data-parallel run with row-sharded Engram tables (module docstring).

    Arguments and result as :func:`engram.train.trainer.train`. ``result.model`` is, on rank 0 after a finished
    run, the gathered single-process model; otherwise this rank's sharded model.
    """
    tcfg = run.train
    owns_group = not dist.is_initialized()
    device = init_distributed(tcfg.device)
    rank, world = dist.get_rank(), dist.get_world_size()
    if tcfg.batch_size % world:
        raise ValueError(f"train.batch_size ({tcfg.batch_size}) is the global batch and must divide evenly over "
                         f"{world} ranks")
    if tcfg.table_tier != "device":
        raise ValueError(f"train.table_tier={tcfg.table_tier!r}: a distributed run shards its tables over the ranks "
                         f"(table_tier=device); offloaded tables are for single-process runs")
    local_batch = tcfg.batch_size // world
    out = Path(tcfg.out_dir)
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(tcfg.seed)
    tok, tokens = data or _rank0_first(lambda: prepare_data(dataclasses.replace(tcfg, progress=tcfg.progress
                                                                                 and rank == 0)))
    table_group = dist.new_group(backend=dist.get_backend())   # table all-to-alls never queue behind FSDP/DDP
    model = build_model(run.model, tok, sharded_table_factory(table_group, seed=tcfg.seed))
    run = dataclasses.replace(run, model=model.cfg)
    model.to(device)
    train_model = apply_data_parallel(model, tcfg.data_parallel, device=device)
    amp = torch.bfloat16 if device.type == "cuda" else None
    optimizers = build_optimizers(model, run.optim)
    schedule = LRSchedule(optimizers, run.optim, tcfg.steps)
    gen = torch.Generator().manual_seed(tcfg.seed)
    ckpt = ShardedCheckpointManager(out / "checkpoints", keep_last=tcfg.keep_last)
    start = 0
    history: list[dict] = []
    evals: list[dict] = []
    config_dict = run.to_dict()
    if tcfg.resume and ckpt.latest_step() is not None:
        if (ckpt.meta().get("config") or {}).get("model") != config_dict["model"]:
            raise ValueError(f"{out} holds checkpoints of a different model config; use another train.out_dir or "
                             f"train.resume=false to start over")
        state = ckpt.load(model, optimizers)
        schedule.load_state_dict(state["schedule"])
        gen.set_state(state["data_generator"])
        restore_rng_state(state["rng"])
        start = int(state["step"])
        history = state["extra"].get("history", [])
        evals = state["extra"].get("evals", [])
    log = None
    if rank == 0:
        (out / "config.json").write_text(json.dumps(config_dict, indent=2))
        log = _MetricsLog(out / "metrics.jsonl", start)

    def save(step: int) -> None:
        ckpt.save(step, model, optimizers, {
            "config": config_dict, "schedule": schedule.state_dict(), "data_generator": gen.get_state(),
            "rng": capture_rng_state(), "extra": {"history": history, "evals": evals, "world_size": world},
        })

    def run_eval(step: int) -> dict:
        r = evaluate(model, tokens.val, batch_size=tcfg.batch_size, seq_len=tcfg.seq_len,
                     max_batches=tcfg.eval_batches, device=device, autocast_dtype=amp)
        rec = {"kind": "eval", "step": step, "val_loss": r["loss"], "val_ppl": r["ppl"], "val_bpb": r["bpb"],
               "expert_load": r["expert_load"], "gates": r["gates"]}
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
    t_train = 0.0
    bar = tqdm(total=tcfg.steps, initial=start, desc=desc or f"{run.model.family} x{world}",
               disable=not tcfg.progress or rank != 0,
               unit="step", dynamic_ncols=True)
    with install_signal_handlers() as stop:
        for step in range(start, tcfg.steps):
            t0 = time.perf_counter()
            x, y = random_batch(tokens.train.tokens, local_batch, tcfg.seq_len, gen, rank=rank, world_size=world)
            x, y = x.to(device), y.to(device)
            with torch.autocast(device_type=device.type, dtype=amp, enabled=amp is not None):
                loss = train_model(x, y).loss
            for o in optimizers:
                o.zero_grad(set_to_none=True)
            loss.backward()
            gnorm = clip_grad_norm_(model, run.optim.grad_clip) if run.optim.grad_clip else None
            for o in optimizers:
                o.step()
            schedule.step()
            sync_expert_counts(model)
            model.update_moe_biases()
            loss_v = global_mean(loss)
            if not math.isfinite(loss_v):
                raise DivergenceError(f"loss became {loss_v} at step {step + 1} with optim.lr={run.optim.lr:g}; "
                                      f"lower it (e.g. --set optim.lr={run.optim.lr / 3:.2g}) or check the data")
            dt = time.perf_counter() - t0
            t_train += dt
            steps_this_call += 1
            done = step + 1
            bar.update(1)
            if done % tcfg.log_every == 0 or done == tcfg.steps:
                rec = {"kind": "train", "step": done, "loss": loss_v, "lr_factor": schedule.factor,
                       "tokens_per_s": tokens_per_step / dt,
                       "grad_norm": None if gnorm is None else float(gnorm)}
                history.append(rec)
                if log is not None:
                    log.write(rec)
                bar.set_postfix(loss=f"{loss_v:.3f}", tok_s=f"{tokens_per_step * steps_this_call / t_train:,.0f}")
            if done % tcfg.eval_every == 0 or done == tcfg.steps:
                run_eval(done)
            last = done == tcfg.steps
            stopping = stop.stop_requested or (stop_after is not None and steps_this_call >= stop_after)
            flag = torch.tensor([float(stopping)], device=device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)    # a signal seen by one rank stops them all here
            stopping = bool(flag.item())
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
    if not interrupted:
        full = gather_full_state_dict(model)
        if rank == 0:
            result_model = build_model(run.model, tok)
            result_model.load_state_dict(full)
            save_model(result_model, out / "model")
            save_text_tokenizer(tok, out / "model")
        dist.barrier()
    if owns_group:
        dist.destroy_process_group()
    if steps_this_call:
        tok_s = tokens_per_step * steps_this_call / t_train
    else:
        tok_s = sum(h["tokens_per_s"] for h in history) / max(len(history), 1)
    return TrainResult(model=result_model, out_dir=out, history=history, evals=evals, final=final, tokens_per_s=tok_s,
                       steps_done=start + steps_this_call, interrupted=interrupted)
