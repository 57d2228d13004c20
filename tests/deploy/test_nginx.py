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
def behind_nginx(
    make_server: Callable[..., RunningServer], tmp_path: Path
) -> Iterator[tuple[str, list[RunningServer]]]:
    if NGINX is None:
        pytest.fail("nginx is not installed (scripts/test.sh installs it with apt-get)")
    replicas = [make_server(), make_server()]
    port = free_port()
    config = render_config(tmp_path / "nginx", port, [f"127.0.0.1:{r.port}" for r in replicas])
    check = subprocess.run([NGINX, "-t", "-p", str(config.parent), "-c", str(config)], capture_output=True)
    assert check.returncode == 0, check.stderr.decode()
    process = subprocess.Popen(
        [NGINX, "-p", str(config.parent), "-c", str(config), "-g", "daemon off;"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + 10
    while True:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            raise RuntimeError(
                f"nginx did not start: {process.stderr.read().decode() if process.stderr else ''}"
            )
        time.sleep(0.1)
    yield f"127.0.0.1:{port}", replicas
    process.terminate()
    process.wait(timeout=10)


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
    client = openai.OpenAI(base_url=f"http://{address}/v1", api_key=replicas[0].api_key, max_retries=0)
    with (DATA / "short.wav").open("rb") as audio:
        result = client.audio.transcriptions.create(model="whisper-1", file=audio)
    assert "quarterly report" in normalize_text(result.text)
