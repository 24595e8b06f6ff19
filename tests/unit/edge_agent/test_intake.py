"""Command intake: every reason to refuse a command, and no input that crashes the runner."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import HealthCheck, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st

from bus.messages import MAX_PAYLOAD_BYTES, JobSnapshot, StepStatus
from bus.signing import canonical_json, public_key_of
from bus.topics import Topics
from edge_agent.intake import Accepted, Ignored, Rejected, TermFloor, Verdict, check_command
from edge_agent.runner import CommandRunner
from edge_agent.settings import ExecutorSettings, Policy, ProcessService
from edge_agent.steps import HANDLERS, StepHandler

NODE = "n1"
TOPICS = Topics("fleet-t-intake/v1")
CMD_TOPIC = TOPICS.node(NODE, "cmd")
KEY = Ed25519PrivateKey.generate()
OTHER_KEY = Ed25519PrivateKey.generate()
NOW = 1_000_000.0


@pytest.fixture
def node(tmp_path: Path) -> ExecutorSettings:
    return make_settings(tmp_path)


def make_settings(tmp_path: Path, **extra: Any) -> ExecutorSettings:
    scripts = tmp_path / "scripts"
    scripts.mkdir(exist_ok=True)
    for name in ("ok.sh", "undo.sh"):
        (scripts / name).write_text("#!/bin/sh\n")
        (scripts / name).chmod(0o755)
    fields: dict[str, Any] = {
        "node": NODE,
        "state_dir": tmp_path / "state",
        "scripts_dir": scripts,
        "trusted_keys": (public_key_of(KEY),),
        "services": {"app": ProcessService(command=["/bin/true"])},
    }
    fields.update(extra)
    return ExecutorSettings(**fields)


def fields(**over: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "v": 1,
        "id": "cmd-1",
        "node": NODE,
        "rollout": "r1",
        "action": "apply",
        "issued_at": NOW - 10,
        "expires_at": NOW + 600,
        "plan": [{"type": "script", "name": "ok.sh", "args": [], "rollback": "undo.sh", "timeout_s": None}],
    }
    base.update(over)
    return base


def sign(raw: Mapping[str, Any], key: Ed25519PrivateKey = KEY) -> dict[str, Any]:
    unsigned = {k: v for k, v in raw.items() if k != "sig"}
    return {**unsigned, "sig": base64.b64encode(key.sign(canonical_json(unsigned))).decode()}


def payload(raw: Mapping[str, Any]) -> bytes:
    return json.dumps(raw).encode()


def check(
    settings: ExecutorSettings,
    data: bytes,
    *,
    topic: str = CMD_TOPIC,
    seen: tuple[str, ...] = (),
    last: float = 0.0,
    handlers: Mapping[str, StepHandler] = HANDLERS,
    term_floor: int = 0,
) -> Verdict:
    return check_command(
        topic,
        data,
        settings=settings,
        topics=TOPICS,
        handlers=handlers,
        now=NOW,
        seen=seen,
        last_issued_at=last,
        term_floor=term_floor,
    )


def rejected(verdict: Verdict) -> Rejected:
    assert isinstance(verdict, Rejected), verdict
    return verdict


# ------------------------------------------------------------------------ the checks


def test_per_node_parameters_are_resolved_after_the_signature_is_checked(tmp_path: Path) -> None:
    # DESIGN 3.10: the hub signs the plan as written; this node fills in its id and labels.
    node = make_settings(tmp_path, labels={"port": "8081"})
    step = {"type": "script", "name": "ok.sh", "args": ["{node}", "--port={labels.port}"], "rollback": None}
    verdict = check(node, payload(sign(fields(plan=[{**step, "timeout_s": None}]))))
    assert isinstance(verdict, Accepted), verdict
    assert verdict.command.plan[0].model_dump()["args"] == ["n1", "--port=8081"]


def test_a_plan_naming_a_label_this_node_lacks_is_rejected_naming_it(tmp_path: Path) -> None:
    node = make_settings(tmp_path, labels={"role": "web"})
    step = {"type": "script", "name": "ok.sh", "args": ["{labels.port}"], "rollback": None, "timeout_s": None}
    reason = rejected(check(node, payload(sign(fields(plan=[step]))))).reason
    assert reason == "plan step 1 (script) args[0]: node n1 has no label 'port' (for {labels.port})"


def test_a_valid_signed_command_is_accepted(node: ExecutorSettings) -> None:
    verdict = check(node, payload(sign(fields())))
    assert isinstance(verdict, Accepted)
    assert verdict.command.id == "cmd-1"
    for action in ("rollback", "abort"):
        assert isinstance(check(node, payload(sign(fields(action=action, plan=[])))), Accepted)


def test_an_empty_payload_is_the_hub_clearing_its_command(node: ExecutorSettings) -> None:
    assert isinstance(check(node, b""), Ignored)


def test_a_command_on_another_topic_is_refused_without_naming_it(node: ExecutorSettings) -> None:
    other = TOPICS.node("n2", "cmd")
    verdict = rejected(check(node, payload(sign(fields(node="n2"))), topic=other))
    assert "not on this node's topic" in verdict.reason
    assert (verdict.command_id, verdict.rollout, verdict.verified) == ("", "", False)


def test_a_command_naming_another_node_is_refused(node: ExecutorSettings) -> None:
    verdict = rejected(check(node, payload(sign(fields(node="n2")))))
    assert verdict.reason == "command is for node 'n2', not for n1"
    assert verdict.verified is False


@pytest.mark.parametrize(
    ("make", "reason"),
    [
        (lambda: fields(), "command is not signed"),
        (lambda: {**fields(), "sig": "!!not base64!!"}, "signature is not valid base64"),
        (lambda: {**sign(fields()), "rollout": "r2"}, "signature does not verify against any trusted key"),
        (lambda: sign(fields(), OTHER_KEY), "signature does not verify against any trusted key"),
    ],
    ids=["unsigned", "garbage-signature", "forged-field", "untrusted-key"],
)
def test_signatures_are_checked_before_anything_else(node: ExecutorSettings, make: Any, reason: str) -> None:
    verdict = rejected(check(node, payload(make())))
    assert verdict.reason == reason
    assert verdict.verified is False


def test_without_a_trusted_key_every_command_is_refused(tmp_path: Path) -> None:
    bare = make_settings(tmp_path, trusted_keys=())
    assert rejected(check(bare, payload(sign(fields())))).reason == "no trusted key configured"


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"\xff\xfe\x00garbage", "malformed JSON"),
        (b"[1, 2, 3]", "payload must be a JSON object"),
        (b"{", "malformed JSON"),
        (b"{}" + b" " * MAX_PAYLOAD_BYTES, "exceeds"),
        (b'{"node": ["n1"]}', "is for node"),
    ],
)
def test_malformed_payloads_are_refused(node: ExecutorSettings, data: bytes, reason: str) -> None:
    assert reason in rejected(check(node, data)).reason


def test_odd_values_in_a_refused_command_do_not_break_its_report(node: ExecutorSettings) -> None:
    for issued in (10**400, "yesterday", [1]):
        verdict = rejected(check(node, payload(sign(fields(issued_at=issued)))))
        assert verdict.issued_at == 0.0
        assert verdict.reason.startswith("invalid command: ")


def test_a_signed_but_invalid_command_is_refused_as_verified(node: ExecutorSettings) -> None:
    verdict = rejected(check(node, payload(sign(fields(action="explode", extra=1)))))
    assert verdict.reason.startswith("invalid command: ")
    assert "action" in verdict.reason
    assert verdict.verified is True
    assert (verdict.command_id, verdict.rollout) == ("cmd-1", "r1")


def test_expired_commands_are_refused(node: ExecutorSettings) -> None:
    verdict = rejected(check(node, payload(sign(fields(issued_at=NOW - 700, expires_at=NOW - 100)))))
    assert verdict.reason == "command expired 100 s ago"
    assert verdict.verified is True


def test_a_command_already_taken_is_ignored_even_when_expired(node: ExecutorSettings) -> None:
    data = payload(sign(fields(issued_at=NOW - 700, expires_at=NOW - 100)))
    verdict = check(node, data, seen=("cmd-1",))
    assert isinstance(verdict, Ignored)
    assert verdict.replay_of == "cmd-1"  # answered with the node's latest snapshot of it


def test_an_empty_retained_command_is_no_replay(node: ExecutorSettings) -> None:
    verdict = check(node, b"")
    assert isinstance(verdict, Ignored)
    assert verdict.replay_of is None


def test_a_command_issued_no_later_than_the_last_one_run_is_refused(node: ExecutorSettings) -> None:
    verdict = rejected(check(node, payload(sign(fields())), last=NOW - 10))
    assert "is not later than the last command run" in verdict.reason
    assert isinstance(check(node, payload(sign(fields())), last=NOW - 10.5), Accepted)


def test_a_command_of_a_lower_hub_term_is_refused(node: ExecutorSettings) -> None:
    # Fencing (DESIGN 3.9): a replaced hub's command, however fresh, is refused.
    verdict = rejected(check(node, payload(sign(fields(term=2))), term_floor=3))
    assert verdict.reason.startswith("command of hub term 2 is below term 3")
    assert verdict.verified is True
    assert isinstance(check(node, payload(sign(fields(term=3))), term_floor=3), Accepted)
    assert isinstance(check(node, payload(sign(fields(term=4))), term_floor=3), Accepted)
    # A command without a term (an older hub's) is term 0.
    assert "hub term 0 is below term 1" in rejected(check(node, payload(sign(fields())), term_floor=1)).reason
    assert isinstance(check(node, payload(sign(fields())), term_floor=0), Accepted)


def test_the_term_is_signed(node: ExecutorSettings) -> None:
    raised = {**sign(fields(term=1)), "term": 9}
    assert "signature does not verify" in rejected(check(node, payload(raised))).reason


def test_the_term_floor_persists_and_only_rises(tmp_path: Path) -> None:
    path = tmp_path / "term-floor"
    floor = TermFloor(path)
    assert floor.read() == 0
    floor.raise_to(3)
    floor.raise_to(2)
    assert TermFloor(path).read() == 3
    assert path.stat().st_mode & 0o777 == 0o600
    path.write_text("garbage")
    assert TermFloor(path).read() == 0  # unreadable: a warning, and no fencing (the journal still guards)


async def test_the_runner_fences_off_a_replaced_hub(node: ExecutorSettings) -> None:
    published = Published()
    runner = CommandRunner(node, TOPICS, published, clock=lambda: NOW)
    try:
        await runner.handle_command(
            CMD_TOPIC, payload(sign(fields(id="cmd-new", term=5, action="abort", plan=[])))
        )
        assert node.term_floor_path.read_text().strip() == "5"
        old = fields(id="cmd-old", term=4, issued_at=NOW - 1)  # issued later, by the older hub
        await runner.handle_command(CMD_TOPIC, payload(sign(old)))
        statuses = [StepStatus.model_validate_json(p) for p in published.on("status")]
        refused = [s for s in statuses if s.command == "cmd-old"]
        assert [s.state for s in refused] == ["rejected"]
        assert "hub term 4 is below term 5" in refused[0].detail
        assert not any(s.command == "cmd-old" and s.state == "running" for s in statuses)
    finally:
        await runner.close()
    # A restarted agent reads the same floor: the older hub stays fenced off.
    restarted = CommandRunner(node, TOPICS, published, clock=lambda: NOW)
    try:
        await restarted.handle_command(CMD_TOPIC, payload(sign(fields(id="cmd-old2", term=4, issued_at=NOW))))
        detail = [StepStatus.model_validate_json(p) for p in published.on("status")][-1].detail
        assert "hub term 4 is below term 5" in detail
    finally:
        await restarted.close()


def test_a_step_type_without_a_handler_is_refused(node: ExecutorSettings) -> None:
    plan = [{"type": "package", "manager": "apt", "name": "nginx"}]
    without_package = {kind: h for kind, h in HANDLERS.items() if kind != "package"}
    verdict = rejected(check(node, payload(sign(fields(plan=plan))), handlers=without_package))
    assert verdict.reason == "step 1: step type package is not supported by this agent"


async def _nothing(*_args: Any) -> Any:
    return {}


ALL_TYPES = {
    **HANDLERS,
    **{t: StepHandler(apply=_nothing, undo=_nothing) for t in ("package", "module", "container")},
}

POLICY_CASES: list[tuple[dict[str, Any], dict[str, Any], str]] = [
    ({"step_types": ["health"]}, {"type": "script", "name": "ok.sh"}, "step type script is not allowed"),
    ({"scripts": ["other*"]}, {"type": "script", "name": "ok.sh"}, "script ok.sh is not allowed"),
    ({}, {"type": "script", "name": "gone.sh"}, "script gone.sh not found in the scripts directory"),
    ({}, {"type": "script", "name": "ok.sh", "rollback": "gone.sh"}, "script gone.sh not found"),
    (
        {"services": ["db*"]},
        {"type": "service", "action": "stop", "name": "app"},
        "service app is not allowed",
    ),
    (
        {},
        {"type": "service", "action": "stop", "name": "db"},
        "service db is not defined for the process manager",
    ),
    ({}, {"type": "file", "src": "a", "dest": "/etc/app.conf"}, "is outside the agent's state dir"),
    (
        {"paths": ["/opt/*"]},
        {"type": "file", "src": "a", "dest": "/etc/app.conf"},
        "/etc/app.conf is not allowed",
    ),
    (
        {"download_hosts": ["repo.example"]},
        {"type": "download", "url": "http://evil.example/x", "sha256": "0" * 64, "name": "x"},
        "download host evil.example is not allowed",
    ),
    (
        {"packages": ["nginx"]},
        {"type": "package", "manager": "apt", "name": "openssh"},
        "package openssh is not",
    ),
    ({"modules": ["e1000*"]}, {"type": "module", "name": "nvidia"}, "module nvidia is not allowed"),
    (
        {"images": ["registry.local/*"]},
        {"type": "container", "name": "web", "image": "docker.io/evil:1"},
        "image docker.io/evil:1 is not allowed",
    ),
    (
        {},
        {"type": "health", "check": "systemd", "target": "app/../x.service"},
        "is not a systemd unit name",
    ),
]


@pytest.mark.parametrize(("policy", "step", "reason"), POLICY_CASES, ids=[c[2][:40] for c in POLICY_CASES])
def test_each_policy_limit_refuses_a_signed_command(
    tmp_path: Path, policy: dict[str, Any], step: dict[str, Any], reason: str
) -> None:
    limited = make_settings(tmp_path, policy=Policy(**policy))
    plan = [{"type": "health", "check": "tcp", "target": "127.0.0.1:1"}, step]
    verdict = rejected(check(limited, payload(sign(fields(plan=plan))), handlers=ALL_TYPES))
    assert verdict.reason.startswith(f"step 2 ({step['type']}): ")
    assert reason in verdict.reason
    assert verdict.verified is True


def test_what_the_policy_allows_is_accepted(tmp_path: Path) -> None:
    allowing = make_settings(
        tmp_path,
        policy=Policy(
            step_types=["script", "package", "download"],
            scripts=["ok.sh", "undo.sh"],
            packages=["nginx*"],
            download_hosts=["*.example"],
        ),
    )
    plan = [
        {"type": "download", "url": "https://repo.example/n.deb", "sha256": "a" * 64, "name": "n.deb"},
        {"type": "package", "manager": "dpkg", "name": "nginx-core", "src": "n.deb"},
        {"type": "script", "name": "ok.sh", "rollback": "undo.sh"},
    ]
    assert isinstance(check(allowing, payload(sign(fields(plan=plan))), handlers=ALL_TYPES), Accepted)


# ------------------------------------------------------------- through the runner


class Published:
    def __init__(self) -> None:
        self.messages: list[tuple[str, bytes, bool]] = []

    async def __call__(self, topic: str, data: bytes, *, qos: int = 1, retain: bool = False) -> None:
        self.messages.append((topic, data, retain))

    def on(self, channel: str) -> list[bytes]:
        return [m[1] for m in self.messages if m[0].endswith(f"/{channel}")]


async def test_a_forged_command_never_overwrites_the_retained_snapshot(node: ExecutorSettings) -> None:
    published = Published()
    runner = CommandRunner(node, TOPICS, published, clock=lambda: NOW)
    try:
        await runner.handle_command(CMD_TOPIC, payload({**sign(fields()), "rollout": "r2"}))
        [status] = [StepStatus.model_validate_json(p) for p in published.on("status")]
        assert (status.state, status.index, status.command, status.rollout) == ("rejected", -1, "cmd-1", "r2")
        assert status.detail == "signature does not verify against any trusted key"
        assert published.on("job") == []
        assert len(published.on("log")) == 1

        await runner.handle_command(CMD_TOPIC, payload(sign(fields(id="cmd-2", expires_at=NOW))))
        [snap] = [JobSnapshot.model_validate_json(p) for p in published.on("job")]
        assert (snap.id, snap.phase, snap.detail) == ("cmd-2", "rejected", "command expired 0 s ago")
        assert [m[2] for m in published.messages if m[0].endswith("/job")] == [True]
        # The retained command comes again (a reconnect, or a hub that missed the answer):
        # the same snapshot again, nothing run, nothing else reported.
        before = len(published.messages)
        await runner.handle_command(CMD_TOPIC, payload(sign(fields(id="cmd-2", expires_at=NOW))))
        assert published.messages[before:] == [published.messages[before - 1]]
        assert runner.current_job() is None
    finally:
        await runner.close()


# -------------------------------------------------------------------------- fuzzing

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=20,
)
command_like = st.fixed_dictionaries(
    {},
    optional={
        "v": json_values,
        "id": st.text(max_size=10) | json_values,
        "node": st.sampled_from([NODE, "n2", ""]) | json_values,
        "rollout": st.text(max_size=10),
        "action": st.sampled_from(["apply", "rollback", "abort", "nope"]) | json_values,
        "issued_at": st.floats() | json_values,
        "expires_at": st.floats() | json_values,
        "plan": st.lists(
            st.dictionaries(st.sampled_from(["type", "name", "url", "dest"]), json_values), max_size=3
        )
        | json_values,
        "sig": st.text(max_size=8),
    },
)


def _as_payload(value: Any, signed: bool) -> bytes:
    if signed and isinstance(value, dict):
        with contextlib.suppress(TypeError, ValueError):
            value = sign(value)
    return json.dumps(value).encode()


inputs = st.one_of(
    st.binary(max_size=300),
    json_values.map(lambda v: json.dumps(v).encode()),
    st.tuples(command_like, st.booleans()).map(lambda t: _as_payload(*t)),
)


@hsettings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=inputs, on_own_topic=st.booleans())
def test_handle_command_never_raises_on_any_input(tmp_path: Path, data: bytes, on_own_topic: bool) -> None:
    async def feed() -> None:
        published = Published()
        runner = CommandRunner(make_settings(tmp_path), TOPICS, published, clock=lambda: NOW)
        try:
            topic = CMD_TOPIC if on_own_topic else TOPICS.node("n2", "cmd")
            await runner.handle_command(topic, data)
        finally:
            await runner.close()
        for raw in published.on("status"):
            assert StepStatus.model_validate_json(raw).state == "rejected"
        for raw in published.on("job"):
            assert JobSnapshot.model_validate_json(raw).phase == "rejected"

    asyncio.run(feed())
