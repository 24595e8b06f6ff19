from __future__ import annotations

import json

import pytest

from bus.errors import InvalidInput
from bus.messages import NodeState
from tui.model import FleetModel
from tui.preview import compute_waves, make_preview, parse_spec

NOW = 1000.0
PLAN = [{"type": "service", "action": "restart", "name": "api"}]


def fleet() -> FleetModel:
    model = FleetModel()
    for i in range(1, 11):
        model.apply(
            NodeState(
                node=f"n{i}",
                state="offline" if i == 3 else "online",
                session="s",
                reason="lost" if i == 3 else "birth",
                labels={"site": "a" if i <= 5 else "b"},
            ),
            NOW,
        )
    return model


def spec(**fields: object) -> str:
    return json.dumps({"name": "x", "plan": PLAN, **fields})


def test_list_targets_flag_unknown_and_offline_nodes() -> None:
    preview = make_preview(parse_spec(spec(targets=["n1", "n3", "ghost"])), fleet().nodes, NOW)
    assert preview.targets == ["n1", "n3"]
    assert preview.unknown == ["ghost"]
    assert preview.offline == ["n3"]
    assert preview.problems == ["unknown targets: ghost", "offline targets: n3"]
    assert any("n3 (offline)" in line for line in preview.lines())


def test_offline_targets_are_no_problem_when_they_may_queue() -> None:
    preview = make_preview(parse_spec(spec(targets=["n1", "n3"], require_online=False)), fleet().nodes, NOW)
    assert preview.offline == ["n3"]
    assert preview.problems == []


def test_label_targets_and_waves_like_the_hub() -> None:
    text = spec(targets={"labels": {"site": "b"}}, strategy={"waves": [1, "50%"]})
    preview = make_preview(parse_spec(text), fleet().nodes, NOW)
    assert preview.targets == ["n10", "n6", "n7", "n8", "n9"]
    assert [len(w) for w in preview.waves] == [1, 3, 1]
    assert preview.problems == []


def test_all_targets_and_no_match() -> None:
    assert len(make_preview(parse_spec(spec(targets="all")), fleet().nodes, NOW).targets) == 10
    empty = make_preview(parse_spec(spec(targets={"labels": {"site": "z"}})), fleet().nodes, NOW)
    assert empty.problems == ["no node matches the targets"]


def test_compute_waves_counts_percents_and_repeat() -> None:
    nodes = [f"n{i}" for i in range(10)]
    assert [len(w) for w in compute_waves(nodes, [2])] == [2, 2, 2, 2, 2]
    assert [len(w) for w in compute_waves(nodes, ["100%"])] == [10]
    assert [len(w) for w in compute_waves(nodes, [1, "10%", "50%"])] == [1, 1, 5, 3]
    assert compute_waves([], ["100%"]) == []


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("{", "malformed JSON"),
        ("[1]", "must be a JSON object"),
        (json.dumps({"name": "x", "targets": "all"}), "plan"),
        (json.dumps({"name": "x", "targets": "all", "plan": PLAN, "bogus": 1}), "bogus"),
    ],
)
def test_bad_specs_are_refused_with_a_reason(text: str, reason: str) -> None:
    with pytest.raises(InvalidInput, match=reason):
        parse_spec(text)
