"""The agent's journal file, ``state_dir/journal.json`` (DESIGN sections 3.3, 3.6 and 6).

Every write is atomic (``bus.files.write_atomic``): the new content goes to a
random-named, no-follow temp file in the same directory, is fsynced, replaces
the journal with ``os.replace`` and the directory is fsynced, so a crash at any
moment leaves either the old or the new journal, never a torn one. What the
journal holds and how it changes is ``edge_agent.executor``'s business; this
module only stores it.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import pydantic_core
from pydantic import ValidationError

from bus import files
from bus.messages import describe
from edge_agent import blocking
from edge_agent.executor import ApplyEntry, JournalState

__all__ = ["JOURNAL_NAME", "Journal", "write_atomic"]

_LOGGER = logging.getLogger(__name__)

JOURNAL_NAME = "journal.json"


#: The journal is written the one durable way (bus.files: random no-follow temp file, fsyncs).
write_atomic = files.write_atomic


class _Encoder:
    """The journal's JSON, re-encoding only what changed since the last write.

    The state is rewritten several times per job, but most of it does not
    change from one write to the next: up to ``MAX_APPLIES`` finished applies
    kept for rollback and up to ``MAX_SEEN`` command ids (about 60 KB of JSON
    on a long-lived node, 0.2 ms to encode each time). Entries are immutable
    models, so each one's JSON is cached by identity and reused while the same
    object is in the state; ``JournalState.model_validate_json`` reads the
    result like ``model_dump_json``'s own.
    """

    def __init__(self) -> None:
        self._applies: dict[str, tuple[ApplyEntry, bytes]] = {}
        self._seen: tuple[list[str], bytes] | None = None

    def encode(self, state: JournalState) -> bytes:
        parts = []
        for name in JournalState.model_fields:
            if name == "applies":
                value = self._encode_applies(state.applies)
            elif name == "seen":
                value = self._encode_seen(state.seen)
            else:
                value = pydantic_core.to_json(getattr(state, name))
            parts.append(b'"%s":%s' % (name.encode("ascii"), value))
        return b"{" + b",".join(parts) + b"}"

    def _encode_applies(self, applies: dict[str, ApplyEntry]) -> bytes:
        cache: dict[str, tuple[ApplyEntry, bytes]] = {}
        items = []
        for rollout, entry in applies.items():
            known = self._applies.get(rollout)
            if known is None or known[0] is not entry:
                known = (entry, entry.model_dump_json().encode("utf-8"))
            cache[rollout] = known
            items.append(pydantic_core.to_json(rollout) + b":" + known[1])
        self._applies = cache
        return b"{" + b",".join(items) + b"}"

    def _encode_seen(self, seen: list[str]) -> bytes:
        if self._seen is None or self._seen[0] is not seen:
            self._seen = (seen, pydantic_core.to_json(seen))
        return self._seen[1]


class Journal:
    """Load and save the ``JournalState`` of one agent.

    Args:
        path: the journal file (``state_dir/journal.json``).
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._encoder = _Encoder()

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
        data = self._encoder.encode(state)
        try:
            write_atomic(self.path, data)
        except FileNotFoundError:  # the first write, or the state dir was removed meanwhile
            self.path.parent.mkdir(parents=True, exist_ok=True)
            write_atomic(self.path, data)

    async def write(self, state: JournalState) -> None:
        """``save`` from async code (``edge_agent.blocking``: a worker thread, or inline on RAM)."""
        await blocking.run(self.save, state)
