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
serialised: the second waits for the first and then finds its rollout.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections.abc import Awaitable, Callable, Iterable, Mapping
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

    def lookup(self, key: str) -> str | None:
        """The rollout created with ``key``, or None."""
        found = self._done.get(key)
        return None if found is None else found[0]

    async def create(
        self, body: dict[str, Any], create: Callable[[dict[str, Any]], Awaitable[str]]
    ) -> dict[str, Any]:
        """``{"rollout": id}`` from ``create(body)``, or the rollout of an earlier call with the same key.

        Args:
            body: the request's RolloutSpec (unvalidated: ``create`` reports its errors).
            create: starts a rollout and returns its id (``RolloutManager._create``).

        Returns:
            ``{"rollout": id}``, plus ``"existing": true`` when the key was seen before.

        Raises:
            Conflict: the key was used before for a different spec.
            FleetError: whatever ``create`` raises.
        """
        try:
            spec = RolloutSpec.model_validate(body)
        except ValidationError:
            spec = None
        if spec is None or spec.idempotency_key is None:
            return {"rollout": await create(body)}
        key, fingerprint = spec.idempotency_key, spec_fingerprint(spec)
        lock, users = self._locks.get(key, (asyncio.Lock(), 0))
        self._locks[key] = (lock, users + 1)
        try:
            async with lock:
                found = self._done.get(key)
                if found is not None:
                    rollout, seen = found
                    if seen != fingerprint:
                        raise Conflict(
                            f"idempotency key {key[:80]!r} was used for rollout {rollout} with a different "
                            "spec: use a new key for a new rollout"
                        )
                    return {"rollout": rollout, "existing": True}
                rollout = await create(body)
                self._done[key] = (rollout, fingerprint)
                return {"rollout": rollout}
        finally:
            lock, users = self._locks[key]
            if users <= 1:
                del self._locks[key]
            else:
                self._locks[key] = (lock, users - 1)
