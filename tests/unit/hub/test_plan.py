"""hub.plan without a network: drafts, timing estimates, the text, and folding pre-flight answers."""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Sequence
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from bus.errors import InvalidInput
from bus.messages import PLAN_PREFIX, Command, NodeState, RolloutSpec, StepStatus, loads_object
from bus.plan_view import NOTICE, plan_lines
from bus.signing import public_key_of, verify_fields
from bus.topics import Topics
from hub.core.plan import add_parameters, build_draft, estimate, labels_from, skeleton
from hub.core.registry import Registry
from hub.plan import Planner
from hub.requests import plan_request

TOPICS = Topics("fleet/v1")
SPEC: dict[str, Any] = {
    "name": "app 2.0",
    "targets": ["n1", "n2", "n3", "n4"],
    "plan": [
        {"type": "script", "name": "install.sh", "timeout_s": 60},
        {
            "type": "health",
            "check": "command",
            "target": "check.sh",
            "retries": 3,
            "interval_s": 5,
            "timeout_s": 10,
        },
    ],
    "strategy": {"waves": [1, "50%"], "soak_s": 30, "max_parallel": 2},
}


def spec(**changes: Any) -> RolloutSpec:
    return RolloutSpec.model_validate({**SPEC, **changes})


def test_draft_resolves_like_create_and_splits_like_the_engine() -> None:
    draft = build_draft(spec(), ["n1", "n2", "n3", "n4"], ["ghost"], lambda n: n != "n3", ["n4"])
    assert draft.waves == [["n1"], ["n2", "n3"], ["n4"]]
    assert draft.offline == ["n3"]
    assert draft.asked == ["n1", "n2", "n4"]
    assert draft.unknown == ["ghost"]
    assert draft.busy == ["n4"]


def test_estimate_is_a_worst_case_from_timeouts_rounds_and_soak() -> None:
    timing = estimate(spec(), [1, 2, 1])
    node = 60 + 3 * 10 + 2 * 5  # script + health retries and intervals
    assert timing["node_worst_case_s"] == node
    assert [w["rounds"] for w in timing["waves"]] == [1, 1, 1]
    assert timing["worst_case_s"] == 3 * (node + 30)
    parallel_one = estimate(spec(strategy={"waves": ["100%"], "max_parallel": 1}), [4])
    assert parallel_one["waves"][0]["rounds"] == 4
    capped = estimate(spec(node_timeout_s=50), [1])
    assert capped["node_worst_case_s"] == 50


def test_parameters_per_node_and_a_lacking_label_is_a_problem_as_at_create() -> None:
    registry = Registry()
    for node, labels in (("n1", {"port": "81"}), ("n2", {})):
        state = NodeState(node=node, state="online", session="s", reason="birth", labels=labels)
        registry.on_state(state, 1000.0)
    templated = spec(plan=[{"type": "script", "name": "a.sh", "args": ["{node}", "--port={labels.port}"]}])
    draft = build_draft(templated, ["n1", "n2", "n3"], [], lambda _n: True, [])
    result = skeleton(draft)
    add_parameters(draft, result, labels_from(registry))  # n3: unknown to the registry, no labels
    assert result["parameters"] == {"n1": {"step 1 (script) args": '["n1", "--port=81"]'}}
    assert result["problems"] == [
        "n2: the plan names label(s) it does not have: port",
        "n3: the plan names label(s) it does not have: port",
    ]


def test_plan_text_is_always_labelled_a_plan() -> None:
    body = {
        "name": "app 2.0",
        "ok": False,
        "targets": ["n1", "n2"],
        "offline": ["n2"],
        "waves": [["n1", "n2"]],
        "estimate": {"worst_case_s": 600},
        "problems": ["offline targets: n2"],
        "warnings": [],
        "preflight": {
            "asked": 1,
            "passed": 0,
            "failed": 1,
            "unanswered": 0,
            "nodes": {"n1": {"state": "failed", "detail": "script missing"}},
        },
    }
    lines = plan_lines(body)
    assert lines[0] == "PLAN (dry run) of app 2.0: nothing was started"
    assert "timing    1 wave(s), at most 10 min" in lines
    assert "wave 1    2: n1, n2 (offline)" in lines
    assert "  n1: failed: script missing" in lines
    assert "! offline targets: n2" in lines
    assert lines[-1] == "verdict   would fail: see !"


class Nodes:
    """Pre-flight peers: each answers a published command through ``Planner.take``."""

    def __init__(
        self, key: Ed25519PrivateKey, answers: dict[str, Sequence[tuple[int, str, str, str]]]
    ) -> None:
        self.key = key
        self.answers = answers
        self.planner: Planner | None = None
        self.sent: list[tuple[str, dict[str, Any], bool]] = []
        self.tasks: set[asyncio.Task[None]] = set()

    async def publish(self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False) -> None:
        fields = loads_object(payload)
        verify_fields(fields, [public_key_of(self.key)])
        self.sent.append((topic, fields, retain))
        command = Command.model_validate(fields)
        task = asyncio.create_task(self._answer(command))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _answer(self, command: Command) -> None:
        await asyncio.sleep(0)
        assert self.planner is not None
        for index, kind, state, detail in self.answers.get(command.node, ()):
            status = StepStatus.model_validate(
                {
                    "node": command.node,
                    "command": command.id,
                    "rollout": command.rollout,
                    "index": index,
                    "type": kind,
                    "state": state,
                    "ts": time.time(),
                    "detail": detail,
                }
            )
            assert self.planner.take(command.node, status)


def planner(nodes: Nodes, online: set[str], known: list[str], busy: Sequence[str] = ()) -> Planner:
    ids = (f"id{i}" for i in itertools.count())
    result = Planner(
        topics=TOPICS,
        publish=nodes.publish,
        resolve=lambda targets: ([n for n in targets if n in known], [n for n in targets if n not in known]),
        is_online=lambda n: n in online,
        busy=lambda names: [n for n in names if n in busy],
        signing_key=nodes.key,
        clock=time.time,
        new_id=lambda: next(ids),
    )
    nodes.planner = result
    return result


async def test_planner_collects_each_nodes_preflight() -> None:
    key = Ed25519PrivateKey.generate()
    passed = [
        (0, "script", "succeeded", "ok"),
        (-1, "disk", "succeeded", "9 GiB free"),
        (-1, "preflight", "succeeded", "2 passed"),
    ]
    failed = [
        (0, "script", "failed", "script install.sh not found"),
        (-1, "preflight", "failed", "first: step 0 (script): script install.sh not found"),
    ]
    nodes = Nodes(key, {"n1": passed, "n2": failed, "n4": [(-1, "command", "rejected", "no trusted key")]})
    result = await planner(nodes, {"n1", "n2", "n4"}, ["n1", "n2", "n3", "n4"]).plan(
        plan_request({"spec": SPEC, "preflight_timeout_s": 5})
    )
    assert (result["kind"], result["dry_run"], result["notice"]) == ("plan", True, NOTICE)
    # Signed, unretained, on each online node's own cmd topic, a plan- id in "rollout".
    expected = [TOPICS.node(n, "cmd") for n in ("n1", "n2", "n4")]
    assert sorted(topic for topic, _f, _r in nodes.sent) == expected
    assert {retain for _t, _f, retain in nodes.sent} == {False}
    assert {f["action"] for _t, f, _r in nodes.sent} == {"preflight"}
    assert all(f["rollout"].startswith(PLAN_PREFIX) for _t, f, _r in nodes.sent)
    pre = result["preflight"]
    assert (pre["asked"], pre["passed"], pre["failed"], pre["unanswered"]) == (3, 1, 1, 1)
    assert pre["nodes"]["n1"]["state"] == "passed"
    assert [c["type"] for c in pre["nodes"]["n1"]["checks"]] == ["script", "disk"]
    assert pre["nodes"]["n2"] == {
        "state": "failed",
        "detail": "first: step 0 (script): script install.sh not found",
        "checks": [
            {"index": 0, "type": "script", "state": "failed", "detail": "script install.sh not found"}
        ],
    }
    assert pre["nodes"]["n4"]["state"] == "rejected"
    assert result["ok"] is False
    assert result["offline"] == ["n3"]
    assert "offline targets: n3 (set require_online false to queue them)" in result["problems"]
    assert any(p.startswith("n2: pre-flight failed") for p in result["problems"])
    assert any(
        p.startswith("n4: pre-flight rejected: rejected the pre-flight: no trusted key")
        for p in result["problems"]
    )


async def test_silent_nodes_are_named_after_the_timeout_and_late_answers_are_swallowed() -> None:
    key = Ed25519PrivateKey.generate()
    nodes = Nodes(key, {"n1": [(-1, "preflight", "succeeded", "ok")]})
    planning = planner(nodes, {"n1", "n2"}, ["n1", "n2"])
    started = time.monotonic()
    result = await planning.plan(
        plan_request({"spec": {**SPEC, "targets": ["n1", "n2"]}, "preflight_timeout_s": 0.3})
    )
    assert time.monotonic() - started < 5
    assert result["preflight"]["nodes"]["n2"] == {
        "state": "no_answer",
        "detail": "no pre-flight answer within 0.3 s",
        "checks": [],
    }
    late = StepStatus.model_validate(
        {
            "node": "n2",
            "command": "x",
            "rollout": "plan-old",
            "index": -1,
            "type": "preflight",
            "state": "succeeded",
            "ts": 1.0,
        }
    )
    assert planning.take("n2", late)  # a plan's answer never reaches the engine
    normal = late.model_copy(update={"rollout": "r-1"})
    assert not planning.take("n2", normal)


async def test_all_good_and_no_preflight_option() -> None:
    key = Ed25519PrivateKey.generate()
    nodes = Nodes(key, {})
    body = {"spec": {**SPEC, "targets": ["n1"]}, "preflight": False}
    result = await planner(nodes, {"n1"}, ["n1"]).plan(plan_request(body))
    assert nodes.sent == []
    assert result["ok"] is True
    assert result["preflight"]["skipped"] == "not asked"
    assert result["waves"] == [["n1"]]


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"spec": SPEC, "preflight_timeout_s": 0}, "preflight_timeout_s must be above 0"),
        ({"spec": SPEC, "preflight_timeout_s": 500}, "at most 120"),
        ({"spec": SPEC, "preflight": "yes"}, "preflight must be true or false"),
        ({"spec": SPEC, "colour": "red"}, "unknown plan option(s): colour"),
        ({**SPEC, "plan": []}, "invalid rollout spec: plan"),
    ],
)
def test_bad_plan_requests_name_the_problem(body: dict[str, Any], message: str) -> None:
    # Decoded at the edge (hub.requests): the planner never sees a bad body.
    with pytest.raises(InvalidInput, match=message.replace("(", r"\(").replace(")", r"\)")):
        plan_request(body)


def test_the_tui_asks_for_the_hubs_plan_within_its_request_timeout() -> None:
    from tui.preview import hub_plan_lines, plan_request

    assert plan_request(SPEC, 30.0) == {"spec": SPEC, "preflight_timeout_s": 10.0}
    assert plan_request(SPEC, 8.0)["preflight_timeout_s"] == 5.0
    assert plan_request(SPEC, 2.0)["preflight_timeout_s"] == 1.0
    assert hub_plan_lines({"name": "x", "ok": True})[0] == "PLAN (dry run) of x: nothing was started"


async def test_a_big_fleet_counts_clean_nodes_and_lists_only_findings() -> None:
    key = Ed25519PrivateKey.generate()
    names = [f"n{i:03d}" for i in range(250)]
    answers: dict[str, Sequence[tuple[int, str, str, str]]] = {
        n: [(-1, "preflight", "succeeded", "ok")] for n in names
    }
    answers["n007"] = [(0, "script", "failed", "gone"), (-1, "preflight", "failed", "gone")]
    nodes = Nodes(key, answers)
    body = {"spec": {**SPEC, "targets": names}, "preflight_timeout_s": 10}
    result = await planner(nodes, set(names), names).plan(plan_request(body))
    pre = result["preflight"]
    assert (pre["asked"], pre["passed"], pre["failed"]) == (250, 249, 1)
    assert list(pre["nodes"]) == ["n007"]
    assert pre["listed"] == "nodes with findings (clean ones are counted)"
