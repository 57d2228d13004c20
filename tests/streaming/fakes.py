"""A scripted engine for the streaming layer's unit tests (the end-to-end tests use the real model)."""

from __future__ import annotations

import threading
from collections.abc import Sequence

from streamscribe.engines.base import AudioWindow, Transcript


class ScriptedEngine:
    """Answers each window with one word per second of audio; can be paused to hold decodes in flight."""

    name = "scripted"
    sample_rate = 16000
    languages = frozenset({"en"})

    def __init__(self) -> None:
        self.windows: list[AudioWindow] = []
        self.batch_sizes: list[int] = []
        self.gate = threading.Event()
        self.gate.set()

    def transcribe(self, batch: Sequence[AudioWindow]) -> list[Transcript]:
        self.gate.wait(timeout=30)
        self.windows.extend(batch)
        self.batch_sizes.append(len(batch))
        results = []
        for window in batch:
            seconds = len(window.samples) / self.sample_rate
            words = " ".join(f"w{i}" for i in range(max(1, int(seconds))))
            results.append(Transcript(text=words, language=window.language))
        return results
