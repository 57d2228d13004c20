"""Between sessions and an engine: one batching loop, with a rule for which waiting work shares a call.

Sessions submit work and await its result; worker tasks take a batch by the scheduler's rule and run the
engine on it in a thread, never on the event loop, setting each result (or the engine's error) on its
future. When a batch of several fails, each item is run again alone and only one that fails again gets
the error. Two rules:

- ``WindowBatches`` for engines that decode whole windows: finals before partials, oldest audio first.
  Each session keeps at most one request in flight, so oldest-first is a round robin over streams, and a
  stream that falls behind sends one larger window instead of a queue of stale ones. When more work waits
  than the workers can take, finals are decoded quickly (``AudioWindow.fast``: Whisper with a small beam,
  no fallback) and share calls.
- ``PiecePerStream`` for engines that stream natively: every stream's waiting piece joins one step.

When work of the first priority waits too long, ``overloaded`` tells the server to refuse new streams.
"""

from __future__ import annotations

import asyncio
import dataclasses
import heapq
import itertools
import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Generic, Protocol, TypeVar

import numpy as np

from streamscribe.engines.base import (
    AudioWindow,
    Engine,
    EngineStream,
    StreamingEngine,
    StreamUpdate,
    Transcript,
)

Item = TypeVar("Item")
Result = TypeVar("Result")

StreamPiece = tuple[EngineStream, np.ndarray]
log = logging.getLogger(__name__)


class StaleWork(Exception):
    """A queued job was dropped because its result stopped mattering before its turn came."""


class Priority(IntEnum):
    FINAL = 0
    PARTIAL = 1


class DecodeObserver(Protocol):
    """Told about every engine call (for metrics); must be quick, it runs on the event loop."""

    def batch_decoded(self, engine: str, kind: str, size: int, seconds: float) -> None: ...


@dataclass(order=True)
class Job(Generic[Item, Result]):
    """One submitted piece of work, ordered by priority, then by when it came."""

    priority: int
    order: int
    item: Item = field(compare=False)
    result: asyncio.Future[Result] = field(compare=False)
    stale: Callable[[], bool] | None = field(compare=False, default=None)
    queued_at: float = field(compare=False, default_factory=time.monotonic)


class BatchRule(Protocol[Item, Result]):
    """Which waiting jobs go into the next engine call (it pops them from the heap ``queue``)."""

    def take(self, queue: list[Job[Item, Result]], workers: int) -> list[Job[Item, Result]]: ...

    def kind(self, batch: Sequence[Job[Item, Result]]) -> str:
        """What the call was, for metrics."""
        ...


class Scheduler(Generic[Item, Result]):
    """Runs ``run`` on batches of submitted items in worker threads; ``rule`` decides the batches."""

    def __init__(
        self,
        name: str,
        run: Callable[[list[Item]], list[Result]],
        rule: BatchRule[Item, Result],
        workers: int = 1,
        overload_seconds: float = 3.0,
        observer: DecodeObserver | None = None,
    ) -> None:
        self.name = name
        self._run = run
        self._rule = rule
        self._workers = workers
        self._overload_seconds = overload_seconds
        self._observer = observer
        self._queue: list[Job[Item, Result]] = []
        self._order = itertools.count()
        self._ready: asyncio.Event | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix=f"decode-{name}")

    @property
    def queued(self) -> int:
        return len(self._queue)

    @property
    def pressure(self) -> float:
        """Queued jobs per worker, at least 1: how much longer than usual a new job will wait."""
        return max(1.0, len(self._queue) / self._workers)

    @property
    def overloaded(self) -> bool:
        """True when first-priority work has waited longer than ``overload_seconds``: new streams would
        not keep up."""
        now = time.monotonic()
        return any(
            job.priority == Priority.FINAL and now - job.queued_at > self._overload_seconds
            for job in self._queue
            if not job.result.done()
        )

    async def submit(
        self, item: Item, priority: Priority = Priority.FINAL, stale: Callable[[], bool] | None = None
    ) -> Result:
        """Queue one item and wait for its result (engine errors are raised here).

        ``stale`` is asked when the job's turn comes: if it says the result is no longer wanted (the
        utterance closed while a partial waited), the job is dropped and ``StaleWork`` raised instead.
        """
        if self._ready is None:
            self._ready = asyncio.Event()
            self._tasks = [asyncio.create_task(self._work()) for _ in range(self._workers)]
        future: asyncio.Future[Result] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._queue, Job(priority, next(self._order), item, future, stale))
        self._ready.set()
        return await future

    async def _work(self) -> None:
        assert self._ready is not None
        loop = asyncio.get_running_loop()
        while True:
            self._drop_unwanted()
            if not self._queue:
                self._ready.clear()
                await self._ready.wait()
                continue
            batch = self._rule.take(self._queue, self._workers)
            started = time.perf_counter()
            try:
                results = await loop.run_in_executor(self._executor, self._run, [job.item for job in batch])
            except Exception as exc:
                if len(batch) == 1:
                    self._settle(batch, exc)
                    continue
                # One bad item (a stream's state, an odd window) must not fail everyone it shared the call
                # with: each item is run again alone, and only an item that fails again gets the error.
                log.warning(
                    "%s: a batch of %d failed (%s); retrying its items one by one",
                    self.name,
                    len(batch),
                    type(exc).__name__,
                    extra={"event": "batch_retry", "engine": self.name, "size": len(batch)},
                )
                for job in batch:
                    try:
                        self._settle([job], await loop.run_in_executor(self._executor, self._run, [job.item]))
                    except Exception as single:
                        self._settle([job], single)
                continue
            if self._observer is not None:
                seconds = time.perf_counter() - started
                self._observer.batch_decoded(self.name, self._rule.kind(batch), len(batch), seconds)
            self._settle(batch, results)

    @staticmethod
    def _settle(batch: list[Job[Item, Result]], outcome: list[Result] | Exception) -> None:
        """Give each job of ``batch`` its result, or the error, unless its caller went away."""
        for index, job in enumerate(batch):
            if job.result.done():
                continue
            if isinstance(outcome, Exception):
                job.result.set_exception(outcome)
            else:
                job.result.set_result(outcome[index])

    def _drop_unwanted(self) -> None:
        """Drop queued jobs whose caller went away or whose result stopped mattering (``StaleWork``)."""
        wanted = []
        for job in self._queue:
            if job.result.cancelled():
                continue
            if job.stale is not None and job.stale():
                job.result.set_exception(StaleWork())
                continue
            wanted.append(job)
        if len(wanted) < len(self._queue):
            heapq.heapify(wanted)
            self._queue[:] = wanted

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._executor.shutdown(wait=False, cancel_futures=True)


class WindowBatches:
    """The next job, and more of its priority while they are cheap to share one engine call.

    Partials always share. A final is decoded alone (beam search, its own call) unless the queue is
    behind: then finals are decoded quickly (``fast``), so all streams advance, and share too.
    """

    def __init__(self, max_batch: int = 1) -> None:
        self._max_batch = max_batch

    def take(
        self, queue: list[Job[AudioWindow, Transcript]], workers: int
    ) -> list[Job[AudioWindow, Transcript]]:
        behind = len(queue) > workers
        batch: list[Job[AudioWindow, Transcript]] = []
        while queue:
            job = heapq.heappop(queue)
            if batch and job.priority != batch[0].priority:
                heapq.heappush(queue, job)
                break
            batch.append(job)
            shared = job.priority == Priority.PARTIAL or behind
            if len(batch) >= (self._max_batch if shared else 1):
                break
        if behind:
            for job in batch:
                job.item = dataclasses.replace(job.item, fast=True)
        return batch

    def kind(self, batch: Sequence[Job[AudioWindow, Transcript]]) -> str:
        return "final" if batch[0].priority == Priority.FINAL else "partial"


class PiecePerStream:
    """Every waiting stream's oldest piece, in order; a stream's next piece waits for the next step."""

    def take(
        self, queue: list[Job[StreamPiece, StreamUpdate]], workers: int
    ) -> list[Job[StreamPiece, StreamUpdate]]:
        batch: list[Job[StreamPiece, StreamUpdate]] = []
        later: list[Job[StreamPiece, StreamUpdate]] = []
        while queue:
            job = heapq.heappop(queue)
            (later if any(job.item[0] is taken.item[0] for taken in batch) else batch).append(job)
        for job in later:
            heapq.heappush(queue, job)
        return batch

    def kind(self, batch: Sequence[Job[StreamPiece, StreamUpdate]]) -> str:
        return "step"


def window_scheduler(
    engine: Engine,
    workers: int = 1,
    max_batch: int = 1,
    overload_seconds: float = 3.0,
    observer: DecodeObserver | None = None,
) -> Scheduler[AudioWindow, Transcript]:
    """The scheduler of an engine's whole-window decodes (``Engine.transcribe``)."""
    rule = WindowBatches(max_batch)
    return Scheduler(engine.name, engine.transcribe, rule, workers, overload_seconds, observer)


def stream_scheduler(
    engine: StreamingEngine, overload_seconds: float = 3.0, observer: DecodeObserver | None = None
) -> Scheduler[StreamPiece, StreamUpdate]:
    """The scheduler of a streaming engine's steps: one worker, since steps are serialised."""
    return Scheduler(engine.name, engine.stream_step, PiecePerStream(), 1, overload_seconds, observer)
