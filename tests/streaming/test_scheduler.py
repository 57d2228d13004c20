"""The batching loop: finals jump the queue, engine errors reach the caller, the loop never blocks, and a
streaming engine's step takes one piece of each waiting stream."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Sequence
from typing import cast

import numpy as np
import pytest

from streamscribe.engines.base import AudioWindow, EngineStream, StreamUpdate, Transcript
from streamscribe.streaming.scheduler import Priority, StaleWork, stream_scheduler, window_scheduler
from tests.streaming.fakes import ScriptedEngine


def window(seconds: float, final: bool) -> AudioWindow:
    return AudioWindow(np.zeros(int(seconds * 16000), np.float32), "en", final=final)


async def test_finals_run_before_partials_queued_earlier() -> None:
    engine = ScriptedEngine()
    scheduler = window_scheduler(engine)
    engine.gate.clear()
    first = asyncio.create_task(scheduler.submit(window(1, False), Priority.PARTIAL))
    await asyncio.sleep(0.05)  # the first partial is now inside the engine
    partial = asyncio.create_task(scheduler.submit(window(2, False), Priority.PARTIAL))
    final = asyncio.create_task(scheduler.submit(window(3, True), Priority.FINAL))
    await asyncio.sleep(0.05)
    engine.gate.set()
    await asyncio.gather(first, partial, final)
    assert [len(w.samples) // 16000 for w in engine.windows] == [1, 3, 2]
    await scheduler.close()


async def test_event_loop_keeps_running_during_a_decode() -> None:
    engine = ScriptedEngine()
    scheduler = window_scheduler(engine)
    engine.gate.clear()
    decode = asyncio.create_task(scheduler.submit(window(1, True), Priority.FINAL))
    ticks = 0
    for _ in range(5):
        await asyncio.sleep(0.01)
        ticks += 1
    assert ticks == 5 and not decode.done()
    engine.gate.set()
    assert (await decode).text == "w0"
    await scheduler.close()


async def test_engine_errors_reach_the_caller() -> None:
    class Failing(ScriptedEngine):
        def transcribe(self, batch):  # type: ignore[no-untyped-def]
            raise MemoryError("no room")

    scheduler = window_scheduler(Failing())
    try:
        await scheduler.submit(window(1, True), Priority.FINAL)
    except MemoryError as exc:
        assert "no room" in str(exc)
    else:
        raise AssertionError("expected the engine's error")
    await scheduler.close()


async def test_when_behind_finals_are_decoded_fast_and_overload_is_reported() -> None:
    engine = ScriptedEngine()
    scheduler = window_scheduler(engine, overload_seconds=0.1)
    engine.gate.clear()
    jobs = [asyncio.create_task(scheduler.submit(window(1, True), Priority.FINAL)) for _ in range(3)]
    await asyncio.sleep(0.3)
    assert scheduler.overloaded
    engine.gate.set()
    await asyncio.gather(*jobs)
    assert not scheduler.overloaded
    # The first final was taken while two more waited: decoded fast; the last one had the engine alone.
    assert [w.fast for w in engine.windows] == [True, True, False]
    await scheduler.close()


async def test_a_partial_that_went_stale_in_the_queue_is_dropped_unstarted() -> None:
    engine = ScriptedEngine()
    scheduler = window_scheduler(engine)
    engine.gate.clear()
    busy = asyncio.create_task(scheduler.submit(window(1, True), Priority.FINAL))
    await asyncio.sleep(0.05)
    utterance_open = True
    partial = asyncio.create_task(
        scheduler.submit(window(2, False), Priority.PARTIAL, lambda: not utterance_open)
    )
    await asyncio.sleep(0.05)
    utterance_open = False  # the utterance closed while its partial waited
    engine.gate.set()
    await busy
    with pytest.raises(StaleWork):
        await partial
    assert [len(w.samples) // 16000 for w in engine.windows] == [1]
    await scheduler.close()


async def test_pressure_counts_queued_jobs_per_worker() -> None:
    engine = ScriptedEngine()
    scheduler = window_scheduler(engine, workers=2)
    assert scheduler.pressure == 1.0
    engine.gate.clear()
    jobs = [asyncio.create_task(scheduler.submit(window(1, False), Priority.PARTIAL)) for _ in range(8)]
    await asyncio.sleep(0.1)
    assert scheduler.pressure == 3.0  # two running, six waiting for two workers
    engine.gate.set()
    await asyncio.gather(*jobs)
    await scheduler.close()


async def test_waiting_partials_share_an_engine_call() -> None:
    engine = ScriptedEngine()
    scheduler = window_scheduler(engine, workers=1, max_batch=4)
    engine.gate.clear()
    busy = asyncio.create_task(scheduler.submit(window(1, True), Priority.FINAL))
    await asyncio.sleep(0.05)
    partials = [asyncio.create_task(scheduler.submit(window(2, False), Priority.PARTIAL)) for _ in range(5)]
    await asyncio.sleep(0.05)
    engine.gate.set()
    await asyncio.gather(busy, *partials)
    assert engine.batch_sizes == [1, 4, 1]
    await scheduler.close()


async def test_finals_share_a_call_only_when_the_queue_is_behind() -> None:
    engine = ScriptedEngine()
    scheduler = window_scheduler(engine, workers=2, max_batch=4)

    async def queue_finals_behind_two_busy_workers(count: int) -> None:
        engine.gate.clear()
        busy = [asyncio.create_task(scheduler.submit(window(1, True), Priority.FINAL)) for _ in range(2)]
        await asyncio.sleep(0.05)
        finals = [
            asyncio.create_task(scheduler.submit(window(3, True), Priority.FINAL)) for _ in range(count)
        ]
        await asyncio.sleep(0.05)
        engine.gate.set()
        await asyncio.gather(*busy, *finals)

    await queue_finals_behind_two_busy_workers(2)
    assert engine.batch_sizes == [1, 1, 1, 1]  # two finals for two workers: each its own beam search
    assert not any(w.fast for w in engine.windows)

    await queue_finals_behind_two_busy_workers(5)
    assert sorted(engine.batch_sizes[4:]) == [1, 1, 1, 4]  # the worker threads finish in any order
    queued = [w for w in engine.windows[4:] if len(w.samples) == 3 * 16000]
    assert sorted(w.fast for w in queued) == [False, True, True, True, True]
    await scheduler.close()


async def test_a_streaming_step_takes_one_piece_of_each_waiting_stream() -> None:
    """A streaming engine sees each stream at most once per step; a stream's next piece waits its turn."""
    steps: list[list[tuple[str, int]]] = []
    gate = threading.Event()

    class Steps:
        name = "steps"

        def stream_step(self, pieces: Sequence[tuple[EngineStream, np.ndarray]]) -> list[StreamUpdate]:
            gate.wait(timeout=30)
            steps.append([(str(stream), len(samples)) for stream, samples in pieces])
            return [StreamUpdate("", str(len(samples))) for _, samples in pieces]

    scheduler = stream_scheduler(Steps())  # type: ignore[arg-type]
    a, b = cast(EngineStream, "a"), cast(EngineStream, "b")
    busy = asyncio.create_task(scheduler.submit((b, np.zeros(1, np.float32))))
    await asyncio.sleep(0.05)  # the first step is now inside the engine
    waiting = [
        asyncio.create_task(scheduler.submit((stream, np.zeros(size, np.float32))))
        for stream, size in ((a, 2), (a, 3), (b, 4))
    ]
    await asyncio.sleep(0.05)
    gate.set()
    await busy
    assert [u.partial_text for u in await asyncio.gather(*waiting)] == ["2", "3", "4"]
    assert steps == [[("b", 1)], [("a", 2), ("b", 4)], [("a", 3)]]
    await scheduler.close()


async def test_a_failed_batch_is_retried_item_by_item_and_only_the_bad_item_fails() -> None:
    class OneBadWindow(ScriptedEngine):
        def transcribe(self, batch: Sequence[AudioWindow]) -> list[Transcript]:
            if any(len(w.samples) == 2 * 16000 for w in batch):
                self.batch_sizes.append(-len(batch))
                raise RuntimeError("bad window")
            return super().transcribe(batch)

    engine = OneBadWindow()
    scheduler = window_scheduler(engine, workers=1, max_batch=4)
    engine.gate.clear()
    busy = asyncio.create_task(scheduler.submit(window(1, True), Priority.FINAL))
    await asyncio.sleep(0.05)
    partials = [asyncio.create_task(scheduler.submit(window(s, False), Priority.PARTIAL)) for s in (1, 2, 3)]
    await asyncio.sleep(0.05)
    engine.gate.set()
    await busy
    outcomes = await asyncio.gather(*partials, return_exceptions=True)
    texts = [o.text if isinstance(o, Transcript) else str(o) for o in outcomes]
    assert texts == ["w0", "bad window", "w0 w1 w2"]
    assert engine.batch_sizes == [1, -3, 1, -1, 1], "the shared call failed; each item then ran alone"
    await scheduler.close()
