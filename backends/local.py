"""LocalBackend: the Backend protocol over the embedded engine (one in-process replica).

Turns a GenerationRequest into prompt token ids (the tokenizer's chat template, a Jinja override, or
"gemma_plain" Gemma turns, or "plain_turns" plain-text turns for base models), hands the request's
SamplingParams to the engine (as is; a built-in template appends its end-of-turn stops), streams the
engine's incremental text as Deltas, and maps engine errors to BackendError: prompt too long → 400
``context_length_exceeded``; a schema the grammar compiler refuses → 400 ``invalid_schema``; a token id
outside the vocabulary → 400 ``invalid_parameter``. Sampling values were validated when the SamplingParams
was built.

Agents: ``tools`` render through the chat template when it takes them, else through the system-prompt
rendering of ``backends/tool_calls.py``; ``tool_choice`` becomes a grammar (a structural tag) and the output
is read back into OpenAI tool-call pieces, ending with finish_reason ``tool_calls``. ``response_format``
``json_object`` / ``json_schema`` becomes a grammar too (``backends/engine/structured_output.py``).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
from collections.abc import AsyncIterator

from backends.base import BackendError, Delta, GenerationRequest, TokenLogprob, Usage
from backends.engine.args import EngineArgs
from backends.engine.async_engine import AsyncEngine, EngineDeadError
from backends.engine.llm_engine import ContextLengthError, LLMEngine
from backends.engine.sampling_params import SamplingParams
from backends.engine.sequence import TokenLogprobs
from backends.engine.stats import StatLogger
from backends.engine.structured_output import GrammarError, StructuredOutput
from backends.tool_calls import (
    HERMES,
    ToolCallFormat,
    ToolCallParser,
    choice_mode,
    render_messages,
    resolve_format,
    structural_tag,
    template_takes_tools,
    tools_of,
)

GEMMA_PLAIN = "gemma_plain"
PLAIN_TURNS = "plain_turns"
BUILTIN_TEMPLATES = (GEMMA_PLAIN, PLAIN_TURNS)
END_OF_TURN = "<end_of_turn>"
PLAIN_TURNS_STOPS = ("\nUser:", "\nAssistant:")


def plain_turns_prompt(messages: list[dict]) -> str:
    """Plain-text turns for base models that never learned turn tokens (e.g. Gemma-3-270M base).

    ``System: ...`` (if any), then ``User: ...`` / ``Assistant: ...`` lines, ending with ``Assistant:``;
    generation stops at the next ``\nUser:`` or ``\nAssistant:``. Measured on gemma3-270m base, greedy:
    Gemma's own ``<start_of_turn>`` format makes it echo the question plus junk tokens, while these plain
    turns give answers ("The capital of France is Paris.").
    """
    parts: list[str] = []
    for m in messages:
        role, content = m.get("role"), _content_text(m.get("content")).strip()
        if role in ("system", "developer"):
            parts.append(f"System: {content}\n")
        elif role == "assistant":
            parts.append(f"Assistant: {content}\n")
        else:
            parts.append(f"User: {content}\n")
    return "".join(parts) + "Assistant:"


def gemma_plain_prompt(messages: list[dict]) -> str:
    """Plain Gemma turns; a system message is folded into the first user turn (Gemma has no system role)."""
    parts: list[str] = []
    system = ""
    for m in messages:
        role, content = m.get("role"), _content_text(m.get("content"))
        if role == "system" or role == "developer":
            system += content + "\n\n"
            continue
        turn_role = "model" if role == "assistant" else "user"
        if turn_role == "user" and system:
            content, system = system + content, ""
        parts.append(f"<start_of_turn>{turn_role}\n{content}{END_OF_TURN}\n")
    if system:
        parts.append(f"<start_of_turn>user\n{system.rstrip()}{END_OF_TURN}\n")
    return "".join(parts) + "<start_of_turn>model\n"


def builtin_prompt(template: str | None, messages: list[dict]) -> str | None:
    """Prompt text for a built-in template name, or None when ``template`` is not one."""
    if template == GEMMA_PLAIN:
        return gemma_plain_prompt(messages)
    if template == PLAIN_TURNS:
        return plain_turns_prompt(messages)
    return None


def builtin_stops(template: str | None) -> tuple[str, ...]:
    """Stop strings a built-in template needs (its end-of-turn markers)."""
    return {GEMMA_PLAIN: (END_OF_TURN,), PLAIN_TURNS: PLAIN_TURNS_STOPS}.get(template or "", ())


def _content_text(content) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    return "".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text")


class LocalBackend:
    """One in-process engine replica of ``model`` (a bundled name or a local HF folder).

    ``stat_logger`` (optional) receives the engine's per-step numbers (``backends/engine/stats.py``) on the
    engine thread; the gateway passes one that records them in its Prometheus registry.
    """

    def __init__(self, name: str, model: str, args: EngineArgs | None = None, chat_template: str | None = None,
                 stat_logger: StatLogger | None = None, tool_call_parser: str = "auto") -> None:
        from backends.models import chat_template_override

        self.name = name
        self.model = model
        self.args = args or EngineArgs()
        self.chat_template = chat_template or chat_template_override(model)
        self.stat_logger = stat_logger
        self.tool_call_parser = tool_call_parser
        self.tool_format: ToolCallFormat = HERMES  # resolved from the template at load
        self._template_has_tools = False
        self.engine: AsyncEngine | None = None
        self._load_lock = asyncio.Lock()
        self._ids = itertools.count()
        self._template_stops: tuple[tuple[str, ...], tuple[int, ...]] = ((), ())

    # ------------------------------------------------------------------ lifecycle
    async def load(self) -> None:
        async with self._load_lock:
            if self.engine is None:
                from backends.models import resolve_model_path

                path = await asyncio.to_thread(resolve_model_path, self.model)
                loggers = [self.stat_logger] if self.stat_logger is not None else []
                self.engine = await AsyncEngine.create(path, self.args, stat_loggers=loggers)
                self._template_stops = self._end_of_turn_stops()
                source = self.chat_template if self.chat_template not in BUILTIN_TEMPLATES else None
                source = source or getattr(self.tokenizer, "chat_template", None)
                if not isinstance(source, str):
                    source = None
                self.tool_format = resolve_format(self.tool_call_parser, source)
                self._template_has_tools = template_takes_tools(source)

    async def close(self) -> None:
        if self.engine is not None:
            await self.engine.shutdown()
            self.engine = None

    async def health(self) -> bool:
        return self.engine is not None and self.engine.is_running

    @property
    def llm_engine(self) -> LLMEngine:
        if self.engine is None:
            raise BackendError(f"{self.name}: model not loaded", retryable=True, status_code=503)
        return self.engine.engine

    @property
    def tokenizer(self):
        return self.llm_engine.tokenizer

    @property
    def max_model_len(self) -> int:
        return self.llm_engine.max_model_len

    # ------------------------------------------------------------------ prompts
    def prompt_token_ids(self, request: GenerationRequest) -> list[int]:
        tok = self.tokenizer
        if request.messages is None:
            if isinstance(request.prompt, list):
                return [int(t) for t in request.prompt]
            return tok(request.prompt or "")["input_ids"]
        messages, tools = self._agent_messages(request)
        text = builtin_prompt(self.chat_template, messages)
        if text is not None:
            return tok(text)["input_ids"]
        template = self.chat_template
        if template is None and not getattr(tok, "chat_template", None):
            raise BackendError(
                f"model {self.model!r} has no chat template; configure chat_template for its pool",
                retryable=False, status_code=400, code="chat_template_missing",
            )
        messages = [dict(m, content=_content_text(m.get("content"))) for m in messages]
        kwargs = dict(request.chat_template_kwargs or {})
        if tools and self._template_has_tools:
            kwargs["tools"] = [t.as_openai() for t in tools]
        text = tok.apply_chat_template(messages, chat_template=template, add_generation_prompt=True, tokenize=False,
                                       **kwargs)
        return tok(text, add_special_tokens=False)["input_ids"]

    def _agent_messages(self, request: GenerationRequest) -> tuple[list[dict], list]:
        """The messages to render and the tools to show: tool history and tool lists in the model's format
        (``backends/tool_calls.py``); unchanged for a request with neither."""
        messages = request.messages or []
        has_history = any(m.get("tool_calls") or m.get("role") == "tool" for m in messages)
        tools = tools_of(request.tools)
        if choice_mode(request.tool_choice, tools) == "none":
            tools = []
        if not (tools or has_history):
            return messages, []
        return render_messages(messages, tools, self.tool_format, template_has_tools=self._template_has_tools), tools

    def num_prompt_tokens(self, request: GenerationRequest) -> int | None:
        if self.engine is None:
            return None
        return len(self.prompt_token_ids(request))

    def _end_of_turn_stops(self) -> tuple[tuple[str, ...], tuple[int, ...]]:
        """(stop strings, stop token ids) a built-in chat template adds to chat requests; computed at load."""
        if self.chat_template == GEMMA_PLAIN:
            eot = self.tokenizer.convert_tokens_to_ids(END_OF_TURN)
            if isinstance(eot, int) and eot != self.tokenizer.unk_token_id:
                return (), (eot,)
            return (END_OF_TURN,), ()
        return builtin_stops(self.chat_template), ()

    def sampling_params(self, request: GenerationRequest) -> SamplingParams:
        """What the engine gets: ``request.sampling`` itself, or a copy with the grammar the request's
        ``tool_choice`` / ``response_format`` asks for and — for a chat request under a built-in template —
        the template's end-of-turn stops appended. Raises BackendError 400 for a tool_choice naming no tool."""
        params = request.sampling
        structured = self.structured_output(request)
        if structured is not None:
            params = dataclasses.replace(params, structured=structured)
        stops, stop_ids = self._template_stops
        if request.messages is None or not (stops or stop_ids):
            return params
        return dataclasses.replace(params, stop=params.stop + stops, stop_token_ids=params.stop_token_ids + stop_ids)

    def structured_output(self, request: GenerationRequest) -> StructuredOutput | None:
        """Tool calls (when tool_choice is not "none") take precedence over response_format."""
        tools = tools_of(request.tools)
        if request.messages is not None and choice_mode(request.tool_choice, tools) != "none":
            parallel = request.parallel_tool_calls is not False
            try:
                tag = structural_tag(self.tool_format, tools, request.tool_choice, parallel)
            except ValueError as exc:
                raise BackendError(str(exc), retryable=False, status_code=400, code="invalid_tool_choice",
                                   param="tool_choice") from exc
            return StructuredOutput.structural_tag(tag) if tag is not None else None
        fmt = request.response_format or {}
        if fmt.get("type") == "json_object":
            return StructuredOutput("json_object")
        if fmt.get("type") == "json_schema":
            spec = fmt.get("json_schema") or {}
            return StructuredOutput.json_schema(spec.get("schema") or {}, strict=bool(spec.get("strict")))
        return None

    def _logprobs(self, items: list[TokenLogprobs]) -> tuple[TokenLogprob, ...]:
        tok = self.tokenizer
        return tuple(
            TokenLogprob(
                token=tok.decode([lp.token_id]), logprob=lp.logprob, token_id=lp.token_id,
                top_logprobs=tuple((tok.decode([t]), v) for t, v in lp.top),
            )
            for lp in items
        )

    # ------------------------------------------------------------------ generation
    async def generate(self, request: GenerationRequest) -> AsyncIterator[Delta]:
        if request.has_images:
            raise BackendError(f"{self.name}: the embedded engine is text-only; image input needs a remote pool "
                               "with supports_vision", retryable=False, status_code=400,
                               code="image_input_not_supported", param="messages")
        if self.engine is None or not self.engine.is_running:
            raise BackendError(f"{self.name}: engine not running", retryable=True, status_code=503)
        prompt = self.prompt_token_ids(request)
        params = self.sampling_params(request)
        if params.structured is not None:  # compile off the event loop (cached); a bad schema is a 400 here
            try:
                await asyncio.to_thread(self.llm_engine.compile_grammar, params.structured)
            except GrammarError as exc:
                param = "tools" if params.structured.kind == "structural_tag" else "response_format"
                raise BackendError(f"The {param} schema cannot be compiled: {exc}", retryable=False,
                                   status_code=400, code="invalid_schema", param=param) from exc
        parsers = ({i: ToolCallParser(self.tool_format) for i in range(params.n)}
                   if params.structured is not None and params.structured.kind == "structural_tag" else None)
        if len(prompt) >= self.max_model_len:
            raise BackendError(
                f"This model's maximum context length is {self.max_model_len} tokens; the prompt has "
                f"{len(prompt)} tokens (at least 1 more is needed for the answer).",
                retryable=False, status_code=400, code="context_length_exceeded",
            )
        engine_id = f"{request.request_id}#{next(self._ids)}"
        completion_tokens = 0
        cached = 0
        open_choices = params.n
        started = False
        stream = self.engine.stream(engine_id, prompt, params, priority=request.priority,
                                    session_id=request.session_id,
                                    program_id=request.program_id or request.session_id,
                                    namespace=request.namespace)
        try:
            async with contextlib.aclosing(stream):
                async for out in stream:
                    completion_tokens += len(out.new_token_ids)
                    if out.index == 0:
                        cached = out.num_cached_tokens
                    if out.finished:
                        open_choices -= 1
                    is_final = open_choices == 0
                    started = True
                    text, pieces, reason = out.new_text, None, out.finish_reason
                    if parsers is not None:
                        parser = parsers[out.index]
                        text, pieces = parser.feed(text)
                        if out.finished:
                            text += parser.finish()
                            if parser.calls and reason == "stop":
                                reason = "tool_calls"
                    yield Delta(
                        index=out.index, text=text, token_ids=tuple(out.new_token_ids),
                        logprobs=self._logprobs(out.new_logprobs), finish_reason=reason,  # type: ignore[arg-type]
                        tool_calls=pieces or None, is_final=is_final,
                        usage=Usage(len(prompt), completion_tokens, cached) if is_final else None,
                    )
        except ContextLengthError as exc:
            raise BackendError(str(exc), retryable=False, status_code=400, code="context_length_exceeded") from exc
        except EngineDeadError as exc:
            raise BackendError(str(exc), retryable=not started, status_code=500 if started else 503,
                               after_first_token=started) from exc
        except ValueError as exc:  # the engine rejected the input (e.g. a token id outside the vocabulary)
            raise BackendError(str(exc), retryable=False, status_code=400, code="invalid_parameter",
                               param=getattr(exc, "param", None), after_first_token=started) from exc
