"""The hub's TinyDB file: an in-memory mirror, group commits, atomic rewrites (DESIGN section 6).

The file is a TinyDB JSON database (``{table: {key: document}}``) with the
tables ``rollouts``, ``executions``, ``nodes`` and ``audit``. TinyDB rewrites
the whole file on every write, so the hub never writes through TinyDB's
``Table`` layer (which also re-reads and converts the whole table on every
insert): reads are served from an in-memory mirror, ``put`` only changes the
mirror, and a background task writes the mirror out through one TinyDB
``Storage`` class at most once per ``commit_interval_s`` (group commit). A
burst of 1000 puts therefore costs a handful of rewrites, not 1000.

Each rewrite (``bus.files.write_atomic``) goes to a random-named, no-follow
temp file in the same directory, is fsynced, replaces
the file with ``os.replace`` and fsyncs the directory, so a crash at any moment
leaves either the old or the new file, never a torn one. A commit writes a
snapshot taken between two puts, so what is on disk is always a prefix of the
puts made. Documents are JSON-encoded when they are put (bad documents fail
there, at the caller) and the writer thread only joins the encoded parts, so
the event loop never waits for the disk nor for a big ``json.dumps``.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import logging
import os
import re
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tinydb.storages import Storage

from bus.errors import ConfigError, FleetError, InvalidInput
from bus.files import write_all, write_atomic

__all__ = ["TABLES", "AtomicJSONStorage", "Store", "write_synced"]

_LOGGER = logging.getLogger(__name__)

#: The tables the hub keeps (DESIGN section 6); others may be used too.
TABLES = ("rollouts", "executions", "nodes", "audit")

_TABLE_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]{0,63}")
_RETRY_S = 1.0  # wait before retrying a failed commit


def write_synced(fd: int, data: bytes) -> None:
    """Write all of ``data`` to ``fd``, fsync it and close it (the caller opened it). Blocking."""
    try:
        write_all(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


def _encode(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, allow_nan=False, separators=(",", ":"))


_PLAIN_KEY = re.compile(r"[A-Za-z0-9_.:-]*")


def _key(key: str) -> str:
    """A document key as JSON (node ids, rollout ids and counters need no escaping: the common case)."""
    return f'"{key}"' if _PLAIN_KEY.fullmatch(key) else _encode(key)


class AtomicJSONStorage(Storage):
    """A TinyDB storage that replaces the whole file atomically on every write.

    Blocking: every method does file I/O. Call through asyncio.to_thread.
    """

    def __init__(self, path: Path) -> None:
        super().__init__()
        self.path = path

    def read(self) -> dict[str, dict[str, Any]] | None:
        """The database as a dict, or None when the file does not exist.

        Raises:
            ConfigError: the file cannot be read, is empty, is not JSON or not
                a TinyDB database (``{table: {key: document}}``).
        """
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise ConfigError(f"cannot read hub database {self.path}: {exc.strerror or exc}") from exc
        hint = "move it aside (the hub then starts empty) or restore a backup"
        if not data.strip():
            raise ConfigError(f"hub database {self.path} is empty: {hint}")
        try:
            value = json.loads(data)
        except (ValueError, RecursionError) as exc:
            raise ConfigError(f"hub database {self.path} is not valid JSON ({exc}): {hint}") from exc
        if not isinstance(value, dict) or not all(
            isinstance(table, dict) and all(isinstance(doc, dict) for doc in table.values())
            for table in value.values()
        ):
            raise ConfigError(f"hub database {self.path} is not a TinyDB database: {hint}")
        return value

    def write(self, data: dict[str, dict[str, Any]]) -> None:
        """Replace the file with ``data`` (TinyDB's storage interface)."""
        self.write_bytes(_encode(data).encode("utf-8"))

    def write_bytes(self, data: bytes | Sequence[bytes]) -> None:
        """Replace the file with ``data`` (or its chunks): temp file, fsync, rename, fsync the directory."""
        write_atomic(self.path, data, 0o600)


class Store:
    """Keyed JSON documents in tables, durable through group-committed atomic rewrites.

    Reads and ``put``/``delete``/``append`` are synchronous and touch memory
    only; ``flush`` (and ``close``) wait until everything put so far is on
    disk. Only one process may open a database file at a time.

    Args:
        path: the TinyDB JSON file (created on the first commit).
        commit_interval_s: how long a commit waits to gather more writes.
    """

    def __init__(self, path: Path, *, commit_interval_s: float = 0.05) -> None:
        self.path = Path(path)
        self._interval = commit_interval_s
        self._storage = AtomicJSONStorage(self.path)
        self._tables: dict[str, dict[str, str]] = {}
        #: per table: the store version of its latest change; and the JSON of each table as
        #: last written, with that version (a commit joins again only the tables that changed)
        self._table_versions: dict[str, int] = {}
        self._written: dict[str, tuple[int, bytes]] = {}
        #: (the committer's own) per table and key: the document it last wrote and its
        #: ``"key":{...}`` bytes, so a table that changed encodes again only its changed documents
        self._items: dict[str, dict[str, tuple[str, bytes]]] = {}
        self._counters: dict[str, int] = {}
        self._version = 0
        self._committed = 0
        self._dirty = asyncio.Event()
        self._now = asyncio.Event()
        self._committed_event = asyncio.Event()
        self._error: BaseException | None = None
        self._task: asyncio.Task[None] | None = None
        self._lock_fd: int | None = None
        self._open = False
        #: How many times the file was rewritten.
        self.rewrites = 0
        #: Seconds the last commit took (for metrics).
        self.last_commit_s = 0.0

    # ------------------------------------------------------------------ lifecycle

    async def open(self) -> None:
        """Load the file into memory and start the committer.

        Raises:
            ConfigError: the file is corrupt, unreadable, or used by another process.
        """
        if self._open:
            return
        self._lock_fd = await asyncio.to_thread(self._lock)
        try:
            data = await asyncio.to_thread(self._storage.read)
        except BaseException:
            self._unlock()
            raise
        self._tables = {
            table: {str(key): _encode(doc) for key, doc in docs.items()}
            for table, docs in (data or {}).items()
        }
        self._counters = {table: self._last_number(docs) for table, docs in self._tables.items()}
        # (what was written before a reopen is not the file)
        self._table_versions, self._written, self._items = {}, {}, {}
        self._open = True
        self._task = asyncio.create_task(self._commit_loop(), name=f"store-commit-{self.path.name}")
        _LOGGER.debug("opened %s: %s", self.path, {t: len(d) for t, d in self._tables.items()})

    async def close(self) -> None:
        """Flush everything and stop the committer."""
        if not self._open:
            return
        try:
            await self.flush()
        finally:
            self._open = False
            if self._task is not None:
                self._task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await self._task
                self._task = None
            self._unlock()

    def _lock(self) -> int:
        """Take the database's lock file. Blocking: call through asyncio.to_thread."""
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path.with_name(f".{self.path.name}.lock"), os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as exc:
            raise ConfigError(f"cannot open hub database {self.path}: {exc.strerror or exc}") from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            raise ConfigError(f"hub database {self.path} is in use by another process") from exc
        return fd

    def _unlock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # releases the flock
            self._lock_fd = None

    # ------------------------------------------------------------------ reads

    def get(self, table: str, key: str) -> dict[str, Any] | None:
        """A copy of one document, or None."""
        raw = self._tables.get(table, {}).get(key)
        return None if raw is None else self._decode(raw)

    def all(self, table: str) -> list[dict[str, Any]]:
        """Copies of every document of ``table``, in insertion order."""
        return [self._decode(raw) for raw in self._tables.get(table, {}).values()]

    def keys(self, table: str) -> list[str]:
        """Every key of ``table``, in insertion order."""
        return list(self._tables.get(table, {}))

    def items(self, table: str) -> list[tuple[str, dict[str, Any]]]:
        """Every (key, document) of ``table``, in insertion order."""
        return [(key, self._decode(raw)) for key, raw in self._tables.get(table, {}).items()]

    @staticmethod
    def _decode(raw: str) -> dict[str, Any]:
        value: dict[str, Any] = json.loads(raw)
        return value

    # ------------------------------------------------------------------ writes

    def put(self, table: str, key: str, doc: dict[str, Any]) -> None:
        """Insert or replace one document: in memory now, on disk at the next group commit.

        Raises:
            InvalidInput: the document is not a JSON object (or holds NaN, sets...).
        """
        self._check_put(table, key)
        self._tables.setdefault(table, {})[key] = self._encode_doc(doc)
        self._changed(table)

    def put_encoded(self, table: str, key: str, text: str) -> None:
        """``put`` of a document the caller encoded as a JSON object (``hub.core.state.EncodedRecord``).

        Raises:
            InvalidInput: ``text`` is not a JSON object's text.
        """
        self._check_put(table, key)
        if not (text.startswith("{") and text.endswith("}")):
            raise InvalidInput("an encoded document must be a JSON object's text")
        self._tables.setdefault(table, {})[key] = text
        self._changed(table)

    def delete(self, table: str, key: str) -> None:
        """Remove one document (nothing happens if it does not exist)."""
        self._check_writable(table)
        docs = self._tables.get(table)
        if docs is not None and docs.pop(key, None) is not None:
            self._changed(table)

    def append(self, table: str, doc: dict[str, Any]) -> str:
        """Add a document under a new key (ascending, zero-padded); return the key."""
        self._check_writable(table)
        raw = self._encode_doc(doc)
        number = self._counters.get(table, 0) + 1
        self._counters[table] = number
        key = f"{number:012d}"
        self._tables.setdefault(table, {})[key] = raw
        self._changed(table)
        return key

    async def flush(self) -> None:
        """Return once everything put so far is on disk.

        Raises:
            FleetError: the file cannot be written (disk full, permissions...).
        """
        if not self._open:
            return
        target = self._version
        while self._committed < target:
            if self._task is None or self._task.done():
                raise FleetError(f"hub database {self.path}: committer is not running")
            self._committed_event.clear()
            self._now.set()
            await self._committed_event.wait()
            if self._committed < target and self._error is not None:
                raise FleetError(f"cannot write hub database {self.path}: {self._error}")

    def _check_writable(self, table: str) -> None:
        if not self._open:
            raise RuntimeError("store is not open")
        if not _TABLE_NAME.fullmatch(table):
            raise InvalidInput(f"invalid table name {table!r}")

    def _check_put(self, table: str, key: str) -> None:
        self._check_writable(table)
        if not isinstance(key, str) or not key:
            raise InvalidInput(f"store key must be a non-empty string, not {key!r}")

    @staticmethod
    def _encode_doc(doc: dict[str, Any]) -> str:
        if not isinstance(doc, dict):
            raise InvalidInput(f"a stored document must be a JSON object, not {type(doc).__name__}")
        try:
            return _encode(doc)
        except (TypeError, ValueError, RecursionError) as exc:
            raise InvalidInput(f"document cannot be stored as JSON: {exc}") from exc

    def _changed(self, table: str) -> None:
        self._version += 1
        self._table_versions[table] = self._version
        self._dirty.set()

    @staticmethod
    def _last_number(docs: dict[str, str]) -> int:
        numbers = [int(key) for key in docs if key.isdigit()]
        return max(numbers, default=0)

    # ------------------------------------------------------------------ committer

    async def _commit_loop(self) -> None:
        while True:
            await self._dirty.wait()
            if not self._now.is_set():
                # Gather the rest of the burst; a flush cuts the wait short.
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._now.wait(), self._interval)
            self._dirty.clear()
            self._now.clear()
            version = self._version
            # A consistent snapshot between two puts; documents are immutable strings. A table
            # unchanged since the last commit is not copied: its JSON is written as it was.
            snapshot = {
                table: (
                    self._table_versions.get(table, 0),
                    None if self._is_written(table) else dict(docs),
                )
                for table, docs in self._tables.items()
            }
            started = time.monotonic()
            try:
                await asyncio.to_thread(self._write_snapshot, snapshot)
            except OSError as exc:
                self._error = exc
                _LOGGER.error("cannot write hub database %s: %s (retrying)", self.path, exc)  # noqa: TRY400
                self._dirty.set()
                self._committed_event.set()
                await asyncio.sleep(_RETRY_S)
                continue
            self._error = None
            self.last_commit_s = time.monotonic() - started
            self.rewrites += 1
            self._committed = version
            self._committed_event.set()

    def _is_written(self, table: str) -> bool:
        written = self._written.get(table)
        return written is not None and written[0] == self._table_versions.get(table, 0)

    def _write_snapshot(self, snapshot: dict[str, tuple[int, dict[str, str] | None]]) -> None:
        """Join the encoded documents and replace the file. Blocking: call through asyncio.to_thread."""
        chunks = [b"{"]
        for table, (version, docs) in snapshot.items():
            if docs is None:
                text = self._written[table][1]
            else:
                before = self._items.get(table, {})
                items: dict[str, tuple[str, bytes]] = {}
                for key, raw in docs.items():
                    item = before.get(key)
                    if item is None or item[0] is not raw:  # (documents are immutable strings)
                        item = (raw, f"{_key(key)}:{raw}".encode())
                    items[key] = item
                self._items[table] = items
                text = b"".join(
                    [_encode(table).encode(), b":{", b",".join(i[1] for i in items.values()), b"}"]
                )
            if len(chunks) > 1:
                chunks.append(b",")
            chunks.append(text)
            self._written[table] = (version, text)  # (a table's text, whether or not the write succeeds)
        chunks.append(b"}")
        self._storage.write_bytes(chunks)
