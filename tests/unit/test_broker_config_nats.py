"""``fleet broker-config --kind nats``: a NATS cluster's files, the mosquitto ACL as NATS permissions."""

from __future__ import annotations

import stat
from pathlib import Path
from typing import Any

import pytest

from broker_config.nats import write_nats_config
from bus.errors import InvalidInput
from bus.mqtt import parse_broker_urls

PORTS: dict[str, Any] = {
    "mqtt_ports": (21883, 21884, 21885),
    "client_ports": (24222, 24223, 24224),
    "cluster_ports": (26222, 26223, 26224),
}


def test_three_servers_with_routes_jetstream_and_mqtt(tmp_path: Path) -> None:
    config = write_nats_config(tmp_path / "out", ["web-1", "web-2"], prefix="acme/v1", **PORTS)
    out = config.directory
    for index in (1, 2, 3):
        text = config.server_conf(index).read_text()
        assert f'server_name: "fleet-{index}"' in text
        assert f'listen: "127.0.0.1:{24221 + index}"' in text  # loopback by default
        assert f'store_dir: "{out / "store" / f"fleet-{index}"}"' in text
        assert "stream_replicas: 3" in text
        assert f'listen: "127.0.0.1:{21882 + index}"' in text
        others = [port for port in PORTS["cluster_ports"] if port != 26221 + index]
        for port in others:
            assert f"@127.0.0.1:{port}" in text
        assert f"@127.0.0.1:{26221 + index}" not in text
        assert 'include "users.conf"' in text
        assert (out / "store" / f"fleet-{index}").is_dir()
    assert stat.S_IMODE((out / "users.conf").stat().st_mode) == 0o600


def test_every_credential_file_lists_every_server(tmp_path: Path) -> None:
    config = write_nats_config(tmp_path, ["web-1"], **PORTS)
    assert set(config.credentials) == {"hub", "tui", "web-1"}
    for client in config.credentials:
        urls = parse_broker_urls(config.url(client))
        assert [u.port for u in urls] == list(PORTS["mqtt_ports"])
        assert {u.username for u in urls} == {client}
        assert len({u.password for u in urls}) == 1
        assert all(u.kind == "nats" and u.subscription_qos == 0 for u in urls)
        assert stat.S_IMODE(config.credentials[client].stat().st_mode) == 0o600


def test_permissions_equal_the_mosquitto_acl(tmp_path: Path) -> None:
    config = write_nats_config(tmp_path, ["web-1"], prefix="acme/v1", **PORTS)
    users = (config.directory / "users.conf").read_text()
    node = next(line for line in users.splitlines() if '"web-1"' in line)
    node_perms = users.splitlines()[users.splitlines().index(node) + 2]
    assert (
        'publish: ["acme.v1.node.web-1.state", "acme.v1.node.web-1.heartbeat", "acme.v1.node.web-1.status", '
        '"acme.v1.node.web-1.job", "acme.v1.node.web-1.log"]' in node_perms
    )
    assert 'subscribe: ["acme.v1.node.web-1.cmd", "acme.v1.hub.state", "$MQTT.sub.>"]' in node_perms
    assert (
        'publish: ["acme.v1.node.*.cmd", "acme.v1.rollout.*", "acme.v1.rollout.*.record", '
        '"acme.v1.rollout.*.record.*", "acme.v1.rollout.*.nodes", '
        '"acme.v1.hub.reply.*", "acme.v1.hub.state", "acme.v1.hub.member.*", '
        '"acme.v1.events"], subscribe: ["acme.v1", "acme.v1.>", "$MQTT.sub.>"]' in users
    )
    assert 'publish: ["acme.v1.hub.request"], subscribe: ["acme.v1", "acme.v1.>", "$MQTT.sub.>"]' in users
    assert users.count('allowed_connection_types: ["MQTT"]') == 3


@pytest.mark.parametrize(
    ("nodes", "extra", "reason"),
    [
        (["web.1"], {}, r"node id 'web.1' contains '\.'"),
        (["web-1"], {"prefix": "acme.io/v1"}, r"prefix 'acme.io/v1' contains '\.'"),
        (["hub"], {}, "reserved"),
        (["web-1"], {"mqtt_ports": (1, 2)}, "2 ports for 3 servers"),
        (["web-1"], {"client_ports": (21883, 2, 3)}, "used twice"),
    ],
)
def test_bad_settings_are_refused_and_write_nothing(
    tmp_path: Path, nodes: list[str], extra: dict[str, Any], reason: str
) -> None:
    with pytest.raises(InvalidInput, match=reason):
        write_nats_config(tmp_path / "out", nodes, **{**PORTS, **extra})
    assert not (tmp_path / "out").exists()


def test_add_keeps_credentials_and_refuses_overwrite(tmp_path: Path) -> None:
    first = write_nats_config(tmp_path, ["web-1"], **PORTS)
    before = first.url("web-1")
    with pytest.raises(InvalidInput, match="--add or --force"):
        write_nats_config(tmp_path, ["web-2"], **PORTS)
    added = write_nats_config(tmp_path, ["web-2"], add=True)
    assert added.created == ("web-2",)
    assert added.url("web-1") == before
    assert '"web-2"' in (tmp_path / "users.conf").read_text()
    assert added.settings.mqtt_ports == PORTS["mqtt_ports"]


def test_the_command_line_writes_a_cluster_and_refuses_a_dotted_node(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from cli.main import main

    out = tmp_path / "nats"
    assert (
        main(["broker-config", "--kind", "nats", "--servers", "3", "--out", str(out), "--nodes", "web-1"])
        == 0
    )
    shown = capsys.readouterr().out
    assert "NATS cluster of 3 servers" in shown
    assert f"nats-server -c {out.resolve() / 'nats-3.conf'}" in shown
    urls = parse_broker_urls((out / "credentials" / "web-1.url").read_text().strip())
    assert [u.port for u in urls] == [1883, 1884, 1885]
    assert main(["broker-config", "--kind", "nats", "--out", str(tmp_path / "x"), "--nodes", "web.1"]) == 2
    assert "contains '.'" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
