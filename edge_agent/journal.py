"""The agent's journal file, ``state_dir/journal.json`` (DESIGN sections 3.3, 3.6 and 6).

Every write is atomic: the new content goes to a temp file in the same
directory, is fsynced, replaces the journal with ``os.replace`` and the
directory is fsynced, so a crash at any moment leaves either the old or the new
journal, never a torn one. What the journal holds and how it changes is
``edge_agent.executor``'s business; this module only stores it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from pathlib import Path

from pydantic import ValidationError

from bus.messages import describe
from edge_agent import blocking
from edge_agent.executor import JournalState

__all__ = ["JOURNAL_NAME", "Journal", "fsync_dir", "write_atomic"]

_LOGGER = logging.getLogger(__name__)

JOURNAL_NAME = "journal.json"


def fsync_dir(directory: str | Path) -> None:
    """Make a rename or unlink inside ``directory`` durable. Call through asyncio.to_thread."""
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_atomic(path: str | Path, data: bytes, mode: int = 0o600) -> None:
    """Replace ``path`` with ``data``: temp file, fsync, ``os.replace``, fsync of the directory.

    Call through asyncio.to_thread.
    """
    directory, name = os.path.split(os.fspath(path))
    tmp = os.path.join(directory, f".{name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        view = memoryview(data)
        while view:
            written = os.write(fd, view)
            view = view[written:]
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    os.close(fd)
    os.replace(tmp, path)
    fsync_dir(directory or ".")


class Journal:
    """Load and save the ``JournalState`` of one agent.

    Args:
        path: the journal file (``state_dir/journal.json``).
    """

    def __init__(self, path: Path) -> None:
        self.path = path

    def load(self) -> JournalState:
        """The stored state; an empty one when there is no journal yet.

        A journal that cannot be parsed (edited by hand, a disk fault: never a
        torn write) is moved aside as ``journal.json.corrupt-<time>`` and the
        agent starts afresh, logging why. Call through asyncio.to_thread.
        """
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return JournalState()
        try:
            return JournalState.model_validate_json(data)
        except ValidationError as exc:
            aside = self.path.with_name(f"{self.path.name}.corrupt-{int(time.time())}")
            _LOGGER.warning("journal %s is unreadable (%s); moved to %s", self.path, describe(exc), aside)
            os.replace(self.path, aside)
            return JournalState()

    def save(self, state: JournalState) -> None:
        """Write ``state`` atomically. Call through asyncio.to_thread."""
        data = state.model_dump_json().encode("utf-8")
        try:
            write_atomic(self.path, data)
        except FileNotFoundError:  # the first write, or the state dir was removed meanwhile
            self.path.parent.mkdir(parents=True, exist_ok=True)
            write_atomic(self.path, data)

    async def write(self, state: JournalState) -> None:
        """``save`` from async code (``edge_agent.blocking``: a worker thread, or inline on RAM)."""
        await blocking.run(self.save, state)
