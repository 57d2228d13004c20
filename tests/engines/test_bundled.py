"""Bundled weights: split models are joined once, checked, and reused."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from streamscribe.engines.base import EngineUnavailable
from streamscribe.engines.bundled import BUNDLED_WHISPER_MODELS, assemble_split_model


def make_parts(tmp_path: Path) -> tuple[list[Path], Path, str]:
    source = tmp_path / "pkg"
    source.mkdir()
    (source / "model.bin.part1").write_bytes(b"a" * 1000)
    (source / "model.bin.part2").write_bytes(b"b" * 500)
    (source / "config.json").write_text("{}")
    digest = hashlib.sha256(b"a" * 1000 + b"b" * 500).hexdigest()
    return [source / "model.bin.part1", source / "model.bin.part2"], source, digest


def test_parts_are_joined_once_and_reused(tmp_path: Path) -> None:
    parts, source, digest = make_parts(tmp_path)
    target = assemble_split_model(parts, source, tmp_path / "cache" / "m", digest)
    assert (target / "model.bin").read_bytes() == b"a" * 1000 + b"b" * 500
    assert (target / "config.json").is_file() and not (target / "model.bin.part1").exists()
    stamp = (target / "model.bin").stat().st_mtime_ns
    parts[0].unlink()  # a second call must not need the parts again
    assert assemble_split_model(parts, source, target, digest) == target
    assert (target / "model.bin").stat().st_mtime_ns == stamp


def test_checksum_mismatch_is_a_clear_error(tmp_path: Path) -> None:
    parts, source, _ = make_parts(tmp_path)
    with pytest.raises(EngineUnavailable, match="checksum mismatch"):
        assemble_split_model(parts, source, tmp_path / "cache" / "m", "0" * 64)
    assert not (tmp_path / "cache" / "m").exists()


def test_missing_part_is_a_clear_error(tmp_path: Path) -> None:
    parts, source, digest = make_parts(tmp_path)
    parts[1].unlink()
    with pytest.raises(EngineUnavailable, match="part missing"):
        assemble_split_model(parts, source, tmp_path / "cache" / "m", digest)


def test_bundled_models_are_installed_and_located(tmp_path: Path) -> None:
    tiny = BUNDLED_WHISPER_MODELS["tiny.en"].locate(tmp_path)
    assert (tiny / "model.bin").is_file() and (tiny / "tokenizer.json").is_file()
    assert BUNDLED_WHISPER_MODELS["tiny.en"].english_only
    assert not BUNDLED_WHISPER_MODELS["base"].english_only
