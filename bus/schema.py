"""JSON Schema of every wire message (``fleet schema``)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

from bus import messages

__all__ = ["WIRE_MODELS", "all_schemas"]

WIRE_MODELS: tuple[type[BaseModel], ...] = (
    messages.NodeState,
    messages.Heartbeat,
    messages.Command,
    messages.StepStatus,
    messages.JobSnapshot,
    messages.LogLine,
    messages.HubState,
    messages.Request,
    messages.Reply,
    messages.RolloutSpec,
    messages.RolloutSummary,
    messages.RolloutNodes,
    messages.Event,
)


def all_schemas() -> dict[str, dict[str, Any]]:
    """Model name -> JSON Schema."""
    return {model.__name__: model.model_json_schema() for model in WIRE_MODELS}
