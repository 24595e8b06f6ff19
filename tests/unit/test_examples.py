"""The example rollouts in examples/ stay valid RolloutSpecs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bus.messages import RolloutSpec

EXAMPLES = sorted((Path(__file__).parents[2] / "examples").glob("*.json"))


def test_there_are_examples() -> None:
    assert len(EXAMPLES) >= 2


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_is_a_valid_spec(path: Path) -> None:
    spec = RolloutSpec.model_validate(json.loads(path.read_text()))
    assert spec.plan
