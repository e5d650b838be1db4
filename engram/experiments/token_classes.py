"""Which tokenizer pieces are identifier characters: used to pick "entity" positions in code.

A byte-level BPE piece is a *word piece* when it decodes to letters, digits and underscores, optionally after one
leading space. A word piece *continues* the previous token's word when it has no leading space and follows a
word piece. A multi-token identifier (``_data``, ``maxsize``) is a word piece followed by continuing pieces; its
last piece plays the role of the paper's "final token of a named entity" (Few-NERD) in code.
"""

from __future__ import annotations

import re

import numpy as np

_WORD = re.compile(r"^ ?[A-Za-z0-9_]+$")


def word_pieces(decode, vocab_size: int) -> tuple[np.ndarray, np.ndarray]:
    """``(is_word [V], leading_space [V])`` booleans from ``decode([id]) -> str``."""
    is_word = np.zeros(vocab_size, dtype=bool)
    leading = np.zeros(vocab_size, dtype=bool)
    for i in range(vocab_size):
        text = decode([i])
        is_word[i] = bool(_WORD.match(text))
        leading[i] = text.startswith(" ")
    return is_word, leading


def continues_word(ids: np.ndarray, is_word: np.ndarray, leading: np.ndarray) -> np.ndarray:
    """[B, T] bool: token t is a word piece without leading space right after a word piece (t = 0 never)."""
    w = is_word[ids]
    cont = np.zeros_like(w)
    cont[:, 1:] = w[:, 1:] & ~leading[ids[:, 1:]] & w[:, :-1]
    return cont


def identifier_ends(ids: np.ndarray, is_word: np.ndarray, leading: np.ndarray) -> np.ndarray:
    """[B, T] bool: the last piece of a multi-token identifier (the last position of a row is never marked,
    since whether the identifier goes on is not visible there)."""
    cont = continues_word(ids, is_word, leading)
    ends = np.zeros_like(cont)
    ends[:, :-1] = cont[:, :-1] & ~cont[:, 1:]
    return ends
