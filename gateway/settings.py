"""Typed gateway configuration: YAML file + environment overrides, validated once, then read-only.

Load order (later wins):
  1. the embedded default (``default_config.yaml`` beside this file) when no file is given,
     or the user's YAML file;
  2. environment variables ``SWITCHYARD__<KEY>__<SUBKEY>=<yaml value>``, e.g.
     ``SWITCHYARD__LIMITS__MAX_BODY_BYTES=2000000`` or ``SWITCHYARD__REDIS_URL=redis://r:6379/0``.
     List items are addressed by index: ``SWITCHYARD__POOLS__0__REPLICAS=2``.

Both are read as YAML with the 1.2 core schema's booleans: only true/false (True, FALSE, ...) are booleans, so
the documented ``mode: off`` or ``SWITCHYARD__ROUTING__CASCADE__MODE=off`` stays the string "off" (YAML
1.1, PyYAML's default, would read off/on/yes/no as booleans).

Every validation error names the dotted key and the offending value (``ConfigError``).
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Mapping
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from backends.engine.args import EngineArgs

ENV_PREFIX = "SWITCHYARD__"


class ConfigError(ValueError):
    """A configuration problem; the message names the key and the bad value."""


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Price(_Frozen):
    """USD per 1M tokens."""

    input_per_1m: float = Field(0.0, ge=0)
    output_per_1m: float = Field(0.0, ge=0)

    def cost_usd(self, num_prompt_tokens: int, num_completion_tokens: int) -> float:
        return (num_prompt_tokens * self.input_per_1m + num_completion_tokens * self.output_per_1m) / 1e6

    @property
    def blended_per_1m(self) -> float:
        """USD per 1M tokens at 3 prompt tokens per completion token (the usual 3:1 blend): how an N-model
        router ranks pools by cost."""
        return (3 * self.input_per_1m + self.output_per_1m) / 4


class PoolConfig(_Frozen):
    """One model pool: replicas of the embedded engine (``local``) or remote OpenAI-compatible servers."""

    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9][A-Za-z0-9._:/-]*$")
    kind: Literal["local", "remote"] = "local"
    task: Literal["generate", "embed"] = Field("generate", description="embed: serves POST /v1/embeddings "
                                               "(local: the bundled minilm; remote: passed through)")
    model: str = Field(min_length=1, description="bundled model name, HF folder path, or upstream model id")
    replicas: int = Field(1, ge=1, description="local: number of in-process engine replicas")
    urls: list[str] = Field(default_factory=list, description="remote: base URLs ending in /v1")
    api_key_env: str | None = Field(None, description="remote: env var holding the upstream API key")
    chat_template: str | None = Field(None, description="override: 'plain_turns', 'gemma_plain' or a Jinja template")
    price: Price = Price()
    timeout_s: float = Field(60.0, gt=0)
    connect_timeout_s: float = Field(2.0, gt=0)
    max_retries: int = Field(2, ge=0)
    fallback: str | None = Field(None, description="pool to fail over to when no replica can serve")
    supports_tools: bool = Field(False, description="remote: the upstream accepts tools/tool_choice (local pools "
                                 "always do: the engine constrains calls to each tool's schema)")
    discovery: Literal["none", "dns"] = Field("none", description="remote: 'dns' re-resolves each url's host "
                                              "and keeps one replica per address (a headless Service's pods)")
    discovery_interval_s: float = Field(10.0, gt=0, description="remote, discovery dns: seconds between resolutions")
    supports_json_mode: bool = Field(False, description="remote: the upstream honours response_format json_object/"
                                     "json_schema (local pools always do: constrained decoding)")
    supports_vision: bool = Field(False, description="remote: the upstream takes image parts (chat image_url, "
                                  "Responses input_image, Anthropic image); local pools never do (the embedded "
                                  "engine is text-only): there it is ignored")
    affinity_prefix_chars: int = Field(256, ge=0, description="requests without a session whose first this many "
                                       "characters after the leading system messages agree go to the same replica "
                                       "(0 = off)")
    tool_call_parser: Literal["auto", "hermes", "llama3_json"] = Field(
        "auto", description="local: how the model writes tool calls (auto = detected from its chat template; "
        "hermes for templates without tool support)")
    engine: EngineArgs = Field(EngineArgs(), description="local: the embedded engine's options (EngineArgs, "
                                                      "backends/engine/args.py)")

    @property
    def serves_tools(self) -> bool:
        """Whether requests with ``tools`` may go here (a capability local pools declare, remote ones configure)."""
        return self.kind == "local" or self.supports_tools

    @property
    def serves_json(self) -> bool:
        """Whether ``response_format`` json_object / json_schema is honoured here."""
        return self.kind == "local" or self.supports_json_mode

    @property
    def serves_images(self) -> bool:
        """Whether requests with image parts may go here (a remote pool that declares ``supports_vision``)."""
        return self.kind == "remote" and self.supports_vision

    @model_validator(mode="after")
    def _check_kind(self) -> PoolConfig:
        if self.kind == "remote" and not self.urls:
            raise ValueError(f"pool {self.name!r}: kind 'remote' needs at least one url in 'urls'")
        if self.kind == "local" and self.urls:
            raise ValueError(f"pool {self.name!r}: 'urls' is only for kind 'remote'")
        for url in self.urls:
            if not url.startswith(("http://", "https://")):
                raise ValueError(f"pool {self.name!r}: url {url!r} must start with http:// or https://")
        if self.task == "embed" and self.kind == "local" and self.model != "minilm":
            raise ValueError(f"pool {self.name!r}: a local embed pool serves the bundled 'minilm', not {self.model!r}")
        return self


class VerdictPolicy(_Frozen):
    """What to do with a request the guard labels out-of-domain or unsafe."""

    action: Literal["reject", "refuse", "route", "allow"] = "reject"
    pool: str | None = Field(None, description="for action 'route': the pool that answers")
    message: str = "This request is outside what this service answers."


class GuardSettings(_Frozen):
    artifact: str | None = Field(None, description="guard artifact folder; None = guard off")
    ood: VerdictPolicy = VerdictPolicy()
    unsafe: VerdictPolicy = VerdictPolicy(message="This request was flagged as unsafe and was not answered.")
    max_context_chars: int = Field(2000, ge=1)


class ClassifierSettings(_Frozen):
    """How the guard and the router run (routers/batcher.py): off the event loop, micro-batched."""

    batching: bool = Field(True, description="run each classifier artifact in its own worker thread over the "
                           "requests waiting for it (false: on the event loop, one request at a time)")
    max_batch: int = Field(32, ge=1, description="most requests one classifier call scores together")
    max_wait_ms: float = Field(0.2, ge=0, le=100, description="under load, how long a batch may wait to fill "
                               "(a request that finds its classifier idle never waits)")
    inline_when_alone: bool = Field(True, description="a request alone between admission and its first token, "
                                    "whose classifier is idle, runs it on the event loop: nothing to batch with, "
                                    "no thread hop")


class CascadeSettings(_Frozen):
    mode: Literal["off", "slm_then_escalate"] = "slm_then_escalate"
    # buffer: produce the whole SLM answer before sending anything (no wasted tokens to the client).
    # stream_when_confident: stream the SLM directly when the router is confident (decision 'slm').
    stream_mode: Literal["buffer", "stream_when_confident"] = "stream_when_confident"
    min_mean_logprob: float | None = Field(None, le=0, description="None = use the router artifact's")
    min_token_logprob: float | None = Field(None, le=0)


class RoutingSettings(_Frozen):
    slm_pool: str = "slm"
    llm_pool: str = "llm"
    router_artifact: str | None = Field(None, description="router artifact folder; None = cascade only")
    threshold: float | None = Field(None, description="override the artifact's calibrated threshold")
    escalate_band: float = Field(0.1, ge=0, le=1, description="scores this close above threshold cascade")
    cascade: CascadeSettings = CascadeSettings()
    pools: dict[str, str] = Field(default_factory=dict, description="nmodel router artifact: {model name in "
                                  "the artifact: pool alias}; a model not listed goes to the pool named after it, "
                                  "else to the pool serving it (pools[].model)")
    quality_tolerance: float | None = Field(None, ge=0, description="nmodel router artifact: auto picks the "
                                            "cheapest pool predicted within this of the best predicted score; "
                                            "None = the artifact's calibrated tolerance")


class ExampleCacheSettings(_Frozen):
    enabled: bool = True
    backend: Literal["memory", "redis"] = "memory"
    redis_url: str | None = Field(None, description="defaults to the top-level redis_url")
    top_k: int = Field(2, ge=0)
    min_similarity: float = Field(0.75, ge=-1, le=1)
    max_example_tokens: int = Field(512, ge=0)
    max_entries_per_namespace: int = Field(100_000, ge=1)
    ttl_s: int | None = Field(7 * 24 * 3600, ge=1)
    dedup_similarity: float = Field(0.97, ge=-1, le=1)
    deadline_ms: float = Field(20.0, gt=0)
    server_search: Literal["off", "auto", "on"] = Field(
        "off", description="vector search inside Redis (Redis 8 / Redis Stack) instead of the in-process "
        "index: auto = when detected at start-up, on = fail start-up without it (backend redis only)")
    keep_on_slm_similarity: float | None = Field(
        None, ge=-1, le=1, description="route slm_then_escalate: when an example at least this similar was "
        "retrieved, the SLM answer is kept without the cascade judging it; None = off")


class ApiKey(_Frozen):
    """An API key, stored only as its sha256 hex digest (``switchyard keys hash`` prints one)."""

    name: str = Field(min_length=1)
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    models: list[str] | None = Field(None, description="allowed model aliases; None = all")
    requests_per_minute: int | None = Field(None, ge=1)
    tokens_per_minute: int | None = Field(None, ge=1)
    guard_exempt: bool = False
    namespace: str | None = Field(None, description="example-cache namespace; None = key name")
    admin: bool = Field(False, description="may call POST /admin/reload, read the /ui dashboard's data and see "
                        "replica addresses in /readyz (credentials are never shown)")
    max_budget_usd: float | None = Field(None, ge=0, description="spend cap per budget_window; over it → 429 "
                                         "budget_exceeded before any backend call; None = no cap")
    budget_window: str = Field("1d", pattern=r"^[1-9][0-9]*[smhd]$", description="30m, 12h, 1d, 30d, ... "
                               "(fixed windows aligned to the epoch: 1d = UTC days)")


class Limits(_Frozen):
    max_body_bytes: int = Field(1_000_000, ge=1024)
    max_header_bytes: int = Field(32_768, ge=1024, description="all request headers together; more is a 431")
    max_prompt_tokens: int = Field(8192, ge=1)
    max_completion_tokens: int = Field(2048, ge=1)
    default_max_tokens: int = Field(512, ge=1, description="max_tokens when a chat request names none")
    request_timeout_s: float = Field(120.0, gt=0)
    body_read_timeout_s: float = Field(60.0, gt=0, description="the whole request body must arrive within this "
                                                             "time, else 408 and the connection is closed")
    max_n: int = Field(8, ge=1)


class ResponsesSettings(_Frozen):
    """Stored conversations of the Responses API (``previous_response_id``)."""

    ttl_s: float = Field(604_800.0, gt=0, description="how long a stored response can be continued")
    max_entries: int = Field(10_000, ge=1, description="in-process store only (no redis_url): oldest out first")


class SessionSettings(_Frozen):
    """Agent sessions (gateway/sessions.py): the tier that holds and the examples kept per session."""

    hold_tier: bool = Field(True, description="after a session's auto turn was answered by the LLM, its later "
                            "auto turns stay on the LLM (route 'session'); the tier only moves up")
    hold_turns: int = Field(0, ge=0, description="0 = the tier holds for ttl_s; k = for the next k auto turns")
    keep_examples: bool = Field(True, description="a session's SLM turns reuse its first turn's example-cache "
                                "examples, so each turn's prompt extends the last (prefix-cache hits)")
    ttl_s: float = Field(1800.0, gt=0, description="seconds a session's state is kept after its last turn")
    max_entries: int = Field(100_000, ge=1, description="in-process store only (no redis_url): oldest out first")


class ShutdownSettings(_Frozen):
    """Graceful shutdown on SIGTERM: stop accepting, let in-flight requests and streams finish."""

    drain_s: float | None = Field(None, gt=0, description="how long in-flight requests may take to finish; "
                                  "None = limits.request_timeout_s + 5 (no request is cut by a rollout)")


class DecisionLogSettings(_Frozen):
    """One JSON line per request (gateway/decision_log.py)."""

    path: str | None = Field(None, description="a file to append to, or 'stdout'; None = no decision log")
    sample: float = Field(1.0, ge=0, le=1, description="share of requests logged")


class TrafficLogSettings(_Frozen):
    """Prompts of sampled ``auto`` requests, recorded for ``switchyard label --from-log`` (the traffic loop).
    Off unless ``path`` is set and keys or namespaces are named: nothing is recorded by default."""

    path: str | None = Field(None, description="a JSONL file to append to; None = no prompts are recorded")
    sample: float = Field(1.0, ge=0, le=1, description="share of the named keys' / namespaces' auto requests recorded")
    keys: list[str] = Field(default_factory=list, description="api_keys[].name whose requests are recorded")
    namespaces: list[str] = Field(default_factory=list, description="namespaces whose requests are recorded "
                                  "('default' on an open gateway)")
    max_bytes: int = Field(100_000_000, ge=4096, description="the log and its one rotated file hold at most this")
    retention_days: float = Field(30.0, gt=0, description="no recorded line is kept longer than this")

    @model_validator(mode="after")
    def _check(self) -> TrafficLogSettings:
        if self.path is not None and not (self.keys or self.namespaces):
            raise ValueError("traffic_log.path is set but no keys or namespaces are named: prompts are recorded "
                             "only for the api_keys[].name / namespaces listed in traffic_log.keys / namespaces")
        if self.path == "stdout":
            raise ValueError("traffic_log.path must be a file (its retention rotates it), not stdout")
        return self


class Settings(_Frozen):
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    redis_url: str | None = Field(None, description="redis://host:port/db; rate limits and example cache")
    pools: list[PoolConfig] = Field(min_length=1)
    routing: RoutingSettings = RoutingSettings()
    guard: GuardSettings = GuardSettings()
    classifiers: ClassifierSettings = ClassifierSettings()
    example_cache: ExampleCacheSettings = ExampleCacheSettings()
    api_keys: list[ApiKey] = Field(default_factory=list)
    limits: Limits = Limits()
    responses: ResponsesSettings = ResponsesSettings()
    sessions: SessionSettings = SessionSettings()
    shutdown: ShutdownSettings = ShutdownSettings()
    decision_log: DecisionLogSettings = DecisionLogSettings()
    traffic_log: TrafficLogSettings = TrafficLogSettings()
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    workers: int = Field(1, ge=1, le=64, description="gateway processes on one port, each with its own event loop, "
                         "guard and router (rate limits, budgets, sessions and stored responses are shared "
                         "across them only through redis_url)")
    keep_alive_s: float = Field(75.0, gt=0, description="idle seconds before a client connection is closed; keep "
                                                        "it above any load balancer's idle timeout (ALB: 60 s)")
    opentelemetry: bool = Field(False, description="OpenTelemetry spans of the request path (gateway/tracing.py) and "
                                "FastAPI's HTTP spans, exported over OTLP/HTTP (OTEL_EXPORTER_OTLP_ENDPOINT); needs "
                                "the otel extra; off costs nothing per request")

    @field_validator("redis_url")
    @classmethod
    def _check_redis_url(cls, v: str | None) -> str | None:
        if v is not None and not v.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError("must start with redis://, rediss:// or unix://")
        return v

    @model_validator(mode="after")
    def _check_references(self) -> Settings:
        names = [p.name for p in self.pools]
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise ValueError(f"pool names must be unique; repeated: {sorted(dup)}")
        if "auto" in names:
            raise ValueError("'auto' is reserved for routing and cannot name a pool")
        generate = [p.name for p in self.pools if p.task == "generate"]
        for key, ref in (("routing.slm_pool", self.routing.slm_pool), ("routing.llm_pool", self.routing.llm_pool)):
            if ref not in generate:
                raise ValueError(f"{key} = {ref!r} is not a pool with task 'generate'; those are: {generate}")
        for model, ref in self.routing.pools.items():
            if ref not in generate:
                raise ValueError(f"routing.pools.{model} = {ref!r} is not a pool with task 'generate'; "
                                 f"those are: {generate}")
        if self.routing.pools and self.routing.router_artifact is None:
            raise ValueError("routing.pools maps an nmodel router artifact's models to pools: set "
                             "routing.router_artifact")
        for pool in self.pools:
            if pool.fallback is not None and pool.fallback not in names:
                raise ValueError(f"pools[{pool.name}].fallback = {pool.fallback!r} is not a pool; pools: {names}")
            if pool.fallback is not None and self.pool(pool.fallback).task != pool.task:
                raise ValueError(f"pools[{pool.name}].fallback = {pool.fallback!r} serves another task")
        for verdict, policy in (("guard.ood", self.guard.ood), ("guard.unsafe", self.guard.unsafe)):
            if policy.action == "route" and policy.pool not in names:
                raise ValueError(f"{verdict}.pool = {policy.pool!r} must name a pool for action 'route'")
        if self.example_cache.enabled and self.example_cache.backend == "redis":
            if not (self.example_cache.redis_url or self.redis_url):
                raise ValueError("example_cache.backend = 'redis' needs redis_url (or example_cache.redis_url)")
        key_names = {k.name for k in self.api_keys}
        for name in self.traffic_log.keys:
            if name not in key_names:
                raise ValueError(f"traffic_log.keys names {name!r}, which is not an api_keys[].name; "
                                 f"those are: {sorted(key_names)}")
        local = [p.name for p in self.pools if p.kind == "local"]
        if self.workers > 1 and local:
            raise ValueError(f"workers = {self.workers} needs remote pools only: each worker process would load "
                             f"its own copy of local pools {local} (serve them with `switchyard engine serve` and "
                             "point remote pools at them)")
        if self.example_cache.server_search == "on" and self.example_cache.backend != "redis":
            raise ValueError("example_cache.server_search = 'on' needs example_cache.backend = 'redis'")
        return self

    def drain_seconds(self) -> float:
        """Seconds in-flight requests get after SIGTERM (``shutdown.drain_s``, default request timeout + 5)."""
        return self.shutdown.drain_s if self.shutdown.drain_s is not None else self.limits.request_timeout_s + 5

    def resolve_model(self, model: str) -> str | None:
        """The one place a request's ``model`` becomes a pool: ``auto`` stays ``auto``; a pool's name, or the
        model a pool serves (the first such pool), gives that pool's name; anything else None."""
        if model == "auto":
            return model
        for p in self.pools:
            if p.name == model:
                return p.name
        for p in self.pools:
            if p.model == model:
                return p.name
        return None

    def pool(self, name: str) -> PoolConfig:
        for p in self.pools:
            if p.name == name:
                return p
        raise KeyError(name)

    def router_pools(self, kind: str, models: list[str]) -> dict[str, tuple[str, float]] | None:
        """The one place a router artifact's model names become pools. For an ``nmodel`` artifact (``kind``,
        its ``models``): ``{model: (pool alias, cost)}`` — ``routing.pools[model]``, else the pool named
        ``model``, else the pool serving it (``pools[].model``); cost = the pool's ``price.blended_per_1m``.
        None for a two-pool artifact. ConfigError (one line naming the key) when the routing settings do not
        fit the artifact at ``routing.router_artifact``."""
        routing, where = self.routing, f"routing.router_artifact {self.routing.router_artifact!r}"
        if kind != "nmodel":
            for key, value in (("routing.pools", routing.pools or None),
                               ("routing.quality_tolerance", routing.quality_tolerance)):
                if value is not None:
                    raise ConfigError(f"{key} is for an nmodel router artifact; {where} is a two-pool "
                                      f"({kind}) router")
            return None
        if routing.threshold is not None:
            raise ConfigError(f"routing.threshold is for a two-pool router; {where} is an nmodel router "
                              "(set routing.quality_tolerance)")
        unknown = sorted(set(routing.pools) - set(models))
        if unknown:
            raise ConfigError(f"routing.pools names {unknown}, not models of {where}; its models: {models}")
        out, unmapped = {}, []
        for model in models:
            alias = routing.pools.get(model) or self.resolve_model(model)
            if alias is None or alias == "auto" or self.pool(alias).task != "generate":
                unmapped.append(model)
            else:
                out[model] = (alias, self.pool(alias).price.blended_per_1m)
        if unmapped:
            raise ConfigError(f"{where} routes among models that match no generate pool: {unmapped}; map each "
                              "in routing.pools: {model: pool}, or name a pool (or its model) after it")
        aliases = [alias for alias, _ in out.values()]
        shared = sorted({a for a in aliases if aliases.count(a) > 1})
        if shared:
            raise ConfigError(f"{where}: each of its models needs its own pool; {shared} serve several "
                              "(routing.pools)")
        return out


def hash_api_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


class ConfigLoader(yaml.SafeLoader):
    """SafeLoader whose only booleans are true/false (YAML 1.2 core schema), not YAML 1.1's on/off/yes/no."""

    yaml_implicit_resolvers = {
        first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:bool"]
        for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
    }


ConfigLoader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF"))


def read_yaml(text: str) -> Any:
    """One YAML document of a config file or env override value (booleans: true/false only)."""
    return yaml.load(text, Loader=ConfigLoader)


def _format_validation_error(err: ValidationError, raw: Mapping[str, Any]) -> str:
    lines = []
    for e in err.errors():
        loc = [str(p) for p in e["loc"]]
        key = ".".join(loc) or "<root>"
        value: Any = raw
        for part in e["loc"]:
            try:
                value = value[int(part)] if isinstance(value, list) else value[part]
            except (KeyError, IndexError, TypeError, ValueError):
                value = e.get("input")
                break
        msg = e["msg"].removeprefix("Value error, ")
        lines.append(f"{key} = {value!r}: {msg}" if loc else msg)
    return "invalid config: " + "; ".join(lines)


def _set_path(data: dict[str, Any], path: list[str], value: Any) -> None:
    node: Any = data
    for i, part in enumerate(path):
        last = i == len(path) - 1
        if isinstance(node, list):
            try:
                idx = int(part)
                node[idx]
            except (ValueError, IndexError):
                raise ConfigError(f"env override {ENV_PREFIX}{'__'.join(path).upper()}: no list item {part!r}") from None
            if last:
                node[idx] = value
            else:
                node = node[idx]
            continue
        if last:
            node[part] = value
        else:
            node = node.setdefault(part, {})


def apply_env_overrides(data: dict[str, Any], environ: Mapping[str, str]) -> dict[str, Any]:
    for name, raw in sorted(environ.items()):
        if not name.startswith(ENV_PREFIX):
            continue
        path = [p.lower() for p in name[len(ENV_PREFIX) :].split("__") if p]
        if not path:
            continue
        try:
            value = read_yaml(raw) if raw != "" else None
        except yaml.YAMLError as e:
            raise ConfigError(f"env override {name} = {raw!r}: not valid YAML ({e.problem})") from None
        _set_path(data, path, value)
    return data


def default_config_text() -> str:
    return resources.files("gateway").joinpath("default_config.yaml").read_text()


def load_settings(path: str | Path | None = None, environ: Mapping[str, str] | None = None) -> Settings:
    """Read YAML (or the embedded default), apply env overrides, validate. Raises ConfigError."""
    if path is None:
        text, origin = default_config_text(), "<embedded default>"
    else:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {str(p)!r} does not exist")
        text, origin = p.read_text(), str(p)
    try:
        data = read_yaml(text) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {origin}: not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {origin}: top level must be a mapping, got {type(data).__name__}")
    data = apply_env_overrides(data, os.environ if environ is None else environ)
    return settings_from_dict(data)


def settings_from_dict(data: Mapping[str, Any]) -> Settings:
    try:
        return Settings.model_validate(dict(data))
    except ValidationError as e:
        raise ConfigError(_format_validation_error(e, data)) from None
