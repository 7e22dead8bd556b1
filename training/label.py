"""``switchyard label``: routing rows from your own prompts by running both models and scoring answers.

Each model is a bundled name / HF folder (run in-process by the embedded engine, greedy) or an
``http(s)://…/v1`` base URL of any OpenAI-compatible server (official ``openai`` client; append
``#model-id`` to pick the served model, else the first one ``/v1/models`` lists; the key comes from
``OPENAI_API_KEY``, default ``"none"``).

Scoring (``score_answer``):

- with a reference ``answer``: numeric match when the reference is a number (the last number in the
  answer, commas ignored, |a-b| <= 1e-6·max(1,|b|)); multiple-choice letter match when the reference is
  one of A–J; otherwise normalised exact match (or the reference contained in the answer). Both models
  get 0/1 scores.
- without a reference: the LLM answer is the reference; ``strong_score = 1`` and ``weak_score`` is the
  token-F1 agreement of the SLM answer with it (in [0, 1]).

Output rows: ``{"id", "source", "prompt", "strong_score", "weak_score", "score_type", "slm_answer",
"llm_answer", "slm_mean_logprob", "slm_min_logprob"}`` — the routing format ``train router`` reads; the
SLM log-probabilities let the cascade threshold be calibrated on the same rows.
"""

from __future__ import annotations

import argparse
import json
import os
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from training.data import PromptRow, load_prompt_rows

_NUM_RE = re.compile(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+")
_WORD_RE = re.compile(r"\w+")
_LETTER_RE = re.compile(r"\b([A-J])\b")


@dataclass(frozen=True)
class Answer:
    text: str
    logprobs: tuple[float, ...] = ()


# --------------------------------------------------------------------------------------------------
# scoring
# --------------------------------------------------------------------------------------------------


def normalize(text: str) -> str:
    return " ".join(_WORD_RE.findall(text.lower()))


def _number(text: str) -> float | None:
    found = _NUM_RE.findall(text)
    if not found:
        return None
    try:
        return float(found[-1].replace(",", ""))
    except ValueError:
        return None


def _as_number(ref: str) -> float | None:
    s = ref.strip().replace(",", "")
    try:
        return float(s)
    except ValueError:
        return None


def score_answer(answer: str, reference: str) -> float:
    """1.0 when ``answer`` matches ``reference`` (numeric / letter / normalised text), else 0.0."""
    ref_num = _as_number(reference)
    if ref_num is not None:
        got = _number(answer)
        return float(got is not None and abs(got - ref_num) <= 1e-6 * max(1.0, abs(ref_num)))
    ref = reference.strip()
    if len(ref) == 1 and ref.upper() in "ABCDEFGHIJ":
        m = _LETTER_RE.search(answer.strip().upper()[:40])
        return float(m is not None and m.group(1) == ref.upper())
    a, r = normalize(answer), normalize(reference)
    if not r:
        return float(not a)
    return float(a == r or f" {r} " in f" {a} ")


def agreement(answer: str, reference: str) -> float:
    """Token-F1 between two answers (SQuAD style), in [0, 1]; two empty answers agree fully."""
    a, r = normalize(answer).split(), normalize(reference).split()
    if not a and not r:
        return 1.0
    common = sum((Counter(a) & Counter(r)).values())
    if common == 0:
        return 0.0
    p, q = common / len(a), common / len(r)
    return 2 * p * q / (p + q)


def label_row(row: PromptRow, slm: Answer, llm: Answer) -> dict:
    if row.answer is not None:
        strong, weak, kind = score_answer(llm.text, row.answer), score_answer(slm.text, row.answer), "reference_match"
    else:
        strong, weak, kind = 1.0, agreement(slm.text, llm.text), "agreement_with_llm"
    out = {
        "id": row.row_id,
        "source": row.source,
        "prompt": row.prompt,
        "strong_score": strong,
        "weak_score": weak,
        "score_type": kind,
        "slm_answer": slm.text,
        "llm_answer": llm.text,
    }
    if slm.logprobs:
        out["slm_mean_logprob"] = sum(slm.logprobs) / len(slm.logprobs)
        out["slm_min_logprob"] = min(slm.logprobs)
    return out


# --------------------------------------------------------------------------------------------------
# answering
# --------------------------------------------------------------------------------------------------


class EngineAnswerer:
    """A bundled model / HF folder on the embedded engine; greedy, batched."""

    def __init__(self, model: str, max_model_len: int = 2048) -> None:
        from backends.engine.args import EngineArgs
        from backends.engine.llm_engine import LLMEngine
        from backends.models import chat_template_override, resolve_model_path

        self.engine = LLMEngine(resolve_model_path(model), EngineArgs(max_model_len=max_model_len,
                                                                      kv_cache_memory_gb=0.5))
        self.chat_template = chat_template_override(model)

    def _prompt_ids(self, text: str) -> list[int]:
        from backends.local import builtin_prompt

        tok = self.engine.tokenizer
        messages = [{"role": "user", "content": text}]
        builtin = builtin_prompt(self.chat_template, messages)
        if builtin is not None:
            return tok(builtin)["input_ids"]
        if self.chat_template is None and not getattr(tok, "chat_template", None):
            return tok(text)["input_ids"]
        rendered = tok.apply_chat_template(messages, chat_template=self.chat_template, add_generation_prompt=True,
                                           tokenize=False)
        return tok(rendered, add_special_tokens=False)["input_ids"]

    def answer(self, prompts: list[str], max_tokens: int) -> list[Answer]:
        from backends.engine.sampling_params import SamplingParams

        limit = self.engine.max_model_len - max_tokens
        ids = [self._prompt_ids(p)[-max(limit, 1):] for p in prompts]
        from backends.local import builtin_stops

        params = SamplingParams(temperature=0.0, max_tokens=max_tokens, logprobs=0,
                                stop=builtin_stops(self.chat_template))
        results = self.engine.generate(ids, params)
        return [Answer(r.text.strip(), tuple(float(lp.logprob) for lp in r.outputs[0].logprobs)) for r in results]


class OpenAIAnswerer:
    """Any OpenAI-compatible server; ``url`` may end in ``#model-id``."""

    def __init__(self, url: str) -> None:
        from openai import OpenAI

        base, _, model = url.partition("#")
        self.client = OpenAI(base_url=base, api_key=os.environ.get("OPENAI_API_KEY", "none"), max_retries=2)
        if not model:
            listed = self.client.models.list().data
            if not listed:
                raise ValueError(f"{base}: /v1/models lists no model; append #model-id to the URL")
            model = listed[0].id
        self.model = model

    def answer(self, prompts: list[str], max_tokens: int) -> list[Answer]:
        out = []
        for p in prompts:
            resp = self.client.chat.completions.create(
                model=self.model, messages=[{"role": "user", "content": p}], temperature=0.0,
                max_tokens=max_tokens, logprobs=True,
            )
            choice = resp.choices[0]
            lps: tuple[float, ...] = ()
            if choice.logprobs is not None and choice.logprobs.content:
                lps = tuple(float(t.logprob) for t in choice.logprobs.content)
            out.append(Answer((choice.message.content or "").strip(), lps))
        return out


def make_answerer(spec: str):
    if spec.startswith(("http://", "https://")):
        return OpenAIAnswerer(spec)
    return EngineAnswerer(spec)


# --------------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------------

BATCH = 16


def label(args: argparse.Namespace) -> int:
    rows = load_prompt_rows(args.prompts)
    if args.limit is not None:
        if args.limit < 1:
            raise ValueError(f"--limit must be >= 1, got {args.limit}")
        rows = rows[: args.limit]
    if args.max_tokens < 1:
        raise ValueError(f"--max-tokens must be >= 1, got {args.max_tokens}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    slm, llm = make_answerer(args.slm), make_answerer(args.llm)
    labelled = []
    tmp = out.with_name(out.name + ".tmp")
    with tmp.open("w", encoding="utf-8") as f:
        for start in range(0, len(rows), BATCH):
            batch = rows[start:start + BATCH]
            prompts = [r.prompt for r in batch]
            for row, a, b in zip(batch, slm.answer(prompts, args.max_tokens), llm.answer(prompts, args.max_tokens),
                                 strict=True):
                rec = label_row(row, a, b)
                labelled.append(rec)
                f.write(json.dumps(rec, ensure_ascii=False) + "\n")
    tmp.replace(out)
    n = len(labelled)
    weak_ok = sum(r["weak_score"] >= r["strong_score"] for r in labelled)
    print(f"labelled {n} prompts → {out}: strong mean {sum(r['strong_score'] for r in labelled) / n:.3f}, "
          f"weak mean {sum(r['weak_score'] for r in labelled) / n:.3f}, weak good enough on {weak_ok}/{n}")
    return 0
