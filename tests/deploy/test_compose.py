"""The shipped deploy files' settings: every variable is one the server reads, and two replicas started
with deploy/compose.yaml's environment share keys and quota counts (a real redis-server on loopback)."""

from __future__ import annotations

import asyncio
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from streamscribe.client import stream_audio
from streamscribe.config import Settings, unknown_variables
from streamscribe.server.auth import KeyHasher, create_key, load_pepper
from streamscribe.server.store import open_store
from tests.conftest import free_port
from tests.server.test_replicas import RedisServer, Replica, redis_server  # noqa: F401 (a fixture)
from tests.server.ws_helpers import limits, open_stream

DEPLOY = Path(__file__).parents[2] / "deploy"
ROOT = DEPLOY.parent
_INTERPOLATION = re.compile(r"\$\{(\w+)(?::([?-])([^}]*))?\}")


def interpolate(value: str, variables: Mapping[str, str]) -> str:
    """``${NAME}``, ``${NAME:-default}`` and ``${NAME:?error}`` as docker compose fills them."""

    def fill(match: re.Match[str]) -> str:
        name, kind, rest = match.groups()
        if variables.get(name):
            return variables[name]
        assert kind != "?", f"compose would refuse to start: {rest}"
        return rest if kind == "-" else ""

    return _INTERPOLATION.sub(fill, value)


def compose_environment(service: str, variables: Mapping[str, str]) -> dict[str, str]:
    """One service's environment in deploy/compose.yaml, rendered with ``variables``."""
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    environment: dict[str, Any] = compose["services"][service]["environment"]
    return {name: interpolate(str(value), variables) for name, value in environment.items()}


def kubernetes_environment() -> dict[str, str]:
    """The streamscribe container's variables in the Kubernetes manifest (secrets as placeholders)."""
    documents = list(yaml.safe_load_all((DEPLOY / "kubernetes" / "streamscribe.yaml").read_text()))
    [deployment] = [
        d for d in documents if d["kind"] == "Deployment" and d["metadata"]["name"] == "streamscribe"
    ]
    [container] = deployment["spec"]["template"]["spec"]["containers"]
    return {entry["name"]: str(entry.get("value", "from a secret")) for entry in container["env"]}


SECRETS = {"POSTGRES_PASSWORD": "compose-test-password", "STREAMSCRIBE_KEY_PEPPER": "p" * 64}


def test_deploy_files_name_only_real_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    """STREAMSCRIBE_REDIS_URL was silently ignored: every variable must be a setting (issue 16, item 10)."""
    dockerfile = dict.fromkeys(re.findall(r"\b(STREAMSCRIBE_\w+)=", (ROOT / "Dockerfile").read_text()), "")
    compose = compose_environment("streamscribe-1", SECRETS)
    kubernetes = kubernetes_environment()
    for environment in (dockerfile, compose, kubernetes):
        assert unknown_variables(environment) == []
    for environment in (compose, kubernetes):
        # Replicas share the key database, the live counters and the pepper; proxies are named.
        assert environment["STREAMSCRIBE_AUTH_MODE"] == "multi_user"
        assert environment["STREAMSCRIBE_DATABASE_URL"].startswith(("postgresql://", "from a secret"))
        assert environment["STREAMSCRIBE_KEY_PEPPER"]
        assert environment["STREAMSCRIBE_SHARED_STORE__REDIS_URL"] == "redis://redis:6379/0"
        assert environment["STREAMSCRIBE_TRUSTED_PROXIES"].startswith('["')
    assert compose == compose_environment("streamscribe-2", SECRETS)
    for name, value in compose.items():
        monkeypatch.setenv(name, value)
    settings = Settings.load()
    assert settings.allowed_hosts == ["localhost", "127.0.0.1"]
    assert settings.trusted_proxies == ["172.28.0.10"]


def test_two_replicas_with_the_compose_environment_share_quotas(
    tmp_path: Path,
    redis_server: RedisServer,  # noqa: F811
) -> None:
    """The compose file's environment, with this machine's Redis and a database both replicas share (a
    SQLite file: no PostgreSQL here), makes one user's streams and minutes count on both."""
    environment = compose_environment("streamscribe-1", SECRETS)
    database = f"sqlite:///{tmp_path / 'shared.db'}"
    environment["STREAMSCRIBE_DATABASE_URL"] = database
    environment["STREAMSCRIBE_SHARED_STORE__REDIS_URL"] = redis_server.url
    base = {**os.environ, "HF_HUB_OFFLINE": "1", "STREAMSCRIBE_CACHE_DIR": str(tmp_path / "cache")}
    replicas = [
        Replica(free_port(), {**base, **environment, "STREAMSCRIBE_PRELOAD": "false"}, tmp_path / f"r{i}.log")
        for i in range(2)
    ]
    for replica in replicas:
        replica.start()
    try:
        for replica in replicas:
            replica.wait_ready()
        settings = Settings(
            auth_mode="multi_user", database_url=database, key_pepper=SECRETS["STREAMSCRIBE_KEY_PEPPER"]
        )
        store = open_store(settings)
        try:
            key = create_key(store, KeyHasher(load_pepper(settings)), "alice", tier="standard").key
        finally:
            store.close()
        a, b = replicas

        async def scenario() -> None:
            held = await open_stream(a.ws_url(key))
            assert (await asyncio.to_thread(limits, b, key))["active_streams"] == 1
            await held.close()
            second = await stream_audio(b.ws_url(key), np.zeros(16000 * 3, np.float32), 16000, speed=0)
            assert second.close_code == 1000

        asyncio.run(scenario())
        used = [limits(replica, key)["used_today_minutes"] for replica in replicas]
        assert used[0] == used[1] and used[0] > 0.04, used
        assert not any("unknown setting" in replica.log() for replica in replicas)
    finally:
        for replica in replicas:
            replica.stop()
