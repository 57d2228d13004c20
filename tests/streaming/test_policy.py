"""LocalAgreement: stable words never move, and rewrites of the tentative tail are allowed."""

from __future__ import annotations

from streamscribe.streaming.policy import LocalAgreement, normalize_word


def test_words_become_stable_when_two_hypotheses_agree() -> None:
    policy = LocalAgreement()
    assert policy.update("the train to") == "the train to"
    assert policy.stable == []
    assert policy.update("the train to the air") == "the train to the air"
    assert policy.stable == ["the", "train", "to"]
    assert policy.update("The train, to the airport leaves") == "the train to the airport leaves"
    assert policy.stable == ["the", "train", "to", "the"]


def test_a_rewritten_start_keeps_the_stable_words() -> None:
    policy = LocalAgreement()
    policy.update("please send the")
    policy.update("please send the quarterly")
    shown = policy.update("police and the quarterly report")
    assert shown == "please send the quarterly report"


def test_reset_forgets_everything() -> None:
    policy = LocalAgreement()
    policy.update("one two")
    policy.update("one two three")
    policy.reset()
    assert policy.stable == [] and policy.update("four") == "four"


def test_normalize_word_ignores_case_and_punctuation() -> None:
    assert normalize_word("Friday.") == normalize_word("friday") == "friday"
    assert normalize_word("don't,") == "don't"
