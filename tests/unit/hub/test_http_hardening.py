"""Issue 16: the tokenless loopback bridge refuses what a web page on the same machine can send.

A page can make the browser POST ``text/plain`` cross-origin without asking first, and DNS
rebinding makes it send any ``Host``. Each such request is refused with a clear answer and
never reaches the hub; the bridge's own pages (same origin) and the CLI's JSON still work.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import typing
from collections.abc import AsyncIterator

import httpx
import pytest

from bus.messages import IdempotencyKey, RolloutSpec
from hub.http import _IDEMPOTENCY_KEY_MAX, _IDEMPOTENCY_KEY_PATTERN, bridge_hosts, make_app, serve_http
from tests.conftest import free_port
from tests.unit.hub.test_http_app import SPEC, FakeHub

PORT = 8080
JSON = {"Content-Type": "application/json"}
TOKEN_ONLY = {"Authorization": "Bearer tok"}


@pytest.fixture
def hub() -> FakeHub:
    return FakeHub()


@pytest.fixture
async def bridge(hub: FakeHub) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=make_app(hub, None, bound=("127.0.0.1", PORT)))
    async with httpx.AsyncClient(transport=transport, base_url=f"http://127.0.0.1:{PORT}") as http:
        yield http


async def test_a_cross_site_text_plain_post_is_refused(bridge: httpx.AsyncClient, hub: FakeHub) -> None:
    origin = {"Origin": "http://evil.example"}
    created = await bridge.post(
        "/api/updates", content=json.dumps(SPEC), headers={"Content-Type": "text/plain", **origin}
    )
    aborted = await bridge.post("/api/rollouts/r1/abort", headers={"Content-Type": "text/plain"})
    form = await bridge.post("/api/rollouts/r1/rollback", data={"x": "1"})
    bare = await bridge.post("/api/rollouts/r1/rollback")
    assert created.status_code == 403
    assert "cross-origin" in created.json()["detail"]
    assert [r.status_code for r in (aborted, form, bare)] == [415, 415, 415]
    assert "application/json" in aborted.json()["detail"]
    assert hub.calls == []


async def test_a_foreign_origin_is_refused_even_with_json(bridge: httpx.AsyncClient, hub: FakeHub) -> None:
    for origin in ("http://evil.example", "null", f"http://localhost:{PORT + 1}"):
        answer = await bridge.post("/api/rollouts/r1/abort", headers={**JSON, "Origin": origin})
        assert answer.status_code == 403, origin
        assert (await bridge.get("/api/nodes", headers={"Origin": origin})).status_code == 403
    assert hub.calls == []


async def test_a_foreign_host_is_refused_dns_rebinding(bridge: httpx.AsyncClient, hub: FakeHub) -> None:
    for host in ("evil.example", f"evil.example:{PORT}", "127.0.0.1:9999", "127.0.0.1"):
        answer = await bridge.get("/api/nodes", headers={"Host": host})
        assert answer.status_code == 421, host
        assert "does not name this bridge" in answer.json()["detail"]
        assert (await bridge.post("/api/updates", json=SPEC, headers={"Host": host})).status_code == 421
    assert hub.calls == []


async def test_same_origin_pages_and_json_clients_still_work(bridge: httpx.AsyncClient, hub: FakeHub) -> None:
    assert (await bridge.post("/api/updates", json=SPEC)).status_code == 202
    same = {"Origin": f"http://127.0.0.1:{PORT}"}
    assert (await bridge.post("/api/rollouts/r1/abort", headers={**JSON, **same})).status_code == 202
    for host in (f"localhost:{PORT}", f"[::1]:{PORT}"):
        assert (await bridge.get("/api/nodes", headers={"Host": host})).status_code == 200
    assert (await bridge.get("/docs")).status_code == 200
    assert [op for op, _ in hub.calls] == ["create_rollout", "abort", "nodes", "nodes"]


async def test_with_a_token_the_checks_are_the_tokens(hub: FakeHub) -> None:
    transport = httpx.ASGITransport(app=make_app(hub, "tok", bound=("0.0.0.0", PORT)))
    async with httpx.AsyncClient(transport=transport, base_url="http://fleet.example") as http:
        answer = await http.post("/api/updates", content=json.dumps(SPEC), headers=TOKEN_ONLY)
    assert answer.status_code == 202  # curl --data with a token keeps working


def test_bridge_hosts_name_the_bound_address() -> None:
    assert bridge_hosts("127.0.0.1", 8080) >= {"127.0.0.1:8080", "localhost:8080", "[::1]:8080"}
    assert "127.0.0.1" not in bridge_hosts("127.0.0.1", 8080)
    assert "127.0.0.1" in bridge_hosts("127.0.0.1", 80)


async def test_serve_http_applies_the_checks_on_its_socket(hub: FakeHub) -> None:
    port = free_port()
    task = asyncio.create_task(serve_http(hub, "127.0.0.1", port, None))
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=10) as http:
            deadline = asyncio.get_running_loop().time() + 15
            while True:
                try:
                    health = await http.get("/api/health")
                    break
                except httpx.TransportError:
                    assert asyncio.get_running_loop().time() < deadline
                    await asyncio.sleep(0.05)
            assert health.status_code == 200
            plain = await http.post("/api/rollouts/r1/abort", headers={"Content-Type": "text/plain"})
            rebound = await http.get("/api/nodes", headers={"Host": f"attacker.example:{port}"})
            ok = await http.post("/api/rollouts/r1/abort", headers=JSON)
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    assert (plain.status_code, rebound.status_code, ok.status_code) == (415, 421, 202)
    assert [op for op, _ in hub.calls] == ["abort"]


# ---------------------------------------------------------------------- OpenAPI: the Idempotency-Key rules


async def test_the_schema_states_the_idempotency_key_rules(bridge: httpx.AsyncClient) -> None:
    document = (await bridge.get("/openapi.json")).json()
    header = next(p for p in document["paths"]["/api/updates"]["post"]["parameters"] if p["in"] == "header")
    schema = next(s for s in header["schema"]["anyOf"] if s.get("type") == "string")
    assert schema == {"type": "string", "minLength": 1, "maxLength": 128, "pattern": "^[!-~]+$"}
    # the same rules as the contract's
    meta = next(m for m in typing.get_args(IdempotencyKey)[1:] if hasattr(m, "pattern"))
    assert (meta.pattern, meta.max_length) == (_IDEMPOTENCY_KEY_PATTERN, _IDEMPOTENCY_KEY_MAX)


@pytest.mark.parametrize("key", ["a", "deploy-2024-06-01-web", "x" * 128, "!~"])
async def test_a_key_valid_by_the_schema_is_accepted(bridge: httpx.AsyncClient, key: str) -> None:
    assert re.fullmatch(_IDEMPOTENCY_KEY_PATTERN, key)
    answer = await bridge.post("/api/updates", json=SPEC, headers={"Idempotency-Key": key})
    assert answer.status_code == 202, answer.text
    RolloutSpec.model_validate({**SPEC, "idempotency_key": key})


@pytest.mark.parametrize("key", ["with space", "x" * 129, "tab\there", "caf\x7f"])
async def test_a_key_invalid_by_the_schema_is_refused_naming_the_header(
    bridge: httpx.AsyncClient, hub: FakeHub, key: str
) -> None:
    answer = await bridge.post("/api/updates", json=SPEC, headers={"Idempotency-Key": key})
    assert answer.status_code == 422
    assert "Idempotency-Key" in answer.json()["detail"]
    assert hub.calls == []
