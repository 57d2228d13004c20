"""The command line: ``serve``, ``stream`` (test client), ``transcribe`` (a file), ``models`` and ``keys``
(multi-user API keys)."""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import sys
import time
import unicodedata
from pathlib import Path
from typing import Any

import numpy as np


def _settings_epilog() -> str:
    from streamscribe.config import describe_settings

    lines = ["settings (environment variables; also keys of the --config TOML file):"]
    for variable, default, description in describe_settings():
        lines.append(f"  {variable}  [default: {default}]\n      {description}")
    return "\n".join(lines)


def _address_list(value: str) -> list[str]:
    """``10.0.0.0/8,127.0.0.1`` as a list, each entry checked as an address or network (or ``*``)."""
    import ipaddress

    entries = [entry.strip() for entry in value.split(",") if entry.strip()]
    for entry in entries:
        if entry != "*":
            try:
                ipaddress.ip_network(entry, strict=False)
            except ValueError:
                raise argparse.ArgumentTypeError(f"not an address or CIDR range: {entry}") from None
    return entries


def _serve(args: argparse.Namespace) -> int:
    import logging

    from streamscribe.config import Settings, unknown_variables
    from streamscribe.engines.registry import EngineRegistry
    from streamscribe.server.app import STREAM_PATH, create_app
    from streamscribe.server.auth import MIN_API_KEY_LENGTH, generate_api_key
    from streamscribe.server.logs import configure_logging
    from streamscribe.server.memory import limit_arenas
    from streamscribe.server.serving import GracefulServer, uvicorn_config

    limit_arenas()  # before any engine's or decoder's thread starts
    try:
        settings = Settings.load(
            args.config,
            host=args.host,
            port=args.port,
            log_level=args.log_level,
            ssl_certfile=args.ssl_certfile,
            ssl_keyfile=args.ssl_keyfile,
            trusted_proxies=args.trusted_proxies,
            wyoming_port=args.wyoming_port,
            wyoming_host=args.wyoming_host,
        )
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    configured_key = settings.api_key.get_secret_value() if settings.api_key else None
    single_user = settings.auth_mode == "single_user"
    if single_user and configured_key is not None and len(configured_key) < MIN_API_KEY_LENGTH:
        print(
            f"error: STREAMSCRIBE_API_KEY is too weak: {len(configured_key)} characters, at least "
            f"{MIN_API_KEY_LENGTH} are needed; make one with: python -c "
            '"import secrets; print(secrets.token_urlsafe(32))"',
            file=sys.stderr,
        )
        return 2
    if bool(settings.ssl_certfile) != bool(settings.ssl_keyfile):
        print("error: TLS needs both --ssl-certfile and --ssl-keyfile", file=sys.stderr)
        return 2
    for path in (settings.ssl_certfile, settings.ssl_keyfile):
        if path and not path.is_file():
            print(f"error: TLS file not found: {path}", file=sys.stderr)
            return 2
    if settings.wyoming_port:
        import socket

        # Checked here, before the models load, so that a taken port is a message and not a traceback.
        try:
            socket.create_server((settings.wyoming_host, settings.wyoming_port)).close()
        except OSError as exc:
            where = f"{settings.wyoming_host}:{settings.wyoming_port}"
            print(f"error: cannot listen for Wyoming on {where}: {exc.strerror or exc}", file=sys.stderr)
            return 2
    whisper = next(row for row in EngineRegistry(settings).status() if row.model == "whisper")
    if not whisper.available:
        print(f"error: the default Whisper engine cannot start: {whisper.reason}", file=sys.stderr)
        return 2
    api_key = settings.api_key.get_secret_value() if settings.api_key else generate_api_key()
    configure_logging(settings.log_level, settings.log_format)
    for variable, meant in unknown_variables(os.environ):
        hint = f" (did you mean {meant}?)" if meant else ""
        logging.getLogger("streamscribe.config").warning(
            "unknown setting %s is ignored%s", variable, hint, extra={"event": "unknown_setting"}
        )
    shown_host = "localhost" if settings.host in ("0.0.0.0", "::", "127.0.0.1") else settings.host
    http, ws = ("https", "wss") if settings.ssl_certfile else ("http", "ws")
    base = f"{http}://{shown_host}:{settings.port}"
    print(f"streamscribe on {base}", flush=True)
    multi_user = settings.auth_mode == "multi_user"
    if not settings.api_key and not multi_user:
        print(f"  page:    {base}/#token={api_key}", flush=True)
    print(f"  stream:  {ws}://{shown_host}:{settings.port}{STREAM_PATH}?token=<API key>", flush=True)
    print(f"  files:   {base}/v1 (OpenAI-compatible)", flush=True)
    if settings.wyoming_port:
        print(
            f"  wyoming: tcp://{settings.wyoming_host}:{settings.wyoming_port} (no keys: trusted "
            "networks only)",
            flush=True,
        )
    if multi_user:
        print("  API keys: multi-user mode, keys from `streamscribe keys create --user NAME`", flush=True)
    else:
        print(
            f"  API key: {api_key}" if not settings.api_key else "  API key: from STREAMSCRIBE_API_KEY",
            flush=True,
        )
    app = create_app(settings, api_key)
    GracefulServer(uvicorn_config(settings, app), app).run()
    return 0


def _synthetic_audio(seconds: float, rate: int) -> np.ndarray:
    """A quiet tone sweep: exercises the protocol without speech."""
    t = np.arange(int(seconds * rate)) / rate
    return (0.1 * np.sin(2 * np.pi * (200 + 100 * t) * t)).astype(np.float32)


def _read_error(exc: Exception) -> str:
    """Why a file could not be read, without the errno and the path that OSError and FFmpeg errors add."""
    return getattr(exc, "strerror", None) or str(exc)


# Terminal escape sequences: CSI (cursor, colours, clearing), OSC (window title, links), and the rest.
_ESCAPE_SEQUENCE = re.compile(
    r"(\x1b\[|\x9b)[0-?]*[ -/]*[@-~]|(\x1b\]|\x9d)[^\x07\x1b]*(\x07|\x1b\\)?|\x1b.?"
)


def shown(text: str) -> str:
    """Text from a server as it may reach a terminal: without escape sequences or control characters, so a
    server (or a proxy) cannot move the cursor, retitle the window or hide text."""
    return "".join(ch for ch in _ESCAPE_SEQUENCE.sub("", text) if unicodedata.category(ch)[0] != "C")


def _stream(args: argparse.Namespace) -> int:
    from streamscribe.audio import load_audio_file
    from streamscribe.client import ReceivedFrame, stream_audio, stream_url
    from streamscribe.server.logs import install_log_redaction

    install_log_redaction()
    if args.audio:
        try:
            samples = load_audio_file(args.audio, args.sample_rate)
        except Exception as exc:
            print(f"error: cannot read {args.audio}: {_read_error(exc)}", file=sys.stderr)
            return 2
    else:
        samples = _synthetic_audio(args.duration, args.sample_rate)
    token = args.token or os.environ.get("STREAMSCRIBE_API_KEY")
    config: dict[str, Any] = {"language": args.language, "audio_format": args.audio_format}
    if args.model:
        config["model"] = args.model
    if args.variant:
        config["variant"] = args.variant
    if args.task != "transcribe":
        config["task"] = args.task
    if args.word_timestamps:
        config["word_timestamps"] = True
    if args.prompt:
        config["prompt"] = args.prompt
    if args.hotwords:
        config["hotwords"] = args.hotwords
    if args.diarize:
        config["diarization"] = True
    interactive = sys.stdout.isatty()

    def show(received: ReceivedFrame) -> None:
        frame = received.frame
        kind = frame.get("type")
        if kind == "partial" and interactive:
            print(f"\r\x1b[K… {shown(frame['text'])}", end="", flush=True)
        elif kind == "final":
            prefix = "\r\x1b[K" if interactive else ""
            speaker = f"{frame['speaker']}: " if "speaker" in frame else ""
            print(
                f"{prefix}[{frame['start']:7.2f}-{frame['end']:7.2f}] {speaker}{shown(frame['text'])}",
                flush=True,
            )
        elif kind == "warning":
            print(f"warning: {shown(frame['message'])}", file=sys.stderr)
        elif kind == "status" and args.verbose:
            print(f"status: {shown(str(frame))}", file=sys.stderr)

    try:
        result = asyncio.run(
            stream_audio(
                stream_url(args.url, token),
                samples,
                args.sample_rate,
                config=config,
                speed=args.speed,
                on_frame=show,
                binary=args.binary,
                resume=True,  # a dropped socket (a changing network) resumes the same session
            )
        )
    except (OSError, TimeoutError) as exc:
        print(f"error: cannot stream to {args.url}: {exc}", file=sys.stderr)
        return 1
    except Exception as exc:  # websockets raises InvalidStatus, InvalidURI, ...
        print(f"error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    if result.error:
        error = result.error
        print(f"error ({shown(str(error['error_type']))}): {shown(str(error['message']))}", file=sys.stderr)
        return 1
    if result.close_code not in (1000, None):
        print(
            f"error: connection closed with code {result.close_code} {shown(result.close_reason or '')}",
            file=sys.stderr,
        )
        return 1
    print("\nFull transcript:")
    print(shown(result.full_transcript or ""))
    return 0


def _transcribe(args: argparse.Namespace) -> int:
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    from streamscribe.audio import audio_file_seconds, iter_audio_file
    from streamscribe.config import Settings
    from streamscribe.engines.base import EngineUnavailable
    from streamscribe.engines.registry import EngineRegistry, UnknownModel, resolve_model
    from streamscribe.offline import FileOptions, file_utterances, render, transcribe_file
    from streamscribe.streaming.segmenter import Segmenter
    from streamscribe.streaming.vad import SileroVad

    settings = Settings.load(args.config)
    try:
        duration = audio_file_seconds(args.file)
    except Exception as exc:
        print(f"error: cannot read {args.file}: {_read_error(exc)}", file=sys.stderr)
        return 2
    try:
        # The server's names; no fallback: the one who asked for the engine is here to be told.
        model, variant = resolve_model(args.model, args.variant)
        engine = EngineRegistry(settings).get(model, variant, args.language, args.task)
    except (UnknownModel, EngineUnavailable) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    diarizer = None
    vad = settings.vad
    if args.diarize:
        from streamscribe.streaming.diarization import (
            DiarizationUnavailable,
            Diarizer,
            load_speaker_model,
            turn_vad,
        )

        try:
            diarizer = Diarizer(load_speaker_model())
        except DiarizationUnavailable as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        vad = turn_vad(vad)
    segmenter = Segmenter(SileroVad(), vad, settings.streaming.max_segment_seconds, engine.sample_rate)
    options = FileOptions(
        language=args.language,
        task=args.task,
        prompt=args.prompt,
        word_timestamps=args.word_timestamps,
        prompt_chars=settings.streaming.prompt_chars,
        diarization=args.diarize,
    )
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.completed:.0f}/{task.total:.0f} s"),
        TimeRemainingColumn(),
        transient=True,
        disable=not sys.stderr.isatty(),
    ) as progress:
        task = progress.add_task(f"{engine.name}", total=duration)
        utterances = file_utterances(iter_audio_file(args.file, engine.sample_rate), segmenter)
        pieces = transcribe_file(
            utterances,
            engine,
            options,
            progress=lambda done: progress.update(task, completed=done),
            label=diarizer.label if diarizer else None,
        )
        progress.update(task, completed=duration)
    text = render(pieces, args.format)
    if args.output:
        Path(args.output).write_text(text)
        print(f"wrote {args.output}", file=sys.stderr)
    else:
        sys.stdout.write(text)
    return 0


def _models(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from streamscribe.config import Settings
    from streamscribe.engines.registry import EngineRegistry

    table = Table("model", "variant", "languages", "available", "reason")
    for status in EngineRegistry(Settings.load(args.config)).status():
        table.add_row(
            status.model,
            status.variant,
            ", ".join(status.languages),
            "yes" if status.available else "no",
            status.reason or "",
        )
    Console(width=160).print(table)
    return 0


def _parse_expiry(value: str) -> float:
    """``30d``, ``12h``, ``90m`` from now, or an ISO 8601 date/time (UTC unless it says otherwise)."""
    from datetime import UTC, datetime

    units = {"d": 86400, "h": 3600, "m": 60}
    if value[:-1].isdigit() and value[-1:] in units:
        return time.time() + int(value[:-1]) * units[value[-1]]
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected 30d, 12h, 90m or an ISO date, got {value!r}") from None
    return (moment if moment.tzinfo else moment.replace(tzinfo=UTC)).timestamp()


def _keys(args: argparse.Namespace) -> int:
    from datetime import UTC, datetime

    from streamscribe.config import Settings
    from streamscribe.server.auth import KeyHasher, create_key, load_pepper
    from streamscribe.server.store import StoreBusy, open_store

    settings = Settings.load(args.config)
    store = open_store(settings)

    def when(moment: float | None) -> str:
        return datetime.fromtimestamp(moment, UTC).strftime("%Y-%m-%d %H:%M UTC") if moment else "-"

    try:
        if args.keys_command == "create":
            new = create_key(
                store, KeyHasher(load_pepper(settings)), args.user, args.tier, args.scope, args.expires
            )
            print(f"key id:  {new.record.key_id}\nuser:    {new.record.user_id} ({new.record.tier})")
            print(f"expires: {when(new.record.expires_at)}\nscope:   {new.record.scope}")
            print(f"API key (shown once, store it now): {new.key}")
        elif args.keys_command == "list":
            print(f"{'key id':14}{'user':20}{'tier':10}{'scope':8}{'created':22}{'expires':22}status")
            now = time.time()
            for record in store.list_keys(args.user):
                status = "revoked" if record.revoked_at else "active" if record.is_usable(now) else "expired"
                print(
                    f"{record.key_id:14}{record.user_id:20}{record.tier:10}{record.scope:8}"
                    f"{when(record.created_at):22}{when(record.expires_at):22}{status}"
                )
        elif args.keys_command == "revoke":
            if not store.revoke_key(args.key_id):
                print(f"error: no active key {args.key_id}", file=sys.stderr)
                return 1
            print(f"revoked {args.key_id}")
        elif args.keys_command == "set-tier":
            if not store.set_tier(args.user, args.tier):
                print(f"error: no user {args.user}", file=sys.stderr)
                return 1
            print(f"{args.user} is now on the {args.tier} tier")
    except StoreBusy as exc:
        print(f"error: {exc}; try again", file=sys.stderr)
        return 1
    finally:
        store.close()
    return 0


def build_parser() -> argparse.ArgumentParser:
    from streamscribe.engines import SAMPLE_RATE

    parser = argparse.ArgumentParser(prog="streamscribe", description="Real-time speech-to-text server.")
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser(
        "serve",
        help="run the server",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=_settings_epilog(),
    )
    serve.add_argument("--host", help="address to listen on (STREAMSCRIBE_HOST)")
    serve.add_argument("--port", type=int, help="port (STREAMSCRIBE_PORT)")
    serve.add_argument("--config", type=Path, help="TOML settings file (STREAMSCRIBE_CONFIG_FILE)")
    serve.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    serve.add_argument(
        "--ssl-certfile", type=Path, help="PEM certificate: serve https/wss (STREAMSCRIBE_SSL_CERTFILE)"
    )
    serve.add_argument("--ssl-keyfile", type=Path, help="PEM private key (STREAMSCRIBE_SSL_KEYFILE)")
    serve.add_argument(
        "--trusted-proxies",
        type=_address_list,
        metavar="ADDR[,ADDR...]",
        help="proxies whose X-Forwarded-For is believed, addresses or CIDR ranges "
        "(STREAMSCRIBE_TRUSTED_PROXIES; default: none)",
    )
    serve.add_argument(
        "--wyoming-port",
        type=int,
        help="also serve the Wyoming protocol (Home Assistant) on this TCP port; no keys, trusted network "
        "only (STREAMSCRIBE_WYOMING_PORT; default: off)",
    )
    serve.add_argument(
        "--wyoming-host", help="address of the Wyoming port (STREAMSCRIBE_WYOMING_HOST; default: 127.0.0.1)"
    )
    serve.set_defaults(handler=_serve)

    stream = commands.add_parser(
        "stream", help="stream a file (or synthetic audio) to a server and print text"
    )
    source = stream.add_mutually_exclusive_group(required=True)
    source.add_argument("--audio", type=Path, help="audio file (any rate, mono or stereo, any common format)")
    source.add_argument("--duration", type=float, help="seconds of synthetic audio instead of a file")
    stream.add_argument("--url", default="ws://127.0.0.1:8000", help="server URL (default: %(default)s)")
    stream.add_argument("--token", help="API key (default: $STREAMSCRIBE_API_KEY)")
    stream.add_argument("--model", help="parakeet, canary, moonshine or whisper (server default if omitted)")
    stream.add_argument("--variant", choices=["standard", "onnx", "mlx"])
    stream.add_argument("--language", default="en")
    stream.add_argument("--speed", type=float, default=1.0, help="times real time; 0 = as fast as possible")
    stream.add_argument(
        "--sample-rate", type=int, default=SAMPLE_RATE, help="rate to send at (server resamples)"
    )
    stream.add_argument("--audio-format", choices=["float32", "pcm16", "mulaw", "alaw"], default="float32")
    stream.add_argument("--binary", action="store_true", help="send audio in binary frames, not base64 JSON")
    stream.add_argument("--task", choices=["transcribe", "translate"], default="transcribe")
    stream.add_argument("--word-timestamps", action="store_true", help="ask for word timing in finals")
    stream.add_argument("--diarize", action="store_true", help="ask for speaker labels on finals")
    stream.add_argument("--prompt", help="context text: vocabulary, spelling, style")
    stream.add_argument("--hotwords", help="words or phrases to favour, comma-separated")
    stream.add_argument("--verbose", action="store_true", help="also print status frames")
    stream.set_defaults(handler=_stream)

    transcribe = commands.add_parser("transcribe", help="transcribe a file offline, with a progress bar")
    transcribe.add_argument("file", type=Path)
    transcribe.add_argument("--model", default="whisper", help="a model name as the server takes it")
    transcribe.add_argument("--variant", default="standard", choices=["standard", "onnx", "mlx"])
    transcribe.add_argument("--language", default="en")
    transcribe.add_argument("--task", choices=["transcribe", "translate"], default="transcribe")
    transcribe.add_argument("--prompt", help="context text: vocabulary, spelling, style")
    transcribe.add_argument("--word-timestamps", action="store_true", help="words with times in json output")
    transcribe.add_argument(
        "--diarize", action="store_true", help="label speakers: SRT 'S1: ', VTT <v S1>, JSON speaker"
    )
    transcribe.add_argument("--format", choices=["txt", "srt", "vtt", "json"], default="txt")
    transcribe.add_argument("--output", "-o", type=Path, help="write here instead of standard output")
    transcribe.add_argument("--config", type=Path)
    transcribe.set_defaults(handler=_transcribe)

    models = commands.add_parser("models", help="list engines and whether each is available here")
    models.add_argument("--config", type=Path)
    models.set_defaults(handler=_models)

    keys = commands.add_parser(
        "keys",
        help="manage multi-user API keys (database from STREAMSCRIBE_DATABASE_URL or STREAMSCRIBE_DATA_DIR)",
    )
    keys.add_argument("--config", type=Path, help="TOML settings file (STREAMSCRIBE_CONFIG_FILE)")
    keys.set_defaults(handler=_keys)
    key_commands = keys.add_subparsers(dest="keys_command", required=True)
    from streamscribe.config import TIERS
    from streamscribe.server.auth import SCOPES

    tiers = list(TIERS)
    create = key_commands.add_parser("create", help="create a key and print it (once)")
    create.add_argument("--user", required=True, help="user name; quotas count per user")
    create.add_argument("--tier", choices=tiers, help="set the user's tier (new users: free)")
    create.add_argument("--expires", type=_parse_expiry, help="30d, 12h, 90m, or an ISO date/time")
    create.add_argument("--scope", choices=SCOPES, default="stream", help="limits: may only read its limits")
    listing = key_commands.add_parser("list", help="list keys (never the keys themselves)")
    listing.add_argument("--user", help="only this user's keys")
    revoke = key_commands.add_parser("revoke", help="revoke a key by its id")
    revoke.add_argument("key_id")
    set_tier = key_commands.add_parser("set-tier", help="change a user's tier")
    set_tier.add_argument("user")
    set_tier.add_argument("tier", choices=tiers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.handler(args))


if __name__ == "__main__":
    sys.exit(main())
