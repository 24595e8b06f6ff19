"""Rollout actions shared by the rollout list and the rollout detail screens."""

from __future__ import annotations

from typing import Literal

from textual.binding import Binding
from textual.screen import Screen

from tui.cells import clock_text
from tui.messages import HubRequest
from tui.model import FleetModel
from tui.screens.confirm import ConfirmScreen

__all__ = ["ROLLOUT_BINDINGS", "RolloutActions", "RolloutOp", "request_rollout_op", "rollout_title"]

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
    "pause": (
        "Pause rollout {name}?",
        "No new wave starts; nodes already working finish their job. Resume with u.",
    ),
    "resume": (
        "Resume rollout {name}?",
        "The next waves start as planned.",
    ),
}
#: Ops whose confirmation is drawn as destructive (red).
_DANGEROUS = ("abort", "rollback")


def rollout_title(model: FleetModel, rollout: str, *, utc: bool = False) -> str:
    """``demo-app 2.0 (id 1a7e70f1, created 2024-05-01 12:00:00)``: names alone are not unique."""
    view = model.rollouts.get(rollout)
    if view is None or view.summary is None:
        return f"(id {rollout})"
    created = clock_text(view.summary.created_at, utc)
    return f"{view.name} (id {rollout[:8]}, created {created})"


def request_rollout_op(
    screen: Screen[None], model: FleetModel, op: RolloutOp, rollout: str | None, *, utc: bool = False
) -> None:
    """Send ``op`` for ``rollout`` once the operator confirmed it (every op asks, naming id and time)."""
    if rollout is None:
        screen.notify("No rollout selected.", severity="warning")
        return
    body = {"rollout": rollout}
    question, detail = _QUESTIONS[op]

    def answered(yes: bool | None) -> None:
        if yes:
            screen.post_message(HubRequest(op, body))

    title = rollout_title(model, rollout, utc=utc)
    screen.app.push_screen(
        ConfirmScreen(question.format(name=title), detail, danger=op in _DANGEROUS), answered
    )


class RolloutActions:
    """Key actions ``a``/``b``/``p``/``u`` for a screen that knows a selected rollout."""

    ctx_model: FleetModel

    def selected_rollout(self) -> str | None:
        """The rollout the actions apply to."""
        raise NotImplementedError

    def _op(self, op: RolloutOp) -> None:
        assert isinstance(self, Screen)  # noqa: S101 - mixed into screens only
        utc = bool(getattr(getattr(self, "ctx", None), "utc", False))
        request_rollout_op(self, self.ctx_model, op, self.selected_rollout(), utc=utc)

    def action_abort(self) -> None:
        """Abort the rollout (after confirmation)."""
        self._op("abort")

    def action_rollback(self) -> None:
        """Roll the rollout back (after confirmation)."""
        self._op("rollback")

    def action_pause(self) -> None:
        """Pause the rollout: no new waves start (after confirmation)."""
        self._op("pause")

    def action_resume(self) -> None:
        """Resume a paused rollout (after confirmation)."""
        self._op("resume")


#: Bindings of ``RolloutActions``.
ROLLOUT_BINDINGS = [
    Binding("a", "abort", "Abort"),
    Binding("b", "rollback", "Rollback"),
    Binding("p", "pause", "Pause"),
    Binding("u", "resume", "Resume"),
]
