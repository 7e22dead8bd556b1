"""README.md says what the code does: its configuration reference defaults are the real ones, and every
YAML block and env example in it (and in the shipped config's comments) loads through the real settings loader."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any, get_args, get_origin

import pytest
from pydantic import BaseModel

from gateway.settings import ENV_PREFIX, Settings, default_config_text, load_settings, read_yaml

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
MINIMAL = {"pools": [{"name": "slm", "model": "smollm2-135m"}, {"name": "llm", "model": "gemma3-270m"}]}
REQUIRED = object()  # a key without a default
NOT_SET = object()  # a key the shipped config does not set


def section(title: str) -> str:
    start = README.index(f"\n## {title}\n")
    end = README.find("\n## ", start + 1)
    return README[start : end if end != -1 else None]


# ------------------------------------------------------------------------------------ defaults


def reference_rows() -> list[tuple[str, str, str | None]]:
    """(dotted key, default cell, embedded-default value or None) for every key of the reference table."""
    out = []
    for line in section("Configuration reference").splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")] if line.startswith("| `") else []
        if len(cells) < 3:
            continue
        keys = re.findall(r"`([^`]+)`", cells[0])
        embedded = re.search(r"\(embedded default: `([^`]*)`\)", cells[1])
        default_cell = cells[1][: embedded.start()].strip() if embedded else cells[1]
        defaults = [d.strip() for d in default_cell.split(" / ")]
        for i, key in enumerate(keys):
            if "." not in key and i > 0:  # `pools[].price.input_per_1m` / `output_per_1m`
                key = keys[0].rsplit(".", 1)[0] + "." + key
            out.append((key, defaults[i] if len(defaults) == len(keys) else defaults[0],
                        embedded.group(1) if embedded else None))
    return out


def settings_default(key: str) -> Any:
    """The value a key gets when a config leaves it out (REQUIRED when it must be given)."""
    node: Any = Settings
    parts = key.split(".")
    for i, part in enumerate(parts):
        name = part.removesuffix("[]")
        if not isinstance(node, type):
            node = getattr(node, name)
            continue
        field = node.model_fields[name]
        value = REQUIRED if field.is_required() else field.get_default(call_default_factory=True)
        node = item_model(field.annotation) if part.endswith("[]") and i < len(parts) - 1 else value
    return node.model_dump() if isinstance(node, BaseModel) else node


def item_model(annotation: Any) -> type[BaseModel] | None:
    """The settings model a field holds (itself or as list items), else None."""
    inner = get_args(annotation)[0] if get_origin(annotation) is list else annotation
    return inner if isinstance(inner, type) and issubclass(inner, BaseModel) else None


def shipped_value(key: str) -> Any:
    """The value the embedded default config (default_config.yaml) gives a key, else NOT_SET."""
    node: Any = read_yaml(default_config_text())
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return NOT_SET
        node = node[part]
    return node


ROWS = reference_rows()


def test_reference_table_covers_every_setting():
    documented = {key for key, _, _ in ROWS}

    def leaves(model: type, prefix: str) -> set[str]:
        out = set()
        if dataclasses.is_dataclass(model):  # EngineArgs (and its SpeculationConfig): the engine's frozen dataclasses
            for f in dataclasses.fields(model):
                nested = dataclasses.is_dataclass(f.default_factory)  # a nested config (MISSING: a plain field)
                out |= leaves(f.default_factory, prefix + f.name + ".") if nested else {prefix + f.name}
            return out
        for name, field in model.model_fields.items():
            sub = item_model(field.annotation)
            if sub is None and dataclasses.is_dataclass(field.annotation):
                sub = field.annotation
            if sub is None:
                out.add(prefix + name)
            else:
                out |= leaves(sub, prefix + name + ("[]" if get_origin(field.annotation) is list else "") + ".")
        return out

    assert leaves(Settings, "") - documented == set()
    assert len(ROWS) > 60


@pytest.mark.parametrize("key, cell, embedded", ROWS, ids=[r[0] for r in ROWS])
def test_reference_defaults_match_settings_and_shipped_config(key, cell, embedded):
    expected = settings_default(key)
    if cell.startswith("(required"):
        assert expected is REQUIRED, f"{key}: README says required, Settings default is {expected!r}"
    elif cell == "(texts)":
        assert isinstance(expected, str) and expected
    else:
        assert cell.startswith("`") and cell.endswith("`"), f"{key}: default cell {cell!r}"
        assert read_yaml(cell.strip("`")) == expected, f"{key}: README {cell}, Settings {expected!r}"
    if "[]" in key:
        return  # list items: the shipped pools are described in prose, not in this table
    shipped = shipped_value(key)
    if embedded is not None:
        assert shipped == read_yaml(embedded), f"{key}: README embedded default {embedded!r}, shipped {shipped!r}"
    elif shipped is not NOT_SET:
        assert shipped == expected, f"{key}: the shipped config sets {shipped!r}; say so in README's cell"


# ------------------------------------------------------------------------------------ YAML blocks and env


def yaml_blocks() -> list[str]:
    return re.findall(r"^```yaml\n(.*?)^```", README, flags=re.S | re.M)


def env_examples() -> list[tuple[str, str]]:
    """`SWITCHYARD__KEY=value` examples of the README and of the shipped config's comments."""
    found = re.findall(rf"`({ENV_PREFIX}[A-Z0-9_]+)=([^`<>]+)`", README)
    found += re.findall(rf"\b({ENV_PREFIX}[A-Z0-9_]+)=([^\s,<>]+?)[.,]?(?:\s|$)", default_config_text())
    return sorted(set(found))


def merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def is_gateway_config(block: dict) -> bool:
    return set(block) <= set(Settings.model_fields)


def test_readme_has_the_blocks_this_test_loads():
    blocks = [read_yaml(b) for b in yaml_blocks()]
    assert sum(map(is_gateway_config, blocks)) >= 1 and sum(not is_gateway_config(b) for b in blocks) >= 1
    assert ("SWITCHYARD__ROUTING__CASCADE__MODE", "off") in env_examples()


@pytest.mark.parametrize("text", [b for b in yaml_blocks() if is_gateway_config(read_yaml(b))])
def test_every_gateway_yaml_block_loads(text, tmp_path):
    """A block that is a fragment (no pools) is loaded merged into a minimal valid config."""
    block = read_yaml(text)
    path = tmp_path / "config.yaml"
    path.write_text(text if "pools" in block else _dump(merge(MINIMAL, block)))
    settings = load_settings(path, environ={})
    for section_name, values in block.items():
        if isinstance(values, dict):
            for k, v in values.items():
                assert getattr(getattr(settings, section_name), k) == v, f"{section_name}.{k}"


@pytest.mark.parametrize("text", [b for b in yaml_blocks() if not is_gateway_config(read_yaml(b))])
def test_every_helm_values_block_renders_a_gateway_config_that_loads(text, tmp_path):
    """Blocks of chart values (`helm install -f`): the rendered config loads with the gateway pod's env."""
    from tests.test_helm import HELM, container_environ, gateway_config, gateway_deployment, render

    if HELM is None:
        pytest.skip("helm not installed (run `make tools`)")
    docs = render(extra_values=text)
    path = tmp_path / "config.yaml"
    path.write_text(_dump(gateway_config(docs)))
    (gateway,) = gateway_deployment(docs)["spec"]["template"]["spec"]["containers"]
    settings = load_settings(path, environ=container_environ(docs, gateway))
    assert [p.name for p in settings.pools] == [p["name"] for p in read_yaml(text)["pools"]]


@pytest.mark.parametrize("name, value", env_examples())
def test_every_env_example_loads(name, value):
    settings = load_settings(environ={name: value})
    node: Any = settings
    for part in name.removeprefix(ENV_PREFIX).lower().split("__"):
        node = node[int(part)] if part.isdigit() else getattr(node, part)
    assert node == read_yaml(value)


def _dump(data: dict) -> str:
    import yaml

    return yaml.safe_dump(data, sort_keys=False)
