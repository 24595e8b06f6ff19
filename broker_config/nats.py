"""``fleet broker-config --kind nats --servers N``: a NATS cluster as the fleet's MQTT broker.

Each server runs NATS's MQTT gateway on JetStream (retained messages, sessions
and QoS 1 deliveries live in streams replicated to ``stream_replicas`` servers,
so a retained command written through one server reaches an agent on another,
and survives the loss of any one server). What lands in the output directory::

    nats-<i>.conf          server i: server_name, client listener, jetstream store_dir,
                           cluster routes to every other server, mqtt listener
    users.conf             users and permissions (included by every server; mode 600:
                           NATS compares plain passwords)
    store/nats-<i>/        JetStream store of server i
    credentials/<c>.url    one line per client: every server's URL, comma-separated,
                           with ``?kind=nats`` (topics without '.', QoS 0 subscriptions)
    fleet-nats.json        the settings (no secrets), so ``--add`` extends the same fleet

Permissions equal the mosquitto ACL of ``broker_config.generate.acl_text``,
written as NATS subjects (an MQTT topic ``a/b`` is the subject ``a.b``, ``+`` is
``*``, ``#`` is ``>``): a node publishes only its own channels and reads only its
own ``cmd``; the hub reads everything under the prefix and is the only writer of
commands, rollouts, replies, its state and events; the TUI reads everything
and writes requests. Every user also reads ``$MQTT.sub.>``, the gateway's
internal delivery subjects of QoS 1 subscriptions (MQTT clients cannot
subscribe to ``$`` topics), and may connect over MQTT only
(``allowed_connection_types``), so no one reads those subjects over plain NATS.
Start each server with ``nats-server -c DIR/nats-<i>.conf``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from broker_config.generate import (
    HUB_USER,
    NODE_PUBLISHES,
    TUI_USER,
    _check_node_name,
    _is_host,
    new_password,
)
from bus.errors import ConfigError, InvalidInput
from bus.files import write_atomic
from bus.messages import MAX_PAYLOAD_BYTES
from bus.mqtt import check_topic_name
from bus.topics import DEFAULT_PREFIX, valid_prefix

__all__ = [
    "NATS_SETTINGS_FILE",
    "NatsConfig",
    "NatsSettings",
    "nats_server_conf_text",
    "nats_urls",
    "nats_users_text",
    "write_nats_config",
]

NATS_SETTINGS_FILE = "fleet-nats.json"
#: Route credentials of the cluster (the servers' own account on the cluster port).
_ROUTE_USER = "route"
_ROUTE_SECRET_FILE = ".route-password"  # noqa: S105 - a file name
_DEFAULT_PORTS = (1883, 4222, 6222)  # MQTT, NATS clients, cluster routes: server i adds i - 1


class NatsSettings(BaseModel):
    """The non-secret settings of a generated NATS cluster (``fleet-nats.json``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    nodes: tuple[str, ...]
    servers: int = Field(ge=1, le=9)
    host: str = "127.0.0.1"
    mqtt_ports: tuple[int, ...]
    client_ports: tuple[int, ...]
    cluster_ports: tuple[int, ...]
    prefix: str = DEFAULT_PREFIX
    cluster_name: str = "fleet"
    #: No users at all: any client may do anything (benchmarks and tests of many simulated nodes).
    anonymous: bool = False

    @field_validator("host")
    @classmethod
    def _valid_host(cls, value: str) -> str:
        if not _is_host(value):
            raise ValueError(f"invalid host {value!r}")
        return value

    @field_validator("prefix")
    @classmethod
    def _valid_prefix(cls, value: str) -> str:
        valid_prefix(value)
        _no_dot("prefix", value)
        return value

    @field_validator("nodes")
    @classmethod
    def _valid_nodes(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for node in value:
            _check_node_name(node)
            _no_dot("node id", node)
        return value

    @model_validator(mode="after")
    def _ports_fit(self) -> NatsSettings:
        """Every server has its three ports; no port is used twice."""
        for name in ("mqtt_ports", "client_ports", "cluster_ports"):
            ports: tuple[int, ...] = getattr(self, name)
            if len(ports) != self.servers:
                raise ValueError(f"{name}: {len(ports)} ports for {self.servers} servers")
            for port in ports:
                if not 0 < port < 65536:
                    raise ValueError(f"{name}: port {port} is out of range")
        every = (*self.mqtt_ports, *self.client_ports, *self.cluster_ports)
        if len(set(every)) != len(every):
            raise ValueError("a port is used twice among the servers' MQTT, client and cluster ports")
        return self

    @property
    def clients(self) -> tuple[str, ...]:
        """Every broker user: the hub, the TUI, then the nodes."""
        return (HUB_USER, TUI_USER, *self.nodes)


def _no_dot(what: str, value: str) -> None:
    try:
        check_topic_name("mqtt://127.0.0.1?kind=nats", what, value)
    except ConfigError as exc:
        raise ValueError(exc.reason) from exc


@dataclass(frozen=True)
class NatsConfig:
    """What ``write_nats_config`` wrote."""

    directory: Path
    settings: NatsSettings
    #: client -> path of its credentials file
    credentials: dict[str, Path]
    #: clients that got new credentials in this run
    created: tuple[str, ...]

    def url(self, client: str) -> str:
        """The broker URL list of one client (blocking: reads its credentials file)."""
        return self.credentials[client].read_text(encoding="utf-8").strip()

    def server_conf(self, index: int) -> Path:
        """The config file of server ``index`` (from 1)."""
        return self.directory / f"nats-{index}.conf"


# --------------------------------------------------------------------- pure parts


def _subject(topic: str) -> str:
    """An MQTT topic filter as the NATS subject its gateway uses."""
    return ".".join("*" if level == "+" else ">" if level == "#" else level for level in topic.split("/"))


def _permissions(client: str, prefix: str) -> tuple[list[str], list[str]]:
    """(publish, subscribe) subjects of one client: the mosquitto ACL in NATS terms."""
    everything = [_subject(prefix), _subject(f"{prefix}/#")]  # MQTT's p/# also matches p itself
    if client == HUB_USER:
        publish = [
            _subject(f"{prefix}/node/+/cmd"),
            _subject(f"{prefix}/rollout/+"),
            _subject(f"{prefix}/rollout/+/record"),
            _subject(f"{prefix}/rollout/+/record/+"),
            _subject(f"{prefix}/rollout/+/nodes"),
            _subject(f"{prefix}/hub/reply/+"),
            _subject(f"{prefix}/hub/state"),
            _subject(f"{prefix}/hub/member/+"),
            _subject(f"{prefix}/events"),
        ]
        subscribe = everything
    elif client == TUI_USER:
        publish = [_subject(f"{prefix}/hub/request")]
        subscribe = everything
    else:
        publish = [_subject(f"{prefix}/node/{client}/{channel}") for channel in NODE_PUBLISHES]
        subscribe = [_subject(f"{prefix}/node/{client}/cmd"), _subject(f"{prefix}/hub/state")]
    return publish, [*subscribe, "$MQTT.sub.>"]


def _quoted(values: Iterable[str]) -> str:
    return ", ".join(json.dumps(value) for value in values)


def nats_users_text(settings: NatsSettings, passwords: dict[str, str]) -> str:
    """users.conf: one user per client, with its permissions, MQTT connections only."""
    lines = [
        "# fleetbus broker users for NATS (included by every nats-<i>.conf).",
        "# Generated by `fleet broker-config --kind nats`; plain passwords: keep this file private.",
        "authorization {",
        "  users: [",
    ]
    for client in settings.clients:
        publish, subscribe = _permissions(client, settings.prefix)
        lines += [
            f"    {{ user: {json.dumps(client)}, password: {json.dumps(passwords[client])},",
            '      allowed_connection_types: ["MQTT"],',
            f"      permissions: {{ publish: [{_quoted(publish)}], subscribe: [{_quoted(subscribe)}] }} }}",
        ]
    lines += ["  ]", "}"]
    return "\n".join(lines) + "\n"


def nats_server_conf_text(settings: NatsSettings, index: int, directory: Path, route_password: str) -> str:
    """nats-<index>.conf: server ``index`` (from 1) of the cluster."""
    i = index - 1
    host = settings.host
    name = f"{settings.cluster_name}-{index}"
    routes = [
        f"nats-route://{_ROUTE_USER}:{quote(route_password, safe='')}@{host}:{port}"
        for j, port in enumerate(settings.cluster_ports)
        if j != i
    ]
    lines = [
        f"# NATS server {index} of {settings.servers} of a fleetbus fleet, generated by",
        "# `fleet broker-config --kind nats`. Start: nats-server -c THIS_FILE",
        f"server_name: {json.dumps(name)}",
        f"listen: {json.dumps(f'{host}:{settings.client_ports[i]}')}",
        f"max_payload: {MAX_PAYLOAD_BYTES + 4096}",
        "",
        "jetstream {",
        f"  store_dir: {json.dumps(str(directory / 'store' / name))}",
        "}",
        "",
        "cluster {",
        f"  name: {json.dumps(settings.cluster_name)}",
        f"  listen: {json.dumps(f'{host}:{settings.cluster_ports[i]}')}",
        f"  authorization {{ user: {_ROUTE_USER}, password: {json.dumps(route_password)} }}",
        f"  routes: [{_quoted(routes)}]",
        "}",
        "",
        "mqtt {",
        f"  listen: {json.dumps(f'{host}:{settings.mqtt_ports[i]}')}",
        # Retained messages, sessions and QoS 1 deliveries on every server of the
        # cluster (up to 3): a retained command outlives the server it was sent to.
        f"  stream_replicas: {min(settings.servers, 3)}",
        "}",
    ]
    if not settings.anonymous:
        lines += ["", 'include "users.conf"']
    return "\n".join(lines) + "\n"


def nats_urls(settings: NatsSettings, client: str, password: str) -> str:
    """Every server's MQTT URL for one client, comma-separated, each with ``?kind=nats``."""
    host = f"[{settings.host}]" if ":" in settings.host else settings.host
    user = "" if settings.anonymous else f"{quote(client, safe='')}:{quote(password, safe='')}@"
    return ",".join(f"mqtt://{user}{host}:{port}?kind=nats" for port in settings.mqtt_ports)


# --------------------------------------------------------------------- writing


def _ports(explicit: Sequence[int] | None, base: int | None, default: int, servers: int) -> tuple[int, ...]:
    if explicit is not None:
        return tuple(explicit)
    first = default if base is None else base
    return tuple(first + i for i in range(servers))


def write_nats_config(
    out: Path,
    nodes: Iterable[str],
    *,
    servers: int = 3,
    host: str | None = None,
    port: int | None = None,
    client_port: int | None = None,
    cluster_port: int | None = None,
    mqtt_ports: Sequence[int] | None = None,
    client_ports: Sequence[int] | None = None,
    cluster_ports: Sequence[int] | None = None,
    prefix: str | None = None,
    anonymous: bool = False,
    add: bool = False,
    force: bool = False,
) -> NatsConfig:
    """Write (or, with ``add``, extend with more nodes) a NATS cluster's config into ``out``.

    Server i listens for MQTT on ``port + i - 1`` (default 1883), for NATS
    clients on ``client_port + i - 1`` (4222) and for routes on
    ``cluster_port + i - 1`` (6222), all on ``host`` (default 127.0.0.1,
    loopback); explicit per-server port lists override the bases. ``anonymous``
    writes no users (anyone may do anything: for tests and benchmarks only). ``add`` keeps
    every existing credential and setting; without ``add`` or ``force`` an
    existing config is refused. Blocking (files); call through asyncio.to_thread.

    Raises:
        InvalidInput: bad settings (a node id or prefix with '.', a port twice ...),
            or an existing config without ``add``/``force``, or ``add`` with other settings.
    """
    settings_path = out / NATS_SETTINGS_FILE
    existing: NatsSettings | None = None
    if settings_path.exists():
        if not (add or force):
            raise InvalidInput(f"{out} already holds a NATS config: pass --add or --force")
        if add:
            try:
                existing = NatsSettings.model_validate_json(settings_path.read_text(encoding="utf-8"))
            except (OSError, ValidationError) as exc:
                raise InvalidInput(f"cannot read {settings_path}: {exc}") from exc
    elif add:
        raise InvalidInput(f"{out} holds no NATS config to add to")
    new_nodes = tuple(dict.fromkeys(nodes))
    try:
        if existing is not None:
            changed = [
                name
                for name, value in (
                    ("servers", servers if servers != 3 else None),
                    ("host", host),
                    ("prefix", prefix),
                )
                if value is not None and value != getattr(existing, name)
            ]
            if changed or any(p is not None for p in (port, client_port, cluster_port)):
                raise InvalidInput(
                    f"--add keeps the existing settings; differing: {', '.join(changed) or 'ports'}"
                )
            settings = existing.model_copy(
                update={"nodes": tuple(dict.fromkeys((*existing.nodes, *new_nodes)))}
            )
            NatsSettings.model_validate(settings.model_dump())
        else:
            settings = NatsSettings(
                nodes=new_nodes,
                servers=servers,
                host=host or "127.0.0.1",
                mqtt_ports=_ports(mqtt_ports, port, _DEFAULT_PORTS[0], servers),
                client_ports=_ports(client_ports, client_port, _DEFAULT_PORTS[1], servers),
                cluster_ports=_ports(cluster_ports, cluster_port, _DEFAULT_PORTS[2], servers),
                prefix=prefix or DEFAULT_PREFIX,
                anonymous=anonymous,
            )
    except ValidationError as exc:
        reasons = "; ".join(str(error["msg"]).removeprefix("Value error, ") for error in exc.errors())
        raise InvalidInput(f"invalid NATS cluster settings: {reasons}") from exc
    if not settings.nodes:
        raise InvalidInput("--nodes names no node (expected n1,n2,...)")
    directory = out.resolve()
    credentials_dir = directory / "credentials"
    credentials_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(credentials_dir, 0o700)
    passwords: dict[str, str] = {}
    created: list[str] = []
    for client in settings.clients:
        path = credentials_dir / f"{client}.url"
        if existing is not None and path.exists() and not settings.anonymous:
            passwords[client] = _password_of(path.read_text(encoding="utf-8"))
        else:
            passwords[client] = new_password()
            created.append(client)
    route_path = directory / _ROUTE_SECRET_FILE
    route_password = (
        route_path.read_text(encoding="utf-8").strip()
        if existing is not None and route_path.exists()
        else new_password()
    )
    write_atomic(route_path, route_password + "\n", 0o600)
    if not settings.anonymous:
        write_atomic(directory / "users.conf", nats_users_text(settings, passwords), 0o600)
    for index in range(1, settings.servers + 1):
        store = directory / "store" / f"{settings.cluster_name}-{index}"
        store.mkdir(parents=True, exist_ok=True, mode=0o700)
        text = nats_server_conf_text(settings, index, directory, route_password)
        write_atomic(directory / f"nats-{index}.conf", text, 0o600)
    credentials: dict[str, Path] = {}
    for client in settings.clients:
        path = credentials_dir / f"{client}.url"
        write_atomic(path, nats_urls(settings, client, passwords[client]) + "\n", 0o600)
        credentials[client] = path
    write_atomic(settings_path, settings.model_dump_json(indent=2) + "\n", 0o644)
    return NatsConfig(directory, settings, credentials, tuple(created))


def _password_of(urls: str) -> str:
    """The password of a credentials file (the same in every URL of its list)."""
    from bus.mqtt import parse_broker_urls

    password = parse_broker_urls(urls.strip())[0].password
    if password is None:
        raise InvalidInput("a credentials file without a password")
    return password
