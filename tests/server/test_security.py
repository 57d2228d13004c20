"""TLS (https/wss), CORS, the allowed-Origin and allowed-Host policies, proxy headers, failed-key limits
and connection deadlines, through real servers."""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import socket
import ssl
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import numpy as np
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from streamscribe.client import stream_audio
from streamscribe.config import AccessSettings
from tests.conftest import RunningServer, normalize_text

LIMITS_PATH = "/api/v1/audio/stream/limits"


def self_signed_certificate(folder: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 and localhost, and its key, written as PEM files."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = folder / "cert.pem", folder / "key.pem"
    cert_path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return cert_path, key_path


def test_tls_serves_https_and_wss(
    make_server: Callable[..., RunningServer], clip: Callable[[str], np.ndarray], tmp_path: Path
) -> None:
    cert, key = self_signed_certificate(tmp_path)
    server = make_server(ssl_certfile=cert, ssl_keyfile=key)
    trusted = ssl.create_default_context(cafile=str(cert))

    assert httpx.get(f"https://127.0.0.1:{server.port}/healthz", verify=trusted).status_code == 200
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"http://127.0.0.1:{server.port}/healthz")  # plain HTTP to a TLS port fails

    url = f"wss://127.0.0.1:{server.port}/api/v1/audio/stream/transcribe?token={server.api_key}"
    result = asyncio.run(stream_audio(url, clip("short.wav"), 16000, speed=0, ssl_context=trusted))
    assert result.close_code == 1000
    assert "quarterly report" in normalize_text(result.full_transcript or "")

    untrusted = ssl.create_default_context()
    with pytest.raises(ssl.SSLCertVerificationError):
        asyncio.run(stream_audio(url, clip("short.wav"), 16000, speed=0, ssl_context=untrusted))


async def _handshake_status(url: str, origin: str | None) -> int:
    headers = {"Origin": origin} if origin else {}
    try:
        async with connect(url, additional_headers=headers) as ws:
            await ws.close()
            return 101
    except InvalidStatus as refused:
        return refused.response.status_code


def test_websocket_from_a_foreign_origin_is_refused_with_403(server: RunningServer) -> None:
    url = server.ws_url()
    assert asyncio.run(_handshake_status(url, "https://evil.example")) == 403
    assert asyncio.run(_handshake_status(url, None)) == 101, "non-browser clients send no Origin"
    assert asyncio.run(_handshake_status(url, f"http://127.0.0.1:{server.port}")) == 101, "same origin"


def test_listed_origins_may_open_streams_and_call_the_api(make_server: Callable[..., RunningServer]) -> None:
    server = make_server(allowed_origins=["https://app.example"], preload=False)
    assert asyncio.run(_handshake_status(server.ws_url(), "https://app.example")) == 101
    assert asyncio.run(_handshake_status(server.ws_url(), "https://other.example")) == 403

    preflight = httpx.options(
        f"{server.base_url}/v1/audio/transcriptions",
        headers={
            "Origin": "https://app.example",
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization",
        },
    )
    assert preflight.status_code == 200
    assert preflight.headers["access-control-allow-origin"] == "https://app.example"
    foreign = httpx.get(f"{server.base_url}/healthz", headers={"Origin": "https://other.example"})
    assert "access-control-allow-origin" not in foreign.headers


def test_refused_origin_is_logged_and_counted(server: RunningServer, captured_logs: list[str]) -> None:
    asyncio.run(_handshake_status(server.ws_url(), "https://evil.example"))
    assert any("foreign origin refused" in line for line in captured_logs)
    assert (
        'streamscribe_errors_total{error_type="origin_refused"}'
        in httpx.get(f"{server.base_url}/metrics").text
    )


def test_serve_needs_both_tls_files(tmp_path: Path) -> None:
    from tests.test_cli import run_cli

    cert, _ = self_signed_certificate(tmp_path)
    done = run_cli("serve", "--port", "0", "--ssl-certfile", str(cert), timeout=30)
    assert done.returncode == 2 and "both --ssl-certfile and --ssl-keyfile" in done.stderr
    missing = run_cli(
        "serve", "--port", "0", "--ssl-certfile", str(cert), "--ssl-keyfile", str(tmp_path / "nope.pem")
    )
    assert missing.returncode == 2 and "TLS file not found" in missing.stderr


def _closed_by_server(sock: socket.socket, within: float) -> bool:
    """True when the server closes ``sock`` (EOF) within ``within`` seconds."""
    sock.settimeout(within)
    try:
        return sock.recv(1024) == b""
    except TimeoutError:
        return False
    except ConnectionResetError:
        return True


def test_half_sent_request_headers_are_timed_out(make_server: Callable[..., RunningServer]) -> None:
    """Slowloris: connections that never finish their request head are closed, so they cannot pile up
    until the process runs out of descriptors (issue 16, item 4)."""
    server = make_server(header_timeout_seconds=0.5, preload=False)
    address = ("127.0.0.1", server.port)
    with (
        socket.create_connection(address) as trickling,
        socket.create_connection(address) as silent,
        socket.create_connection(address) as keep_alive,
    ):
        started = time.monotonic()
        trickling.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        for _ in range(3):  # bytes keep coming, but the deadline counts from the first one
            time.sleep(0.1)
            trickling.sendall(b"X-A: b\r\n")
        # A complete request is answered; the half-sent next one on the same connection is cut too.
        keep_alive.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        keep_alive.settimeout(5)
        answer = b""
        while not answer.endswith(b'{"status":"ok"}'):
            answer += keep_alive.recv(1024)
        assert answer.startswith(b"HTTP/1.1 200")
        keep_alive.sendall(b"GET /healthz HTTP/1.1\r\n")
        assert _closed_by_server(trickling, 3) and _closed_by_server(silent, 3)
        assert _closed_by_server(keep_alive, 3)
        assert time.monotonic() - started >= 0.45
    assert httpx.get(f"{server.base_url}/healthz").status_code == 200


def test_oversized_request_head_is_refused_with_431(make_server: Callable[..., RunningServer]) -> None:
    server = make_server(preload=False)
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n" + b"X-Pad: " + b"a" * 70_000)
        sock.settimeout(5)
        assert sock.recv(1024).startswith(b"HTTP/1.1 431")


def test_concurrency_limit_answers_503(make_server: Callable[..., RunningServer]) -> None:
    server = make_server(limit_concurrency=2, preload=False)
    with (
        socket.create_connection(("127.0.0.1", server.port)),
        socket.create_connection(("127.0.0.1", server.port)),
    ):
        time.sleep(0.2)  # both accepted: the limit is reached
        assert httpx.get(f"{server.base_url}/healthz").status_code == 503
    deadline = time.monotonic() + 5
    while httpx.get(f"{server.base_url}/healthz").status_code != 200:
        assert time.monotonic() < deadline
        time.sleep(0.05)


def test_forwarded_for_is_ignored_unless_the_peer_is_a_trusted_proxy(
    make_server: Callable[..., RunningServer],
) -> None:
    """A local peer cannot pick the address the allowlist sees (issue 16, item 7)."""
    forged = {"X-API-KEY": "", "X-Forwarded-For": "10.1.2.3"}
    allow_10 = AccessSettings(ip_allowlist=["10.0.0.0/8"])
    default = make_server(access=allow_10, preload=False)
    forged["X-API-KEY"] = default.api_key
    assert httpx.get(default.base_url + LIMITS_PATH, headers=forged).status_code == 403

    behind_proxy = make_server(access=allow_10, trusted_proxies=["127.0.0.1"], preload=False)
    assert httpx.get(behind_proxy.base_url + LIMITS_PATH, headers=forged).status_code == 200


def test_failed_keys_are_rate_limited_per_address(make_server: Callable[..., RunningServer]) -> None:
    """Wrong keys on HTTP routes count per address; past the limit even the right key gets 429, so a
    guess cannot be told right from wrong (issue 16, item 7)."""
    server = make_server(access=AccessSettings(failed_auth_per_minute_per_ip=5), preload=False)
    wrong = {"Authorization": "Bearer wrong-key-0123456789"}
    while time.time() % 60 > 50:  # the limit counts per clock minute: all six attempts in one of them
        time.sleep(0.5)
    statuses = [httpx.get(server.base_url + LIMITS_PATH, headers=wrong).status_code for _ in range(6)]
    assert statuses == [401] * 5 + [429]
    right = httpx.get(server.base_url + LIMITS_PATH, headers={"X-API-KEY": server.api_key})
    assert right.status_code == 429
    assert right.json()["error_type"] == "rate_limited"  # /limits answers with the error frame's shape
    models = httpx.get(server.base_url + "/v1/models", headers={"X-API-KEY": server.api_key})
    assert models.status_code == 429 and models.json()["error"]["code"] == "rate_limited"  # OpenAI's shape


def _upgrade_status(port: int, host: str, origin: str | None) -> int:
    """The status line's code of a raw WebSocket upgrade with these Host and Origin headers."""
    lines = [
        "GET /api/v1/audio/stream/transcribe HTTP/1.1",
        f"Host: {host}",
        "Upgrade: websocket",
        "Connection: Upgrade",
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==",
        "Sec-WebSocket-Version: 13",
        *([f"Origin: {origin}"] if origin else []),
    ]
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
        sock.settimeout(5)
        return int(sock.recv(1024).split(b" ", 2)[1])


def test_dns_rebinding_is_refused_by_the_host_check(
    server: RunningServer, make_server: Callable[..., RunningServer]
) -> None:
    """A page on an attacker's name resolving to this server is same-origin with itself: only the Host
    header gives it away (issue 16, item 15)."""
    rebound = f"evil.example:{server.port}"
    assert _upgrade_status(server.port, rebound, f"http://{rebound}") == 400
    status = httpx.get(server.base_url + "/api/v1/audio/stream/status", headers={"Host": rebound})
    assert status.status_code == 400
    for name in ("127.0.0.1", "localhost"):
        own = f"{name}:{server.port}"
        assert _upgrade_status(server.port, own, f"http://{own}") == 101
    assert httpx.get(server.base_url + "/", headers={"Host": "[::1]"}).status_code == 200

    named = make_server(allowed_hosts=["stt.example.com"], preload=False)
    assert httpx.get(named.base_url + "/", headers={"Host": "stt.example.com"}).status_code == 200
    assert httpx.get(named.base_url + "/").status_code == 400
    # Probes and scrapers use the pod's address as Host.
    assert httpx.get(named.base_url + "/readyz").status_code == 200


def test_every_response_says_nosniff(server: RunningServer) -> None:
    for path in ("/", "/web/app.js", "/healthz", "/v1/models"):
        assert httpx.get(server.base_url + path).headers["x-content-type-options"] == "nosniff", path
