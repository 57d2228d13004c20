"""Two real replicas behind Debian's nginx, configured by the shipped deploy/nginx template."""

from __future__ import annotations

import asyncio
import os
import shutil
import string
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest

from streamscribe.client import stream_audio, stream_url
from streamscribe.config import AccessSettings
from tests.conftest import DATA, RunningServer, free_port, normalize_text
from tests.server.test_observability import scrape

TEMPLATE = Path(__file__).parents[2] / "deploy" / "nginx" / "streamscribe.conf.template"
NGINX = shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None)


def render_config(prefix: Path, port: int, upstreams: list[str]) -> Path:
    """The shipped template, filled as the nginx image's envsubst would, inside a minimal main config."""
    site = string.Template(TEMPLATE.read_text()).safe_substitute(
        NGINX_PORT=f"127.0.0.1:{port}",
        STREAMSCRIBE_UPSTREAM_1=upstreams[0],
        STREAMSCRIBE_UPSTREAM_2=upstreams[1],
    )
    # The image's log folder (its access.log goes to the container's output), here the test's own.
    site = site.replace("/var/log/nginx/access.log", str(prefix / "logs" / "access.log"))
    (prefix / "logs").mkdir(parents=True, exist_ok=True)
    (prefix / "site.conf").write_text(site)
    user = "user root;\n" if os.geteuid() == 0 else ""  # workers must reach the pytest temp folder
    main = f"""{user}worker_processes 1;
pid {prefix}/nginx.pid;
error_log {prefix}/logs/error.log warn;
events {{ worker_connections 256; }}
http {{
    access_log {prefix}/logs/access.log;
    client_body_temp_path {prefix}/body;
    proxy_temp_path {prefix}/proxy;
    fastcgi_temp_path {prefix}/fastcgi;
    uwsgi_temp_path {prefix}/uwsgi;
    scgi_temp_path {prefix}/scgi;
    include {prefix}/site.conf;
}}
"""
    config = prefix / "nginx.conf"
    config.write_text(main)
    return config


@pytest.fixture
def start_nginx(tmp_path: Path) -> Iterator[Callable[[list[RunningServer]], str]]:
    """Runs nginx on the shipped template in front of two replicas; returns its host:port."""
    if NGINX is None:
        pytest.fail("nginx is not installed (scripts/test.sh installs it with apt-get)")
    processes: list[subprocess.Popen[bytes]] = []

    def start(replicas: list[RunningServer]) -> str:
        port = free_port()
        config = render_config(tmp_path / "nginx", port, [f"127.0.0.1:{r.port}" for r in replicas])
        check = subprocess.run(
            [NGINX, "-t", "-p", str(config.parent), "-c", str(config)], capture_output=True
        )
        assert check.returncode == 0, check.stderr.decode()
        process = subprocess.Popen(
            [NGINX, "-p", str(config.parent), "-c", str(config), "-g", "daemon off;"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        processes.append(process)
        deadline = time.monotonic() + 10
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200:
                    return f"127.0.0.1:{port}"
            except httpx.HTTPError:
                pass
            if process.poll() is not None or time.monotonic() > deadline:
                process.kill()
                raise RuntimeError(
                    f"nginx did not start: {process.stderr.read().decode() if process.stderr else ''}"
                )
            time.sleep(0.1)

    yield start
    for process in processes:
        process.terminate()
        process.wait(timeout=10)


@pytest.fixture
def behind_nginx(
    make_server: Callable[..., RunningServer], start_nginx: Callable[[list[RunningServer]], str]
) -> tuple[str, list[RunningServer]]:
    # As in deploy/: the replicas believe X-Forwarded-For from the proxy only.
    replicas = [make_server(trusted_proxies=["127.0.0.1"]), make_server(trusted_proxies=["127.0.0.1"])]
    return start_nginx(replicas), replicas


def test_streams_through_nginx_reach_both_replicas(
    behind_nginx: tuple[str, list[RunningServer]], clip: Callable[[str], np.ndarray]
) -> None:
    address, replicas = behind_nginx
    url = stream_url(f"ws://{address}", replicas[0].api_key)
    speech = clip("short.wav")

    async def two_at_once() -> list[str]:
        results = await asyncio.gather(
            stream_audio(url, speech, 16000, speed=2.0),
            stream_audio(url, speech, 16000, speed=2.0, headers={"Origin": f"http://{address}"}),
        )
        assert [r.close_code for r in results] == [1000, 1000]
        assert all(r.of_type("partial") or r.of_type("final") for r in results)
        return [r.full_transcript or "" for r in results]

    for transcript in asyncio.run(two_at_once()):
        assert "quarterly report" in normalize_text(transcript)
    served = [scrape(r)["streamscribe_streams_total{}"] for r in replicas]
    assert served == [1.0, 1.0], f"least_conn should spread two concurrent streams: {served}"


def test_file_api_and_readiness_through_nginx(behind_nginx: tuple[str, list[RunningServer]]) -> None:
    address, replicas = behind_nginx
    assert httpx.get(f"http://{address}/readyz").json()["status"] == "ready"
    assert httpx.get(f"http://{address}/metrics").status_code == 404  # only on the internal network
    client = openai.OpenAI(base_url=f"http://{address}/v1", api_key=replicas[0].api_key, max_retries=0)
    with (DATA / "short.wav").open("rb") as audio:
        result = client.audio.transcriptions.create(model="whisper-1", file=audio)
    assert "quarterly report" in normalize_text(result.text)


def test_access_log_holds_no_key(behind_nginx: tuple[str, list[RunningServer]], tmp_path: Path) -> None:
    """A key in ?token= (the WebSocket URL) must not reach nginx's access log (issue 16, item 6)."""
    address, replicas = behind_nginx
    key = replicas[0].api_key
    result = asyncio.run(stream_audio(stream_url(f"ws://{address}", key), np.zeros(1600, np.float32), 16000))
    assert result.close_code == 1000
    assert httpx.get(f"http://{address}/api/v1/audio/stream/limits?token={key}").status_code == 200
    log = (tmp_path / "nginx" / "logs" / "access.log").read_text()
    assert "/api/v1/audio/stream/transcribe" in log and "/api/v1/audio/stream/limits" in log
    assert key not in log and "token" not in log


def _from(local_address: str) -> httpx.Client:
    """A client whose connections come from ``local_address`` (any 127.x address is this machine)."""
    return httpx.Client(transport=httpx.HTTPTransport(local_address=local_address))


def test_replicas_see_each_clients_own_address(
    make_server: Callable[..., RunningServer], start_nginx: Callable[[list[RunningServer]], str]
) -> None:
    """Behind the shipped proxy the allowlist and the failed-key limit see each client's address, neither
    the proxy's (one client locking everyone out) nor one the client forged (issue 16, item 7)."""
    access = AccessSettings(ip_allowlist=["127.0.0.2", "127.0.0.3"], failed_auth_per_minute_per_ip=2)
    replicas = [make_server(trusted_proxies=["127.0.0.1"], access=access, preload=False) for _ in range(2)]
    limits = f"http://{start_nginx(replicas)}/api/v1/audio/stream/limits"
    key = {"X-API-KEY": replicas[0].api_key}
    with _from("127.0.0.2") as allowed, _from("127.0.0.3") as guesser, _from("127.0.0.4") as forger:
        assert allowed.get(limits, headers=key).status_code == 200
        forged = forger.get(limits, headers={**key, "X-Forwarded-For": "127.0.0.2"})
        assert forged.status_code == 403, "nginx replaces the client's X-Forwarded-For"
        statuses = [guesser.get(limits, headers={"X-API-KEY": "wrong-key-0123456789"}).status_code]
        while statuses[-1] != 429:  # each replica counts on its own here (no Redis): at most 2 x 2 + 1
            assert len(statuses) < 6, statuses
            statuses.append(guesser.get(limits, headers={"X-API-KEY": "wrong-key-0123456789"}).status_code)
        for _ in range(2):  # both replicas (least_conn): the guesser's lockout is not the other client's
            assert allowed.get(limits, headers=key).status_code == 200
