"""Turning a live, growing audio stream into stable partial and final text."""
