"""The page's protocol module, read as text (no browser): it must explain every close code the server
sends."""

from __future__ import annotations

import re
from pathlib import Path

from streamscribe.protocol import CloseCode

STREAM_CLIENT = Path(__file__).resolve().parents[2] / "src" / "streamscribe" / "web" / "stream-client.js"


def close_messages() -> dict[int, str]:
    """The entries of ``CLOSE_MESSAGES`` in stream-client.js: code -> message."""
    block = re.search(r"export const CLOSE_MESSAGES = \{(.*?)\n\};", STREAM_CLIENT.read_text(), re.DOTALL)
    assert block is not None, "CLOSE_MESSAGES not found in stream-client.js"
    return {
        int(code): text for code, text in re.findall(r'^\s*(\d+): "(.+)",$', block.group(1), re.MULTILINE)
    }


def test_the_page_explains_every_close_code() -> None:
    messages = close_messages()
    missing = sorted(code.value for code in CloseCode if not messages.get(code.value))
    assert not missing, f"CLOSE_MESSAGES in stream-client.js has no message for {missing}"
