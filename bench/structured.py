"""`switchyard bench engine --structured`: JSON-Schema-constrained decoding beside free decoding and llama.cpp.

What it measures (model ``smollm2-135m`` by default; the same chat prompts for every system, greedy):

* output tokens/s at 1, 8 and 32 concurrent requests, all requests of a level submitted at once. Each
  prompt is a chat (the model's own chat template) asking to "Extract the event from: <a short message>";
  the schema (``EVENT_SCHEMA``) is a calendar event with nested objects, enums, an array of objects, integers
  and a number with ranges, patterned strings and strings with maxLength. Rows:
  - (a) switchyard, constrained: ``SamplingParams(structured=StructuredOutput.json_schema(schema))``;
  - (b) switchyard, unconstrained: the same prompts and ``max_tokens``, ending at EOS or ``max_tokens``;
  - (b=) switchyard, unconstrained with each request's length fixed to what (a) produced for it (EOS
    ignored): the same tokens per request and the same batch shape over time, so (a)/(b=) is the cost of
    the grammar alone, while (a)/(b) also carries the different output lengths;
  - (c) llama.cpp's ``llama-server`` on the GGUF ``smollm2-135m`` is converted from, ``/v1/chat/completions``
    with ``response_format: {"type": "json_schema", "json_schema": {"name", "schema"}}`` (its own
    schema → GBNF conversion), ``-np 32`` parallel slots, requests sent concurrently, not streamed.
  Constrained outputs end when the JSON is complete (EOS), so tokens/s = total generated tokens / wall time
  (first submission → last token). Outputs are parsed as JSON and validated against the schema
  (``jsonschema``); the counts are printed per row.
* grammar compile time: ``engine.compile_grammar(StructuredOutput.json_schema(schema))`` for a few
  distinct schemas (a calendar event, an invoice, a support ticket), cold (each schema text new to the
  engine: every repeat changes a description field) and cached (the same text again, a cache hit), plus the
  one-off tokenizer-vocabulary setup of the engine's first grammar.

Each concurrency level runs (a), (b), (b=) and (c) back to back, round by round (llama-server is started
first and idles while the engine runs), so a drift in the machine's load hits all rows of a level alike.
Threads: every system runs with ``--threads`` (2) threads, one at a time, after a warm-up (which compiles
the event schema, so the timed rows use the cached grammar, as a server does after a schema's first request;
llama-server converts the schema on every request). llama-server comes from ``.bench/llamacpp`` (built once
by ``switchyard bench engine``; see /work/shared/PEERS.md) or ``--llama-server PATH``.

``switchyard bench engine --structured [--quick] [--json] [--skip-llamacpp] [--concurrency 1,8,32]
[--max-tokens 256] [--compile-repeats 3] [--threads 2] [--quantization none|int8|int4]``
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import copy
import json
import os
import random
import statistics
import subprocess
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from bench.engine import LlamaServer, ensure_llama_server, rounds_for, say

SYSTEM_PROMPT = "You extract calendar events from messages. Answer with one JSON object and nothing else."

EVENT_SCHEMA: dict[str, Any] = {
    "title": "calendar_event",
    "description": "A calendar event extracted from a message.",
    "type": "object",
    "properties": {
        "title": {"type": "string", "maxLength": 48},
        "category": {"enum": ["meeting", "call", "social", "travel", "deadline", "appointment"]},
        "date": {"type": "string", "pattern": "^[0-9]{4}-[0-9]{2}-[0-9]{2}$"},
        "start_time": {"type": "string", "pattern": "^[0-2][0-9]:[0-5][0-9]$"},
        "duration_minutes": {"type": "integer", "minimum": 5, "maximum": 480},
        "location": {
            "type": "object",
            "properties": {
                "name": {"type": "string", "maxLength": 40},
                "is_virtual": {"type": "boolean"},
            },
            "required": ["name", "is_virtual"],
            "additionalProperties": False,
        },
        "attendees": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {
                    "name": {"type": "string", "maxLength": 30},
                    "role": {"enum": ["organizer", "required", "optional"]},
                },
                "required": ["name", "role"],
                "additionalProperties": False,
            },
            "minItems": 1,
            "maxItems": 4,
        },
        "priority": {"enum": ["low", "normal", "high"]},
        "reminder_minutes": {"type": "integer", "minimum": 0, "maximum": 1440},
        "confidence": {"type": "number", "minimum": 0, "maximum": 1},
    },
    "required": ["title", "category", "date", "start_time", "duration_minutes", "location", "attendees",
                 "priority", "reminder_minutes", "confidence"],
    "additionalProperties": False,
}

INVOICE_SCHEMA: dict[str, Any] = {
    "title": "invoice",
    "description": "An invoice extracted from an email.",
    "type": "object",
    "properties": {
        "invoice_number": {"type": "string", "pattern": "^INV-[0-9]{4,8}$"},
        "issue_date": {"type": "string", "pattern": "^[0-9]{4}-[0-9]{2}-[0-9]{2}$"},
        "currency": {"enum": ["USD", "EUR", "GBP", "JPY", "CHF"]},
        "customer": {
            "type": "object",
            "properties": {
                "name": {"type": "string", "maxLength": 50},
                "email": {"type": "string", "maxLength": 60},
                "address": {
                    "type": "object",
                    "properties": {
                        "street": {"type": "string", "maxLength": 60},
                        "city": {"type": "string", "maxLength": 40},
                        "country": {"type": "string", "pattern": "^[A-Z]{2}$"},
                    },
                    "required": ["street", "city", "country"],
                    "additionalProperties": False,
                },
            },
            "required": ["name", "address"],
            "additionalProperties": False,
        },
        "line_items": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {
                    "description": {"type": "string", "maxLength": 80},
                    "quantity": {"type": "integer", "minimum": 1, "maximum": 10000},
                    "unit_price": {"type": "number", "minimum": 0, "maximum": 100000},
                    "tax_rate": {"type": "number", "minimum": 0, "maximum": 0.3},
                },
                "required": ["description", "quantity", "unit_price"],
                "additionalProperties": False,
            },
            "minItems": 1,
            "maxItems": 20,
        },
        "status": {"enum": ["draft", "sent", "paid", "overdue", "void"]},
        "total": {"type": "number", "minimum": 0},
        "notes": {"type": "string", "maxLength": 200},
    },
    "required": ["invoice_number", "issue_date", "currency", "customer", "line_items", "status", "total"],
    "additionalProperties": False,
}

TICKET_SCHEMA: dict[str, Any] = {
    "title": "support_ticket",
    "description": "A customer support ticket triaged from a chat transcript.",
    "type": "object",
    "properties": {
        "summary": {"type": "string", "maxLength": 120},
        "product": {"enum": ["web app", "ios app", "android app", "api", "billing", "other"]},
        "severity": {"type": "integer", "minimum": 1, "maximum": 4},
        "sentiment": {"type": "number", "minimum": -1, "maximum": 1},
        "customer": {
            "type": "object",
            "properties": {
                "id": {"type": "string", "pattern": "^C[0-9]{6}$"},
                "plan": {"enum": ["free", "pro", "enterprise"]},
                "tenure_months": {"type": "integer", "minimum": 0, "maximum": 600},
            },
            "required": ["id", "plan"],
            "additionalProperties": False,
        },
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 24}, "maxItems": 8},
        "steps_to_reproduce": {"type": "array", "items": {"type": "string", "maxLength": 100}, "maxItems": 10},
        "needs_engineering": {"type": "boolean"},
    },
    "required": ["summary", "product", "severity", "customer", "tags", "needs_engineering"],
    "additionalProperties": False,
}

COMPILE_SCHEMAS: dict[str, dict[str, Any]] = {
    "calendar_event": EVENT_SCHEMA, "invoice": INVOICE_SCHEMA, "support_ticket": TICKET_SCHEMA,
}


@dataclass
class Row:
    """One system at one concurrency: what ``num_requests`` requests produced and how long it took."""

    system: str
    concurrency: int
    num_requests: int
    num_tokens: int  # generated tokens, summed over requests (EOS included where the system counts it)
    wall_s: float  # first submission → last token, summed over rounds
    num_parsed: int  # outputs that json.loads accepts
    num_valid: int  # ... and that validate against the schema
    num_stopped: int  # finish_reason "stop" (ended by EOS), the rest ran into max_tokens

    @property
    def tokens_per_s(self) -> float:
        return self.num_tokens / self.wall_s if self.wall_s > 0 else 0.0


@dataclass
class CompileTimes:
    schema: str
    cold_ms: list[float]
    cached_us: list[float]


# ----------------------------------------------------------------------------- prompts
_PEOPLE = ["Alice Chen", "Bob Martins", "Carla Diaz", "Deepak Rao", "Emma Novak", "Farid Haddad", "Grace Kim",
           "Hugo Lefevre", "Ines Costa", "Jonas Berg", "Keiko Sato", "Liam O'Brien", "Maya Patel", "Nils Olsen"]
_TOPICS = ["Q3 budget review", "design sync", "onboarding", "quarterly planning", "launch retro", "hiring debrief",
           "dentist check-up", "team lunch", "flight to Lisbon", "tax filing", "board prep", "code freeze",
           "customer demo", "birthday dinner", "vendor call", "security audit"]
_PLACES = [("conference room B", False), ("the Zoom link in the invite", True), ("Cafe Lumen on 5th Street", False),
           ("the Berlin office, 3rd floor", False), ("Google Meet", True), ("Dr. Weber's practice", False),
           ("terminal 2 at the airport", False), ("a Teams call", True), ("the rooftop bar", False)]
_MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
           "November", "December"]
_DURATIONS = ["30 minutes", "45 minutes", "an hour", "90 minutes", "two hours", "15 minutes", "half a day"]
_TEMPLATES = [
    "Hi all, let's hold the {topic} on {date} at {time} in {place}. {people} should join; {organizer} is "
    "organizing. Plan for {duration}.",
    "Reminder: {organizer} booked {duration} for the {topic} on {date}, {time}, {place}. Invited: {people}.",
    "{organizer} wrote: can we do the {topic} {date} at {time}? It should take {duration}, {place}. Please loop "
    "in {people}, they are optional.",
    "Calendar note from {organizer}: {topic}, {date} {time}, {duration}. Where: {place}. With {people}. "
    "Mark it high priority and remind me an hour before.",
    "Quick one - {topic} moved to {date} at {time} ({duration}, {place}). {organizer} owns it, {people} "
    "must attend.",
]


def event_messages(num: int, seed: int) -> list[str]:
    """``num`` short, varied messages that each describe one calendar event (deterministic in ``seed``)."""
    rng = random.Random(seed)
    out = []
    for _ in range(num):
        day, month, year = rng.randint(1, 28), rng.choice(_MONTHS), rng.choice([2025, 2026])
        hour, minute = rng.randint(7, 19), rng.choice([0, 15, 30, 45])
        date = rng.choice([f"{month} {day}, {year}", f"{year}-{_MONTHS.index(month) + 1:02d}-{day:02d}",
                           f"{day} {month} {year}"])
        time_text = rng.choice([f"{hour:02d}:{minute:02d}",
                                f"{(hour - 1) % 12 + 1}:{minute:02d} {'am' if hour < 12 else 'pm'}"])
        people = rng.sample(_PEOPLE, rng.randint(2, 4))
        place, _ = rng.choice(_PLACES)
        out.append(rng.choice(_TEMPLATES).format(
            topic=rng.choice(_TOPICS), date=date, time=time_text, place=place, duration=rng.choice(_DURATIONS),
            organizer=people[0], people=" and ".join([", ".join(people[1:-1]), people[-1]]) if len(people) > 2
            else people[1]))
    return out


def chat_messages(text: str) -> list[dict[str, str]]:
    return [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": f"Extract the event from: {text}"}]


def chat_prompt_ids(tokenizer, messages: list[dict[str, str]]) -> list[int]:
    """The model's chat template rendered and tokenized as the gateway does (backends/local.py)."""
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


# ----------------------------------------------------------------------------- options
def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="switchyard bench engine --structured", description=__doc__.split("\n\n")[0])
    p.add_argument("--structured", action="store_true", help="(this benchmark; accepted and ignored)")
    p.add_argument("--model", default="smollm2-135m", help="bundled model name or HF folder")
    p.add_argument("--concurrency", default=None, help="comma list of concurrent requests (default 1,8,32)")
    p.add_argument("--max-tokens", type=int, default=None, help="max_tokens per request (default 256)")
    p.add_argument("--compile-repeats", type=int, default=None,
                   help="cold compiles per schema, each with a new description (default 3)")
    p.add_argument("--threads", type=int, default=2, help="CPU threads for every system (default 2)")
    p.add_argument("--quantization", default="none", choices=("none", "int8", "int4"),
                   help="switchyard's weights (default none: fp32)")
    p.add_argument("--quick", action="store_true", help="small sizes for a smoke run (c=1,4; 96 tokens)")
    p.add_argument("--skip-llamacpp", action="store_true", help="do not build/run llama-server")
    p.add_argument("--llama-server", type=Path, default=None, help="use this llama-server binary (no build)")
    p.add_argument("--bench-dir", type=Path, default=Path(".bench"), help="where peers are built (git-ignored)")
    p.add_argument("--json", action="store_true", help="print one JSON object on the last line")
    opts = p.parse_args(argv)
    opts.concurrency = [int(c) for c in (opts.concurrency or ("1,4" if opts.quick else "1,8,32")).split(",")]
    opts.max_tokens = opts.max_tokens or (96 if opts.quick else 256)
    opts.compile_repeats = opts.compile_repeats or (1 if opts.quick else 3)
    if min(opts.concurrency) < 1 or opts.max_tokens < 1 or opts.threads < 1 or opts.compile_repeats < 1:
        raise ValueError("--concurrency/--max-tokens/--threads/--compile-repeats must be >= 1")
    return opts


# ----------------------------------------------------------------------------- checking outputs
def check_outputs(texts: list[str], schema: dict[str, Any]) -> tuple[int, int]:
    """(how many parse as JSON, how many of those validate against ``schema``)."""
    import jsonschema

    validator = jsonschema.Draft202012Validator(schema)
    parsed = valid = 0
    for text in texts:
        try:
            value = json.loads(text)
        except ValueError:
            continue
        parsed += 1
        valid += validator.is_valid(value)
    return parsed, valid


# ----------------------------------------------------------------------------- switchyard
def ours_engine(model: str, opts: argparse.Namespace):
    from backends.engine.args import EngineArgs
    from backends.engine.llm_engine import LLMEngine
    from backends.models import resolve_model_path

    options = EngineArgs(quantization=opts.quantization, max_num_seqs=max(32, max(opts.concurrency)),
                         num_threads=opts.threads,
                         max_model_len=2048, kv_cache_memory_gb=1.0, enable_prefix_caching=True)
    return LLMEngine(resolve_model_path(model), options, device="cpu")


def ours_generate(engine, prompts: list[list[int]], params: list) -> tuple[float, list[list[int]], list[str], list[str]]:
    """Every prompt at once, stepped to completion: (wall_s, token ids, texts, finish reasons) per prompt."""
    start = time.perf_counter()
    results = engine.generate(prompts, params)
    wall = time.perf_counter() - start
    return (wall, [r.token_ids for r in results], [r.text for r in results],
            [r.outputs[0].finish_reason or "" for r in results])


def compile_times(engine, repeats: int) -> tuple[float, list[CompileTimes]]:
    """(ms to build the engine's grammar compiler — the tokenizer's vocabulary read once — and per-schema
    cold/cached ``compile_grammar`` times). Cold: a schema text the engine has not seen (the description
    carries the repeat index); cached: the same call again. Both time the whole
    ``compile_grammar(StructuredOutput.json_schema(schema_dict))`` a request pays, JSON encoding included."""
    from backends.engine.structured_output import StructuredOutput

    t = time.perf_counter()
    _ = engine.grammar_compiler
    setup_ms = (time.perf_counter() - t) * 1e3
    out = []
    for name, base in COMPILE_SCHEMAS.items():
        result = CompileTimes(name, [], [])
        for i in range(repeats):
            schema = copy.deepcopy(base)
            schema["description"] = f"{base['description']} (benchmark variant {i}, pid {os.getpid()})"
            t = time.perf_counter()
            engine.compile_grammar(StructuredOutput.json_schema(schema))
            result.cold_ms.append((time.perf_counter() - t) * 1e3)
            for _ in range(5):
                t = time.perf_counter()
                engine.compile_grammar(StructuredOutput.json_schema(schema))
                result.cached_us.append((time.perf_counter() - t) * 1e6)
        out.append(result)
        say(f"  compile {name:16s} cold {statistics.mean(result.cold_ms):8.1f} ms   "
            f"cached {statistics.mean(result.cached_us):7.1f} µs")
    return setup_ms, out


# ----------------------------------------------------------------------------- llama.cpp
async def _llama_chat(client, url: str, messages: list[dict[str, str]], max_tokens: int,
                      schema: dict[str, Any]) -> tuple[str, int, int, str]:
    body = {"messages": messages, "max_tokens": max_tokens, "temperature": 0, "cache_prompt": True,
            "response_format": {"type": "json_schema", "json_schema": {"name": schema.get("title", "output"),
                                                                       "schema": schema}}}
    resp = await client.post(f"{url}/v1/chat/completions", json=body)
    if resp.status_code != 200:
        raise RuntimeError(f"llama-server answered {resp.status_code}: {resp.text[:300]}")
    data = resp.json()
    choice = data["choices"][0]
    usage = data.get("usage") or {}
    return (choice["message"].get("content") or "", int(usage.get("completion_tokens", 0)),
            int(usage.get("prompt_tokens", 0)), choice.get("finish_reason") or "")


def llama_generate(url: str, conversations: list[list[dict[str, str]]], max_tokens: int,
                   schema: dict[str, Any]) -> tuple[float, list[int], list[str], list[str], list[int]]:
    """Every conversation at once: (wall_s, completion tokens, texts, finish reasons, prompt tokens)."""
    import httpx

    async def go():
        async with httpx.AsyncClient(timeout=httpx.Timeout(600.0), limits=httpx.Limits(max_connections=64)) as c:
            start = time.perf_counter()
            results = await asyncio.gather(*(_llama_chat(c, url, m, max_tokens, schema) for m in conversations))
            return time.perf_counter() - start, results

    wall, results = asyncio.run(go())
    return (wall, [r[1] for r in results], [r[0] for r in results], [r[3] for r in results],
            [r[2] for r in results])


# ----------------------------------------------------------------------------- the run
def run(opts: argparse.Namespace) -> dict[str, Any]:
    import torch

    from backends.engine.sampling_params import SamplingParams
    from backends.engine.structured_output import StructuredOutput
    from backends.models import prepare

    torch.set_num_threads(opts.threads)
    prepare(opts.model)
    load_before = os.getloadavg()
    rows: list[Row] = []
    notes: list[str] = []

    say(f"[switchyard] loading {opts.model} ...")
    engine = ours_engine(opts.model, opts)
    tokenizer = engine.tokenizer

    def conversations_for(concurrency: int, round_index: int) -> list[list[dict[str, str]]]:
        return [chat_messages(t) for t in event_messages(concurrency, seed=1000 * concurrency + round_index)]

    say("[switchyard] grammar compile times ...")
    setup_ms, compiles = compile_times(engine, opts.compile_repeats)

    spec = StructuredOutput.json_schema(EVENT_SCHEMA)
    constrained = SamplingParams(temperature=0, max_tokens=opts.max_tokens, structured=spec)
    free = SamplingParams(temperature=0, max_tokens=opts.max_tokens)
    warm = conversations_for(1, 99)
    ours_generate(engine, [chat_prompt_ids(tokenizer, m) for m in warm], [constrained])  # compiles EVENT_SCHEMA
    ours_generate(engine, [chat_prompt_ids(tokenizer, m) for m in warm], [free])
    prompts = {(c, r): [chat_prompt_ids(tokenizer, m) for m in conversations_for(c, r)]
               for c in opts.concurrency for r in range(rounds_for(c))}
    prompt_lens = [len(p) for ps in prompts.values() for p in ps]
    llama_prompt_lens: list[int] = []

    with contextlib.ExitStack() as stack:
        # llama-server runs beside the engine (idle while we measure) so each concurrency level measures
        # every system within a minute or two: the machine's load drifts more slowly than that
        server, llama_label = _start_llama(opts, stack, max(prompt_lens), notes)
        if server is not None:
            try:  # warm-up; a server that rejects the schema answers 400 here
                llama_generate(server.base_url, warm, opts.max_tokens, EVENT_SCHEMA)
            except RuntimeError as e:
                notes.append(f"llama.cpp skipped: {e}")
                say(f"[llama.cpp] skipped: {e}")
                server = None
        for c in opts.concurrency:
            totals: dict[str, list] = {k: [0, 0.0, [], []] for k in ("a", "b", "b=", "c")}  # tokens, wall, texts, reasons
            for r in range(rounds_for(c)):
                wall, ids, texts, reasons = ours_generate(engine, prompts[c, r], [constrained] * c)
                _add(totals["a"], [len(x) for x in ids], wall, texts, reasons)
                lengths = [len(x) for x in ids]
                wall, ids, texts, reasons = ours_generate(engine, prompts[c, r], [free] * c)
                _add(totals["b"], [len(x) for x in ids], wall, texts, reasons)
                matched = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in lengths]
                wall, ids, texts, reasons = ours_generate(engine, prompts[c, r], matched)
                _add(totals["b="], [len(x) for x in ids], wall, texts, reasons)
                if server is not None:
                    wall, counts, texts, reasons, plens = llama_generate(server.base_url, conversations_for(c, r),
                                                                         opts.max_tokens, EVENT_SCHEMA)
                    _add(totals["c"], counts, wall, texts, reasons)
                    llama_prompt_lens += plens
            n = c * rounds_for(c)
            labels = [("a", "(a) switchyard constrained"), ("b", "(b) switchyard unconstrained"),
                      ("b=", "(b=) switchyard free, (a)'s lengths")]
            if server is not None:
                labels.append(("c", llama_label))
            for key, label in labels:
                tokens, wall, texts, reasons = totals[key]
                parsed, valid = check_outputs(texts, EVENT_SCHEMA)
                rows.append(_row(label, c, n, tokens, wall, parsed, valid, reasons.count("stop")))
    del engine

    if llama_prompt_lens and sorted(llama_prompt_lens) != sorted(prompt_lens):
        notes.append(f"llama-server's prompts are {statistics.mean(llama_prompt_lens):.1f} tokens on average "
                     f"(its chat template), ours {statistics.mean(prompt_lens):.1f}")
    load_after = os.getloadavg()
    if max(load_before[0], load_after[0]) > opts.threads + 0.5:
        notes.append(f"measured while other jobs ran (load average {load_before[0]:.1f} → {load_after[0]:.1f} "
                     f"on {os.cpu_count()} CPUs): numbers are noisy")
    return _report(opts, rows, setup_ms, compiles, prompt_lens, load_before, load_after, notes)


def _add(total: list, counts: list[int], wall: float, texts: list[str], reasons: list[str]) -> None:
    total[0] += sum(counts)
    total[1] += wall
    total[2] += texts
    total[3] += reasons


def _row(label: str, c: int, n: int, tokens: int, wall: float, parsed: int, valid: int, stopped: int) -> Row:
    row = Row(label, c, n, tokens, wall, parsed, valid, stopped)
    say(f"  {label:38s} c={c:<3d} {row.tokens_per_s:8.1f} tok/s   {tokens} tokens in {wall:.1f} s   "
        f"JSON {parsed}/{n}, valid {valid}/{n}, EOS {stopped}/{n}")
    return row


def _start_llama(opts, stack: contextlib.ExitStack, max_prompt_len: int,
                 notes: list[str]) -> tuple[LlamaServer | None, str]:
    """(a started llama-server, stopped when ``stack`` closes; its row label), or None with the reason in ``notes``."""
    from backends.models import CATALOG, source_gguf

    if opts.skip_llamacpp:
        return None, ""
    if opts.model not in CATALOG:
        notes.append("llama.cpp skipped: --model is not a bundled model with a GGUF source")
        return None, ""
    try:
        binary = opts.llama_server or ensure_llama_server(opts.bench_dir)
        gguf = source_gguf(opts.model)
        slots = max(opts.concurrency)
        ctx_per_slot = max_prompt_len + opts.max_tokens + 64
        log = opts.bench_dir.resolve() / "llama-server-structured.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        say(f"[llama.cpp] {binary.name} on {gguf.name}, {slots} slots x {ctx_per_slot} ctx, {opts.threads} threads")
        server = stack.enter_context(LlamaServer(binary, gguf, opts.threads, slots, ctx_per_slot, log))
        return server, f"(c) llama.cpp constrained ({gguf.name.split('.')[-2]})"
    except (RuntimeError, OSError, subprocess.CalledProcessError, ValueError) as e:
        notes.append(f"llama.cpp skipped: {e}")
        say(f"[llama.cpp] skipped: {e}")
        return None, ""


def _report(opts, rows: list[Row], setup_ms: float, compiles: list[CompileTimes], prompt_lens: list[int],
            load_before, load_after, notes: list[str]) -> dict[str, Any]:
    systems = list(dict.fromkeys(r.system for r in rows))
    table = {s: {str(r.concurrency): round(r.tokens_per_s, 2) for r in rows if r.system == s} for s in systems}
    ratios: dict[str, dict[str, float]] = {}
    constrained = next((s for s in systems if s.startswith("(a)")), None)
    for other in systems:
        if constrained is None or other == constrained:
            continue
        ratios[f"(a) / {other.split(' ')[0]}"] = {c: round(v / table[other][c], 3)
                                                  for c, v in table[constrained].items() if table[other].get(c)}
    cold = [x for c in compiles for x in c.cold_ms]
    cached = [x for c in compiles for x in c.cached_us]
    return {
        "benchmark": "engine-structured", "model": opts.model, "quantization": opts.quantization,
        "threads": opts.threads,
        "max_tokens": opts.max_tokens, "concurrency": opts.concurrency, "quick": opts.quick,
        "schema": EVENT_SCHEMA, "mean_prompt_tokens": round(statistics.mean(prompt_lens), 1),
        "tokens_per_s": table, "ratios": ratios,
        "outputs": {r.system + f" c={r.concurrency}": {"requests": r.num_requests, "json": r.num_parsed,
                                                       "valid": r.num_valid, "eos": r.num_stopped} for r in rows},
        "compile": {"grammar_compiler_setup_ms": round(setup_ms, 1),
                    "cold_ms_mean": round(statistics.mean(cold), 2), "cached_us_mean": round(statistics.mean(cached), 2),
                    "per_schema": {c.schema: {"cold_ms": [round(x, 2) for x in c.cold_ms],
                                              "cached_us_mean": round(statistics.mean(c.cached_us), 2)}
                                   for c in compiles}},
        "runs": [asdict(r) | {"tokens_per_s": r.tokens_per_s} for r in rows],
        "load_average": [round(load_before[0], 2), round(load_after[0], 2)], "notes": notes,
    }


def _print(report: dict[str, Any], opts: argparse.Namespace) -> None:
    cs = [str(c) for c in report["concurrency"]]
    weights = "fp32" if report["quantization"] == "none" else report["quantization"]
    print(f"switchyard bench engine --structured — {report['model']} ({weights}), {report['threads']} threads, chat prompts "
          f"of {report['mean_prompt_tokens']} tokens on average, max_tokens {report['max_tokens']}, greedy")
    print(f"\n{'output tokens/s (generated tokens / wall)':42s}" + "".join(f"{'c=' + c:>10s}" for c in cs))
    for system, row in report["tokens_per_s"].items():
        print(f"{system:42s}" + "".join(f"{row.get(c, float('nan')):10.1f}" for c in cs))
    if report["ratios"]:
        print(f"\n{'ratio (tokens/s)':42s}" + "".join(f"{'c=' + c:>10s}" for c in cs))
        for name, row in report["ratios"].items():
            print(f"{name:42s}" + "".join(f"{(str(row[c]) + 'x') if c in row else '':>10s}" for c in cs))
    print(f"\n{'outputs: JSON / schema-valid / ended by EOS':42s}" + "".join(f"{'c=' + c:>16s}" for c in cs))
    for system in report["tokens_per_s"]:
        cells = []
        for c in cs:
            o = report["outputs"].get(f"{system} c={c}")
            cells.append(f"{o['json']}/{o['valid']}/{o['eos']} of {o['requests']}" if o else "")
        print(f"{system:42s}" + "".join(f"{x:>16s}" for x in cells))
    comp = report["compile"]
    print(f"\ngrammar compile (engine.compile_grammar): cold {comp['cold_ms_mean']:.1f} ms, cached "
          f"{comp['cached_us_mean']:.1f} µs (means over {len(comp['per_schema'])} schemas); the engine's first "
          f"grammar also reads the vocabulary once: {comp['grammar_compiler_setup_ms']:.0f} ms")
    for name, c in comp["per_schema"].items():
        print(f"  {name:16s} cold {statistics.mean(c['cold_ms']):8.1f} ms   cached {c['cached_us_mean']:7.1f} µs")
    print(f"\nload average (1 min) {report['load_average'][0]} → {report['load_average'][1]} on {os.cpu_count()} CPUs")
    for note in report["notes"]:
        print(f"note: {note}")
    if opts.json:
        print(json.dumps(report))


def main(argv: list[str]) -> int:
    opts = parse_args(argv)
    report = run(opts)
    _print(report, opts)
    return 0
