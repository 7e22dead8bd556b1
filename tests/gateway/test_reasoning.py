"""An upstream's reasoning_content through the Responses API (a ``reasoning`` output item with one
``reasoning_text`` part) and Anthropic Messages (a ``thinking`` block with an empty signature), with the official
SDKs against a live gateway whose 'cloud' pool is a real OpenAIUpstream in front of a FakeUpstream that
reasons; stream == non-stream, and the items sent back in a later request are dropped."""

from __future__ import annotations

import anthropic
import httpx
import openai
import pytest
from openai.types.responses import ResponseReasoningTextDeltaEvent

from bench.fake_upstream import FakeBehavior, FakeUpstream
from tests.gateway.fakes import remote_cloud_app

REASONING = "six times seven is forty-two"


@pytest.fixture
def remote(live_server):
    upstream_app = FakeUpstream(behavior=FakeBehavior(num_tokens=3, reasoning_text=REASONING))
    return live_server(remote_cloud_app(live_server(upstream_app).base_url)), upstream_app


def test_responses_emit_reasoning_as_a_reasoning_item(remote):
    server, upstream = remote
    client = openai.OpenAI(base_url=server.base_url + "/v1", api_key="x", max_retries=0)
    whole = client.responses.create(model="cloud", input="what is 6 x 7?")
    assert [item.type for item in whole.output] == ["reasoning", "message"]
    reasoning = whole.output[0]
    assert reasoning.summary == [] and [(c.type, c.text) for c in reasoning.content] == [("reasoning_text", REASONING)]
    assert reasoning.id.startswith("rs_") and whole.output_text == "tok0 tok1 tok2 "
    assert whole.usage.output_tokens_details.reasoning_tokens == len(REASONING.split())  # the upstream's count
    chat = client.chat.completions.create(model="cloud", messages=[{"role": "user", "content": "what is 6 x 7?"}])
    assert chat.usage.completion_tokens_details.reasoning_tokens == len(REASONING.split())

    with client.responses.stream(model="cloud", input="what is 6 x 7?") as stream:
        events = list(stream)
        streamed = stream.get_final_response()
    deltas = [e for e in events if e.type == "response.reasoning_text.delta"]
    assert all(isinstance(e, ResponseReasoningTextDeltaEvent) for e in deltas)
    assert "".join(e.delta for e in deltas) == REASONING and {e.output_index for e in deltas} == {0}
    assert [e.type for e in events if e.type.startswith("response.reasoning_text")][-1] == "response.reasoning_text.done"
    added = [e.item.type for e in events if e.type == "response.output_item.added"]
    assert added == ["reasoning", "message"]
    def without_ids(items):
        return [i.model_dump(exclude={"id"}, exclude_none=True) for i in items]

    assert without_ids(streamed.output) == without_ids(whole.output)

    # the Agents SDK sends output items back as input: the reasoning item is accepted and dropped
    client.responses.create(model="cloud", input=[*[i.model_dump(exclude_none=True) for i in whole.output],
                                                   {"role": "user", "content": "and 6 x 8?"}])
    assert upstream.last_bodies[-1]["messages"] == [{"role": "assistant", "content": "tok0 tok1 tok2 "},
                                                     {"role": "user", "content": "and 6 x 8?"}]
    # a stored conversation keeps the answer, not the reasoning
    client.responses.create(model="cloud", input="and 6 x 9?", previous_response_id=whole.id)
    assert upstream.last_bodies[-1]["messages"][1] == {"role": "assistant", "content": "tok0 tok1 tok2 "}


def test_messages_emit_reasoning_as_a_thinking_block(remote):
    server, upstream = remote
    claude = anthropic.Anthropic(base_url=server.base_url, api_key="x", max_retries=0)
    user = [{"role": "user", "content": "what is 6 x 7?"}]
    whole = claude.messages.create(model="cloud", max_tokens=3, messages=user)
    assert [b.type for b in whole.content] == ["thinking", "text"]
    assert whole.content[0].thinking == REASONING and whole.content[0].signature == ""
    assert whole.content[1].text == "tok0 tok1 tok2 "

    with claude.messages.stream(model="cloud", max_tokens=3, messages=user) as stream:
        events = list(stream)
        streamed = stream.get_final_message()
    assert [b.model_dump() for b in streamed.content] == [b.model_dump() for b in whole.content]
    thinking = [e.delta.thinking for e in events if e.type == "content_block_delta" and e.delta.type == "thinking_delta"]
    assert "".join(thinking) == REASONING and len(thinking) == len(REASONING.split())
    raw = httpx.post(server.base_url + "/v1/messages", json={"model": "cloud", "max_tokens": 3, "messages": user,
                                                              "stream": True})
    names = [line[7:] for line in raw.text.splitlines() if line.startswith("event: ")]
    assert names[:2] == ["message_start", "content_block_start"] and names[-1] == "message_stop"
    assert '"content_block":{"type":"thinking","thinking":"","signature":""}' in raw.text
    assert raw.text.index('"signature_delta"') < raw.text.index('"content_block_stop"')

    # thinking blocks sent back (as Claude Code does) are accepted and dropped
    claude.messages.create(model="cloud", max_tokens=3, messages=[
        *user, {"role": "assistant", "content": [b.model_dump() for b in whole.content]},
        {"role": "user", "content": "and 6 x 8?"}])
    assert upstream.last_bodies[-1]["messages"] == [
        {"role": "user", "content": "what is 6 x 7?"}, {"role": "assistant", "content": "tok0 tok1 tok2 "},
        {"role": "user", "content": "and 6 x 8?"}]
