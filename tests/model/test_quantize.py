"""``engram quantize`` writes a model whose tables are the source's rows in the new row format and nothing else
changed: it loads like any model (device, host or disk tables, eval and generate), its logits are exactly those of
the source with the rounded rows, its addresses still check, and bad requests are refused in one line."""

import json

import pytest
import torch
from safetensors import safe_open

from engram import CompressedTokenizer, EngramConfig
from engram.cli import main
from engram.model import EngramLM, ModelConfig, load_model, load_offloaded, save_model
from engram.model.quantize import quantize_model
from engram.storage import OffloadedEmbedding, offload_tables
from engram.storage.formats import FP8_E4M3, row_format

from ..conftest import tiny_model_config

VOCAB = 97


def cfg(head_dim: int = 32) -> ModelConfig:
    """Two Engram layers with heads of ``head_dim`` (FP8 rows need a multiple of 32)."""
    return tiny_model_config(
        vocab_size=VOCAB,
        num_layers=3,
        max_seq_len=64,
        engram=EngramConfig(
            engram_vocab_size=[211, 223], n_embed_per_ngram=2 * head_dim, n_head_per_ngram=2, layer_ids=[1, 2]
        ),
    )


def trained_like(model: EngramLM) -> EngramLM:
    """Rows of trained magnitude (the init's 0.02 std would leave the Engram branch nearly silent)."""
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("table.weight"):
                p.normal_(0, 0.5)
    return model.eval()


def logits(model: EngramLM, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out = model(ids)
    return out.logits if hasattr(out, "logits") else out


@pytest.fixture
def saved(tmp_path):
    torch.manual_seed(0)
    model = trained_like(EngramLM(cfg(), CompressedTokenizer.identity(VOCAB)))
    save_model(model, tmp_path / "model")
    return model, tmp_path / "model"


def rounded(model: EngramLM, fmt: str) -> EngramLM:
    """The source model with each table row replaced by its decoded encoding in ``fmt``."""
    f = row_format(fmt)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("table.weight"):
                p.copy_(f.decode(f.encode(p), torch.float32))
    return model


@pytest.mark.parametrize("fmt", ["fp8", "bf16"])
def test_the_quantized_model_is_the_source_with_rounded_rows(saved, fmt, tmp_path, capsys):
    model, src = saved
    ids = torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(3))
    before = logits(model, ids)
    main(["quantize", "--model", str(src), "--format", fmt, "--out", str(tmp_path / "q")])
    assert "wrote" in capsys.readouterr().out
    q = load_model(tmp_path / "q")
    tables = [m for m in q.modules() if isinstance(m, OffloadedEmbedding)]
    assert len(tables) == 2 and all(t.store.format is row_format(fmt) and t.store.kind == "device" for t in tables)
    after = logits(q, ids)
    assert torch.allclose(after, logits(rounded(model, fmt), ids), atol=1e-5, rtol=1e-5)
    assert not torch.equal(after, before)  # the rows were rounded, so the test can tell
    assert (tmp_path / "q" / "addresses.json").read_bytes() == (src / "addresses.json").read_bytes()
    manifest = json.loads((tmp_path / "q" / "tables.json").read_text())
    assert {e["dtype"] for e in manifest["tables"].values()} == {row_format(fmt).name}
    with safe_open(str(tmp_path / "q" / "model.safetensors"), framework="pt") as f:
        assert not [k for k in f.keys() if k.endswith("table.weight")]
    with safe_open(str(tmp_path / "q" / "tables" / "layer01.safetensors"), framework="pt") as f:
        width = 32 + 1 if fmt == "fp8" else 32
        assert f.get_slice("rows").get_shape() == [manifest["tables"]["1"]["num_rows"], width]
    for tier in ("host", "disk"):  # offloaded loading keeps the format and the outputs
        kw = {"table_dir": tmp_path / f"rows-{tier}"} if tier == "disk" else {}
        moved = load_offloaded(tmp_path / "q", tier, **kw)
        assert torch.equal(logits(moved, ids), after), tier


def test_a_disk_table_model_stays_a_disk_table_model_in_fp8(tmp_path):
    torch.manual_seed(0)
    model = trained_like(EngramLM(cfg(), CompressedTokenizer.identity(VOCAB)))
    ids = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(4))
    (tmp_path / "rows").mkdir()
    offload_tables(model, "disk", path_dir=tmp_path / "rows")
    save_model(model, tmp_path / "m")
    quantize_model(tmp_path / "m", tmp_path / "q", "fp8")
    q = load_model(tmp_path / "q")
    stores = [m.store for m in q.modules() if isinstance(m, OffloadedEmbedding)]
    assert [s.kind for s in stores] == ["disk", "disk"] and all(s.format is FP8_E4M3 for s in stores)
    assert stores[0].path.stat().st_size == 4096 + stores[0].num_rows * 33
    reference = [
        FP8_E4M3.decode(FP8_E4M3.encode(m.store.read_range(0, m.num_rows)), torch.float32)
        for m in model.modules()
        if isinstance(m, OffloadedEmbedding)
    ]
    assert all(torch.equal(s.read_range(0, s.num_rows), r) for s, r in zip(stores, reference))
    assert logits(q, ids).isfinite().all()


def test_quantize_refusals_are_one_line(saved, tmp_path, capsys):
    _, src = saved

    def refused(*args: str) -> str:
        capsys.readouterr()
        with pytest.raises(SystemExit) as e:
            main(["quantize", "--model", str(src), *args])
        assert e.value.code != 0
        err = capsys.readouterr().err.strip()
        assert "Traceback" not in err and len(err.splitlines()) == 1, err
        return err

    (tmp_path / "taken").mkdir()
    assert "pass --overwrite" in refused("--format", "fp8", "--out", str(tmp_path / "taken"))
    assert "unknown row format 'fp4'" in refused("--format", "fp4", "--out", str(tmp_path / "x"))
    assert "is the model being converted" in refused("--format", "fp8", "--out", str(src))
    torch.manual_seed(0)
    save_model(EngramLM(cfg(head_dim=8), CompressedTokenizer.identity(VOCAB)), tmp_path / "narrow")
    capsys.readouterr()
    with pytest.raises(SystemExit):
        main(["quantize", "--model", str(tmp_path / "narrow"), "--format", "fp8", "--out", str(tmp_path / "y")])
    assert "multiple of 32" in capsys.readouterr().err
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folder left behind
    main(["quantize", "--model", str(src), "--format", "fp8", "--out", str(tmp_path / "taken"), "--overwrite"])
    assert (tmp_path / "taken" / "tables.json").is_file()
