"""Speech engines: one module per model family, all behind the Engine protocol in base.py."""

SAMPLE_RATE = 16000
"""The rate every engine here and the VAD take (speech models are trained at 16 kHz), and so the rate a
client sends unless it says otherwise."""
