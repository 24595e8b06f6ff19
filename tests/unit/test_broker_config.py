"""`fleet broker-config`, its files, the ACL engine of the embedded broker, and the deploy kit."""

from __future__ import annotations

import os
import re
import shutil
import stat
import subprocess
import sys
from pathlib import Path, PurePosixPath
from urllib.parse import unquote, urlsplit

import pytest
import yaml
from cryptography import x509

from broker_config.amqtt_acl import Acl
from broker_config.generate import (
    BrokerSettings,
    acl_text,
    hash_password,
    mosquitto_conf_text,
    new_password,
    parse_password_file,
    verify_password,
    write_broker_config,
)
from broker_config.tls import ensure_tls, make_ca, make_server_cert, server_names
from bus.broker import load_config
from bus.mqtt import parse_broker_url
from cli.main import main
from edge_agent.config import load_agent_config, load_policy

REPO = Path(__file__).resolve().parents[2]
URL = re.compile(r"mqtt://(?P<user>[^:]+):(?P<password>[A-Za-z0-9_-]{24,})@127\.0\.0\.1:(?P<port>\d+)")

#: `mosquitto_passwd -b pw alice s3cret` on mosquitto 2.0.11.
GOLDEN_HASH = (
    "$7$101$0HroBNqnducLen3v$Yxc3QAmnzgypVfIuN6jbypwYfEBFf58c3D3jmNHfUoaeenDkdWmpE7BpXw7/"
    "nPwkgM60+TfJ/bWYechEeXCREg=="
)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def run_cli(*args: str) -> int:
    return main(["broker-config", *args])


# ---------------------------------------------------------------- passwords


def test_hash_is_mosquitto_passwd_format_and_matches_its_golden_hash() -> None:
    salt = b"\xd0\x7a\xe8\x04\xda\xa7\x76\xe7\x0b\x7a\x7d\xef"
    assert hash_password("s3cret", salt=salt) == GOLDEN_HASH
    assert verify_password("s3cret", GOLDEN_HASH)
    assert not verify_password("s3cret!", GOLDEN_HASH)
    fresh = hash_password("s3cret")
    assert re.fullmatch(r"\$7\$101\$[A-Za-z0-9+/]{16}\$[A-Za-z0-9+/]{86}==", fresh)
    assert fresh != hash_password("s3cret")  # a new salt every time
    for broken in ("", "$7$101$", "$7$x$a$b", "$7$101$!!$AAAA", "$1$abc$def", "plain"):
        assert not verify_password("s3cret", broken)


def test_hashes_of_the_real_mosquitto_passwd_verify(tmp_path: Path) -> None:
    binary = shutil.which("mosquitto_passwd")
    if binary is None:
        pytest.skip("mosquitto_passwd not installed (apt-get install mosquitto)")
    pw = tmp_path / "pw"
    subprocess.run([binary, "-c", "-b", str(pw), "alice", "pa55-word"], check=True, capture_output=True)
    subprocess.run([binary, "-H", "sha512", "-b", str(pw), "bob", "legacy"], check=True, capture_output=True)
    users = parse_password_file(pw.read_text())
    assert verify_password("pa55-word", users["alice"])
    assert users["bob"].startswith("$6$")
    assert verify_password("legacy", users["bob"])
    assert not verify_password("other", users["alice"])
    assert not verify_password("other", users["bob"])


def test_passwords_are_random_url_safe_and_long() -> None:
    passwords = {new_password() for _ in range(50)}
    assert len(passwords) == 50
    assert all(len(p) >= 24 and re.fullmatch(r"[A-Za-z0-9_-]+", p) for p in passwords)


# ---------------------------------------------------------------- the command


def test_broker_config_writes_every_file_with_private_secrets(tmp_path: Path) -> None:
    out = tmp_path / "broker"
    assert run_cli("--out", str(out), "--nodes", "n1,n2", "--port", "1999") == 0
    for name in ("mosquitto.conf", "passwords", "acl", "amqtt.yaml", "fleet-broker.json"):
        assert (out / name).is_file(), name
    assert mode(out / "passwords") == 0o600
    assert mode(out / "credentials") == 0o700
    hashes = parse_password_file((out / "passwords").read_text())
    assert list(hashes) == ["hub", "tui", "n1", "n2"]
    for client in hashes:
        path = out / "credentials" / f"{client}.url"
        assert mode(path) == 0o600
        match = URL.fullmatch(path.read_text().strip())
        assert match is not None, path.read_text()
        assert match["user"] == client
        assert match["port"] == "1999"
        assert verify_password(match["password"], hashes[client])
        assert parse_broker_url(path.read_text()).username == client
    conf = (out / "mosquitto.conf").read_text()
    for line in (
        "allow_anonymous false",
        f"password_file {out}/passwords",
        f"acl_file {out}/acl",
        "listener 1999 127.0.0.1",
        "set_tcp_nodelay true",
        "persistence true",
        f"persistence_location {out}/data/",
        "max_queued_messages 100000",
        "max_inflight_messages 1000",
    ):
        assert line in conf.splitlines(), line
    assert "cafile" not in conf
    amqtt = load_config(out / "amqtt.yaml", "127.0.0.1", 2000)
    assert amqtt["listeners"]["default"]["bind"] == "127.0.0.1:2000"
    assert amqtt["plugins"] == {
        "broker_config.amqtt_acl.FleetAclPlugin": {
            "password_file": f"{out}/passwords",
            "acl_file": f"{out}/acl",
        }
    }


def test_tls_writes_a_ca_and_a_server_certificate_and_mqtts_urls(tmp_path: Path) -> None:
    out = tmp_path / "broker"
    assert run_cli("--out", str(out), "--nodes", "n1", "--tls", "--host", "broker.lan") == 0
    tls = out / "tls"
    assert mode(tls / "ca.key") == 0o600
    assert mode(tls / "server.key") == 0o600
    ca = x509.load_pem_x509_certificate((tls / "ca.pem").read_bytes())
    server = x509.load_pem_x509_certificate((tls / "server.pem").read_bytes())
    server.verify_directly_issued_by(ca)
    assert server_names((tls / "server.pem").read_bytes()) == {"broker.lan", "127.0.0.1", "localhost"}
    url = (out / "credentials" / "n1.url").read_text().strip()
    parts = urlsplit(url)
    assert parts.scheme == "mqtts"
    assert parts.hostname == "broker.lan"
    assert parts.port == 8883
    assert unquote(parts.query) == f"ca={tls / 'ca.pem'}"
    conf = (out / "mosquitto.conf").read_text().splitlines()
    assert f"certfile {tls / 'server.pem'}" in conf
    assert f"keyfile {tls / 'server.key'}" in conf
    assert "listener 8883 broker.lan" in conf
    listener = yaml.safe_load((out / "amqtt.yaml").read_text())["listeners"]["default"]
    assert listener["ssl"] is True
    assert listener["certfile"] == str(tls / "server.pem")


def test_add_keeps_every_existing_credential(tmp_path: Path) -> None:
    out = tmp_path / "broker"
    assert run_cli("--out", str(out), "--nodes", "n1,n2", "--tls") == 0
    before = {p.name: p.read_bytes() for p in (out / "credentials").iterdir()}
    hashes = parse_password_file((out / "passwords").read_text())
    tls_before = {p.name: p.read_bytes() for p in (out / "tls").iterdir()}
    assert run_cli("--out", str(out), "--nodes", "n2,n3", "--add") == 0
    after = {p.name: p.read_bytes() for p in (out / "credentials").iterdir()}
    assert {k: after[k] for k in before} == before
    assert set(after) == {*before, "n3.url"}
    new_hashes = parse_password_file((out / "passwords").read_text())
    assert {k: new_hashes[k] for k in hashes} == hashes
    assert "n3" in new_hashes
    assert {p.name: p.read_bytes() for p in (out / "tls").iterdir()} == tls_before
    assert after["n3.url"].startswith(b"mqtts://n3:")
    assert "nodes: n1, n2, n3." in (out / "mosquitto.conf").read_text()


def test_force_replaces_credentials_and_drops_removed_nodes(tmp_path: Path) -> None:
    out = tmp_path / "broker"
    assert run_cli("--out", str(out), "--nodes", "n1,n2") == 0
    old = (out / "credentials" / "n1.url").read_text()
    assert run_cli("--out", str(out), "--nodes", "n1", "--force") == 0
    assert (out / "credentials" / "n1.url").read_text() != old
    assert not (out / "credentials" / "n2.url").exists()
    assert "n2" not in parse_password_file((out / "passwords").read_text())


@pytest.mark.parametrize(
    ("args", "reason"),
    [
        (["--nodes", "n1,bad/id"], "invalid node id 'bad/id'"),
        (["--nodes", "n1,-x"], "invalid node id '-x'"),
        (["--nodes", "hub"], "reserved"),
        (["--nodes", "n1,tui"], "reserved"),
        (["--nodes", " , "], "names no node"),
        (["--nodes", "n1", "--host", "a b"], "not a host name"),
        (["--nodes", "n1", "--prefix", "fleet/#"], "invalid topic prefix"),
        (["--nodes", "n1", "--add"], "no broker config to add to"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str], reason: str
) -> None:
    out = tmp_path / "broker"
    assert run_cli("--out", str(out), *args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert err.startswith("fleet broker-config: ")
    assert reason in err
    assert not (out / "passwords").exists()


def test_an_existing_config_is_never_overwritten_by_accident(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "broker"
    assert run_cli("--out", str(out), "--nodes", "n1") == 0
    before = (out / "passwords").read_bytes()
    assert run_cli("--out", str(out), "--nodes", "n1") == 2
    assert run_cli("--out", str(out), "--nodes", "n2", "--add", "--port", "1884") == 2
    err = capsys.readouterr().err
    assert "pass --add" in err
    assert "--port 1884 differs" in err
    assert (out / "passwords").read_bytes() == before


def test_hub_port_gives_the_hubs_a_listener_of_their_own(tmp_path: Path) -> None:
    out = tmp_path / "broker"
    assert run_cli("--out", str(out), "--nodes", "n1", "--port", "1883", "--hub-port", "1884") == 0
    conf = (out / "mosquitto.conf").read_text()
    main_part, hub_part = conf.split("listener 1884 127.0.0.1")
    assert "per_listener_settings true" in main_part
    assert "listener 1883 127.0.0.1" in main_part
    assert "use_username_as_clientid true" in main_part
    assert "use_username_as_clientid" not in hub_part  # several hubs share the user hub
    assert f"password_file {out / 'hub-passwords'}" in hub_part
    assert set(parse_password_file((out / "hub-passwords").read_text())) == {"hub"}
    assert stat.S_IMODE((out / "hub-passwords").stat().st_mode) == 0o600
    assert urlsplit((out / "credentials" / "hub.url").read_text().strip()).port == 1884
    assert urlsplit((out / "credentials" / "n1.url").read_text().strip()).port == 1883
    listeners = yaml.safe_load((out / "amqtt.yaml").read_text())["listeners"]
    assert listeners["hubs"]["bind"] == "127.0.0.1:1884"
    # Without it, no hub listener and no hub password file (a --force drops them).
    assert run_cli("--out", str(out), "--nodes", "n1", "--force") == 0
    assert "per_listener_settings false" in (out / "mosquitto.conf").read_text()
    assert not (out / "hub-passwords").exists()
    assert run_cli("--out", str(out), "--nodes", "n1", "--force", "--port", "1884", "--hub-port", "1884") == 2


def test_broker_dir_is_where_the_broker_sees_the_files(tmp_path: Path) -> None:
    out = tmp_path / "broker"
    result = write_broker_config(
        out, ["node-1"], host="mosquitto", bind="0.0.0.0", broker_dir="/fleet/broker", tls=True
    )
    conf = (out / "mosquitto.conf").read_text().splitlines()
    assert "listener 8883 0.0.0.0" in conf
    assert "password_file /fleet/broker/passwords" in conf
    assert "persistence_location /fleet/broker/data/" in conf
    assert result.url("node-1").endswith("@mosquitto:8883?ca=/fleet/broker/tls/ca.pem")


# ---------------------------------------------------------------- the ACL, as the embedded broker reads it


P = "fleet/v1"


@pytest.mark.parametrize(
    ("user", "topic", "publish", "receive"),
    [
        ("n1", f"{P}/node/n1/state", True, False),
        ("n1", f"{P}/node/n1/heartbeat", True, False),
        ("n1", f"{P}/node/n1/status", True, False),
        ("n1", f"{P}/node/n1/job", True, False),
        ("n1", f"{P}/node/n1/log", True, False),
        ("n1", f"{P}/node/n1/cmd", False, True),
        ("n1", f"{P}/node/n1/other", False, False),
        ("n1", f"{P}/node/n2/state", False, False),
        ("n1", f"{P}/node/n2/cmd", False, False),
        ("n1", f"{P}/hub/request", False, False),
        ("n1", f"{P}/hub/state", False, True),
        ("n1", f"{P}/events", False, False),
        ("hub", f"{P}/node/n1/cmd", True, True),
        ("hub", f"{P}/node/n1/state", False, True),
        ("hub", f"{P}/rollout/r-1", True, True),
        ("hub", f"{P}/rollout/r-1/x", False, True),
        ("hub", f"{P}/hub/reply/tui-1", True, True),
        ("hub", f"{P}/hub/state", True, True),
        ("hub", f"{P}/events", True, True),
        ("hub", f"{P}/hub/request", False, True),
        ("hub", "other/v1/events", False, False),
        ("tui", f"{P}/hub/request", True, True),
        ("tui", f"{P}/node/n1/cmd", False, True),
        ("tui", f"{P}/events", False, True),
        ("tui", f"{P}/rollout/r-1", False, True),
        ("tui", f"{P}/hub/reply/tui-1", False, True),
        (None, f"{P}/events", False, False),
        ("stranger", f"{P}/events", False, False),
    ],
)
def test_acl_rules(user: str | None, topic: str, publish: bool, receive: bool) -> None:
    acl = Acl.parse(acl_text(P))
    assert acl.may_publish(user, "client-1", topic) is publish
    assert acl.may_receive(user, "client-1", topic) is receive


@pytest.mark.parametrize(
    ("user", "topic_filter", "allowed"),
    [
        ("n1", f"{P}/node/n1/cmd", True),
        ("n1", f"{P}/node/+/cmd", False),
        ("n1", f"{P}/node/n1/#", False),
        ("n1", f"{P}/#", False),
        ("n1", "#", False),
        ("hub", f"{P}/#", True),
        ("hub", f"{P}/node/+/state", True),
        ("hub", "#", False),
        ("hub", "+/v1/events", False),
        ("tui", f"{P}/rollout/+", True),
        ("tui", f"{P}/+/+/+", True),
    ],
)
def test_subscriptions_only_where_every_match_is_readable(
    user: str, topic_filter: str, allowed: bool
) -> None:
    assert Acl.parse(acl_text(P)).may_subscribe(user, "c", topic_filter) is allowed


def test_acl_parser_knows_mosquitto_syntax() -> None:
    acl = Acl.parse(
        "# comment\n"
        "topic read public/#\n"  # anonymous clients only
        "user alice\n"
        "topic a/#\n"  # readwrite when no access is given
        "topic deny a/secret/#\n"
        "pattern readwrite dev/%c/#\n"
        "pattern write users/%u/in\n"
    )
    assert acl.may_receive(None, "x", "public/news")
    assert not acl.may_receive("alice", "x", "public/news")
    assert acl.may_publish("alice", "x", "a/b")
    assert acl.may_receive("alice", "x", "a/b")
    assert not acl.may_publish("alice", "x", "a/secret/b")
    assert not acl.may_receive("alice", "x", "a/secret/b")
    assert acl.may_subscribe("alice", "x", "a/b/#")
    assert not acl.may_subscribe("alice", "x", "a/#")
    assert acl.may_publish("bob", "dev-9", "dev/dev-9/t")
    assert not acl.may_publish("bob", "dev-9", "dev/dev-8/t")
    assert acl.may_publish("bob", "c", "users/bob/in")
    assert not acl.may_publish("bob", "c", "users/alice/in")
    assert not acl.may_publish("a+b", "c", "users/a+b/in")  # a wildcard in a name never widens a pattern
    assert not acl.may_publish("alice", "x", "a/+")  # never a wildcard in a published topic
    assert not acl.may_receive("alice", "x", "$SYS/a")


@pytest.mark.parametrize("text", ["bogus line", "topic read", "user", "pattern deny"])
def test_acl_parser_refuses_what_it_does_not_understand(text: str) -> None:
    from bus.errors import ConfigError

    with pytest.raises(ConfigError, match="ACL line 1"):
        Acl.parse(text)


# ---------------------------------------------------------------- TLS helpers


def test_server_certificate_names_the_host_and_loopback() -> None:
    ca = make_ca()
    for host, expected in (
        ("10.0.0.5", {"10.0.0.5", "127.0.0.1", "localhost"}),
        ("localhost", {"127.0.0.1", "localhost"}),
    ):
        server = make_server_cert(ca, host)
        assert server_names(server.cert_pem) == expected
        cert = x509.load_pem_x509_certificate(server.cert_pem)
        cert.verify_directly_issued_by(x509.load_pem_x509_certificate(ca.cert_pem))


def test_ensure_tls_reissues_only_for_a_new_host(tmp_path: Path) -> None:
    def write(path: Path, data: bytes, mode: int) -> None:
        path.write_bytes(data)
        path.chmod(mode)

    ensure_tls(tmp_path, "a.lan", reuse=True, write=write)
    files = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    ensure_tls(tmp_path, "a.lan", reuse=True, write=write)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == files
    ensure_tls(tmp_path, "b.lan", reuse=True, write=write)
    assert (tmp_path / "ca.pem").read_bytes() == files["ca.pem"]
    assert "b.lan" in server_names((tmp_path / "server.pem").read_bytes())


# ---------------------------------------------------------------- shipped examples and deploy kit


def test_mosquitto_conf_example_documents_every_generated_directive() -> None:
    settings = BrokerSettings(nodes=("n1", "n2"), host="broker.example.com", port=8883, tls=True)
    generated = mosquitto_conf_text(settings, PurePosixPath("/etc/fleet/broker"))
    example = (REPO / "broker_config" / "mosquitto.conf.example").read_text()

    def directives(text: str) -> list[str]:
        return [line for line in text.splitlines() if line and not line.startswith("#")]

    assert directives(example) == directives(generated)


def test_policy_example_is_a_valid_full_policy() -> None:
    policy = load_policy(REPO / "broker_config" / "policy.example.toml")
    assert all(value is not None for value in policy.model_dump().values())


def test_compose_file_structure() -> None:
    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    services = compose["services"]
    assert {"mosquitto", "hub", "agent-1", "agent-2", "agent-3"} <= set(services)
    assert services["mosquitto"]["image"] == "${FLEET_MOSQUITTO_IMAGE:-eclipse-mosquitto:2}"
    assert services["mosquitto"]["command"][-1] == "/fleet/broker/mosquitto.conf"
    for name, service in services.items():
        for port in service.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), f"{name} publishes {port} beyond loopback"
        if name != "tui":
            assert "test" in service["healthcheck"], name
    assert "127.0.0.1:8080:8080" in services["hub"]["ports"]
    assert "hub-db:/var/lib/fleet-hub" in services["hub"]["volumes"]
    volumes = set(compose["volumes"])
    for index in (1, 2, 3):
        agent = services[f"agent-{index}"]
        assert agent["command"] == ["demo-agent"]
        assert agent["environment"]["FLEET_NODE_ID"] == f"node-{index}"
        assert agent["environment"]["FLEET_RUN_AS"] == "root"
        assert f"agent-{index}-state:/var/lib/fleet-agent" in agent["volumes"]
        assert f"agent-{index}-state" in volumes
        secret = agent["environment"]["FLEET_BROKER_FILE"].rsplit("/", 1)[1]
        assert compose["secrets"][secret]["file"] == f"./broker/credentials/node-{index}.url"
    assert "hub-db" in volumes
    assert "FLEET_RUN_AS" not in services["hub"]["environment"]  # the hub drops root
    text = (REPO / "docker-compose.yml").read_text()
    assert "--nodes node-1,node-2,node-3" in text
    assert "--broker-dir /fleet/broker" in text


def test_dockerfile_runs_the_entrypoint_that_drops_root() -> None:
    dockerfile = (REPO / "Dockerfile").read_text()
    assert dockerfile.startswith("#")
    assert "ARG BASE=python:3.11-slim\nFROM ${BASE}" in dockerfile
    assert 'ENTRYPOINT ["fleet-entrypoint"]' in dockerfile
    assert "COPY deploy/docker-entrypoint.sh /usr/local/bin/fleet-entrypoint" in dockerfile
    for package in ("bus", "hub", "edge_agent", "tui", "cli", "broker_config"):
        assert f"COPY {package} ./{package}" in dockerfile
    entrypoint = (REPO / "deploy" / "docker-entrypoint.sh").read_text()
    assert "setpriv --reuid" in entrypoint
    assert "--no-new-privs" in entrypoint


def _fake_fleet(tmp_path: Path) -> dict[str, str]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "fleet"
    fake.write_text('#!/bin/sh\necho "ARGS $*"\necho "BROKER $FLEET_BROKER"\n')
    fake.chmod(0o755)
    python = bin_dir / "python3"
    python.symlink_to(sys.executable)
    return {"PATH": f"{bin_dir}:{os.environ['PATH']}", "PYTHONPATH": str(REPO)}


def test_entrypoint_reads_secret_files_and_seeds_the_demo_agent(tmp_path: Path) -> None:
    secret = tmp_path / "n1.url"
    secret.write_text("mqtt://node-1:pw@mosquitto:1883\n")
    state = tmp_path / "state"
    env = {
        **_fake_fleet(tmp_path),
        "FLEET_RUN_AS": "root",
        "FLEET_BROKER_FILE": str(secret),
        "FLEET_STATE_DIR": str(state),
        "DEMO_HW": "rev-a",
    }
    done = subprocess.run(
        ["sh", str(REPO / "deploy" / "docker-entrypoint.sh"), "demo-agent", "-v"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    )
    assert f"ARGS agent --config {state}/agent.toml -v" in done.stdout
    assert "BROKER mqtt://node-1:pw@mosquitto:1883" in done.stdout
    config = load_agent_config({}, {"FLEET_NODE_ID": "node-1"}, (state / "agent.toml").read_text())
    assert config.state_dir == state
    assert config.scripts_dir == state / "scripts"
    demo = config.services["demo-app"]
    assert demo.env["DEMO_HW"] == "rev-a"
    assert Path(demo.command[1]).is_file()
    assert (state / "app" / "version.json").is_file()


def test_systemd_units(tmp_path: Path) -> None:
    hub = (REPO / "deploy" / "fleet-hub.service").read_text()
    agent = (REPO / "deploy" / "fleet-agent.service").read_text()
    for unit in (hub, agent):
        lines = unit.splitlines()
        assert "Restart=on-failure" in lines
        assert "WantedBy=multi-user.target" in lines
    for line in (
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        "DynamicUser=yes",
        "StateDirectory=fleet-hub",
        "LoadCredential=hub.key:/etc/fleet/hub.key",
        "EnvironmentFile=/etc/fleet/hub.env",
    ):
        assert line in hub.splitlines(), line
    for line in (
        "StateDirectory=fleet-agent",
        "EnvironmentFile=/etc/fleet/agent.env",
        "ExecStart=/opt/fleetbus/bin/fleet agent --config /etc/fleet/agent.toml",
    ):
        assert line in agent.splitlines(), line
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        return
    for name, text in (("fleet-hub.service", hub), ("fleet-agent.service", agent)):
        true = shutil.which("true") or "/bin/true"
        (tmp_path / name).write_text(text.replace("/opt/fleetbus/bin/fleet", true))
    done = subprocess.run(
        [analyze, "verify", str(tmp_path / "fleet-hub.service"), str(tmp_path / "fleet-agent.service")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr


def test_setup_sh_is_clean_shell() -> None:
    for script in ("setup.sh", "docker-entrypoint.sh"):
        path = REPO / "deploy" / script
        subprocess.run(["bash", "-n", str(path)], check=True, timeout=30)
        shellcheck = shutil.which("shellcheck")
        if shellcheck is not None:
            done = subprocess.run([shellcheck, str(path)], capture_output=True, text=True, timeout=60)
            assert done.returncode == 0, done.stdout


def test_setup_sh_installs_an_agent_into_a_root(tmp_path: Path) -> None:
    assert run_cli("--out", str(tmp_path / "broker"), "--nodes", "web-7", "--tls") == 0
    keys = tmp_path / "keys"
    assert main(["keys", "generate", "--out", str(keys)]) == 0
    root = tmp_path / "root"
    done = subprocess.run(
        [
            "bash",
            str(REPO / "deploy" / "setup.sh"),
            "--root",
            str(root),
            "--node-id",
            "web-7",
            "--credentials",
            str(tmp_path / "broker" / "credentials" / "web-7.url"),
            "--ca",
            str(tmp_path / "broker" / "tls" / "ca.pem"),
            "--trust",
            str(keys / "hub.pub"),
            "--label",
            "role=web",
            "--label",
            "site=lab 2",
            "--policy",
            str(REPO / "broker_config" / "policy.example.toml"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    etc = root / "etc" / "fleet"
    assert mode(etc / "agent.env") == 0o600
    env_line = (etc / "agent.env").read_text().strip()
    assert env_line.startswith("FLEET_BROKER=mqtts://web-7:")
    url = parse_broker_url(env_line.split("=", 1)[1])
    assert url.ca_file == "/etc/fleet/ca.pem"
    assert url.username == "web-7"
    assert (etc / "ca.pem").read_bytes() == (tmp_path / "broker" / "tls" / "ca.pem").read_bytes()
    environ = {"FLEET_BROKER": env_line.split("=", 1)[1]}
    config = load_agent_config({}, environ, (etc / "agent.toml").read_text())
    assert config.node_id == "web-7"
    assert config.service_manager == "systemd"
    assert config.labels == {"role": "web", "site": "lab 2"}
    assert config.trust == [Path("/etc/fleet/trust/hub.pub")]
    assert config.policy == Path("/etc/fleet/policy.toml")
    assert config.state_dir == Path("/var/lib/fleet-agent")
    unit = root / "etc" / "systemd" / "system" / "fleet-agent.service"
    assert unit.read_text() == (REPO / "deploy" / "fleet-agent.service").read_text()


def test_setup_sh_refuses_credentials_of_another_node(tmp_path: Path) -> None:
    assert run_cli("--out", str(tmp_path / "broker"), "--nodes", "n1") == 0
    done = subprocess.run(
        [
            "bash",
            str(REPO / "deploy" / "setup.sh"),
            "--root",
            str(tmp_path / "root"),
            "--node-id",
            "n2",
            "--credentials",
            str(tmp_path / "broker" / "credentials" / "n1.url"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert "is for node 'n1', not 'n2'" in done.stderr
    assert not (tmp_path / "root" / "etc" / "fleet" / "agent.env").exists()
