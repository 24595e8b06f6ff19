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

Each line starts with ``{"rollout":"<id>"``, so the ids of an archive can be
read back without parsing the records (``Archive.load``); the hub then says
"archived" rather than "unknown" for them.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any

from hub.store import write_synced

__all__ = ["Archive", "archive_path"]

_ID_AT_START = re.compile(rb'^\{"rollout":"([^"\\]{1,128})"')


def archive_path(db: Path) -> Path:
    """Where the archive of the database ``db`` lives: ``hub.json`` -> ``hub.archive.jsonl``."""
    return db.with_name(f"{db.stem}.archive.jsonl")


class Archive:
    """An append-only JSON-lines file of retired rollouts, and the ids it holds.

    Args:
        path: the archive file (created on the first retirement).
        remember: how many archived ids are kept in memory (the newest).
    """

    def __init__(self, path: Path, *, remember: int = 100_000) -> None:
        self.path = path
        self._remember = remember
        self._ids: OrderedDict[str, None] = OrderedDict()

    def holds(self, rollout: str) -> bool:
        """Whether ``rollout`` was archived (as far as this process knows)."""
        return rollout in self._ids

    async def load(self) -> int:
        """Read the ids of an existing archive; return how many there are."""
        ids = await asyncio.to_thread(self._read_ids)
        for rollout in ids:
            self._note(rollout)
        return len(ids)

    async def add(self, record: dict[str, Any], audit: list[dict[str, Any]]) -> None:
        """Append one retired rollout (its store record and audit entries), durably.

        Raises:
            OSError: the archive cannot be written; the rollout must then stay.
        """
        rollout = str(record["id"])
        line = json.dumps(
            {"rollout": rollout, "archived_at": time.time(), "record": record, "audit": audit},
            ensure_ascii=False,
            separators=(",", ":"),
        )
        await asyncio.to_thread(self._append, line.encode("utf-8") + b"\n")
        self._note(rollout)

    def _note(self, rollout: str) -> None:
        self._ids[rollout] = None
        self._ids.move_to_end(rollout)
        while len(self._ids) > self._remember:
            self._ids.popitem(last=False)

    def _append(self, data: bytes) -> None:
        write_synced(os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600), data)

    def _read_ids(self) -> list[str]:
        try:
            with self.path.open("rb") as lines:
                return [
                    match.group(1).decode("utf-8", "replace")
                    for line in lines
                    if (match := _ID_AT_START.match(line)) is not None
                ]
        except FileNotFoundError:
            return []
