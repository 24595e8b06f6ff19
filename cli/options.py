"""Flag defaults from FLEET_* environment variables (DESIGN section 4)."""

from __future__ import annotations

import os


def env_default(name: str, default: str | None = None) -> str | None:
    """The value of environment variable ``name`` (a FLEET_* flag default), else ``default``."""
    return os.environ.get(name, default)
