"""Between sessions and an engine: one queue, finals before partials, oldest audio first.

Each session keeps at most one request in flight, so oldest-first is a round robin over streams, and
a stream that falls behind sends one larger window instead of a queue of stale ones. When more work
waits than the workers can take, finals are decoded greedily (``AudioWindow.fast``); when finals
themselves wait too long, ``overloaded`` tells the server to refuse new streams.
"""

from __future__ import annotations

import asyncio
import dataclasses
import heapq
import itertools
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Protocol

from streamscribe.engines.base import AudioWindow, Engine, Transcript


class StaleWork(Exception):
    """A queued job was dropped because its result stopped mattering before its turn came."""


class Priority(IntEnum):
    FINAL = 0
    PARTIAL = 1


class DecodeObserver(Protocol):
    """Told about every engine call (for metrics); must be quick, it runs on the event loop."""

    def batch_decoded(self, engine: str, priority: Priority, size: int, seconds: float) -> None: ...


@dataclass(order=True)
class _Job:
    priority: int
    order: int
    window: AudioWindow = field(compare=False)
    result: asyncio.Future[Transcript] = field(compare=False)
    stale: Callable[[], bool] | None = field(compare=False, default=None)
    queued_at: float = field(compare=False, default_factory=time.monotonic)


class DecodeScheduler:
    """Runs an engine's ``transcribe`` in worker threads, never on the event loop."""

    def __init__(
        self,
        engine: Engine,
        workers: int = 1,
        max_batch: int = 1,
        overload_seconds: float = 3.0,
        observer: DecodeObserver | None = None,
    ) -> None:
        self.engine = engine
        self._overload_seconds = overload_seconds
        self._observer = observer
        self._workers = workers
        self._max_batch = max_batch
        self._queue: list[_Job] = []
        self._order = itertools.count()
        self._ready: asyncio.Event | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix=f"decode-{engine.name}")

    @property
    def queued(self) -> int:
        return len(self._queue)

    @property
    def pressure(self) -> float:
        """Queued jobs per worker, at least 1: how much longer than usual a new job will wait."""
        return max(1.0, len(self._queue) / self._workers)

    @property
    def overloaded(self) -> bool:
        """True when a final has waited longer than ``overload_seconds``: new streams would not keep up."""
        now = time.monotonic()
        return any(
            job.priority == Priority.FINAL and now - job.queued_at > self._overload_seconds
            for job in self._queue
            if not job.result.done()
        )

    async def decode(
        self, window: AudioWindow, priority: Priority, stale: Callable[[], bool] | None = None
    ) -> Transcript:
        """Queue one window and wait for its transcript (engine errors are raised here).

        ``stale`` is asked when the job's turn comes: if it says the result is no longer wanted (the
        utterance closed while a partial waited), the job is dropped and ``StaleWork`` raised instead.
        """
        if self._ready is None:
            self._ready = asyncio.Event()
            self._tasks = [asyncio.create_task(self._work()) for _ in range(self._workers)]
        future: asyncio.Future[Transcript] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._queue, _Job(priority, next(self._order), window, future, stale))
        self._ready.set()
        return await future

    async def _work(self) -> None:
        assert self._ready is not None
        loop = asyncio.get_running_loop()
        while True:
            while not self._queue:
                self._ready.clear()
                await self._ready.wait()
            batch = self._take_batch()
            if not batch:
                continue
            started = time.perf_counter()
            try:
                results = await loop.run_in_executor(
                    self._executor, self.engine.transcribe, [job.window for job in batch]
                )
            except Exception as exc:
                for job in batch:
                    if not job.result.done():
                        job.result.set_exception(exc)
                continue
            if self._observer is not None:
                self._observer.batch_decoded(
                    self.engine.name, Priority(batch[0].priority), len(batch), time.perf_counter() - started
                )
            for job, transcript in zip(batch, results, strict=True):
                if not job.result.done():
                    job.result.set_result(transcript)

    def _take_batch(self) -> list[_Job]:
        """The next job, and more of its priority while they are cheap to share one engine call.

        Partials always share. A final is decoded alone (beam search, its own call) unless the queue is
        behind: then finals are decoded greedily (``fast``), so all streams advance, and share too.
        """
        behind = len(self._queue) > self._workers
        batch: list[_Job] = []
        while self._queue:
            job = heapq.heappop(self._queue)
            if job.result.cancelled():
                continue
            if job.stale is not None and job.stale():
                job.result.set_exception(StaleWork())
                continue
            if batch and job.priority != batch[0].priority:
                heapq.heappush(self._queue, job)
                break
            batch.append(job)
            shared = job.priority == Priority.PARTIAL or behind
            if len(batch) >= (self._max_batch if shared else 1):
                break
        if behind:
            for job in batch:
                job.window = dataclasses.replace(job.window, fast=True)
        return batch

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._executor.shutdown(wait=False, cancel_futures=True)
