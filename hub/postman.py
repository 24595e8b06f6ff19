"""A Postman (v2.1) collection made from the bridge's OpenAPI document.

``python -m hub.postman > docs/fleetbus.postman_collection.json`` regenerates the
committed collection; a test keeps it current. Requests use three collection
variables: ``baseUrl``, ``token`` (the hub's ``--http-token``) and ``rollout``,
which a request marked ``x-fleet-saves`` in the OpenAPI document (starting a
rollout) sets from its answer, so "show", "abort" and "rollback" work next.
Operations without a ``security`` requirement (health) send no token. Request
bodies are the OpenAPI examples, one request per example.
"""

from __future__ import annotations

import json
import re
import sys
from typing import Any

__all__ = ["collection_from_openapi", "main"]

_SCHEMA = "https://schema.getpostman.com/json/collection/v2.1.0/collection.json"
_VARIABLES = {"baseUrl": "http://127.0.0.1:8080", "token": "", "rollout": ""}


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


def _save_script(operation: dict[str, Any]) -> list[dict[str, Any]]:
    """A test script that stores the answer's fields named by ``x-fleet-saves`` as variables."""
    saves = operation.get("x-fleet-saves") or {}
    if not saves:
        return []
    lines = ["if (pm.response.code < 300) {", "  const body = pm.response.json();"]
    lines += [
        f"  pm.collectionVariables.set({json.dumps(variable)}, body[{json.dumps(field)}]);"
        for variable, field in sorted(saves.items())
    ]
    lines.append("}")
    return [{"listen": "test", "script": {"type": "text/javascript", "exec": lines}}]


def collection_from_openapi(openapi: dict[str, Any]) -> dict[str, Any]:
    """Turn an OpenAPI 3 document into a Postman v2.1 collection (deterministic)."""
    folders: dict[str, list[dict[str, Any]]] = {}
    for path, methods in sorted(openapi.get("paths", {}).items()):
        for method, operation in sorted(methods.items()):
            tag = (operation.get("tags") or ["general"])[0]
            name = operation.get("summary") or f"{method.upper()} {path}"
            events = _save_script(operation)
            examples = _body_examples(operation)
            items = [
                {"name": f"{name}: {example}", "request": _request(method, path, operation, value)}
                | ({"description": summary} if summary else {})
                for example, summary, value in examples
            ] or [{"name": name, "request": _request(method, path, operation, None)}]
            for item in items:
                folders.setdefault(tag, []).append(item | ({"event": events} if events else {}))
    info = openapi.get("info", {})
    return {
        "info": {
            "name": info.get("title", "fleetbus hub"),
            "description": info.get("description", ""),
            "schema": _SCHEMA,
        },
        "auth": {"type": "bearer", "bearer": [{"key": "token", "value": "{{token}}", "type": "string"}]},
        "variable": [{"key": key, "value": value} for key, value in _VARIABLES.items()],
        "item": [{"name": tag, "item": items} for tag, items in sorted(folders.items())],
    }


def main() -> int:
    """Print the collection of the current bridge to stdout."""
    from hub.http import make_app

    class _Offline:
        is_connected = False

        async def request(self, op: str, body: dict[str, Any]) -> Any:
            raise NotImplementedError

        async def metrics_text(self) -> bytes:
            return b""

    openapi = make_app(_Offline(), token="x").openapi()  # noqa: S106 - only to render the schema
    sys.stdout.write(json.dumps(collection_from_openapi(openapi), indent=2, sort_keys=True) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
