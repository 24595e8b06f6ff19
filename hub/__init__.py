"""The hub: rollout engine, fleet registry, TinyDB store, HTTP bridge.

Public names are imported lazily, so ``import hub.core.engine`` (pure) does not pull
in the MQTT client, TinyDB or FastAPI.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["HubConfig", "HubService", "NodeInfo", "Registry", "Store", "Transition", "load_hub_config"]

_WHERE = {
    "HubConfig": "hub.config",
    "load_hub_config": "hub.config",
    "HubService": "hub.service",
    "NodeInfo": "hub.core.registry",
    "Registry": "hub.core.registry",
    "Transition": "hub.core.registry",
    "Store": "hub.store",
}


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'hub' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
