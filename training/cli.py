"""`switchyard` — the one console script. Argument parsing only.

Each subcommand names a handler ``"package.module:function"`` that is imported only when that
subcommand runs (no heavy imports for ``--help``). A handler takes the parsed ``argparse.Namespace``
and returns an exit code (``int``) or ``None`` (= 0).

Errors: a handler raises ``CLIError`` (or ``ValueError``/``FileNotFoundError``/``ConfigError``) for
bad input; ``main`` prints one line ``switchyard: error: ...`` and exits 2. Nothing else prints a traceback
unless ``SWITCHYARD_DEBUG=1``.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Callable, Sequence

from gateway import __version__


class CLIError(Exception):
    """A user-facing error: printed as one line, exit code 2."""


def _handler(target: str) -> Callable[[argparse.Namespace], int | None]:
    def run(args: argparse.Namespace) -> int | None:
        module, func = target.split(":")
        return getattr(importlib.import_module(module), func)(args)

    return run


def _add(sub: argparse._SubParsersAction, name: str, target: str, help: str) -> argparse.ArgumentParser:
    p = sub.add_parser(name, help=help, description=help)
    p.set_defaults(func=_handler(target))
    return p


def _json_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print one JSON object on the last line")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="switchyard",
        description="OpenAI-compatible LLM gateway: guard, router, cascade, example cache, model pools.",
    )
    parser.add_argument("--version", action="version", version=f"switchyard {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("version", help="print the version")
    p.set_defaults(func=lambda args: print(f"switchyard {__version__}"))

    # --- serve ---------------------------------------------------------------------------------
    p = _add(sub, "serve", "gateway.__main__:serve", "run the gateway (embedded default with no --config)")
    p.add_argument("--config", help="YAML config file (default: the embedded default)")
    p.add_argument("--host", help="bind address (overrides config)")
    p.add_argument("--port", type=int, help="port (overrides config)")

    # --- engine --------------------------------------------------------------------------------
    p = sub.add_parser("engine", help="the embedded inference engine")
    esub = p.add_subparsers(dest="engine_command", metavar="ENGINE_COMMAND", required=True)
    p = _add(esub, "serve", "gateway.engine_server:serve", "serve one model as an OpenAI-compatible server")
    p.add_argument("--model", required=True, help="bundled model name or HF folder path")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8001)
    p.add_argument("--served-name", help="model id reported by /v1/models (default: --model)")
    p.add_argument("--chat-template", help="'plain_turns' (User:/Assistant: text turns), 'gemma_plain' (Gemma turn tokens) or a Jinja template file")
    p.add_argument("--tool-call-parser", default="auto", choices=("auto", "hermes", "llama3_json"),
                   help="how the model writes tool calls (default: detected from its chat template)")
    p.add_argument("--max-model-len", type=int, default=2048)
    p.add_argument("--max-num-seqs", type=int, default=32)
    p.add_argument("--max-num-batched-tokens", type=int, default=1024)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--kv-cache-memory-gb", type=float, default=1.0)
    p.add_argument("--num-kv-blocks", type=int, help="KV-cache blocks (default: sized from --kv-cache-memory-gb)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--quantization", default="none", choices=["none", "int8", "int4"])
    p.add_argument("--no-prefix-caching", action="store_true")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--num-threads", type=int, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--kv-retain-s", type=float, default=0.0,
                   help="seconds a finished agent session's KV blocks stay pinned for its next turn (0 = off)")
    p.add_argument("--kv-retain-max-share", type=float, default=0.25,
                   help="at most this share of the KV blocks is pinned for paused sessions")
    p.add_argument("--kv-offload-gb", type=float, default=0.0,
                   help="GiB of host memory for a second KV tier: evicted blocks are copied there and copied "
                        "back by a later prefix match instead of recomputed (0 = off)")
    p.add_argument("--program-scheduling", action="store_true",
                   help="admit a continuing program's request ahead of a new program's (program FCFS)")
    p.add_argument("--program-max-wait-s", type=float, default=5.0,
                   help="a request waiting longer than this goes first (starvation bound of --program-scheduling)")
    p.add_argument("--speculation", default="none",
                   help="speculative decoding: 'none', 'ngram' (drafts from the request's own text), or a JSON object "
                        "of the pool setting's keys, e.g. '{\"method\": \"ngram\", \"num_draft_tokens\": 4, "
                        "\"min_n\": 2, \"max_n\": 4, \"shared_context\": true}'")

    # --- models --------------------------------------------------------------------------------
    p = sub.add_parser("models", help="the bundled model catalogue")
    msub = p.add_subparsers(dest="models_command", metavar="MODELS_COMMAND", required=True)
    _add(msub, "list", "training.admin:list_cmd", "list bundled models and their status")
    p = _add(msub, "prepare", "training.admin:prepare_cmd",
             "convert bundled GGUFs and export MiniLM's ONNX graph once (idempotent)")
    p.add_argument("names", nargs="*", help="models to prepare (default: all bundled)")
    p.add_argument("--force", action="store_true", help="convert again even if prepared")
    p.add_argument("--verify", action="store_true", help="re-hash every prepared file")

    # --- artifact ------------------------------------------------------------------------------
    p = sub.add_parser("artifact", help="guard / router artifact helpers")
    asub = p.add_subparsers(dest="artifact_command", metavar="ARTIFACT_COMMAND", required=True)
    p = _add(asub, "add-encoder", "training.admin:add_encoder_cmd",
             "add the MiniLM ONNX graph an older guard/router artifact names (exported here) to the artifact")
    p.add_argument("path", help="artifact folder (rewritten in place)")

    # --- guard -----------------------------------------------------------------------------------
    p = sub.add_parser("guard", help="guard artifact helpers")
    gsub = p.add_subparsers(dest="guard_command", metavar="GUARD_COMMAND", required=True)
    p = _add(gsub, "add-examples", "training.guard_cmd:add_examples",
             "add a deployment's own in-domain (or ood) examples to a guard artifact without retraining")
    p.add_argument("artifact", help="guard artifact folder (read, not changed)")
    p.add_argument("--file", required=True, help="JSONL/CSV rows {text, label}: label = one of the guard's domains "
                                                 "(joins the kNN references) or 'ood' (joins the OOD anchor)")
    p.add_argument("--out", required=True, help="artifact folder to write (the updated guard)")
    _json_flag(p)

    # --- keys ----------------------------------------------------------------------------------
    p = sub.add_parser("keys", help="API key helpers")
    ksub = p.add_subparsers(dest="keys_command", metavar="KEYS_COMMAND", required=True)
    p = _add(ksub, "hash", "training.admin:hash_key_cmd", "print the sha256 to put in api_keys[].sha256")
    p.add_argument("key", nargs="?", help="the key (default: read one line from stdin)")

    # --- config --------------------------------------------------------------------------------
    p = sub.add_parser("config", help="configuration helpers")
    csub = p.add_subparsers(dest="config_command", metavar="CONFIG_COMMAND", required=True)
    p = _add(csub, "check", "training.admin:config_check_cmd", "validate a config (and env overrides)")
    p.add_argument("--config", help="YAML file (default: the embedded default)")
    _add(csub, "default", "training.admin:config_default_cmd", "print the embedded default config")

    # --- train / eval / calibrate / label --------------------------------------------------------
    train = sub.add_parser("train", help="train a guard or router artifact")
    tsub = train.add_subparsers(dest="train_command", metavar="WHAT", required=True)
    p = _add(tsub, "guard", "training.guard_cmd:train_guard", "train the domain/OOD/unsafe guard")
    p.add_argument("--train", required=True, help="JSONL rows {text, label[, source]} (in-domain)")
    p.add_argument("--dev", required=True, help="in-domain dev rows; OOD thresholds are set here")
    p.add_argument("--out", required=True, help="artifact folder to write")
    p.add_argument("--ood-train", help="optional OOD rows used as negatives (reported separately)")
    p.add_argument("--unsafe-train", help="optional unsafe/toxic/jailbreak rows → explicit 'unsafe' verdict")
    p.add_argument("--kind", default=None, choices=["widemlp", "embedding", "ensemble"],
                   help="ensemble (default: widemlp + a small MiniLM, the accurate one), widemlp (the fastest), "
                        "embedding")
    p.add_argument("--id-recall", type=float, default=None,
                   help="in-domain dev recall the OOD threshold keeps (default: the kind's, chosen by "
                        "training/guard_select.py)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--hidden", type=int, default=256, help="widemlp hidden width")
    p.add_argument("--lr", type=float, default=2e-3, help="widemlp Adam learning rate")
    p.add_argument("--threshold", default=None, choices=["per-class", "global"],
                   help="OOD percentile among dev rows of the predicted domain (per-class) or of all dev rows "
                        "(default: global)")
    p.add_argument("--seeds", type=int, default=1, help="widemlp members with consecutive seeds, averaged")
    p.add_argument("--distill-weight", type=float, default=0.0,
                   help="> 0: widemlp's hidden layer also fits MiniLM embeddings of the training rows "
                        "(MiniLM at training time only; serving cost unchanged)")
    p.add_argument("--encoder-layers", type=int, default=3, choices=range(1, 7), metavar="1..6",
                   help="embedding/ensemble: MiniLM layers kept (default 3 of 6)")
    p.add_argument("--encoder-int8", action=argparse.BooleanOptionalAction, default=True,
                   help="embedding/ensemble: int8 MiniLM weights (default on)")
    p.add_argument("--encoder-max-length", type=int, default=32,
                   help="embedding/ensemble: word pieces MiniLM reads per text (default 32)")
    p.add_argument("--knn-dims", type=int, default=None,
                   help="kNN evidence: rank references in this many principal dims, exact cosine on the best "
                        "256 (0: one exact scan; default: 64 for ensemble, 0 otherwise)")
    p.add_argument("--early-accept", type=float, default=None,
                   help="ensemble: stop after widemlp when its own in-domain percentile is at least this "
                        "(0: off; default 0.3 for ensemble); the exact early rejection is always on")
    p.add_argument("--tfknn-terms", type=int, default=None,
                   help="TF-IDF kNN over a text's this many top-weighted n-grams (default 0: all)")
    p.add_argument("--centroids", type=int, default=None,
                   help="'centroid' evidence: k-means centroids per domain of the training rows (0: none)")
    p.add_argument("--semantic-accept", type=float, default=None,
                   help="ensemble: also accept text the OOD rule rejects when its percentile over MiniLM domain-centroid "
                        "similarity + TF-IDF kNN alone is at least this (0: off; default 0.25 for ensemble)")
    p.add_argument("--ood-calibration", metavar="FILE",
                   help="OOD rows (never trained on) that anchor the OOD threshold: it drops to just above the "
                        "--ood-reject share of them, never above the dev threshold of --id-recall")
    p.add_argument("--ood-reject", type=float, default=None,
                   help="with --ood-calibration: share of its rows rejected (default 0.95)")

    p = _add(tsub, "router", "training.router_cmd:train_router", "train the SLM/LLM router")
    p.add_argument("--data", required=True, help="routing rows (JSONL/CSV/parquet)")
    p.add_argument("--out", required=True, help="artifact folder to write")
    p.add_argument("--kind", default=None,
                   help="tfidf_source_ridge (default; per-source ridge heads; = tfidf_ridge for one source) | "
                        "tfidf_ridge | tfidf_lr | ensemble | minilm_mlp | knn | length | random | always_strong "
                        "| nmodel (rows with model_scores)")
    p.add_argument("--eval-fraction", type=float, default=None,
                   help="share of ids hashed into the eval split (default 0.2; with --init: the artifact's)")
    p.add_argument("--seed", type=int, default=None, help="default 0 (with --init: the artifact's)")
    p.add_argument("--exclude-source", action="append", default=[], help="drop a source from training")
    p.add_argument("--strong-share", type=float, default=None,
                   help="initial calibration target (default 0.5; with --init: the artifact's)")
    p.add_argument("--slm-price", type=float, help="SLM USD per 1k requests (stored for --max-cost)")
    p.add_argument("--llm-price", type=float, help="LLM USD per 1k requests (stored for --max-cost)")
    p.add_argument("--price", action="append", default=[], metavar="MODEL=USD",
                   help="nmodel: a model's USD per 1k requests (repeatable; stored for eval and --max-cost)")
    p.add_argument("--alpha", type=float, help="nmodel: ridge regularisation of the per-model heads (default 3; "
                                               "chosen on validation folds: BENCHMARKS.md)")
    p.add_argument("--init", metavar="ARTIFACT",
                   help="update this router: refit its kind on its own training rows + --data (labelled traffic)")
    p.add_argument("--init-data", action="append", metavar="FILE",
                   help="with --init: the artifact's training rows (default: the files it records)")
    p.add_argument("--promote-if-better", action="store_true",
                   help="with --init: write --out only if the update's APGR on the held-out new rows is no worse "
                        "than the --init artifact's (exit 1 and keep it otherwise)")
    p.add_argument("--tolerance", type=float, default=0.0,
                   help="with --promote-if-better: the APGR the update may lose and still pass (default 0)")
    _json_flag(p)

    ev = sub.add_parser("eval", help="evaluate a guard or router artifact")
    evsub = ev.add_subparsers(dest="eval_command", metavar="WHAT", required=True)
    p = _add(evsub, "guard", "training.guard_cmd:eval_guard", "GQR-score, accuracy, OOD rejection, latency")
    p.add_argument("--model", help="guard artifact folder (required without --loso)")
    p.add_argument("--test-id", help="in-domain test rows (required without --loso)")
    p.add_argument("--test-ood", help="OOD test rows (required without --loso)")
    p.add_argument("--loso", action="store_true",
                   help="leave-one-source-out shift protocol on --train/--dev instead of a test run: per in-domain "
                        "source, a guard trained as `train guard` would (same --kind / options) on the other sources, "
                        "scored on the held-out source's rows (shifted in-domain traffic) and on --ood-val's OOD rows")
    p.add_argument("--ood-val", help="with --loso: OOD rows of sources the test never uses (default: synthetic "
                                     "foreign text)")
    p.add_argument("--kind", default=None, choices=["widemlp", "embedding", "ensemble"],
                   help="with --loso: the guard kind (default: train guard's)")
    p.add_argument("--id-recall", type=float, default=None, help="with --loso: as train guard's")
    p.add_argument("--centroids", type=int, default=None, help="with --loso: as train guard's")
    p.add_argument("--ood-reject", type=float, default=None,
                   help="with --loso: anchor the threshold on one hash half of every --ood-val source, score the other")
    p.add_argument("--cache", help="with --loso: folder for fitted folds (reused across runs)")
    p.add_argument("--embedding-cache", help="with --loso: .npz file remembering MiniLM embeddings across runs")
    p.add_argument("--train", help="train file for the baselines trained in the same run")
    p.add_argument("--dev", help="dev file for the baselines' thresholds")
    p.add_argument("--plot", help="write the ID-recall vs OOD-rejection curve to this PNG")
    p.add_argument("--max-latency-queries", type=int, default=0,
                   help="test rows timed one by one, in a fixed random order (default 0: every row)")
    _json_flag(p)

    p = _add(evsub, "router", "training.router_cmd:eval_router", "APGR, CPT per source, latency")
    p.add_argument("--model", required=True, help="router artifact folder")
    p.add_argument("--data", required=True, help="routing rows; only the eval split (by id hash) is used")
    p.add_argument("--all-rows", action="store_true", help="evaluate every row (data never seen in training)")
    p.add_argument("--plot", help="write the cost-quality curve to this PNG")
    p.add_argument("--baselines", action="store_true",
                   help="also fit and evaluate TF-IDF+LR on training-split rows disjoint from the evaluated ones "
                        "(with --all-rows: the router's own training data)")
    p.add_argument("--baseline-data", help="with --all-rows --baselines: the router's training data (default: "
                                           "the file its artifact records)")
    p.add_argument("--peers", action="store_true",
                   help="also train RouteLLM's matrix-factorization (routellm_mf) and similarity-weighted ranking "
                        "(routellm_sw) routers on the rows TF-IDF+LR is fitted on (implies --baselines), with "
                        "MiniLM prompt embeddings, and evaluate them on the same rows")
    p.add_argument("--peers-impl", default="auto", metavar="auto|routellm|ours",
                   help="whose code trains the peers: routellm 0.2.0 installed under .bench/routellm, or "
                        "training/peers.py's copy of it (default auto: the package when installed)")
    p.add_argument("--peers-encoder", default="minilm", metavar="minilm|minilm-l3-int8",
                   help="the peers' prompt embeddings: all-MiniLM-L6-v2 (default) or its first three layers in int8 "
                        "(the guard's encoder, ~7x less CPU)")
    p.add_argument("--embedding-cache", help="with --peers: .npz file remembering MiniLM embeddings across runs")
    p.add_argument("--source", action="append", default=[], help="evaluate only rows of this source (repeatable)")
    p.add_argument("--price", action="append", default=[], metavar="MODEL=USD",
                   help="nmodel: override a model's USD per 1k requests (repeatable)")
    p.add_argument("--tolerance", action="append", type=float, default=[],
                   help="nmodel: also report the router at this quality tolerance (repeatable)")
    _json_flag(p)

    p = _add(sub, "calibrate", "training.router_cmd:calibrate", "set the router threshold to a cost target")
    p.add_argument("--model", required=True)
    p.add_argument("--data", required=True)
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--strong-share", type=float, help="share of traffic sent to the strong model (0..1)")
    g.add_argument("--max-cost", type=float, help="USD per 1k requests, from the artifact's prices (an nmodel "
                                                  "router: sets its quality tolerance)")
    p.add_argument("--slm-price", type=float, help="override the artifact's SLM USD per 1k requests")
    p.add_argument("--llm-price", type=float, help="override the artifact's LLM USD per 1k requests")
    p.add_argument("--price", action="append", default=[], metavar="MODEL=USD",
                   help="nmodel: override a model's USD per 1k requests (repeatable)")
    p.add_argument("--all-rows", action="store_true", help="use every row (data never seen in training)")
    p.add_argument("--escalate-share", type=float,
                   help="also calibrate the cascade so this share of SLM answers escalates (rows from `label`)")
    _json_flag(p)

    p = _add(sub, "label", "training.label:label", "routing labels from your prompts by running both models")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--prompts", help="JSONL {prompt[, answer][, id][, source]}")
    g.add_argument("--from-log", action="append", metavar="FILE",
                   help="the gateway's traffic_log file (its rotated FILE.1 is read too; repeatable)")
    p.add_argument("--slm", help="model name/path or http(s) base URL (a gateway's /v1#POOL reaches a pool)")
    p.add_argument("--llm", help="model name/path or http(s) base URL")
    p.add_argument("--judge", help="model name/path or http(s) base URL that judges SLM answers disagreeing "
                                   "with the LLM's when there is no reference (default: token-F1 agreement)")
    p.add_argument("--references", help="JSONL {id|prompt, answer} or {id|prompt, strong_score, weak_score} "
                                        "(recorded outcomes are taken as labels)")
    p.add_argument("--source", help="--from-log: the rows' source (default: each request's namespace)")
    p.add_argument("--out", required=True)
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--limit", type=int)

    # --- cache ---------------------------------------------------------------------------------
    cache = sub.add_parser("cache", help="the in-context example cache")
    ccsub = cache.add_subparsers(dest="cache_command", metavar="CACHE_COMMAND", required=True)
    for name, helptext in (
        ("stats", "entry counts and utility per namespace"),
        ("export", "write entries as JSONL"),
        ("import", "read entries from JSONL"),
        ("clear", "delete a namespace's entries"),
        ("replay", "re-score stored examples and drop harmful ones"),
    ):
        p = _add(ccsub, name, f"training.cache_cmd:{name}_cmd", helptext)
        p.add_argument("--config", help="gateway config (for redis_url / backend)")
        p.add_argument("--redis-url", help="overrides the config's redis_url")
        p.add_argument("--namespace", help="namespace (default: all for stats/export)")
        if name in ("export", "import"):
            p.add_argument("--file", required=True, help="JSONL file ('-' = stdout for export)")
        if name == "replay":
            p.add_argument("--dry-run", action="store_true")
            p.add_argument("--slm", default="smollm2-135m")
            p.add_argument("--llm", default="gemma3-270m")
            p.add_argument("--limit", type=int)
            p.add_argument("--method", default="judge", choices=["judge", "neighbours"],
                           help="judge: LLM grades each answer; neighbours: does it help the SLM on similar ones")
            p.add_argument("--min-score", type=float, help="drop below this (judge: 0.5, neighbours: 0.0)")
        if name in ("stats", "replay"):
            _json_flag(p)

    # --- bench ---------------------------------------------------------------------------------
    bench = sub.add_parser("bench", help="benchmarks that print side-by-side comparisons")
    bsub = bench.add_subparsers(dest="bench_command", metavar="WHAT", required=True)
    for name, helptext in (
        ("engine", "engine tokens/s and TTFT vs HF generate and llama.cpp"),
        ("gateway", "gateway overhead vs LiteLLM proxy"),
        ("cache", "example retrieval latency and quality"),
        ("instructions", "CPU instructions per gateway request (callgrind; load-independent)"),
        ("quantization", "int8 / int4 vs fp32 per bundled model: greedy agreement, perplexity, escalation, tok/s"),
        ("agents", "agent trace (tool pauses): KV retention and program scheduling off/on vs llama.cpp"),
        ("speculation", "n-gram speculation off/on (own text, shared table) vs llama-server plain and ngram-mod"),
    ):
        p = _add(bsub, name, f"bench.{name}:main", helptext)
        p.add_argument("bench_args", nargs=argparse.REMAINDER, help="options passed to the benchmark")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:  # `bench X --opt ...`: argparse leaves leading options out of the REMAINDER positional
        if getattr(args, "bench_args", None) is None:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.bench_args = [*extra, *args.bench_args]
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    try:
        code = args.func(args)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return 0
    except Exception as e:  # one line, never a traceback, for anything the user can fix
        if os.environ.get("SWITCHYARD_DEBUG") == "1":
            raise
        if isinstance(e, CLIError | ValueError | FileNotFoundError | PermissionError | IsADirectoryError):
            print(f"switchyard: error: {e}", file=sys.stderr)
            return 2
        print(f"switchyard: error: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    return int(code or 0)


if __name__ == "__main__":
    sys.exit(main())
