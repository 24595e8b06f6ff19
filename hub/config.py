"""Configuration of the hub (``HubConfig``) and of the tools that talk to it (``ClientConfig``).

Every value comes, in this order of precedence, from a command-line flag, a
``FLEET_*`` environment variable, the ``[hub]`` (or ``[client]``) table of a
TOML file, or the default. The TOML file is ``--config FILE`` or
``FLEET_CONFIG``; without either, the first of ``./fleet.toml``,
``$XDG_CONFIG_HOME/fleet/fleet.toml`` (``~/.config/...``) and
``/etc/fleet/fleet.toml`` that exists, unless ``FLEET_NO_CONFIG_DISCOVERY`` is
set. Relative paths in a TOML file are relative to that file's directory.

``load_hub_config`` and ``load_client_config`` are pure functions of the
flags, the environment mapping and the TOML text; ``read_hub_config`` and
``read_client_config`` add the file discovery and reading.
"""

from __future__ import annotations

import ipaddress
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, TypeVar

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from bus.config import find_config_file, read_config_text, toml_table
from bus.errors import ConfigError
from bus.mqtt import check_topic_name, valid_broker_url
from bus.topics import DEFAULT_PREFIX, valid_prefix

if sys.version_info >= (3, 11):
    pass
else:  # pragma: no cover - exercised on 3.10 only
    pass  # type: ignore[import-not-found, unused-ignore]

__all__ = [
    "NO_SIGNING_KEY",
    "ClientConfig",
    "HubConfig",
    "config_file",
    "load_client_config",
    "load_hub_config",
    "read_client_config",
    "read_hub_config",
]

#: The one-line error when rollouts are asked of a hub without a signing key.
NO_SIGNING_KEY = "no signing key: run `fleet keys generate --out DIR` and pass --signing-key DIR/hub.key"

_LOOPBACK_NAMES = {"localhost", "localhost.localdomain", "ip6-localhost"}


def split_host_port(value: str) -> tuple[str, int]:
    """``"H:P"`` (or ``"[v6]:P"``) as (host, port); ValueError if it is not one."""
    host, sep, port_text = value.rpartition(":")
    if not sep or not host:
        raise ValueError(f"{value!r} is not HOST:PORT")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    try:
        port = int(port_text)
    except ValueError:
        raise ValueError(f"{value!r} is not HOST:PORT") from None
    if not 0 < port < 65536:
        raise ValueError(f"port {port} is out of range")
    return host, port


def is_loopback(host: str) -> bool:
    """True for 127.0.0.0/8, ::1 and localhost."""
    if host.lower() in _LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


BrokerUrlText = Annotated[str, AfterValidator(valid_broker_url)]
Prefix = Annotated[str, AfterValidator(valid_prefix)]


class HubConfig(BaseModel):
    """Everything ``fleet hub`` needs."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    broker: BrokerUrlText = Field(
        default="mqtt://127.0.0.1:1883",
        description="Broker URL, mqtt://[user:pass@]host:port or mqtts://..., or a list",
    )
    prefix: Prefix = Field(default=DEFAULT_PREFIX, description="Topic prefix shared by the whole fleet.")
    db: Path = Field(default=Path("fleet-hub.json"), description="The hub's TinyDB file.")
    signing_key: Path | None = Field(
        default=None, description="Ed25519 private key (PEM) that signs commands; rollouts need it."
    )
    http: str | None = Field(default=None, description="HOST:PORT of the HTTP bridge; none by default.")
    http_token: str | None = Field(
        default=None, description="Bearer token the HTTP bridge requires (mandatory off loopback)."
    )
    heartbeat_s: float = Field(
        default=5.0, gt=0, le=3600, description="Heartbeat period assumed for nodes that announce none."
    )
    commit_interval_s: float = Field(
        default=0.05, gt=0, le=60, description="How long a database commit waits to group writes."
    )
    keep_rollouts: int = Field(
        default=100,
        ge=1,
        le=1_000_000,
        description="Finished rollouts the hub keeps; older ones are archived beside the database "
        "(DB.archive.jsonl).",
    )
    client_id: str = Field(
        default="fleet-hub", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$", description="MQTT client id."
    )

    @field_validator("http")
    @classmethod
    def _check_http(cls, value: str | None) -> str | None:
        if value is not None:
            split_host_port(value)
        return value

    @field_validator("http_token")
    @classmethod
    def _check_token(cls, value: str | None) -> str | None:
        return value or None

    @model_validator(mode="after")
    def _token_off_loopback(self) -> HubConfig:
        address = self.http_address
        if address is not None and not is_loopback(address[0]) and not self.http_token:
            raise ValueError(
                f"refusing to serve HTTP on non-loopback {self.http} without a token (pass --http-token)"
            )
        return self

    @model_validator(mode="after")
    def _prefix_carried_by_broker(self) -> HubConfig:
        try:
            check_topic_name(self.broker, "prefix", self.prefix)
        except ConfigError as exc:
            raise ValueError(exc.reason) from exc
        return self

    @property
    def http_address(self) -> tuple[str, int] | None:
        """(host, port) of the HTTP bridge, or None."""
        return None if self.http is None else split_host_port(self.http)


class ClientConfig(BaseModel):
    """What ``fleet nodes`` and ``fleet rollout`` need to reach the hub."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    broker: BrokerUrlText = Field(default="mqtt://127.0.0.1:1883", description="Broker URL.")
    prefix: Prefix = Field(default=DEFAULT_PREFIX, description="Topic prefix shared by the whole fleet.")
    request_timeout_s: float = Field(
        default=10.0, gt=0, le=3600, description="How long to wait for the hub's reply."
    )


#: field -> (flag shown in errors, environment variable)
_HUB_SOURCES: dict[str, tuple[str, str]] = {
    "broker": ("--broker", "FLEET_BROKER"),
    "prefix": ("--prefix", "FLEET_PREFIX"),
    "db": ("--db", "FLEET_DB"),
    "signing_key": ("--signing-key", "FLEET_SIGNING_KEY"),
    "http": ("--http", "FLEET_HTTP"),
    "http_token": ("--http-token", "FLEET_HTTP_TOKEN"),
    "heartbeat_s": ("--heartbeat-s", "FLEET_HEARTBEAT_S"),
    "commit_interval_s": ("--commit-interval-s", "FLEET_COMMIT_INTERVAL_S"),
    "keep_rollouts": ("--keep-rollouts", "FLEET_KEEP_ROLLOUTS"),
    "client_id": ("--client-id", "FLEET_HUB_CLIENT_ID"),
}
_CLIENT_SOURCES: dict[str, tuple[str, str]] = {
    "broker": ("--broker", "FLEET_BROKER"),
    "prefix": ("--prefix", "FLEET_PREFIX"),
    "request_timeout_s": ("--request-timeout", "FLEET_REQUEST_TIMEOUT"),
}
_PATH_FIELDS = {"db", "signing_key"}

C = TypeVar("C", bound=BaseModel)


def _load(
    model: type[C],
    table_name: str,
    sources: Mapping[str, tuple[str, str]],
    flags: Mapping[str, Any],
    environ: Mapping[str, str],
    toml_text: str | None,
    toml_path: Path | None,
) -> C:
    values: dict[str, Any] = {}
    origin: dict[str, str] = {}
    where = str(toml_path) if toml_path is not None else "config"
    if toml_text is not None:
        for key, value in toml_table(toml_text, table_name, where).items():
            if key not in sources:
                raise ConfigError(f"{where}: unknown key {key!r} in [{table_name}]")
            if key in _PATH_FIELDS and isinstance(value, str) and toml_path is not None:
                value = str(toml_path.parent / Path(value).expanduser())
            values[key] = value
            origin[key] = f"{where} [{table_name}] {key}"
    for key, (_flag, env) in sources.items():
        text = environ.get(env)
        if text is not None and text != "":
            values[key] = text
            origin[key] = env
    for key, (flag, _env) in sources.items():
        value = flags.get(key)
        if value is not None:
            values[key] = value
            origin[key] = flag
    try:
        return model.model_validate(values)
    except ValidationError as exc:
        raise ConfigError(f"invalid {table_name} config: {_explain(exc, origin)}") from exc


def _explain(exc: ValidationError, origin: Mapping[str, str]) -> str:
    """One line naming each bad field and where its value came from."""
    parts = []
    for error in exc.errors()[:3]:
        field = str(error["loc"][0]) if error["loc"] else ""
        message = error["msg"].removeprefix("Value error, ")
        if not field:
            parts.append(message)
        elif field in origin:
            parts.append(f"{field} (from {origin[field]}): {message}")
        else:
            parts.append(f"{field}: {message}")
    return "; ".join(parts)


def load_hub_config(
    flags: Mapping[str, Any],
    environ: Mapping[str, str],
    toml_text: str | None = None,
    *,
    toml_path: Path | None = None,
) -> HubConfig:
    """Build the hub's config from flags, environment and TOML text (pure).

    Args:
        flags: field name -> flag value; None means "not given".
        environ: the environment (``FLEET_*`` variables are read).
        toml_text: the config file's text, if any (its ``[hub]`` table is read).
        toml_path: where ``toml_text`` came from (errors name it; relative paths start there).

    Raises:
        ConfigError: a value is invalid; the message names the field and its source.
    """
    return _load(HubConfig, "hub", _HUB_SOURCES, flags, environ, toml_text, toml_path)


def load_client_config(
    flags: Mapping[str, Any],
    environ: Mapping[str, str],
    toml_text: str | None = None,
    *,
    toml_path: Path | None = None,
) -> ClientConfig:
    """Build a tool's config (the ``[client]`` table) like ``load_hub_config`` (pure)."""
    return _load(ClientConfig, "client", _CLIENT_SOURCES, flags, environ, toml_text, toml_path)


def config_file(flag: Path | str | None, environ: Mapping[str, str], *, cwd: Path, home: Path) -> Path | None:
    """Which TOML file to read (``bus.config.find_config_file``)."""
    return find_config_file(flag, environ, cwd=cwd, home=home)


def _read(flag: Path | str | None, environ: Mapping[str, str]) -> tuple[str | None, Path | None]:
    path = find_config_file(flag, environ, cwd=Path.cwd(), home=Path.home())
    if path is None:
        return None, None
    return read_config_text(path), path


def read_hub_config(
    flags: Mapping[str, Any], environ: Mapping[str, str], config: Path | str | None = None
) -> HubConfig:
    """``load_hub_config`` with the config file found and read (``config`` is ``--config``)."""
    text, path = _read(config, environ)
    return load_hub_config(flags, environ, text, toml_path=path)


def read_client_config(
    flags: Mapping[str, Any], environ: Mapping[str, str], config: Path | str | None = None
) -> ClientConfig:
    """``load_client_config`` with the config file found and read (``config`` is ``--config``)."""
    text, path = _read(config, environ)
    return load_client_config(flags, environ, text, toml_path=path)
