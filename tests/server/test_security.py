"""TLS (https/wss), CORS and the allowed-Origin policy for WebSocket upgrades, through real servers."""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import ssl
from collections.abc import Callable
from pathlib import Path

import httpx
import numpy as np
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from streamscribe.client import stream_audio
from tests.conftest import RunningServer, normalize_text


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
