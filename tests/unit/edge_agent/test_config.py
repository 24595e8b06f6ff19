"""AgentConfig and its loader: precedence, validation, files, executor settings."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pydantic
import pytest

from bus.errors import ConfigError, InvalidNodeId
from bus.signing import generate_keypair
from cli.main import main
from edge_agent.config import (
    DEFAULT_BROKER,
    AgentConfig,
    find_config_file,
    load_agent_config,
    load_policy,
    read_agent_config,
)
from edge_agent.settings import ProcessService

TOML = """
[hub]
broker = "mqtt://hub-only:1"

[agent]
broker = "mqtt://from-toml:1883"
node_id = "toml-node"
heartbeat_s = 7
keepalive_s = 20
state_dir = "state"
trust = "keys/hub.pub"
packages = ["openssl", "nginx"]
labels = { site = "lab", role = "edge" }

[agent.services.web]
command = ["/usr/bin/web", "--port", "8080"]
version_file = "VERSION"
"""


def test_defaults_with_only_a_node_id() -> None:
    config = load_agent_config({"node_id": "n1"}, {})
    assert config.broker == DEFAULT_BROKER
    assert config.prefix == "fleet/v1"
    assert config.state_dir == Path("fleet-state/n1")
    assert config.scripts_dir == Path("fleet-state/n1-scripts")
    assert config.heartbeat_s == 5.0
    assert config.keepalive_s == 10
    assert config.service_manager == "process"
    assert config.labels == {}
    assert config.trust == []
    assert config.topics.node("n1", "cmd") == "fleet/v1/node/n1/cmd"


def test_scripts_dir_defaults_beside_a_given_state_dir_never_inside_it() -> None:
    """Issue 16: steps may write under the state dir, so the scripts they run live elsewhere."""
    config = load_agent_config({"node_id": "n1", "state_dir": "/var/lib/fleet"}, {})
    assert config.scripts_dir == Path("/var/lib/fleet-scripts")
    assert not config.scripts_dir.is_relative_to(config.state_dir)


def test_toml_agent_table_is_read_and_other_tables_ignored(tmp_path: Path) -> None:
    config = load_agent_config({}, {}, TOML, config_dir=tmp_path)
    assert config.broker == "mqtt://from-toml:1883"
    assert config.node_id == "toml-node"
    assert config.heartbeat_s == 7.0
    assert config.keepalive_s == 20
    assert config.packages == ["openssl", "nginx"]
    assert config.labels == {"site": "lab", "role": "edge"}
    # Relative paths in the file are relative to the file's directory.
    assert config.state_dir == tmp_path / "state"
    assert config.trust == [tmp_path / "keys/hub.pub"]
    assert config.services == {
        "web": ProcessService(command=["/usr/bin/web", "--port", "8080"], version_file="VERSION")
    }


def test_environment_beats_toml_and_flags_beat_environment(tmp_path: Path) -> None:
    environ = {
        "FLEET_BROKER": "mqtt://from-env:1883",
        "FLEET_HEARTBEAT_S": "3",
        "FLEET_LABELS": "site=env, tier=gold",
        "FLEET_PREFIX": "env/v1",
        "UNRELATED": "x",
    }
    config = load_agent_config({}, environ, TOML, config_dir=tmp_path)
    assert config.broker == "mqtt://from-env:1883"
    assert config.heartbeat_s == 3.0
    assert config.keepalive_s == 20  # only in the TOML
    assert config.labels == {"site": "env", "tier": "gold"}
    assert config.prefix == "env/v1"

    flags = {"broker": "mqtt://from-flag:1", "heartbeat_s": "0.5", "labels": ["site=flag"], "prefix": None}
    config = load_agent_config(flags, environ, TOML, config_dir=tmp_path)
    assert config.broker == "mqtt://from-flag:1"
    assert config.heartbeat_s == 0.5
    assert config.labels == {"site": "flag"}
    assert config.prefix == "env/v1"  # a flag left at None does not override


def test_list_values_from_the_environment() -> None:
    environ = {
        "FLEET_NODE_ID": "n-env",
        "FLEET_TRUST": "/a.pub,/b.pub",
        "FLEET_PACKAGE": "openssl",
        "FLEET_DRIVERS": "e1000e, nvidia",
        "FLEET_LABEL": "a=1",
        "FLEET_SERVICES": json.dumps({"svc": {"command": ["true"]}}),
    }
    config = load_agent_config({}, environ)
    assert config.node_id == "n-env"
    assert config.trust == [Path("/a.pub"), Path("/b.pub")]
    assert config.packages == ["openssl"]
    assert config.drivers == ["e1000e", "nvidia"]
    assert config.labels == {"a": "1"}
    assert config.services["svc"].command == ["true"]


@pytest.mark.parametrize("source", ["flag", "env", "toml"])
def test_invalid_node_id_is_refused_naming_the_problem(source: str) -> None:
    bad = "bad/id"
    flags = {"node_id": bad} if source == "flag" else {}
    environ = {"FLEET_NODE_ID": bad} if source == "env" else {}
    toml = f'[agent]\nnode_id = "{bad}"\n' if source == "toml" else None
    with pytest.raises(InvalidNodeId) as info:
        load_agent_config(flags, environ, toml)
    assert "invalid node id 'bad/id'" in info.value.reason
    assert "\n" not in info.value.reason


def test_missing_node_id_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="no node id"):
        load_agent_config({}, {})


@pytest.mark.parametrize(
    ("flags", "field"),
    [
        ({"heartbeat_s": "0"}, "heartbeat_s"),
        ({"heartbeat_s": "often"}, "heartbeat_s"),
        ({"keepalive_s": "0"}, "keepalive_s"),
        ({"broker": "http://x:1"}, "broker"),
        ({"prefix": "bad prefix/#"}, "prefix"),
        ({"service_manager": "upstart"}, "service_manager"),
        ({"labels": ["bad key=1"]}, "labels"),
    ],
)
def test_bad_values_are_config_errors_naming_the_field(flags: dict[str, str], field: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_agent_config({"node_id": "n1", **flags}, {})
    assert field in info.value.reason
    assert "\n" not in info.value.reason


def test_label_without_equals_sign_is_refused() -> None:
    with pytest.raises(ConfigError, match="expected key=value"):
        load_agent_config({"node_id": "n1", "labels": ["justakey"]}, {})


def test_unknown_toml_key_and_broken_toml_are_refused() -> None:
    with pytest.raises(ConfigError, match="heartbeat_secs"):
        load_agent_config({"node_id": "n1"}, {}, "[agent]\nheartbeat_secs = 3\n")
    with pytest.raises(ConfigError, match="invalid TOML"):
        load_agent_config({"node_id": "n1"}, {}, "[agent\n")
    with pytest.raises(ConfigError, match="FLEET_SERVICES"):
        load_agent_config({"node_id": "n1"}, {"FLEET_SERVICES": "{not json"})


def test_config_is_frozen_and_every_field_is_described() -> None:
    config = load_agent_config({"node_id": "n1"}, {})
    with pytest.raises(pydantic.ValidationError):
        config.node_id = "n2"  # type: ignore[misc]
    for name, field in AgentConfig.model_fields.items():
        assert field.description, name
    with pytest.raises(pydantic.ValidationError):
        AgentConfig.model_validate({"node_id": "n1", "surprise": 1})


def test_config_file_discovery(tmp_path: Path) -> None:
    assert find_config_file(None, {}, tmp_path) is None
    (tmp_path / "fleet.toml").write_text("[agent]\n")
    assert find_config_file(None, {}, tmp_path) == tmp_path / "fleet.toml"
    assert find_config_file(None, {"FLEET_NO_CONFIG_DISCOVERY": "1"}, tmp_path) is None
    assert find_config_file(None, {"FLEET_CONFIG": "other.toml"}, tmp_path) == tmp_path / "other.toml"
    assert find_config_file("/etc/x.toml", {"FLEET_CONFIG": "other.toml"}, tmp_path) == Path("/etc/x.toml")


def test_read_agent_config_reads_the_named_file(tmp_path: Path) -> None:
    path = tmp_path / "conf" / "agent.toml"
    path.parent.mkdir()
    path.write_text(TOML)
    config = read_agent_config({"config": path, "node_id": "flag-node"}, {}, tmp_path)
    assert config.node_id == "flag-node"
    assert config.state_dir == path.parent / "state"
    with pytest.raises(ConfigError, match="cannot read config file"):
        read_agent_config({"config": tmp_path / "missing.toml"}, {}, tmp_path)


def test_to_executor_settings_loads_keys_and_policy(tmp_path: Path) -> None:
    _, pub_a = generate_keypair(tmp_path / "a")
    _, pub_b = generate_keypair(tmp_path / "b")
    policy = tmp_path / "policy.toml"
    policy.write_text('step_types = ["script", "health"]\nscripts = ["install_*.sh"]\n')
    config = load_agent_config(
        {
            "node_id": "n1",
            "state_dir": "rel-state",
            "trust": [str(pub_a), str(pub_b)],
            "policy": str(policy),
            "service_manager": "systemd",
        },
        {},
    )
    settings = config.to_executor_settings()
    assert settings.node == "n1"
    assert len(settings.trusted_keys) == 2
    assert settings.state_dir.is_absolute()
    assert settings.state_dir.name == "rel-state"
    assert settings.scripts_dir == settings.state_dir.with_name("rel-state-scripts")
    assert settings.policy.step_types == ["script", "health"]
    assert settings.service_manager == "systemd"
    assert settings.default_step_timeout_s == 300.0


def test_policy_files_in_json_and_under_a_policy_table(tmp_path: Path) -> None:
    as_json = tmp_path / "policy.json"
    as_json.write_text(json.dumps({"packages": ["nginx*"]}))
    assert load_policy(as_json).packages == ["nginx*"]
    nested = tmp_path / "nested.toml"
    nested.write_text('[policy]\nservices = ["web"]\n')
    assert load_policy(nested).services == ["web"]
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"step_type": ["script"]}))
    with pytest.raises(ConfigError, match="invalid policy file"):
        load_policy(bad)
    with pytest.raises(ConfigError, match="cannot read policy file"):
        load_policy(tmp_path / "missing.json")


def test_unreadable_trust_file_is_a_config_error(tmp_path: Path) -> None:
    config = load_agent_config({"node_id": "n1", "trust": [str(tmp_path / "nope.pub")]}, {})
    with pytest.raises(ConfigError, match="trust file"):
        config.to_executor_settings()


def test_fleet_agent_refuses_a_bad_node_id_in_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["agent", "--node-id", "no spaces allowed"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert err.startswith("fleet agent: invalid node id 'no spaces allowed'")


def test_fleet_agent_without_node_id_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["agent"]) == 2
    assert "no node id" in capsys.readouterr().err


def test_agent_imports_stay_lean() -> None:
    """`fleet agent` must not load Textual, FastAPI, uvicorn or the hub (FINDINGS: ~33 MiB floor)."""
    code = """
import importlib, importlib.util, sys
import cli.main
cli.main._build_parser(["agent", "--node-id", "n1"])
for name in ["cli.agent", "edge_agent.config", "edge_agent.presence", "edge_agent.inventory",
             "edge_agent.service", "edge_agent.runner"]:
    if name == "edge_agent.runner" and importlib.util.find_spec(name) is None:
        continue
    importlib.import_module(name)
heavy = ("textual", "fastapi", "uvicorn", "starlette", "tinydb", "hub", "tui", "prometheus_client")
print(sorted(m for m in sys.modules if m.split(".")[0] in heavy))
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_a_scripts_dir_inside_the_state_dir_is_warned_about(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    state = tmp_path / "s"
    fields = {"node_id": "n1", "state_dir": str(state), "scripts_dir": str(state / "x")}
    config = load_agent_config(fields, {})
    config.to_executor_settings()
    assert "inside the state dir" in caplog.text
