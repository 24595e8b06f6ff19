"""Issue 16: names and labels that reach operators' terminals carry no control characters."""

from __future__ import annotations

import json
from typing import Any

import pytest
from pydantic import ValidationError

from bus.errors import InvalidInput
from bus.messages import NodeState, RolloutSpec, decode

ATTACKS = ["\x1b]0;owned\x07", "\x1b[2J\x1b[31mred", "two\nlines", "bell\x07", "c1\x9b31m", "del\x7f"]


def spec(**over: Any) -> dict[str, Any]:
    return {"name": "ok", "targets": "all", "plan": [{"type": "script", "name": "a.sh"}], **over}


@pytest.mark.parametrize("text", ATTACKS)
def test_a_rollout_name_with_control_characters_is_refused(text: str) -> None:
    with pytest.raises(ValidationError, match="control characters"):
        RolloutSpec.model_validate(spec(name=f"update {text}"))


@pytest.mark.parametrize("text", ATTACKS)
def test_target_labels_with_control_characters_are_refused(text: str) -> None:
    with pytest.raises(ValidationError, match="control characters"):
        RolloutSpec.model_validate(spec(targets={"labels": {"role": text}}))


@pytest.mark.parametrize("text", ATTACKS)
def test_a_node_announcing_labels_with_control_characters_is_refused(text: str) -> None:
    for labels in ({"role": text}, {text: "web"}):
        birth: dict[str, Any] = {"v": 1, "node": "n1", "state": "online", "session": "s1", "reason": "birth"}
        birth["labels"] = labels
        with pytest.raises(InvalidInput, match="control characters"):
            decode(NodeState, json.dumps(birth).encode())


def test_printable_unicode_is_still_fine() -> None:
    assert RolloutSpec.model_validate(spec(name="Café 2.0 — wave ✓")).name == "Café 2.0 — wave ✓"
    birth = {"v": 1, "node": "n1", "state": "online", "session": "s1", "reason": "birth",
             "labels": {"site": "Zürich"}}  # fmt: skip
    assert decode(NodeState, json.dumps(birth).encode()).labels == {"site": "Zürich"}
