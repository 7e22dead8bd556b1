"""request_text: the one chat → text rule; content_text: the one message content → text function."""

import pytest

from gateway.protocol import ChatMessage
from routers.text import content_text, request_text


def test_request_text_rule():
    msgs = [
        {"role": "system", "content": "You are a legal assistant."},
        {"role": "user", "content": "My landlord kept my deposit."},
        {"role": "assistant", "content": "Where do you live?"},
        {"role": "user", "content": [{"type": "text", "text": "In California."}]},
    ]
    assert request_text(msgs, 200) == "My landlord kept my deposit.\nIn California."
    assert request_text(msgs) == request_text(msgs, 2000)
    assert request_text(msgs, 20) == "In California."
    assert request_text(msgs, 5) == "In Ca"
    assert request_text([{"role": "system", "content": "x"}], 100) == ""
    with pytest.raises(ValueError):
        request_text(msgs, 0)
    with pytest.raises(ValueError):
        request_text(["not a message"])


def test_content_text_is_what_the_models_and_the_artifacts_see():
    parts = [{"type": "text", "text": "Hello "}, {"type": "image_url", "image_url": {"url": "x"}},
             {"type": "text", "text": "world"}]
    assert content_text(parts) == "Hello world"
    assert content_text("plain") == "plain" and content_text(None) == ""
    wire = ChatMessage.model_validate({"role": "user", "content": [{"type": "text", "text": "Hello "},
                                                                   {"type": "text", "text": "world"}]})
    assert wire.text() == "Hello world" == wire.to_backend()["content"]
    with pytest.raises(ValueError, match="string or a list"):
        content_text(42)


def test_each_budget_keeps_the_last_turn_first():
    """One RequestText per request; a smaller budget (the guard's) drops older turns, never the newest."""
    from routers.text import RequestText

    msgs = [{"role": "user", "content": "a" * 900}, {"role": "assistant", "content": "ok"},
            {"role": "user", "content": "b" * 600}]
    turns = RequestText.of(msgs)
    assert turns.turns == ("a" * 900, "b" * 600)
    assert turns.text(2000) == "a" * 900 + "\n" + "b" * 600 == request_text(msgs, 2000)
    assert turns.text(1000) == "b" * 600  # not the first 1,000 characters of the 2,000 window
    assert turns.text(100) == "b" * 100


def test_image_parts_are_not_routing_text():
    image = {"type": "image_url", "image_url": {"url": "data:image/png;base64," + "A" * 5000}}
    messages = [{"role": "user", "content": [{"type": "text", "text": "what is "}, image, {"type": "text", "text": "this?"}]}]
    assert request_text(messages) == "what is this?"
    assert request_text([{"role": "user", "content": [image]}]) == ""
    wire = ChatMessage.model_validate(messages[0])
    assert wire.text() == "what is this?" and wire.to_backend()["content"] == messages[0]["content"]
