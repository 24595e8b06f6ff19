"""Rollout actions shared by the rollout list and the rollout detail screens."""

from __future__ import annotations

from typing import Literal

from textual.binding import Binding
from textual.screen import Screen

from tui.messages import HubRequest
from tui.model import FleetModel
from tui.screens.confirm import ConfirmScreen

__all__ = ["ROLLOUT_BINDINGS", "RolloutActions", "RolloutOp", "request_rollout_op"]

RolloutOp = Literal["abort", "rollback", "pause", "resume"]

_QUESTIONS: dict[str, tuple[str, str]] = {
    "abort": (
        "Abort rollout {name}?",
        "New waves stop; running nodes are aborted and every node that applied it is rolled back "
        "(coordinated rollback).",
    ),
    "rollback": (
        "Roll back rollout {name}?",
        "Every node that applied it is restored to what it ran before.",
    ),
}


def request_rollout_op(screen: Screen[None], model: FleetModel, op: RolloutOp, rollout: str | None) -> None:
    """Send ``op`` for ``rollout``; abort and rollback ask for confirmation first."""
    if rollout is None:
        screen.notify("No rollout selected.", severity="warning")
        return
    view = model.rollouts.get(rollout)
    name = view.name if view else rollout
    body = {"rollout": rollout}
    if op not in _QUESTIONS:
        screen.post_message(HubRequest(op, body))
        return
    question, detail = _QUESTIONS[op]

    def answered(yes: bool | None) -> None:
        if yes:
            screen.post_message(HubRequest(op, body))

    screen.app.push_screen(ConfirmScreen(question.format(name=name), detail), answered)


class RolloutActions:
    """Key actions ``a``/``b``/``p``/``u`` for a screen that knows a selected rollout."""

    ctx_model: FleetModel

    def selected_rollout(self) -> str | None:
        """The rollout the actions apply to."""
        raise NotImplementedError

    def _op(self, op: RolloutOp) -> None:
        assert isinstance(self, Screen)  # noqa: S101 - mixed into screens only
        request_rollout_op(self, self.ctx_model, op, self.selected_rollout())

    def action_abort(self) -> None:
        """Abort the rollout (after confirmation)."""
        self._op("abort")

    def action_rollback(self) -> None:
        """Roll the rollout back (after confirmation)."""
        self._op("rollback")

    def action_pause(self) -> None:
        """Pause the rollout: no new waves start."""
        self._op("pause")

    def action_resume(self) -> None:
        """Resume a paused rollout."""
        self._op("resume")


#: Bindings of ``RolloutActions``.
ROLLOUT_BINDINGS = [
    Binding("a", "abort", "Abort"),
    Binding("b", "rollback", "Rollback"),
    Binding("p", "pause", "Pause"),
    Binding("u", "resume", "Resume"),
]
