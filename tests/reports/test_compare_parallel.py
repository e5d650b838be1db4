"""The matched comparison: two training jobs side by side give exactly what one after the other gives."""

import json

import torch

from engram import EngramConfig
from engram.model import ModelConfig
from engram.reports.compare import compare, parallel_jobs
from engram.train.trainer import TrainConfig

CODE = """def add(a, b):
    return a + b


class Point(object):
    def __init__(self, x, y):
        self.x = x
        self.y = y
"""


def tiny(tmp_path, corpus):
    base = ModelConfig(family="moe", hidden_size=32, num_layers=2, num_heads=2, n_routed_experts=6,
                       num_experts_per_tok=2, moe_intermediate_size=32, intermediate_size=64, max_seq_len=256,
                       first_k_dense=1)
    template = EngramConfig(engram_vocab_size=[100, 100], n_embed_per_ngram=8, n_head_per_ngram=2, layer_ids=[1])
    tcfg = TrainConfig(steps=6, batch_size=4, seq_len=32, eval_every=3, eval_batches=2, log_every=2, ckpt_every=3,
                       data=str(corpus), max_bytes=None, vocab_size=300, cache_dir=str(tmp_path / "cache"),
                       progress=False, device="cpu")
    return base, template, tcfg


def test_parallel_jobs_reproduce_sequential_runs_at_the_same_thread_count(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(30):
        (corpus / f"m{i:02d}.py").write_text(CODE.replace("Point", f"Point{i}") * 3)
    base, template, tcfg = tiny(tmp_path, corpus)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)   # the sequential runs use 1 thread, as each of the two parallel jobs of 2 // 2
    try:
        seq = compare(base, 0.5, tcfg, engram=template, out_dir=tmp_path / "seq", jobs=1)
        torch.set_num_threads(2)
        assert parallel_jobs(tcfg) == 2
        par = compare(base, 0.5, tcfg, engram=template, out_dir=tmp_path / "par", jobs=2)
    finally:
        torch.set_num_threads(threads)
    assert par["machine"]["training_jobs"] == 2 and par["machine"]["threads_per_job"] == 1
    assert [r["val_loss"] for r in par["rows"]] == [r["val_loss"] for r in seq["rows"]]
    assert par["samples"] == seq["samples"]   # generated from the models loaded back from the run folders
    for name in ("moe", "engram"):
        assert train_losses(tmp_path / "par", name) == train_losses(tmp_path / "seq", name)


def train_losses(root, name):
    return [json.loads(line)["loss"] for line in (root / "runs" / name / "metrics.jsonl").read_text().splitlines()
            if '"kind": "train"' in line]
