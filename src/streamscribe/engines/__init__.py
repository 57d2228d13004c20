"""Speech engines: one module per model family, all behind the Engine protocol in base.py."""
