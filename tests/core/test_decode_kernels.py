"""Fused CPU decode kernels (engram.decode_kernels): the same results as the torch decode path, where they apply."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import engram
from engram import Engram, NgramHasher, decode_kernels
from engram.hashing import PendingStep
from engram.storage import OffloadedEmbedding

from .test_hashing import random_config, ref_for
from .test_module import DECODE_VARIANTS, decode_module, inputs, make, randomize_conv, randomize_norms, run_chunks

pytest.importorskip("numba")


@pytest.fixture
def kernels_on():
    before = decode_kernels._enabled
    decode_kernels.set_cpu_kernels(True)
    yield
    decode_kernels.set_cpu_kernels(before)


def float32_module(**kw):
    mod, hasher = decode_module(**kw)
    return mod.float(), hasher


@pytest.mark.parametrize("kw", [dict(m=1), dict(m=3), dict(m=2, gating=False), dict(m=1, short_conv=False)])
def test_float32_kernel_steps_equal_the_torch_steps_and_the_full_pass(kw, kernels_on):
    """In float32 the kernel (float64 accumulation) and the torch ops (float32) differ by rounding only."""
    mod, hasher = float32_module(**kw)
    raw, hidden, _ = inputs(mod, b=3, t=9)
    hidden = hidden.float()
    full = mod(hidden, input_ids=raw)
    bounds = [(0, 2), *((j, j + 1) for j in range(2, 9))]
    got, state = run_chunks(mod, hasher, raw, hidden, bounds)
    assert state["constants"].kernel is not None
    decode_kernels.set_cpu_kernels(False)
    torch_steps, torch_state = run_chunks(mod, hasher, raw, hidden, bounds)
    assert torch_state["constants"].kernel is None
    torch.testing.assert_close(got, torch_steps, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got, full, rtol=1e-5, atol=1e-6)


def run_pending(mod, hasher, raw, hidden, prefill, mask=None, contiguous=False):
    """Prefill ``prefill`` tokens with hash ids, then decode token by token through one :class:`PendingStep`, as
    EngramLM does (with ``contiguous`` each step's hidden state is a contiguous copy, else a strided slice);
    returns the outputs concatenated, the gates of the steps and whether each step took the kernel (it then
    wrote the next history)."""
    state: dict = {}
    history = hasher.initial_history(raw.shape[0])
    with torch.no_grad():
        ids, history = hasher.hash_continued(history, hasher.compress(raw[:, :prefill]))
        chunk_mask = None if mask is None else mask[:, :prefill]
        outs = [mod(hidden[:, :prefill], hash_ids=ids[mod.layer_id], mask=chunk_mask, state=state)]
        pending, gates, took = PendingStep(hasher, history), [], []
        for j in range(prefill, raw.shape[1]):
            pending.start(raw[:, j : j + 1])  # a column of raw: not contiguous
            step_mask = None if mask is None else mask[:, j : j + 1]
            h = hidden[:, j : j + 1].contiguous() if contiguous else hidden[:, j : j + 1]
            outs.append(mod(h, hash_ids=pending, mask=step_mask, state=state))
            took.append(pending.rolled)
            gates.append(mod.last_gate)
            pending.next_history()
    return torch.cat(outs, dim=1), gates, took


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("kw", DECODE_VARIANTS, ids=lambda kw: ",".join(f"{k}={v}" for k, v in kw.items()))
def test_pending_steps_through_the_kernel_equal_the_full_pass(kw, dtype, kernels_on):
    """EngramLM's decode step (hashing inside the layer's one kernel call, inputs handed over by address) gives
    the full pass's outputs and gates, for contiguous and strided hidden states; 80 steps, so the outputs come
    from more than one of FreshTensors' blocks and every one is read back after the last step."""
    mod, hasher = decode_module(**kw)
    mod = mod.to(dtype)
    raw, hidden, _ = inputs(mod, b=3, t=84)
    hidden = hidden.to(dtype)
    mod.record_gate = True
    full = mod(hidden, input_ids=raw)
    full_gate = mod.last_gate
    tol = dict(rtol=1e-10, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-6)
    for contiguous in (True, False):
        got, gates, took = run_pending(mod, hasher, raw, hidden, prefill=4, contiguous=contiguous)
        assert all(took)
        torch.testing.assert_close(got, full, **tol)
        if mod.key_projs:
            torch.testing.assert_close(torch.cat(gates, dim=1), full_gate[:, 4:], **tol)


def test_pending_steps_with_a_mask_equal_the_full_pass(kernels_on):
    mod, hasher = decode_module(m=2)
    raw, hidden, _ = inputs(mod, b=3, t=9)
    mask = torch.ones(3, 9, dtype=torch.bool)
    mask[0, :3] = False  # left padding
    mask[2, 5] = False  # a padded step
    full = mod(hidden, input_ids=raw, mask=mask)
    got, _, took = run_pending(mod, hasher, raw, hidden, prefill=3, mask=mask)
    assert all(took)
    torch.testing.assert_close(got, full, rtol=1e-10, atol=1e-12)


def test_pending_step_checks_its_ids(kernels_on):
    mod, hasher = decode_module(m=1)
    with pytest.raises(ValueError, match=r"history is \[B, N-1\] = \[B, 2\]"):
        PendingStep(hasher, torch.zeros(2, 1, dtype=torch.int64))
    pending = PendingStep(hasher, hasher.initial_history(2))
    with pytest.raises(ValueError, match=r"raw ids \[B, 1\] for a history of B = 2"):
        pending.start(torch.zeros(3, 1, dtype=torch.int64))
    pending.start(torch.tensor([[3], [100]]))  # V = 100
    with torch.no_grad(), pytest.raises(ValueError, match="100"):
        mod(torch.zeros(2, 1, 1, mod.hidden_size, dtype=torch.float64), hash_ids=pending, state={})
    pending.start(torch.tensor([[3], [4]], dtype=torch.int32))  # converted
    with torch.no_grad():
        mod(torch.zeros(2, 1, 1, mod.hidden_size, dtype=torch.float64), hash_ids=pending, state={})
    assert pending.rolled
    _, want = hasher.hash_next_token(hasher.initial_history(2), torch.tensor([[3], [4]]))
    assert torch.equal(pending.next_history(), want) and pending.history is pending.next_history()


def test_a_decoding_state_of_another_batch_is_refused(kernels_on):
    """The kernels check every array against the layer before touching memory: a state carried over to a
    batch of another size raises instead of reading past the ShortConv ring."""
    mod, hasher = decode_module(m=2)
    raw, hidden, _ = inputs(mod, b=3, t=4)
    state: dict = {}
    with torch.no_grad():
        for j in range(3):  # decode steps of batch 3: the ring holds 3 sequences
            pending = PendingStep(hasher, hasher.initial_history(3), raw[:, j : j + 1])
            mod(hidden[:, j : j + 1], hash_ids=pending, state=state)
        assert pending.rolled
        pending = PendingStep(hasher, hasher.initial_history(2), raw[:2, 3:4])
        with pytest.raises(ValueError, match="for another batch"):
            mod(hidden[:2, 3:4], hash_ids=pending, state=state)


def test_a_hidden_state_off_the_cpu_is_not_read_by_address(kernels_on):
    """The kernel reads the hidden state by address: one that is not in CPU memory (here: on the meta device)
    never reaches it, and the general path's error comes instead of a crash."""
    mod, hasher = decode_module(m=1)
    raw, hidden, _ = inputs(mod, b=2, t=3)
    state: dict = {}
    with torch.no_grad():
        pending = PendingStep(hasher, hasher.initial_history(2), raw[:, :1])
        mod(hidden[:, :1].contiguous(), hash_ids=pending, state=state)
        assert pending.rolled
        pending = PendingStep(hasher, pending.next_history(), raw[:, 1:2])
        with pytest.raises(TypeError, match="meta"):
            mod(hidden[:, 1:2].contiguous().to("meta"), hash_ids=pending, state=state)
        assert not pending.rolled


def test_fresh_tensors_are_never_handed_out_twice():
    fresh = decode_kernels.FreshTensors((3, 5), torch.float32)
    got = [fresh.take() for _ in range(2 * fresh.block + 3)]
    assert all(t.shape == (3, 5) and t.dtype == torch.float32 and t.is_contiguous() for t, _ in got)
    assert all(t.data_ptr() == ptr for t, ptr in got)
    assert len({ptr for _, ptr in got}) == len(got)
    for i, (t, _) in enumerate(got):
        t.fill_(i)
    fresh.take()
    assert all(bool((t == i).all()) for i, (t, _) in enumerate(got))
    assert decode_kernels.FreshTensors((1024, 1024), torch.float32).block == 1  # 4 MiB each: one at a time


def test_kernel_reads_the_rows_an_offloaded_table_gathers(kernels_on):
    """A host table gathers its own rows; the kernel reads them in order and gives the device table's output."""
    mod, hasher = decode_module(m=2)
    host = OffloadedEmbedding.create(mod.table.head_sizes, mod.table.head_dim, tier="host", dtype=torch.float64)
    with torch.no_grad():
        host.load_state_dict(mod.table.state_dict())
    twin = Engram(mod.config, mod.layer_id, mod.hidden_size, mod.hc_mult, hasher, table=host).double()
    twin.load_state_dict(mod.state_dict())
    raw, hidden, _ = inputs(mod, b=2, t=6)
    bounds = [(0, 2), *((j, j + 1) for j in range(2, 6))]
    want, _ = run_chunks(mod, hasher, raw, hidden, bounds)
    got, state = run_chunks(twin, hasher, raw, hidden, bounds)
    assert state["constants"].kernel is not None and not state["constants"].kernel.device_table
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_kernel_refuses_hash_ids_outside_their_head_with_validation_off(kernels_on):
    """The kernel checks every id against its head before reading the table, whatever ``set_validation`` says."""
    mod, hasher = decode_module(m=1)
    raw, hidden, _ = inputs(mod, b=2, t=3)
    _, state = run_chunks(mod, hasher, raw, hidden, [(0, 2)])
    bad = torch.zeros(2, 1, mod.config.num_heads_total, dtype=torch.int64)
    bad[1, 0, 2] = mod.table.head_sizes[2]
    engram.set_validation(False)
    try:
        with torch.no_grad(), pytest.raises(ValueError, match="out of range"):
            mod(hidden[:, 2:3], hash_ids=bad, state=state)
    finally:
        engram.set_validation(True)


def test_bfloat16_modules_take_the_torch_path(kernels_on):
    """bfloat16 modules do not use the kernel (it computes in float32/float64 only)."""
    mod, hasher = make(m=2)
    gen = torch.Generator().manual_seed(1)
    randomize_norms(mod, gen)
    randomize_conv(mod, gen)
    mod = mod.to(torch.bfloat16)
    raw, hidden, _ = inputs(mod, b=2, t=4)
    _, state = run_chunks(mod, hasher, raw, hidden.to(torch.bfloat16), [(0, 2), (2, 3), (3, 4)])
    assert state["constants"].kernel is None


def test_hash_next_token_kernel_is_bit_exact_against_the_reference_random_configs(kernels_on):
    """One sampled raw token at a time through the hashing kernel gives the numpy reference's ids at every
    position and the torch path's next history, over random configs (orders 2-5, 1-3 layers, V' from 2, primes
    from 2 to near 2^31, multipliers whose products wrap)."""
    rng = np.random.default_rng(12)
    for trial in range(20):
        cfg, vprime, pad = random_config(rng)
        vocab = vprime + int(rng.integers(0, 50))
        lookup = np.concatenate([np.arange(vprime), rng.integers(0, vprime, vocab - vprime)])
        tok = engram.CompressedTokenizer.from_lookup(rng.permutation(lookup), "t")
        cfg = dataclasses.replace(cfg, pad_id=int(np.flatnonzero(tok.lookup == pad)[0]))
        hasher = NgramHasher.from_tokenizer(cfg, tok)
        raw = rng.integers(0, vocab, size=(3, 6), dtype=np.int64)
        ref = ref_for(cfg, tok.lookup[raw], vprime, hasher.compressed_pad_id)
        history = torch_history = hasher.initial_history(3)
        for j in range(raw.shape[1]):
            step = torch.from_numpy(raw[:, j : j + 1])
            out, history = hasher.hash_next_token(history, step)
            decode_kernels.set_cpu_kernels(False)
            torch_out, torch_history = hasher.hash_next_token(torch_history, step)
            decode_kernels.set_cpu_kernels(True)
            assert torch.equal(history, torch_history)
            for l in cfg.layer_ids:
                assert out[l].shape == (3, 1, cfg.num_heads_total) and torch.equal(out[l], torch_out[l])
                np.testing.assert_array_equal(out[l][:, 0].numpy(), ref[l][:, j], err_msg=f"trial {trial} layer {l}")


@pytest.mark.parametrize("bad", [-1, 100])
def test_hash_next_token_kernel_refuses_ids_outside_the_vocabulary(bad, kernels_on):
    mod, hasher = make(m=1)  # V = 100
    raw = torch.tensor([[3], [bad]])
    with pytest.raises(ValueError, match=str(bad)):
        hasher.hash_next_token(hasher.initial_history(2), raw)


def small_lm():
    from engram.model import EngramLM, ModelConfig

    cfg = ModelConfig(
        family="engram", hidden_size=32, num_layers=2, num_heads=2, n_routed_experts=4, num_experts_per_tok=2,
        moe_intermediate_size=32, intermediate_size=64, max_seq_len=48, vocab_size=100,
        engram=engram.EngramConfig(engram_vocab_size=[211, 223], n_embed_per_ngram=16, n_head_per_ngram=2,
                                   layer_ids=[1], pad_id=1),
    )  # fmt: skip
    torch.manual_seed(0)
    model = EngramLM(cfg, engram.CompressedTokenizer.identity(100)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model


def test_generate_gives_the_same_tokens_with_and_without_the_kernels(kernels_on):
    """A small Engram LM decodes the same greedy tokens through either path."""
    from engram.model import SamplingConfig, generate

    model = small_lm()
    prompts = [[5, 6, 7, 8], [9, 10, 11, 12], [1, 2, 3, 4]]
    sampling = SamplingConfig(max_new_tokens=30, temperature=0.0)
    with_kernels = generate(model, prompts, sampling)
    decode_kernels.set_cpu_kernels(False)
    assert generate(model, prompts, sampling) == with_kernels


def test_a_history_set_between_decode_steps_is_the_one_hashed(kernels_on):
    """EngramLM keeps one PendingStep per state; a history that someone else put in the state (here: the rows
    of another sequence) is picked up, as the torch path does."""
    model = small_lm()
    prompt = torch.tensor([[5, 6, 7, 8], [9, 10, 11, 12]])

    def decode(kernels: bool) -> tuple[torch.Tensor, list]:
        decode_kernels.set_cpu_kernels(kernels)
        state, logits, pendings = model.new_state(), [], []
        with torch.no_grad():
            nxt = model.forward_checked(prompt, state=state).logits[:, -1].argmax(-1)
            for step in range(8):
                if step == 4:
                    state.history = state.history.flip(0).contiguous()
                logits.append(model.forward_checked(nxt[:, None], state=state).logits[:, -1])
                nxt = logits[-1].argmax(-1)
                pendings.append((state.pending, state.pending is not None and state.pending.rolled))
        return torch.stack(logits), pendings

    got, pendings = decode(True)
    assert all(rolled for _, rolled in pendings)  # every step went through the layer's kernel
    assert pendings[0][0] is pendings[3][0] and pendings[4][0] is not pendings[3][0]
    want, torch_pendings = decode(False)
    assert torch_pendings == [(None, False)] * 8
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_the_environment_switch_turns_the_kernels_off():
    code = "from engram import decode_kernels; print(decode_kernels.cpu_kernels_enabled())"
    env = {**os.environ, "ENGRAM_CPU_KERNELS": "0"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_without_numba_decoding_takes_the_torch_path():
    """With numba not importable the kernels report off, and a model still decodes (through torch ops)."""
    code = (
        "import sys; sys.modules['numba'] = None\n"
        "import torch, engram\n"
        "from engram.model import EngramLM, SamplingConfig, generate\n"
        "from tests.conftest import tiny_model_config\n"
        "model = EngramLM(tiny_model_config(), engram.CompressedTokenizer.identity(96)).eval()\n"
        "out = generate(model, [[1, 2, 3]], SamplingConfig(max_new_tokens=4, temperature=0.0))\n"
        "print(engram.cpu_kernels_enabled(), len(out[0]))\n"
    )
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    out = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False 4"
