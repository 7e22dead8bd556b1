"""Shared fixtures: real redis-server, live uvicorn servers, tiny random HF model folders.

TRITON_INTERPRET=1 is set here, before anything can import a Triton kernel, so the Triton
kernels run (slowly, exactly) on CPU in the default test run.

Every test that uses a model folder (``tiny_model_dir``, ``bundled_model_dir``) or a live server
(``live_server``) is marked ``slow`` here, so ``make test-fast`` (``-m "not slow"``) never builds or loads a
model nor starts uvicorn; other slow tests carry the mark themselves.
"""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import contextlib  # noqa: E402
import shutil  # noqa: E402
import socket  # noqa: E402
import subprocess  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable, Iterator  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, timeout: float = 20.0, host: str = "127.0.0.1") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=0.2):
            return
        time.sleep(0.02)
    raise TimeoutError(f"nothing listening on {host}:{port} after {timeout}s")


# --------------------------------------------------------------------------------------- Redis


@dataclass
class RedisServer:
    """A real redis-server process on a free loopback port; ``stop()``/``start()`` simulate outages."""

    port: int
    workdir: Path
    proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        exe = shutil.which("redis-server")
        if exe is None:
            raise RuntimeError("redis-server not found; `make test` installs it (apt-get install redis-server)")
        self.proc = subprocess.Popen(
            [exe, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", str(self.workdir), "--protected-mode", "no"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_for_port(self.port)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(5)
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
            self.proc = None

    def flush(self) -> None:
        import redis

        redis.Redis.from_url(self.url).flushall()


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory) -> Iterator[RedisServer]:
    server = RedisServer(port=free_port(), workdir=tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    """A clean database on the session's Redis server."""
    if redis_server.proc is None:
        redis_server.start()
    redis_server.flush()
    return redis_server.url


# ------------------------------------------------------------------------------------- uvicorn


@dataclass
class LiveServer:
    """A uvicorn server running an ASGI app in a background thread on a free port."""

    port: int
    server: object
    thread: threading.Thread

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.server.should_exit = True  # type: ignore[attr-defined]
        self.thread.join(15)


def start_live_server(app, port: int | None = None, host: str = "127.0.0.1", **uvicorn_kwargs) -> LiveServer:
    import uvicorn

    port = port or free_port()
    config = uvicorn.Config(app, host=host, port=port, log_level="warning", lifespan="on", **uvicorn_kwargs)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name=f"uvicorn-{port}", daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        if not thread.is_alive():
            raise RuntimeError("uvicorn server thread exited during start-up")
        if time.monotonic() > deadline:
            raise TimeoutError("uvicorn did not start in 60s")
        time.sleep(0.02)
    return LiveServer(port=port, server=server, thread=thread)


@pytest.fixture
def live_server() -> Iterator[Callable[..., LiveServer]]:
    """Factory: ``live_server(app)`` starts uvicorn on a free port; stopped after the test."""
    started: list[LiveServer] = []

    def start(app, **kwargs) -> LiveServer:
        s = start_live_server(app, **kwargs)
        started.append(s)
        return s

    yield start
    for s in started:
        s.stop()


# ---------------------------------------------------------------------------- tiny HF models

TINY_ARCHS = ("llama", "qwen2", "qwen3", "gemma3", "mistral")


def build_tiny_model(arch: str, out: Path, seed: int = 0) -> Path:
    """A tiny random HF model folder (config + safetensors + a real BPE tokenizer) built offline."""
    import torch
    import transformers as tf

    common = dict(
        vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False,
    )
    if arch == "llama":
        config = tf.LlamaConfig(**common, head_dim=16, rms_norm_eps=1e-5, rope_theta=10000.0)
        cls = tf.LlamaForCausalLM
    elif arch == "mistral":
        config = tf.MistralConfig(**common, head_dim=16, sliding_window=None, rope_theta=10000.0)
        cls = tf.MistralForCausalLM
    elif arch == "qwen2":  # qwen fixtures: a longer context for tool-calling prompts (tools template below)
        common["max_position_embeddings"] = 2048
        config = tf.Qwen2Config(**common, rope_theta=10000.0, use_sliding_window=False)
        cls = tf.Qwen2ForCausalLM
    elif arch == "qwen3":
        common["max_position_embeddings"] = 2048
        config = tf.Qwen3Config(**common, head_dim=16, rope_theta=10000.0, use_sliding_window=False)
        cls = tf.Qwen3ForCausalLM
    elif arch == "gemma3":
        common_g = dict(common, tie_word_embeddings=True, num_hidden_layers=4)
        config = tf.Gemma3TextConfig(
            **common_g, head_dim=16, sliding_window=8, query_pre_attn_scalar=16,
            layer_types=["sliding_attention", "sliding_attention", "full_attention", "sliding_attention"],
            rope_theta=1_000_000.0, rope_local_base_freq=10000.0,
        )
        cls = tf.Gemma3ForCausalLM
    else:
        raise ValueError(f"unknown tiny arch {arch!r}; choose from {TINY_ARCHS}")
    torch.manual_seed(seed)
    model = cls(config).eval()
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out), safe_serialization=True)
    tok = _tiny_tokenizer()
    if arch in ("qwen2", "qwen3"):
        tok.chat_template = TOOLS_CHAT_TEMPLATE
    tok.save_pretrained(str(out))
    return out


# A ChatML template that takes ``tools`` and writes Hermes-style calls, shaped like the Qwen2.5/Qwen3
# templates (written here for the tiny fixtures: the real ones come from the model hub).
TOOLS_CHAT_TEMPLATE = """\
{%- if tools %}<|im_start|>system
{% if messages[0]['role'] == 'system' %}{{ messages[0]['content'] }}

{% endif %}# Tools
Call functions when they help. Their signatures are inside <tools></tools>:
<tools>{% for tool in tools %}
{{ tool | tojson }}{% endfor %}
</tools>
Write each call as a JSON object inside <tool_call></tool_call>:
<tool_call>
{"name": <function-name>, "arguments": <args-json-object>}
</tool_call><|im_end|>
{% elif messages[0]['role'] == 'system' %}<|im_start|>system
{{ messages[0]['content'] }}<|im_end|>
{% endif %}
{%- for m in messages %}
{%- if m['role'] == 'system' and loop.first %}
{%- elif m['role'] == 'assistant' %}<|im_start|>assistant
{{ m['content'] or '' }}
{%- for tc in m['tool_calls'] or [] %}
<tool_call>
{"name": "{{ tc['function']['name'] }}", "arguments": {{ tc['function']['arguments'] | tojson }}}
</tool_call>
{%- endfor %}<|im_end|>
{% elif m['role'] == 'tool' %}<|im_start|>user
<tool_response>
{{ m['content'] }}
</tool_response><|im_end|>
{% else %}<|im_start|>{{ m['role'] }}
{{ m['content'] }}<|im_end|>
{% endif %}
{%- endfor %}
{%- if add_generation_prompt %}<|im_start|>assistant
{% endif %}"""


def _tiny_tokenizer():
    """A byte-level BPE tokenizer with 512 ids trained on a fixed text (deterministic, offline)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=512, special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    corpus = [
        "The quick brown fox jumps over the lazy dog. " * 4,
        "Hello world! How are you today? I am fine, thank you.",
        "def add(a, b):\n    return a + b\n",
        "Paged attention stores the KV cache in fixed-size blocks.",
        "0123456789 + - * / = ( ) [ ] { } < > , . ; : ' \" ! ?",
    ] * 20
    tok.train_from_iterator(corpus, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    fast.chat_template = (
        "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}"
    )
    return fast


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Callable[[str], Path]:
    """``tiny_model_dir("llama")`` → path of a tiny random model folder (built once per session)."""
    root = tmp_path_factory.mktemp("tiny-models")
    built: dict[str, Path] = {}

    def get(arch: str) -> Path:
        if arch not in built:
            built[arch] = build_tiny_model(arch, root / arch)
        return built[arch]

    return get


@pytest.fixture(scope="session")
def bundled_model_dir() -> Callable[[str], Path]:
    """``bundled_model_dir("smollm2-135m")`` → the prepared folder (`make test` prepares them)."""
    from backends.models import prepare

    return lambda name: prepare(name)


SLOW_FIXTURES = frozenset({"tiny_model_dir", "bundled_model_dir", "live_server"})


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if SLOW_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)
