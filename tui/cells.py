"""How values look in the TUI: words first, colour second (usable with NO_COLOR)."""

from __future__ import annotations

from datetime import datetime, timezone

from rich.text import Text

from bus.messages import RolloutCounts
from tui.model import Presence

__all__ = [
    "STEP_WORDS",
    "age_text",
    "clock_text",
    "counts_text",
    "load_text",
    "pct_text",
    "phase_text",
    "plain",
    "presence_text",
    "progress_text",
    "rollout_state_text",
    "step_text",
    "time_text",
]

_PRESENCE_STYLE = {"online": "green", "stale": "yellow", "offline": "bold red"}

#: Short words for step states in the rollout grid (its legend prints these).
STEP_WORDS = {
    "pending": ("wait", "dim"),
    "running": ("run", "bold cyan"),
    "succeeded": ("ok", "green"),
    "failed": ("FAIL", "bold red"),
    "rolled_back": ("undone", "magenta"),
    "skipped": ("skip", "dim"),
    "rejected": ("REJ", "bold red"),
}

_ROLLOUT_STYLE = {
    "pending": "dim",
    "running": "bold cyan",
    "paused": "yellow",
    "succeeded": "green",
    "halted": "bold red",
    "rolling_back": "magenta",
    "rolled_back": "magenta",
    "rollback_failed": "bold red",
    "aborting": "magenta",
    "aborted": "red",
}

_PHASE_STYLE = {
    "pending": "dim",
    "applying": "bold cyan",
    "succeeded": "green",
    "failed": "bold red",
    "rolling_back": "magenta",
    "rolled_back": "magenta",
    "rejected": "bold red",
    "timed_out": "bold red",
    "offline": "bold red",
    "lost": "bold red",
    "rollback_failed": "bold red reverse",
    "deferred": "yellow",
    "not_started": "dim",
}


def plain(value: str) -> Text:
    """Untrusted text as a cell: never parsed as markup (a label may hold ``[/]``)."""
    return Text(value)


def age_text(age: float | None) -> str:
    """A compact age: ``4s``, ``12m``, ``3h``, ``2d``; a dash when never seen."""
    if age is None:
        return "-"
    seconds = int(age)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m"
    if seconds < 86400:
        return f"{seconds // 3600}h"
    return f"{seconds // 86400}d"


def presence_text(presence: Presence, age: float | None) -> Text:
    """``online 2s`` in green, ``stale 40s`` in yellow, ``offline 5m`` in red."""
    return Text(f"{presence} {age_text(age)}", style=_PRESENCE_STYLE[presence])


def load_text(value: float | None) -> str:
    """Load average with two decimals, or a dash."""
    return "-" if value is None else f"{value:.2f}"


def pct_text(value: float | None) -> str:
    """A whole percent, or a dash."""
    return "-" if value is None else f"{value:.0f}%"


def step_text(state: str) -> Text:
    """A step state as its grid word."""
    word, style = STEP_WORDS.get(state, (state, ""))
    return Text(word, style=style)


def rollout_state_text(state: str) -> Text:
    """A rollout state in its colour."""
    return Text(state, style=_ROLLOUT_STYLE.get(state, ""))


def phase_text(phase: str) -> Text:
    """A node's phase in a rollout, in its colour."""
    return Text(phase, style=_PHASE_STYLE.get(phase, ""))


def progress_text(done: int, total: int, width: int = 10) -> Text:
    """A text progress bar with the count: ``#####----- 5/10``."""
    filled = 0 if total <= 0 else min(width, round(width * done / total))
    text = Text()
    text.append("#" * filled, style="green")
    text.append("-" * (width - filled), style="dim")
    text.append(f" {done}/{total}")
    return text


def counts_text(counts: RolloutCounts) -> Text:
    """Node counts by group: ``ok 3 run 1 fail 0 undone 0 wait 2``."""
    text = Text()
    for word, value, style in (
        ("ok", counts.succeeded, "green"),
        ("run", counts.running, "cyan"),
        ("fail", counts.failed, "red"),
        ("undone", counts.rolled_back, "magenta"),
        ("wait", counts.pending, "dim"),
    ):
        if text:
            text.append(" ")
        text.append(f"{word} {value}", style=style if value else "")
    # Rarer groups only when they hold a node, so the usual cell stays narrow.
    for word, value, style in (
        ("RB-FAIL", counts.rollback_failed, "bold red"),
        ("lost", counts.lost, "red"),
        ("deferred", counts.deferred, "yellow"),
        ("not started", counts.not_started, "dim"),
    ):
        if value:
            text.append(f" {word} {value}", style=style)
    return text


def clock_text(ts: float, utc: bool = False) -> str:
    """A wall-clock time: ``2024-05-01 12:03:04`` (local time unless ``utc``)."""
    moment = datetime.fromtimestamp(ts, tz=timezone.utc)
    if not utc:
        moment = moment.astimezone()
    return moment.strftime("%Y-%m-%d %H:%M:%S")


def time_text(ts: float, utc: bool = False) -> str:
    """A time of day: ``12:03:04`` (local time unless ``utc``)."""
    return clock_text(ts, utc)[11:]
