"""Step handlers, one module per step type, registered in ``HANDLERS``.

To add a type: write ``edge_agent/steps/<type>.py`` with ``apply``, ``undo`` and
``check`` (see ``edge_agent.steps.base``) and add its type to ``TYPES``. A step
type without a handler is rejected at intake ("step type X is not supported
by this agent").

A handler's module is imported the first time a step of its type is looked
up: an agent that only ever restarts services never pays for the package
managers, containers and kernel modules (part of the agent's RSS budget).
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator, Mapping

from edge_agent.steps.base import StepContext, StepHandler

__all__ = ["HANDLERS", "TYPES", "StepContext", "StepHandler"]

TYPES = ("download", "file", "script", "health", "service", "package", "container", "module")


class _Handlers(Mapping[str, StepHandler]):
    """Step type -> handler, importing ``edge_agent.steps.<type>`` on first use."""

    def __getitem__(self, kind: str) -> StepHandler:
        if kind not in TYPES:
            raise KeyError(kind)
        handler: StepHandler = importlib.import_module(f"edge_agent.steps.{kind}").HANDLER
        return handler

    def __contains__(self, kind: object) -> bool:
        return kind in TYPES

    def __iter__(self) -> Iterator[str]:
        return iter(TYPES)

    def __len__(self) -> int:
        return len(TYPES)


HANDLERS: Mapping[str, StepHandler] = _Handlers()
