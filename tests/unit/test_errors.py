"""The error tree's one table: every class says what the hub, the HTTP bridge and the CLI make of it."""

from __future__ import annotations

import importlib
import pkgutil

import pytest

import bus
import edge_agent
import hub
from bus.errors import (
    BusError,
    ConfigError,
    Conflict,
    ErrorStatus,
    FleetError,
    InvalidInput,
    InvalidNodeId,
    NotFound,
    SignatureError,
    StepError,
    error_classes,
    reply_exit_code,
)

EXPECTED = {
    # class: (reply kind, HTTP status, exit raised in the CLI, exit for a hub's refusal)
    FleetError: ("error", 503, 2, 1),
    InvalidInput: ("invalid_input", 422, 2, 2),
    InvalidNodeId: ("invalid_input", 422, 2, 2),
    Conflict: ("conflict", 409, 2, 1),
    NotFound: ("not_found", 404, 2, 1),
    SignatureError: ("error", 503, 2, 1),
    ConfigError: ("config", 503, 2, 1),
    BusError: ("bus", 503, 1, 1),
    StepError: ("error", 503, 2, 1),
}


def _import_everything() -> None:
    """Import every module that may define an error class (the CLI and the TUI only use them)."""
    for package in (bus, hub, edge_agent):
        for info in pkgutil.walk_packages(package.__path__, f"{package.__name__}."):
            importlib.import_module(info.name)


def test_every_error_class_declares_its_own_status() -> None:
    _import_everything()
    classes = error_classes()
    assert set(EXPECTED) <= set(classes)
    for cls in classes:
        # Declared in the class itself: a new subclass decides, it does not inherit by accident.
        assert isinstance(cls.__dict__.get("status"), ErrorStatus), f"{cls.__qualname__} has no status"
        assert 400 <= cls.status.http <= 599
        assert cls.status.exit in (1, 2)
        assert cls.status.reply_exit in (1, 2)


@pytest.mark.parametrize("cls", list(EXPECTED))
def test_the_table_is_the_documented_one(cls: type[FleetError]) -> None:
    status = cls.status
    assert (status.kind, status.http, status.exit, status.reply_exit) == EXPECTED[cls]
    assert cls("why").status is status


def test_a_kind_maps_back_to_its_exit_code() -> None:
    assert reply_exit_code("invalid_input") == 2
    for kind in ("conflict", "not_found", "config", "bus", "error", "internal", "too_large", None, 3):
        assert reply_exit_code(kind) == 1


def test_the_docstring_table_matches_the_classes() -> None:
    import bus.errors

    doc = bus.errors.__doc__ or ""
    for cls, (kind, http, exit_code, reply_exit) in EXPECTED.items():
        if cls is InvalidNodeId:
            continue  # listed under InvalidInput
        row = f"{cls.__name__} {kind} {http} {exit_code} {reply_exit}"
        assert row in " ".join(doc.split()), row
