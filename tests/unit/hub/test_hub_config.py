"""The hub's config loader: flags > FLEET_* environment > TOML [hub] > defaults."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from bus.errors import ConfigError
from hub.config import (
    NO_SIGNING_KEY,
    HubConfig,
    config_file,
    load_client_config,
    load_hub_config,
    read_hub_config,
)

TOML = """
[hub]
broker = "mqtt://toml:1883"
prefix = "toml/v1"
db = "data/hub.json"
signing_key = "keys/hub.key"
heartbeat_s = 7
http = "127.0.0.1:8080"

[agent]
node_id = "ignored-by-the-hub"
"""


def test_defaults() -> None:
    config = load_hub_config({}, {})
    assert config.broker == "mqtt://127.0.0.1:1883"
    assert config.prefix == "fleet/v1"
    assert config.db == Path("fleet-hub.json")
    assert config.signing_key is None
    assert config.http is None
    assert config.http_address is None
    assert config.heartbeat_s == 5.0
    assert config.commit_interval_s == 0.05
    assert config.keep_rollouts == 100
    assert config.client_id == "fleet-hub"


def test_keep_rollouts_from_flag_or_environment_and_bounded() -> None:
    assert load_hub_config({}, {"FLEET_KEEP_ROLLOUTS": "7"}).keep_rollouts == 7
    assert load_hub_config({"keep_rollouts": 3}, {"FLEET_KEEP_ROLLOUTS": "7"}).keep_rollouts == 3
    with pytest.raises(ConfigError, match="keep_rollouts"):
        load_hub_config({"keep_rollouts": 0}, {})


def test_precedence_flags_over_environment_over_toml(tmp_path: Path) -> None:
    toml_path = tmp_path / "etc" / "fleet.toml"
    only_toml = load_hub_config({}, {}, TOML, toml_path=toml_path)
    assert only_toml.broker == "mqtt://toml:1883"
    assert only_toml.heartbeat_s == 7.0
    # Relative paths in the file are relative to the file.
    assert only_toml.db == tmp_path / "etc" / "data" / "hub.json"
    assert only_toml.signing_key == tmp_path / "etc" / "keys" / "hub.key"

    environ = {"FLEET_BROKER": "mqtt://env:1883", "FLEET_HEARTBEAT_S": "3", "FLEET_DB": "env.json"}
    with_env = load_hub_config({}, environ, TOML, toml_path=toml_path)
    assert with_env.broker == "mqtt://env:1883"
    assert with_env.heartbeat_s == 3.0
    assert with_env.db == Path("env.json")
    assert with_env.prefix == "toml/v1"  # not overridden

    flags = {"broker": "mqtt://flag:1883", "heartbeat_s": None, "db": Path("flag.json")}
    with_flags = load_hub_config(flags, environ, TOML, toml_path=toml_path)
    assert with_flags.broker == "mqtt://flag:1883"
    assert with_flags.heartbeat_s == 3.0  # a None flag is "not given"
    assert with_flags.db == Path("flag.json")


def test_empty_environment_values_count_as_unset() -> None:
    assert load_hub_config({}, {"FLEET_HTTP_TOKEN": "", "FLEET_PREFIX": ""}).prefix == "fleet/v1"


def test_every_field_has_a_description() -> None:
    for name, field in HubConfig.model_fields.items():
        assert field.description, name


def test_config_is_frozen_and_strict() -> None:
    config = load_hub_config({}, {})
    with pytest.raises(ValidationError):
        config.prefix = "x"  # type: ignore[misc]
    with pytest.raises(ValidationError):
        HubConfig(nonsense=1)  # type: ignore[call-arg]


def test_bad_values_name_the_field_and_the_source() -> None:
    with pytest.raises(ConfigError, match=r"heartbeat_s \(from FLEET_HEARTBEAT_S\)"):
        load_hub_config({}, {"FLEET_HEARTBEAT_S": "soon"})
    with pytest.raises(ConfigError, match=r"broker \(from --broker\).*scheme"):
        load_hub_config({"broker": "http://x"}, {})
    with pytest.raises(ConfigError, match=r"prefix \(from .*fleet.toml \[hub\] prefix\)"):
        load_hub_config({}, {}, '[hub]\nprefix = "bad prefix"\n', toml_path=Path("/x/fleet.toml"))
    with pytest.raises(ConfigError, match="http"):
        load_hub_config({"http": "no-port"}, {})


def test_unknown_toml_key_and_bad_toml_are_config_errors() -> None:
    with pytest.raises(ConfigError, match="unknown key 'brokr'"):
        load_hub_config({}, {}, '[hub]\nbrokr = "x"\n')
    with pytest.raises(ConfigError, match="invalid TOML"):
        load_hub_config({}, {}, "[hub\n")
    with pytest.raises(ConfigError, match="must be a table"):
        load_hub_config({}, {}, 'hub = "x"\n')


def test_non_loopback_http_needs_a_token() -> None:
    with pytest.raises(ConfigError, match=r"non-loopback 0\.0\.0\.0:8080 without a token"):
        load_hub_config({"http": "0.0.0.0:8080"}, {})
    config = load_hub_config({"http": "0.0.0.0:8080"}, {"FLEET_HTTP_TOKEN": "t"})
    assert config.http_address == ("0.0.0.0", 8080)
    assert load_hub_config({"http": "localhost:80"}, {}).http_address == ("localhost", 80)
    assert load_hub_config({"http": "[::1]:80"}, {}).http_address == ("::1", 80)


def test_signing_key_message_is_one_line() -> None:
    assert "\n" not in NO_SIGNING_KEY
    assert "fleet keys generate --out DIR" in NO_SIGNING_KEY
    assert "--signing-key DIR/hub.key" in NO_SIGNING_KEY


def test_client_config_reads_its_own_table() -> None:
    text = '[hub]\nbroker = "mqtt://hub:1"\n[client]\nbroker = "mqtt://cli:2"\nrequest_timeout_s = 3\n'
    config = load_client_config({}, {}, text)
    assert config.broker == "mqtt://cli:2"
    assert config.request_timeout_s == 3.0
    assert load_client_config({"prefix": "p/v1"}, {"FLEET_PREFIX": "e/v1"}).prefix == "p/v1"
    assert load_client_config({}, {"FLEET_REQUEST_TIMEOUT": "2.5"}).request_timeout_s == 2.5


def test_config_file_choice(tmp_path: Path) -> None:
    home, cwd = tmp_path / "home", tmp_path / "cwd"
    (home / ".config" / "fleet").mkdir(parents=True)
    cwd.mkdir()
    assert config_file("given.toml", {}, cwd=cwd, home=home) == cwd / "given.toml"
    assert config_file(None, {"FLEET_CONFIG": "env.toml"}, cwd=cwd, home=home) == cwd / "env.toml"
    assert config_file("/etc/x.toml", {"FLEET_CONFIG": "env.toml"}, cwd=cwd, home=home) == Path("/etc/x.toml")
    user = home / ".config" / "fleet" / "fleet.toml"
    user.write_text("")
    assert config_file(None, {}, cwd=cwd, home=home) == user
    (cwd / "fleet.toml").write_text("")
    assert config_file(None, {}, cwd=cwd, home=home) == cwd / "fleet.toml"
    assert config_file(None, {"FLEET_NO_CONFIG_DISCOVERY": "1"}, cwd=cwd, home=home) is None
    assert config_file(None, {"FLEET_NO_CONFIG_DISCOVERY": ""}, cwd=cwd, home=home) == cwd / "fleet.toml"
    xdg = tmp_path / "xdg"
    (xdg / "fleet").mkdir(parents=True)
    (xdg / "fleet" / "fleet.toml").write_text("")
    (cwd / "fleet.toml").unlink()
    assert (
        config_file(None, {"XDG_CONFIG_HOME": str(xdg)}, cwd=cwd, home=home) == xdg / "fleet" / "fleet.toml"
    )


def test_read_hub_config_reads_the_named_file(tmp_path: Path) -> None:
    path = tmp_path / "fleet.toml"
    path.write_text(TOML)
    config = read_hub_config({}, {}, path)
    assert config.prefix == "toml/v1"
    with pytest.raises(ConfigError, match="cannot read config file"):
        read_hub_config({}, {}, tmp_path / "missing.toml")
