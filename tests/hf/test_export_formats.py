"""A model converted by ``engram quantize`` exports like any model: the transformers folder keeps the fp8 / bf16
table files and gives the quantized model's logits."""

import json

import pytest
import torch

from engram.model import load_model, save_model
from engram.model.quantize import quantize_model

from .conftest import tiny_model

pytestmark = pytest.mark.hf
transformers = pytest.importorskip("transformers")


@pytest.mark.parametrize("fmt", ["fp8_e4m3", "bfloat16"])
def test_a_quantized_model_exports_with_its_row_format(tmp_path, text_tokenizer, fmt):
    from engram.hf.export import export

    save_model(tiny_model(text_tokenizer, n_embed_per_ngram=64), tmp_path / "m")
    quantized = load_model(quantize_model(tmp_path / "m", tmp_path / "q", fmt)).eval()
    folder = export(quantized, tmp_path / "hf", text_tokenizer)
    entries = json.loads((folder / "tables.json").read_text())["tables"].values()
    assert {e["dtype"] for e in entries} == {fmt}
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
    ids = torch.randint(0, text_tokenizer.vocab_size, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, quantized(ids).logits, rtol=0, atol=1e-5)
