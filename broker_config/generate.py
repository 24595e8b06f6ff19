"""``fleet broker-config``: a locked-down broker for one fleet (DESIGN sections 4 and 7).

Pure functions build each file's text; ``write_broker_config`` is the one side
effect and writes them all, each atomically (temp file, fsync, rename), secrets
with mode 600. What lands in the output directory::

    mosquitto.conf          mosquitto 2.x: listener, password_file, acl_file, transport, persistence
    passwords               mosquitto_passwd format ($7$ PBKDF2-SHA512); read by both brokers
    acl                     mosquitto acl_file; the embedded broker reads the same file
    amqtt.yaml              the embedded broker (FleetBroker) with broker_config.amqtt_acl
    credentials/<c>.url     one line per client (hub, tui, every node): mqtt://user:pass@host:port
    tls/                    with --tls: ca.pem, ca.key, server.pem, server.key (keys mode 600)
    data/                   mosquitto's persistence location
    fleet-broker.json       the settings (no secrets), so ``--add`` extends the same fleet

Who may do what (the ``acl`` file, for both brokers): a node (user = node id)
publishes only its own ``state``, ``heartbeat``, ``status``, ``job`` and ``log``
and reads only its own ``cmd``; only the hub writes ``cmd``, ``rollout/``,
``hub/reply/``, ``hub/state`` and ``events``; the TUI and other tools publish
``hub/request`` and read everything under the prefix; anonymous clients are
refused.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import ipaddress
import json
import logging
import os
import re
import secrets
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from urllib.parse import quote

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from bus.errors import ConfigError, InvalidInput
from bus.files import fsync_dir, write_atomic
from bus.messages import MAX_PACKET_BYTES
from bus.topics import DEFAULT_PREFIX, NODE_CHANNELS, Topics, check_node_id, valid_prefix

__all__ = [
    "HUB_USER",
    "MOSQUITTO_DEFAULT_USER",
    "RESERVED_NAMES",
    "SETTINGS_FILE",
    "TUI_USER",
    "BrokerSettings",
    "GeneratedConfig",
    "acl_text",
    "amqtt_yaml_text",
    "broker_owned",
    "credential_url",
    "hand_to_broker_user",
    "hash_password",
    "mosquitto_conf_text",
    "new_password",
    "parse_nodes",
    "parse_password_file",
    "password_file_text",
    "verify_password",
    "write_broker_config",
]

_LOGGER = logging.getLogger(__name__)

#: Broker user of the hub; also the name of its credentials file.
HUB_USER = "hub"
#: Broker user of the TUI and other tools (``fleet rollout``, ``fleet nodes``, scripts).
TUI_USER = "tui"
#: Names no node may take: they would share the hub's or the TUI's credentials file.
RESERVED_NAMES = frozenset({HUB_USER, TUI_USER})
#: Settings of the generated fleet (no secrets), read back by ``--add``.
SETTINGS_FILE = "fleet-broker.json"

#: mosquitto_passwd 2.0's iteration count. The passwords are random (>= 192 bits),
#: so more iterations would slow every CONNECT of a reconnect storm and buy nothing.
PBKDF2_ITERATIONS = 101
_SALT_BYTES = 12  # what mosquitto_passwd uses
_HASH_BYTES = 64  # SHA-512

#: Per-client queue of QoS 1 messages the broker holds for a subscriber that falls
#: behind (the hub during a 1000-node rollout). mosquitto's default of 1000 silently
#: dropped 27% of QoS 1 messages in FINDINGS.md; 100,000 messages of a few hundred
#: bytes bound one slow client to a few tens of MiB.
MAX_QUEUED_MESSAGES = 100_000
#: QoS 1 messages in flight from the broker to one client (mosquitto's default is 20):
#: enough to keep the hub's connection busy over a LAN; matches bus.mqtt's window.
MAX_INFLIGHT_MESSAGES = 1000
#: Largest MQTT packet the broker accepts (the same bound as the embedded broker's).
MAX_PACKET_SIZE = MAX_PACKET_BYTES
#: Seconds between persistence saves (mosquitto also saves on a clean shutdown).
AUTOSAVE_INTERVAL_S = 10

#: Channels a node publishes on its own topics (everything but ``cmd``).
NODE_PUBLISHES = tuple(channel for channel in NODE_CHANNELS if channel != "cmd")

_LABEL = r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_HOSTNAME = re.compile(rf"{_LABEL}(\.{_LABEL})*")
_USER = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


class BrokerSettings(BaseModel):
    """What ``fleet broker-config`` was asked for (stored in ``fleet-broker.json``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    nodes: tuple[str, ...] = Field(default=(), description="node ids, each its own broker user")
    host: str = Field(default="127.0.0.1", description="name or address clients connect to")
    port: int = Field(default=1883, ge=1, le=65535, description="listener port")
    bind: str | None = Field(
        default=None, description="listener address (default: host); 0.0.0.0 in a container"
    )
    tls: bool = Field(default=False, description="TLS listener; URLs become mqtts:// with ?ca=")
    prefix: str = Field(default=DEFAULT_PREFIX, description="topic prefix of the fleet")
    broker_dir: str | None = Field(
        default=None,
        description="the output directory as the broker sees it (a container mount); default: its path",
    )
    broker_user: str | None = Field(
        default=None, description="mosquitto's `user` option: the account it runs as once started"
    )
    tools: tuple[str, ...] = Field(
        default=(),
        description="more users with the TUI's rights: on mosquitto each client's id is its user "
        "name, so tools running at once need one each",
    )
    hub_port: int | None = Field(
        default=None,
        ge=1,
        le=65535,
        description="a listener of the hubs' own, for standby hubs (DESIGN 3.9): there client ids "
        "are not replaced by user names, so several hubs share the user hub, each with its own "
        "--client-id, and their active connections one id; on mosquitto only the hub's password is "
        "valid there",
    )

    @model_validator(mode="after")
    def _hub_port_is_its_own(self) -> BrokerSettings:
        if self.hub_port is not None and self.hub_port == self.port:
            raise ValueError(f"the hub port must differ from the listener port ({self.port})")
        return self

    @field_validator("nodes")
    @classmethod
    def _valid_nodes(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for node in value:
            _check_node_name(node)
        if len(set(value)) != len(value):
            raise ValueError("node ids must be unique")
        return value

    @field_validator("tools")
    @classmethod
    def _valid_tools(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for tool in value:
            _check_node_name(tool)
        if len(set(value)) != len(value):
            raise ValueError("tool names must be unique")
        return value

    @model_validator(mode="after")
    def _tools_are_not_nodes(self) -> BrokerSettings:
        both = sorted(set(self.tools) & set(self.nodes))
        if both:
            raise ValueError(f"{', '.join(both)}: a name is a node or a tool, not both")
        return self

    @field_validator("host", "bind")
    @classmethod
    def _valid_host(cls, value: str | None) -> str | None:
        if value is not None and not _is_host(value):
            raise ValueError(f"not a host name or IP address: {value[:80]!r}")
        return value

    @field_validator("prefix")
    @classmethod
    def _valid_prefix(cls, value: str) -> str:
        return valid_prefix(value)

    @field_validator("broker_dir")
    @classmethod
    def _valid_broker_dir(cls, value: str | None) -> str | None:
        if value is not None and (not value.startswith("/") or any(c.isspace() for c in value)):
            raise ValueError("must be an absolute path without spaces")
        return value

    @field_validator("broker_user")
    @classmethod
    def _valid_broker_user(cls, value: str | None) -> str | None:
        if value is not None and not _USER.fullmatch(value):
            raise ValueError(f"not a user name: {value[:80]!r}")
        return value

    @property
    def clients(self) -> tuple[str, ...]:
        """Every broker user: the hub, the TUI, the other tools, then the nodes."""
        return (HUB_USER, TUI_USER, *self.tools, *self.nodes)


@dataclass(frozen=True)
class GeneratedConfig:
    """What ``write_broker_config`` wrote."""

    directory: Path
    settings: BrokerSettings
    #: client -> path of its credentials file (every client of the fleet)
    credentials: dict[str, Path]
    #: clients that got new credentials in this run (the rest kept theirs)
    created: tuple[str, ...]

    def url(self, client: str) -> str:
        """The broker URL of one client (blocking: reads its credentials file)."""
        return self.credentials[client].read_text(encoding="utf-8").strip()


# --------------------------------------------------------------------- pure parts


def _is_host(value: str) -> bool:
    try:
        ipaddress.ip_address(value)
    except ValueError:
        return len(value) <= 253 and _HOSTNAME.fullmatch(value) is not None
    return True


def _check_node_name(node: str) -> str:
    check_node_id(node)
    if node in RESERVED_NAMES:
        raise InvalidInput(f"node id {node!r} is reserved: it names the {node} client's broker credentials")
    return node


def parse_nodes(text: str) -> tuple[str, ...]:
    """``n1,n2,...`` -> node ids, validated, duplicates dropped, order kept.

    Raises:
        InvalidNodeId: one of them is not a valid node id.
        InvalidInput: one is reserved (``hub``, ``tui``) or the list is empty.
    """
    nodes: list[str] = []
    for part in text.split(","):
        node = part.strip()
        if node and _check_node_name(node) not in nodes:
            nodes.append(node)
    if not nodes:
        raise InvalidInput("--nodes names no node (expected n1,n2,...)")
    return tuple(nodes)


def new_password() -> str:
    """A random URL-safe password: 32 characters, 192 bits."""
    return secrets.token_urlsafe(24)


def hash_password(password: str, *, salt: bytes | None = None, iterations: int = PBKDF2_ITERATIONS) -> str:
    """mosquitto_passwd's hash: ``$7$<iterations>$<b64 salt>$<b64 PBKDF2-SHA512>``."""
    salt = secrets.token_bytes(_SALT_BYTES) if salt is None else salt
    digest = hashlib.pbkdf2_hmac("sha512", password.encode("utf-8"), salt, iterations, _HASH_BYTES)
    return f"$7${iterations}${base64.b64encode(salt).decode()}${base64.b64encode(digest).decode()}"


def verify_password(password: str, encoded: str) -> bool:
    """Check a password against a mosquitto hash (``$7$`` PBKDF2-SHA512 or legacy ``$6$``)."""
    parts = encoded.split("$")
    try:
        if len(parts) == 5 and parts[1] == "7":
            iterations = int(parts[2])
            salt, expected = base64.b64decode(parts[3], validate=True), base64.b64decode(parts[4])
            if not 1 <= iterations <= 10_000_000:
                return False
            digest = hashlib.pbkdf2_hmac("sha512", password.encode("utf-8"), salt, iterations, len(expected))
        elif len(parts) == 4 and parts[1] == "6":
            salt, expected = base64.b64decode(parts[2], validate=True), base64.b64decode(parts[3])
            digest = hashlib.sha512(password.encode("utf-8") + salt).digest()
        else:
            return False
    except ValueError:  # binascii.Error is one
        return False
    return hmac.compare_digest(digest, expected)


def parse_password_file(text: str) -> dict[str, str]:
    """``user:hash`` lines -> {user: hash}; blank lines and ``#`` comments skipped.

    Raises:
        ConfigError: a line is not ``user:hash``.
    """
    users: dict[str, str] = {}
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        user, sep, encoded = line.partition(":")
        if not sep or not user or not encoded:
            raise ConfigError(f"password file line {number} is not user:hash")
        users[user] = encoded
    return users


def password_file_text(hashes: Mapping[str, str]) -> str:
    """The password file: one ``user:hash`` line per user, in the given order."""
    return "".join(f"{user}:{encoded}\n" for user, encoded in hashes.items())


def acl_text(prefix: str = DEFAULT_PREFIX, tools: Iterable[str] = ()) -> str:
    """The mosquitto ACL of DESIGN section 7 (also read by the embedded broker).

    ``tools`` are more users with the TUI's rights.
    """
    Topics(prefix)  # validates
    lines = [
        "# fleetbus broker ACL (mosquitto acl_file; the embedded broker reads it too).",
        "# Generated by `fleet broker-config`. Anonymous clients get no rule at all",
        "# (and allow_anonymous is false). Unlisted access is refused.",
        "",
        "# Every node: its user name is its node id (%u). It publishes only its own",
        "# channels and reads only its own commands; nothing else.",
    ]
    lines += [f"pattern write {prefix}/node/%u/{channel}" for channel in NODE_PUBLISHES]
    lines += [
        f"pattern read {prefix}/node/%u/cmd",
        "# ... and the active hub's signed state: its term fences off a replaced hub (DESIGN 3.9).",
        f"pattern read {prefix}/hub/state",
        "",
        "# The hub: reads everything; the only writer of commands, rollouts, replies and events.",
        f"user {HUB_USER}",
        f"topic read {prefix}/#",
        f"topic write {prefix}/node/+/cmd",
        f"topic write {prefix}/rollout/+",
        f"topic write {prefix}/rollout/+/record",
        f"topic write {prefix}/rollout/+/record/+",
        f"topic write {prefix}/rollout/+/nodes",
        f"topic write {prefix}/hub/reply/+",
        f"topic write {prefix}/hub/state",
        f"topic write {prefix}/hub/member/+",
        f"topic write {prefix}/events",
        "",
        "# The TUI and other tools: read everything, send requests to the hub.",
    ]
    for user in (TUI_USER, *tools):
        lines += [f"user {user}", f"topic read {prefix}/#", f"topic write {prefix}/hub/request"]
    return "\n".join(lines) + "\n"


def _listen_address(settings: BrokerSettings) -> str:
    return settings.bind or settings.host


def _tls_lines(settings: BrokerSettings, broker_dir: PurePosixPath) -> list[str]:
    if not settings.tls:
        return []
    return [
        f"cafile {broker_dir / 'tls' / 'ca.pem'}",
        f"certfile {broker_dir / 'tls' / 'server.pem'}",
        f"keyfile {broker_dir / 'tls' / 'server.key'}",
        "tls_version tlsv1.2",
    ]


def mosquitto_conf_text(settings: BrokerSettings, broker_dir: PurePosixPath) -> str:
    """mosquitto.conf for this fleet; file paths are under ``broker_dir``."""
    nodes = ", ".join(settings.nodes) or "(none)"
    per_listener = settings.hub_port is not None
    auth = [
        "allow_anonymous false",
        f"password_file {broker_dir / 'passwords'}",
        f"acl_file {broker_dir / 'acl'}",
    ]
    lines = [
        "# mosquitto.conf for a fleetbus fleet, generated by `fleet broker-config`.",
        "# broker_config/mosquitto.conf.example explains every line.",
        f"# Clients: {HUB_USER}, {TUI_USER}, nodes: {nodes}.",
        "# After `fleet broker-config --add`, `kill -HUP <pid>` reloads passwords and ACL.",
        "",
        f"per_listener_settings {'true' if per_listener else 'false'}",
        *([] if per_listener else auth),
    ]
    if settings.broker_user is not None:
        lines.append(f"user {settings.broker_user}")
    lines += [
        "",
        f"listener {settings.port} {_listen_address(settings)}",
        *(auth if per_listener else []),
        "# Each client's id is its user name: no credential can take over another client's",
        "# connection (a node's password connecting as the hub or as another node).",
        "use_username_as_clientid true",
        *_tls_lines(settings, broker_dir),
    ]
    if settings.hub_port is not None:
        lines += [
            "",
            "# The hubs' own listener (standby hubs, DESIGN 3.9): only the hub's password is",
            "# valid here, and client ids are kept, so several hubs share the user hub, each",
            "# with its own id, while their active connections share one (one at a time).",
            f"listener {settings.hub_port} {_listen_address(settings)}",
            "allow_anonymous false",
            f"password_file {broker_dir / 'hub-passwords'}",
            f"acl_file {broker_dir / 'acl'}",
            *_tls_lines(settings, broker_dir),
        ]
    lines += [
        "",
        "# Transport (DESIGN 3.8, FINDINGS.md): no Nagle stalls on QoS 1 round trips;",
        "# deliberate queue limits, since the default of 1000 silently dropped QoS 1 messages.",
        "set_tcp_nodelay true",
        f"max_inflight_messages {MAX_INFLIGHT_MESSAGES}",
        f"max_queued_messages {MAX_QUEUED_MESSAGES}",
        "max_queued_bytes 0",
        f"max_packet_size {MAX_PACKET_SIZE}",
        "",
        "# Persistence (DESIGN 3.6): retained commands, job snapshots and queued QoS 1",
        "# messages survive a broker restart.",
        "persistence true",
        f"persistence_location {broker_dir / 'data'}/",
        f"autosave_interval {AUTOSAVE_INTERVAL_S}",
        "persistent_client_expiration 14d",
        "",
        "connection_messages true",
        "log_type error",
        "log_type warning",
        "log_type notice",
    ]
    return "\n".join(lines) + "\n"


def amqtt_yaml_text(settings: BrokerSettings, broker_dir: PurePosixPath) -> str:
    """The embedded broker's config: the same passwords and ACL through FleetAclPlugin."""

    def scalar(value: str) -> str:
        return json.dumps(value)  # a JSON string is a valid YAML scalar

    tls = (
        [
            "    ssl: true",
            f"    certfile: {scalar(str(broker_dir / 'tls' / 'server.pem'))}",
            f"    keyfile: {scalar(str(broker_dir / 'tls' / 'server.key'))}",
        ]
        if settings.tls
        else []
    )

    lines = [
        "# Embedded amqtt broker (fleet broker --config THIS) for a fleetbus fleet,",
        "# generated by `fleet broker-config`: the same passwords and ACL as mosquitto.conf.",
        "listeners:",
        "  default:",
        "    type: tcp",
        f"    bind: {scalar(f'{_listen_address(settings)}:{settings.port}')}",
        "    max_connections: 5000",
        *tls,
    ]
    if settings.hub_port is not None:  # ids stay their users' own (user~id) on both listeners
        lines += [
            "  hubs:",
            "    type: tcp",
            f"    bind: {scalar(f'{_listen_address(settings)}:{settings.hub_port}')}",
            "    max_connections: 64",
            *tls,
        ]
    lines += [
        "plugins:",
        "  # passwords in mosquitto's format, the mosquitto ACL file; refuses anonymous",
        "  # clients and last wills on topics the client may not publish to.",
        "  broker_config.amqtt_acl.FleetAclPlugin:",
        f"    password_file: {scalar(str(broker_dir / 'passwords'))}",
        f"    acl_file: {scalar(str(broker_dir / 'acl'))}",
    ]
    return "\n".join(lines) + "\n"


def credential_url(client: str, password: str, settings: BrokerSettings, ca_path: str | None = None) -> str:
    """``mqtt://user:password@host:port`` (``mqtts://...?ca=PATH`` with TLS)."""
    host = f"[{settings.host}]" if ":" in settings.host else settings.host
    scheme = "mqtts" if settings.tls else "mqtt"
    port = settings.hub_port if client == HUB_USER and settings.hub_port is not None else settings.port
    url = f"{scheme}://{quote(client, safe='')}:{quote(password, safe='')}@{host}:{port}"
    if settings.tls and ca_path is not None:
        url += f"?ca={quote(ca_path, safe='/')}"
    return url


# --------------------------------------------------------------------- writing


def _make_dir(path: Path, mode: int) -> None:
    path.mkdir(parents=True, exist_ok=True)
    path.chmod(mode)


#: The account mosquitto switches to when started as root without a ``user`` option.
MOSQUITTO_DEFAULT_USER = "mosquitto"


def broker_owned(config: GeneratedConfig) -> list[Path]:
    """What mosquitto must own: the files it reads that are private, and its data dir."""
    out = config.directory
    paths = [out / "passwords", out / "data"]
    if config.settings.hub_port is not None:
        paths.append(out / "hub-passwords")
    if config.settings.tls:
        paths.append(out / "tls" / "server.key")
    return paths


def hand_to_broker_user(config: GeneratedConfig, user: str = MOSQUITTO_DEFAULT_USER) -> str | None:
    """Make the broker's private files readable by ``user`` (chown); None when done.

    For a config generated as root without ``--broker-user``: mosquitto started as
    root drops to ``mosquitto`` before it reads the mode-600 password file, so it
    would refuse to start. Blocking. Returns what to do by hand when ``user`` does
    not exist (or the chown is refused).
    """
    import pwd

    paths = broker_owned(config)
    shown = " ".join(str(p) for p in paths)
    try:
        account = pwd.getpwnam(user)
    except KeyError:
        return (
            f"mosquitto started as root runs as the user {user!r}, which does not exist here: "
            f"create it and run `chown {user}: {shown}`, or run this again with --broker-user ACCOUNT"
        )
    try:
        for path in paths:
            os.chown(path, account.pw_uid, account.pw_gid)
    except OSError as exc:
        return f"cannot hand the broker's files to {user!r} ({exc}): run `chown {user}: {shown}`"
    for parent in (config.directory, *config.directory.parents):
        info = parent.stat()
        if info.st_uid == account.pw_uid or info.st_mode & 0o001:
            continue
        if info.st_gid == account.pw_gid and info.st_mode & 0o010:
            continue
        return (
            f"{user!r} cannot reach {config.directory}: {parent} is mode {info.st_mode & 0o777:o}; "
            "write the config where it can (e.g. /etc/fleet/broker) or run `chmod o+x` on that directory"
        )
    return None


def _read_settings(out: Path) -> BrokerSettings | None:
    path = out / SETTINGS_FILE
    if not path.exists():
        return None
    try:
        return BrokerSettings.model_validate_json(path.read_text(encoding="utf-8"))
    except (OSError, ValidationError) as exc:
        raise ConfigError(f"cannot read {path}: {exc}") from exc


def _merge(
    existing: BrokerSettings, requested: Mapping[str, object], nodes: Iterable[str], tools: Iterable[str] = ()
) -> BrokerSettings:
    for name, value in requested.items():
        if value is not None and getattr(existing, name) != value:
            shown = getattr(existing, name)
            raise InvalidInput(
                f"--{name.replace('_', '-')} {value} differs from the existing config's ({shown}); "
                "--add keeps the fleet's settings (use --force to start over)"
            )
    merged = list(existing.nodes)
    merged += [node for node in nodes if node not in merged]
    kept = list(existing.tools)
    kept += [tool for tool in tools if tool not in kept]
    try:
        return BrokerSettings.model_validate(
            {**existing.model_dump(), "nodes": tuple(merged), "tools": tuple(kept)}
        )
    except ValidationError as exc:
        from bus.messages import describe

        raise InvalidInput(f"invalid broker config: {describe(exc)}") from exc


def write_broker_config(
    out: Path,
    nodes: Iterable[str],
    *,
    host: str | None = None,
    port: int | None = None,
    bind: str | None = None,
    tls: bool | None = None,
    prefix: str | None = None,
    broker_dir: str | None = None,
    broker_user: str | None = None,
    tools: Iterable[str] = (),
    hub_port: int | None = None,
    add: bool = False,
    force: bool = False,
) -> GeneratedConfig:
    """Write (or, with ``add``, extend) the broker config of a fleet into ``out``.

    Options left ``None`` take their defaults (port 1883, or 8883 with TLS), or
    with ``add`` the existing config's values; an option that contradicts the
    existing config is refused. ``add`` never changes existing credentials.

    Blocking (files, key generation); call through asyncio.to_thread from async code.

    Raises:
        InvalidNodeId: a node id is not a valid one.
        InvalidInput: a reserved node id, a bad option, ``add`` without an existing
            config, or an existing config without ``add`` or ``force``.
        ConfigError: the existing config cannot be read.
    """
    out = out.absolute()
    node_list = tuple(nodes)
    tool_list = tuple(dict.fromkeys(tools))
    for name in (*node_list, *tool_list):
        _check_node_name(name)
    requested: dict[str, object] = {
        "host": host,
        "port": port,
        "bind": bind,
        "tls": tls,
        "prefix": prefix,
        "broker_dir": broker_dir,
        "broker_user": broker_user,
        "hub_port": hub_port,
    }
    existing = _read_settings(out)
    if add:
        if existing is None:
            raise InvalidInput(f"{out} holds no broker config to add to (run without --add first)")
        settings = _merge(existing, requested, node_list, tool_list)
    else:
        if not force and (existing is not None or (out / "passwords").exists()):
            raise InvalidInput(
                f"{out} already holds a broker config: pass --add to add nodes "
                "(credentials kept) or --force to replace every credential"
            )
        values = {k: v for k, v in requested.items() if v is not None}
        values.setdefault("port", 8883 if tls else 1883)
        try:
            settings = BrokerSettings(nodes=tuple(dict.fromkeys(node_list)), tools=tool_list, **values)
        except ValidationError as exc:
            from bus.messages import describe

            raise InvalidInput(f"invalid broker config: {describe(exc)}") from exc
    return _write(out, settings, keep_existing=add)


def _write(out: Path, settings: BrokerSettings, *, keep_existing: bool) -> GeneratedConfig:
    from broker_config import tls as tls_files

    seen = PurePosixPath(settings.broker_dir) if settings.broker_dir else PurePosixPath(out.as_posix())
    _make_dir(out, 0o755)
    credentials_dir = out / "credentials"
    _make_dir(credentials_dir, 0o700)
    _make_dir(out / "data", 0o700)

    ca_path: str | None = None
    if settings.tls:
        tls_dir = out / "tls"
        _make_dir(tls_dir, 0o755)
        tls_files.ensure_tls(tls_dir, settings.host, reuse=keep_existing, write=write_atomic)
        ca_path = str(seen / "tls" / "ca.pem")

    hashes: dict[str, str] = {}
    if keep_existing and (out / "passwords").exists():
        hashes = parse_password_file((out / "passwords").read_text(encoding="utf-8"))
    created: list[str] = []
    credentials: dict[str, Path] = {}
    for client in settings.clients:
        path = credentials_dir / f"{client}.url"
        credentials[client] = path
        if client in hashes:
            if not path.exists():
                _LOGGER.warning("%s keeps its password, but %s is missing", client, path)
            continue
        password = new_password()
        hashes[client] = hash_password(password)
        write_atomic(path, credential_url(client, password, settings, ca_path) + "\n", 0o600)
        created.append(client)
    if not keep_existing:
        for stale in credentials_dir.glob("*.url"):
            if stale.stem not in credentials:
                stale.unlink()

    write_atomic(out / "passwords", password_file_text(hashes), 0o600)
    hub_passwords = out / "hub-passwords"
    if settings.hub_port is not None:
        write_atomic(hub_passwords, password_file_text({HUB_USER: hashes[HUB_USER]}), 0o600)
    elif hub_passwords.exists():
        hub_passwords.unlink()
    write_atomic(out / "acl", acl_text(settings.prefix, settings.tools), 0o644)
    write_atomic(out / "mosquitto.conf", mosquitto_conf_text(settings, seen), 0o644)
    write_atomic(out / "amqtt.yaml", amqtt_yaml_text(settings, seen), 0o644)
    write_atomic(out / SETTINGS_FILE, settings.model_dump_json(indent=2) + "\n", 0o644)
    fsync_dir(credentials_dir)  # the stale credentials removed above
    return GeneratedConfig(out, settings, credentials, tuple(created))
