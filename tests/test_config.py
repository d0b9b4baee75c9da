"""Config: presets, TOML, environment and flag overrides, and errors that name the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from houndd.config import Config, field_docs, lan, load, local
from houndd.errors import ConfigError


def test_presets_differ_only_in_timings() -> None:
    a, b = lan(), local()
    assert a.preset == "lan" and b.preset == "local"
    assert b.probe_interval_s < a.probe_interval_s
    assert b.heartbeat_interval_s < a.heartbeat_interval_s
    assert a.port == b.port == 7480 and a.plan_replicas == b.plan_replicas == 2


def test_every_field_is_documented() -> None:
    rows = field_docs()
    assert {r[0] for r in rows} >= {
        "node_name",
        "state_dir",
        "bind",
        "port",
        "advertise",
        "mdns",
        "interfaces",
        "seeds",
        "docker_host",
        "cluster_key_file",
        "labels",
        "preset",
        "plan_replicas",
    }
    assert all(doc for _, _, doc in rows)


def test_load_toml_env_and_overrides_in_order(tmp_path: Path) -> None:
    path = tmp_path / "h.toml"
    path.write_text(
        'node_name = "n1"\nport = 7000\nseeds = ["10.0.0.1:7480"]\npreset = "local"\n'
        '[labels]\ngpu = "true"\n'
    )
    c = load(path, env={"HOUNDD_PORT": "7100", "HOUNDD_MDNS": "off"}, overrides={"node_name": "n2"})
    assert c.port == 7100  # env beats file
    assert c.node_name == "n2"  # flags beat env
    assert c.mdns is False
    assert c.seeds == ("10.0.0.1:7480",)
    assert dict(c.labels) == {"gpu": "true"}
    assert c.preset == "local" and c.probe_interval_s == local().probe_interval_s


@pytest.mark.parametrize(
    ("text", "key", "words"),
    [
        ('port = "x"', "port", "integer"),
        ("port = 70000", "port", "1..65535"),
        ('preset = "wan"', "preset", "lan, local"),
        ('seeds = ["nohost"]', "seeds", "host:port"),
        ("probe_interval_s = -1", "probe_interval_s", "positive"),
        ("bogus = 1", "bogus", "unknown"),
        ("mdns = 3", "mdns", "boolean"),
        ("labels = 3", "labels", "table"),
        ("plan_replicas = 0", "plan_replicas", ">= 1"),
        # What peers would refuse in our member record is refused here already.
        ('labels = { "has space" = "x" }', "labels", "letters, digits"),
        (f'labels = {{ k = "{"v" * 254}" }}', "labels", "at most 253"),
        ('node_name = "tab\\there"', "node_name", "printable"),
        ('advertise = "bad host!"', "advertise", "RFC 1123"),
    ],
)
def test_invalid_values_name_the_key(tmp_path: Path, text: str, key: str, words: str) -> None:
    path = tmp_path / "h.toml"
    path.write_text(text + "\n")
    with pytest.raises(ConfigError) as err:
        load(path, env={})
    assert err.value.key == key
    assert words in str(err.value)


def test_bad_env_value_names_the_key() -> None:
    with pytest.raises(ConfigError, match="plan_replicas"):
        load(None, env={"HOUNDD_PLAN_REPLICAS": "two", "HOUNDD_CONFIG": ""})


def test_missing_explicit_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load(tmp_path / "nope.toml", env={})


def test_not_toml_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "h.toml"
    path.write_text("port = = 1\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load(path, env={})


def test_config_is_frozen() -> None:
    c = Config()
    with pytest.raises(AttributeError):
        c.port = 1  # type: ignore[misc]
