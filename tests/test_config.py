"""Settings: environment variables, the TOML file, and their precedence."""

from __future__ import annotations

from pathlib import Path

import pytest

from streamscribe.config import Settings, unknown_variables


def test_environment_and_nested_groups(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STREAMSCRIBE_PORT", "9001")
    monkeypatch.setenv("STREAMSCRIBE_VAD__MIN_SILENCE_MS", "400")
    settings = Settings.load()
    assert settings.port == 9001 and settings.vad.min_silence_ms == 400


def test_config_file_is_below_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("STREAMSCRIBE_CONFIG_FILE", raising=False)
    path = tmp_path / "streamscribe.toml"
    path.write_text('port = 7000\nhost = "0.0.0.0"\n[whisper]\nbeam_size = 2\n')
    monkeypatch.setenv("STREAMSCRIBE_PORT", "7100")
    settings = Settings.load(path, host=None)
    assert (settings.port, settings.host, settings.whisper.beam_size) == (7100, "0.0.0.0", 2)
    assert Settings.load(path, port=7200).port == 7200


def test_missing_config_file_is_reported(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("STREAMSCRIBE_CONFIG_FILE", raising=False)
    with pytest.raises(FileNotFoundError, match="config file not found"):
        Settings.load(tmp_path / "missing.toml")


def test_invalid_values_are_rejected(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STREAMSCRIBE_VAD__THRESHOLD", "2")
    with pytest.raises(ValueError, match="threshold"):
        Settings.load()


def test_unknown_variables_are_found_with_the_setting_meant() -> None:
    environ = {
        "STREAMSCRIBE_REDIS_URL": "redis://redis:6379/0",
        "STREAMSCRIBE_SHARED_STORE__REDIS_URL": "redis://redis:6379/0",
        "STREAMSCRIBE_ACCESS": "{}",  # a whole group as JSON
        "streamscribe_port": "1",  # the settings read names in any case
        "STREAMSCRIBE_CONFIG_FILE": "x.toml",
        "STREAMSCRIBE_MAX_STRAEMS": "4",
        "OTHER": "1",
    }
    assert unknown_variables(environ) == [
        ("STREAMSCRIBE_MAX_STRAEMS", "STREAMSCRIBE_MAX_STREAMS"),
        ("STREAMSCRIBE_REDIS_URL", "STREAMSCRIBE_SHARED_STORE__REDIS_URL"),
    ]
