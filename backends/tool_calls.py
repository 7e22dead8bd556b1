"""Tool calls on local pools: how tools reach the prompt, how calls are constrained, how output is read back.

A ``ToolCallFormat`` is one model convention for writing a call (the pool's ``tool_call_parser``):

* ``hermes`` — ``<tool_call>\\n{"name": "get_weather", "arguments": {...}}\\n</tool_call>``, one block per
  call (Qwen2/Qwen3, Hermes; also what we teach models whose template has no tool support);
* ``llama3_json`` — ``{"name": "get_weather", "parameters": {...}}``, calls separated by ``; `` (Llama 3.x).

``detect_format`` picks a model's default from its chat template. A template that takes ``tools`` renders
them itself (``template_takes_tools``); for one that does not (SmolLM2, ``plain_turns``), ``render_messages``
writes the documented system-prompt rendering: the tools as JSON lines inside ``<tools></tools>`` and the
instruction to answer with the format's blocks; earlier calls become the assistant's text in that format and
``tool`` results become a user turn of ``<tool_response>`` blocks.

``structural_tag`` is the grammar a request's ``tool_choice`` asks for (the engine compiles it with
xgrammar): ``auto`` — free text, and each call that starts must be a valid call of a listed tool; ``required``
— one or more calls and nothing else; a named tool — exactly that one call. Arguments are constrained by the
tool's ``parameters`` schema; ``parallel_tool_calls: false`` allows one call.

``ToolCallParser`` reads the model's text incrementally and yields ``content`` text and OpenAI stream
pieces: a call's first piece carries ``index``, ``id``, ``type`` and ``function.name`` (arguments ""), the
following ones ``function.arguments`` fragments, so the SDK's stream accumulators rebuild the same call the
non-stream answer carries.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

EMPTY_PARAMETERS: dict[str, Any] = {"type": "object", "properties": {}}


@dataclass(frozen=True)
class ToolCallFormat:
    """How one model family writes a call: ``begin(name) + arguments JSON + end``; ``trigger`` opens a
    call in free text; ``separator`` sits between parallel calls."""

    name: str
    begin_template: str  # format with name=
    end: str
    trigger: str
    separator: str
    arguments_key: str

    def begin(self, tool_name: str) -> str:
        return self.begin_template.format(name=tool_name)

    def write(self, tool_name: str, arguments: str) -> str:
        """One call as the model writes it (used to render earlier calls into the prompt)."""
        return self.begin(tool_name) + (arguments or "{}") + self.end


HERMES = ToolCallFormat("hermes", '<tool_call>\n{{"name": "{name}", "arguments": ', "}\n</tool_call>",
                        "<tool_call>", "\n", "arguments")
LLAMA3_JSON = ToolCallFormat("llama3_json", '{{"name": "{name}", "parameters": ', "}", '{"name": ', "; ",
                             "parameters")
FORMATS: dict[str, ToolCallFormat] = {f.name: f for f in (HERMES, LLAMA3_JSON)}
PARSER_NAMES: tuple[str, ...] = ("auto", *FORMATS)


def detect_format(chat_template: str | None) -> ToolCallFormat:
    """The default format of a model from its chat template source: Llama 3's ``<|python_tag|>`` /
    ``"parameters"`` convention, else Hermes (also the rendering for templates without tools)."""
    src = chat_template or ""
    if "<tool_call>" in src:
        return HERMES
    if "<|python_tag|>" in src or ('"parameters"' in src and "ipython" in src):
        return LLAMA3_JSON
    return HERMES


def resolve_format(parser: str, chat_template: str | None) -> ToolCallFormat:
    """The pool's ``tool_call_parser`` ("auto" = detect from the template)."""
    if parser == "auto":
        return detect_format(chat_template)
    if parser not in FORMATS:
        raise ValueError(f"tool_call_parser must be one of {', '.join(PARSER_NAMES)}; got {parser!r}")
    return FORMATS[parser]


def template_takes_tools(chat_template: str | None) -> bool:
    """True when the Jinja template reads a ``tools`` variable (it renders the tool list itself)."""
    if not chat_template:
        return False
    try:
        import jinja2
        from jinja2 import meta

        return "tools" in meta.find_undeclared_variables(jinja2.Environment().parse(chat_template))
    except Exception:  # an unparsable template is reported by the renderer, not here
        return False


# ---------------------------------------------------------------------------------------------- tools


@dataclass(frozen=True)
class Tool:
    """A function tool as the request declared it (validated at the wire)."""

    name: str
    description: str
    parameters: dict[str, Any]

    @classmethod
    def from_openai(cls, tool: dict[str, Any]) -> Tool:
        fn = tool.get("function") or {}
        return cls(fn.get("name", ""), fn.get("description") or "", fn.get("parameters") or EMPTY_PARAMETERS)

    def as_openai(self) -> dict[str, Any]:
        return {"type": "function", "function": {"name": self.name, "description": self.description,
                                                 "parameters": self.parameters}}


def tools_of(request_tools: list[dict[str, Any]] | None) -> list[Tool]:
    return [Tool.from_openai(t) for t in request_tools or []]


def named_choice(tool_choice: Any) -> str | None:
    """The tool name a ``{"type": "function", "function": {"name": ...}}`` choice forces, else None."""
    if isinstance(tool_choice, dict):
        return (tool_choice.get("function") or {}).get("name")
    return None


def choice_mode(tool_choice: Any, tools: list[Tool]) -> str:
    """"none" | "auto" | "required" | "named" (OpenAI's default: auto when tools are given)."""
    if not tools or tool_choice == "none":
        return "none"
    if named_choice(tool_choice):
        return "named"
    return "required" if tool_choice == "required" else "auto"


def structural_tag(fmt: ToolCallFormat, tools: list[Tool], tool_choice: Any, parallel: bool) -> dict[str, Any] | None:
    """The xgrammar structural tag ``tool_choice`` asks for, or None ("none": no constraint)."""
    mode = choice_mode(tool_choice, tools)
    if mode == "none":
        return None

    def tag(tool: Tool) -> dict[str, Any]:
        return {"type": "tag", "begin": fmt.begin(tool.name),
                "content": {"type": "json_schema", "json_schema": tool.parameters, "style": "json",
                            "max_whitespace_cnt": 1},  # bounded whitespace: small models cannot loop in it
                "end": fmt.end}

    if mode == "named":
        name = named_choice(tool_choice)
        chosen = [t for t in tools if t.name == name]
        if not chosen:
            raise ValueError(f"tool_choice names {name!r}, which is not in tools")
        return {"type": "structural_tag", "format": tag(chosen[0])}
    tags = [tag(t) for t in tools]
    if mode == "required":
        return {"type": "structural_tag", "format": {"type": "tags_with_separator", "tags": tags,
                                                     "separator": fmt.separator, "at_least_one": True,
                                                     "stop_after_first": not parallel}}
    return {"type": "structural_tag", "format": {"type": "triggered_tags", "triggers": [fmt.trigger], "tags": tags,
                                                 "at_least_one": False, "stop_after_first": not parallel}}


# -------------------------------------------------------------------------------------------- prompts

TOOL_SYSTEM_PROMPT = (
    "You can call functions to help answer. The functions are listed inside <tools></tools> as JSON, one per "
    "line:\n<tools>\n{tools}\n</tools>\n"
    "To call a function, answer with one block per call, each holding a JSON object with the function's name "
    "and its arguments:\n{example}\nA function's result comes back inside <tool_response></tool_response>."
)


def tool_system_prompt(fmt: ToolCallFormat, tools: list[Tool]) -> str:
    lines = "\n".join(json.dumps(t.as_openai()) for t in tools)
    example = fmt.write("<function-name>", "<arguments-json-object>")
    return TOOL_SYSTEM_PROMPT.format(tools=lines, example=example)


def render_messages(messages: list[dict[str, Any]], tools: list[Tool], fmt: ToolCallFormat, *,
                    template_has_tools: bool) -> list[dict[str, Any]]:
    """Messages ready for a chat template. With a tools-aware template: earlier calls' ``arguments`` as
    objects (what such templates serialise). Without: the system-prompt rendering (module doc); ``tools``
    empty means the tool list is left out (tool_choice none) but earlier calls and results still render."""
    if template_has_tools:
        return [_with_object_arguments(m) for m in messages]
    out: list[dict[str, Any]] = []
    for m in messages:
        role = m.get("role")
        if role == "assistant" and m.get("tool_calls"):
            calls = [fmt.write((c.get("function") or {}).get("name", ""), (c.get("function") or {}).get("arguments", ""))
                     for c in m["tool_calls"]]
            text = (m.get("content") or "")
            out.append({"role": "assistant", "content": (text + "\n" if text else "") + fmt.separator.join(calls)})
        elif role == "tool":
            block = f"<tool_response>\n{m.get('content') or ''}\n</tool_response>"
            if out and out[-1].get("_tool_results"):
                out[-1]["content"] += "\n" + block
            else:
                out.append({"role": "user", "content": block, "_tool_results": True})
        else:
            out.append(dict(m))
    for m in out:
        m.pop("_tool_results", None)
    if tools:
        prompt = tool_system_prompt(fmt, tools)
        if out and out[0].get("role") in ("system", "developer"):
            out[0] = dict(out[0], content=f"{out[0].get('content') or ''}\n\n{prompt}".lstrip())
        else:
            out.insert(0, {"role": "system", "content": prompt})
    return out


def _with_object_arguments(message: dict[str, Any]) -> dict[str, Any]:
    calls = message.get("tool_calls")
    if not calls:
        return message
    fixed = []
    for c in calls:
        fn = dict(c.get("function") or {})
        try:
            fn["arguments"] = json.loads(fn.get("arguments") or "{}")
        except ValueError:
            pass  # templates print a string as is
        fixed.append(dict(c, function=fn))
    return dict(message, tool_calls=fixed)


# -------------------------------------------------------------------------------------------- parsing

_MAX_HEADER_CHARS = 160  # a call's opening (trigger + name) longer than this is read as text
_HEADER = re.compile(r'\{\s*"name"\s*:\s*"((?:[^"\\]|\\.)*)"\s*,\s*"(?:arguments|parameters)"\s*:\s*')


def new_call_id() -> str:
    return "call_" + uuid.uuid4().hex[:24]


@dataclass
class _Call:
    index: int
    name: str
    arguments: list[str] = field(default_factory=list)
    depth: int = 0
    in_string: bool = False
    escaped: bool = False
    started: bool = False  # the arguments' first "{" seen
    done: bool = False


@dataclass(frozen=True)
class ParsedOutput:
    """A whole answer read back: its text and its calls as OpenAI ``tool_calls`` (whole)."""

    content: str
    tool_calls: list[dict[str, Any]]


class ToolCallParser:
    """Incremental reader of one choice's text (see module doc). ``feed`` returns (content text, stream
    pieces); ``finish`` flushes text held back at the end. Text that starts like a call but is not one stays
    content."""

    def __init__(self, fmt: ToolCallFormat) -> None:
        self.fmt = fmt
        self._buffer = ""
        self._call: _Call | None = None
        self._after_call = ""  # what must follow the arguments: the end marker
        self.calls: list[dict[str, Any]] = []  # whole calls so far (OpenAI shape)

    def feed(self, text: str) -> tuple[str, list[dict[str, Any]]]:
        self._buffer += text
        content: list[str] = []
        pieces: list[dict[str, Any]] = []
        while self._buffer:
            if self._call is not None:
                if not self._read_arguments(pieces):
                    break
                continue
            if self._after_call:
                if not self._read_end():
                    break
                continue
            start = self._buffer.find(self.fmt.trigger)
            if start < 0:
                keep = _partial_suffix(self._buffer, self.fmt.trigger)
                if self._between_calls(self._buffer[: len(self._buffer) - keep]):
                    break  # separators after a call: dropped if another call follows
                content.append(self._buffer[: len(self._buffer) - keep])
                self._buffer = self._buffer[len(self._buffer) - keep:]
                break
            head = self._buffer[start:]
            body = head[head.find("{"):] if "{" in head else ""
            match = _HEADER.match(body)
            if match is None:
                if len(head) < _MAX_HEADER_CHARS:  # may still become a header: wait for more text
                    if not self._between_calls(self._buffer[:start]):
                        content.append(self._buffer[:start])
                        self._buffer = head
                    break
                content.append(self._buffer[: start + len(self.fmt.trigger)])  # not a call: keep it as text
                self._buffer = self._buffer[start + len(self.fmt.trigger):]
                continue
            if not self._between_calls(self._buffer[:start]):  # separators between calls are not content
                content.append(self._buffer[:start])
            name = json.loads(f'"{match.group(1)}"')
            call = _Call(index=len(self.calls), name=name)
            self.calls.append({"id": new_call_id(), "type": "function", "function": {"name": name, "arguments": ""}})
            pieces.append({"index": call.index, "id": self.calls[-1]["id"], "type": "function",
                           "function": {"name": name, "arguments": ""}})
            self._call = call
            self._buffer = body[match.end():]
        return "".join(content), pieces

    def _between_calls(self, text: str) -> bool:
        return bool(self.calls) and not text.strip(" \n;")

    def _read_arguments(self, pieces: list[dict[str, Any]]) -> bool:
        """Consume argument characters; True when the arguments ended (then the end marker is expected)."""
        call = self._call
        assert call is not None
        taken = 0
        for ch in self._buffer:
            taken += 1
            if not call.started:
                if ch.isspace():
                    continue
                call.started = True
            if call.in_string:
                if call.escaped:
                    call.escaped = False
                elif ch == "\\":
                    call.escaped = True
                elif ch == '"':
                    call.in_string = False
            elif ch == '"':
                call.in_string = True
            elif ch in "{[":
                call.depth += 1
            elif ch in "}]":
                call.depth -= 1
            if call.depth == 0 and call.started and not call.in_string:
                call.done = True
                break
        fragment = self._buffer[:taken].lstrip() if not call.arguments else self._buffer[:taken]
        self._buffer = self._buffer[taken:]
        if fragment:
            call.arguments.append(fragment)
            self.calls[call.index]["function"]["arguments"] += fragment
            pieces.append({"index": call.index, "function": {"arguments": fragment}})
        if call.done:
            self._call = None
            self._after_call = self.fmt.end
        return call.done

    def _read_end(self) -> bool:
        """Consume the end marker (whitespace-tolerant); True when it is complete."""
        while self._buffer and self._after_call:
            ch, want = self._buffer[0], self._after_call[0]
            if ch == want:
                self._after_call = self._after_call[1:]
                self._buffer = self._buffer[1:]
            elif ch.isspace():
                self._buffer = self._buffer[1:]
            elif want.isspace():
                self._after_call = self._after_call[1:]
            else:
                self._after_call = ""  # a model that skipped the marker: go on reading text
        return not self._after_call

    def finish(self) -> str:
        """Text still held back (a partial trigger, an unfinished header) as content."""
        if self._call is not None or self._after_call:
            self._buffer = ""
            return ""
        rest, self._buffer = self._buffer, ""
        return "" if self._between_calls(rest) else rest


def parse_output(fmt: ToolCallFormat, text: str) -> ParsedOutput:
    parser = ToolCallParser(fmt)
    content, _ = parser.feed(text)
    content += parser.finish()
    return ParsedOutput(content, parser.calls)


def _partial_suffix(text: str, trigger: str) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of ``trigger``."""
    for n in range(min(len(text), len(trigger) - 1), 0, -1):
        if trigger.startswith(text[-n:]):
            return n
    return 0


# -------------------------------------------------------------------------------------------- checks


def invalid_call_reason(call: dict[str, Any], tools: Iterable[Tool]) -> str | None:
    """Why a whole call is not a valid call of one of ``tools`` (unparsable arguments, unknown tool,
    arguments that fail the tool's schema), or None when it is valid."""
    fn = call.get("function") or call
    name, arguments = fn.get("name"), fn.get("arguments")
    by_name = {t.name: t for t in tools}
    if name not in by_name:
        return f"unknown tool {name!r}"
    try:
        args = json.loads(arguments or "")
    except ValueError:
        return f"arguments of {name!r} are not JSON"
    try:
        import jsonschema

        jsonschema.validate(args, by_name[name].parameters)
    except ImportError:  # jsonschema is a gateway dependency; without it only JSON-ness is checked
        return None
    except jsonschema.ValidationError as exc:
        return f"arguments of {name!r} fail its schema: {exc.message}"
    return None
