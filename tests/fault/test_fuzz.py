"""Fuzzing (hypothesis) of everything that reads input from outside (DESIGN section 7).

Every message parser, the topic parsers, every topic handler of the hub (a
real ``HubService`` on the embedded broker) and of the agent (a real
``CommandRunner`` on a real state dir), and the HTTP API (the real app over
that hub) get random bytes, wrong types, huge and deeply nested JSON, unicode,
and path traversal in names and URLs; plus valid messages with one field
mutated, which reach deeper than random bytes do. For each input: no crash
(no exception, and no error a catch-all handler logged), a clear error (a
rejection or a 4xx with a reason), and no state change unless the input was
valid.

``FLEET_FAULT_TRIALS=N`` scales the number of examples.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_args
from urllib.parse import quote

import httpx
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel, ValidationError

import bus.messages as messages
from bus.display import has_control, printable_payload
from bus.errors import InvalidInput
from bus.messages import MAX_PAYLOAD_BYTES, Command, NodeState, Reply, RequestOp, decode, encode
from bus.mqtt import Message
from bus.signing import generate_keypair, load_private_key, public_key_of, sign_command
from bus.topics import CLIENT_ID_SEPARATOR, Topics, check_node_id, is_node_id, is_own_client_id
from edge_agent.executor import JournalState
from edge_agent.runner import CommandRunner
from edge_agent.settings import ExecutorSettings
from hub.config import HubConfig
from hub.http import make_app
from hub.service import HubService
from tests.conftest import RunningBroker
from tests.fault.conftest import is_long_run, trials

NODE = "f1"
TOKEN = "fuzz-token-0123456789"  # noqa: S105 - a test token

# -------------------------------------------------------------------- strategies

NASTY = [
    "..", "../..", "../../etc/passwd", "/etc/passwd", "a/../../b", "..%2F..%2Fetc", "%2e%2e/%2e%2e",
    "./x", "~root", "\x00", "a\x00b", "\n", "\r\n", " ", "", "é", "\u202e", "\ud7ff",
    "\U0001d518\U0001d52b\U0001d526",
    "+", "#", "fleet/v1/node/x/cmd", "$(reboot)", "`id`", "; rm -rf /", "*", "?",
    "file:///etc/passwd", "http://127.0.0.1:1/../../x", "ftp://x/y", "javascript:alert(1)", "http://[::1",
    "x" * 300, "NaN", "-1", "1e309",
]  # fmt: skip
nasty_text = st.sampled_from(NASTY) | st.text(max_size=80)
json_leaf = (
    st.none() | st.booleans() | st.integers() | st.integers(min_value=2**63) | st.floats() | nasty_text
)
json_value = st.recursive(
    json_leaf,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(nasty_text, children, max_size=4),
    max_leaves=20,
)


def _dumps(value: Any) -> bytes:
    return json.dumps(value, allow_nan=True).encode("utf-8", "surrogatepass")


def mutated(example: dict[str, Any]) -> st.SearchStrategy[dict[str, Any]]:
    """``example`` with one field replaced by something random (or removed, or an extra one added)."""
    keys = sorted(example)

    def change(choice: tuple[str, str, Any]) -> dict[str, Any]:
        how, key, value = choice
        out = dict(example)
        if how == "drop":
            out.pop(key, None)
        else:
            out[key] = value
        return out

    return st.tuples(
        st.sampled_from(["set", "set", "drop", "add"]), st.sampled_from(keys) | nasty_text, json_value
    ).map(change)


def nested(depth: int, kind: str) -> bytes:
    return (
        (("[" * depth) + ("]" * depth)).encode()
        if kind == "list"
        else (('{"a":' * depth) + "1" + ("}" * depth)).encode()
    )


special_payloads = st.sampled_from(
    [
        nested(100, "list"), nested(10_000, "list"), nested(100_000, "list"), nested(10_000, "dict"),
        b"", b"null", b"[]", b"{}", b'"x"', b"\xff\xfe", b"{" * 10, b'{"v": 1}',
        b'{"v":1,' + b'"x":"' + b"a" * (MAX_PAYLOAD_BYTES + 10) + b'"}',
        b'{"v":1,' + b'"x":"' + b"a" * (MAX_PAYLOAD_BYTES - 100) + b'"}',
    ]
)  # fmt: skip


def payloads(example: dict[str, Any] | None = None) -> st.SearchStrategy[bytes]:
    """Random bytes, random JSON, the specials, and (given an example) the example mutated."""
    kinds = [st.binary(max_size=512), json_value.map(_dumps), special_payloads]
    if example is not None:
        kinds += [mutated(example).map(_dumps)] * 3
    return st.one_of(kinds)


def examples(default: int) -> int:
    return default * max(1, trials(1) // 5) if is_long_run() else default


def fuzz_settings(default: int) -> settings:
    return settings(
        max_examples=examples(default),
        deadline=None,
        derandomize=False,
        suppress_health_check=[
            HealthCheck.function_scoped_fixture,
            HealthCheck.too_slow,
            HealthCheck.data_too_large,
        ],
    )


# Valid examples of every wire model (fields filled in by the fixtures where ids matter).
NOW = 1_800_000_000.0
SESSION = str(uuid.uuid4())
VALID: dict[str, dict[str, Any]] = {
    "NodeState": {
        "node": NODE, "state": "online", "session": SESSION, "reason": "birth", "heartbeat_s": 3600,
    },
    "Heartbeat": {"node": NODE, "session": SESSION, "seq": 1, "ts": NOW},
    "HubState": {"state": "online", "session": SESSION},
    "StepStatus": {
        "node": NODE, "command": "c", "rollout": "r", "index": 0, "type": "script", "state": "running",
        "ts": NOW,
    },
    "JobSnapshot": {
        "node": NODE, "id": "c", "rollout": "r", "action": "apply", "phase": "applying", "steps": [],
    },
    "LogLine": {"node": NODE, "command": "c", "rollout": "r", "index": 0, "line": "x", "ts": NOW},
    "Request": {"id": "q", "op": "list", "reply_to": "fuzzer", "body": {}},
    "Reply": {"request": "q", "ok": True},
    "Event": {"ts": NOW, "kind": "k", "message": "m"},
    "RolloutSpec": {"name": "n", "targets": [NODE], "plan": [{"type": "script", "name": "part.sh"}]},
    "RolloutSummary": {"id": "r", "name": "n", "state": "running", "created_at": NOW, "updated_at": NOW},
    "Command": {
        "id": "c", "node": NODE, "rollout": "r", "action": "apply", "issued_at": NOW, "expires_at": NOW + 60,
        "plan": [{"type": "script", "name": "part.sh"}], "sig": "x",
    },
}  # fmt: skip
MODELS: list[type[BaseModel]] = [
    obj
    for name in messages.__all__
    if isinstance(obj := getattr(messages, name), type) and issubclass(obj, BaseModel)
]


# ------------------------------------------------------------------ no crash logged


@dataclass
class Errors:
    """Error records logged by our code (a catch-all that caught a crash)."""

    records: list[logging.LogRecord] = field(default_factory=list)

    def since(self, mark: int) -> list[str]:
        return [f"{r.name}: {r.getMessage()}" for r in self.records[mark:]]


class _Collect(logging.Handler):
    def __init__(self, errors: Errors) -> None:
        super().__init__(logging.ERROR)
        self.errors = errors

    def emit(self, record: logging.LogRecord) -> None:
        if record.name.split(".")[0] in ("hub", "edge_agent", "bus"):
            self.errors.records.append(record)


@pytest.fixture
def errors() -> Iterator[Errors]:
    found = Errors()
    handler = _Collect(found)
    logging.getLogger().addHandler(handler)
    yield found
    logging.getLogger().removeHandler(handler)


# --------------------------------------------------------------------- parsers


@fuzz_settings(400)
@given(model=st.sampled_from(MODELS), payload=st.data())
def test_every_message_parser_refuses_clearly(model: type[BaseModel], payload: st.DataObject) -> None:
    data = payload.draw(payloads(VALID.get(model.__name__)))
    try:
        parsed = decode(model, data)
    except InvalidInput as exc:
        reason = exc.reason
    else:
        assert len(data) <= MAX_PAYLOAD_BYTES
        decode(model, encode(parsed))  # whatever is accepted round-trips
        return
    assert reason.strip(), "an empty reason"
    assert "\n" not in reason, "a reason of one line"


@fuzz_settings(400)
@given(text=nasty_text | st.text(), channel=st.sampled_from(["state", "cmd", "status", "x", ""]))
def test_topic_parsers_refuse_traversal(text: str, channel: str) -> None:
    topics = Topics("fleet-fuzz/v1")
    parsed = topics.parse_node(f"fleet-fuzz/v1/node/{text}/{channel}")
    if parsed is not None:
        assert parsed.node == text
        assert "/" not in text  # no way out of the node's own topics
        assert text.isascii()
        assert text.isprintable()
        assert text[0].isalnum()  # never "." or ".."
        assert topics.node(parsed.node, parsed.channel) == f"fleet-fuzz/v1/node/{text}/{channel}"
    for parse in (check_node_id, topics.parse_reply_to, topics.rollout):
        try:
            value = parse(text)
        except InvalidInput:
            continue
        assert "#" not in value
        assert "+" not in value
        assert "\x00" not in value
        assert "/../" not in f"/{value}/"
    assert topics.parse_rollout(f"fleet-fuzz/v1/rollout/{text}") in (None, text)


@fuzz_settings(400)
@given(value=json_value)
def test_bus_text_never_reaches_a_terminal_with_control_characters(value: Any) -> None:
    """Issue 16: whatever JSON a node publishes, what the TUI decodes holds no control character
    (tab and newline aside), and a payload without any passes through untouched."""
    payload = json.dumps(value).encode()
    cleaned = printable_payload(payload)
    decoded = json.loads(cleaned)

    def strings(item: Any) -> Iterator[str]:
        if isinstance(item, str):
            yield item
        elif isinstance(item, list):
            for child in item:
                yield from strings(child)
        elif isinstance(item, dict):
            for key, child in item.items():
                yield key
                yield from strings(child)

    for text in strings(decoded):
        assert not has_control(text), repr(text)
    if not any(has_control(text) for text in strings(value)):
        assert json.loads(cleaned) == json.loads(payload)


@fuzz_settings(400)
@given(user=nasty_text, client_id=nasty_text)
def test_no_client_id_belongs_to_two_broker_users(user: str, client_id: str) -> None:
    """Issue 16: the owner of a client id is never ambiguous between node and tool names."""
    if not is_node_id(user) or not is_own_client_id(user, client_id):
        return
    for other in (client_id, client_id.split(CLIENT_ID_SEPARATOR)[0], f"{user}-x", f"{user}.x", user[:-1]):
        if other != user and is_node_id(other):
            assert not is_own_client_id(other, client_id), (user, other, client_id)


# ------------------------------------------------------------------ the hub


@dataclass
class Hub:
    service: HubService
    topics: Topics
    rollout: str
    command: str
    replies: list[Reply] = field(default_factory=list)

    def state(self) -> Any:
        """Everything a bad input must not change."""
        manager: Any = self.service.manager
        registry = self.service.registry
        return (
            [(name, registry.get(name)) for name in registry.nodes()],
            [s.model_dump() for s in manager.summaries()],
            {t: self.service.store.all(t) for t in ("rollouts", "nodes", "audit")},
        )


@pytest.fixture
async def hub(amqtt_broker: RunningBroker, tmp_path: Path) -> AsyncIterator[Hub]:
    topics = Topics(f"fleet-t-{uuid.uuid4().hex[:10]}/v1")
    key, _pub = generate_keypair(tmp_path / "keys")
    config = HubConfig(
        broker=amqtt_broker.url, prefix=topics.prefix, db=tmp_path / "hub.json", signing_key=key,
        client_id=f"hub-{uuid.uuid4().hex[:8]}",
    )  # fmt: skip
    service = HubService(config)
    await service.start()
    try:
        birth = NodeState.model_validate(VALID["NodeState"])
        await service._dispatch(Message(topics.node(NODE, "state"), encode(birth), 1, True))
        spec = {**VALID["RolloutSpec"], "node_timeout_s": 3600}
        rollout = (await service.request("create_rollout", spec))["rollout"]
        manager: Any = service.manager
        command = manager._engine.record(rollout)["nodes"][NODE]["command_id"]
        found = Hub(service, topics, rollout, command)
        original = service.publish

        async def publish(topic: str, payload: bytes | str, **kwargs: Any) -> None:
            if topic.startswith(f"{topics.prefix}/hub/reply/"):
                found.replies.append(decode(Reply, payload))
            await original(topic, payload, **kwargs)

        service.publish = publish  # type: ignore[method-assign]
        yield found
    finally:
        await service.stop()


CHANNEL_MODEL = {"state": "NodeState", "heartbeat": "Heartbeat", "status": "StepStatus", "job": "JobSnapshot"}


def _is_valid(topics: Topics, topic: str, payload: bytes) -> bool:
    parsed = topics.parse_node(topic)
    if parsed is None or parsed.channel not in CHANNEL_MODEL or not payload:
        return False
    try:
        value: Any = decode(getattr(messages, CHANNEL_MODEL[parsed.channel]), payload)
    except InvalidInput:
        return False
    return bool(value.node == parsed.node)


@fuzz_settings(150)
@given(data=st.data())
async def test_hub_topic_handlers(hub: Hub, errors: Errors, data: st.DataObject) -> None:
    topics = hub.topics
    channel = data.draw(st.sampled_from(["state", "heartbeat", "status", "job", "cmd", "log"]))
    node = data.draw(st.sampled_from([NODE, NODE, "f2"]) | nasty_text)
    topic = data.draw(
        st.sampled_from([f"{topics.prefix}/node/{node}/{channel}", f"{topics.prefix}/node/{node}"])
        | st.just(f"{topics.prefix}/{node}")
        | nasty_text
    )
    example = dict(VALID.get(CHANNEL_MODEL.get(channel, ""), VALID["StepStatus"]))
    example.update({"rollout": hub.rollout, "command": hub.command, "id": hub.command})
    payload = data.draw(payloads(example))
    before, mark = hub.state(), len(errors.records)
    await hub.service._dispatch(Message(topic, payload, 1, False))
    assert errors.since(mark) == []
    if not _is_valid(topics, topic, payload):
        assert hub.state() == before


@fuzz_settings(150)
@given(data=st.data())
async def test_hub_requests(hub: Hub, errors: Errors, data: st.DataObject) -> None:
    op = data.draw(st.sampled_from(list(get_args(RequestOp))) | nasty_text)
    body = data.draw(
        st.sampled_from([{"rollout": hub.rollout}, VALID["RolloutSpec"], {}])
        | st.sampled_from([{"rollout": hub.rollout}, VALID["RolloutSpec"]]).flatmap(mutated)
        | json_value
    )
    request = {"v": 1, "id": "q1", "op": op, "reply_to": "fuzzer", "body": body}
    payload = data.draw(st.just(_dumps(request)) | mutated(request).map(_dumps) | payloads())
    before, mark, sent = hub.state(), len(errors.records), len(hub.replies)
    await hub.service._answer(payload)
    assert errors.since(mark) == []
    for reply in hub.replies[sent:]:
        assert reply.ok or (reply.error and reply.error.strip()), reply
    answered_ok = any(r.ok for r in hub.replies[sent:])
    if not answered_ok or op in ("list", "show", "nodes"):
        assert hub.state() == before


@pytest.fixture
async def http(hub: Hub) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=make_app(hub.service, TOKEN))
    async with httpx.AsyncClient(transport=transport, base_url="http://hub") as client:
        yield client


@fuzz_settings(150)
@given(data=st.data())
async def test_http_api(hub: Hub, http: httpx.AsyncClient, errors: Errors, data: st.DataObject) -> None:
    ident = data.draw(st.sampled_from([hub.rollout, "nope"]) | nasty_text)
    quoted = (
        quote(ident, safe="") if data.draw(st.booleans()) else ident.replace("?", "%3F").replace("#", "%23")
    )
    method, path = data.draw(
        st.sampled_from(
            [
                ("POST", "/api/updates"), ("GET", f"/api/rollouts/{quoted}"),
                ("POST", f"/api/rollouts/{quoted}/abort"),
                ("POST", f"/api/rollouts/{quoted}/rollback"), ("POST", f"/api/rollouts/{quoted}/pause"),
                ("GET", "/api/nodes"), ("GET", "/api/rollouts"), ("PUT", "/api/updates"),
            ]
        )
    )  # fmt: skip
    body = data.draw(payloads({**VALID["RolloutSpec"], "name": "via http"}))
    headers = {"Authorization": f"Bearer {TOKEN}"} if data.draw(st.integers(0, 9)) else {}
    headers["Content-Type"] = data.draw(
        st.sampled_from(["application/json", "text/plain", "application/x-www-form-urlencoded"])
    )
    before, mark = hub.state(), len(errors.records)
    try:
        response = await http.request(method, path, content=body, headers=headers)
    except httpx.InvalidURL:
        return  # the client refuses to send it at all
    assert response.status_code < 500, (response.status_code, response.text[:300])
    assert errors.since(mark) == []
    if response.status_code >= 400:
        assert response.headers.get("content-type", "").startswith("application/json"), response.text[:200]
        detail = response.json().get("detail")
        assert detail, response.text[:300]
    if response.status_code >= 400 or method == "GET":
        assert hub.state() == before


# ------------------------------------------------------------------ the agent


@dataclass
class Agent:
    runner: CommandRunner
    settings: ExecutorSettings
    topics: Topics
    key: Ed25519PrivateKey
    sent: list[tuple[str, bytes]] = field(default_factory=list)

    def journal(self) -> Any:
        path = self.settings.journal_path
        data = json.loads(path.read_text()) if path.exists() else JournalState().model_dump(mode="json")
        return {k: v for k, v in data.items() if k != "seen"}  # a verified refusal is remembered


@pytest.fixture
async def agent(tmp_path: Path) -> AsyncIterator[Agent]:
    key_path, _ = generate_keypair(tmp_path / "keys")
    key = load_private_key(key_path)
    scripts = tmp_path / "scripts"
    scripts.mkdir()
    settings = ExecutorSettings(
        node=NODE, state_dir=tmp_path / "state", scripts_dir=scripts, trusted_keys=(public_key_of(key),)
    )
    topics = Topics("fleet-fuzz/v1")
    sent: list[tuple[str, bytes]] = []

    async def publish(topic: str, payload: bytes, **_kwargs: Any) -> None:
        sent.append((topic, payload))

    runner = CommandRunner(settings, topics, publish)
    await runner.recover()
    yield Agent(runner, settings, topics, key, sent)
    await runner.close()


def nasty_steps() -> st.SearchStrategy[dict[str, Any]]:
    """Steps that reach outside what a command may touch: each must be refused at intake."""
    name = st.sampled_from([n for n in NASTY if "/" in n or n in ("..", "", " ", "\x00", "a\x00b")])
    return st.one_of(
        st.builds(lambda n: {"type": "script", "name": n}, name),
        st.builds(lambda n: {"type": "script", "name": "missing.sh", "rollback": n}, name),
        st.builds(
            lambda d: {"type": "file", "src": "x", "dest": d},
            st.sampled_from(
                ["/etc/passwd", "../../x", "/tmp/x", "journal.json", "cache/x", "backup/../../x"]
            ),
        ),
        st.builds(
            lambda n: {"type": "download", "url": "http://127.0.0.1:1/x", "sha256": "0" * 64, "name": n}, name
        ),
        st.builds(
            lambda u: {"type": "download", "url": u, "sha256": "0" * 64, "name": "x"},
            st.sampled_from(
                ["file:///etc/passwd", "ftp://x/y", "javascript:alert(1)", "/etc/passwd", "http://[::1"]
            ),
        ),
        st.builds(lambda n: {"type": "service", "action": "stop", "name": n}, name | st.just("sshd")),
        st.builds(lambda n: {"type": "health", "check": "command", "target": n}, name),
        st.builds(
            lambda t: {"type": "health", "check": "http", "target": t},
            st.sampled_from(["http://[::1", "file:///etc/passwd", "http://", "ftp://x/y", "http://[zz]:80/"]),
        ),
        st.builds(lambda n: {"type": "module", "name": n, "action": "unload"}, name),
        st.builds(lambda n: {"type": "container", "name": n, "image": "x:1"}, name),
    )


_issued = [time.time()]


def signed(agent: Agent, plan: list[dict[str, Any]], node: str = NODE) -> bytes | None:
    _issued[0] = max(time.time(), _issued[0] + 0.001)
    fields = {
        "id": str(uuid.uuid4()), "node": node, "rollout": "r-fuzz", "action": "apply",
        "issued_at": _issued[0], "expires_at": _issued[0] + 600, "plan": plan,
    }  # fmt: skip
    try:
        command = Command.model_validate(fields)
    except ValidationError:
        return None
    return encode(sign_command(command, agent.key))


@fuzz_settings(150)
@given(data=st.data())
async def test_agent_command_intake(agent: Agent, errors: Errors, data: st.DataObject) -> None:
    cmd_topic = agent.topics.node(NODE, "cmd")
    kind = data.draw(st.sampled_from(["random", "unsigned", "signed-nasty", "other-node"]))
    topic = cmd_topic
    payload: bytes | None = None
    if kind == "signed-nasty":
        payload = signed(agent, data.draw(st.lists(nasty_steps(), min_size=1, max_size=3)))
    elif kind == "other-node":
        payload = signed(agent, [{"type": "script", "name": "x.sh"}], node="f2")
        topic = data.draw(st.sampled_from([cmd_topic, agent.topics.node("f2", "cmd")]))
    elif kind == "unsigned":
        payload = data.draw(mutated(VALID["Command"]).map(_dumps))
    if payload is None:
        payload = data.draw(payloads(VALID["Command"]))
        topic = data.draw(st.just(cmd_topic) | nasty_text)
    before, mark, sent = agent.journal(), len(errors.records), len(agent.sent)
    await agent.runner.handle_command(topic, payload)
    assert errors.since(mark) == []
    assert agent.runner.current_job() is None, f"{kind} command started a job"
    assert agent.journal() == before
    for out_topic, out in agent.sent[sent:]:
        if out_topic.endswith("/status"):
            status = json.loads(out)
            assert status["state"] == "rejected", status
            assert status["detail"].strip(), status
    state_dir = agent.settings.state_dir
    assert not (state_dir / "cache").exists() or not any((state_dir / "cache").iterdir())


@pytest.fixture(autouse=True)
def _quiet(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING)


def test_the_fuzz_suite_is_not_empty() -> None:
    # Every wire model the hub or the agent parses has a valid example to mutate.
    names = {model.__name__ for model in MODELS}
    assert set(CHANNEL_MODEL.values()) | {"Command", "Request", "RolloutSpec"} <= set(VALID) & names
