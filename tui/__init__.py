"""The Textual terminal UI: fleet health and rollouts over MQTT (DESIGN sections 1-2).

Public names are imported lazily, so ``import tui.model`` (pure) does not pull in Textual.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["FleetApp", "ListFeed", "MqttFeed", "TuiConfig", "make_app"]

_WHERE = {
    "FleetApp": "tui.app",
    "make_app": "tui.app",
    "ListFeed": "tui.feed",
    "MqttFeed": "tui.feed",
    "TuiConfig": "tui.config",
}


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'tui' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
