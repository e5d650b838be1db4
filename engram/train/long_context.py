"""Long-context evaluation, RULER-style: synthetic retrieval tasks hidden in a real-corpus haystack, and tail loss.

The paper's §4.4 reads long-context ability off RULER (Hsieh et al., 2024, arXiv 2404.06654) and LongPPL. This
module rebuilds the RULER tasks the paper's table reports, at lengths a small model has, from the corpus a model
was trained on (the haystack is real text, never downloaded), and scores them by exact match.

Tasks (:data:`TASKS`; RULER's default settings, the answer order always defined so exact match is well posed):

==================  ===================================================================================
``niah_single``     one needle ``The magic number for KEY is 1234567``; answer the number
``niah_multikey``   4 needles with distinct keys; asked for one of them
``niah_multivalue`` 4 needles with the same key; answer all 4 numbers in order of appearance
``niah_multiquery`` 4 needles with distinct keys; asked for all 4, answered in the order asked
``vt``              variable tracking: ``VAR ABCDE = 12345`` then 4 hops ``VAR FGHIJ = ABCDE``; answer the 5
                    names in order of assignment
``fwe``             frequent-words extraction: corpus words repeated with Zipf counts (alpha = 2); answer the 3
                    most frequent, most frequent first (no haystack: the word list is the context)
==================  ===================================================================================

Keys are corpus words, and so are FWE's words (:func:`word_pool`). Every prompt ends in a question and RULER's
answer prefix (``Answer: The magic number for KEY is``, see :func:`_question`); the answer follows after one space,
so a training document is ``prompt + " " + answer`` (:attr:`Sample.document`; the token files append EOS), and at
evaluation the model must write the answer and stop.

Length. A sample of length ``L`` fills at most ``L`` tokens of the model's own tokenizer: its prompt plus a
generation budget (the answer's own tokens, one for EOS and one spare: the answer and its end), as close to
``L`` as the filler allows (a binary search on haystack characters / word count: 0-3 tokens short of ``L`` for
the demo's tokenizer at 256-4096 tokens).

Determinism. Sample ``(task, length, index)`` of ``seed`` depends only on those, the corpus and the tokenizer:
its ``random.Random`` is seeded from a string (SHA-512, not Python's salted ``hash``). Evaluation samples
(``purpose="eval"``) take the haystack from the validation split and the seed namespace ``eval``; training
documents (:func:`training_documents`, ``purpose="train"``) the training split and namespace ``train``, so no
training document is an evaluation prompt for any seed. Needle depths of consecutive indices follow a golden-ratio
sequence, so any ``n`` samples of a cell spread over all depths.

Scoring (:func:`score`). The answer span is the generated text up to EOS, cut at the first newline, stripped,
with whitespace around commas normalised (:func:`answer_span`); it scores 1 when it equals the answer exactly,
else 0. :func:`item_recall` (share of the answer's items found in the span, RULER's lenient metric) is reported
beside it.

Tail loss (:func:`tail_loss`). LongPPL (Fang et al., 2024, arXiv 2410.23771) is perplexity on *key tokens*: those
whose log-probability gains most from the long context (long-short difference above a threshold, judged by an
evaluator model). Ours is the simplified positional version: the mean loss on the final ``tail_fraction`` (25%)
of the first ``L`` tokens of held-out documents of at least ``L + 1`` tokens, so every scored token sees at least
75% of ``L`` as context; ``loss_short`` is the loss on the same tokens when the window starts ``2 * tail_fraction``
of ``L`` before the end, and ``gain = loss_short - loss`` is the mean long-short difference over the tail (LongPPL's
selection statistic, averaged instead of thresholded).

Where it lives: in :mod:`engram.train`, beside :mod:`.evaluate` (the other evaluation of a trained model). It needs
the layers below (cached generation from :mod:`engram.model`, the corpus and tokenizer of :mod:`.data`) and is
needed from above: by pre-training on a task mixture, by the comparison in :mod:`engram.experiments`, by the
``transformers`` runner in :mod:`engram.hf.long_context`, the figure in :mod:`engram.reports.long_context_plot`
and ``engram eval --long-context``. A separate top-level package would sit at the same height and add nothing.

API (stable; the comparison in :mod:`engram.experiments` builds on it)::

    TASKS, default_lengths(max_seq_len)
    TaskGenerator(tokenizer, corpus, purpose="eval").samples(task, length, n, seed=0) -> list[Sample]
        .sample(task, length, index, seed=0) -> Sample, .try_sample(...) -> Sample | None (too short a length)
    training_documents(tokenizer, corpus, lengths, n, tasks=TASKS, seed=0) -> Iterator[str]
    answer_span(text), score(prediction, answer) -> 0.0 | 1.0, item_recall(prediction, answer)
    LongContextLM: max_seq_len, greedy(prompts, max_new_tokens), token_losses(ids)  (EngramRunner for EngramLM)
    evaluate_long_context(lm, tokenizer, corpus, tasks=, lengths=, samples=, seed=, ...) -> dict (JSON-ready)
    tail_loss(lm, documents, length, n_docs=, tail_fraction=) -> dict     (documents: token-id lists)
    format_table(result) -> str
"""

from __future__ import annotations

import logging
import math
import random
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
from tqdm.auto import tqdm

from ..errors import ConfigError, DataError
from ..model.generate import SamplingConfig, generate
from ..model.model import EngramLM
from .data import Corpus, TextTokenizer

logger = logging.getLogger(__name__)

TASKS = ("niah_single", "niah_multikey", "niah_multivalue", "niah_multiquery", "vt", "fwe")
N_NEEDLES = 4  # RULER's num_needle_k / num_needle_v / num_needle_q
VT_HOPS = 4  # RULER's num_hops (one chain)
FWE_ALPHA = 2.0  # RULER's Zipf exponent
FWE_TOP = 3
FWE_RANKS = 40  # distinct words in an FWE list (fewer when the corpus offers fewer)
FWE_MIN_WORDS = 16  # the shortest list whose Zipf counts give three strictly falling top counts
GOLDEN = (math.sqrt(5) - 1) / 2
_WORD = re.compile(r"\b[a-z]{4,10}\b")
_POOL_CHARS = 2_000_000  # the word pool is read from at most this much training text

NIAH_HEADER = "Remember the magic numbers in this text.\n"
VT_HEADER = "Track the variables in this text.\n"
FWE_HEADER = "Count the words in this list.\n"


def needle(key: str, value: int) -> str:
    return f"The magic number for {key} is {value}"


def _question(task: str, keys: Sequence[str], value: int | None = None) -> str:
    """The question and RULER's answer prefix: the prompt ends by restating what the answer completes (for the
    needle tasks the needle's own words), so copying after a repeated phrase, the first retrieval skill a small
    transformer learns, is enough to begin the answer."""
    if task in ("niah_single", "niah_multikey"):
        q, prefix = f"What is the magic number for {keys[0]}?", f"The magic number for {keys[0]} is"
    elif task == "niah_multivalue":
        q, prefix = f"What are all the magic numbers for {keys[0]}?", f"The magic numbers for {keys[0]} are"
    elif task == "niah_multiquery":
        listed = ", ".join(keys)
        q, prefix = f"What are the magic numbers for {listed}?", f"The magic numbers for {listed} are"
    elif task == "vt":
        q, prefix = f"Which variables equal {value}?", f"The variables that equal {value} are"
    else:
        q, prefix = f"Which {FWE_TOP} words are most frequent?", f"The {FWE_TOP} most frequent words are"
    return f"\nQuestion: {q}\nAnswer: {prefix}"


def default_lengths(max_seq_len: int) -> list[int]:
    """256, 512, ... up to ``max_seq_len`` (and ``max_seq_len`` itself when it is not a power of two)."""
    lengths = [1 << k for k in range(8, 31) if 1 << k <= max_seq_len]
    if not lengths or lengths[-1] != max_seq_len:
        lengths.append(max_seq_len)
    return lengths


# ---------------------------------------------------------------------------------------------------- samples
@dataclass(frozen=True)
class Sample:
    """One task instance: the prompt (ends in the answer prefix), its answer and where the needles sit (0 = start of
    the haystack, 1 = end; FWE has none)."""

    task: str
    length: int
    index: int
    prompt: str
    answer: str
    prompt_tokens: int
    max_new_tokens: int
    depths: tuple[float, ...]

    @property
    def document(self) -> str:
        """The sample as a pre-training document: prompt, one space, answer (the token files add EOS)."""
        return f"{self.prompt} {self.answer}"


def word_pool(docs: Sequence[str]) -> list[str]:
    """Distinct lowercase words of 4-10 letters in ``docs`` (at most the first 2 MB), sorted: keys and FWE words."""
    words: set[str] = set()
    used = 0
    for d in docs:
        words.update(_WORD.findall(d))
        used += len(d)
        if used >= _POOL_CHARS:
            break
    return sorted(words)


def _insert_lines(haystack: str, depths: Sequence[float], lines: Sequence[str]) -> tuple[str, tuple[float, ...]]:
    """``lines[i]`` inserted as its own line at the line boundary at or after ``depths[i]`` of ``haystack``
    (depths ascending); returns the text and the actual depths (character offset / haystack length)."""
    parts, actual, prev = [], [], 0
    n = len(haystack)
    for d, line in zip(depths, lines):
        p = max(prev, min(n, int(d * n)))
        if 0 < p < n and haystack[p - 1] != "\n":
            nl = haystack.find("\n", p)
            p = n if nl < 0 else nl + 1
        parts.append(haystack[prev:p])
        if p == n and n and haystack[-1] != "\n":  # after a cut-off last line
            parts.append("\n")
        parts.append(line + "\n")
        actual.append(p / n if n else 0.0)
        prev = p
    parts.append(haystack[prev:])
    return "".join(parts), tuple(actual)


class TaskGenerator:
    """Samples of every task from one corpus and tokenizer.

    ``purpose="eval"`` draws the haystack from the validation split, ``"train"`` from the training split; the two
    also seed their random streams from different namespaces.
    """

    def __init__(self, tokenizer: TextTokenizer, corpus: Corpus, purpose: str = "eval"):
        if purpose not in ("eval", "train"):
            raise ValueError(f"purpose must be 'eval' or 'train', got {purpose!r}")
        self.tokenizer = tokenizer
        self.purpose = purpose
        self.docs = [d for d in (corpus.val if purpose == "eval" else corpus.train) if d.strip()]
        if not self.docs:
            split = "validation" if purpose == "eval" else "training"
            raise DataError(f"corpus {corpus.name!r} has no {split} documents to build a haystack from")
        self.pool = word_pool(corpus.train or corpus.val)
        if len(self.pool) < 2 * N_NEEDLES + 1:
            raise DataError(
                f"corpus {corpus.name!r} has only {len(self.pool)} distinct words of 4-10 letters; the tasks draw "
                f"their keys and FWE words from them: use a larger corpus"
            )

    def n_tokens(self, text: str) -> int:
        return len(self.tokenizer.encode([text])[0])

    def rng(self, task: str, length: int, index: int, seed: int) -> random.Random:
        return random.Random(f"engram-long-context|{self.purpose}|{task}|{length}|{seed}|{index}")

    def haystack(self, rng: random.Random) -> Callable[[int], str]:
        """``n -> the first n characters`` of the split's documents, each followed by a newline, starting at a
        random document and wrapping around (so any length is available); documents are joined only as needed."""
        start = rng.randrange(len(self.docs))
        pieces: list[str] = []
        size = 0

        def prefix(n: int) -> str:
            nonlocal size
            while size < n:
                pieces.append(self.docs[(start + len(pieces)) % len(self.docs)] + "\n")
                size += len(pieces[-1])
            return "".join(pieces)[:n]

        return prefix

    def _fit(self, build: Callable[[int], tuple[str, tuple[float, ...]]], lo: int, budget: int):
        """The prompt of the largest filler size ``n >= lo`` that has at most ``budget`` tokens, and its depths;
        None when even ``lo`` is too long."""
        if self.n_tokens(build(lo)[0]) > budget:
            return None
        hi = max(2 * lo, 16)
        while self.n_tokens(build(hi)[0]) <= budget:
            lo, hi = hi, 2 * hi
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if self.n_tokens(build(mid)[0]) <= budget:
                lo = mid
            else:
                hi = mid
        return build(lo)

    def sample(self, task: str, length: int, index: int, seed: int = 0) -> Sample:
        """Sample ``index`` of ``task`` at ``length`` tokens for ``seed`` (the same on every run and machine)."""
        s = self.try_sample(task, length, index, seed)
        if s is None:
            raise ConfigError(
                f"{task} at length {length}: its prompt and answer need more than {length} tokens of this "
                f"tokenizer even without a haystack; use a longer length"
            )
        return s

    def try_sample(self, task: str, length: int, index: int, seed: int = 0) -> Sample | None:
        """:meth:`sample`, or None when ``length`` is too short for the task's template."""
        if task not in TASKS:
            raise ConfigError(f"unknown long-context task {task!r}; tasks: {', '.join(TASKS)}")
        rng = self.rng(task, length, index, seed)
        if task == "fwe":
            build, lo, answer = self._fwe(rng)
        else:
            first = (rng.random() + index * GOLDEN) % 1.0  # golden-ratio walk: any n samples cover all depths
            header, lines, question, answer, in_order = self._needles(task, rng)
            depths = [first] + [rng.random() for _ in lines[1:]]
            if in_order:  # multi-value and VT answer in order of appearance: the lines keep their order
                placed = list(zip(sorted(depths), lines))
            else:  # the asked needle (line 0) at the walk's depth, the others anywhere
                placed = sorted(zip(depths, lines))
            lo = 0
            hay = self.haystack(rng)

            def build(n: int) -> tuple[str, tuple[float, ...]]:
                body, actual = _insert_lines(hay(n), [d for d, _ in placed], [line for _, line in placed])
                return header + body.rstrip("\n") + question, actual

        budget = self.n_tokens(" " + answer) + 2  # the answer, EOS (or a newline) and one spare
        fitted = self._fit(build, lo, length - budget)
        if fitted is None:
            return None
        prompt, depths_out = fitted
        return Sample(task, length, index, prompt, answer, self.n_tokens(prompt), budget, depths_out)

    def _needles(self, task: str, rng: random.Random) -> tuple[str, list[str], str, str, bool]:
        """Header, needle lines, question, answer of a needle task, and whether the lines must appear in order
        (else line 0 is the asked needle and the others are distractors)."""
        if task == "vt":
            value = rng.randrange(10_000, 100_000)
            names: list[str] = []
            while len(names) < VT_HOPS + 1:
                name = "".join(rng.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZ") for _ in range(5))
                if name not in names:
                    names.append(name)
            lines = [f"VAR {names[0]} = {value}"] + [f"VAR {b} = {a}" for a, b in zip(names, names[1:])]
            return VT_HEADER, lines, _question("vt", [], value), ", ".join(names), True
        n = 1 if task == "niah_single" else N_NEEDLES
        keys = rng.sample(self.pool, 1 if task == "niah_multivalue" else n)
        values = rng.sample(range(1_000_000, 10_000_000), n)
        if task == "niah_multivalue":
            lines = [needle(keys[0], v) for v in values]
            return NIAH_HEADER, lines, _question(task, keys), ", ".join(map(str, values)), True
        lines = [needle(k, v) for k, v in zip(keys, values)]
        if task == "niah_multiquery":
            asked = rng.sample(range(n), n)
            answer = ", ".join(str(values[i]) for i in asked)
            return NIAH_HEADER, lines, _question(task, [keys[i] for i in asked]), answer, False
        return NIAH_HEADER, lines, _question(task, keys[:1]), str(values[0]), False

    def _fwe(self, rng: random.Random):
        ranks = min(FWE_RANKS, len(self.pool))
        words = rng.sample(self.pool, ranks)
        shuffle_seed = rng.random()

        def counts(n: int) -> list[int]:
            """Zipf counts of ``n`` words (largest remainders), the top ones strictly falling, the rest below."""
            share = [(r + 1) ** -FWE_ALPHA for r in range(ranks)]
            exact = [n * p / sum(share) for p in share]
            c = [int(x) for x in exact]
            for r in sorted(range(ranks), key=lambda r: c[r] - exact[r])[: n - sum(c)]:
                c[r] += 1
            for r in range(1, ranks):
                c[r] = min(c[r], c[r - 1] - 1 if r < FWE_TOP else c[FWE_TOP - 1] - 1)
            return [max(0, x) for x in c]

        def build(n: int) -> tuple[str, tuple[float, ...]]:
            seq = [w for w, k in zip(words, counts(n)) for _ in range(k)]
            random.Random(f"{shuffle_seed}|{n}").shuffle(seq)
            return FWE_HEADER + " ".join(seq) + _question("fwe", []), ()

        return build, FWE_MIN_WORDS, ", ".join(words[:FWE_TOP])

    def samples(self, task: str, length: int, n: int, seed: int = 0) -> list[Sample]:
        return [self.sample(task, length, i, seed) for i in range(n)]


def training_documents(
    tokenizer: TextTokenizer,
    corpus: Corpus,
    lengths: Sequence[int],
    n: int,
    *,
    tasks: Sequence[str] = TASKS,
    seed: int = 0,
) -> Iterator[str]:
    """``n`` pre-training documents (prompt + answer), cycling through ``tasks`` x ``lengths``; the haystack comes
    from the training split and the samples from the ``train`` seed namespace, so none is an evaluation prompt."""
    gen = TaskGenerator(tokenizer, corpus, purpose="train")
    cells = [(t, L) for L in lengths for t in tasks]
    for i in range(n):
        task, length = cells[i % len(cells)]
        yield gen.sample(task, length, i // len(cells), seed).document


# ---------------------------------------------------------------------------------------------------- scoring
def answer_span(text: str) -> str:
    """The answer in generated ``text``: up to the first newline, stripped, ``a ,b`` written ``a, b``."""
    line = text.split("\n", 1)[0]
    return ", ".join(" ".join(item.split()) for item in line.split(",")).strip()


def score(prediction: str, answer: str) -> float:
    """1.0 when the answer span of ``prediction`` equals ``answer`` exactly, else 0.0."""
    return 1.0 if answer_span(prediction) == answer_span(answer) else 0.0


def item_recall(prediction: str, answer: str) -> float:
    """Share of the answer's comma-separated items that appear among the prediction's items."""
    want = answer_span(answer).split(", ")
    got = set(answer_span(prediction).split(", "))
    return sum(w in got for w in want) / len(want)


# ---------------------------------------------------------------------------------------------------- models
class LongContextLM(Protocol):
    """What the evaluation needs of a model (an :class:`EngramRunner`, or a wrapped ``transformers`` model)."""

    @property
    def max_seq_len(self) -> int: ...

    def greedy(self, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
        """Greedy continuations of each prompt, up to and including EOS."""
        ...

    def token_losses(self, ids: torch.Tensor) -> torch.Tensor:
        """Next-token losses [B, T - 1] (nats) of token ids [B, T]."""
        ...


class EngramRunner:
    """:class:`LongContextLM` for an :class:`EngramLM`: cached greedy decoding with ``engram.model.generate``."""

    def __init__(self, model: EngramLM, tokenizer: TextTokenizer):
        self.model = model
        self.tokenizer = tokenizer

    @property
    def max_seq_len(self) -> int:
        return self.model.cfg.max_seq_len  # read at call time: a context extension changes it

    def greedy(self, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
        cfg = SamplingConfig(max_new_tokens=max_new_tokens, temperature=0.0, eos_id=self.tokenizer.eos_id)
        return generate(self.model, prompts, cfg, pad_id=self.tokenizer.pad_id)

    @torch.no_grad()
    def token_losses(self, ids: torch.Tensor) -> torch.Tensor:
        was_training = self.model.training
        self.model.eval()
        ids = ids.to(next(self.model.parameters()).device)
        logits = self.model(ids[:, :-1]).logits
        self.model.train(was_training)
        return torch.nn.functional.cross_entropy(logits.float().transpose(1, 2), ids[:, 1:], reduction="none").cpu()


# ---------------------------------------------------------------------------------------------------- evaluation
def check_lengths(lengths: Sequence[int], max_seq_len: int) -> None:
    if not lengths:
        raise ConfigError("no lengths given; pass e.g. --lengths 256,512")
    too_long = [L for L in lengths if L > max_seq_len]
    if too_long:
        raise ConfigError(
            f"length {max(too_long)} exceeds the model's max_seq_len {max_seq_len}; pass lengths up to "
            f"{max_seq_len} or extend the model's context first (engram extend)"
        )
    bad = [L for L in lengths if L < 2]
    if bad:
        raise ConfigError(f"lengths must be at least 2 tokens, got {bad}")


def _greedy_answers(lm: LongContextLM, tokenizer: TextTokenizer, batch: Sequence[Sample]) -> list[list[int]]:
    """Each sample's greedy continuation, cut to its own budget: one batched call when the longest prompt plus the
    largest budget fits the context, else one call per sample (each fits by construction)."""
    prompts = tokenizer.encode([s.prompt for s in batch])
    budget = max(s.max_new_tokens for s in batch)
    if max(map(len, prompts)) + budget <= lm.max_seq_len:
        outs = lm.greedy(prompts, budget)
    else:
        outs = [lm.greedy([p], s.max_new_tokens)[0] for p, s in zip(prompts, batch)]
    return [out[: s.max_new_tokens] for out, s in zip(outs, batch)]


def _decode(tokenizer: TextTokenizer, ids: list[int]) -> str:
    if tokenizer.eos_id in ids:
        ids = ids[: ids.index(tokenizer.eos_id)]
    return tokenizer.decode(ids)


@torch.no_grad()
def tail_loss(
    lm: LongContextLM,
    documents: Sequence[Sequence[int]],
    length: int,
    *,
    n_docs: int = 8,
    tail_fraction: float = 0.25,
    seed: int = 0,
) -> dict:
    """Mean loss on the last ``tail_fraction`` of the first ``length`` predicted tokens of up to ``n_docs`` of the
    token-id ``documents`` (held-out ones: ``tokenizer.encode(corpus.val)``) that have at least ``length + 1``
    tokens (chosen by ``seed``), with the same tokens' loss under a short context (see the module docstring).
    ``loss`` is None when no document is that long."""
    if not 0 < tail_fraction <= 0.5:
        raise ConfigError(f"tail_fraction must be in (0, 0.5], got {tail_fraction}")
    long_docs = [list(ids) for ids in documents if len(ids) >= length + 1]
    random.Random(f"engram-tail-loss|{length}|{seed}").shuffle(long_docs)
    chosen = long_docs[:n_docs]
    tail = max(1, int(round(length * tail_fraction)))
    short = min(length, 2 * tail)
    full_sum = short_sum = 0.0
    for ids in chosen:
        window = torch.tensor([ids[: length + 1]], dtype=torch.long)
        full_sum += lm.token_losses(window)[0, -tail:].double().sum().item()
        short_sum += lm.token_losses(window[:, -(short + 1) :])[0, -tail:].double().sum().item()
    n = tail * len(chosen)
    loss = full_sum / n if n else None
    loss_short = short_sum / n if n else None
    return {
        "loss": loss,
        "loss_short": loss_short,
        "gain": None if loss is None else loss_short - loss,
        "docs": len(chosen),
        "tokens": n,
        "tail_tokens": tail,
        "short_context": short - tail,
    }


def evaluate_long_context(
    lm: LongContextLM,
    tokenizer: TextTokenizer,
    corpus: Corpus,
    *,
    tasks: Sequence[str] = TASKS,
    lengths: Sequence[int] | None = None,
    samples: int = 20,
    seed: int = 0,
    batch_size: int = 4,
    tail_fraction: float = 0.25,
    tail_docs: int = 8,
    progress: bool = True,
) -> dict:
    """Accuracy per task and length (greedy decoding, exact match) and tail loss per length.

    ``lengths`` default to :func:`default_lengths` of ``lm.max_seq_len``, read now (a length above it is a
    :class:`ConfigError`). Returns a JSON-ready dict::

        {"settings": {...}, "accuracy": {task: {str(length): float}}, "item_recall": {task: {str(length): ...}},
         "tail_loss": {str(length): tail_loss(...)}, "skipped": [{task, length}, ...],
         "samples": [{task, length, index, prompt_tokens, depths, answer, prediction, correct, item_recall}, ...]}

    A cell whose task does not fit its length (a short context and a small-vocabulary tokenizer) is None in
    ``accuracy`` / ``item_recall``, listed in ``skipped`` and logged as a warning.
    """
    unknown = [t for t in tasks if t not in TASKS]
    if unknown or not tasks:
        raise ConfigError(f"unknown long-context task(s) {unknown or tasks}; tasks: {', '.join(TASKS)}")
    if samples <= 0 or batch_size <= 0:
        raise ConfigError(f"samples and batch_size must be positive, got {samples}, {batch_size}")
    max_seq_len = lm.max_seq_len
    lengths = list(lengths) if lengths is not None else default_lengths(max_seq_len)
    check_lengths(lengths, max_seq_len)
    gen = TaskGenerator(tokenizer, corpus, purpose="eval")
    accuracy: dict[str, dict[str, float | None]] = {t: {} for t in tasks}
    recall: dict[str, dict[str, float | None]] = {t: {} for t in tasks}
    records: list[dict] = []
    skipped: list[dict] = []
    bar = tqdm(total=len(tasks) * len(lengths) * samples, desc="long-context", unit="sample", disable=not progress)
    for task in tasks:
        for length in lengths:
            cell = [gen.try_sample(task, length, i, seed) for i in range(samples)]
            if any(s is None for s in cell):
                logger.warning("%s does not fit in %d tokens of this tokenizer; its cell is left empty", task, length)
                skipped.append({"task": task, "length": length})
                accuracy[task][str(length)] = recall[task][str(length)] = None
                bar.update(samples)
                continue
            cell_records = []
            for start in range(0, samples, batch_size):
                batch = cell[start : start + batch_size]
                for s, out in zip(batch, _greedy_answers(lm, tokenizer, batch)):
                    prediction = _decode(tokenizer, out)
                    cell_records.append(
                        {
                            "task": task,
                            "length": length,
                            "index": s.index,
                            "prompt_tokens": s.prompt_tokens,
                            "depths": [round(d, 4) for d in s.depths],
                            "answer": s.answer,
                            "prediction": answer_span(prediction),
                            "correct": score(prediction, s.answer) == 1.0,
                            "item_recall": item_recall(prediction, s.answer),
                        }
                    )
                bar.update(len(batch))
            accuracy[task][str(length)] = sum(r["correct"] for r in cell_records) / samples
            recall[task][str(length)] = sum(r["item_recall"] for r in cell_records) / samples
            records.extend(cell_records)
    bar.close()
    held_out = tokenizer.encode(corpus.val)
    tails = {
        str(L): tail_loss(lm, held_out, L, n_docs=tail_docs, tail_fraction=tail_fraction, seed=seed) for L in lengths
    }
    return {
        "settings": {
            "tasks": list(tasks),
            "lengths": lengths,
            "samples": samples,
            "seed": seed,
            "max_seq_len": max_seq_len,
            "corpus": corpus.name,
            "tail_fraction": tail_fraction,
            "tail_docs": tail_docs,
        },
        "accuracy": accuracy,
        "item_recall": recall,
        "tail_loss": tails,
        "skipped": skipped,
        "samples": records,
    }


def format_table(result: dict) -> str:
    """Accuracy (%) per task (rows) and length (columns), then the tail loss row."""
    lengths = [str(L) for L in result["settings"]["lengths"]]
    width = max(8, *(len(L) + 1 for L in lengths))
    name_w = max(len("tail loss (nats)"), *(len(t) for t in result["accuracy"]))
    lines = [f"{'task':<{name_w}}" + "".join(f"{L:>{width}}" for L in lengths)]
    for task, row in result["accuracy"].items():
        lines.append(
            f"{task:<{name_w}}"
            + "".join(f"{'-':>{width}}" if row[L] is None else f"{100 * row[L]:>{width}.1f}" for L in lengths)
        )
    tail = result["tail_loss"]
    cells = "".join(f"{'-':>{width}}" if tail[L]["loss"] is None else f"{tail[L]['loss']:>{width}.3f}" for L in lengths)
    lines.append(f"{'tail loss (nats)':<{name_w}}" + cells)
    return "\n".join(lines)
