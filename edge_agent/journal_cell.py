"""The runner's one journal state: in memory, written through ``Journal`` (atomic, fsynced).

``JournalCell`` holds the ``JournalState`` of one agent, read from disk the
first time it is needed, and changes it only through pure transitions of
``edge_agent.executor``, one at a time (a lock):

- ``change``: apply and write. When the write fails (a full or read-only disk)
  it raises OSError if ``durable`` (what must be on disk before it happens -
  a command taken, a step started - does not happen); otherwise the work goes
  on from memory and the journal catches up at the next write that succeeds
  (undo is idempotent, so a crash meanwhile only makes the restart undo again).
- ``note``: apply in memory only; the next write carries it. For outcomes whose
  loss in a crash changes nothing: a step that succeeded but is still marked
  running on disk is undone by the restart's recovery like any interrupted step.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from edge_agent import executor
from edge_agent.executor import ApplyEntry, JournalState
from edge_agent.journal import Journal

__all__ = ["JournalCell"]

_LOGGER = logging.getLogger(__name__)

Transition = Callable[[JournalState], JournalState]


class JournalCell:
    """The journal state of one agent, changed one pure transition at a time."""

    def __init__(self, journal: Journal, state_dir: Path) -> None:
        self._journal = journal
        self._state_dir = state_dir
        self._state: JournalState | None = None
        self._lock = asyncio.Lock()

    @property
    def state(self) -> JournalState | None:
        """The state in memory (None until first loaded)."""
        return self._state

    async def load(self) -> JournalState:
        """The state, read from disk the first time."""
        async with self._lock:
            return await self._current()

    async def change(self, transition: Transition, *, durable: bool = True) -> JournalState:
        """Apply a pure transition to the state and write it (atomic, fsynced); see the module doc."""
        async with self._lock:
            new = transition(await self._current())
            try:
                await self._journal.write(new)
            except OSError as exc:
                if durable:
                    raise
                _LOGGER.warning("%s; going on from memory", self.unjournalled(exc))
            self._state = new
            return new

    async def note(self, transition: Transition) -> None:
        """Apply a transition in memory only: the next journal write carries it."""
        async with self._lock:
            self._state = transition(await self._current())

    async def update(self, rollout: str, index: int, *, durable: bool = True, **changes: Any) -> None:
        """Change step ``index`` of the rollout's entry (``executor.update_step``) and write it."""
        await self.change(lambda s: executor.update_step(s, rollout, index, **changes), durable=durable)

    def entry(self, rollout: str) -> ApplyEntry | None:
        """The rollout's entry in the state in memory, or None."""
        return self._state.applies.get(rollout) if self._state is not None else None

    def unjournalled(self, exc: OSError) -> str:
        """Why a write failed, as reports and logs say it."""
        return f"cannot write the journal {self._journal.path}: {exc.strerror or exc}"

    async def _current(self) -> JournalState:
        """The state, read from disk the first time; call with the lock held."""
        if self._state is None:
            self._state = await asyncio.to_thread(self._load_blocking)
        return self._state

    def _load_blocking(self) -> JournalState:
        self._state_dir.mkdir(parents=True, exist_ok=True)
        return self._journal.load()
