"""Hallucinated repeats: the phrase an autoregressive decoder writes again and again when the audio has
run out (a window cut mid-word, an utterance that fills the encoder), told apart from speech that really
says a thing twice by where the copies sit in the audio."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

_WORD = re.compile(r"[^\W_]+(?:'[^\W_]+)*")
_MIN_SECONDS_PER_WORD = 0.1  # no one speaks ten words a second


@dataclass(frozen=True)
class SpokenWord:
    """A word of a text, lower case, with where it ends in the text and, when known, in the audio.

    Attributes:
        word: The word, lower case, without punctuation.
        text_end: Index in the text just after the word.
        start: Start in seconds, when the engine timed it.
        end: End in seconds, when the engine timed it.
    """

    word: str
    text_end: int
    start: float = 0.0
    end: float = 0.0


def spoken_words(text: str, start: float = 0.0, end: float = 0.0) -> list[SpokenWord]:
    """The words of ``text`` (one engine word may hold several: "f***ing" is "f" and "ing")."""
    return [SpokenWord(match.group().lower(), match.end(), start, end) for match in _WORD.finditer(text)]


@dataclass(frozen=True)
class RepeatedRun:
    """A phrase written again right after itself.

    Attributes:
        start: Index of its first word.
        length: Words in the phrase.
        times: How many times in a row it appears.
    """

    start: int
    length: int
    times: int


def _is_loop(length: int, times: int) -> bool:
    # People say "had had" or "no, no, no"; a decoder's loop writes one word four times, two words three
    # times or a phrase of three or more words twice in a row.
    return times >= {1: 4, 2: 3}.get(length, 2)


def find_repeated_run(words: Sequence[SpokenWord]) -> RepeatedRun | None:
    """The first run of a phrase repeated in a way that looks like a decoder's loop, or None."""
    plain = [word.word for word in words]
    for start in range(len(plain)):
        for length in range(1, (len(plain) - start) // 2 + 1):
            phrase = plain[start : start + length]
            times = 1
            while plain[start + times * length : start + (times + 1) * length] == phrase:
                times += 1
            if _is_loop(length, times):
                return RepeatedRun(start, length, times)
    return None


def is_spoken_twice(words: Sequence[SpokenWord], run: RepeatedRun) -> bool:
    """Whether timed words show the repeats as speech: each copy takes about as long as the first, at a
    pace people speak. A decoder's loop squeezes its copies into the last instant of the audio."""

    def span(copy: int) -> float:
        first, last = run.start + copy * run.length, run.start + (copy + 1) * run.length - 1
        return words[last].end - words[first].start

    least = _MIN_SECONDS_PER_WORD * run.length
    first = span(0)
    return first >= least and all(span(copy) >= max(least, first / 2) for copy in range(1, run.times))
