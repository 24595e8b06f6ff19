"""A Postman (v2.1) collection made from the bridge's OpenAPI document.

``python -m hub.postman > docs/fleetbus.postman_collection.json`` regenerates the
committed collection; a test keeps it current. Requests use two collection
variables, ``baseUrl`` and ``token``, and carry the OpenAPI examples as bodies.
"""

from __future__ import annotations

import json
import re
import sys
from typing import Any

__all__ = ["collection_from_openapi", "main"]

_SCHEMA = "https://schema.getpostman.com/json/collection/v2.1.0/collection.json"


def _body_examples(operation: dict[str, Any]) -> list[tuple[str, Any]]:
    content = operation.get("requestBody", {}).get("content", {}).get("application/json", {})
    examples = content.get("examples") or {}
    return [(ex.get("summary", name), ex.get("value")) for name, ex in examples.items()]


def _request(method: str, path: str, operation: dict[str, Any], body: Any | None) -> dict[str, Any]:
    postman_path = re.sub(r"\{([^}]+)\}", r":\1", path)
    segments = [s for s in postman_path.split("/") if s]
    variables = [
        {"key": p["name"], "value": "", "description": p.get("description", "")}
        for p in operation.get("parameters", [])
        if p.get("in") == "path"
    ]
    request: dict[str, Any] = {
        "method": method.upper(),
        "header": [{"key": "Content-Type", "value": "application/json"}] if body is not None else [],
        "url": {
            "raw": "{{baseUrl}}" + postman_path,
            "host": ["{{baseUrl}}"],
            "path": segments,
            **({"variable": variables} if variables else {}),
        },
        "description": operation.get("description") or operation.get("summary", ""),
    }
    if body is not None:
        request["body"] = {
            "mode": "raw",
            "raw": json.dumps(body, indent=2),
            "options": {"raw": {"language": "json"}},
        }
    return request


def collection_from_openapi(openapi: dict[str, Any]) -> dict[str, Any]:
    """Turn an OpenAPI 3 document into a Postman v2.1 collection (deterministic)."""
    folders: dict[str, list[dict[str, Any]]] = {}
    for path, methods in sorted(openapi.get("paths", {}).items()):
        for method, operation in sorted(methods.items()):
            tag = (operation.get("tags") or ["general"])[0]
            name = operation.get("summary") or f"{method.upper()} {path}"
            examples = _body_examples(operation)
            if examples:
                for summary, value in examples:
                    folders.setdefault(tag, []).append(
                        {"name": f"{name} ({summary})", "request": _request(method, path, operation, value)}
                    )
            else:
                request = _request(method, path, operation, None)
                folders.setdefault(tag, []).append({"name": name, "request": request})
    info = openapi.get("info", {})
    return {
        "info": {
            "name": info.get("title", "fleetbus hub"),
            "description": info.get("description", ""),
            "schema": _SCHEMA,
        },
        "auth": {"type": "bearer", "bearer": [{"key": "token", "value": "{{token}}", "type": "string"}]},
        "variable": [
            {"key": "baseUrl", "value": "http://127.0.0.1:8080"},
            {"key": "token", "value": ""},
        ],
        "item": [{"name": tag, "item": items} for tag, items in sorted(folders.items())],
    }


def main() -> int:
    """Print the collection of the current bridge to stdout."""
    from hub.http import make_app

    class _Offline:
        is_connected = False

        async def request(self, op: str, body: dict[str, Any]) -> Any:
            raise NotImplementedError

        def metrics_text(self) -> bytes:
            return b""

    openapi = make_app(_Offline(), token="x").openapi()  # noqa: S106 - only to render the schema
    sys.stdout.write(json.dumps(collection_from_openapi(openapi), indent=2, sort_keys=True) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
