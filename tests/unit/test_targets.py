"""One target resolution for the hub and the TUI's preview (``bus.targets``)."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from bus.messages import NodeState, RolloutSpec, Strategy, TargetLabels
from bus.targets import resolve_targets
from hub.core.registry import Registry
from tui.model import FleetModel
from tui.preview import make_preview

LABELS = {"b": {"site": "x"}, "a": {"site": "x"}, "c": {"site": "y"}}


def labels(node: str) -> dict[str, str]:
    return LABELS[node]


def test_a_list_keeps_its_order_and_drops_duplicate_names() -> None:
    known, unknown = resolve_targets(["c", "a", "ghost", "c", "a", "ghost"], LABELS, labels)
    assert (known, unknown) == (["c", "a"], ["ghost"])


def test_labels_and_all_give_known_nodes_sorted() -> None:
    assert resolve_targets(TargetLabels(labels={"site": "x"}), LABELS, labels) == (["a", "b"], [])
    assert resolve_targets("all", LABELS, labels) == (["a", "b", "c"], [])
    assert resolve_targets(TargetLabels(labels={"site": "z"}), LABELS, labels) == ([], [])


def test_the_hub_and_the_preview_resolve_duplicate_names_alike() -> None:
    # A spec refuses duplicate names; a target list that bypasses it (a stored record, a
    # constructed spec) resolves the same at the hub and in the TUI: the TUI's own copy
    # once kept the duplicates the hub drops, and previewed a node in two waves.
    targets = ["n2", "n1", "n2", "ghost", "ghost"]
    plan = [{"type": "script", "name": "a.sh"}]
    with pytest.raises(ValidationError, match="more than once"):
        RolloutSpec.model_validate({"name": "dup", "targets": targets, "plan": plan})
    registry = Registry()
    model = FleetModel()
    for node in ("n1", "n2"):
        state = NodeState(node=node, state="online", session="s", reason="birth", labels={})
        registry.on_state(state, 1000.0)
        model.apply(state, 1000.0)
    assert registry.resolve(targets) == (["n2", "n1"], ["ghost"])
    spec = RolloutSpec.model_validate({"name": "dup", "targets": "all", "plan": plan})
    spec = spec.model_copy(update={"targets": targets, "strategy": Strategy(waves=[1])})
    preview = make_preview(spec, model.nodes, 1000.0)
    assert (preview.targets, preview.unknown) == (["n2", "n1"], ["ghost"])
    assert preview.waves == [["n2"], ["n1"]]
