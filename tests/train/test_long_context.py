"""RULER-style long-context tasks: each scorer accepts its answer and refuses near misses, samples are a function of
their seed, fill their length, spread their needles over all depths, take their haystack from the corpus split
they are meant for, and training documents never repeat an evaluation prompt; ``engram eval --long-context`` on a
tiny trained model writes every task x length cell and refuses lengths beyond the model's context."""

import json
import re

import pytest
import torch

from engram.cli import main
from engram.errors import ConfigError
from engram.train.data import load_corpus, load_tokenizer
from engram.train.long_context import (
    TASKS,
    EngramRunner,
    TaskGenerator,
    answer_span,
    default_lengths,
    evaluate_long_context,
    format_table,
    item_recall,
    needle,
    score,
    tail_loss,
    training_documents,
)

from ..conftest import tiny_engram_run

LENGTHS = (320, 512)


@pytest.fixture(scope="module")
def stdlib():
    """The default training corpus (the Python standard library), 1 MB of it (its validation split is one 11 kB
    module), and a 512-id BPE trained on it."""
    corpus = load_corpus(None, max_bytes=1_000_000)
    return corpus, load_tokenizer("bpe", corpus.train, vocab_size=512)


@pytest.fixture(scope="module")
def gen(stdlib):
    return TaskGenerator(stdlib[1], stdlib[0])


def near_misses(answer: str) -> list[str]:
    """Wrong answers one edit away: a digit or letter changed, an item dropped or added, items swapped, text
    appended on the answer line."""
    items = answer.split(", ")
    first = items[0]
    changed = first[:-1] + ("0" if first[-1] != "0" else "1") if first[-1].isdigit() else first[:-1] + "Q"
    misses = [", ".join([changed, *items[1:]]), answer + ", " + items[0], answer + " and more", answer[:-1]]
    if len(items) > 1:
        misses += [", ".join(items[:-1]), ", ".join([items[1], items[0], *items[2:]])]
    return misses


@pytest.mark.parametrize("task", TASKS)
def test_each_task_scores_its_answer_1_and_near_misses_0(gen, task):
    s = gen.sample(task, 320, 0)
    assert score(" " + s.answer, s.answer) == 1.0
    assert score(f" {s.answer}\nQuestion: something else", s.answer) == 1.0  # the span ends at the newline
    assert score(s.answer.replace(", ", " ,"), s.answer) == 1.0  # spacing around commas is not the answer
    for wrong in near_misses(s.answer):
        assert score(" " + wrong, s.answer) == 0.0, wrong
    assert item_recall(" " + s.answer, s.answer) == 1.0
    assert item_recall(" nothing", s.answer) == 0.0


def answer_from_prompt(task: str, prompt: str) -> str:
    """The answer worked out from the prompt text alone, independently of the generator."""
    question = prompt.rsplit("\nQuestion: ", 1)[1]
    needles = re.findall(r"^The magic number for (\w+) is (\d+)$", prompt, re.M)
    if task == "vt":
        value = re.search(r"equal (\d+)\?", question).group(1)
        holds, names = {value}, []
        for name, source in re.findall(r"^VAR (\w+) = (\w+)$", prompt, re.M):
            if source in holds:
                holds.add(name)
                names.append(name)
        return ", ".join(names)
    keys = re.search(r"magic numbers? for (.+)\?", question).group(1).split(", ")
    return ", ".join(v for k in keys for key, v in needles if key == k)


@pytest.mark.parametrize("task", ["niah_single", "niah_multikey", "niah_multivalue", "niah_multiquery", "vt"])
def test_the_answer_follows_from_the_prompt(gen, task):
    for s in gen.samples(task, 512, 4):
        assert answer_from_prompt(task, s.prompt) == s.answer


def test_answer_span_stops_at_the_first_line():
    assert answer_span(" 12, 34 ,56\n78") == "12, 34, 56"
    assert item_recall("12, 99", "12, 34") == 0.5


@pytest.mark.parametrize("task", TASKS)
def test_samples_are_a_function_of_seed_and_index(stdlib, gen, task):
    again = TaskGenerator(stdlib[1], stdlib[0])  # a fresh generator: no state carried between calls
    assert gen.sample(task, 320, 3, seed=7) == again.sample(task, 320, 3, seed=7)
    assert gen.sample(task, 320, 3, seed=7).prompt != gen.sample(task, 320, 3, seed=8).prompt
    assert gen.sample(task, 320, 3, seed=7).prompt != gen.sample(task, 320, 4, seed=7).prompt


@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("length", LENGTHS)
def test_prompt_and_answer_budget_fill_the_length(stdlib, gen, task, length):
    tok = stdlib[1]
    for s in gen.samples(task, length, 3):
        n = len(tok.encode([s.prompt])[0])
        assert n == s.prompt_tokens
        assert length - max(8, length // 100) <= n + s.max_new_tokens <= length
        assert len(tok.encode([" " + s.answer])[0]) + 1 <= s.max_new_tokens  # the answer and EOS fit the budget
        assert tok.encode([s.document])[0][:n] == tok.encode([s.prompt])[0]  # the prompt is a token prefix


def test_too_short_a_length_is_a_clear_error_and_an_empty_evaluation_cell(gen, stdlib):
    with pytest.raises(ConfigError, match="use a longer length"):
        gen.sample("niah_multivalue", 40, 0)
    assert gen.try_sample("niah_multivalue", 40, 0) is None
    r = evaluate_long_context(PositionalLM(), stdlib[1], stdlib[0], tasks=["niah_multivalue"], lengths=[40], samples=2)
    assert r["accuracy"] == {"niah_multivalue": {"40": None}} and r["skipped"] == [
        {"task": "niah_multivalue", "length": 40}
    ]
    assert r["samples"] == [] and "-" in format_table(r).splitlines()[1]


def test_single_needle_depths_cover_the_haystack(gen):
    samples = gen.samples("niah_single", 512, 20)
    depths = [s.depths[0] for s in samples]
    assert {min(int(d * 5), 4) for d in depths} == set(range(5))  # every fifth of the haystack holds a needle
    for s in samples:  # the recorded depth is where the needle is (to within a line of the haystack)
        body = s.prompt.split("\n", 1)[1].rsplit("\nQuestion:", 1)[0]
        assert body.count("The magic number for") == 1
        at = body.index("The magic number for")
        assert at / (len(body) - len(needle("x", 0))) == pytest.approx(s.depths[0], abs=0.1)


@pytest.mark.parametrize("task", ["niah_multikey", "niah_multivalue", "niah_multiquery", "vt"])
def test_every_needle_is_in_the_prompt_once(gen, task):
    s = gen.sample(task, 512, 1)
    marker = "VAR " if task == "vt" else "The magic number for"
    body = s.prompt.rsplit("\nQuestion:", 1)[0]
    assert body.count(marker) == len(s.depths) == (5 if task == "vt" else 4)
    assert list(s.depths) == sorted(s.depths)


def haystack_lines(prompt: str) -> list[str]:
    body = prompt.split("\n", 1)[1].rsplit("\nQuestion:", 1)[0]
    return [x for x in body.split("\n") if x and not x.startswith(("The magic number for", "VAR "))]


def test_the_haystack_is_validation_text_and_training_documents_use_training_text(stdlib, gen):
    corpus, tok = stdlib
    val, train = "\n".join(corpus.val), "\n".join(corpus.train)
    lines = haystack_lines(gen.sample("niah_multikey", 512, 0).prompt)
    assert len(lines) > 10
    assert all(x in val for x in lines)
    docs = list(training_documents(tok, corpus, [320], 6, tasks=["niah_single", "vt"]))
    assert len(docs) == 6
    for d in docs:
        assert all(x in train for x in haystack_lines(d.rsplit("\nAnswer:", 1)[0]))


def test_fwe_words_come_from_the_corpus_and_the_answer_is_the_top_three(gen):
    s = gen.sample("fwe", 512, 2)
    words = s.prompt.split("\n")[1].split()
    counts = {w: words.count(w) for w in set(words)}
    ranked = sorted(counts, key=counts.get, reverse=True)
    assert s.answer == ", ".join(ranked[:3])
    assert counts[ranked[0]] > counts[ranked[1]] > counts[ranked[2]] > counts[ranked[3]]
    assert set(words) <= set(gen.pool)


def test_training_documents_are_never_evaluation_prompts(stdlib, gen):
    corpus, tok = stdlib
    prompts = {gen.sample(t, 320, i).prompt for t in TASKS for i in range(2)}
    docs = list(training_documents(tok, corpus, [320], 2 * len(TASKS)))
    assert not any(d.startswith(p) for d in docs for p in prompts)
    train_gen = TaskGenerator(tok, corpus, purpose="train")
    assert docs == [train_gen.sample(t, 320, i).document for i in range(2) for t in TASKS]


def test_default_lengths_double_up_to_the_context():
    assert default_lengths(1024) == [256, 512, 1024]
    assert default_lengths(768) == [256, 512, 768]
    assert default_lengths(128) == [128]


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    """A tiny Engram model trained for 12 steps on the stdlib corpus, with a 384-token context."""
    from engram.train.trainer import train

    root = tmp_path_factory.mktemp("lc")
    run = tiny_engram_run(root / "run", None, root / "cache", data=None, max_bytes=1_000_000, vocab_size=512)
    run.model = run.model.replace(max_seq_len=384)
    train(run)
    return root / "run" / "model"


def test_eval_long_context_cli_writes_every_cell(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "lc.json"
    main(
        [
            "eval",
            "--model",
            str(tiny_model_dir),
            "--long-context",
            "--lengths",
            "320,384",
            "--samples",
            "2",
            "--max-bytes",
            "1000000",
            "--out",
            str(out),
            "--no-progress",
        ]
    )
    r = json.loads(out.read_text())
    assert set(r["accuracy"]) == set(TASKS)
    for task in TASKS:
        assert set(r["accuracy"][task]) == {"320", "384"}
        assert all(0.0 <= a <= 1.0 for a in r["accuracy"][task].values())
    assert len(r["samples"]) == len(TASKS) * 2 * 2
    assert set(r["tail_loss"]) == {"320", "384"}
    for cell in r["tail_loss"].values():  # the one validation module is longer than both lengths
        assert cell["docs"] == 1 and cell["tokens"] == cell["tail_tokens"]
        assert 0 < cell["loss"] < 20 and cell["gain"] == pytest.approx(cell["loss_short"] - cell["loss"])
    assert (tmp_path / "lc.png").stat().st_size > 0
    printed = capsys.readouterr().out
    assert all(t in printed for t in TASKS) and "tail loss" in printed
    assert printed.splitlines()[0].split()[1:] == ["320", "384"]
    assert format_table(r).splitlines()[0] == printed.splitlines()[0]


def test_eval_long_context_refuses_lengths_beyond_the_context(tiny_model_dir, capsys):
    with pytest.raises(SystemExit) as e:
        main(["eval", "--model", str(tiny_model_dir), "--long-context", "vt", "--lengths", "256,512"])
    assert e.value.code == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "length 512 exceeds the model's max_seq_len 384" in err


class PositionalLM:
    """A fake model whose loss at a window's position j is j: the tail loss is then known in closed form."""

    max_seq_len = 1024

    def token_losses(self, ids):
        return torch.arange(ids.shape[1] - 1, dtype=torch.float32).expand(ids.shape[0], -1)


def test_tail_loss_averages_the_last_quarter_and_skips_short_documents():
    docs = [list(range(300)), list(range(100)), list(range(257))]  # the 100-token one is too short for 256
    r = tail_loss(PositionalLM(), docs, 256, tail_fraction=0.25)
    assert (r["docs"], r["tail_tokens"], r["tokens"], r["short_context"]) == (2, 64, 128, 64)
    assert r["loss"] == pytest.approx(sum(range(192, 256)) / 64)  # positions 192..255 of the full window
    assert r["loss_short"] == pytest.approx(sum(range(64, 128)) / 64)  # the same tokens in a 128-token window
    assert r["gain"] == pytest.approx(r["loss_short"] - r["loss"])
    assert tail_loss(PositionalLM(), docs, 512)["loss"] is None


def test_answers_do_not_depend_on_the_generation_batch(tiny_model_dir):
    from engram.model.io import load_model

    corpus = load_corpus(None, max_bytes=1_000_000)
    tok = load_tokenizer(tiny_model_dir)
    lm = EngramRunner(load_model(tiny_model_dir), tok)
    settings = dict(tasks=["niah_multiquery", "fwe"], lengths=[384], samples=3, progress=False)
    one = evaluate_long_context(lm, tok, corpus, batch_size=1, **settings)
    three = evaluate_long_context(lm, tok, corpus, batch_size=3, **settings)
    assert [s["prediction"] for s in one["samples"]] == [s["prediction"] for s in three["samples"]]
