"""streamscribe: a real-time speech-to-text server."""

__version__ = "0.1.0"
