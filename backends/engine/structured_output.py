"""Structured output: a grammar a request's output must follow, compiled with xgrammar.

``StructuredOutput`` is what a caller puts in ``SamplingParams.structured`` — a JSON Schema, "any JSON
object", or an xgrammar structural tag (free text with constrained tagged regions: how tool calls are
constrained, see ``backends/tool_calls.py``). ``GrammarCompiler`` (one per engine, i.e. per tokenizer)
compiles each distinct spec once and keeps it; every sequence of a constrained request gets its own
``GrammarMatcher``, advanced on each committed token. Before sampling, the matcher fills its row of a
token bitmask and the sampler masks the logits with it (before penalties and temperature), so only tokens
that keep the output inside the grammar can be drawn. When the grammar is complete the mask allows only
the stop tokens, so the sequence ends with finish_reason "stop"; a sequence cut by ``max_tokens`` ends with
"length" and its output is a prefix of a valid one, not a valid one.

Why xgrammar rather than llguidance: it is vLLM's and SGLang's default, it compiles a JSON Schema to a
pushdown automaton with a per-token-class cache (a mask fill is ~tens of µs on CPU), it ships structural
tags for tool-call formats, and its matcher supports rollback (needed by speculative decoding). Preemption
in this engine recomputes KV but keeps the committed tokens, so a matcher never has to roll back for it.
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass
from typing import Any, Literal

Kind = Literal["json_schema", "json_object", "structural_tag"]
KINDS: tuple[str, ...] = ("json_schema", "json_object", "structural_tag")


class GrammarError(ValueError):
    """A spec xgrammar cannot compile; the message says which part and why."""


@dataclass(frozen=True)
class StructuredOutput:
    """``kind`` json_schema: ``spec`` is the schema as JSON text; json_object: any JSON object (``spec``
    empty); structural_tag: an xgrammar structural tag as JSON text. ``strict`` False lets objects carry
    properties the schema does not name (OpenAI's ``strict: false``); True forbids them unless the schema
    allows them. Output JSON is compact (no whitespace between tokens), which small models also follow
    more reliably than free whitespace."""

    kind: Kind
    spec: str = ""
    strict: bool = True

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"structured output kind must be one of {', '.join(KINDS)}; got {self.kind!r}")
        if self.kind != "json_object" and not self.spec:
            raise ValueError(f"structured output {self.kind} needs a spec")

    @classmethod
    def json_schema(cls, schema: dict[str, Any] | str, strict: bool = True) -> StructuredOutput:
        text = schema if isinstance(schema, str) else json.dumps(schema)
        return cls("json_schema", text, strict)

    @classmethod
    def structural_tag(cls, tag: dict[str, Any]) -> StructuredOutput:
        return cls("structural_tag", json.dumps(tag))


class GrammarCompiler:
    """Compiles ``StructuredOutput`` specs for one tokenizer and caches them (thread-safe: the gateway
    compiles in a worker thread to validate a request, the engine thread reuses the result)."""

    def __init__(self, tokenizer: Any, vocab_size: int, stop_token_ids: list[int], max_cached: int = 256) -> None:
        import xgrammar as xgr

        self._xgr = xgr
        info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size, stop_token_ids=stop_token_ids)
        self.vocab_size = vocab_size
        self._compiler = xgr.GrammarCompiler(info, cache_enabled=False)
        self._cache: dict[StructuredOutput, Any] = {}
        self._max_cached = max_cached
        self._lock = threading.Lock()
        self.num_compiled = 0  # cache misses since start

    def compile(self, spec: StructuredOutput) -> Any:
        """The compiled grammar for ``spec`` (cached). Raises GrammarError for a spec it cannot compile."""
        with self._lock:
            hit = self._cache.get(spec)
        if hit is not None:
            return hit
        compiled = self._compile(spec)
        with self._lock:
            if len(self._cache) >= self._max_cached:
                self._cache.pop(next(iter(self._cache)))  # oldest first
            self._cache[spec] = compiled
            self.num_compiled += 1
        return compiled

    def _compile(self, spec: StructuredOutput) -> Any:
        xgr, c = self._xgr, self._compiler
        try:
            if spec.kind == "structural_tag":
                grammar = xgr.Grammar.from_structural_tag(spec.spec)
            else:
                schema = '{"type": "object"}' if spec.kind == "json_object" else spec.spec
                strict = spec.strict and spec.kind == "json_schema"
                grammar = xgr.Grammar.from_json_schema(schema, any_whitespace=False, strict_mode=strict)
            text = str(grammar)
            if _LENGTH_BOUNDED_CHAR in text:
                grammar = xgr.Grammar.from_ebnf(text.replace(_LENGTH_BOUNDED_CHAR, _JSON_STRING_CHAR))
            return c.compile_grammar(grammar)
        except (RuntimeError, ValueError, TypeError) as exc:  # xgrammar's errors name the failing construct
            raise GrammarError(_one_line(exc)) from exc

    def matcher(self, compiled: Any) -> Any:
        return self._xgr.GrammarMatcher(compiled)

    def allocate_bitmask(self, num_rows: int) -> Any:
        return self._xgr.allocate_token_bitmask(num_rows, self.vocab_size)

    def apply_bitmask(self, logits: Any, bitmask: Any) -> None:
        """Mask ``logits`` [rows, vocab] in place: disallowed tokens become -inf."""
        self._xgr.apply_token_bitmask_inplace(logits, bitmask.to(logits.device, non_blocking=True))


# xgrammar 0.2.8 writes the characters of a string with minLength/maxLength as [^"\\\r\n], which admits raw
# control characters that JSON forbids; they are put back to the class its unbounded strings use.
_LENGTH_BOUNDED_CHAR = r'[^\"\\\r\n]'
_JSON_STRING_CHAR = r'[^\0-\x1f\"\\]'


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text[:500] or type(exc).__name__
