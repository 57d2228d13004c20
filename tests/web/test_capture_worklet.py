"""The capture AudioWorklet's resampler, run by Chromium's own audio engine in an OfflineAudioContext."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from playwright.sync_api import Page

# Renders one second of two tones through the worklet at `rate` and returns what it posted, and how.
RENDER_THROUGH_WORKLET = """async ([rate, lowHz, highHz]) => {
  const context = new OfflineAudioContext(1, rate, rate);
  await context.audioWorklet.addModule("web/capture-worklet.js");
  const node = new AudioWorkletNode(context, "streamscribe-capture",
    {processorOptions: {targetRate: 16000, frameMs: 100}});
  const frames = [];
  node.port.onmessage = (event) => { if (event.data.type === "frame") frames.push(event.data.samples); };
  for (const hz of [lowHz, highHz]) {
    const tone = new OscillatorNode(context, {frequency: hz});
    const gain = new GainNode(context, {gain: 0.4});
    tone.connect(gain).connect(node);
    tone.start();
  }
  node.connect(context.destination);
  await context.startRendering();
  await new Promise((resolve) => setTimeout(resolve, 200));  // messages from the audio thread
  return {lengths: frames.map((f) => f.length), samples: frames.flatMap((f) => Array.from(f))};
}"""


def tone_level(samples: np.ndarray, rate: int, hz: float) -> float:
    """Amplitude of the ``hz`` component (Hann-windowed DFT peak near it)."""
    window = np.hanning(len(samples))
    spectrum = np.abs(np.fft.rfft(samples * window)) / (window.sum() / 2)
    bin_hz = rate / len(samples)
    centre = round(hz / bin_hz)
    return float(spectrum[max(0, centre - 3) : centre + 4].max())


@pytest.mark.parametrize("device_rate", [48000, 44100])
def test_worklet_posts_16_khz_frames_and_filters_what_would_alias(
    page: Page, server: Any, device_rate: int
) -> None:
    page.goto(server.base_url + "/")
    # A 1 kHz tone passes; 9.5 kHz would fold onto 6.5 kHz at 16 kHz unless filtered out first.
    result = page.evaluate(RENDER_THROUGH_WORKLET, [device_rate, 1000, 9500])
    lengths = result["lengths"]
    assert lengths[:-1] == [1600] * (len(lengths) - 1)  # 100 ms frames
    samples = np.asarray(result["samples"], dtype=np.float64)
    assert abs(len(samples) - 16000) <= 1600  # one second of audio, at 16 kHz

    steady = samples[800:]  # past the filter's start-up
    passed = tone_level(steady, 16000, 1000)
    aliased = tone_level(steady, 16000, 16000 - 9500)
    assert passed == pytest.approx(0.4, rel=0.05)
    assert aliased < 0.4 * 10 ** (-60 / 20), f"alias only {20 * np.log10(aliased / 0.4):.1f} dB down"
