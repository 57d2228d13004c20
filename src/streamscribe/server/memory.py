"""Giving freed memory back to the system, so that a server's resident memory stays flat over days.

glibc's malloc gives each thread that allocates a heap of its own (an arena, up to eight per core), and
hands freed memory back to the system only from the top of a heap. Decode workers, Opus decoders and the
event loop each allocate and free audio windows of many sizes, so the resident memory of a long-running
server creeps up to a high-water mark of fragments that no stream holds any more: 23 % in a 30-minute
soak of 8 streams (``bench/soak.py``), with Python's own allocations flat. Two glibc calls lower it (13 %
at half-time, levelling off after 16 minutes): fewer arenas, set before the threads start, and
``malloc_trim`` once streams have ended. jemalloc keeps it flat (-2 % in the same soak): the Docker image
preloads it (``LD_PRELOAD``), and then, as with other C libraries (musl, macOS), both calls are skipped.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import os
from typing import Any

M_ARENA_MAX = -8  # mallopt's parameter number, from glibc's malloc.h
ARENAS = 2  # measured: the lowest memory in a probe of many streams, and streams as fast as with 8 per core
TRIM_DELAY_SECONDS = 2.0  # streams ending together are trimmed for once


def _glibc() -> Any | None:
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        libc = ctypes.CDLL(name)
    except OSError:
        return None
    return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None


def _glibc_malloc() -> Any | None:
    """glibc, when its malloc is the one in use."""
    return None if "jemalloc" in os.environ.get("LD_PRELOAD", "") else _glibc()


_LIBC = _glibc_malloc()


def limit_arenas() -> None:
    """Cap glibc's arenas (call before threads start), unless the operator set ``MALLOC_ARENA_MAX``."""
    if _LIBC is not None and "MALLOC_ARENA_MAX" not in os.environ:
        _LIBC.mallopt(M_ARENA_MAX, ARENAS)


class MemoryTrimmer:
    """Returns freed memory to the system a moment after streams end, in a worker thread (a trim walks
    every arena, a few milliseconds the event loop need not wait)."""

    def __init__(self) -> None:
        self.libc = _LIBC  # glibc, or None where its malloc is not the one in use
        self._pending: asyncio.TimerHandle | None = None

    def trim_soon(self) -> None:
        """After a stream or an upload ended: trim in a moment (one trim for all that end by then)."""
        if self.libc is None or self._pending is not None:
            return
        loop = asyncio.get_running_loop()
        self._pending = loop.call_later(TRIM_DELAY_SECONDS, self._trim, loop, self.libc)

    def _trim(self, loop: asyncio.AbstractEventLoop, libc: Any) -> None:
        self._pending = None
        loop.run_in_executor(None, libc.malloc_trim, 0)

    def close(self) -> None:
        if self._pending is not None:
            self._pending.cancel()
            self._pending = None
