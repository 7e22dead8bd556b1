"""What the guard, the router and the example cache read of a chat: ``request_text(messages)``.

The one place where chat messages (and message content) become text. The user turns are read once per
request (``RequestText``); each artifact then takes the text for its own character budget (the guard the
budget it was trained with, the router ``scorers.FEATURE_MAX_CHARS``). Pure Python, no imports beyond the
standard library.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

REQUEST_TEXT_MAX_CHARS = 2000  # gateway setting guard.max_context_chars overrides it per deployment


def content_text(content: Any) -> str:
    """Text of one OpenAI message ``content``: a string, or its ``text`` parts concatenated (as the
    gateway hands them to the models). ``None`` → ``""``; anything else raises ValueError."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if isinstance(part, str):
                parts.append(part)
            elif isinstance(part, dict) and part.get("type") == "text":
                parts.append(str(part.get("text") or ""))
            elif getattr(part, "type", None) == "text":  # a validated wire part (gateway.protocol.TextPart)
                parts.append(str(part.text or ""))
        return "".join(parts)
    raise ValueError(f"message content must be a string or a list of parts, got {type(content).__name__}")


@dataclass(frozen=True)
class RequestText:
    """The user turns of one chat (oldest first), read once per request; ``text(max_chars)`` is the text
    an artifact with that character budget judges. Each artifact applies the rule with its own budget, so
    a guard trained on 1,000 characters sees the last turn first, never an older turn in its place.

    Rule: the last ``user`` turn, preceded by earlier ``user`` turns (newest first, joined by newlines)
    while the total stays within ``max_chars``. System/developer prompts and assistant/tool turns are
    excluded: they are written by the deployment or the model, not by the person whose request is being
    judged. A last user turn longer than ``max_chars`` is cut to its first ``max_chars`` characters.
    No user turn at all → ``""``.
    """

    turns: tuple[str, ...]

    @classmethod
    def of(cls, messages: Sequence[dict[str, Any]]) -> RequestText:
        """Messages are dicts with ``role`` and ``content`` (string or parts); anything else raises ValueError."""
        turns = []
        for m in messages:
            if not isinstance(m, dict):
                raise ValueError(f"a message must be a dict with role/content, got {type(m).__name__}")
            if m.get("role") == "user":
                text = content_text(m.get("content")).strip()
                if text:
                    turns.append(text)
        return cls(tuple(turns))

    def text(self, max_chars: int = REQUEST_TEXT_MAX_CHARS) -> str:
        if max_chars <= 0:
            raise ValueError("max_chars must be positive")
        if not self.turns:
            return ""
        picked = [self.turns[-1][:max_chars]]
        used = len(picked[0])
        for text in reversed(self.turns[:-1]):
            if used + 1 + len(text) > max_chars:
                break
            picked.append(text)
            used += 1 + len(text)
        return "\n".join(reversed(picked))


def request_text(messages: Sequence[dict[str, Any]], max_chars: int = REQUEST_TEXT_MAX_CHARS) -> str:
    """``RequestText.of(messages).text(max_chars)``: the text a chat is judged and routed on."""
    if max_chars <= 0:
        raise ValueError("max_chars must be positive")
    return RequestText.of(messages).text(max_chars)
