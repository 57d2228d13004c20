"""Freed memory goes back to the system: glibc's arenas are capped, and a trim follows streams that end."""

from __future__ import annotations

import asyncio
import platform
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

from streamscribe.server import memory
from tests.conftest import RunningServer


class RecordingLibc:
    """glibc's two calls, noted (and passed on to the real glibc where there is one)."""

    def __init__(self, real: Any) -> None:
        self.calls: list[tuple[str, tuple[int, ...]]] = []
        self._real = real

    def mallopt(self, *args: int) -> int:
        self.calls.append(("mallopt", args))
        return 1

    def malloc_trim(self, *args: int) -> int:
        self.calls.append(("malloc_trim", args))
        return self._real.malloc_trim(*args) if self._real is not None else 0

    def trims(self) -> int:
        return sum(name == "malloc_trim" for name, _ in self.calls)


@pytest.fixture
def libc(monkeypatch: pytest.MonkeyPatch) -> RecordingLibc:
    """A recorder for the trimmers made in the test (and for ``limit_arenas``); other servers in this test
    process keep theirs."""
    recording = RecordingLibc(memory._LIBC)
    monkeypatch.setattr(memory, "_LIBC", recording)
    monkeypatch.setattr(memory, "TRIM_DELAY_SECONDS", 0.2)
    return recording


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's calls exist only under glibc")
def test_glibc_is_found_on_glibc_systems() -> None:
    assert memory._LIBC is not None
    assert memory._LIBC.malloc_trim(0) in (0, 1)


def test_under_jemalloc_glibcs_calls_are_skipped(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LD_PRELOAD", "/usr/local/lib/libjemalloc.so.2")
    assert memory._glibc_malloc() is None


def test_arenas_are_capped_unless_the_operator_chose(
    libc: RecordingLibc, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("MALLOC_ARENA_MAX", raising=False)
    memory.limit_arenas()
    assert libc.calls == [("mallopt", (memory.M_ARENA_MAX, memory.ARENAS))]
    monkeypatch.setenv("MALLOC_ARENA_MAX", "4")
    memory.limit_arenas()
    assert len(libc.calls) == 1  # glibc read the operator's value itself


def test_work_that_ends_together_is_trimmed_for_once(libc: RecordingLibc) -> None:
    async def end_three() -> None:
        trimmer = memory.MemoryTrimmer()
        for _ in range(3):
            trimmer.trim_soon()
        await asyncio.sleep(0.5)
        trimmer.trim_soon()
        trimmer.close()  # the server stops: the pending trim is dropped
        await asyncio.sleep(0.5)

    asyncio.run(end_three())
    assert libc.trims() == 1


def test_streams_that_end_are_followed_by_a_trim(
    libc: RecordingLibc, make_server: Callable[..., RunningServer], clip: Callable[[str], np.ndarray]
) -> None:
    server = make_server()
    assert server.app.state.runtime.memory.libc is libc
    samples = clip("short.wav")
    results: list[Any] = [server.stream(samples, speed=0) for _ in range(2)]
    assert all(result.full_transcript for result in results)
    time.sleep(1.0)  # five trim delays
    trims = libc.trims()
    assert trims >= 1
    time.sleep(0.5)
    assert libc.trims() == trims  # nothing ended since: no more trims
