"""Audio files as users send them, made in the test from the clips in tests/data: any rate, stereo,
every container PyAV writes, and WAV headers that lie."""

from __future__ import annotations

import io
import struct
import wave

import av
import numpy as np
import soxr

# (container, codec, rate) for every format the file API promises (SUPPORTED_FORMATS), at 44.1 and 48 kHz.
# Opus codes only 48 kHz, so Ogg and WebM at 44.1 kHz carry Vorbis, as browsers and encoders then do.
FORMATS = [
    ("wav", "pcm_s16le", 44100),
    ("wav", "pcm_s16le", 48000),
    ("flac", "flac", 44100),
    ("flac", "flac", 48000),
    ("mp3", "libmp3lame", 44100),
    ("mp3", "libmp3lame", 48000),
    ("ogg", "vorbis", 44100),
    ("ogg", "libopus", 48000),
    ("ipod", "aac", 44100),  # .m4a
    ("ipod", "aac", 48000),
    ("webm", "vorbis", 44100),
    ("webm", "libopus", 48000),
]
SUFFIX = {"ipod": "m4a"}


def file_name(container: str) -> str:
    return f"clip.{SUFFIX.get(container, container)}"


def encode(samples: np.ndarray, container: str, codec: str, rate: int, channels: int = 2) -> bytes:
    """Mono 16 kHz float samples, resampled to ``rate`` and encoded with PyAV (no ffmpeg binary). In
    stereo the right channel is the left at 80 %, so a downmix is the speech, not silence or a sum."""
    layout = "stereo" if channels == 2 else "mono"
    mono = np.clip(soxr.resample(samples, 16000, rate) if rate != 16000 else samples, -1, 1)
    pcm = (np.stack([mono, 0.8 * mono][:channels], axis=1) * 32767).astype(np.int16)
    out = io.BytesIO()
    with av.open(out, mode="w", format=container) as output:
        stream = output.add_stream(codec, rate=rate)
        stream.layout = layout
        if codec == "vorbis":
            stream.codec_context.options = {"strict": "experimental"}  # FFmpeg's own Vorbis encoder
        convert = av.AudioResampler(format=stream.codec_context.format.name, layout=layout, rate=rate)
        for offset in range(0, len(pcm), 1024):
            block = np.ascontiguousarray(pcm[offset : offset + 1024]).reshape(1, -1)  # packed s16
            frame = av.AudioFrame.from_ndarray(block, format="s16", layout=layout)
            frame.sample_rate = rate
            for converted in convert.resample(frame):
                output.mux(stream.encode(converted))
        for converted in convert.resample(None):
            output.mux(stream.encode(converted))
        output.mux(stream.encode(None))
    return out.getvalue()


def wav_bytes(samples: np.ndarray, rate: int = 16000, channels: int = 1) -> bytes:
    """A 16-bit PCM WAV of ``samples`` (interleaved when ``channels`` > 1)."""
    out = io.BytesIO()
    with wave.open(out, "wb") as wav:
        wav.setnchannels(channels)
        wav.setsampwidth(2)
        wav.setframerate(rate)
        wav.writeframes((np.clip(samples, -1, 1) * 32767).astype("<i2").tobytes())
    return out.getvalue()


def with_data_size(wav: bytes, data_bytes: int) -> bytes:
    """The same WAV whose header claims a data chunk of ``data_bytes`` (and a RIFF size to match)."""
    assert wav[36:40] == b"data", "a canonical 44-byte header"
    riff = min(data_bytes + 36, 0xFFFFFFFF)
    return wav[:4] + struct.pack("<I", riff) + wav[8:40] + struct.pack("<I", data_bytes) + wav[44:]
