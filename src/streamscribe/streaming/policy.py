"""Stabilising policy for partial text: LocalAgreement over consecutive hypotheses of one utterance.

A word becomes stable once two consecutive decodes of the growing utterance agree on it (and on every
word before it). Stable words are never taken back while the utterance is open, so a partial only ever
changes in its tentative tail.
"""

from __future__ import annotations

import re

_PUNCTUATION = re.compile(r"[^\w']+")


def normalize_word(word: str) -> str:
    """Case- and punctuation-free form used to compare words between hypotheses."""
    return _PUNCTUATION.sub("", word.lower())


class LocalAgreement:
    """Tracks the stable prefix of one open utterance."""

    def __init__(self) -> None:
        self.stable: list[str] = []
        self._previous: list[str] = []

    def reset(self) -> None:
        self.stable = []
        self._previous = []

    def update(self, hypothesis: str) -> str:
        """Take a new hypothesis for the whole utterance; return the partial text to show."""
        words = hypothesis.split()
        tail = self._tail_after_stable(words)
        previous_tail = self._tail_after_stable(self._previous)
        agreed = 0
        while agreed < min(len(tail), len(previous_tail)) and normalize_word(tail[agreed]) == normalize_word(
            previous_tail[agreed]
        ):
            agreed += 1
        self.stable.extend(tail[:agreed])
        self._previous = words
        return " ".join(self.stable + tail[agreed:])

    def _tail_after_stable(self, words: list[str]) -> list[str]:
        """The words of ``words`` that come after the stable prefix (empty if it cannot be placed)."""
        if not self.stable:
            return words
        stable = [normalize_word(w) for w in self.stable]
        normalized = [normalize_word(w) for w in words]
        if normalized[: len(stable)] == stable:
            return words[len(stable) :]
        # The new hypothesis rephrased the start: place the stable words' end by their last one or two
        # words, at the match closest to where the stable prefix ends; failing that, by word count.
        for size in (2, 1):
            anchor = stable[-size:]
            ends = [i + size for i in range(len(normalized) - size + 1) if normalized[i : i + size] == anchor]
            if ends:
                return words[min(ends, key=lambda end: abs(end - len(stable))) :]
        return words[len(stable) :]
