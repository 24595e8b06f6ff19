"""Filters and counts of the ``nodes`` request over a real registry."""

from __future__ import annotations

import pytest

from bus.errors import InvalidInput
from bus.messages import Inventory, NodeState
from hub.core.node_query import NodeQuery, summarise
from hub.core.registry import Registry


def _registry() -> Registry:
    reg = Registry(5.0)
    for index, (name, role, app) in enumerate(
        [("web-1", "web", "2.0"), ("web-2", "web", "1.0"), ("db-1", "db", "2.0"), ("edge-7", "edge", "")]
    ):
        services = {"app": app} if app else {}
        reg.on_state(
            NodeState(
                node=name,
                state="online",
                session=f"s{index}",
                reason="birth",
                labels={"role": role},
                agent_version="0.9",
                inventory=Inventory(services=services),
            ),
            100.0,
        )
    reg.on_state(NodeState(node="web-2", state="offline", session="s1", reason="lost"), 101.0)
    return reg


def _names(reg: Registry, body: dict[str, object]) -> list[str]:
    query = NodeQuery.parse(body)
    return [n for n in reg.nodes() if query.matches(reg.get(n))]


def test_each_filter_and_their_conjunction() -> None:
    reg = _registry()
    assert NodeQuery.parse({}).empty
    assert _names(reg, {}) == ["db-1", "edge-7", "web-1", "web-2"]
    assert _names(reg, {"state": "offline"}) == ["web-2"]
    assert _names(reg, {"node": "web-*"}) == ["web-1", "web-2"]
    assert _names(reg, {"node": "*-[17]"}) == ["db-1", "edge-7", "web-1"]
    assert _names(reg, {"node": "WEB-*"}) == []  # case-sensitive, as node ids are
    assert _names(reg, {"labels": {"role": "web"}}) == ["web-1", "web-2"]
    assert _names(reg, {"versions": {"app": "2.0"}}) == ["db-1", "web-1"]
    assert _names(reg, {"versions": {"app": None}}) == ["db-1", "web-1", "web-2"]
    assert _names(reg, {"versions": {"fleet-agent": "0.9"}, "state": "online", "node": "*1"}) == [
        "db-1",
        "web-1",
    ]
    assert _names(reg, {"labels": {"role": "web"}, "state": "online"}) == ["web-1"]


def test_summary_counts_by_state_and_version_most_common_first() -> None:
    reg = _registry()
    counts = summarise(reg.get(n) for n in reg.nodes())
    assert counts == {
        "total": 4,
        "by_state": {"online": 3, "offline": 1},
        "by_version": {"app": {"2.0": 2, "1.0": 1}, "fleet-agent": {"0.9": 4}},
    }
    assert summarise([]) == {"total": 0, "by_state": {"online": 0, "offline": 0}, "by_version": {}}


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"state": "asleep"}, "state"),
        ({"labels": ["role=web"]}, "labels"),
        ({"labels": {"role": 1}}, "labels"),
        ({"node": ""}, "node"),
        ({"node": 5}, "node"),
        ({"node": "x" * 201}, "node"),
        ({"versions": {"app": 2}}, "versions"),
        ({"versions": {"": "1"}}, "versions"),
    ],
)
def test_bad_filters_are_refused_naming_the_field(body: dict[str, object], field: str) -> None:
    with pytest.raises(InvalidInput, match=field):
        NodeQuery.parse(body)
