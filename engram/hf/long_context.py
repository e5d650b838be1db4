"""``engram eval --long-context`` on ``transformers`` models: an exported engram folder, or a Hugging Face base
model with an Engram adapter (``--base [--adapter]``).

:class:`HFRunner` gives :func:`engram.train.long_context.evaluate_long_context` what it needs (greedy cached
decoding through the model's own ``generate``, next-token losses, the context length from
``config.max_position_embeddings`` read at call time); the tasks, scoring and tail loss are the same code as for an
engram model folder.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import torch

from ..train.data import TextTokenizer


class HFRunner:
    """A :class:`~engram.train.long_context.LongContextLM` over a ``transformers`` causal LM."""

    def __init__(self, model: Any, tokenizer: TextTokenizer):
        self.model = model.eval()
        self.tokenizer = tokenizer

    @property
    def max_seq_len(self) -> int:
        return int(self.model.config.max_position_embeddings)

    @torch.no_grad()
    def greedy(self, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
        width = max(len(p) for p in prompts)
        device = next(self.model.parameters()).device
        ids = torch.full((len(prompts), width), self.tokenizer.pad_id, dtype=torch.long)
        mask = torch.zeros(len(prompts), width, dtype=torch.long)
        for i, p in enumerate(prompts):  # left padding: every row's next token follows its last prompt token
            ids[i, width - len(p) :] = torch.tensor(p)
            mask[i, width - len(p) :] = 1
        out = self.model.generate(
            input_ids=ids.to(device),
            attention_mask=mask.to(device),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=self.tokenizer.eos_id,
            pad_token_id=self.tokenizer.pad_id,
        )
        eos = self.tokenizer.eos_id
        rows = out[:, width:].tolist()
        return [row[: row.index(eos) + 1] if eos in row else row for row in rows]

    @torch.no_grad()
    def token_losses(self, ids: torch.Tensor) -> torch.Tensor:
        ids = ids.to(next(self.model.parameters()).device)
        logits = self.model(input_ids=ids[:, :-1]).logits
        return torch.nn.functional.cross_entropy(logits.float().transpose(1, 2), ids[:, 1:], reduction="none").cpu()


def text_tokenizer(hf_tokenizer: Any, name: str) -> TextTokenizer:
    """A ``transformers`` tokenizer behind the :class:`TextTokenizer` interface the task generator counts with."""
    if hf_tokenizer.eos_token_id is None:
        raise ValueError(f"the tokenizer of {name} has no eos_token; the long-context answers end with it")
    pad = hf_tokenizer.pad_token_id if hf_tokenizer.pad_token_id is not None else hf_tokenizer.eos_token_id
    vocab = json.dumps(sorted(hf_tokenizer.get_vocab().items()))
    return TextTokenizer(
        hf_tokenizer,
        name=name,
        eos_id=hf_tokenizer.eos_token_id,
        pad_id=pad,
        fingerprint=hashlib.sha256(vocab.encode("utf-8")).hexdigest(),
    )


def load_runner(
    model_dir: str | None, *, base: str | None = None, adapter: str | None = None
) -> tuple[HFRunner, TextTokenizer]:
    """The runner and tokenizer of an exported folder (``model_dir``) or of ``base`` with ``adapter`` on it."""
    if base is not None:
        from .base import load_adapted

        model, tokenizer = load_adapted(base, adapter)
        name = base
    else:
        from .lmeval import load_for_eval

        model, tokenizer = load_for_eval(model_dir)
        name = str(model_dir)
    tok = text_tokenizer(tokenizer, name)
    return HFRunner(model, tok), tok
