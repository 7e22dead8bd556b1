"""``switchyard label``: routing rows from your own prompts by running both models and scoring answers.

Each model is a bundled name / HF folder (run in-process by the embedded engine, greedy) or an
``http(s)://…/v1`` base URL of any OpenAI-compatible server (official ``openai`` client; append
``#model-id`` to pick the served model, else the first one ``/v1/models`` lists; the key comes from
``OPENAI_API_KEY``, default ``"none"``).

Prompts come from ``--prompts`` (JSONL ``{prompt[, answer][, id][, source]}``) or from the gateway's
traffic log (``--from-log FILE``, repeatable; its rotated ``FILE.1`` is read too when it exists): one row per
distinct recorded prompt, ``id`` = the request's ``request_id``, ``source`` = its namespace (``--source``
overrides). ``--references FILE`` attaches what is known about a prompt, matched by ``id`` and else by
prompt text: an ``answer`` (scored as below), or recorded ``strong_score`` / ``weak_score`` outcomes, which
are taken as the label without running the models (``score_type: "reference_scores"``).

Scoring (``label_row``), first rule that applies:

- with a reference ``answer``: numeric match when the reference is a number (the last number in the
  answer, commas ignored, |a-b| <= 1e-6·max(1,|b|)); multiple-choice letter match when the reference is
  one of A–J; otherwise normalised exact match (or the reference contained in the answer). Both models
  get 0/1 scores (``reference_match``).
- without one the LLM answer is the reference and ``strong_score = 1``: answers that agree exactly (after
  normalisation) give ``weak_score = 1`` (``agreement_with_llm``);
- otherwise, with ``--judge MODEL|URL``, the judge model says whether the SLM answer is correct and as good as
  the LLM's: ``weak_score`` 1 or 0 (``judge``; an answer without yes/no falls through to the next rule);
- otherwise ``weak_score`` is the token-F1 agreement of the SLM answer with the LLM's, in [0, 1]
  (``agreement_with_llm``).

Output rows: ``{"id", "source", "prompt", "strong_score", "weak_score", "score_type", "slm_answer",
"llm_answer", "slm_mean_logprob", "slm_min_logprob"}`` (+ ``judge_answer``) — the routing format ``train
router`` reads; the SLM log-probabilities let the cascade threshold be calibrated on the same rows.
"""

from __future__ import annotations

import argparse
import json
import os
import re
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path

from training.data import PromptRow, load_prompt_rows, read_records, record_prompt

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


JUDGE_PROMPT = """You compare two answers to the same request.

Request:
{prompt}

Answer A (reference):
{llm}

Answer B:
{slm}

Is answer B correct and at least as good as answer A? Reply with one word: yes or no."""
_VERDICT_RE = re.compile(r"\b(yes|no)\b")


def judge_prompt(prompt: str, slm: str, llm: str) -> str:
    return JUDGE_PROMPT.format(prompt=prompt, slm=slm, llm=llm)


def judge_verdict(text: str) -> float | None:
    """1.0 for a judge answer whose first yes/no is yes, 0.0 for no, None when it has neither."""
    m = _VERDICT_RE.search(text.lower())
    return None if m is None else float(m.group(1) == "yes")


def needs_judge(row: PromptRow, slm: Answer, llm: Answer) -> bool:
    """Rows the judge decides: no reference answer, and answers that do not agree exactly."""
    return row.answer is None and normalize(slm.text) != normalize(llm.text)


def label_row(row: PromptRow, slm: Answer, llm: Answer, judge: Answer | None = None) -> dict:
    verdict = judge_verdict(judge.text) if judge is not None else None
    if row.answer is not None:
        strong, weak, kind = score_answer(llm.text, row.answer), score_answer(slm.text, row.answer), "reference_match"
    elif not needs_judge(row, slm, llm):
        strong, weak, kind = 1.0, 1.0, "agreement_with_llm"
    elif verdict is not None:
        strong, weak, kind = 1.0, verdict, "judge"
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
    if judge is not None:
        out["judge_answer"] = judge.text
    if slm.logprobs:
        out["slm_mean_logprob"] = sum(slm.logprobs) / len(slm.logprobs)
        out["slm_min_logprob"] = min(slm.logprobs)
    return out


def reference_scores_row(row: PromptRow, ref: Reference) -> dict:
    return {"id": row.row_id, "source": row.source, "prompt": row.prompt, "strong_score": ref.strong_score,
            "weak_score": ref.weak_score, "score_type": "reference_scores"}


# --------------------------------------------------------------------------------------------------
# inputs: the traffic log and references
# --------------------------------------------------------------------------------------------------


def log_files(paths: list[str]) -> list[str]:
    """``paths`` with each one's rotated ``FILE.1`` (older lines) read first, when it exists and is not listed."""
    out: list[str] = []
    for path in paths:
        rotated = path + ".1"
        if os.path.isfile(rotated) and rotated not in paths and rotated not in out:
            out.append(rotated)
        if path not in out:
            out.append(path)
    return out


def load_log_rows(paths: list[str], source: str | None = None) -> tuple[list[PromptRow], int]:
    """(one row per distinct recorded prompt, oldest first; number of lines skipped as repeats) from the
    traffic-log files ``paths`` and their rotated ``.1`` files. A line is a ``traffic_log`` line: ``prompt``,
    ``request_id``, ``namespace``; a malformed one raises ValueError naming it."""
    rows: list[PromptRow] = []
    seen: set[str] = set()
    num_repeats = 0
    for path in log_files(paths):
        for where, obj in read_records(path):
            prompt = record_prompt(obj, where, " (is this a traffic_log file?)")
            if prompt in seen:
                num_repeats += 1
                continue
            seen.add(prompt)
            rid = obj.get("request_id")
            rows.append(PromptRow(prompt=prompt, row_id=None if rid is None else str(rid),
                                  source=source or str(obj.get("namespace") or "default"), answer=None))
    if not rows:
        raise ValueError(f"{', '.join(paths)}: no recorded prompts")
    return rows, num_repeats


@dataclass(frozen=True)
class Reference:
    """What is known about a prompt: a reference ``answer``, or both models' recorded scores."""

    answer: str | None = None
    strong_score: float | None = None
    weak_score: float | None = None

    @property
    def has_scores(self) -> bool:
        return self.strong_score is not None and self.weak_score is not None


class References:
    """``--references FILE``: rows ``{"id" | "prompt", "answer"}`` or ``{"id" | "prompt", "strong_score",
    "weak_score"}`` (a routing-rows file qualifies). ``of(row)`` matches by id, else by the stripped prompt."""

    def __init__(self, path: str) -> None:
        self.by_id: dict[str, Reference] = {}
        self.by_prompt: dict[str, Reference] = {}
        for where, obj in read_records(path):
            if not isinstance(obj, dict):
                raise ValueError(f"{where}: expected a JSON object, got {type(obj).__name__}")
            answer = obj.get("answer")
            strong, weak = obj.get("strong_score"), obj.get("weak_score")
            scores = [v for v in (strong, weak) if v is not None]
            if any(isinstance(v, bool) or not isinstance(v, int | float) or not 0 <= v <= 1 for v in scores):
                raise ValueError(f"{where}: 'strong_score' / 'weak_score' must be numbers in [0, 1]")
            if answer is None and len(scores) != 2:
                raise ValueError(f"{where}: a reference needs 'answer', or 'strong_score' and 'weak_score'")
            ref = Reference(answer=None if answer is None else str(answer),
                            strong_score=None if strong is None else float(strong),
                            weak_score=None if weak is None else float(weak))
            if obj.get("id") is not None:
                self.by_id[str(obj["id"])] = ref
            if isinstance(obj.get("prompt"), str):
                self.by_prompt[obj["prompt"].strip()] = ref
            if obj.get("id") is None and not isinstance(obj.get("prompt"), str):
                raise ValueError(f"{where}: a reference needs 'id' or 'prompt' to match on")

    def of(self, row: PromptRow) -> Reference | None:
        if row.row_id is not None and row.row_id in self.by_id:
            return self.by_id[row.row_id]
        return self.by_prompt.get(row.prompt.strip())


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


JUDGE_MAX_TOKENS = 8


def label(args: argparse.Namespace) -> int:
    from_log = getattr(args, "from_log", None)
    num_repeats = 0
    if from_log:
        rows, num_repeats = load_log_rows(from_log, getattr(args, "source", None))
    else:
        if getattr(args, "source", None):
            raise ValueError("--source names the rows of --from-log; --prompts rows carry their own 'source'")
        rows = load_prompt_rows(args.prompts)
    if args.limit is not None:
        if args.limit < 1:
            raise ValueError(f"--limit must be >= 1, got {args.limit}")
        rows = rows[: args.limit]
    if args.max_tokens < 1:
        raise ValueError(f"--max-tokens must be >= 1, got {args.max_tokens}")
    refs = References(args.references) if getattr(args, "references", None) else None
    recorded: dict[int, Reference] = {}
    for i, row in enumerate(rows):
        ref = refs.of(row) if refs is not None else None
        if ref is not None and ref.has_scores:
            recorded[i] = ref
        elif ref is not None and ref.answer is not None and row.answer is None:
            rows[i] = replace(row, answer=ref.answer)
    to_run = [i for i in range(len(rows)) if i not in recorded]
    if to_run and not (args.slm and args.llm):
        raise ValueError(f"{len(to_run)} of {len(rows)} prompts have no recorded scores in --references: give "
                         "--slm and --llm to run both models on them")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    labelled: dict[int, dict] = {i: reference_scores_row(rows[i], ref) for i, ref in recorded.items()}
    if to_run:
        slm, llm = make_answerer(args.slm), make_answerer(args.llm)
        judge = make_answerer(args.judge) if getattr(args, "judge", None) else None
        for start in range(0, len(to_run), BATCH):
            idx = to_run[start:start + BATCH]
            batch = [rows[i] for i in idx]
            prompts = [r.prompt for r in batch]
            answers = list(zip(slm.answer(prompts, args.max_tokens), llm.answer(prompts, args.max_tokens),
                               strict=True))
            verdicts: dict[int, Answer] = {}
            if judge is not None:
                judged = [k for k, (row, (a, b)) in enumerate(zip(batch, answers, strict=True)) if needs_judge(row, a, b)]
                if judged:
                    asks = [judge_prompt(batch[k].prompt, answers[k][0].text, answers[k][1].text) for k in judged]
                    verdicts = dict(zip(judged, judge.answer(asks, JUDGE_MAX_TOKENS), strict=True))
            for k, (i, row) in enumerate(zip(idx, batch, strict=True)):
                labelled[i] = label_row(row, *answers[k], verdicts.get(k))
    tmp = out.with_name(out.name + ".tmp")
    with tmp.open("w", encoding="utf-8") as f:
        for i in range(len(rows)):
            f.write(json.dumps(labelled[i], ensure_ascii=False) + "\n")
    tmp.replace(out)
    recs = list(labelled.values())
    n = len(recs)
    weak_ok = sum(r["weak_score"] >= r["strong_score"] for r in recs)
    kinds = Counter(r["score_type"] for r in recs)
    repeats = f" ({num_repeats} repeated prompts skipped)" if num_repeats else ""
    print(f"labelled {n} prompts{repeats} → {out}: strong mean {sum(r['strong_score'] for r in recs) / n:.3f}, "
          f"weak mean {sum(r['weak_score'] for r in recs) / n:.3f}, weak good enough on {weak_ok}/{n}; "
          f"by {', '.join(f'{k} {v}' for k, v in sorted(kinds.items()))}")
    return 0
