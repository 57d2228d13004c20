"""What the streaming layer's tests share: one loaded Silero model (each stream keeps its own state)."""

from __future__ import annotations

import pytest

from streamscribe.streaming.vad import SileroVad


@pytest.fixture(scope="session")
def vad() -> SileroVad:
    return SileroVad()
