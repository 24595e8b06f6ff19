"""Per-node parameters in plans (DESIGN section 3, point 10).

A string field of a plan step may name the node it runs on: ``{node}`` is the
node's id and ``{labels.NAME}`` the value of its label ``NAME``. The hub checks
the names when a rollout is created (an unknown one is refused, naming it) and
signs the plan as written; each agent resolves it against its own id and
labels before a step runs, so one plan can carry each node's own port or path.

Only a brace pair around a name (letters, digits, ``_ . -``, starting with a
letter or ``_``) is a variable: JSON in a health check's ``expect``
(``{"status":"ok"}``) stays as it is, and ``{{``/``}}`` write a literal brace.

Works on plain JSON values (a step as ``model_dump(mode="json")`` gives it), so
the message models can use it without an import circle.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

from bus.errors import InvalidInput

__all__ = ["KNOWN", "label_names", "lacking_labels", "lacking_text", "resolve", "unknown_names", "variables"]

_TOKEN = re.compile(r"\{\{|\}\}|\{([A-Za-z_][A-Za-z0-9_.-]*)\}")
_LABEL = re.compile(r"^labels\.([A-Za-z0-9][A-Za-z0-9_./-]{0,62})$")
#: What a plan may name, for messages.
KNOWN = "{node}, {labels.NAME}"


def variables(value: Any, path: str = "") -> Iterator[tuple[str, str]]:
    """Yield ``(field path, variable name)`` for every variable in a JSON value."""
    if isinstance(value, str):
        for match in _TOKEN.finditer(value):
            if match.group(1) is not None:
                yield path, match.group(1)
    elif isinstance(value, Mapping):
        for key, item in value.items():
            yield from variables(item, f"{path}.{key}" if path else str(key))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from variables(item, f"{path}[{index}]")


def _is_known(name: str) -> bool:
    return name == "node" or _LABEL.match(name) is not None


def unknown_names(value: Any) -> list[tuple[str, str]]:
    """The ``(field path, name)`` pairs of a JSON value that name nothing a node has."""
    return [(path, name) for path, name in variables(value) if not _is_known(name)]


def label_names(value: Any) -> set[str]:
    """The label names a JSON value refers to (``{labels.port}`` -> ``port``)."""
    found = (_LABEL.match(name) for _, name in variables(value))
    return {match.group(1) for match in found if match is not None}


def lacking_labels(
    plan: Any, nodes: Iterable[str], labels: Callable[[str], Mapping[str, str]]
) -> dict[str, list[str]]:
    """The nodes lacking a label ``plan`` names, each with the names it lacks (sorted).

    Args:
        plan: JSON values (a plan's steps as ``model_dump(mode="json")`` gives them).
        nodes: the nodes to check, in the order they are reported.
        labels: a node's labels.

    Returns:
        {node: [label names it lacks]}; nodes lacking none are left out.
    """
    needed = label_names(plan)
    if not needed:
        return {}
    lacking: dict[str, list[str]] = {}
    for node in nodes:
        missing = sorted(needed - set(labels(node)))
        if missing:
            lacking[node] = missing
    return lacking


def lacking_text(lacking: Mapping[str, Iterable[str]]) -> str:
    """``lacking_labels`` as one line: ``web-1 has no rack; web-2 has no port, rack``."""
    return "; ".join(f"{node} has no {', '.join(names)}" for node, names in lacking.items())


def resolve(value: Any, node: str, labels: Mapping[str, str], path: str = "") -> Any:
    """``value`` with every variable replaced by the node's own id or label value.

    Raises:
        InvalidInput: a name that is unknown, or a label the node does not have
            (naming the field and the label).
    """
    if isinstance(value, str):
        return _TOKEN.sub(lambda match: _value_of(match, node, labels, path), value)
    if isinstance(value, Mapping):
        return {
            key: resolve(item, node, labels, f"{path}.{key}" if path else str(key))
            for key, item in value.items()
        }
    if isinstance(value, list):
        return [resolve(item, node, labels, f"{path}[{index}]") for index, item in enumerate(value)]
    return value


def _value_of(match: re.Match[str], node: str, labels: Mapping[str, str], path: str) -> str:
    token, name = match.group(0), match.group(1)
    if name is None:
        return token[0]  # "{{" -> "{", "}}" -> "}"
    if name == "node":
        return node
    label = _LABEL.match(name)
    if label is None:
        raise InvalidInput(f"{path}: unknown variable {{{name}}} (known: {KNOWN})")
    if label.group(1) not in labels:
        raise InvalidInput(f"{path}: node {node} has no label {label.group(1)!r} (for {{{name}}})")
    return labels[label.group(1)]
