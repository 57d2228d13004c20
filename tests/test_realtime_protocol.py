"""The Realtime API's events: parsed as OpenAI's client sends them, written as the ``openai`` package's own
models read them."""

from __future__ import annotations

import json

import pytest
from openai.types.realtime import (
    ConversationItemInputAudioTranscriptionCompletedEvent,
    ConversationItemInputAudioTranscriptionDeltaEvent,
    InputAudioBufferCommittedEvent,
    InputAudioBufferSpeechStartedEvent,
    RealtimeErrorEvent,
    SessionCreatedEvent,
)
from pydantic import BaseModel

from streamscribe.protocol import ErrorType, Quota, StreamError, quota_exceeded
from streamscribe.realtime_protocol import (
    AudioPcm,
    Committed,
    DurationUsage,
    InputAudioBufferAppend,
    RealtimeRefusal,
    SessionAudio,
    SessionCreated,
    SessionDescription,
    SessionInput,
    SessionUpdate,
    SpeechStarted,
    TranscriptionCompleted,
    TranscriptionDelta,
    TranscriptionSettings,
    TurnDetection,
    error_event,
    parse_client_event,
)
from streamscribe.server.realtime import _Item


def test_events_have_the_openai_packages_shapes() -> None:
    session = SessionDescription(
        id="sess_1",
        audio=SessionAudio(
            input=SessionInput(
                format=AudioPcm(),
                transcription=TranscriptionSettings(model="whisper-tiny.en", language="en"),
                turn_detection=TurnDetection(threshold=0.5, prefix_padding_ms=200, silence_duration_ms=500),
            )
        ),
    )
    pairs: list[tuple[BaseModel, type[BaseModel]]] = [
        (SessionCreated(session=session), SessionCreatedEvent),
        (SpeechStarted(audio_start_ms=10, item_id="item_1"), InputAudioBufferSpeechStartedEvent),
        (Committed(item_id="item_1", previous_item_id=None), InputAudioBufferCommittedEvent),
        (
            TranscriptionDelta(item_id="item_1", delta="Please"),
            ConversationItemInputAudioTranscriptionDeltaEvent,
        ),
        (
            TranscriptionCompleted(item_id="item_1", transcript="Please.", usage=DurationUsage(seconds=1.5)),
            ConversationItemInputAudioTranscriptionCompletedEvent,
        ),
        (error_event(StreamError(ErrorType.INVALID_AUDIO, "bad audio")), RealtimeErrorEvent),
    ]
    for ours, theirs in pairs:
        data = json.loads(ours.model_dump_json())
        parsed = theirs.model_validate(data)  # validated, not merely constructed: every type checks
        required = {name for name, spec in theirs.model_fields.items() if spec.is_required()}
        assert required <= set(data), (theirs.__name__, required - set(data))
        if theirs is not SessionCreatedEvent:  # its session is a union of models: checked below
            assert parsed.model_dump(include=required) == {name: data[name] for name in required}
    created = SessionCreatedEvent.model_validate(json.loads(pairs[0][0].model_dump_json()))
    assert created.session.type == "transcription"
    assert created.session.audio.input.turn_detection.silence_duration_ms == 500  # type: ignore[union-attr]


def test_client_events_parse_as_the_openai_client_sends_them() -> None:
    update = parse_client_event(
        json.dumps(
            {
                "type": "session.update",
                "session": {"type": "transcription", "audio": {"input": {"turn_detection": None}}},
            }
        )
    )
    assert isinstance(update, SessionUpdate)
    audio_input = update.session.audio.input  # type: ignore[union-attr]
    assert "turn_detection" in audio_input.model_fields_set and audio_input.turn_detection is None
    append = parse_client_event('{"type": "input_audio_buffer.append", "audio": "AAAA", "event_id": "e7"}')
    assert isinstance(append, InputAudioBufferAppend) and append.event_id == "e7"


@pytest.mark.parametrize(
    ("raw", "param", "says"),
    [
        ('{"type": "dance", "event_id": "e1"}', "type", "unknown event type"),
        ('{"type": "response.create", "event_id": "e1"}', "type", "transcription session"),
        ('{"type": "input_audio_buffer.append", "event_id": "e1"}', "audio", "audio"),
        ('{"event_id": "e1"}', "type", "no 'type'"),
    ],
)
def test_bad_client_events_name_the_field_and_the_event(raw: str, param: str, says: str) -> None:
    with pytest.raises(RealtimeRefusal) as refused:
        parse_client_event(raw)
    event = error_event(refused.value).error
    assert (event.param, event.event_id, event.type) == (param, "e1", "invalid_request_error")
    assert says in event.message


def test_errors_name_their_quota_and_server_errors_say_so() -> None:
    quota = error_event(quota_exceeded(Quota.DAILY_MINUTES, "over")).error
    assert (quota.code, quota.param) == ("quota_exceeded", "daily_minutes")
    assert error_event(StreamError(ErrorType.INTERNAL_ERROR, "engine")).error.type == "server_error"


def test_deltas_are_stable_words_never_retracted() -> None:
    item = _Item("item_1")
    assert item.delta(0, ["Please", "send"]) == "Please send"
    assert item.delta(0, ["Please", "send"]) is None  # nothing new
    assert item.delta(0, ["please,", "send", "the"]) == " the"  # case and punctuation do not count
    assert item.delta(0, ["Please", "spend", "the", "report"]) is None  # it would retract "send"
    assert item.delta(1, ["Next."]) == " Next."  # the item's next utterance
