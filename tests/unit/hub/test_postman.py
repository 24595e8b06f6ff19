"""The Postman collection in docs/ is generated from the bridge's OpenAPI document and kept current."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from bus.messages import RolloutSpec
from hub import postman
from hub.http import make_app
from hub.postman import collection_from_openapi

COMMITTED = Path(__file__).resolve().parents[3] / "docs" / "fleetbus.postman_collection.json"


class Offline:
    is_connected = False
    missing_subscriptions: tuple[str, ...] = ()

    async def request(self, op: str, body: dict[str, Any]) -> Any:
        raise AssertionError("rendering the schema sends no request")

    async def handle(self, request: Any) -> Any:
        raise AssertionError("rendering the schema sends no request")

    async def metrics_text(self) -> bytes:
        return b""


@pytest.fixture(scope="module")
def openapi() -> dict[str, Any]:
    document: dict[str, Any] = make_app(Offline(), token="t").openapi()  # noqa: S106
    return document


@pytest.fixture(scope="module")
def collection(openapi: dict[str, Any]) -> dict[str, Any]:
    return collection_from_openapi(openapi)


def requests_of(collection: dict[str, Any]) -> list[dict[str, Any]]:
    return [item for folder in collection["item"] for item in folder["item"]]


def test_committed_collection_is_current(
    capsys: pytest.CaptureFixture[str], collection: dict[str, Any]
) -> None:
    assert postman.main() == 0
    printed = capsys.readouterr().out
    committed = COMMITTED.read_text()
    assert json.loads(committed) == collection, (
        "docs/fleetbus.postman_collection.json is stale: "
        "python -m hub.postman > docs/fleetbus.postman_collection.json"
    )
    assert printed == committed


def test_every_operation_is_a_request_with_method_and_url(
    openapi: dict[str, Any], collection: dict[str, Any]
) -> None:
    operations = {(method.upper(), path) for path, methods in openapi["paths"].items() for method in methods}
    assert ("POST", "/api/updates") in operations
    assert ("GET", "/metrics") in operations
    seen = set()
    for item in requests_of(collection):
        request = item["request"]
        assert request["method"] in {"GET", "POST"}
        url = request["url"]
        assert url["raw"].startswith("{{baseUrl}}/")
        assert url["raw"] == "{{baseUrl}}/" + "/".join(url["path"])
        path = "/" + "/".join(f"{{{s[1:]}}}" if s.startswith(":") else s for s in url["path"])
        for variable in url.get("variable", []):
            assert variable["value"] == "{{rollout}}"
        seen.add((request["method"], path))
    assert seen == operations


def test_create_requests_carry_valid_rollout_specs(
    openapi: dict[str, Any], collection: dict[str, Any]
) -> None:
    creates = [i for i in requests_of(collection) if i["request"]["url"]["raw"] == "{{baseUrl}}/api/updates"]
    examples = openapi["paths"]["/api/updates"]["post"]["requestBody"]["content"]["application/json"][
        "examples"
    ]
    assert len(creates) == len(examples) >= 2
    for item in creates:
        request = item["request"]
        assert request["method"] == "POST"
        assert {"key": "Content-Type", "value": "application/json"} in request["header"]
        assert request["body"]["mode"] == "raw"
        RolloutSpec.model_validate_json(request["body"]["raw"])
        # The new rollout's id is kept for the show/abort/rollback requests.
        script = "\n".join(next(e for e in item["event"] if e["listen"] == "test")["script"]["exec"])
        assert 'pm.collectionVariables.set("rollout", body["rollout"])' in script
    # Postman's import takes the first example: the one that runs as is against `fleet demo`.
    first = RolloutSpec.model_validate_json(creates[0]["request"]["body"]["raw"])
    assert first.plan[0].type == "script"


def test_only_health_goes_without_a_token(collection: dict[str, Any]) -> None:
    assert collection["auth"]["type"] == "bearer"
    assert collection["auth"]["bearer"][0]["value"] == "{{token}}"
    open_requests = [i["request"]["url"]["raw"] for i in requests_of(collection) if "auth" in i["request"]]
    assert open_requests == ["{{baseUrl}}/api/health"]
    assert {v["key"] for v in collection["variable"]} == {"baseUrl", "token", "rollout"}


def test_conversion_of_a_small_document() -> None:
    document = {
        "info": {"title": "t", "description": "d"},
        "paths": {
            "/b/{id}": {
                "get": {"summary": "B", "security": [{"x": []}], "parameters": [{"name": "id", "in": "path"}]}
            },
            "/a": {"post": {"requestBody": {"content": {"application/json": {"example": {"k": 1}}}}}},
        },
    }
    result = collection_from_openapi(document)
    assert result == collection_from_openapi(document)  # deterministic
    (folder,) = result["item"]
    assert folder["name"] == "general"
    first, second = folder["item"]
    assert first["name"] == "POST /a: example"
    assert json.loads(first["request"]["body"]["raw"]) == {"k": 1}
    assert first["request"]["auth"] == {"type": "noauth"}
    assert second["request"]["url"]["raw"] == "{{baseUrl}}/b/:id"
    assert second["request"]["url"]["variable"][0]["value"] == ""
    assert "auth" not in second["request"]


def test_every_request_checks_status_and_body_and_creates_come_first(collection: dict[str, Any]) -> None:
    items = requests_of(collection)
    urls = [(i["request"]["method"], i["request"]["url"]["raw"]) for i in items]
    creates = [n for n, u in enumerate(urls) if u == ("POST", "{{baseUrl}}/api/updates")]
    on_rollout = [n for n, u in enumerate(urls) if ":rollout" in u[1]]
    assert creates == [0, 1]
    assert min(on_rollout) > max(creates)
    actions = [urls[n][1].rsplit("/", 1)[-1] for n in on_rollout]
    assert actions == [":rollout", "pause", "resume", "abort", "rollback"]
    for item in items:
        script = "\n".join(next(e for e in item["event"] if e["listen"] == "test")["script"]["exec"])
        assert 'pm.test("status is "' in script, item["name"]
        assert 'pm.test("body is' in script, item["name"]
    show = next(i for i in items if i["name"] == "Show a rollout")
    assert 'pm.expect(body.id).to.eql(pm.collectionVariables.get("rollout"));' in str(show["event"])
