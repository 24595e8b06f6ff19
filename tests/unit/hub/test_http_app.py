"""The HTTP bridge's app in-process (ASGI, no network): auth, status codes, bodies, OpenAPI."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from prometheus_client import CONTENT_TYPE_LATEST

from bus.errors import BusError, ConfigError, Conflict, FleetError, InvalidInput, NotFound
from bus.messages import RolloutSpec
from hub import http as bridge
from hub.http import MAX_BODY_BYTES, make_app, serve_http
from hub.requests import CreateRollout, RolloutRequest

TOKEN = "t0ken-with-some-length"  # noqa: S105
AUTH = {"Authorization": f"Bearer {TOKEN}"}
SPEC: dict[str, Any] = {
    "name": "app 2.0",
    "targets": ["n1", "n2"],
    "plan": [{"type": "script", "name": "install_update.sh", "args": ["2.0"], "rollback": "rollback.sh"}],
}
SHOWN = {
    "v": 1,
    "id": "r1",
    "name": "app 2.0",
    "state": "running",
    "created_at": 1.0,
    "updated_at": 2.0,
    "counts": {"pending": 1, "running": 1, "succeeded": 0, "failed": 0, "rolled_back": 0},
    "nodes": {"n1": {"phase": "applying", "step": 0, "detail": ""}, "n2": {"phase": "pending"}},
    "plan": SPEC["plan"],
    "audit": [{"kind": "created", "message": "created"}],
}
PROTECTED = [
    ("POST", "/api/updates"),
    ("GET", "/api/rollouts"),
    ("GET", "/api/rollouts/r1"),
    ("POST", "/api/rollouts/r1/abort"),
    ("POST", "/api/rollouts/r1/rollback"),
    ("POST", "/api/rollouts/r1/pause"),
    ("POST", "/api/rollouts/r1/resume"),
    ("GET", "/api/nodes"),
    ("GET", "/metrics"),
]


class FakeHub:
    """Records every request; answers from ``answers`` or raises from ``errors``."""

    def __init__(self) -> None:
        self.is_connected = True
        self.missing_subscriptions: tuple[str, ...] = ()
        self.calls: list[tuple[str, Any]] = []
        self.errors: dict[str, Exception] = {}
        self.hang = False
        self.answers: dict[str, Any] = {
            "create_rollout": {"rollout": "r1"},
            "list": [{k: v for k, v in SHOWN.items() if k not in ("plan", "audit")}],
            "show": SHOWN,
            "nodes": [
                {"node": "n1", "online": True, "last_seen": 5.0, "labels": {}, "inventory": {}, "job": None}
            ],
        }

    async def request(self, op: str, body: dict[str, Any]) -> Any:
        self.calls.append((op, body))
        if self.hang:
            await asyncio.Event().wait()
        if op in self.errors:
            raise self.errors[op]
        return self.answers.get(op, {"rollout": body.get("rollout"), "state": "aborting"})

    async def handle(self, request: RolloutRequest) -> Any:
        """Create and plan: the bridge hands over the typed request it validated."""
        op = "create_rollout" if isinstance(request, CreateRollout) else "plan"
        self.calls.append((op, request))
        if op in self.errors:
            raise self.errors[op]
        return self.answers.get(op, {"kind": "plan"})

    async def metrics_text(self) -> bytes:
        return b'# HELP fleet_nodes Known nodes.\n# TYPE fleet_nodes gauge\nfleet_nodes{state="online"} 1.0\n'


@pytest.fixture
def hub() -> FakeHub:
    return FakeHub()


@pytest.fixture
async def client(hub: FakeHub) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=make_app(hub, TOKEN))
    async with httpx.AsyncClient(transport=transport, base_url="http://hub") as http:
        yield http


async def post_spec(
    client: httpx.AsyncClient, body: bytes | str | dict[str, Any], **headers: str
) -> httpx.Response:
    content = json.dumps(body).encode() if isinstance(body, dict) else body
    return await client.post(
        "/api/updates", content=content, headers={**AUTH, "Content-Type": "application/json", **headers}
    )


# ---------------------------------------------------------------------- auth


@pytest.mark.parametrize(("method", "path"), PROTECTED)
async def test_every_api_call_needs_the_token(
    client: httpx.AsyncClient, hub: FakeHub, method: str, path: str
) -> None:
    for headers, reason in (
        ({}, "missing bearer token"),
        ({"Authorization": "Bearer wrong"}, "wrong bearer token"),
        ({"Authorization": f"Bearer {TOKEN}x"}, "wrong bearer token"),
        ({"Authorization": f"Bearer {TOKEN[:-1]}"}, "wrong bearer token"),
        ({"Authorization": f"Basic {TOKEN}"}, "missing bearer token"),
    ):
        response = await client.request(method, path, headers=headers, json=SPEC)
        assert response.status_code == 401, (headers, response.text)
        assert response.json() == {"detail": reason}
        assert response.headers["www-authenticate"] == "Bearer"
    assert hub.calls == []
    response = await client.request(method, path, headers=AUTH, json=SPEC)
    assert response.status_code in (200, 202), response.text


async def test_health_docs_and_openapi_are_open(client: httpx.AsyncClient, hub: FakeHub) -> None:
    response = await client.get("/api/health")
    assert (response.status_code, response.json()) == (200, {"ok": True, "broker": "connected"})
    hub.is_connected = False
    response = await client.get("/api/health")
    assert (response.status_code, response.json()) == (503, {"ok": False, "broker": "disconnected"})
    assert (await client.get("/docs")).status_code == 200
    assert (await client.get("/openapi.json")).json()["info"]["title"] == "fleetbus hub"
    assert hub.calls == []


async def test_health_degraded_while_a_subscription_missing(client: httpx.AsyncClient, hub: FakeHub) -> None:
    hub.missing_subscriptions = ("fleet/v1/node/+/status",)
    response = await client.get("/api/health")
    assert (response.status_code, response.json()) == (503, {"ok": False, "broker": "degraded"})
    hub.missing_subscriptions = ()
    assert (await client.get("/api/health")).status_code == 200


async def test_without_a_token_nothing_is_asked(hub: FakeHub) -> None:
    transport = httpx.ASGITransport(app=make_app(hub, None))
    async with httpx.AsyncClient(transport=transport, base_url="http://hub") as http:
        assert (await http.get("/api/nodes")).status_code == 200
        assert (await http.get("/metrics", headers={"Authorization": "Bearer anything"})).status_code == 200


# ---------------------------------------------------------------------- requests go through the hub


async def test_create_sends_the_validated_spec_and_answers_202(
    client: httpx.AsyncClient, hub: FakeHub
) -> None:
    response = await post_spec(client, SPEC)
    assert (response.status_code, response.json()) == (202, {"rollout": "r1"})
    ((op, request),) = hub.calls
    assert op == "create_rollout"
    assert request == CreateRollout(RolloutSpec.model_validate(SPEC))
    assert request.spec.require_online is True  # defaults filled in, as the MQTT path would


async def test_curl_form_encoding_is_read_as_json(client: httpx.AsyncClient, hub: FakeHub) -> None:
    # `curl --data @spec.json` without -H 'Content-Type: application/json'
    response = await post_spec(
        client, json.dumps(SPEC), **{"Content-Type": "application/x-www-form-urlencoded"}
    )
    assert response.status_code == 202, response.text
    assert hub.calls[0][0] == "create_rollout"


async def test_show_list_nodes_and_operations(client: httpx.AsyncClient, hub: FakeHub) -> None:
    shown = await client.get("/api/rollouts/r1", headers=AUTH)
    assert (shown.status_code, shown.json()) == (200, SHOWN)
    listed = await client.get("/api/rollouts", headers=AUTH)
    assert listed.status_code == 200
    assert listed.json()[0]["id"] == "r1"
    assert listed.json()[0]["counts"]["running"] == 1
    nodes = await client.get("/api/nodes", headers=AUTH)
    assert nodes.json()[0]["node"] == "n1"
    for op in ("abort", "rollback", "pause", "resume"):
        response = await client.post(f"/api/rollouts/r1/{op}", headers=AUTH)
        assert (response.status_code, response.json()) == (202, {"rollout": "r1", "state": "aborting"})
    assert hub.calls == [
        ("show", {"rollout": "r1"}),
        ("list", {}),
        ("nodes", {"offset": 0, "total": True}),  # every node, and how many
        ("abort", {"rollout": "r1"}),
        ("rollback", {"rollout": "r1"}),
        ("pause", {"rollout": "r1"}),
        ("resume", {"rollout": "r1"}),
    ]


async def test_metrics_are_prometheus_text(client: httpx.AsyncClient) -> None:
    response = await client.get("/metrics", headers=AUTH)
    assert response.status_code == 200
    assert response.headers["content-type"] == CONTENT_TYPE_LATEST  # what the library's text format is
    assert 'fleet_nodes{state="online"} 1.0' in response.text


# ---------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("error", "status"),
    [
        (NotFound("unknown rollout 'r9'"), 404),
        (InvalidInput("rollout: a rollout id is required"), 422),
        (Conflict("rollout r1 is succeeded: nothing to abort"), 409),
        (ConfigError("no signing key: run `fleet keys generate`"), 503),
        (BusError("hub is not connected"), 503),
        (FleetError("rollouts not available"), 503),
    ],
)
async def test_refusals_map_to_status_codes(
    client: httpx.AsyncClient, hub: FakeHub, error: FleetError, status: int
) -> None:
    hub.errors = {"abort": error, "show": error}
    for response in (
        await client.post("/api/rollouts/r1/abort", headers=AUTH),
        await client.get("/api/rollouts/r1", headers=AUTH),
    ):
        assert response.status_code == status
        assert response.json()["detail"] == error.reason


async def test_conflict_names_the_nodes(client: httpx.AsyncClient, hub: FakeHub) -> None:
    hub.errors = {"create_rollout": Conflict("offline targets: n2, n3", nodes=["n2", "n3"])}
    response = await post_spec(client, SPEC)
    assert response.status_code == 409
    assert response.json() == {"detail": "offline targets: n2, n3", "nodes": ["n2", "n3"]}


async def test_a_hub_that_does_not_answer_is_a_504(
    client: httpx.AsyncClient, hub: FakeHub, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(bridge, "_REQUEST_TIMEOUT_S", 0.05)
    hub.hang = True
    response = await client.get("/api/rollouts", headers=AUTH)
    assert response.status_code == 504
    assert "list" in response.json()["detail"]


@pytest.mark.parametrize(
    ("body", "status", "detail"),
    [
        (b'{"name": "x", "targets": [', 400, "malformed JSON body: Expecting value"),
        (b"\xff\xfe{}", 400, "malformed JSON body"),
        (b"", 400, "empty body"),
        (b"   ", 400, "empty body"),
        (b"[1, 2]", 422, "(body): expected a RolloutSpec JSON object, got an array"),
        (b'"spec"', 422, "(body): expected a RolloutSpec JSON object, got a string"),
        (b"null", 422, "(body): expected a RolloutSpec JSON object, got null"),
        (b"42", 422, "(body): expected a RolloutSpec JSON object, got a number"),
    ],
)
async def test_bodies_that_are_not_an_object(
    client: httpx.AsyncClient, hub: FakeHub, body: bytes, status: int, detail: str
) -> None:
    response = await post_spec(client, body)
    assert response.status_code == status
    assert response.json()["detail"].startswith(detail)
    assert hub.calls == []


def with_step(**step: Any) -> dict[str, Any]:
    return {**SPEC, "plan": [step]}


@pytest.mark.parametrize(
    ("spec", "fields", "detail"),
    [
        (
            with_step(type="download", url="http://a/b", sha256="zz", name="b"),
            ["plan.0.sha256"],
            "plan.0.sha256: String should match pattern",
        ),
        (with_step(type="script"), ["plan.0.name"], "plan.0.name: Field required"),
        (with_step(type="script", name="../../bin/sh"), ["plan.0.name"], "plan.0.name: String should match"),
        (with_step(type="teleport"), ["plan.0"], "plan.0: Input tag 'teleport'"),
        ({**SPEC, "targets": ["ok-1", "not ok!"]}, ["targets.1"], "targets.1: String should match"),
        ({**SPEC, "targets": 5}, ["targets"], "targets: matches none of the accepted forms"),
        ({**SPEC, "targets": {"labels": {}}}, ["targets.labels"], "targets.labels: Dictionary should have"),
        ({**SPEC, "plan": []}, ["plan"], "plan: List should have at least 1 item"),
        ({**SPEC, "strategy": {"waves": ["150%"]}}, ["strategy.waves.0"], "strategy.waves.0:"),
        ({**SPEC, "sudo": True}, ["sudo"], "sudo: Extra inputs are not permitted"),
        ({"targets": "all"}, ["name", "plan"], "name: Field required; plan: Field required"),
    ],
)
async def test_invalid_specs_name_the_field(
    client: httpx.AsyncClient, hub: FakeHub, spec: dict[str, Any], fields: list[str], detail: str
) -> None:
    response = await post_spec(client, spec)
    assert response.status_code == 422, response.text
    answer = response.json()
    assert answer["detail"].startswith(detail), answer["detail"]
    assert [e["field"] for e in answer["errors"]] == fields
    assert "\n" not in answer["detail"]
    assert hub.calls == []


async def test_an_oversized_declared_body_is_refused_unread(client: httpx.AsyncClient, hub: FakeHub) -> None:
    response = await post_spec(client, b"{" + b" " * MAX_BODY_BYTES + b"}")
    assert response.status_code == 413
    assert str(MAX_BODY_BYTES) in response.json()["detail"]
    assert hub.calls == []


async def test_an_oversized_streamed_body_is_cut_off(client: httpx.AsyncClient, hub: FakeHub) -> None:
    sent = 0

    async def chunks() -> AsyncIterator[bytes]:
        nonlocal sent
        for _ in range(1000):  # 64 MiB if it were read to the end
            sent += 1
            yield b" " * 65536

    response = await client.post("/api/updates", content=chunks(), headers=AUTH)
    assert response.status_code == 413
    assert sent <= MAX_BODY_BYTES // 65536 + 2
    assert hub.calls == []


# ---------------------------------------------------------------------- OpenAPI and serving


async def test_openapi_has_a_ready_example_for_every_body(client: httpx.AsyncClient) -> None:
    document = (await client.get("/openapi.json")).json()
    bodies = 0
    for path, methods in document["paths"].items():
        for method, operation in methods.items():
            if "requestBody" not in operation:
                continue
            bodies += 1
            content = operation["requestBody"]["content"]["application/json"]
            assert content["schema"] == {"$ref": "#/components/schemas/RolloutSpec"}, (method, path)
            assert content["examples"], (method, path)
            for example in content["examples"].values():
                RolloutSpec.model_validate(example["value"])
    assert bodies == 1
    text = json.dumps(document)
    schemas = document["components"]["schemas"]
    refs = {part.split('"')[0] for part in text.split('"$ref": "#/components/schemas/')[1:]}
    assert refs <= set(schemas), refs - set(schemas)
    assert document["paths"]["/api/updates"]["post"]["responses"]["409"]["content"]
    assert document["paths"]["/api/rollouts/{rollout}"]["get"]["security"] == [{"HTTPBearer": []}]
    assert "security" not in document["paths"]["/api/health"]["get"]


@pytest.mark.parametrize("host", ["0.0.0.0", "192.0.2.7", "::", "example.com"])
async def test_serve_http_refuses_a_public_address_without_a_token(hub: FakeHub, host: str) -> None:
    with pytest.raises(ConfigError, match="without a token"):
        await serve_http(hub, host, 8080, None)
    with pytest.raises(ConfigError, match="without a token"):
        await serve_http(hub, host, 8080, "")
