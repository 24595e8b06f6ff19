"""What a job's health checks saw, held against the versions a node reports (issue 14)."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import TypeAdapter

from bus.messages import Plan, Step
from edge_agent.claims import Claim, claims_of, disagreements, looks_like_version, seen_version

_PLAN: TypeAdapter[list[Step]] = TypeAdapter(Plan)


def plan(*steps: dict[str, Any]) -> list[Step]:
    return _PLAN.validate_python(list(steps))


RESTART = {"type": "service", "action": "restart", "name": "app"}
HEALTH = {"type": "health", "check": "http", "target": "http://127.0.0.1:8080/", "expect": "2.0"}


@pytest.mark.parametrize(
    ("text", "version"),
    [("2.0", True), ("v1.24.0", True), ("1.24.0-1", True), ("ok", False), ("200", False), ("", False)],
)
def test_what_looks_like_a_version(text: str, version: bool) -> None:
    assert looks_like_version(text) is version


def test_an_expected_text_names_its_one_version_word() -> None:
    assert seen_version("version 2.0") == "2.0"
    assert seen_version("2.0 or 3.0") is None  # which one? none
    assert seen_version("healthy") is None


def test_a_passed_check_claims_the_plans_only_subject() -> None:
    steps = plan(RESTART, HEALTH)
    assert claims_of(steps, {1: "2.0"}) == [Claim("app", "2.0", "http http://127.0.0.1:8080/")]


def test_a_check_without_a_version_leaves_an_empty_claim() -> None:
    steps = plan(RESTART, {**HEALTH, "expect": "ok"})
    assert claims_of(steps, {1: "ok"}) == [Claim("app", "", "")]
    assert claims_of(steps, {}) == [Claim("app", "", "")]  # the check did not pass


def test_with_several_subjects_only_a_named_one_is_claimed() -> None:
    web = {"type": "service", "action": "restart", "name": "web"}
    steps = plan(RESTART, web, {**HEALTH, "target": "http://127.0.0.1/web/version"})
    assert claims_of(steps, {2: "2.0"}) == [
        Claim("app", "", ""),
        Claim("web", "2.0", "http http://127.0.0.1/web/version"),
    ]
    anonymous = plan(RESTART, web, HEALTH)
    assert [c.version for c in claims_of(anonymous, {2: "2.0"})] == ["", ""]  # could be either


def test_a_reported_version_bears_out_what_contains_the_seen_one() -> None:
    assert disagreements({"app": "2.0"}, {"app": "2.0"}) == {}
    assert disagreements({"nginx": "1.24.0"}, {"nginx": "1.24.0-1"}) == {}
    assert disagreements({"app": "v2.0"}, {"app": "2.0"}) == {}
    assert disagreements({"app": "2.0"}, {"app": "1.0"}) == {"app": "2.0"}
    assert disagreements({"app": "2.0"}, {}) == {}  # nothing reported: nothing to disagree with
    assert disagreements({"app": ""}, {"app": "1.0"}) == {}
