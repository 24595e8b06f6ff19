"""A Postman (v2.1) collection made from the bridge's OpenAPI document.

``python -m hub.postman > docs/fleetbus.postman_collection.json`` regenerates the
committed collection; a test keeps it current. Requests use three collection
variables: ``baseUrl``, ``token`` (the hub's ``--http-token``) and ``rollout``,
which a request marked ``x-fleet-saves`` in the OpenAPI document (starting a
rollout) sets from its answer, so "show", "abort" and "rollback" work next.
Operations without a ``security`` requirement (health) send no token. Request
bodies are the OpenAPI examples, one request per example.

Order: requests that create (``x-fleet-saves``) come first, then those without
a path parameter, then those on ``{rollout}``: show, pause, resume, abort,
rollback; so a first run in order never asks about a rollout it has not made.
A create first waits (at most 60 s) for the rollout the collection started
last to end, since its nodes are busy until then. Every request checks its
answer (``pm.test``): the status is one the document gives for success (or 409
for an action the rollout's state refuses), and the body has the fields its
schema requires (``detail`` on a 409).
"""

from __future__ import annotations

import json
import re
import sys
from typing import Any

__all__ = ["collection_from_openapi", "main"]

_SCHEMA = "https://schema.getpostman.com/json/collection/v2.1.0/collection.json"
_VARIABLES = {"baseUrl": "http://127.0.0.1:8080", "token": "", "rollout": ""}
#: Order of the actions on one rollout in a run: each still finds a rollout to act on.
_ACTION_ORDER = ("pause", "resume", "abort", "rollback")


def _body_examples(operation: dict[str, Any]) -> list[tuple[str, str, Any]]:
    """(name, summary, value) of every JSON body example of an operation."""
    content = operation.get("requestBody", {}).get("content", {}).get("application/json", {})
    examples = content.get("examples") or {}
    found = [(name, ex.get("summary", ""), ex.get("value")) for name, ex in examples.items()]
    if not found and "example" in content:
        found = [("example", "", content["example"])]
    return found


def _request(method: str, path: str, operation: dict[str, Any], body: Any | None) -> dict[str, Any]:
    postman_path = re.sub(r"\{([^}]+)\}", r":\1", path)
    segments = [s for s in postman_path.split("/") if s]
    variables = [
        {
            "key": p["name"],
            "value": "{{" + p["name"] + "}}" if p["name"] in _VARIABLES else "",
            "description": p.get("description", ""),
        }
        for p in operation.get("parameters", [])
        if p.get("in") == "path"
    ]
    request: dict[str, Any] = {
        "method": method.upper(),
        # Every write says JSON: a tokenless bridge refuses writes that do not (hub.http).
        "header": [{"key": "Content-Type", "value": "application/json"}]
        if body is not None or method.lower() == "post"
        else [],
        "url": {
            "raw": "{{baseUrl}}" + postman_path,
            "host": ["{{baseUrl}}"],
            "path": segments,
            **({"variable": variables} if variables else {}),
        },
        "description": operation.get("description") or operation.get("summary", ""),
    }
    if not operation.get("security"):
        request["auth"] = {"type": "noauth"}
    if body is not None:
        request["body"] = {
            "mode": "raw",
            "raw": json.dumps(body, indent=2),
            "options": {"raw": {"language": "json"}},
        }
    return request


def _resolve(schema: Any, openapi: dict[str, Any]) -> dict[str, Any]:
    """Follow one local ``$ref`` of a schema."""
    if isinstance(schema, dict) and isinstance(schema.get("$ref"), str):
        name = schema["$ref"].rsplit("/", 1)[-1]
        target = openapi.get("components", {}).get("schemas", {}).get(name, {})
        return target if isinstance(target, dict) else {}
    return schema if isinstance(schema, dict) else {}


def _success(operation: dict[str, Any]) -> tuple[list[int], dict[str, Any] | None]:
    """The success codes a run should see, and the JSON schema of that answer (None: not JSON).

    A 2xx documented with a JSON body wins over one without (the bodyless 200 of
    ``/api/updates`` is the dry run's, which the examples are not).
    """
    responses = operation.get("responses", {})
    codes = sorted(code for code in responses if code.startswith("2") and code.isdigit())
    with_body = [c for c in codes if "application/json" in (responses[c].get("content") or {})]
    chosen = with_body or codes or ["200"]
    content = (responses.get(chosen[0], {}).get("content") or {}).get("application/json")
    return [int(c) for c in chosen], (content.get("schema", {}) if isinstance(content, dict) else None)


def _body_checks(
    method: str, path: str, schema: dict[str, Any], openapi: dict[str, Any], conflict: bool
) -> list[str]:
    resolved = _resolve(schema, openapi)
    lines = ['pm.test("body is what the API documents", function () {', "  const body = pm.response.json();"]
    if conflict:
        lines += [
            "  if (pm.response.code === 409) {",
            '    pm.expect(body.detail, "a 409 says why").to.be.a("string");',
            "    return;",
            "  }",
        ]
    if resolved.get("type") == "array":
        lines.append('  pm.expect(body).to.be.an("array");')
        for field in _resolve(resolved.get("items"), openapi).get("required", []):
            lines.append(f"  body.forEach((item) => pm.expect(item).to.have.property({json.dumps(field)}));")
    else:
        lines.append('  pm.expect(body).to.be.an("object");')
        lines += [
            f"  pm.expect(body).to.have.property({json.dumps(f)});" for f in resolved.get("required", [])
        ]
    if method == "get" and path.endswith("/{rollout}"):
        lines.append('  pm.expect(body.id).to.eql(pm.collectionVariables.get("rollout"));')
    elif "{rollout}" in path and "rollout" in resolved.get("required", []):
        lines.append('  pm.expect(body.rollout).to.eql(pm.collectionVariables.get("rollout"));')
    lines.append("});")
    return lines


def _test_script(method: str, path: str, operation: dict[str, Any], openapi: dict[str, Any]) -> list[str]:
    """``pm.test`` checks of the status and the body; then the ``x-fleet-saves`` variables."""
    codes, schema = _success(operation)
    conflict = method == "post" and "{" in path and "409" in operation.get("responses", {})
    accepted = [*codes, 409] if conflict else codes
    lines = [
        f"const expected = {json.dumps(accepted)};",
        'pm.test("status is " + expected.join(" or "), function () {',
        "  pm.expect(expected).to.include(pm.response.code);",
        "});",
    ]
    if schema is None:
        lines += [
            'pm.test("body is not empty", function () {',
            "  pm.expect(pm.response.text()).to.not.be.empty;",
            "});",
        ]
    else:
        lines += _body_checks(method, path, schema, openapi, conflict)
    saves = operation.get("x-fleet-saves") or {}
    if saves:
        lines += ["if (pm.response.code < 300) {", "  const body = pm.response.json();"]
        lines += [
            f"  pm.collectionVariables.set({json.dumps(variable)}, body[{json.dumps(field)}]);"
            for variable, field in sorted(saves.items())
        ]
        lines.append("}")
    return lines


#: A create's pre-request script: the targets of the rollout this collection started last
#: are busy (409) until it ends, so wait for that (at most 60 s) before creating another.
_WAIT_FOR_PREVIOUS = [
    'const previous = pm.collectionVariables.get("rollout");',
    'const active = ["pending", "running", "rolling_back", "aborting"];',
    "const deadline = Date.now() + 60000;",
    "function poll() {",
    "  pm.sendRequest({",
    '    url: pm.variables.get("baseUrl") + "/api/rollouts/" + previous,',
    '    header: { Authorization: "Bearer " + pm.variables.get("token") },',
    "  }, function (err, res) {",
    "    const state = !err && res.code === 200 ? res.json().state : null;",
    "    if (active.indexOf(state) >= 0 && Date.now() < deadline) { setTimeout(poll, 500); }",
    "  });",
    "}",
    "if (previous) { poll(); }",
]


def _order(method: str, path: str, operation: dict[str, Any]) -> tuple[int, int, str, str]:
    """Creates first, then requests without path parameters, then those on one rollout (see above)."""
    if operation.get("x-fleet-saves"):
        return (0, 0, path, method)
    if "{" not in path:
        return (1, 0, path, method)
    action = path.rstrip("/").rsplit("/", 1)[-1]
    rank = 0 if method == "get" else 1 + (_ACTION_ORDER.index(action) if action in _ACTION_ORDER else 9)
    return (2, rank, path, method)


def collection_from_openapi(openapi: dict[str, Any]) -> dict[str, Any]:
    """Turn an OpenAPI 3 document into a Postman v2.1 collection (deterministic)."""
    folders: dict[str, list[dict[str, Any]]] = {}
    operations = [
        (path, method, operation)
        for path, methods in openapi.get("paths", {}).items()
        for method, operation in methods.items()
    ]
    for path, method, operation in sorted(operations, key=lambda o: _order(o[1], o[0], o[2])):
        tag = (operation.get("tags") or ["general"])[0]
        name = operation.get("summary") or f"{method.upper()} {path}"
        script = _test_script(method, path, operation, openapi)
        events = [{"listen": "test", "script": {"type": "text/javascript", "exec": script}}]
        if operation.get("x-fleet-saves"):
            events.insert(
                0, {"listen": "prerequest", "script": {"type": "text/javascript", "exec": _WAIT_FOR_PREVIOUS}}
            )
        items = [
            {"name": f"{name}: {example}", "request": _request(method, path, operation, value)}
            | ({"description": summary} if summary else {})
            for example, summary, value in _body_examples(operation)
        ] or [{"name": name, "request": _request(method, path, operation, None)}]
        for item in items:
            folders.setdefault(tag, []).append(item | {"event": events})
    info = openapi.get("info", {})
    return {
        "info": {
            "name": info.get("title", "fleetbus hub"),
            "description": info.get("description", ""),
            "schema": _SCHEMA,
        },
        "auth": {"type": "bearer", "bearer": [{"key": "token", "value": "{{token}}", "type": "string"}]},
        "variable": [{"key": key, "value": value} for key, value in _VARIABLES.items()],
        # Folders in the order of their first request: the one that creates comes first.
        "item": [{"name": tag, "item": items} for tag, items in folders.items()],
    }


def main() -> int:
    """Print the collection of the current bridge to stdout."""
    from hub.http import make_app

    class _Offline:
        is_connected = False
        missing_subscriptions: tuple[str, ...] = ()

        async def request(self, op: str, body: dict[str, Any]) -> Any:
            raise NotImplementedError

        async def handle(self, request: Any) -> Any:
            raise NotImplementedError

        async def metrics_text(self) -> bytes:
            return b""

    openapi = make_app(_Offline(), token="x").openapi()  # noqa: S106 - only to render the schema
    sys.stdout.write(json.dumps(collection_from_openapi(openapi), indent=2, sort_keys=True) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
