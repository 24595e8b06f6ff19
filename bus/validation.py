"""Validation errors in the user's terms: field paths as written, union noise folded.

pydantic reports the branch of a union in an error's ``loc``
(``plan.0.download.sha256``, ``targets.list[constrained-str]``); the user wrote
no such key. The HTTP bridge, the MQTT request path and the CLI all explain a
refused spec through ``explain``/``one_line`` so they name fields the same way.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from pydantic import ValidationError

__all__ = ["LISTED", "SHOWN", "explain", "one_line"]

#: Errors named in a one-line reason; ``explain`` lists up to ``LISTED`` of them.
SHOWN = 5
LISTED = 50


def _field_path(error: Any, data: Any) -> tuple[str, bool]:
    """The dotted path of a pydantic error in the user's terms, and whether it ends at a union.

    pydantic puts the branch of a union in ``loc`` (``plan.0.download.sha256``,
    ``targets.list[constrained-str]``); the user wrote no such key, so a segment
    that is not in the input is dropped, unless it names a missing field.
    """
    loc: Sequence[Any] = error.get("loc", ())
    parts: list[str] = []
    current = data
    at_union = False
    for i, segment in enumerate(loc):
        last = i == len(loc) - 1
        if isinstance(current, dict) and not last and current.get("type") == segment:
            continue  # a discriminated union's tag (the step type)
        in_dict = isinstance(current, dict) and segment in current
        in_list = isinstance(current, list) and isinstance(segment, int) and 0 <= segment < len(current)
        if in_dict or in_list:
            parts.append(str(segment))
            current = current[segment]
        elif last and error.get("type") == "missing":
            parts.append(str(segment))
        else:
            # A union branch's name: the error is about the value at this path.
            at_union = at_union or last
    return ".".join(parts) or "(body)", at_union


def explain(exc: ValidationError, data: Any) -> list[dict[str, str]]:
    """Every validation error as ``{"field", "message"}``, union noise folded.

    Errors of union branches whose value did not even have the branch's shape
    are dropped when another branch got deeper (``targets.0: ...`` beats
    ``targets: Input should be 'all'``); the rest at one path are joined.
    """
    found = [(*_field_path(err, data), str(err.get("msg", "invalid"))) for err in exc.errors()]
    paths = [path for path, _union, _msg in found]
    kept: dict[str, list[str]] = {}
    for path, at_union, message in found:
        deeper = any(other.startswith(path + ".") for other in paths) if path != "(body)" else False
        if at_union and deeper:
            continue
        messages = kept.setdefault(path, [])
        if message not in messages:
            messages.append(message)
    return [
        {
            "field": path,
            "message": messages[0]
            if len(messages) == 1
            else "matches none of the accepted forms: " + " | ".join(messages),
        }
        for path, messages in list(kept.items())[:LISTED]
    ]


def one_line(errors: list[dict[str, str]]) -> str:
    """The first few errors as ``field: message; ...`` on one line."""
    shown = "; ".join(f"{e['field']}: {e['message']}" for e in errors[:SHOWN])
    more = f" (+{len(errors) - SHOWN} more)" if len(errors) > SHOWN else ""
    return " ".join((shown + more).split())
