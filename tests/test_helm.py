"""The Helm chart (helm/switchyard): lint, offline schema validation, and what the rendered YAML must say.

Needs the `helm` binary (`make tools` puts it in .tools/, which `make test` adds to PATH) and
`kubernetes-validate` (a test dependency in .venv). Every render is `helm template`: no cluster.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import urllib.error
import urllib.request
import warnings
from functools import cache
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml

from backends.engine.args import EngineArgs, SpeculationConfig
from gateway.settings import (
    ApiKey,
    CascadeSettings,
    ClassifierSettings,
    ExampleCacheSettings,
    GuardSettings,
    Limits,
    PoolConfig,
    RoutingSettings,
    Settings,
    VerdictPolicy,
    load_settings,
    settings_from_dict,
)

ROOT = Path(__file__).resolve().parents[1]
CHART = ROOT / "helm" / "switchyard"
CI_DIR = ROOT / "helm" / "ci"
CI_FILES = sorted(p.name for p in CI_DIR.glob("*.yaml"))
RELEASE = "sy"
NAMESPACE = "llm"
# Oldest version the chart declares (Chart.yaml kubeVersion) and the newest kubernetes-validate ships.
KUBE_VERSIONS = ("1.25.0", "1.37.0")
GPU_FILE = "gpu-pools-external-redis-values.yaml"
VLLM_FILE = "external-vllm-values.yaml"
GATEWAY_ONLY_FILE = "gateway-only-values.yaml"
DEFAULT_FILE = "default-values.yaml"
POD_KINDS = ("Deployment", "StatefulSet", "Pod")


def _helm_binary() -> str | None:
    return shutil.which("helm") or next(
        (str(p) for p in [ROOT / ".tools" / "helm"] if p.is_file() and os.access(p, os.X_OK)), None
    )


def _kubernetes_validate_binary() -> str | None:
    local = Path(sys.executable).parent / "kubernetes-validate"
    return str(local) if local.is_file() else shutil.which("kubernetes-validate")


HELM = _helm_binary()
pytestmark = [pytest.mark.skipif(HELM is None, reason="helm not installed (run `make tools`)"),
              pytest.mark.slow]  # each test runs the helm binary


# ------------------------------------------------------------------------------------ helpers


def helm(*args: str, check: bool = True, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    assert HELM is not None
    proc = subprocess.run([HELM, *args], capture_output=True, text=True, timeout=60, input=stdin)
    if check and proc.returncode != 0:
        raise AssertionError(f"helm {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}")
    return proc


def _set_args(sets: tuple[str, ...]) -> list[str]:
    return [a for s in sets for a in ("--set", s)]


@cache
def render_text(values_file: str | None = None, sets: tuple[str, ...] = (), extra_values: str = "") -> str:
    args = ["template", RELEASE, str(CHART), "--namespace", NAMESPACE]
    if values_file:
        args += ["-f", str(CI_DIR / values_file)]
    if extra_values:
        args += ["-f", "-"]  # read from stdin
    return helm(*args, *_set_args(sets), stdin=extra_values or None).stdout


def render(values_file: str | None = None, sets: tuple[str, ...] = (), extra_values: str = "") -> list[dict]:
    docs = yaml.safe_load_all(render_text(values_file, sets, extra_values))
    return [d for d in docs if d]


def default_values() -> dict:
    return yaml.safe_load((CHART / "values.yaml").read_text())


def pools_with(index: int, **changes) -> str:
    """Values YAML replacing the default pools list, with `changes` merged into pool `index`
    (``--set pools[0].x=...`` would replace the whole list instead)."""
    pools = default_values()["pools"]
    for key, value in changes.items():
        node = pools[index]
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return yaml.safe_dump({"pools": pools})


def find(docs: list[dict], kind: str, name: str | None = None) -> list[dict]:
    return [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]


def one(docs: list[dict], kind: str, name: str) -> dict:
    found = find(docs, kind, name)
    assert len(found) == 1, f"expected one {kind}/{name}, found {len(found)}: {[d['metadata']['name'] for d in docs]}"
    return found[0]


def fullname() -> str:
    return f"{RELEASE}-switchyard"


def gateway_config(docs: list[dict]) -> dict:
    return yaml.safe_load(one(docs, "ConfigMap", f"{fullname()}-config")["data"]["config.yaml"])


def gateway_deployment(docs: list[dict]) -> dict:
    return one(docs, "Deployment", f"{fullname()}-gateway")


def pod_spec(doc: dict) -> dict:
    return doc["spec"] if doc["kind"] == "Pod" else doc["spec"]["template"]["spec"]


def all_containers(spec: dict) -> list[dict]:
    return spec.get("initContainers", []) + spec["containers"]


def ci_values(name: str) -> dict:
    return yaml.safe_load((CI_DIR / name).read_text()) or {}


def secret_data(docs: list[dict], name: str, key: str) -> str | None:
    for s in find(docs, "Secret", name):
        if key in s.get("data", {}):
            return base64.b64decode(s["data"][key]).decode()
    return None


def container_environ(docs: list[dict], container: dict) -> dict[str, str]:
    """The container's env as the kubelet builds it: Secrets the chart renders are read, Secrets it does
    not (existing ones) get a placeholder, and $(VAR) references expand to earlier variables."""
    env: dict[str, str] = {}
    for item in container.get("env", []):
        if "value" in item:
            env[item["name"]] = re.sub(r"\$\((\w+)\)", lambda m: env.get(m.group(1), m.group(0)), item["value"])
        elif "secretKeyRef" in item.get("valueFrom", {}):
            ref = item["valueFrom"]["secretKeyRef"]
            value = secret_data(docs, ref["name"], ref["key"])
            if value is None and not ref.get("optional"):
                value = "existing-secret-value"
            if value is not None:
                env[item["name"]] = value
    return env


# ------------------------------------------------------------------------------------ lint + validate


def test_ci_values_files_cover_the_four_cases():
    assert {DEFAULT_FILE, GPU_FILE, VLLM_FILE, GATEWAY_ONLY_FILE} <= set(CI_FILES)


# Every CI file is also checked with the ServiceMonitors on (the gateway's and, with deployment pools, the
# pools'), and Prometheus let through the NetworkPolicies where those are on.
MONITORED = ("gateway.serviceMonitor.enabled=true",
             "networkPolicy.metricsFrom[0].namespaceSelector.matchLabels.kubernetes\\.io/metadata\\.name=monitoring")


@pytest.mark.parametrize("sets", [(), MONITORED], ids=["as-is", "monitored"])
@pytest.mark.parametrize("values_file", CI_FILES)
def test_helm_lint_strict(values_file, sets):
    out = helm("lint", "--strict", str(CHART), "-f", str(CI_DIR / values_file), "--namespace", NAMESPACE,
               *_set_args(sets))
    assert "0 chart(s) failed" in out.stdout


@pytest.mark.parametrize("kube_version", KUBE_VERSIONS)
def test_every_manifest_validates_offline(kube_version, tmp_path):
    kv = _kubernetes_validate_binary()
    if kv is None:
        pytest.skip("kubernetes-validate not installed")
    files = []
    for name in CI_FILES:
        for variant, sets in (("", ()), ("monitored-", MONITORED)):
            path = tmp_path / f"{variant}{name}"
            path.write_text(render_text(name, sets))
            files.append(str(path))
    proc = subprocess.run([kv, "--strict", "-k", kube_version, "--quiet", *files],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # The only kinds without a built-in schema are the Prometheus Operator's ServiceMonitor and PrometheusRule
    # (checked in their own tests).
    unknown = [line for line in (proc.stdout + proc.stderr).splitlines() if "Couldn't find schema" in line]
    assert all("kind ServiceMonitor" in line or "kind PrometheusRule" in line for line in unknown), unknown


def test_service_monitor_scrapes_the_gateway_metrics():
    docs = render(GPU_FILE)
    sm = one(docs, "ServiceMonitor", f"{fullname()}-gateway")
    assert sm["apiVersion"] == "monitoring.coreos.com/v1"
    assert sm["metadata"]["labels"]["release"] == "prometheus"
    assert sm["spec"]["endpoints"] == [{"port": "http", "path": "/metrics", "interval": "30s", "scrapeTimeout": "10s"}]
    service = one(docs, "Service", fullname())
    assert sm["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert [p["name"] for p in service["spec"]["ports"]] == ["http"]


def test_service_monitor_scrapes_every_pool_pod():
    """Deployment pools run `switchyard engine serve`, whose /metrics is the gateway's (their naming is checked
    in tests/gateway/test_metrics_naming.py): a second ServiceMonitor, behind the gateway's switch, selects every
    pool Service (headless: one target per pod) and no other Service."""
    docs = render(GPU_FILE)
    gateway_sm = one(docs, "ServiceMonitor", f"{fullname()}-gateway")
    sm = one(docs, "ServiceMonitor", f"{fullname()}-pools")
    assert sm["apiVersion"] == "monitoring.coreos.com/v1" and sm["metadata"]["labels"]["release"] == "prometheus"
    (endpoint,) = sm["spec"]["endpoints"]
    assert {k: endpoint[k] for k in ("port", "path", "interval", "scrapeTimeout")} == \
        {"port": "http", "path": "/metrics", "interval": "30s", "scrapeTimeout": "10s"}
    assert endpoint["relabelings"] == [{"sourceLabels": ["__meta_kubernetes_service_label_switchyard_dev_pool"],
                                        "targetLabel": "switchyard_pool"}]
    assert sm["spec"]["namespaceSelector"] == gateway_sm["spec"]["namespaceSelector"] == {"matchNames": [NAMESPACE]}
    selector = sm["spec"]["selector"]["matchLabels"]
    selected = sorted(s["metadata"]["name"] for s in find(docs, "Service")
                      if selector.items() <= s["metadata"]["labels"].items())
    pools = [p["name"] for p in ci_values(GPU_FILE)["pools"] if p["mode"] == "deployment"]
    assert selected == sorted(f"{fullname()}-pool-{p}" for p in pools) and len(pools) == 2
    for name in selected:
        service = one(docs, "Service", name)
        assert service["spec"]["clusterIP"] == "None" and [p["name"] for p in service["spec"]["ports"]] == ["http"]
        assert service["metadata"]["labels"]["switchyard.dev/pool"] in pools
    # Prometheus may reach the pool pods' port (the monitoring namespace), the gateway the whole pod.
    policy = one(docs, "NetworkPolicy", f"{fullname()}-pool")
    assert policy["spec"]["ingress"][1] == {"ports": [{"port": "http", "protocol": "TCP"}],
                                            "from": ci_values(GPU_FILE)["networkPolicy"]["metricsFrom"]}
    # The same switch as the gateway's: off by default; on, and no deployment pool, only the gateway's.
    assert not find(render(), "ServiceMonitor")
    assert len(find(render(sets=("gateway.serviceMonitor.enabled=true",)), "ServiceMonitor")) == 2
    only_gateway = find(render(GATEWAY_ONLY_FILE, ("gateway.serviceMonitor.enabled=true",)), "ServiceMonitor")
    assert [d["metadata"]["name"] for d in only_gateway] == [f"{fullname()}-gateway"]
    docs = render(sets=("gateway.serviceMonitor.enabled=true", "networkPolicy.enabled=true", *MONITORED[1:]))
    assert len(one(docs, "NetworkPolicy", f"{fullname()}-pool")["spec"]["ingress"]) == 2
    docs = render(sets=("networkPolicy.enabled=true",))  # no ServiceMonitor: pools reachable from the gateway only
    assert len(one(docs, "NetworkPolicy", f"{fullname()}-pool")["spec"]["ingress"]) == 1


# ------------------------------------------------------------------------------------ gateway config


@pytest.mark.parametrize("values_file", CI_FILES)
def test_gateway_config_is_valid_for_the_real_settings_model(values_file, tmp_path):
    docs = render(values_file)
    config = gateway_config(docs)
    settings = settings_from_dict(config)
    assert settings.host == "0.0.0.0" and settings.port == 8000
    # The gateway reads the same file plus its env overrides (API keys, Redis password).
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    (gateway,) = gateway_deployment(docs)["spec"]["template"]["spec"]["containers"]
    environ = container_environ(docs, gateway)
    assert load_settings(path, environ=environ).pools == settings.pools
    assert ["--config", "/etc/switchyard/config.yaml"] == gateway["args"][1:3]


@pytest.mark.parametrize("values_file", CI_FILES)
def test_gateway_config_lists_every_pool_with_its_service_url(values_file):
    docs = render(values_file)
    config = gateway_config(docs)
    pools = ci_values(values_file).get("pools") or default_values()["pools"]
    assert [p["name"] for p in config["pools"]] == [p["name"] for p in pools]
    for pool, entry in zip(pools, config["pools"], strict=True):
        assert entry["model"] == pool["model"]
        if pool["mode"] == "deployment":
            name = f"{fullname()}-pool-{pool['name']}"
            service = one(docs, "Service", name)
            port = service["spec"]["ports"][0]["port"]
            assert entry["kind"] == "remote"
            assert entry["urls"] == [f"http://{name}.{NAMESPACE}.svc:{port}/v1"]
            deployment = one(docs, "Deployment", name)
            pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
            assert service["spec"]["selector"].items() <= pod_labels.items()
            (engine,) = deployment["spec"]["template"]["spec"]["containers"]
            assert engine["command"] == ["switchyard", "engine", "serve"]
            assert engine["args"][engine["args"].index("--port") + 1] == str(engine["ports"][0]["containerPort"])
            assert engine["args"][engine["args"].index("--served-name") + 1] == pool["model"]
            assert service["spec"]["ports"][0]["targetPort"] == "http"
        elif pool["mode"] == "external":
            assert entry["kind"] == "remote" and entry["urls"] == pool["urls"]
            assert not find(docs, "Deployment", f"{fullname()}-pool-{pool['name']}")
        else:
            assert entry["kind"] == "local" and entry["engine"] == pool["engine"]
    # The gateway Service selects gateway pods only, never pool pods.
    selector = one(docs, "Service", fullname())["spec"]["selector"]
    for deployment in find(docs, "Deployment"):
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        assert (selector.items() <= labels.items()) == deployment["metadata"]["name"].endswith("-gateway")


def test_routing_defaults_to_the_only_pool_and_external_key_comes_from_env():
    docs = render(VLLM_FILE)
    config = gateway_config(docs)
    assert config["routing"]["slm_pool"] == config["routing"]["llm_pool"] == "vllm"
    assert config["example_cache"]["backend"] == "memory" and "redis_url" not in config
    (pool,) = config["pools"]
    (gateway,) = gateway_deployment(docs)["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e for e in gateway["env"]}
    assert env[pool["api_key_env"]]["valueFrom"]["secretKeyRef"] == {"name": "vllm-token", "key": "token"}
    assert not find(docs, "StatefulSet")


def test_engine_options_become_engine_serve_flags():
    docs = render(GPU_FILE)
    (engine,) = pod_spec(one(docs, "Deployment", f"{fullname()}-pool-llm"))["containers"]
    args = engine["args"]
    flag = {args[i]: args[i + 1] for i in range(0, len(args) - 1) if args[i].startswith("--")}
    assert flag["--model"] == "/models/Llama-3.1-8B-Instruct"
    assert flag["--max-model-len"] == "16384" and flag["--kv-cache-memory-gb"] == "40"
    assert flag["--dtype"] == "bfloat16" and flag["--device"] == "cuda"
    assert "--no-prefix-caching" not in args
    docs = render(extra_values=pools_with(0, **{"engine.enable_prefix_caching": False}))
    (engine,) = pod_spec(one(docs, "Deployment", f"{fullname()}-pool-slm"))["containers"]
    assert "--no-prefix-caching" in engine["args"]


# Every pool option the schema documents, each set to a non-default value.
EVERY_ENGINE_OPTION = {"dtype": "bfloat16", "quantization": "int8", "max_model_len": 4096, "max_num_seqs": 7,
                       "max_num_batched_tokens": 333, "block_size": 32, "num_kv_blocks": 500,
                       "kv_cache_memory_gb": 2.5, "enable_prefix_caching": False, "num_threads": 3,
                       "device": "cpu", "kv_retain_s": 30.0, "kv_retain_max_share": 0.5, "kv_offload_gb": 1.5,
                       "program_scheduling": True,
                       "program_max_wait_s": 2.5,
                       "speculation": {"method": "ngram", "num_draft_tokens": 6, "min_n": 1, "max_n": 5,
                                       "shared_context": True, "shared_max_entries": 999, "verify_cost": 0.25}}
EVERY_POOL_CONFIG = {"price": {"input_per_1m": 0.5, "output_per_1m": 1.5}, "timeout_s": 33,
                     "connect_timeout_s": 4, "max_retries": 5, "supports_tools": True, "supports_json_mode": True,
                     "supports_vision": True, "chat_template": "plain_turns", "tool_call_parser": "llama3_json", "affinity_prefix_chars": 128}


def test_every_pool_and_engine_value_reaches_the_gateway_or_the_engine():
    """A deployment pool's engine options become `engine serve` flags that build the same EngineArgs (its
    chat_template a flag too); an inProcess pool's reach the gateway config; pool config keys reach both."""
    from gateway.engine_server import engine_args_of
    from training.cli import build_parser

    schema = json.loads((CHART / "values.schema.json").read_text())
    assert set(EVERY_ENGINE_OPTION) == _props(schema, "engine")
    assert set(EVERY_ENGINE_OPTION["speculation"]) == _props(schema, "engine", ("speculation",))
    expected = EngineArgs(**{**EVERY_ENGINE_OPTION,
                             "speculation": SpeculationConfig(**EVERY_ENGINE_OPTION["speculation"])})
    assert set(EVERY_POOL_CONFIG) | {"fallback"} == _props(schema, "poolConfig")
    pools = [{"name": name, "mode": mode, "model": "smollm2-135m", "engine": EVERY_ENGINE_OPTION,
              "config": {**EVERY_POOL_CONFIG, "fallback": other}}
             for name, mode, other in [("slm", "deployment", "llm"), ("llm", "inProcess", "slm")]]
    docs = render(extra_values=yaml.safe_dump({"pools": pools}))
    config = gateway_config(docs)
    settings = settings_from_dict(config)
    deployed, in_process = (settings.pool(p["name"]) for p in pools)

    (engine,) = pod_spec(one(docs, "Deployment", f"{fullname()}-pool-slm"))["containers"]
    args = build_parser().parse_args(engine["command"][1:] + engine["args"])
    assert engine_args_of(args) == expected
    assert args.chat_template == "plain_turns" and args.tool_call_parser == "llama3_json"
    assert in_process.engine == expected
    assert in_process.chat_template == "plain_turns" and in_process.tool_call_parser == "llama3_json"
    for pool in (deployed, in_process):
        assert pool.price.model_dump() == EVERY_POOL_CONFIG["price"]
        for key in ("timeout_s", "connect_timeout_s", "max_retries", "supports_tools", "supports_json_mode",
                    "supports_vision", "affinity_prefix_chars"):
            assert getattr(pool, key) == EVERY_POOL_CONFIG[key], key
    assert (deployed.fallback, in_process.fallback) == ("llm", "slm")

    # null engine options are the engine's defaults, not a flag with an empty value
    docs = render(extra_values=pools_with(0, **{"engine.num_kv_blocks": None, "engine.num_threads": None}))
    (engine,) = pod_spec(one(docs, "Deployment", f"{fullname()}-pool-slm"))["containers"]
    args = build_parser().parse_args(engine["command"][1:] + engine["args"])
    assert (args.num_kv_blocks, args.num_threads) == (None, None)


def test_unquoted_off_and_on_in_values_reach_the_gateway_as_words():
    """Helm reads values as YAML 1.1 (`off` is false): the documented `mode: off` still means "off"."""
    for words, expected in [("mode: off", "off"), ("mode: slm_then_escalate", "slm_then_escalate")]:
        for search in ("off", "on"):
            text = (f"gateway:\n  config:\n    routing:\n      cascade: {{{words}}}\n"
                    f"    example_cache: {{server_search: {search}}}\n")
            settings = settings_from_dict(gateway_config(render(extra_values=text)))
            assert (settings.routing.cascade.mode, settings.example_cache.server_search) == (expected, search)
    assert helm("template", RELEASE, str(CHART), "-f", "-", check=False,
                stdin="gateway:\n  config:\n    routing:\n      cascade: {mode: on}\n").returncode != 0


@pytest.mark.parametrize("values_file", CI_FILES)
def test_every_switchyard_command_parses_with_the_real_cli(values_file):
    """Gateway, engine and model-preparation containers run `switchyard ...` with flags the CLI accepts."""
    from training.cli import build_parser

    parser = build_parser()
    commands = []
    for doc in render(values_file):
        if doc["kind"] in POD_KINDS:
            commands += [c["command"] + c.get("args", []) for c in all_containers(pod_spec(doc))]
    commands = [c[1:] for c in commands if c[0] == "switchyard"]
    assert commands
    for argv in commands:
        args = parser.parse_args(argv)
        if argv[:2] == ["engine", "serve"]:
            assert args.host == "0.0.0.0" and args.served_name and args.device in ("cpu", "cuda")
        elif argv[0] == "serve":
            assert (args.config, args.host, args.port) == ("/etc/switchyard/config.yaml", "0.0.0.0", 8000)
        else:
            assert argv[:2] == ["models", "prepare"] and args.names


# ------------------------------------------------------------------------------------ GPUs


def test_gpu_pools_request_nvidia_gpus():
    docs = render(GPU_FILE)
    for pool in ci_values(GPU_FILE)["pools"]:
        spec = pod_spec(one(docs, "Deployment", f"{fullname()}-pool-{pool['name']}"))
        (engine,) = spec["containers"]
        resources = engine["resources"]
        assert resources["limits"]["nvidia.com/gpu"] == pool["gpu"]
        assert resources["requests"]["nvidia.com/gpu"] == pool["gpu"]
        assert resources["requests"]["memory"] == pool["resources"]["requests"]["memory"]
        assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in spec["tolerations"]
        strategy = one(docs, "Deployment", f"{fullname()}-pool-{pool['name']}")["spec"]["strategy"]
        assert strategy["rollingUpdate"] == {"maxSurge": 0, "maxUnavailable": 1}
    slm = pod_spec(one(docs, "Deployment", f"{fullname()}-pool-slm"))
    assert slm["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-L4"}
    assert slm["volumes"][-1]["persistentVolumeClaim"] == {"claimName": "models", "readOnly": True}


def test_cpu_pools_request_no_gpu():
    text = render_text(DEFAULT_FILE)
    assert "nvidia.com/gpu" not in text
    docs = render(DEFAULT_FILE)
    for pool in ("slm", "llm"):
        spec = pod_spec(one(docs, "Deployment", f"{fullname()}-pool-{pool}"))
        assert spec["initContainers"][0]["command"][:3] == ["switchyard", "models", "prepare"]
        assert "--device" in spec["containers"][0]["args"]
        assert spec["containers"][0]["args"][spec["containers"][0]["args"].index("--device") + 1] == "cpu"


# ------------------------------------------------------------------------------------ secrets


def test_secrets_never_rendered_into_configmaps():
    password = "redis-pw-0123456789"
    docs = render(GPU_FILE) + render(sets=(f"redis.auth.password={password}",))
    configmaps = json.dumps([d for d in docs if d["kind"] == "ConfigMap"])
    plaintext = "sk-ci-test-key"
    assert plaintext not in configmaps and password not in configmaps
    assert hashlib.sha256(plaintext.encode()).hexdigest() not in configmaps
    assert "api_keys" not in gateway_config(render(GPU_FILE))
    # The API keys reach the gateway as sha256 hashes through a Secret and an env override.
    keys = yaml.safe_load(secret_data(docs, f"{fullname()}-api-keys", "api-keys"))
    assert [ApiKey.model_validate(k).name for k in keys] == ["ci-plain", "team-a"]
    assert keys[0]["sha256"] == hashlib.sha256(plaintext.encode()).hexdigest() and "key" not in keys[0]
    (gateway,) = gateway_deployment(render(GPU_FILE))["spec"]["template"]["spec"]["containers"]
    env = container_environ(render(GPU_FILE), gateway)
    assert yaml.safe_load(env["SWITCHYARD__API_KEYS"]) == keys
    # The Redis password: built-in Secret → REDIS_PASSWORD → SWITCHYARD__REDIS_URL; the ConfigMap URL has none.
    docs = render(sets=(f"redis.auth.password={password}",))
    assert secret_data(docs, f"{fullname()}-redis", "redis-password") == password
    (gateway,) = gateway_deployment(docs)["spec"]["template"]["spec"]["containers"]
    env = container_environ(docs, gateway)
    assert env["SWITCHYARD__REDIS_URL"] == f"redis://:{password}@{fullname()}-redis.{NAMESPACE}.svc:6379/0"
    assert gateway_config(docs)["redis_url"] == f"redis://{fullname()}-redis.{NAMESPACE}.svc:6379/0"
    names = [e["name"] for e in gateway["env"]]
    assert names.index("REDIS_PASSWORD") < names.index("SWITCHYARD__REDIS_URL")


def test_external_redis_password_goes_into_the_url_via_env():
    docs = render(GPU_FILE)
    (gateway,) = gateway_deployment(docs)["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e for e in gateway["env"]}
    assert env["REDIS_PASSWORD"]["valueFrom"]["secretKeyRef"] == {"name": "redis-credentials", "key": "password"}
    assert env["SWITCHYARD__REDIS_URL"]["value"] == "rediss://:$(REDIS_PASSWORD)@redis.cache.svc:6380/2"
    assert not find(docs, "StatefulSet")


def test_existing_api_key_secret_is_referenced_not_rendered():
    docs = render(sets=("apiKeys.existingSecret=my-keys",))
    assert not find(docs, "Secret", "my-keys")
    (gateway,) = gateway_deployment(docs)["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e for e in gateway["env"]}
    assert env["SWITCHYARD__API_KEYS"]["valueFrom"]["secretKeyRef"] == {"name": "my-keys", "key": "api-keys"}
    test_pod = one(docs, "Pod", f"{fullname()}-test")
    (container,) = test_pod["spec"]["containers"]
    key_env = {e["name"]: e for e in container["env"]}["TEST_API_KEY"]
    assert key_env["valueFrom"]["secretKeyRef"] == {"name": "my-keys", "key": "test-api-key", "optional": True}


# ------------------------------------------------------------------------------------ schema + checks


@pytest.mark.parametrize(
    ("sets", "pools"),
    [
        (("gateway.replicas=two",), None),
        (("gateway.bogus=1",), None),
        (("bogus=1",), None),
        ((), {"mode": "daemonset"}),
        ((), {"gpu": -1}),
        ((), {"name": "Bad_Name"}),
        ((), {"name": "auto"}),
        ((), {"unknown": 1}),
        ((), {"engine.dtype": "float8"}),
        ((), {"config.timeout_s": 0}),
        ((), {"config.replicas": 3}),
        ((), {"mode": "external"}),
        ((), {"modelSource.type": "s3"}),
        (("gateway.config.limits.max_n=0",), None),
        (("gateway.config.routing.router_artifact=/x",), None),
        (("gateway.config.routing.quality_tolerance=-1",), None),
        (("gateway.config.routing.pools.m=",), None),
        (("gateway.config.example_cache.backend=postgres",), None),
        (("apiKeys.keys[0].name=nokey",), None),
        (("apiKeys.keys[0].name=a", "apiKeys.keys[0].sha256=nothex"), None),
        (("redis.external.url=http://redis:6379",), None),
        (("artifacts.router.source=s3",), None),
        (("gateway.service.type=ExternalName",), None),
    ],
)
def test_schema_rejects_bad_values(sets, pools):
    stdin = pools_with(0, **pools) if pools else None
    args = ["template", RELEASE, str(CHART), *_set_args(sets)] + (["-f", "-"] if stdin else [])
    proc = helm(*args, check=False, stdin=stdin)
    assert proc.returncode != 0, f"accepted {sets or pools}"
    assert "values don't meet the specifications of the schema" in proc.stderr, proc.stderr


def test_schema_accepts_a_documented_external_pool():
    pools = default_values()["pools"] + [{"name": "big", "mode": "external", "model": "m", "urls": ["https://x/v1"]}]
    render(extra_values=yaml.safe_dump({"pools": pools}))


def test_lint_fails_on_a_bad_value():
    proc = helm("lint", "--strict", str(CHART), "--set", "gateway.port=http", check=False)
    assert proc.returncode != 0 and "/gateway/port" in proc.stdout + proc.stderr


@pytest.mark.parametrize(
    ("sets", "pools", "message"),
    [
        ((), (1, {"name": "slm"}), 'name "slm" is used twice'),
        (("gateway.config.routing.slm_pool=tiny",), None, 'routing.slm_pool = "tiny" is not a pool'),
        (("redis.external.url=redis://r:6379/0",), None, "either redis.enabled"),
        (("redis.enabled=false", "gateway.config.example_cache.backend=redis"), None, "needs Redis"),
        ((), (0, {"modelSource.type": "pvc"}), "type pvc needs claimName"),
        (("artifacts.router.source=configMap",), None, "artifacts.router.configMap"),
        ((), (0, {"urls": ["http://x/v1"]}), "urls are only for mode external"),
        # values a pool's mode would drop: said, not ignored
        ((), (0, {"mode": "external", "urls": ["http://x/v1"]}), "pools[slm]: engine options are for modes"),
        ((), (0, {"mode": "inProcess", "gpu": 1}), "pools[slm]: gpu is for mode deployment"),
        (("gateway.workers=2",), (0, {"mode": "inProcess", "engine": {}}), "gateway.workers > 1 needs pools without"),
        # pools Prometheus could not scrape through the NetworkPolicy
        (("gateway.serviceMonitor.enabled=true", "networkPolicy.enabled=true"), None, "networkPolicy.metricsFrom:"),
    ],
)
def test_inconsistent_values_fail_with_a_message(sets, pools, message):
    stdin = pools_with(pools[0], **pools[1]) if pools else None
    args = ["template", RELEASE, str(CHART), *_set_args(sets)] + (["-f", "-"] if stdin else [])
    proc = helm(*args, check=False, stdin=stdin)
    assert proc.returncode != 0 and message in proc.stderr, proc.stderr


def _props(schema: dict, definition: str | None = None, path: tuple[str, ...] = ()) -> set[str]:
    node = schema["definitions"][definition] if definition else schema
    for key in path:
        node = node["properties"][key]
    return set(node["properties"])


def test_schema_mirrors_the_settings_models():
    """Every gateway-config key the schema lets through is a real Settings field (no silent typos)."""
    schema = json.loads((CHART / "values.schema.json").read_text())
    config = ("properties", "gateway", "properties", "config")
    node = schema
    for key in config:
        node = node[key]
    assert set(node["properties"]) <= set(Settings.model_fields)
    for name, model in [("routing", RoutingSettings), ("guard", GuardSettings), ("classifiers", ClassifierSettings),
                        ("example_cache", ExampleCacheSettings), ("limits", Limits)]:
        assert set(node["properties"][name]["properties"]) <= set(model.model_fields), name
        assert node["properties"][name]["additionalProperties"] is False
    assert set(node["properties"]["routing"]["properties"]["cascade"]["properties"]) <= set(CascadeSettings.model_fields)
    assert _props(schema, "verdictPolicy") <= set(VerdictPolicy.model_fields)
    assert _props(schema, "engine") == {f.name for f in dataclasses.fields(EngineArgs)}
    assert _props(schema, "engine", ("speculation",)) == {f.name for f in dataclasses.fields(SpeculationConfig)}
    assert _props(schema, "poolConfig") <= set(PoolConfig.model_fields)
    assert _props(schema, "apiKey") - {"key"} <= set(ApiKey.model_fields)
    # Settings fields the chart neither sets itself nor lets users set: a new gateway option to add to
    # values.schema.json (a warning, so a new Settings field never breaks CI by itself).
    chart_managed = {"host", "port", "pools", "redis_url", "api_keys", "routing.router_artifact",
                     "guard.artifact", "example_cache.redis_url", "workers"}
    exposed = {f"{name}.{field}" for name in ("routing", "guard", "classifiers", "example_cache", "limits")
               for field in node["properties"][name]["properties"]} | set(node["properties"])
    models = {"routing": RoutingSettings, "guard": GuardSettings, "classifiers": ClassifierSettings,
              "example_cache": ExampleCacheSettings, "limits": Limits}
    fields = set(Settings.model_fields) | {f"{n}.{f}" for n, m in models.items() for f in m.model_fields}
    not_exposed = sorted(fields - exposed - chart_managed)
    if not_exposed:
        warnings.warn(f"gateway settings the Helm chart does not expose yet: {not_exposed}", stacklevel=1)


# ------------------------------------------------------------------------------------ rollout


def _annotations(sets: tuple[str, ...] = (), extra_values: str = "") -> dict[str, str]:
    docs = render(sets=sets, extra_values=extra_values)
    return gateway_deployment(docs)["spec"]["template"]["metadata"]["annotations"]


def _artifact_values(manifest: bytes) -> str:
    files = {"manifest.json": base64.b64encode(manifest).decode(), "MODEL_CARD.md": base64.b64encode(b"# r\n").decode()}
    return yaml.safe_dump({"artifacts": {"router": {"source": "files", "files": files}}})


def test_checksum_annotations_roll_the_gateway_on_config_and_artifact_changes():
    base = _annotations()
    assert _annotations(("gateway.replicas=5",)) == base  # scaling is not a rollout
    assert _annotations(("gateway.config.limits.max_n=3",))["checksum/config"] != base["checksum/config"]
    assert _annotations(extra_values=pools_with(0, replicas=3))["checksum/config"] == base["checksum/config"]
    assert _annotations(extra_values=pools_with(0, port=9000))["checksum/config"] != base["checksum/config"]
    v1 = _annotations(extra_values=_artifact_values(b'{"v": 1}'))
    v2 = _annotations(extra_values=_artifact_values(b'{"v": 2}'))
    assert len({base["checksum/artifacts"], v1["checksum/artifacts"], v2["checksum/artifacts"]}) == 3
    pvc = ("artifacts.guard.source=pvc", "artifacts.guard.claimName=arts")
    a = _annotations((*pvc, "artifacts.guard.checksum=v1"))["checksum/artifacts"]
    b = _annotations((*pvc, "artifacts.guard.checksum=v2"))["checksum/artifacts"]
    assert a != b
    key = ("apiKeys.keys[0].name=a", "apiKeys.keys[0].key=k1")
    assert _annotations(key)["checksum/api-keys"] != base["checksum/api-keys"]


def test_artifacts_are_mounted_where_the_config_points():
    docs = render(extra_values=_artifact_values(b'{"kind": "router"}'))
    config = gateway_config(docs)
    path = config["routing"]["router_artifact"]
    cm = one(docs, "ConfigMap", f"{fullname()}-router-artifact")
    assert base64.b64decode(cm["binaryData"]["manifest.json"]) == b'{"kind": "router"}'
    spec = pod_spec(gateway_deployment(docs))
    mounts = {m["mountPath"]: m["name"] for m in spec["containers"][0]["volumeMounts"]}
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert volumes[mounts[path]]["configMap"]["name"] == cm["metadata"]["name"]
    docs = render(GPU_FILE)
    assert gateway_config(docs)["guard"]["artifact"] == "/etc/switchyard/artifacts/guard"
    spec = pod_spec(gateway_deployment(docs))
    (mount,) = [m for m in spec["containers"][0]["volumeMounts"] if m["name"] == "guard-artifact"]
    assert mount["subPath"] == "guard-v3" and mount["readOnly"] is True
    docs = render(sets=("artifacts.router.source=image", "artifacts.router.path=/opt/router"))
    assert gateway_config(docs)["routing"]["router_artifact"] == "/opt/router"


def test_an_nmodel_router_s_pool_map_and_tolerance_reach_the_gateway():
    values = ("artifacts:\n  router: {source: image, path: /opt/nmodel}\ngateway:\n  config:\n    routing:\n"
              "      pools: {org/small-7b: slm, org/large-70b: llm}\n      quality_tolerance: 0.03\n")
    settings = settings_from_dict(gateway_config(render(extra_values=values)))
    assert settings.routing.pools == {"org/small-7b": "slm", "org/large-70b": "llm"}
    assert (settings.routing.quality_tolerance, settings.routing.router_artifact) == (0.03, "/opt/nmodel")


# ------------------------------------------------------------------------------------ pods


@pytest.mark.parametrize("values_file", CI_FILES)
def test_pods_run_non_root_with_read_only_root_fs(values_file):
    docs = render(values_file)
    workloads = [d for d in docs if d["kind"] in POD_KINDS]
    assert workloads
    for doc in workloads:
        spec = pod_spec(doc)
        assert spec["securityContext"]["runAsNonRoot"] is True, doc["metadata"]["name"]
        assert spec["automountServiceAccountToken"] is False
        for c in all_containers(spec):
            sc = c["securityContext"]
            assert sc["readOnlyRootFilesystem"] is True, (doc["metadata"]["name"], c["name"])
            assert sc["allowPrivilegeEscalation"] is False and sc["capabilities"]["drop"] == ["ALL"]
            assert "resources" in c or c in spec.get("initContainers", [])


@pytest.mark.parametrize("values_file", CI_FILES)
def test_probes(values_file):
    docs = render(values_file)
    (gateway,) = pod_spec(gateway_deployment(docs))["containers"]
    assert gateway["startupProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    assert gateway["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    assert gateway["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    assert gateway["ports"] == [{"name": "http", "containerPort": 8000, "protocol": "TCP"}]
    for doc in find(docs, "Deployment"):
        if "-pool-" in doc["metadata"]["name"]:
            (engine,) = pod_spec(doc)["containers"]
            for probe in ("startupProbe", "livenessProbe", "readinessProbe"):  # ready = the engine runs
                assert engine[probe]["httpGet"] == {"path": "/readyz", "port": "http"}
    for doc in find(docs, "StatefulSet"):
        (redis,) = pod_spec(doc)["containers"]
        assert redis["readinessProbe"]["exec"]["command"] == ["redis-cli", "ping"]


def test_gateway_spreads_over_nodes_and_has_a_disruption_budget():
    docs = render(DEFAULT_FILE)
    spec = pod_spec(gateway_deployment(docs))
    keys = [c["topologyKey"] for c in spec["topologySpreadConstraints"]]
    assert keys == ["kubernetes.io/hostname", "topology.kubernetes.io/zone"]
    (pdb,) = find(docs, "PodDisruptionBudget")
    assert pdb["spec"]["maxUnavailable"] == 1
    assert pdb["spec"]["selector"]["matchLabels"].items() <= spec_labels(gateway_deployment(docs)).items()


def spec_labels(doc: dict) -> dict:
    return doc["spec"]["template"]["metadata"]["labels"]


def test_hpa_scales_the_gateway_on_cpu_and_a_custom_metric():
    docs = render(GPU_FILE)
    (hpa,) = find(docs, "HorizontalPodAutoscaler")
    assert hpa["spec"]["scaleTargetRef"]["name"] == gateway_deployment(docs)["metadata"]["name"]
    assert [m["type"] for m in hpa["spec"]["metrics"]] == ["Resource", "Pods"]
    assert "replicas" not in gateway_deployment(docs)["spec"]


def test_network_policies_let_only_the_gateway_reach_pools():
    docs = render(GPU_FILE)
    policies = {p["metadata"]["name"]: p for p in find(docs, "NetworkPolicy")}
    assert set(policies) == {f"{fullname()}-gateway", f"{fullname()}-pool"}  # external Redis: no policy
    pool = policies[f"{fullname()}-pool"]
    rule, metrics = pool["spec"]["ingress"]  # the gateway: any port; Prometheus (metricsFrom): the http port
    assert rule["from"][0]["podSelector"]["matchLabels"]["app.kubernetes.io/component"] == "gateway"
    assert "ports" not in rule and metrics["ports"] == [{"port": "http", "protocol": "TCP"}]
    gateway = policies[f"{fullname()}-gateway"]
    peers = gateway["spec"]["ingress"][0]["from"]
    assert peers[:2] == ci_values(GPU_FILE)["networkPolicy"]["gatewayFrom"]
    assert peers[2]["podSelector"]["matchLabels"]["app.kubernetes.io/component"] == "test"


def test_gateway_only_renders_just_the_gateway():
    docs = render(GATEWAY_ONLY_FILE)
    kinds = sorted(d["kind"] for d in docs)
    assert kinds == ["ConfigMap", "Deployment", "Service"]
    spec = pod_spec(gateway_deployment(docs))
    assert spec["serviceAccountName"] == "default"
    assert spec["initContainers"][0]["args"] == ["smollm2-135m", "gemma3-270m"]


def test_helm_test_pod_calls_readyz_and_one_chat_completion():
    docs = render(GPU_FILE)
    pod = one(docs, "Pod", f"{fullname()}-test")
    assert pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
    (container,) = pod["spec"]["containers"]
    script = container["args"][0]
    assert "/readyz" in script and "/v1/chat/completions" in script
    compile(script, "helm-test", "exec")
    env = container_environ(docs, container)
    assert env["BASE_URL"] == f"http://{fullname()}:80"
    assert env["TEST_API_KEY"] == "sk-ci-test-key"


class _StandIn(BaseHTTPRequestHandler):
    """Answers like a ready gateway and records what the helm test pod sent."""

    seen: list[tuple[str, str, dict, dict | None]] = []

    def do_GET(self):  # noqa: N802
        self.seen.append(("GET", self.path, dict(self.headers), None))
        self._answer(200 if self.path == "/readyz" else 404, {"status": "ready"})

    def do_POST(self):  # noqa: N802
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.seen.append(("POST", self.path, dict(self.headers), body))
        self._answer(200, {"model": "slm", "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"}}]})

    def _answer(self, status: int, payload: dict) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args) -> None:
        pass


def test_helm_test_pod_script_runs_against_a_gateway():
    docs = render(GPU_FILE)
    (container,) = one(docs, "Pod", f"{fullname()}-test")["spec"]["containers"]
    server = ThreadingHTTPServer(("127.0.0.1", 0), _StandIn)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    _StandIn.seen = []
    try:
        env = {**container_environ(docs, container), "BASE_URL": f"http://127.0.0.1:{server.server_port}"}
        proc = subprocess.run([sys.executable, *container["command"][1:], *container["args"]],
                              env={**os.environ, **env}, capture_output=True, text=True, timeout=60)
    finally:
        server.shutdown()
        server.server_close()
    assert proc.returncode == 0, proc.stderr
    assert "ok: slm 'hi'" in proc.stdout
    (method, path, _, _), (method2, path2, headers, body) = _StandIn.seen
    assert (method, path, method2, path2) == ("GET", "/readyz", "POST", "/v1/chat/completions")
    assert headers["Authorization"] == "Bearer sk-ci-test-key"
    assert body["model"] == "auto" and body["max_tokens"] == 8


def test_rendered_release_serves_the_helm_test_end_to_end(live_server, monkeypatch, tmp_path):
    """The chart's gateway config + env, loaded by the real gateway in front of a fake vLLM; then the
    helm test pod's own script passes against it (API key from the chart's Secret)."""
    from bench.fake_upstream import FakeBehavior, FakeUpstream
    from gateway.app import create_app

    upstream = FakeUpstream(name="vllm", model="meta-llama/Llama-3.1-70B-Instruct", behavior=FakeBehavior(num_tokens=3))
    pool = dict(ci_values(VLLM_FILE)["pools"][0], urls=[f"{live_server(upstream).base_url}/v1"])
    extra = yaml.safe_dump({"pools": [pool], "apiKeys": {"keys": [{"name": "ops", "key": "sk-e2e"}]}})
    docs = render(VLLM_FILE, extra_values=extra)
    config = tmp_path / "config.yaml"
    config.write_text(one(docs, "ConfigMap", f"{fullname()}-config")["data"]["config.yaml"])
    (gateway,) = pod_spec(gateway_deployment(docs))["containers"]
    environ = container_environ(docs, gateway)
    for name, value in environ.items():
        monkeypatch.setenv(name, value)
    server = live_server(create_app(load_settings(config, environ=environ)))
    (container,) = one(docs, "Pod", f"{fullname()}-test")["spec"]["containers"]
    env = {**container_environ(docs, container), "BASE_URL": server.base_url}
    proc = subprocess.run([sys.executable, *container["command"][1:], *container["args"]],
                          env={**os.environ, **env}, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert upstream.num_requests == 1
    assert upstream.last_bodies[-1]["model"] == "meta-llama/Llama-3.1-70B-Instruct"
    # The key list really came from the Secret: without the key the gateway refuses.
    body = json.dumps({"model": "auto", "messages": [{"role": "user", "content": "hi"}]}).encode()
    request = urllib.request.Request(f"{server.base_url}/v1/chat/completions", body,
                                     {"Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(request, timeout=30)
    assert err.value.code == 401


def test_notes_say_how_to_call_the_endpoint():
    proc = helm("install", RELEASE, str(CHART), "--dry-run=client", "--namespace", NAMESPACE)
    assert "port-forward svc/sy-switchyard 8000:80" in proc.stdout
    assert "/chat/completions" in proc.stdout and "helm test sy" in proc.stdout


# ------------------------------------------------------------------------------------ docs


def undocumented_keys(text: str, schema: dict) -> list[str]:
    """Keys of values.yaml that the schema defines but no comment documents (the line above, or a
    trailing comment). Items after the first of a list, flow mappings and Kubernetes-native blocks
    (resources, probe timings) are documented by their parent key."""
    lines = text.splitlines()
    definitions = schema["definitions"]

    def resolve(s: dict | None) -> dict | None:
        while s and "$ref" in s:
            s = definitions[s["$ref"].rsplit("/", 1)[1]]
        return s

    def commented(line_no: int) -> bool:
        if "#" in lines[line_no].split(":", 1)[1]:
            return True
        previous = next((p.strip() for p in reversed(lines[:line_no]) if p.strip()), "")
        return previous.removeprefix("- ").lstrip().startswith("#")

    missing: list[str] = []

    def walk(node: yaml.Node, s: dict | None, path: str, skip: bool) -> None:
        if s and s.get("$ref", "").rsplit("/", 1)[-1] in ("resources", "probe"):
            return
        s = resolve(s)
        if s is None:
            return
        if isinstance(node, yaml.MappingNode):
            for k, v in node.value:
                sub = s.get("properties", {}).get(k.value)
                if sub is None:
                    continue
                if not skip and not node.flow_style and not commented(k.start_mark.line):
                    missing.append(f"{path}{k.value}")
                walk(v, sub, f"{path}{k.value}.", skip or bool(node.flow_style))
        elif isinstance(node, yaml.SequenceNode) and "items" in s:
            for i, item in enumerate(node.value):
                walk(item, s["items"], f"{path}{i}.", skip or i > 0 or path != "pools.")

    walk(yaml.compose(text), schema, "", False)
    return missing


def test_every_values_key_is_documented_where_it_lives():
    schema = json.loads((CHART / "values.schema.json").read_text())
    assert undocumented_keys((CHART / "values.yaml").read_text(), schema) == []
    assert undocumented_keys("gateway:\n  replicas: 2\n", schema) == ["gateway", "gateway.replicas"]


def test_gateway_drains_longer_than_the_request_timeout():
    """A rollout cuts no request: preStop sleep, then SIGTERM, then the gateway's drain time (issue 23)."""
    def pod(*sets):
        docs = render(sets=tuple(sets))
        return next(d for d in docs if d["kind"] == "Deployment" and d["metadata"]["name"].endswith("-gateway"))

    spec = pod()["spec"]["template"]["spec"]
    assert spec["terminationGracePeriodSeconds"] == 5 + (120 + 5) + 5
    assert spec["containers"][0]["lifecycle"]["preStop"] == {"exec": {"command": ["sleep", "5"]}}
    assert pod("gateway.config.limits.request_timeout_s=30")["spec"]["template"]["spec"][
        "terminationGracePeriodSeconds"] == 5 + 35 + 5
    assert pod("gateway.config.shutdown.drain_s=60", "gateway.preStopSleepSeconds=2")["spec"]["template"]["spec"][
        "terminationGracePeriodSeconds"] == 2 + 60 + 5
    assert pod("gateway.terminationGracePeriodSeconds=300")["spec"]["template"]["spec"][
        "terminationGracePeriodSeconds"] == 300


def test_prometheus_rule_and_grafana_dashboard():
    """Off by default; when on, a PrometheusRule with the five alerts and a dashboard ConfigMap for the sidecar
    (the metric names they query are checked against a live /metrics in tests/gateway/test_metrics_naming.py)."""
    assert not find(render(), "PrometheusRule") and not [d for d in find(render(), "ConfigMap")
                                                           if d["metadata"]["name"].endswith("-dashboard")]
    docs = render(extra_values="gateway: {prometheusRule: {enabled: true, errorRatio: 0.1}, "
                               "grafanaDashboard: {enabled: true}}\n")
    (rule,) = find(docs, "PrometheusRule")
    alerts = {r["alert"]: r for r in rule["spec"]["groups"][0]["rules"]}
    assert set(alerts) == {"SwitchyardHighErrorRate", "SwitchyardOverheadP99High", "SwitchyardBudgetExhausted",
                           "SwitchyardNoHealthyReplica", "SwitchyardDegraded"}
    assert "> 0.1" in alerts["SwitchyardHighErrorRate"]["expr"]
    assert alerts["SwitchyardNoHealthyReplica"]["annotations"]["summary"] == \
        "Pool {{ $labels.pool }} has no healthy replica"
    (dash,) = [d for d in find(docs, "ConfigMap") if d["metadata"]["name"].endswith("-dashboard")]
    assert dash["metadata"]["labels"]["grafana_dashboard"] == "1"
    panels = json.loads(dash["data"]["switchyard.json"])["panels"]
    assert len(panels) == 8 and all(p["targets"] for p in panels)


def test_deployment_pools_are_headless_and_discovered_per_pod():
    """Every pod of a deployment pool is a replica of its own in the gateway (issue 23): a headless Service,
    and the gateway's pool config resolves it (discovery: dns)."""
    docs = render(GPU_FILE)
    config = settings_from_dict(gateway_config(docs))
    for pool in config.pools:
        if pool.kind == "remote" and pool.urls[0].endswith(".svc:8001/v1"):
            service = one(docs, "Service", f"{fullname()}-pool-{pool.name}")
            assert service["spec"]["clusterIP"] == "None" and pool.discovery == "dns"
    assert any(p.discovery == "dns" for p in config.pools)


@pytest.mark.parametrize(("sets", "pools", "workers"), [
    ((), None, None),  # the default request, 500m: one worker (the config leaves `workers` out)
    (("gateway.resources.requests.cpu=2",), None, 2),
    (("gateway.resources.requests.cpu=1500m",), None, 2),
    (("gateway.resources.requests.cpu=2", "gateway.workers=3"), None, 3),
    (("gateway.resources.requests.cpu=4",), (0, {"mode": "inProcess", "engine": {}}), None),  # would load it 4x
])
def test_gateway_workers_follow_the_cpu_request(sets, pools, workers, tmp_path):
    """gateway.workers null: one worker process per requested CPU (rounded up), one with inProcess pools;
    the rendered config loads in the real settings model."""
    docs = render(sets=sets, extra_values=pools_with(pools[0], **pools[1]) if pools else "")
    config = gateway_config(docs)
    assert config.get("workers") == workers
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(config))
    assert load_settings(tmp_path / "c.yaml", environ={}).workers == (workers or 1)
