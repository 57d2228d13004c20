"""Telling a decoder's loop from speech that says a thing twice."""

from __future__ import annotations

from streamscribe.engines.repetition import find_repeated_run, is_spoken_twice, spoken_words


def test_loops_are_found_and_speech_repeats_are_not() -> None:
    assert find_repeated_run(spoken_words("and began slowly and without it. Slowly and without it."))
    assert find_repeated_run(spoken_words("Turn left at the b-b-b-b-b"))
    assert find_repeated_run(spoken_words("the f*** the f*** the f***"))
    for speech in ("He had had enough.", "No, no, no, not that one.", "I think, I think so.", ""):
        assert find_repeated_run(spoken_words(speech)) is None, speech


def test_the_run_names_where_the_first_copy_ends() -> None:
    text = "She planted tomatoes and peppers and peppers and peppers"
    words = spoken_words(text)
    run = find_repeated_run(words)
    assert run is not None and (run.length, run.times) == (2, 3)
    assert text[: words[run.start + run.length - 1].text_end] == "She planted tomatoes and peppers"


def test_copies_squeezed_into_the_end_of_the_audio_are_a_loop() -> None:
    def timed(*spans: tuple[str, float, float]) -> list:
        return [part for text, start, end in spans for part in spoken_words(text, start, end)]

    said_twice = timed(("send", 0.0, 0.4), ("the", 0.4, 0.5), ("report", 0.5, 1.0))
    said_twice += timed(("send", 1.5, 1.9), ("the", 1.9, 2.0), ("report", 2.0, 2.4))
    looped = timed(("send", 0.0, 0.4), ("the", 0.4, 0.5), ("report", 0.5, 1.0))
    looped += timed(("send", 1.0, 1.0), ("the", 1.0, 1.0), ("report", 1.0, 1.0))
    for words, spoken in ((said_twice, True), (looped, False)):
        run = find_repeated_run(words)
        assert run is not None
        assert is_spoken_twice(words, run) is spoken
