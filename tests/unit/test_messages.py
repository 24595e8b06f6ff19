"""Wire models of DESIGN section 2: JSON round trips, strictness at trust boundaries, defaults."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import BaseModel, ValidationError

import bus.messages as messages
from bus.errors import InvalidInput
from bus.messages import (
    MAX_PAYLOAD_BYTES,
    AdaptivePace,
    Command,
    ContainerStep,
    DownloadStep,
    Event,
    FailurePolicy,
    FileStep,
    HealthStep,
    Heartbeat,
    HubState,
    Inventory,
    JobRef,
    JobSnapshot,
    LogLine,
    MaintenanceWindow,
    ModuleStep,
    NodeState,
    NodeSummary,
    PackageStep,
    Reply,
    Request,
    RestoreCheck,
    RolloutCounts,
    RolloutNodes,
    RolloutSpec,
    RolloutSummary,
    ScriptStep,
    ServiceStep,
    StepState,
    StepStatus,
    Strategy,
    TargetLabels,
    decode,
    encode,
    loads_object,
    new_id,
)
from bus.topics import NODE_ID_PATTERN

SHA = "0123456789abcdef" * 4

STEPS: list[BaseModel] = [
    DownloadStep(url="https://example.com/app.deb", sha256=SHA, name="app.deb", max_bytes=10_000_000),
    ServiceStep(action="restart", name="app.service", timeout_s=30),
    PackageStep(manager="apt", name="app", version="2.1.0-1", src="app.deb"),
    PackageStep(manager="dnf", name="kmod-nvidia"),
    ContainerStep(name="web", image="registry.example.com/web:2.1@sha256:" + SHA),
    FileStep(src="app.conf", dest="/etc/app/app.conf", mode="0640"),
    ScriptStep(name="install_update.sh", args=["--to", "2.1.0"], rollback="rollback.sh"),
    ModuleStep(name="nvidia_drm", action="reload"),
    HealthStep(check="http", target="http://127.0.0.1:8080/health", expect="ok", retries=5, interval_s=0.5),
    HealthStep(check="command", target="check_app.sh 2.0", verify=RestoreCheck(target="check_app.sh 1.0")),
    HealthStep(check="tcp", target="127.0.0.1:8080", verify="skip"),
    ContainerStep(name="web", image="web:2.1", pull="never"),
]

#: One full example of every wire model (the meta-test below keeps this list complete).
EXAMPLES: list[BaseModel] = [
    *STEPS,
    RestoreCheck(expect="1.0"),
    Inventory(
        services={"app": "2.0.0"}, packages={"app": "2.0.0-1"}, drivers={"nvidia": "535"}, os={"id": "debian"}
    ),
    NodeState(
        node="n1",
        state="online",
        session=new_id(),
        reason="birth",
        agent_version="0.1.0",
        started_at=1717200000.5,
        labels={"site": "eu", "role": "edge"},
        inventory=Inventory(services={"app": "2.0.0"}),
        heartbeat_s=5.0,
    ),
    NodeState(node="n1", state="offline", session="s-1", reason="lost"),
    JobRef(rollout="r-1", command="c-1", step=2),
    Heartbeat(
        node="n1",
        session="s-1",
        seq=42,
        ts=1717200000.0,
        uptime_s=3600.0,
        load1=0.25,
        mem_used_pct=41.5,
        disk_free_pct=80.0,
        job=JobRef(rollout="r-1", command="c-1", step=1),
    ),
    HubState(state="online", session="s-h", reason="birth", version="0.1.0", started_at=1.0),
    Command(
        id="c-1",
        node="n1",
        rollout="r-1",
        action="apply",
        issued_at=1000.0,
        expires_at=2000.0,
        plan=STEPS,
        sig="c2ln",
    ),
    Command(id="c-2", node="n1", rollout="r-1", action="abort", issued_at=1000.0, expires_at=2000.0),
    StepStatus(
        node="n1",
        command="c-1",
        rollout="r-1",
        index=2,
        type="script",
        state="failed",
        ts=1.0,
        detail="exit 3",
    ),
    StepState(index=0, type="download", state="succeeded", detail="12 MB"),
    JobSnapshot(
        node="n1",
        id="c-1",
        rollout="r-1",
        action="apply",
        phase="rolling_back",
        steps=[StepState(index=0, type="download", state="succeeded"), StepState(index=1, type="service")],
        issued_at=1000.0,
        updated_at=1001.0,
        detail="step 2 failed",
    ),
    LogLine(node="n1", command="c-1", rollout="r-1", index=2, stream="stderr", line="Grüße ✓", ts=1.0),
    Request(id="q-1", op="abort", reply_to="tui-1", body={"rollout": "r-1"}),
    Reply(request="q-1", ok=False, error="unknown rollout r-9", body=None),
    Reply(request="q-2", ok=True, body={"rollouts": [{"id": "r-1"}]}),
    TargetLabels(labels={"site": "eu"}),
    Strategy(waves=[1, "50%", "100%"], max_parallel=10, soak_s=30.0),
    FailurePolicy(max_failed=2, on_failure="halt"),
    RolloutSpec(
        name="app 2.1.0",
        targets=TargetLabels(labels={"site": "eu"}),
        plan=STEPS,
        strategy=Strategy(waves=[1, "100%"]),
        failure=FailurePolicy(max_failed=1),
        require_online=False,
        step_timeout_s=60,
        node_timeout_s=600,
        expires_after_s=7200,
    ),
    RolloutSpec(name="all", targets="all", plan=[ServiceStep(action="restart", name="app")]),
    AdaptivePace(start=1, max="25%", grow_factor=2, on_failures="hold"),
    MaintenanceWindow(cron="0 2 * * 1-5", duration_s=7200),
    RolloutSpec(
        name="paced",
        targets="all",
        plan=[ServiceStep(action="restart", name="app")],
        strategy=Strategy(adaptive=AdaptivePace(start=2)),
        windows=[MaintenanceWindow(cron="30 1 * * *", duration_s=3600)],
        idempotency_key="ci-1001",
    ),
    RolloutSpec(name="two", targets=["n1", "n2"], plan=[ServiceStep(action="restart", name="app")]),
    RolloutCounts(pending=1, running=2, succeeded=3, failed=4, rolled_back=5),
    NodeSummary(phase="timed_out", step=3, detail="no report for 600 s"),
    RolloutSummary(
        id="r-1",
        name="app 2.1.0",
        state="rolling_back",
        created_at=1.0,
        updated_at=2.0,
        counts=RolloutCounts(running=1, failed=1),
        nodes={
            "n1": NodeSummary(phase="failed", step=2, detail="exit 3"),
            "n2": NodeSummary(phase="applying"),
        },
        wave=1,
        waves=2,
        detail="n1 failed",
    ),
    RolloutSummary(
        id="r-2",
        name="big",
        state="running",
        created_at=1.0,
        updated_at=2.0,
        nodes={"n1": NodeSummary(phase="failed", step=0, detail="exit 1")},
        nodes_total=10_000,
    ),
    RolloutNodes(rollout="r-2", seq=3, ts=2.0, nodes={"n2": NodeSummary(phase="succeeded", step=1)}),
    Event(ts=1.0, kind="rollout.failed", message="n1 failed step 2", rollout="r-1", node="n1"),
]


def exported_models() -> set[type[BaseModel]]:
    return {
        obj
        for name in messages.__all__
        if isinstance(obj := getattr(messages, name), type) and issubclass(obj, BaseModel)
    }


def test_every_exported_model_has_an_example() -> None:
    assert exported_models() - {type(example) for example in EXAMPLES} == set()


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda m: type(m).__name__)
def test_round_trips_through_json(example: BaseModel) -> None:
    payload = encode(example)
    assert decode(type(example), payload) == example
    assert decode(type(example), payload.decode("utf-8")) == example
    assert b"\n" not in payload
    data = json.loads(payload)
    if "v" in type(example).model_fields:
        assert data["v"] == 1


@pytest.mark.parametrize("step", STEPS, ids=lambda m: type(m).__name__)
def test_steps_round_trip_through_the_union(step: BaseModel) -> None:
    command = decode(
        Command,
        encode(
            Command(
                id="c", node="n1", rollout="r", action="apply", issued_at=1.0, expires_at=2.0, plan=[step]
            )
        ),
    )
    assert command.plan == [step]


heartbeats = st.builds(
    Heartbeat,
    node=st.from_regex(f"^{NODE_ID_PATTERN}$", fullmatch=True).filter(lambda s: "\n" not in s),
    session=st.from_regex(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$", fullmatch=True).filter(
        lambda s: "\n" not in s
    ),
    seq=st.integers(min_value=0, max_value=2**53),
    ts=st.floats(allow_nan=False, allow_infinity=False),
    uptime_s=st.floats(allow_nan=False, allow_infinity=False),
    load1=st.floats(min_value=0, max_value=1e6),
    job=st.none() | st.builds(JobRef, rollout=st.text(max_size=20), step=st.none() | st.integers(0, 64)),
)


@given(heartbeats)
def test_heartbeats_round_trip(heartbeat: Heartbeat) -> None:
    assert decode(Heartbeat, encode(heartbeat)) == heartbeat


@given(
    st.builds(
        LogLine,
        node=st.just("n1"),
        command=st.text(max_size=40),
        rollout=st.text(max_size=40),
        index=st.integers(-1, 64),
        line=st.text(max_size=300),
        ts=st.floats(allow_nan=False, allow_infinity=False),
    )
)
def test_log_lines_with_any_text_round_trip(line: LogLine) -> None:
    assert decode(LogLine, encode(line)) == line


# ----------------------------------------------------------------- trust boundaries


def command_fields(**changes: Any) -> dict[str, Any]:
    fields: dict[str, Any] = {
        "v": 1,
        "id": "c-1",
        "node": "n1",
        "rollout": "r-1",
        "action": "apply",
        "issued_at": 1000.0,
        "expires_at": 2000.0,
        "plan": [{"type": "service", "action": "restart", "name": "app"}],
        "sig": "",
    }
    fields.update(changes)
    return fields


def test_command_refuses_unknown_fields() -> None:
    with pytest.raises(InvalidInput, match="run_as"):
        decode(Command, json.dumps(command_fields(run_as="root")))
    step = {"type": "service", "action": "restart", "name": "app", "shell": "rm -rf /"}
    with pytest.raises(InvalidInput, match="shell"):
        decode(Command, json.dumps(command_fields(plan=[step])))


@pytest.mark.parametrize(
    "changes",
    [
        {"v": 2},
        {"node": "../n2"},
        {"action": "explode"},
        {"plan": []},  # apply without a plan
        {"expires_at": 1000.0},  # not later than issued_at
        {"plan": [{"type": "teleport"}]},
        {"plan": [{"type": "script", "name": "../../bin/sh"}]},
        {"plan": [{"type": "file", "src": "a.conf", "dest": "/etc/../shadow"}]},
        {"plan": [{"type": "download", "url": "file:///etc/shadow", "sha256": SHA, "name": "x"}]},
        {"plan": [{"type": "service", "action": "restart", "name": "app"}] * 65},
        {"sig": "x" * 257},
    ],
    ids=repr,
)
def test_command_refuses_bad_values(changes: dict[str, Any]) -> None:
    with pytest.raises(InvalidInput):
        decode(Command, json.dumps(command_fields(**changes)))


def test_request_and_spec_refuse_unknown_fields() -> None:
    with pytest.raises(InvalidInput, match="admin"):
        decode(Request, json.dumps({"id": "q", "op": "list", "reply_to": "tui", "admin": True}))
    spec = {"name": "x", "targets": "all", "plan": [{"type": "service", "action": "stop", "name": "a"}]}
    decode(RolloutSpec, json.dumps(spec))
    with pytest.raises(InvalidInput, match="wave"):
        decode(RolloutSpec, json.dumps({**spec, "wave": 3}))
    with pytest.raises(InvalidInput):
        decode(RolloutSpec, json.dumps({**spec, "strategy": {"waves": ["100%"], "speed": "fast"}}))


def test_reports_tolerate_fields_from_newer_agents() -> None:
    state = decode(
        NodeState,
        json.dumps({"node": "n1", "state": "online", "session": "s", "reason": "birth", "gpu": "h100"}),
    )
    assert state.node == "n1"


def test_rollout_spec_defaults() -> None:
    spec = RolloutSpec.model_validate(
        {"name": "app", "targets": ["n1"], "plan": [{"type": "service", "action": "restart", "name": "app"}]}
    )
    assert spec.strategy == Strategy(waves=["100%"], max_parallel=None, soak_s=0.0)
    assert spec.failure == FailurePolicy(max_failed=0, on_failure="rollback")
    assert spec.require_online is True
    assert (spec.step_timeout_s, spec.node_timeout_s, spec.expires_after_s) == (300.0, 1800.0, 3600.0)


@pytest.mark.parametrize(
    "targets",
    [[], ["n1", "n1"], ["bad/id"], "some", {"labels": {}}, {"labels": {"a": "b"}, "nodes": ["n1"]}],
    ids=repr,
)
def test_rollout_spec_refuses_bad_targets(targets: Any) -> None:
    with pytest.raises(ValidationError):
        RolloutSpec.model_validate(
            {"name": "x", "targets": targets, "plan": [{"type": "service", "action": "stop", "name": "a"}]}
        )


@pytest.mark.parametrize("wave", [0, "0%", "101%", "half", -1])
def test_strategy_refuses_bad_waves(wave: Any) -> None:
    with pytest.raises(ValidationError):
        Strategy(waves=[wave])


def test_models_are_frozen() -> None:
    command = Command.model_validate(command_fields())
    with pytest.raises(ValidationError):
        command.node = "n2"  # type: ignore[misc]


# -------------------------------------------------------------------- decode errors


def test_oversized_payload_refused_unread() -> None:
    with pytest.raises(InvalidInput, match="exceeds"):
        decode(Heartbeat, b" " * (MAX_PAYLOAD_BYTES + 1))
    with pytest.raises(InvalidInput, match="exceeds"):
        loads_object(b" " * (MAX_PAYLOAD_BYTES + 1))


@pytest.mark.parametrize("payload", [b"", b"{", b"null", b"[]", b'{"v": 1}', b"\xff\xfe", b'"text"'])
def test_malformed_payloads_give_one_line_reasons(payload: bytes) -> None:
    with pytest.raises(InvalidInput) as raised:
        decode(Command, payload)
    assert "\n" not in raised.value.reason
    assert raised.value.reason.startswith("invalid Command")


@pytest.mark.parametrize("payload", [b"[1]", b"1", b"nope", b"[" * 100_000])
def test_loads_object_wants_a_json_object(payload: bytes) -> None:
    with pytest.raises(InvalidInput):
        loads_object(payload)
