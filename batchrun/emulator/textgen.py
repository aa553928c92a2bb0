"""Deterministic pseudo-text: the emulator's "model".

One token is one word (with its leading space) or one punctuation mark. The word stream is drawn
from a fixed vocabulary by a ``random.Random`` seeded with a hash of the prompt, the seed and the
sampling parameters; ``max_new_tokens`` and ``stop`` only cut that stream, so a shorter limit gives
a prefix of a longer one. The stream ends by itself ("eos_token") after 12 to 60 tokens.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from collections.abc import Iterable
from dataclasses import dataclass

_WORD_OR_MARK = re.compile(r"\w+|[^\w\s]")

_VOCABULARY = ["the", "a", "of", "and", "to", "in", "is", "that", "it", "for", "on", "with", "as", "was", "by", "at", "from", "this", "be", "are", "have", "an", "or", "which", "one", "all", "model", "data", "batch", "night", "river", "light", "engine", "signal", "value", "garden", "window", "stone", "market", "letter", "voice", "answer", "question", "system", "figure", "number", "water", "forest", "city", "road", "morning", "paper", "table", "image", "colour", "quiet", "bright", "small", "large", "early", "simple", "careful", "steady", "open", "clear", "warm", "cold", "long", "short", "old", "new", "runs", "holds", "turns", "finds", "keeps", "shows", "brings", "makes", "takes", "gives", "follows", "reads", "writes", "moves", "waits", "slowly", "often", "always", "never", "together", "again", "still", "almost", "nearly", "soon", "here", "there"]


def count_tokens(text: str) -> int:
    """The emulator's tokenizer: words and punctuation marks each count as one token."""
    return len(_WORD_OR_MARK.findall(text))


def tokens(text: str) -> list[str]:
    """The tokens ``count_tokens`` counts, in order: each word and each punctuation mark."""
    return _WORD_OR_MARK.findall(text)


def token_spans(text: str) -> list[tuple[str, int, int]]:
    """Each token with its start and end offsets in ``text`` (characters)."""
    return [(match.group(), match.start(), match.end()) for match in _WORD_OR_MARK.finditer(text)]


def stream_seed(prompt: str, seed: int | None, sampling: dict) -> int:
    """A 64-bit seed for the word stream, from the prompt, the seed and the sampling parameters."""
    material = json.dumps([prompt, seed, sampling], sort_keys=True, default=str).encode()
    return int.from_bytes(hashlib.blake2b(material, digest_size=8).digest(), "big")


def word_stream(seed: int) -> Iterable[str]:
    """Tokens of readable pseudo-sentences; finite: its end is the model's end of sequence."""
    rng = random.Random(seed)
    length = rng.randint(12, 60)
    produced = 0
    capitalise = True
    words_in_sentence = 0
    sentence_length = rng.randint(5, 12)
    while produced < length:
        if words_in_sentence >= sentence_length:
            yield "."
            produced += 1
            capitalise = True
            words_in_sentence = 0
            sentence_length = rng.randint(5, 12)
            continue
        word = rng.choice(_VOCABULARY)
        if capitalise:
            word = word.capitalize()
            capitalise = False
        yield " " + word if produced else word
        produced += 1
        words_in_sentence += 1


@dataclass(frozen=True)
class Generation:
    """The outcome of one generation: the text, its tokens and why it stopped."""

    text: str
    tokens: list[str]
    finish_reason: str  # "length" | "eos_token" | "stop_sequence"


def generate(stream: Iterable[str], *, max_new_tokens: int, stop: list[str] | None) -> Generation:
    """Take tokens from ``stream`` until it ends, ``max_new_tokens`` is reached or a stop string appears.

    As TGI does, the stop string stays in the generated text.
    """
    tokens: list[str] = []
    text = ""
    stop = [s for s in (stop or []) if s]
    for token in stream:
        if len(tokens) >= max_new_tokens:
            return Generation(text, tokens, "length")
        tokens.append(token)
        text += token
        if stop and any(s in text for s in stop):
            return Generation(text, tokens, "stop_sequence")
    return Generation(text, tokens, "eos_token")
