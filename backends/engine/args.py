"""EngineArgs: what a user chooses about one engine instance (vLLM's EngineArgs), validated once.

The one definition of the engine's options: the gateway's pool settings nest it (``PoolConfig.engine``,
validated from YAML by pydantic through the dataclass fields and ``__post_init__``), ``switchyard engine
serve`` builds it from flags, tests and benchmarks construct it directly. ``EngineConfig.from_args``
resolves it against a model folder and a device.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

Dtype = Literal["auto", "float32", "bfloat16", "float16"]
Quantization = Literal["none", "int8", "int4"]
Device = Literal["auto", "cpu", "cuda"]
DTYPES: tuple[str, ...] = ("auto", "float32", "bfloat16", "float16")
QUANTIZATIONS: tuple[str, ...] = ("none", "int8", "int4")
DEVICES: tuple[str, ...] = ("auto", "cpu", "cuda")
SpeculationMethod = Literal["none", "ngram"]
SPECULATION_METHODS: tuple[str, ...] = ("none", "ngram")


@dataclass(frozen=True)
class SpeculationConfig:
    """Speculative decoding of one engine (``speculation.py``); ``EngineArgs.speculation``, ``speculation:`` of a
    pool's ``engine`` settings. Invalid values raise ValueError naming the key; afterwards read-only.

    ``method`` "ngram" drafts up to ``num_draft_tokens`` tokens per step from the longest suffix n-gram
    (``max_n`` >= n >= ``min_n`` tokens) of a sequence that occurred earlier in its own prompt + output, and,
    with ``shared_context``, when its own text has none, from a table of the n-grams of recent outputs of
    requests in the same namespace (``add_request(..., namespace=)``; at most ``shared_max_entries`` n-grams
    per namespace, least frequently used evicted). "none" (the default) = off. Drafts never change greedy
    output; sampled output keeps its distribution.

    A proposal is cut to the number of drafts whose expected accepted tokens pay for their verification
    (none when no number does): ``verify_cost`` None = the engine measures what a verify pass of k drafts
    costs against a plain decode step; a number fixes it at ``verify_cost`` plain steps per draft (0 = always
    send whole proposals).
    """

    __pydantic_config__ = {"extra": "forbid"}  # noqa: RUF012 - not a field (no annotation)

    method: SpeculationMethod = "none"
    num_draft_tokens: int = 8
    min_n: int = 2
    max_n: int = 4
    shared_context: bool = False
    shared_max_entries: int = 32768
    verify_cost: float | None = None

    def __post_init__(self) -> None:
        if self.method not in SPECULATION_METHODS:
            raise ValueError(f"speculation.method must be one of {', '.join(SPECULATION_METHODS)}; "
                             f"got {self.method!r}")
        for name in ("num_draft_tokens", "min_n", "max_n", "shared_max_entries"):
            value = getattr(self, name)
            if value < 1:
                raise ValueError(f"speculation.{name} must be >= 1, got {value}")
        if self.verify_cost is not None and not 0 <= self.verify_cost <= 10:
            raise ValueError(f"speculation.verify_cost must be null or between 0 and 10, got {self.verify_cost}")
        if self.min_n > self.max_n:
            raise ValueError(f"speculation.min_n must be <= speculation.max_n, got {self.min_n} > {self.max_n}")


@dataclass(frozen=True)
class EngineArgs:
    """Options of one engine. Invalid values raise ValueError naming the field; afterwards read-only.

    ``num_kv_blocks`` None = size the KV cache from ``kv_cache_memory_gb``; ``num_threads`` None = torch's
    choice; ``quantization`` int8 / int4 weights on CPU (``layers/quantization.py``); ``device`` "auto" = CUDA when
    available, else CPU.

    Agent sessions (requests that carry a session id / program id):
      * ``kv_retain_s`` > 0: when a session's request finishes, the full KV blocks of its prompt + output
        stay pinned (not LRU-evicted) for that many seconds, so the session's next turn hits them after a
        tool pause; released on expiry, when the session's next request is admitted, or when memory is
        short (``block_manager.py`` says which session is dropped). 0 = off. Pinning needs prefix caching:
        with ``enable_prefix_caching`` off nothing is retained.
      * ``kv_retain_max_share``: at most this share of the KV blocks is pinned at once (0 < share <= 1).
      * ``kv_offload_gb`` > 0: a second KV tier of that many GiB in host memory (``host_cache.py``): blocks LRU
        evicts from the pool are copied there and a later prefix match copies them back instead of
        recomputing them (a paused session's context survives a burst that needs its pool blocks). 0 = off;
        needs prefix caching. On a CPU engine it is the same RAM as the pool.
      * ``program_scheduling``: a waiting request whose program has a request running, or finished within
        the last ``kv_retain_s``, is admitted ahead of a new program's request (Continuum's program FCFS;
        within the same priority only). ``program_max_wait_s`` bounds starvation: a request that has
        waited longer goes first, in arrival order.

    Speculative decoding: ``speculation`` (a ``SpeculationConfig``; off by default).
    """

    # Read by pydantic when a settings model nests this dataclass: unknown keys are errors. A plain dict,
    # so the engine does not import pydantic.
    __pydantic_config__ = {"extra": "forbid"}  # noqa: RUF012 - not a field (no annotation)

    dtype: Dtype = "auto"
    quantization: Quantization = "none"
    max_model_len: int = 2048
    max_num_seqs: int = 32
    max_num_batched_tokens: int = 1024
    block_size: int = 16
    num_kv_blocks: int | None = None
    kv_cache_memory_gb: float = 1.0
    enable_prefix_caching: bool = True
    num_threads: int | None = None
    device: Device = "auto"
    kv_retain_s: float = 0.0
    kv_retain_max_share: float = 0.25
    kv_offload_gb: float = 0.0
    program_scheduling: bool = False
    program_max_wait_s: float = 5.0
    speculation: SpeculationConfig = field(default_factory=SpeculationConfig)

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}; got {self.dtype!r}")
        if self.quantization not in QUANTIZATIONS:
            raise ValueError(f"quantization must be one of {', '.join(QUANTIZATIONS)}; got {self.quantization!r}")
        if self.device not in DEVICES:
            raise ValueError(f"device must be one of {', '.join(DEVICES)}; got {self.device!r}")
        for name, minimum in (("max_model_len", 16), ("max_num_seqs", 1), ("max_num_batched_tokens", 16),
                              ("block_size", 1)):
            value = getattr(self, name)
            if value < minimum:
                raise ValueError(f"{name} must be >= {minimum}, got {value}")
        for name in ("num_kv_blocks", "num_threads"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1 (or null), got {value}")
        if not self.kv_cache_memory_gb > 0:
            raise ValueError(f"kv_cache_memory_gb must be > 0, got {self.kv_cache_memory_gb}")
        if not self.kv_retain_s >= 0:
            raise ValueError(f"kv_retain_s must be >= 0 (0 = off), got {self.kv_retain_s}")
        if not self.kv_offload_gb >= 0:
            raise ValueError(f"kv_offload_gb must be >= 0 (0 = off), got {self.kv_offload_gb}")
        if not 0 < self.kv_retain_max_share <= 1:
            raise ValueError(f"kv_retain_max_share must be in (0, 1], got {self.kv_retain_max_share}")
        if not isinstance(self.speculation, SpeculationConfig):
            raise ValueError(f"speculation must be a SpeculationConfig, got {type(self.speculation).__name__}")
        if not self.program_max_wait_s > 0:
            raise ValueError(f"program_max_wait_s must be > 0, got {self.program_max_wait_s}")
