"""Step handlers, one module per step type, registered in ``HANDLERS``.

To add a type: write ``edge_agent/steps/<type>.py`` with ``apply``, ``undo`` and
``check`` (see ``edge_agent.steps.base``) and add its ``HANDLER`` here. A step
type without a handler is rejected at intake ("step type X is not supported
by this agent").
"""

from __future__ import annotations

from collections.abc import Mapping

from edge_agent.steps import container, download, file, health, module, package, script, service
from edge_agent.steps.base import StepContext, StepHandler

__all__ = ["HANDLERS", "StepContext", "StepHandler"]

HANDLERS: Mapping[str, StepHandler] = {
    "download": download.HANDLER,
    "file": file.HANDLER,
    "script": script.HANDLER,
    "health": health.HANDLER,
    "service": service.HANDLER,
    "package": package.HANDLER,
    "container": container.HANDLER,
    "module": module.HANDLER,
}
