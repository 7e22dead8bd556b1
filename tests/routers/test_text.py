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
