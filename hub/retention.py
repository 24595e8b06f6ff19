"""Retention: the hub keeps its newest finished rollouts; older ones go to an archive file.

Every rollout the hub knows lives in its memory, in its database file (which
is rewritten whole on every group commit) and as a retained summary on the
broker. A 1000-node rollout is about 200 KB of record: kept forever, a
long-running hub would grow by that much per rollout, and every commit would
rewrite all of it. So only the newest ``keep`` finished rollouts stay; an
older one is appended to the archive (one JSON line with its record and its
audit trail, fsynced) before it leaves the database, the engine and the
broker. A crash between the two leaves it in both places, and the next
start archives it again: a rollout may appear twice in the archive, never
zero times.

Each line starts with ``{"rollout":"<id>",``, so ``Archive.holds`` finds a
rollout without parsing any record; the hub then says "archived" rather than
"unknown" for it. That scan reads the file, so it is only done for an id the
hub does not know, never at start-up.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from pathlib import Path
from typing import Any

from hub.store import write_synced

__all__ = ["Archive", "archive_path"]


def archive_path(db: Path) -> Path:
    """Where the archive of the database ``db`` lives: ``hub.json`` -> ``hub.archive.jsonl``."""
    return db.with_name(f"{db.stem}.archive.jsonl")


class Archive:
    """An append-only JSON-lines file of retired rollouts.

    Args:
        path: the archive file (created on the first retirement).
    """

    def __init__(self, path: Path) -> None:
        self.path = path

    async def holds(self, rollout: str) -> bool:
        """Whether ``rollout`` is in the archive (reads the file, in a worker thread)."""
        return await asyncio.to_thread(self._scan, _line_start(rollout))

    async def add(self, record: dict[str, Any], audit: list[dict[str, Any]]) -> None:
        """Append one retired rollout (its store record and audit entries), durably.

        Raises:
            OSError: the archive cannot be written; the rollout must then stay.
        """
        line = json.dumps(
            {"rollout": str(record["id"]), "archived_at": time.time(), "record": record, "audit": audit},
            ensure_ascii=False,
            separators=(",", ":"),
        )
        await asyncio.to_thread(self._append, line.encode("utf-8") + b"\n")

    def _append(self, data: bytes) -> None:
        write_synced(os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600), data)

    def _scan(self, start: bytes) -> bool:
        try:
            with self.path.open("rb") as lines:
                return any(line.startswith(start) for line in lines)
        except OSError:  # no archive yet (or unreadable): the id is simply unknown
            return False


def _line_start(rollout: str) -> bytes:
    """How the archive line of ``rollout`` begins (``add`` writes the id first)."""
    return b'{"rollout":' + json.dumps(rollout, ensure_ascii=False).encode("utf-8") + b","
