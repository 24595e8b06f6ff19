"""The README's annotated RolloutSpec is a valid spec once its comments are dropped."""

from __future__ import annotations

import json
import re
from pathlib import Path

from bus.messages import RolloutSpec, TargetLabels

README = Path(__file__).resolve().parents[2] / "README.md"


def test_the_annotated_rollout_spec_is_valid() -> None:
    text = README.read_text(encoding="utf-8")
    block = re.search(r"```jsonc\n(.*?)```", text, re.DOTALL)
    assert block is not None, "the README's annotated RolloutSpec is missing"
    plain = re.sub(r"\s+//[^\n]*", "", block.group(1)).replace("<64 hex digits>", "0" * 64)
    spec = RolloutSpec.model_validate(json.loads(plain))
    assert isinstance(spec.targets, TargetLabels)
    assert [step.type for step in spec.plan] == ["download", "service", "file", "service", "health"]
    assert "`fleet schema`" in text[: text.index("```jsonc")]
