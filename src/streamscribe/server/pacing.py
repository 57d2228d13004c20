"""How fast one stream may send: seconds of audio, frames and bytes per second, each a token bucket.

A stream that sends faster is not cut off: the connection reads its next frame only once it is back
within its budget, so the excess waits in the client's socket (TCP backpressure) and costs this server
nothing. Without this, one client's audio work (decoding, resampling, the VAD) could take the CPUs from
every other stream. Frames are counted as inflated: with WebSocket compression, 16 s of silence (1 MiB of
base64) arrives as about 1 KB and is inflated before the app sees it, which is why compression is off
unless ``streaming.permessage_deflate`` is set.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from streamscribe.config import StreamingSettings


class TokenBucket:
    """Up to ``capacity`` to spend at once, refilled at ``rate`` a second. Spending past empty is allowed
    and leaves a debt: ``wait`` is how long until it is paid off. ``rate`` 0: no limit."""

    def __init__(self, rate: float, capacity: float, clock: Callable[[], float] = time.monotonic) -> None:
        self._rate = rate
        self._capacity = capacity
        self._clock = clock
        self._level = capacity
        self._at = clock()

    def spend(self, amount: float) -> None:
        if self._rate > 0:
            self._refill()
            self._level -= amount

    def wait(self) -> float:
        """Seconds until the level is back to zero (0 when it is not below)."""
        if self._rate <= 0:
            return 0.0
        self._refill()
        return max(0.0, -self._level / self._rate)

    def _refill(self) -> None:
        now = self._clock()
        self._level = min(self._capacity, self._level + (now - self._at) * self._rate)
        self._at = now


class StreamPacing:
    """One connection's budgets, from the streaming settings: audio seconds (a burst, then
    ``max_audio_speed`` times real time), frames of any kind, and bytes of frames as received."""

    def __init__(self, settings: StreamingSettings, clock: Callable[[], float] = time.monotonic) -> None:
        self._audio = TokenBucket(settings.max_audio_speed, settings.audio_burst_seconds, clock)
        messages = settings.max_messages_per_second
        self._messages = TokenBucket(messages, messages, clock)
        per_second = settings.max_bytes_per_second
        self._bytes = TokenBucket(per_second, per_second, clock)

    def received(self, size: int) -> None:
        """A frame of ``size`` bytes (as inflated, whatever it holds) was read."""
        self._messages.spend(1)
        self._bytes.spend(size)

    def audio(self, seconds: float) -> None:
        """A frame held ``seconds`` of audio."""
        self._audio.spend(seconds)

    def wait(self) -> float:
        """Seconds to wait before reading the next frame."""
        return max(self._audio.wait(), self._messages.wait(), self._bytes.wait())
