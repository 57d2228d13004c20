"""Health, readiness, Prometheus metrics and structured logs of a real server."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable

import httpx
import numpy as np
from prometheus_client.parser import text_string_to_metric_families

from streamscribe.server.logs import JsonFormatter, new_request_id
from tests.conftest import RunningServer
from tests.server.test_stream_errors import STOP, audio, config, exchange


def scrape(server: RunningServer) -> dict[str, float]:
    """Every sample of /metrics as {'name{label="value",...}': value}."""
    response = httpx.get(f"{server.base_url}/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    samples: dict[str, float] = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
            samples[f"{sample.name}{{{labels}}}"] = sample.value
    return samples


def test_healthz_and_readyz(server: RunningServer, make_server: Callable[..., RunningServer]) -> None:
    assert httpx.get(f"{server.base_url}/healthz").json() == {"status": "ok"}
    ready = httpx.get(f"{server.base_url}/readyz")
    assert ready.status_code == 200
    assert ready.json()["models_loaded"] is True and "whisper-tiny.en" in ready.json()["loaded"]
    lazy = make_server(preload=False)
    assert httpx.get(f"{lazy.base_url}/readyz").json()["loaded"] == []


def test_metrics_can_require_a_key(make_server: Callable[..., RunningServer]) -> None:
    server = make_server(preload=False, metrics_require_key=True)
    assert httpx.get(f"{server.base_url}/metrics").status_code == 401
    keyed = httpx.get(f"{server.base_url}/metrics", headers={"Authorization": f"Bearer {server.api_key}"})
    assert keyed.status_code == 200 and "streamscribe_active_streams" in keyed.text


def test_metrics_count_streams_audio_decodes_and_errors(
    make_server: Callable[..., RunningServer], clip: Callable[[str], np.ndarray]
) -> None:
    server = make_server()
    before = scrape(server)
    assert before["streamscribe_active_streams{}"] == 0
    assert 'streamscribe_quota_rejections_total{reason="daily_minutes"}' not in before  # defined, unused

    server.stream(clip("short.wav"), speed=0)
    exchange(server.ws_url(), config(), json.dumps({"type": "audio", "data": "!!"}), STOP)
    exchange(server.ws_url(token="wrong"), config())
    after = scrape(server)

    assert after["streamscribe_active_streams{}"] == 0
    assert after["streamscribe_streams_total{}"] == 2, "the unauthenticated stream is not counted"
    assert 3.0 < after['streamscribe_audio_seconds_total{source="stream"}'] < 4.0
    assert after['streamscribe_decode_seconds_count{engine="whisper-tiny.en",kind="final"}'] >= 1
    assert after['streamscribe_decode_batch_size_count{engine="whisper-tiny.en"}'] >= 1
    assert after['streamscribe_emission_delay_seconds_count{kind="final"}'] >= 1
    assert after['streamscribe_errors_total{error_type="invalid_audio"}'] == 1
    assert after['streamscribe_errors_total{error_type="auth_failed"}'] == 1
    assert after['streamscribe_http_requests_total{route="/metrics",status="200"}'] >= 1


def test_quota_rejections_counter_is_exported(server: RunningServer) -> None:
    text = httpx.get(f"{server.base_url}/metrics").text
    assert "# TYPE streamscribe_quota_rejections_total counter" in text
    for name in ("active_streams", "audio_seconds", "decode_seconds", "decode_batch_size", "emission_delay"):
        assert f"streamscribe_{name}" in text


def test_active_streams_gauge_counts_open_streams(server: RunningServer) -> None:
    import asyncio

    from websockets.asyncio.client import connect

    async def scenario() -> tuple[float, float]:
        async with connect(server.ws_url()) as ws:
            await ws.send(config())
            await ws.recv()
            during = scrape(server)["streamscribe_active_streams{}"]
            await ws.send(audio(np.zeros(1600, dtype=np.float32)))
            await ws.send(STOP)
            async for _ in ws:
                pass
        await asyncio.sleep(0.2)
        return during, scrape(server)["streamscribe_active_streams{}"]

    during, after = asyncio.run(scenario())
    assert during >= 1 and after == during - 1


def test_http_requests_get_an_id_and_one_json_log_line(
    server: RunningServer, captured_logs: list[str]
) -> None:
    response = httpx.get(f"{server.base_url}/v1/models?token={server.api_key}")
    captured_logs[:] = [line for line in captured_logs if not line.startswith("httpx:")]  # the client's
    request_id = response.headers["x-request-id"]
    assert request_id.startswith("http-")
    lines = [line for line in captured_logs if line.startswith("streamscribe.http:")]
    assert any("GET /v1/models 200" in line for line in lines)
    assert not [line for line in captured_logs if server.api_key in line]


def test_json_formatter_writes_one_object_per_line_with_the_request_id() -> None:
    record = logging.LogRecord("streamscribe.test", logging.INFO, __file__, 1, "hello %s", ("world",), None)
    record.event = "greeting"
    current = new_request_id("ws")
    line = JsonFormatter().format(record)
    assert "\n" not in line
    parsed = json.loads(line)
    assert parsed["message"] == "hello world" and parsed["event"] == "greeting"
    assert parsed["request_id"] == current and parsed["level"] == "info"


def test_readyz_is_503_while_draining(make_server: Callable[..., RunningServer]) -> None:
    server = make_server(preload=False)
    server.app.state.runtime.draining.set()
    response = httpx.get(f"{server.base_url}/readyz")
    assert response.status_code == 503 and response.json()["draining"] is True
    assert httpx.get(f"{server.base_url}/healthz").status_code == 200, "still alive, only not ready"
