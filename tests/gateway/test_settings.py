"""The settings loader reads YAML so that the documented literals mean what they say."""

from __future__ import annotations

import pytest

from gateway.settings import ConfigError, load_settings

POOLS = "pools:\n  - {name: slm, model: smollm2-135m}\n  - {name: llm, model: gemma3-270m}\n"


def _file(tmp_path, text: str):
    path = tmp_path / "config.yaml"
    path.write_text(POOLS + text)
    return path


def test_off_on_yes_no_stay_strings_in_a_config_file(tmp_path):
    s = load_settings(_file(tmp_path, "routing:\n  cascade: {mode: off}\nexample_cache:\n  server_search: off\n"),
                      environ={})
    assert s.routing.cascade.mode == "off" and s.example_cache.server_search == "off"
    path = _file(tmp_path, "example_cache: {backend: redis, server_search: on}\nredis_url: redis://r:6379/0\n")
    assert load_settings(path, environ={}).example_cache.server_search == "on"
    # a pool name that YAML 1.1 reads as a boolean stays a name
    path = tmp_path / "yes.yaml"
    path.write_text("pools:\n  - {name: yes, model: m}\n  - {name: no, model: n}\n"
                    "routing: {slm_pool: yes, llm_pool: no}\n")
    assert [p.name for p in load_settings(path, environ={}).pools] == ["yes", "no"]


def test_off_stays_a_string_in_env_overrides(tmp_path):
    s = load_settings(_file(tmp_path, ""), environ={"SWITCHYARD__ROUTING__CASCADE__MODE": "off",
                                                   "SWITCHYARD__EXAMPLE_CACHE__SERVER_SEARCH": "off"})
    assert s.routing.cascade.mode == "off" and s.example_cache.server_search == "off"
    with pytest.raises(ConfigError, match="example_cache.server_search = 'Off'"):  # strings keep their case
        load_settings(_file(tmp_path, ""), environ={"SWITCHYARD__EXAMPLE_CACHE__SERVER_SEARCH": "Off"})
    assert load_settings(environ={"SWITCHYARD__ROUTING__CASCADE__MODE": "off"}).routing.cascade.mode == "off"


def test_boolean_fields_still_take_booleans(tmp_path):
    s = load_settings(_file(tmp_path, "example_cache: {enabled: false}\nopentelemetry: True\n"),
                      environ={"SWITCHYARD__POOLS__0__SUPPORTS_TOOLS": "true"})
    assert s.example_cache.enabled is False and s.opentelemetry is True and s.pools[0].supports_tools is True
    assert load_settings(_file(tmp_path, ""), environ={"SWITCHYARD__EXAMPLE_CACHE__ENABLED": "FALSE"}
                         ).example_cache.enabled is False
    # "off" is a string now; a boolean field still reads it as False (pydantic's string booleans)
    assert load_settings(_file(tmp_path, "example_cache: {enabled: off}\n"), environ={}).example_cache.enabled is False


TWO_POOLS = [{"name": "slm", "model": "a"}, {"name": "llm", "model": "b"}]


@pytest.mark.parametrize(("extra", "key"), [
    ({"api_keys": [{"name": "k", "sha256": "0" * 64, "budget_window": "1w"}]}, "budget_window"),
    ({"api_keys": [{"name": "k", "sha256": "0" * 64, "max_budget_usd": -1}]}, "max_budget_usd"),
    ({"decision_log": {"path": "x.jsonl", "sample": 1.5}}, "decision_log.sample"),
    ({"shutdown": {"drain_s": 0}}, "shutdown.drain_s"),
    ({"responses": {"ttl_s": 0}}, "responses.ttl_s"),
    ({"limits": {"body_read_timeout_s": -1}}, "limits.body_read_timeout_s"),
    ({"limits": {"max_header_bytes": 10}}, "limits.max_header_bytes"),
    ({"pools": [*TWO_POOLS, {"name": "c", "kind": "remote", "model": "m", "urls": ["http://h/v1"],
                         "discovery": "mdns"}]}, "discovery"),
    ({"pools": [*TWO_POOLS, {"name": "e", "model": "smollm2-135m", "task": "embed"}]}, "minilm"),
    ({"routing": {"slm_pool": "e"}, "pools": [*TWO_POOLS, {"name": "e", "model": "minilm", "task": "embed"}]},
     "routing.slm_pool"),
])
def test_new_settings_refuse_bad_values_naming_the_key(extra, key):
    """The settings this session added: a bad value is one ConfigError that names the key, never a traceback."""
    from gateway.settings import settings_from_dict

    with pytest.raises(ConfigError) as info:
        settings_from_dict({"pools": TWO_POOLS, **extra})
    assert key in str(info.value) and "\n" not in str(info.value).strip()


def test_router_pools_map_an_nmodel_artifact_to_pools():
    from gateway.settings import ConfigError, settings_from_dict

    pools = [{"name": "slm", "model": "org/tiny-7b", "price": {"input_per_1m": 1, "output_per_1m": 5}},
             {"name": "llm", "model": "big", "price": {"input_per_1m": 10, "output_per_1m": 30}},
             {"name": "mid", "model": "m", "price": {"input_per_1m": 4, "output_per_1m": 8}},
             {"name": "emb", "model": "minilm", "task": "embed"}]

    def settings(**routing):
        return settings_from_dict({"pools": pools, "routing": {"router_artifact": "/a", **routing}})

    # explicit routing.pools, then a pool named after the model, then the pool serving it; cost = 3:1 blend
    got = settings(pools={"medium": "mid"}).router_pools("nmodel", ["big", "medium", "org/tiny-7b"])
    assert got == {"big": ("llm", 15.0), "medium": ("mid", 5.0), "org/tiny-7b": ("slm", 2.0)}
    assert settings().router_pools("tfidf_ridge", []) is None

    def error(s, kind="nmodel", models=("big", "medium", "org/tiny-7b")):
        with pytest.raises(ConfigError) as e:
            s.router_pools(kind, list(models))
        assert "\n" not in str(e.value)
        return str(e.value)

    assert "match no generate pool: ['medium']" in error(settings())
    assert "'minilm'" in error(settings(), models=("big", "minilm"))  # an embed pool does not generate
    assert "routing.pools names ['nope']" in error(settings(pools={"nope": "mid", "medium": "mid"}))
    assert "['mid'] serve several" in error(settings(pools={"medium": "mid", "big": "mid"}))
    assert "routing.pools is for an nmodel router artifact" in error(settings(pools={"a": "mid"}), "tfidf_ridge", [])
    assert "routing.quality_tolerance is for an nmodel" in error(settings(quality_tolerance=0.1), "knn", [])
    assert "routing.threshold is for a two-pool router" in error(settings(threshold=0.4, pools={"medium": "mid"}))
    with pytest.raises(ConfigError, match="routing.pools.medium = 'emb' is not a pool with task 'generate'"):
        settings(pools={"medium": "emb"})
    with pytest.raises(ConfigError, match="set routing.router_artifact"):
        settings_from_dict({"pools": pools, "routing": {"pools": {"medium": "mid"}}})
    with pytest.raises(ConfigError, match="routing.quality_tolerance"):
        settings(quality_tolerance=-0.1)
