"""Wire frames: defaults, aliases and the readable reasons given for bad input."""

from __future__ import annotations

import json

import pytest

from streamscribe.protocol import (
    ERRORS,
    AddressRefused,
    CloseCode,
    ConfigMessage,
    ConfigRefused,
    ErrorType,
    StreamError,
    TranscriptFrame,
    parse_client_message,
)


def test_config_defaults_match_the_documented_protocol() -> None:
    config = parse_client_message('{"type":"config"}')
    assert isinstance(config, ConfigMessage)
    assert (config.variant, config.sample_rate, config.language) == ("standard", 16000, "en")
    assert (config.chunk_duration, config.overlap_duration, config.max_buffer_duration) == (2.0, 0.5, 30)
    assert (config.enable_partial, config.partial_interval, config.audio_format) == (True, 0.5, "float32")
    assert config.model is None  # the server's default model


@pytest.mark.parametrize(
    ("fields", "rate"),
    [
        ({"audio_format": "mulaw"}, 8000),
        ({"audio_format": "alaw"}, 8000),
        ({"audio_format": "mulaw", "sample_rate": 16000}, 16000),  # wideband G.711, as some systems send
        ({"audio_format": "pcm16"}, 16000),
    ],
)
def test_telephone_formats_are_8_khz_unless_the_config_says_otherwise(
    fields: dict[str, object], rate: int
) -> None:
    config = parse_client_message(json.dumps({"type": "config", **fields}))
    assert isinstance(config, ConfigMessage) and config.sample_rate == rate


def test_model_variant_is_accepted_for_variant() -> None:
    """Older clients say ``model_variant``; the model names themselves are the registry's (see
    tests/engines/test_registry.py)."""
    config = parse_client_message('{"type": "config", "model": "parakeet", "model_variant": "onnx"}')
    assert isinstance(config, ConfigMessage)
    assert (config.model, config.variant) == ("parakeet", "onnx")


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        ("nope", "not valid JSON"),
        ('{"data": 1}', "no 'type'"),
        ('{"type": "sing"}', "unknown message type 'sing'"),
        ('{"type": "config", "sample_rate": 96000}', "sample_rate"),
        ('{"type": "audio"}', "data"),
        ("[1, 2]", "should be an object"),
    ],
)
def test_bad_messages_explain_themselves(raw: str, reason: str) -> None:
    with pytest.raises(StreamError) as caught:
        parse_client_message(raw)
    assert caught.value.error_type is ErrorType.BAD_REQUEST
    assert reason in caught.value.message


def test_server_frames_omit_unset_fields() -> None:
    frame = TranscriptFrame(
        type="final", text="hi", is_final=True, model="m", segment_id=0, start=0, end=1, language="en"
    )
    data = json.loads(frame.to_json())
    assert "words" not in data and data["type"] == "final" and isinstance(data["timestamp"], float)


def test_every_error_type_has_a_close_code_and_an_http_status() -> None:
    assert set(ERRORS) == set(ErrorType)


def test_error_frames_say_whether_the_session_ends() -> None:
    assert StreamError(ErrorType.INVALID_AUDIO, "bad frame").to_frame().fatal is False
    assert StreamError(ErrorType.AUTH_FAILED, "no key").to_frame().fatal is True
    refused = ConfigRefused(ErrorType.BAD_REQUEST, "invalid config")
    assert refused.close_code == CloseCode.PROTOCOL_ERROR and refused.to_frame().fatal is True


def test_the_moment_of_an_error_overrides_its_types_close_code() -> None:
    assert StreamError(ErrorType.TIMEOUT, "idle").close_code == CloseCode.GOING_AWAY
    assert ConfigRefused(ErrorType.TIMEOUT, "no config").close_code == CloseCode.PROTOCOL_ERROR
    assert StreamError(ErrorType.FORBIDDEN, "scope").close_code == CloseCode.FORBIDDEN
    address = AddressRefused()
    assert address.error_type is ErrorType.FORBIDDEN and address.close_code == CloseCode.POLICY_VIOLATION
    assert address.http_status == 403
