"""What the agent's parts share: service definitions, local policy, executor settings.

``edge_agent/config.py`` builds these from flags, environment and TOML; the
executor and the steps only ever see these frozen objects.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from bus.ed25519 import PublicKey
from edge_agent.tools import SystemTools

__all__ = ["ExecutorSettings", "Policy", "ProcessService", "ServiceManager"]

ServiceManager = Literal["process", "systemd", "docker"]


class ProcessService(BaseModel):
    """A service the agent itself supervises (the ``process`` service manager)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    command: list[str] = Field(min_length=1, description="argv of the service's main process")
    cwd: str | None = Field(default=None, description="working directory (default: the state dir)")
    env: dict[str, str] = Field(default_factory=dict, description="extra environment variables")
    version_command: list[str] | None = Field(
        default=None, description="argv that prints the running version (for the inventory)"
    )
    version_file: str | None = Field(
        default=None, description="file whose first line is the installed version (for the inventory)"
    )


class Policy(BaseModel):
    """What any command may touch on this node (DESIGN section 7).

    ``None`` for a list means "no limit beyond the defaults": scripts only from
    the scripts dir and files only under the state dir.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    step_types: list[str] | None = Field(default=None, description="allowed step types")
    packages: list[str] | None = Field(default=None, description="allowed package names (globs)")
    services: list[str] | None = Field(default=None, description="allowed service names (globs)")
    scripts: list[str] | None = Field(default=None, description="allowed script names (globs)")
    paths: list[str] | None = Field(
        default=None, description="allowed file destinations (globs); default: under the state dir"
    )
    modules: list[str] | None = Field(default=None, description="allowed kernel modules (globs)")
    images: list[str] | None = Field(default=None, description="allowed container images (globs)")
    download_hosts: list[str] | None = Field(default=None, description="allowed download hosts (globs)")

    @staticmethod
    def matches(patterns: list[str] | None, value: str) -> bool:
        """True when ``patterns`` is None (no limit) or one glob matches ``value``."""
        return patterns is None or any(fnmatch.fnmatchcase(value, p) for p in patterns)


@dataclass(frozen=True)
class ExecutorSettings:
    """Everything the command runner needs to know about its node.

    ``service_start_settle_s``: a started process service that exits sooner
    failed to start. ``service_stop_grace_s``: SIGTERM, then SIGKILL after this.
    """

    node: str
    state_dir: Path
    scripts_dir: Path
    trusted_keys: tuple[PublicKey, ...] = ()
    policy: Policy = field(default_factory=Policy)
    service_manager: ServiceManager = "process"
    services: dict[str, ProcessService] = field(default_factory=dict)
    max_download_bytes: int = 2 * 1024**3
    default_step_timeout_s: float = 300.0
    service_start_settle_s: float = 0.5
    service_stop_grace_s: float = 10.0
    tools: SystemTools = field(default_factory=SystemTools)
    #: The node's own labels: a plan's ``{labels.NAME}`` resolves against them (DESIGN 3.10).
    labels: Mapping[str, str] = field(default_factory=dict)

    @property
    def cache_dir(self) -> Path:
        """Where download steps put verified files (``state_dir/cache``)."""
        return self.state_dir / "cache"

    @property
    def backup_dir(self) -> Path:
        """Where file steps keep the files they replace (``state_dir/backup``)."""
        return self.state_dir / "backup"

    @property
    def journal_path(self) -> Path:
        """The agent's journal (``state_dir/journal.json``)."""
        return self.state_dir / "journal.json"

    @property
    def replay_floor_path(self) -> Path:
        """The highest ``issued_at`` taken, kept apart from the journal (``state_dir/replay-floor``)."""
        return self.state_dir / "replay-floor"

    @property
    def term_floor_path(self) -> Path:
        """The highest hub term taken (``state_dir/term-floor``, DESIGN 3.9)."""
        return self.state_dir / "term-floor"
