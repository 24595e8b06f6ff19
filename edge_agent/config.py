"""``AgentConfig``: one frozen model per agent process, from flags, environment and TOML.

Precedence (DESIGN section 4): command-line flags > ``FLEET_*`` environment
variables > the ``[agent]`` table of the TOML config file > defaults. The TOML
file is named by ``--config`` or ``FLEET_CONFIG``; without either, ``./fleet.toml``
is used when it exists, unless ``FLEET_NO_CONFIG_DISCOVERY`` is set.

``load_agent_config`` is pure (flags, an environ mapping and TOML text in, a
config out); ``read_agent_config`` adds the one side effect, reading the file.

Environment variables: ``FLEET_`` + the field name in capitals (``FLEET_NODE_ID``,
``FLEET_HEARTBEAT_S``, ...). List fields take comma-separated values
(``FLEET_LABELS=site=lab,role=edge``; ``FLEET_LABEL``, ``FLEET_PACKAGE`` and
``FLEET_DRIVER`` are accepted too, like the singular flags); ``FLEET_SERVICES``
takes a JSON object. ``rpm_root`` and ``dnf_config`` (``FLEET_RPM_ROOT``,
``FLEET_DNF_CONFIG``) have no flag: TOML or environment.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from bus import config as bus_config
from bus.errors import ConfigError, FleetError
from bus.messages import Label, LabelValue, describe
from bus.topics import DEFAULT_PREFIX, Topics, check_node_id, valid_prefix
from edge_agent.settings import ExecutorSettings, Policy, ProcessService, ServiceManager
from edge_agent.tools import SystemTools

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib  # type: ignore[import-not-found,unused-ignore]

__all__ = [
    "CONFIG_FILE_NAME",
    "DEFAULT_BROKER",
    "AgentConfig",
    "default_scripts_dir",
    "find_config_file",
    "load_agent_config",
    "load_policy",
    "read_agent_config",
]

_LOGGER = logging.getLogger(__name__)

DEFAULT_BROKER = "mqtt://127.0.0.1:1883"
CONFIG_FILE_NAME = bus_config.CONFIG_FILE_NAME

#: Fields whose values are lists, given comma-separated in the environment.
_LIST_FIELDS = ("trust", "labels", "packages", "drivers")
#: Path fields that a TOML file gives relative to its own directory.
_PATH_FIELDS = ("state_dir", "scripts_dir", "policy", "rpm_root", "dnf_config")
#: Extra environment names accepted for a field (the singular of a repeatable flag).
_ENV_ALIASES = {"labels": "FLEET_LABEL", "packages": "FLEET_PACKAGE", "drivers": "FLEET_DRIVER"}


def default_scripts_dir(state_dir: Path) -> Path:
    """``STATE_DIR-scripts``: beside the state dir, since steps may write inside it (issue 16)."""
    state_dir = Path(os.path.normpath(state_dir))  # "x/.." is "."
    if not state_dir.name:  # "." or "/": name the directory it stands for
        state_dir = state_dir.absolute()
    if not state_dir.name:
        return Path("/fleet-scripts")
    return state_dir.with_name(f"{state_dir.name}-scripts")


class AgentConfig(BaseModel):
    """Everything one edge agent process needs to know about itself."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    broker: str = Field(
        default=DEFAULT_BROKER,
        description="Broker URL: mqtt://[user:pass@]host:port or mqtts://..., or a comma-separated list.",
    )
    node_id: str = Field(description="This node's id: [A-Za-z0-9][A-Za-z0-9_.-]{0,63}.")
    prefix: str = Field(default=DEFAULT_PREFIX, description="Topic prefix shared by the whole fleet.")
    state_dir: Path = Field(
        description="Journal, download cache and script working directory (default fleet-state/NODE)."
    )
    scripts_dir: Path = Field(
        description="The only directory script steps may run from (default STATE_DIR-scripts, beside "
        "the state dir: never inside it, where file steps may write)."
    )
    trust: list[Path] = Field(
        default_factory=list,
        description="PEM files of the Ed25519 public keys whose signed commands this node runs.",
    )
    labels: dict[Label, LabelValue] = Field(
        default_factory=dict, max_length=64, description="Labels (k=v) that rollouts can target."
    )
    heartbeat_s: float = Field(default=5.0, gt=0, le=3600, description="Seconds between heartbeats.")
    keepalive_s: int = Field(
        default=10, ge=1, le=65535, description="MQTT keepalive; the broker sends the will after ~1.5x."
    )
    service_manager: ServiceManager = Field(
        default="process", description="How service steps act: process, systemd or docker."
    )
    services: dict[str, ProcessService] = Field(
        default_factory=dict, description="Services the agent supervises itself (process manager)."
    )
    policy: Path | None = Field(
        default=None, description="TOML or JSON policy file limiting what commands may touch."
    )
    packages: list[str] = Field(
        default_factory=list, max_length=256, description="Packages whose versions the inventory reports."
    )
    drivers: list[str] = Field(
        default_factory=list,
        max_length=256,
        description="Kernel modules the inventory reports (default: every loaded one, capped).",
    )
    step_timeout_s: float = Field(
        default=300.0, gt=0, le=7 * 86400, description="Timeout of a step that names none."
    )
    max_download_bytes: int = Field(
        default=2 * 1024**3, gt=0, description="Largest download a step may fetch."
    )
    rpm_root: Path | None = Field(
        default=None,
        description=(
            "Install root of the dnf/yum/rpm package steps and inventory (dnf --installroot, "
            "rpm --root); default the live system."
        ),
    )
    dnf_config: Path | None = Field(
        default=None,
        description=(
            "dnf/yum configuration file (--config; its reposdir names the repositories); default "
            "the install root's, else the host's."
        ),
    )

    @model_validator(mode="before")
    @classmethod
    def _default_dirs(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        data = dict(data)
        node = data.get("node_id")
        if data.get("state_dir") is None and isinstance(node, str):
            data["state_dir"] = Path("fleet-state") / node
        if data.get("scripts_dir") is None and data.get("state_dir") is not None:
            data["scripts_dir"] = default_scripts_dir(Path(data["state_dir"]))
        return data

    @field_validator("node_id")
    @classmethod
    def _valid_node(cls, value: str) -> str:
        try:
            return check_node_id(value)
        except FleetError as exc:
            raise ValueError(exc.reason) from exc

    @field_validator("prefix")
    @classmethod
    def _valid_prefix(cls, value: str) -> str:
        return valid_prefix(value)

    @field_validator("broker")
    @classmethod
    def _valid_broker(cls, value: str) -> str:
        from bus.mqtt import valid_broker_url  # paho: loaded only when a config is built

        return valid_broker_url(value)

    @model_validator(mode="after")
    def _carried_by_broker(self) -> AgentConfig:
        """A node id or prefix the broker cannot carry in a topic (``.`` on NATS) is refused at start."""
        from bus.mqtt import check_topic_name

        try:
            check_topic_name(self.broker, "node id", self.node_id)
            check_topic_name(self.broker, "prefix", self.prefix)
        except ConfigError as exc:
            raise ValueError(exc.reason) from exc
        return self

    @property
    def topics(self) -> Topics:
        """The fleet's topics under this config's prefix."""
        return Topics(self.prefix)

    def system_tools(self) -> SystemTools:
        """The system tools as this config points them (the RPM install root and dnf config)."""
        return SystemTools(
            rpm_root=self.rpm_root.absolute() if self.rpm_root is not None else None,
            dnf_config=self.dnf_config.absolute() if self.dnf_config is not None else None,
        )

    def to_executor_settings(self) -> ExecutorSettings:
        """What the command runner needs: trusted keys and the policy loaded, dirs absolute.

        Blocking (reads the trust and policy files); call through asyncio.to_thread
        from async code.

        Raises:
            ConfigError: a trust or policy file cannot be read or holds no valid content.
        """
        from bus.signing import load_public_keys

        keys = tuple(key for path in self.trust for key in load_public_keys(path))
        if not keys:
            _LOGGER.warning("no trusted key configured (--trust): every command will be rejected")
        state, scripts = self.state_dir.absolute(), self.scripts_dir.absolute()
        if scripts == state or state in scripts.parents:
            _LOGGER.warning(
                "scripts dir %s is inside the state dir %s: steps are refused there, but keep it apart "
                "(the default is %s)", scripts, state, default_scripts_dir(state),
            )  # fmt: skip
        return ExecutorSettings(
            node=self.node_id,
            state_dir=self.state_dir.absolute(),
            scripts_dir=self.scripts_dir.absolute(),
            trusted_keys=keys,
            policy=load_policy(self.policy) if self.policy is not None else Policy(),
            service_manager=self.service_manager,
            services=dict(self.services),
            max_download_bytes=self.max_download_bytes,
            default_step_timeout_s=self.step_timeout_s,
            tools=self.system_tools(),
            labels=dict(self.labels),
        )


# ---------------------------------------------------------------------- loading


def load_agent_config(
    flags: Mapping[str, Any],
    environ: Mapping[str, str],
    toml_text: str | None = None,
    *,
    config_dir: Path | None = None,
    source: str = "config file",
) -> AgentConfig:
    """Build the config from its three sources (pure).

    Args:
        flags: field name -> value given on the command line; ``None`` means not given.
            List fields take lists (``labels`` as ``["k=v", ...]`` or a dict).
        environ: the process environment (only ``FLEET_*`` names are read).
        toml_text: the TOML config file's text; only its ``[agent]`` table is read.
        config_dir: directory of the TOML file; its relative paths are taken from there.
        source: how to name the TOML file in error messages.

    Raises:
        InvalidNodeId: the node id is not a valid one.
        ConfigError: anything else is missing or wrong (one-line reason).
    """
    merged: dict[str, Any] = {}
    merged.update(_from_toml(toml_text, config_dir, source))
    merged.update(_from_environ(environ))
    merged.update({k: _normalise(k, v) for k, v in flags.items() if v is not None and k != "config"})
    node = merged.get("node_id")
    if node is None:
        raise ConfigError("no node id: pass --node-id, set FLEET_NODE_ID or node_id in [agent]")
    check_node_id(node)  # InvalidNodeId names the problem in one line
    try:
        return AgentConfig.model_validate(merged)
    except ValidationError as exc:
        raise ConfigError(f"invalid agent config: {describe(exc)}") from exc


def find_config_file(explicit: str | Path | None, environ: Mapping[str, str], cwd: Path) -> Path | None:
    """The TOML file to read, found as for every fleet command (``bus.config.find_config_file``)."""
    return bus_config.find_config_file(explicit, environ, cwd=cwd, home=Path.home())


def read_agent_config(flags: Mapping[str, Any], environ: Mapping[str, str], cwd: Path) -> AgentConfig:
    """Find and read the TOML file (``flags["config"]``, FLEET_CONFIG, discovery), then load.

    Blocking (reads one file).

    Raises:
        InvalidNodeId: the node id is not a valid one.
        ConfigError: the named file cannot be read, or a value is missing or wrong.
    """
    path = find_config_file(flags.get("config"), environ, cwd)
    text = bus_config.read_config_text(path) if path is not None else None
    return load_agent_config(flags, environ, text, config_dir=path.parent if path else None, source=str(path))


def load_policy(path: Path) -> Policy:
    """Read a policy file: TOML (``.toml``) or JSON, top level or under a ``policy`` key.

    Blocking (reads one file).

    Raises:
        ConfigError: the file cannot be read or parsed, or is not a valid policy.
    """
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read policy file {path}: {exc}") from exc
    try:
        data: Any = tomllib.loads(text) if path.suffix == ".toml" else json.loads(text)
    except ValueError as exc:  # tomllib.TOMLDecodeError and JSONDecodeError are ValueErrors
        raise ConfigError(f"cannot parse policy file {path}: {exc}") from exc
    if isinstance(data, dict) and set(data) == {"policy"}:
        data = data["policy"]
    try:
        return Policy.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(f"invalid policy file {path}: {describe(exc)}") from exc


def _from_toml(text: str | None, config_dir: Path | None, source: str) -> dict[str, Any]:
    if not text:
        return {}
    table = bus_config.toml_table(text, "agent", source)
    values = {key.replace("-", "_"): _normalise(key.replace("-", "_"), v) for key, v in table.items()}
    if config_dir is not None:
        for key in _PATH_FIELDS:
            if isinstance(values.get(key), str):
                values[key] = str(config_dir / values[key])
        if isinstance(values.get("trust"), list):
            values["trust"] = [str(config_dir / p) if isinstance(p, str) else p for p in values["trust"]]
    return values


def _from_environ(environ: Mapping[str, str]) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for name in AgentConfig.model_fields:
        raw = environ.get(f"FLEET_{name.upper()}")
        if raw is None and name in _ENV_ALIASES:
            raw = environ.get(_ENV_ALIASES[name])
        if raw is None or raw == "":
            continue
        if name == "services":
            try:
                values[name] = json.loads(raw)
            except ValueError as exc:
                raise ConfigError(f"FLEET_SERVICES is not a JSON object: {exc}") from exc
        elif name in _LIST_FIELDS:
            values[name] = _normalise(name, [part.strip() for part in raw.split(",") if part.strip()])
        else:
            values[name] = raw
    return values


def _normalise(name: str, value: Any) -> Any:
    """Labels given as ``k=v`` strings become a dict; a single string in a list field, a list."""
    if name in _LIST_FIELDS and isinstance(value, (str, Path)):
        value = [value]
    if name == "labels" and isinstance(value, list):
        labels: dict[str, Any] = {}
        for item in value:
            if not isinstance(item, str) or "=" not in item:
                raise ConfigError(f"invalid label {str(item)[:80]!r}: expected key=value")
            key, _, label_value = item.partition("=")
            labels[key.strip()] = label_value.strip()
        return labels
    return value
