"""Per-node parameters in plans: checked at create time, resolved by each node (DESIGN 3.10)."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from bus import params
from bus.errors import InvalidInput
from bus.messages import HealthStep, RolloutSpec, ScriptStep, plan_for_node

LABELS = {"port": "8081", "role": "web"}


def spec(*steps: dict[str, Any]) -> RolloutSpec:
    return RolloutSpec.model_validate({"name": "per-node", "targets": "all", "plan": list(steps)})


def test_node_and_labels_are_replaced_in_every_string_field() -> None:
    step = {"type": "script", "name": "deploy.sh", "args": ["--node", "{node}", "--port={labels.port}"]}
    assert params.resolve(step, "web-1", LABELS) == {
        "type": "script",
        "name": "deploy.sh",
        "args": ["--node", "web-1", "--port=8081"],
    }


def test_json_braces_and_doubled_braces_stay_literal() -> None:
    value = '{"status":"ok","node":"{node}"} {{node}}'
    assert params.resolve(value, "n1", {}) == '{"status":"ok","node":"n1"} {node}'
    assert list(params.variables(value)) == [("", "node")]


def test_unknown_names_are_listed_with_their_field() -> None:
    step = {
        "type": "health",
        "check": "http",
        "target": "http://{host}:{labels.port}/",
        "verify": {"expect": "{v}"},
    }
    assert params.unknown_names(step) == [("target", "host"), ("verify.expect", "v")]
    assert params.label_names(step) == {"port"}


def test_a_spec_naming_an_unknown_variable_is_refused_naming_it() -> None:
    with pytest.raises(
        ValidationError, match=r"plan step 2 \(health\) target: unknown variable \{hostname\}"
    ):
        spec(
            {"type": "service", "action": "stop", "name": "app"},
            {"type": "health", "check": "http", "target": "http://{hostname}:8080/"},
        )


def test_a_spec_with_known_variables_is_taken_as_written() -> None:
    created = spec({"type": "health", "check": "http", "target": "http://127.0.0.1:{labels.port}/v"})
    step = created.plan[0]
    assert isinstance(step, HealthStep)
    assert step.target == "http://127.0.0.1:{labels.port}/v"  # signed as written, resolved by the node


def test_the_plan_for_a_node_is_resolved_and_validated_again() -> None:
    plan = spec(
        {"type": "health", "check": "tcp", "target": "127.0.0.1:{labels.port}"},
        {"type": "script", "name": "hello.sh", "args": ["{node}"]},
    ).plan
    resolved = plan_for_node(plan, "web-1", LABELS)
    assert isinstance(resolved[0], HealthStep)
    assert resolved[0].target == "127.0.0.1:8081"
    assert isinstance(resolved[1], ScriptStep)
    assert resolved[1].args == ["web-1"]
    assert plan_for_node(plan[1:], "web-1", LABELS)[0] is not plan[1]
    untouched = spec({"type": "service", "action": "stop", "name": "app"}).plan
    assert plan_for_node(untouched, "web-1", LABELS)[0] is untouched[0]


def test_a_node_without_the_label_refuses_the_plan_naming_step_and_label() -> None:
    plan = spec({"type": "health", "check": "tcp", "target": "127.0.0.1:{labels.port}"}).plan
    with pytest.raises(InvalidInput, match=r"plan step 1 \(health\) target: node db-1 has no label 'port'"):
        plan_for_node(plan, "db-1", {"role": "db"})


def test_a_label_value_that_makes_a_field_invalid_is_refused() -> None:
    plan = spec(
        {"type": "download", "url": "https://{labels.mirror}/a.deb", "sha256": "0" * 64, "name": "a"}
    ).plan
    with pytest.raises(InvalidInput, match=r"plan step 1 \(download\) resolved for n1 is invalid: url"):
        plan_for_node(plan, "n1", {"mirror": "has space"})


def test_lacking_labels_names_each_node_and_what_it_lacks() -> None:
    # One check for create_rollout (refuses) and the plan (a problem per node).
    plan = [
        {"type": "script", "name": "a.sh", "args": ["{labels.rack}", "{node}"]},
        {"type": "health", "target": "http://h:{labels.port}/"},
    ]
    fleet = {"web-1": {"rack": "r1", "port": "80"}, "web-2": {"rack": "r2"}, "web-3": {}}
    lacking = params.lacking_labels(plan, fleet, fleet.__getitem__)
    assert lacking == {"web-2": ["port"], "web-3": ["port", "rack"]}
    assert params.lacking_text(lacking) == "web-2 has no port; web-3 has no port, rack"
    assert params.lacking_labels([{"args": ["{node}"]}], fleet, fleet.__getitem__) == {}
