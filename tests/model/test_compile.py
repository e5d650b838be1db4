"""torch.compile of Engram models: one graph (no breaks) and the eager outputs and gradients, within 1e-5 (float32).

Backends: the MHA / MLA x M = 1 / 4 sweep compiles the whole model with ``backend="aot_eager"`` (Dynamo capture and
AOTAutograd's forward + backward graphs, which is where graph breaks and tracing errors come from, without
inductor's C++ code generation, which takes minutes on this CPU); one Engram + MoE block is compiled with the
default ``inductor`` backend and ``fullgraph=True`` (any graph break inside the block is an error).
Validation is off while compiling (its host reads run eagerly before the graph; see ``EngramLM.check_inputs``).
"""

from __future__ import annotations

import pytest
import torch

import engram
from engram import CompressedTokenizer
from engram.model import EngramLM
from engram.model.mhc import expand_streams

from ..conftest import tiny_model_config


@pytest.fixture(autouse=True)
def no_validation():
    engram.set_validation(False)
    torch._dynamo.reset()
    yield
    engram.set_validation(True)


def make(attention: str, hc: int) -> EngramLM:
    kw = dict(attention=attention, hc_mult=hc, hc_sinkhorn_iters=3)
    if attention == "mla":
        kw.update(kv_lora_rank=16, q_lora_rank=8, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8)
    cfg = tiny_model_config(**kw)
    torch.manual_seed(0)
    model = EngramLM(cfg, CompressedTokenizer.identity(cfg.vocab_size)).train()
    with torch.no_grad():  # non-zero ShortConv taps, so the conv path is exercised
        torch.nn.init.normal_(model.blocks[1].engram.short_conv.conv.weight, std=0.2)
    return model


def loss_and_grads(model: torch.nn.Module, params: dict, *args) -> tuple[torch.Tensor, dict]:
    for p in params.values():
        p.grad = None
    out = model(*args)
    loss = out.loss if hasattr(out, "loss") else out.square().mean()
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in params.items() if p.grad is not None}


@pytest.mark.parametrize("attention,hc", [("mha", 1), ("mha", 4), ("mla", 1), ("mla", 4)])
def test_compiled_model_is_one_graph_and_equals_eager(attention, hc):
    """The whole model, hashing included, compiles into one graph (fullgraph=True: any break is an error) and
    equals eager."""
    model = make(attention, hc)
    params = dict(model.named_parameters())
    x = torch.randint(0, 96, (2, 17), generator=torch.Generator().manual_seed(1))
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    loss_c, grads_c = loss_and_grads(compiled, params, x[:, :-1], x[:, 1:])
    loss_e, grads_e = loss_and_grads(model, params, x[:, :-1], x[:, 1:])
    torch.testing.assert_close(loss_c, loss_e, rtol=1e-5, atol=1e-5)
    assert grads_c.keys() == grads_e.keys() and len(grads_e) == len(params)
    for name in grads_e:
        torch.testing.assert_close(grads_c[name], grads_e[name], rtol=1e-5, atol=1e-5, msg=name)


def test_engram_block_compiles_with_inductor_and_equals_eager():
    model = make("mha", 1)
    block = model.blocks[1]
    assert block.engram is not None
    params = dict(block.named_parameters())
    x = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(2))
    hidden = expand_streams(model.tok_emb(x), 1).detach()
    positions = torch.arange(12).expand(2, 12)
    args = (hidden, positions, model.hash_tokens(x)[1], None, None, None, None)
    compiled = torch.compile(block, fullgraph=True)
    loss_c, grads_c = loss_and_grads(compiled, params, *args)
    loss_e, grads_e = loss_and_grads(block, params, *args)
    torch.testing.assert_close(loss_c, loss_e, rtol=1e-5, atol=1e-6)
    for name in grads_e:
        torch.testing.assert_close(grads_c[name], grads_e[name], rtol=1e-5, atol=1e-6, msg=name)


def test_compiled_model_still_refuses_bad_ids_with_validation_on():
    engram.set_validation(True)
    compiled = torch.compile(make("mha", 1), backend="aot_eager")
    with pytest.raises(ValueError, match="input_ids must lie in"):
        compiled(torch.full((1, 4), 96))


def test_train_compile_true_trains_through_torch_compile(tmp_path, monkeypatch):
    """train.compile=true hands the model to torch.compile (spied here, run with aot_eager for speed) and the
    compiled run's losses equal the eager run's."""
    from engram.train.trainer import train
    from tests.conftest import CODE
    from tests.conftest import tiny_engram_run as tiny_run

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(20):
        (corpus / f"m{i}.py").write_text(CODE.replace("add", f"add_{i}") * 3)
    compiled = []
    real_compile = torch.compile

    def spy(model, **kw):
        compiled.append(model)
        return real_compile(model, backend="aot_eager")

    monkeypatch.setattr(torch, "compile", spy)
    kw = dict(steps=4, eval_every=4, ckpt_every=4, log_every=1)
    eager = train(tiny_run(tmp_path / "eager", corpus, tmp_path / "cache", **kw))
    assert compiled == []
    comp = train(tiny_run(tmp_path / "comp", corpus, tmp_path / "cache", compile=True, **kw))
    assert len(compiled) == 1
    losses = [[h["loss"] for h in r.history if "loss" in h] for r in (eager, comp)]
    assert len(losses[0]) == 4
    torch.testing.assert_close(torch.tensor(losses[1]), torch.tensor(losses[0]), rtol=1e-5, atol=1e-5)


def test_compiled_decoding_gives_the_eager_tokens():
    """Cached greedy decoding through a compiled ``forward_checked`` (what ``benchmarks/bench_decode.py --compile``
    runs) gives the tokens of eager decoding, which goes through the fused CPU kernels."""
    from engram.model import SamplingConfig, generate

    model = make("mha", 1).eval()
    prompts = [[1, 2, 3, 4], [5, 6, 7, 8]]
    sampling = SamplingConfig(max_new_tokens=5, temperature=0.0)
    want = generate(model, prompts, sampling)
    model.forward_checked = torch.compile(model.forward_checked, backend="aot_eager", dynamic=True)
    assert generate(model, prompts, sampling) == want
