"""What every fleetbus process shares about its configuration: where the file is, its tables.

Each process has one frozen config model (``AgentConfig``, ``HubConfig``,
``ClientConfig``) built by a pure loader from flags, ``FLEET_*`` variables and
one table of a TOML file (``[agent]``, ``[hub]``, ``[client]``). This module
finds that file the same way for all of them and reads a table out of it.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from bus.errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib  # type: ignore[import-not-found, unused-ignore]

__all__ = ["CONFIG_FILE_NAME", "find_config_file", "read_config_text", "toml_table"]

CONFIG_FILE_NAME = "fleet.toml"


def find_config_file(
    explicit: str | Path | None, environ: Mapping[str, str], *, cwd: Path, home: Path
) -> Path | None:
    """The TOML file to read: ``--config``, else ``FLEET_CONFIG``, else the first one found.

    Discovery looks at ``cwd/fleet.toml``, ``$XDG_CONFIG_HOME/fleet/fleet.toml``
    (default ``home/.config``) and ``/etc/fleet/fleet.toml``; it is off when
    ``FLEET_NO_CONFIG_DISCOVERY`` is set to anything but "" (tests set it). A
    relative name is taken from ``cwd``.
    """
    named = explicit if explicit else environ.get("FLEET_CONFIG") or None
    if named is not None:
        return cwd / Path(named)
    if environ.get("FLEET_NO_CONFIG_DISCOVERY"):
        return None
    xdg = Path(environ["XDG_CONFIG_HOME"]) if environ.get("XDG_CONFIG_HOME") else home / ".config"
    candidates = (cwd, xdg / "fleet", Path("/etc/fleet"))
    for candidate in (directory / CONFIG_FILE_NAME for directory in candidates):
        if candidate.is_file():
            return candidate
    return None


def read_config_text(path: Path) -> str:
    """The file's text; ConfigError naming it when it cannot be read. Blocking."""
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read config file {path}: {exc}") from exc


def toml_table(text: str, table: str, where: str) -> dict[str, Any]:
    """The ``[table]`` of a TOML document (empty when absent); ConfigError naming ``where``."""
    try:
        document = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{where}: invalid TOML: {exc}") from exc
    value = document.get(table, {})
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: [{table}] must be a table")
    return value
