"""What every screen reads: the model, the clock and display settings (attributes down)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from tui.model import FleetModel

__all__ = ["Clock", "Context"]

#: Wall-clock seconds since the epoch; injected so tests and snapshots are stable.
Clock = Callable[[], float]


@dataclass(frozen=True)
class Context:
    """Shared, read-mostly state the app hands to each screen."""

    model: FleetModel
    clock: Clock
    utc: bool = False
    examples_dir: Path = Path("examples")
