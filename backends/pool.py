"""Model pools: an alias → replicas, with load balancing, health, retries and failover.

``Pool.generate(request)`` is the Backend call the gateway makes. What it guarantees:
  * replica choice = least outstanding tokens, with affinity: requests of one session (``session_id``), or
    else whose leading ``affinity_prefix_chars`` characters after the leading system messages (or first 64
    token ids) are equal, go to the same replica
    (rendezvous hashing, so ejecting one replica moves only its own keys) while that replica's load is at
    most ``affinity_load_factor`` × the least loaded one's + ``affinity_slack_tokens``;
  * a retryable ``BackendError`` before the first Delta → retry on *another* replica (the same one only
    when no other is available), after an exponential backoff with full jitter, up to
    ``PoolConfig.max_retries`` retries; then the configured fallback pool gets the request;
  * ``stream=False`` (the caller buffers the whole answer): Deltas are yielded only once an attempt has
    completed, so even a failure mid-answer is retried elsewhere;
  * a failure after a Delta was yielded → ``BackendError(after_first_token=True)``, never a retry;
  * a non-retryable error (a 4xx) is raised as it is;
  * ``request.deadline`` (``time.monotonic()``) bounds the whole call, retries and backoff included:
    ``BackendError(504, code "deadline_exceeded")``;
  * nothing available and no fallback → ``BackendError(503, code "no_healthy_replica", retryable=False)``;
  * health: ``eject_after_failures`` consecutive retryable failures eject a replica for
    ``eject_cooldown_s``, after which it gets traffic again (half-open: one more failure ejects it again).
    Passive ejection never takes out the last available replica of a pool without a fallback: under
    overload (timeouts) that would turn slowness into a full outage; a dead replica there still fails
    fast (connect refused) and the probe marks it down. A periodic probe (``health_interval_s``) marks
    replicas down/up and lifts an ejection early when the replica answers; a replica that completed a
    request within the last interval counts as up without a probe.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import random
import time
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any

from backends.base import Backend, BackendError, Delta, GenerationRequest

log = logging.getLogger("switchyard.pool")

BackendFactory = Callable[[Any, int], Backend]  # (PoolConfig, replica index) -> Backend
# (pool alias, replica name, model) -> the engine StatLogger of that local replica (backends/engine/stats.py)
StatLoggerFactory = Callable[[str, str, str], Any]


@dataclass
class PoolStats:
    """Counters for metrics. ``num_failovers`` counts requests handed to the fallback pool."""

    num_requests: int = 0
    num_failures: int = 0  # requests that ended with an error raised to the caller
    num_retries: int = 0
    num_failovers: int = 0
    num_ejections: int = 0
    num_no_replica: int = 0


@dataclass(eq=False)
class Replica:
    """One backend and what the pool knows about it."""

    backend: Backend
    num_outstanding_tokens: int = 0
    num_outstanding_requests: int = 0
    num_consecutive_failures: int = 0
    ejected_until: float = 0.0  # time.monotonic(); 0 = not ejected
    is_healthy: bool = True  # last active probe
    last_success: float = 0.0  # time.monotonic() of the last completed request

    @property
    def name(self) -> str:
        return self.backend.name

    def is_available(self, now: float) -> bool:
        return self.is_healthy and now >= self.ejected_until


class Pool:
    """Replicas of one model behind one alias. See the module docstring for the guarantees."""

    def __init__(
        self,
        alias: str,
        replicas: list[Backend],
        settings: Any,
        *,
        fallback: Pool | None = None,
        eject_after_failures: int = 3,
        eject_cooldown_s: float = 10.0,
        health_interval_s: float = 5.0,
        affinity_prefix_chars: int | None = None,
        affinity_load_factor: float = 2.0,
        affinity_slack_tokens: int = 2048,
        backoff_base_s: float = 0.02,
        backoff_max_s: float = 1.0,
        rng: random.Random | None = None,
    ) -> None:
        if not replicas:
            raise ValueError(f"pool {alias!r} needs at least one replica")
        names = [r.name for r in replicas]
        if len(set(names)) != len(names):
            raise ValueError(f"pool {alias!r}: replica names must be unique, got {names}")
        if eject_after_failures < 1:
            raise ValueError("eject_after_failures must be >= 1")
        self.alias = alias
        self.settings = settings  # PoolConfig (or anything with max_retries, model)
        self.replicas = [Replica(b) for b in replicas]
        self.fallback = fallback
        self.eject_after_failures = eject_after_failures
        self.eject_cooldown_s = eject_cooldown_s
        self.health_interval_s = health_interval_s
        # the argument (tests, benchmarks) over the pool's setting over the default
        self.affinity_prefix_chars = (affinity_prefix_chars if affinity_prefix_chars is not None
                                      else getattr(settings, "affinity_prefix_chars", 256))
        self.affinity_load_factor = affinity_load_factor
        self.affinity_slack_tokens = affinity_slack_tokens
        self.backoff_base_s = backoff_base_s
        self.backoff_max_s = backoff_max_s
        self.stats = PoolStats()
        self._rng = rng or random.Random()
        self._rr = 0
        self._health_task: asyncio.Task | None = None
        self._drains: set[asyncio.Task] = set()  # replicas discovery removed, closing once idle

    def __repr__(self) -> str:
        return f"Pool({self.alias!r}, replicas={[r.name for r in self.replicas]})"

    @property
    def model(self) -> str:
        return self.settings.model

    @property
    def max_retries(self) -> int:
        return int(getattr(self.settings, "max_retries", 2))

    # ------------------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Load every replica (a replica that fails to load starts unhealthy) and start the probe loop."""
        results = await asyncio.gather(*(r.backend.load() for r in self.replicas), return_exceptions=True)
        for replica, result in zip(self.replicas, results, strict=True):
            if isinstance(result, BaseException):
                replica.is_healthy = False
        if self._health_task is None and self.health_interval_s > 0:
            self._health_task = asyncio.create_task(self._health_loop(), name=f"pool-health-{self.alias}")

    async def close(self) -> None:
        task, self._health_task = self._health_task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await asyncio.gather(*(r.backend.close() for r in self.replicas), return_exceptions=True)

    async def check_health(self) -> dict[str, bool]:
        """Probe every replica once; a passing probe also lifts an ejection. Returns {replica: healthy}."""
        results = await asyncio.gather(*(self._probe(r) for r in self.replicas))
        return {r.name: ok for r, ok in zip(self.replicas, results, strict=True)}

    async def _probe(self, replica: Replica) -> bool:
        if self.health_interval_s > 0 and time.monotonic() - replica.last_success < self.health_interval_s:
            ok = True  # it just served a request; no need to ask (and a busy loop can time a probe out)
        else:
            try:
                ok = bool(await replica.backend.health())
            except Exception:
                ok = False
        replica.is_healthy = ok
        if ok and replica.ejected_until:
            replica.ejected_until = 0.0
            replica.num_consecutive_failures = 0
        return ok

    async def _health_loop(self) -> None:
        while True:
            await asyncio.sleep(self.health_interval_s)
            await self.check_health()

    async def set_replicas(self, urls: dict[str, None], make_backend: Callable[[str], Backend]) -> None:
        """Make the replicas those of ``urls`` (discovery): new ones are built and loaded, gone ones leave the
        choice at once and are closed after their in-flight requests (``num_outstanding_requests``) end."""
        from backends.openai_upstream import display_url

        current = {r.name: r for r in self.replicas}
        wanted = {display_url(u): u for u in urls}
        added = [Replica(make_backend(u)) for name, u in wanted.items() if name not in current]
        gone = [r for name, r in current.items() if name not in wanted]
        if not added and not gone:
            return
        results = await asyncio.gather(*(r.backend.load() for r in added), return_exceptions=True)
        for replica, result in zip(added, results, strict=True):
            replica.is_healthy = not isinstance(result, BaseException)
        self.replicas = [r for r in self.replicas if r not in gone] + added
        for replica in gone:
            self._drains.add(asyncio.ensure_future(self._drain(replica)))
        log.info("pool %s: replicas %s (+%d, -%d)", self.alias, [r.name for r in self.replicas], len(added), len(gone))

    async def _drain(self, replica: Replica) -> None:
        while replica.num_outstanding_requests > 0:
            await asyncio.sleep(0.05)
        await replica.backend.close()

    def health(self) -> dict[str, bool]:
        """{replica name: available now} from what the pool knows (no I/O)."""
        now = time.monotonic()
        return {r.name: r.is_available(now) for r in self.replicas}

    # -------------------------------------------------------------------------------- choice

    def affinity_key(self, request: GenerationRequest) -> bytes | None:
        """What decides affinity: the request's session when it has one (every turn of an agent session on
        one replica, which holds its KV), else the leading characters of the messages after the leading
        system messages (a system prompt many agents share must not send them all to one replica), or of
        the prompt."""
        if request.session_id is not None:
            return b"session:" + request.session_id.encode()
        if self.affinity_prefix_chars <= 0:
            return None
        if request.messages is not None:
            skip = 0
            while skip < len(request.messages) - 1 and request.messages[skip].get("role") in ("system", "developer"):
                skip += 1
            parts, size = [], 0
            for m in request.messages[skip:]:
                content = m.get("content")
                text = content if isinstance(content, str) else repr(content)
                parts.append(f"{m.get('role', '')}:{text}\n")
                size += len(parts[-1])
                if size >= self.affinity_prefix_chars:
                    break
            return "".join(parts)[: self.affinity_prefix_chars].encode()
        if isinstance(request.prompt, str):
            return request.prompt[: self.affinity_prefix_chars].encode()
        return ",".join(map(str, request.prompt[:64])).encode()

    def estimate_tokens(self, request: GenerationRequest, replica: Replica | None = None) -> int:
        """Outstanding-token cost of a request: prompt tokens (exact if the replica knows, else chars/4)
        plus ``max_tokens × n``."""
        num_prompt = None
        if replica is not None:
            with contextlib.suppress(Exception):
                num_prompt = replica.backend.num_prompt_tokens(request)
        if num_prompt is None:
            if request.messages is not None:
                num_chars = sum(len(str(m.get("content") or "")) for m in request.messages)
            elif isinstance(request.prompt, str):
                num_chars = len(request.prompt)
            else:
                num_chars = 4 * len(request.prompt)
            num_prompt = num_chars // 4 + 1
        return num_prompt + request.sampling.max_tokens * request.n

    def choose(self, request: GenerationRequest, tried: Mapping[Replica, int] | None = None,
               key: bytes | None = None) -> Replica | None:
        """The replica for the next attempt, or None when none is available. Untried replicas first."""
        now = time.monotonic()
        available = [r for r in self.replicas if r.is_available(now)]
        if not available:
            return None
        if tried:
            fewest = min(tried.get(r, 0) for r in available)
            available = [r for r in available if tried.get(r, 0) == fewest]
        least_load = min(r.num_outstanding_tokens for r in available)
        if key is not None:
            preferred = max(available, key=lambda r: _rendezvous(key, r.name))
            limit = self.affinity_load_factor * least_load + self.affinity_slack_tokens
            if preferred.num_outstanding_tokens <= limit:
                return preferred
        least = [r for r in available if r.num_outstanding_tokens == least_load]
        self._rr += 1
        return least[self._rr % len(least)]

    # ------------------------------------------------------------------------------ generate

    async def generate(self, request: GenerationRequest, stream: bool = True,
                       _visited: frozenset[str] = frozenset()) -> AsyncIterator[Delta]:
        """Stream the answer from a replica of this pool (or the fallback pool). See the module docstring."""
        self.stats.num_requests += 1
        tried: dict[Replica, int] = {}
        key = self.affinity_key(request)
        last_error: BackendError | None = None
        num_attempts = 0
        try:
            while num_attempts <= self.max_retries:
                _check_deadline(request, f"pool {self.alias}")
                replica = self.choose(request, tried, key)
                if replica is None:
                    break
                if num_attempts:
                    self.stats.num_retries += 1
                    await self._backoff(num_attempts, request)
                    replica = self.choose(request, tried, key) or replica
                tried[replica] = tried.get(replica, 0) + 1
                num_attempts += 1
                num_yielded = 0
                try:
                    async with contextlib.aclosing(self._attempt(replica, request, stream)) as deltas:
                        async for delta in deltas:
                            num_yielded += 1
                            yield delta
                    return
                except BackendError as e:
                    if num_yielded or e.after_first_token:
                        raise _after_first_token(e) from e
                    if not e.retryable:
                        raise
                    last_error = e
            if self.fallback is not None and self.fallback.alias not in _visited | {self.alias}:
                self.stats.num_failovers += 1
                fallback_request = replace(request, model=self.fallback.model)
                async with contextlib.aclosing(
                    self.fallback.generate(fallback_request, stream, _visited | {self.alias})
                ) as deltas:
                    async for delta in deltas:
                        yield delta
                return
            if last_error is None:
                self.stats.num_no_replica += 1
                raise BackendError(f"pool {self.alias!r} has no healthy replica", retryable=False, status_code=503,
                                   code="no_healthy_replica")
            raise BackendError(f"pool {self.alias!r}: every attempt failed ({num_attempts}); last: "
                               f"{last_error.message}", retryable=False, status_code=last_error.status_code,
                               code=last_error.code or "upstream_error")
        except BackendError:
            self.stats.num_failures += 1
            raise

    async def _attempt(self, replica: Replica, request: GenerationRequest, stream: bool) -> AsyncIterator[Delta]:
        """One try on one replica; accounts load and passive health. ``stream=False`` buffers the answer."""
        cost = self.estimate_tokens(request, replica)
        replica.num_outstanding_tokens += cost
        replica.num_outstanding_requests += 1
        try:
            if stream:
                agen = replica.backend.generate(request)
            elif getattr(replica.backend, "supports_buffered", False):
                agen = replica.backend.generate(request, stream=False)  # type: ignore[call-arg]
            else:
                agen = replica.backend.generate(request)
            buffered: list[Delta] = []
            num_got = 0
            # a backend that bounds itself by request.deadline saves a timeout context per Delta here
            deadline = None if getattr(replica.backend, "enforces_deadline", False) else request.deadline
            async with contextlib.aclosing(agen if deadline is None else _with_deadline(agen, deadline)) as deltas:
                async for delta in deltas:
                    num_got += 1
                    if stream:
                        yield delta
                    else:
                        buffered.append(delta)
            self._record_success(replica)
            for delta in buffered:
                yield delta
        except BackendError as e:
            self._record_failure(replica, e)
            if not stream and e.after_first_token and e.code != "deadline_exceeded":
                # nothing reached the caller yet: another replica may produce the whole answer
                raise BackendError(e.message, retryable=True, status_code=e.status_code, code=e.code) from e
            raise
        finally:
            replica.num_outstanding_tokens -= cost
            replica.num_outstanding_requests -= 1

    def _record_success(self, replica: Replica) -> None:
        replica.num_consecutive_failures = 0
        replica.last_success = time.monotonic()

    def _record_failure(self, replica: Replica, error: BackendError) -> None:
        if not error.retryable and not error.after_first_token:
            return  # the request was bad, not the replica
        if error.code == "deadline_exceeded":
            return
        replica.num_consecutive_failures += 1
        if replica.num_consecutive_failures < self.eject_after_failures:
            return
        now = time.monotonic()
        others = [r for r in self.replicas if r is not replica and r.is_available(now)]
        if not others and self.fallback is None:
            return  # the last one standing stays in (see the module docstring)
        if now >= replica.ejected_until:
            self.stats.num_ejections += 1
        replica.ejected_until = now + self.eject_cooldown_s

    async def _backoff(self, num_attempts: int, request: GenerationRequest) -> None:
        delay = self._rng.uniform(0, min(self.backoff_max_s, self.backoff_base_s * 2 ** (num_attempts - 1)))
        if request.deadline is not None:
            delay = min(delay, max(0.0, request.deadline - time.monotonic()))
        if delay > 0:
            await asyncio.sleep(delay)


class PoolSet:
    """Every pool of a deployment, by alias; owns their lifecycles."""

    def __init__(self, pools: Mapping[str, Pool], discoveries: list[Any] | None = None) -> None:
        self.pools = dict(pools)
        self.discoveries = list(discoveries or [])  # backends.discovery.DnsDiscovery of discovery: dns pools

    @classmethod
    def from_settings(cls, settings: Any, backend_factory: BackendFactory | None = None,
                      environ: Mapping[str, str] | None = None, stat_logger_factory: StatLoggerFactory | None = None,
                      resolver: Any = None, **pool_kwargs: Any) -> PoolSet:
        """Build the pools of ``settings.pools`` and wire their fallbacks.

        ``backend_factory(pool_config, index)`` builds replica ``index``; the default builds
        ``backends.local.LocalBackend`` (imported only when a local pool exists) for ``kind: local``
        (``replicas`` of them, each with ``stat_logger_factory(alias, replica, model)`` as its engine's stat
        logger) and one ``OpenAIUpstream`` per url for ``kind: remote``, with the API key read from the env
        var ``api_key_env``. ``pool_kwargs`` go to every ``Pool``. A remote pool with ``discovery: dns`` gets
        one replica per address its URLs resolve to (``backends/discovery.py``; ``resolver`` replaces the
        system's, for tests).
        """
        env = os.environ if environ is None else environ
        factory = backend_factory or (lambda cfg, i: default_backend(cfg, i, env, stat_logger_factory))
        pools: dict[str, Pool] = {}
        for cfg in settings.pools:
            if getattr(cfg, "task", "generate") != "generate":
                continue  # embedding pools are served by the gateway's embeddings service
            count = len(cfg.urls) if cfg.kind == "remote" else cfg.replicas
            pools[cfg.name] = Pool(cfg.name, [factory(cfg, i) for i in range(count)], cfg, **pool_kwargs)
        discoveries = []
        for cfg in settings.pools:
            if cfg.fallback is not None and cfg.name in pools:
                pools[cfg.name].fallback = pools[cfg.fallback]
            if cfg.name in pools and cfg.kind == "remote" and getattr(cfg, "discovery", "none") == "dns":
                from backends.discovery import DnsDiscovery

                def make(url: str, cfg: Any = cfg) -> Backend:
                    return remote_backend(cfg, url, env)

                discoveries.append(DnsDiscovery(pools[cfg.name], list(cfg.urls), make, cfg.discovery_interval_s,
                                                resolver))
        return cls(pools, discoveries)

    def get(self, alias: str) -> Pool:
        """The pool for ``alias``; KeyError if there is none."""
        return self.pools[alias]

    async def start(self) -> None:
        await asyncio.gather(*(p.start() for p in self.pools.values()))
        await asyncio.gather(*(d.start() for d in self.discoveries))

    async def close(self) -> None:
        await asyncio.gather(*(d.close() for d in self.discoveries), return_exceptions=True)
        await asyncio.gather(*(p.close() for p in self.pools.values()), return_exceptions=True)

    def health(self) -> dict[str, dict[str, bool]]:
        return {alias: p.health() for alias, p in self.pools.items()}

    def stats(self) -> dict[str, PoolStats]:
        return {alias: p.stats for alias, p in self.pools.items()}


def default_backend(cfg: Any, index: int, environ: Mapping[str, str] | None = None,
                    stat_logger_factory: StatLoggerFactory | None = None) -> Backend:
    """Replica ``index`` of pool ``cfg`` (a PoolConfig): LocalBackend or OpenAIUpstream."""
    if cfg.kind == "remote":
        return remote_backend(cfg, cfg.urls[index], environ)
    from backends.local import LocalBackend

    name = f"{cfg.name}/{index}"
    stat_logger = stat_logger_factory(cfg.name, name, cfg.model) if stat_logger_factory is not None else None
    return LocalBackend(name, cfg.model, cfg.engine, cfg.chat_template, stat_logger=stat_logger,
                        tool_call_parser=cfg.tool_call_parser)


def remote_backend(cfg: Any, url: str, environ: Mapping[str, str] | None = None) -> Backend:
    """An OpenAIUpstream for ``url`` of remote pool ``cfg``, its API key read from ``api_key_env``."""
    from backends.openai_upstream import OpenAIUpstream, display_url

    env = os.environ if environ is None else environ
    api_key = None
    if cfg.api_key_env:
        api_key = env.get(cfg.api_key_env)
        if not api_key:
            raise ValueError(f"pool {cfg.name!r}: env var {cfg.api_key_env} (api_key_env) is not set")
    return OpenAIUpstream(display_url(url), url, cfg.model, api_key, timeout_s=cfg.timeout_s,
                          connect_timeout_s=cfg.connect_timeout_s, supports_tools=cfg.supports_tools,
                          supports_json_mode=cfg.supports_json_mode, supports_vision=cfg.supports_vision)


def _rendezvous(key: bytes, name: str) -> int:
    return int.from_bytes(hashlib.blake2b(key + b"\0" + name.encode(), digest_size=8).digest(), "big")


def _check_deadline(request: GenerationRequest, where: str) -> None:
    if request.deadline is not None and time.monotonic() >= request.deadline:
        raise BackendError(f"request deadline passed in {where}", retryable=False, status_code=504,
                           code="deadline_exceeded")


def _after_first_token(e: BackendError) -> BackendError:
    if e.after_first_token and not e.retryable:
        return e
    return BackendError(e.message, retryable=False, status_code=e.status_code, code=e.code, after_first_token=True)


async def _with_deadline(deltas: AsyncIterator[Delta], deadline: float) -> AsyncIterator[Delta]:
    """``deltas`` (closed at the end); past ``deadline`` raise BackendError(504, "deadline_exceeded")."""
    num_yielded = 0
    async with contextlib.aclosing(deltas):
        while True:
            try:
                when = asyncio.get_running_loop().time() + (deadline - time.monotonic())
                async with asyncio.timeout_at(when):
                    delta = await anext(deltas)
            except StopAsyncIteration:
                return
            except TimeoutError:
                raise BackendError("request deadline passed while generating", retryable=False, status_code=504,
                                   code="deadline_exceeded", after_first_token=num_yielded > 0) from None
            num_yielded += 1
            yield delta


__all__ = ["Pool", "PoolSet", "PoolStats", "Replica", "default_backend"]
