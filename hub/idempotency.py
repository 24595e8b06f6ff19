"""Idempotent rollout triggers: the same ``idempotency_key`` returns the same rollout.

A CI job that retries ``POST /api/updates`` after a timeout, or an operator
who presses the button twice, must not start two rollouts. A spec may carry
``idempotency_key`` (HTTP: the ``Idempotency-Key`` header); the hub keeps, per
key, the rollout it started and a fingerprint of the spec. Creating again with
the same key and the same spec answers ``{"rollout": <the first id>,
"existing": true}`` without starting anything; the same key with a different
spec is refused (Conflict, HTTP 409) rather than silently answered with a
rollout that does something else (as Stripe does with reused keys).

Keys live as long as their rollout records (the key is part of the stored
spec), so they survive a hub restart. Two concurrent requests with one key are
serialised: the second waits for the first and then finds its rollout. The
rollout manager checks the index inline, under ``serialised(key)``:
``earlier(spec)``, else create and ``add(spec, rollout)``.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
from collections.abc import AsyncIterator, Iterable, Mapping
from typing import Any

from pydantic import ValidationError

from bus.errors import Conflict
from bus.messages import RolloutSpec

__all__ = ["IdempotencyIndex", "spec_fingerprint"]


def spec_fingerprint(spec: RolloutSpec) -> str:
    """sha256 of the spec's canonical JSON, defaults filled in, without its key."""
    fields = spec.model_dump(mode="json", exclude={"idempotency_key"})
    text = json.dumps(fields, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


class IdempotencyIndex:
    """Key -> (rollout id, spec fingerprint) of every rollout created with a key."""

    def __init__(self) -> None:
        self._done: dict[str, tuple[str, str]] = {}
        self._locks: dict[str, tuple[asyncio.Lock, int]] = {}

    def load(self, records: Iterable[Mapping[str, Any]]) -> int:
        """Index stored rollout records (their ``spec``); return how many carried a key."""
        count = 0
        for record in records:
            try:
                spec = RolloutSpec.model_validate(record["spec"])
            except (KeyError, TypeError, ValidationError):
                continue
            if spec.idempotency_key is not None:
                self._done[spec.idempotency_key] = (str(record.get("id")), spec_fingerprint(spec))
                count += 1
        return count

    @contextlib.asynccontextmanager
    async def serialised(self, key: str) -> AsyncIterator[None]:
        """Hold ``key``: a second creation with the same key waits until the first is done."""
        lock, users = self._locks.get(key, (asyncio.Lock(), 0))
        self._locks[key] = (lock, users + 1)
        try:
            async with lock:
                yield
        finally:
            lock, users = self._locks[key]
            if users <= 1:
                del self._locks[key]
            else:
                self._locks[key] = (lock, users - 1)

    def earlier(self, spec: RolloutSpec) -> str | None:
        """The rollout an earlier creation with the spec's key started, or None (no key, or a new one).

        Raises:
            Conflict: the key was used before for a different spec.
        """
        key = spec.idempotency_key
        found = None if key is None else self._done.get(key)
        if found is None:
            return None
        rollout, seen = found
        if seen != spec_fingerprint(spec):
            raise Conflict(
                f"idempotency key {str(key)[:80]!r} was used for rollout {rollout} with a different "
                "spec: use a new key for a new rollout"
            )
        return rollout

    def add(self, spec: RolloutSpec, rollout: str) -> None:
        """Remember that ``rollout`` was created from ``spec`` (nothing without a key)."""
        if spec.idempotency_key is not None:
            self._done[spec.idempotency_key] = (rollout, spec_fingerprint(spec))
