"""The hub's HTTP bridge (DESIGN section 5): FastAPI on the hub's own event loop.

Every endpoint goes through the hub's request path, the one the MQTT
``hub/request`` topic takes, so HTTP and MQTT can never disagree: the body of
``POST /api/updates`` is validated here, once, into a typed request
(``hub.requests``) for ``HubService.handle``; the other endpoints hand their op
to ``HubService.request``. Errors map through the error tree's one table
(``bus.errors``, each class's ``status``): InvalidInput -> 422, Conflict -> 409
(with the ``nodes``), NotFound -> 404, anything else the hub refuses -> 503.
Every 4xx body is JSON with a ``detail`` that names the offending field or nodes.

``POST /api/updates`` reads its body itself rather than through a FastAPI body
parameter: the size is bounded before anything is read (413), malformed JSON is
a 400 on any content type (curl's ``--data`` sends form encoding by default),
and schema errors name the field path as the user wrote it (``plan.0.sha256``,
without pydantic's union tags). The OpenAPI document still describes the body
as a ``RolloutSpec``, with ready examples, so Postman imports working requests.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import socket
from collections.abc import Awaitable, Iterator
from typing import Annotated, Any, Literal, Protocol

import uvicorn
from fastapi import Depends, FastAPI, Header, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from bus.errors import ConfigError, Conflict, FleetError
from bus.messages import RolloutSpec, RolloutSummary
from bus.validation import LISTED, explain, one_line
from hub.config import is_loopback
from hub.requests import CreateRollout, PlanRollout, RolloutRequest

__all__ = ["MAX_BODY_BYTES", "HubApi", "make_app", "serve_http"]

_LOGGER = logging.getLogger(__name__)

#: Largest request body the bridge reads; a larger one is refused with 413, unread.
MAX_BODY_BYTES = 1024 * 1024
#: The Idempotency-Key header's rules, as the schema publishes them: bus.messages.IdempotencyKey's.
_IDEMPOTENCY_KEY_PATTERN = r"^[!-~]+$"
_IDEMPOTENCY_KEY_MAX = 128
#: How long one call waits for the hub's answer before 504.
_REQUEST_TIMEOUT_S = 60.0

# The first example is what Postman puts in the request it imports: it works as is
# against `fleet demo` (every demo node has label role=web and these two scripts).
_EXAMPLE_SCRIPT_SPEC: dict[str, Any] = {
    "name": "hotfix 2.0.1 via script",
    "targets": {"labels": {"role": "web"}},
    "plan": [
        {
            "type": "script",
            "name": "install_update.sh",
            "args": ["2.0.1"],
            "rollback": "rollback.sh",
            "timeout_s": 120,
        }
    ],
    "strategy": {"waves": [1, "100%"]},
    "failure": {"max_failed": 0, "on_failure": "rollback"},
}
_EXAMPLE_PACKAGE_SPEC: dict[str, Any] = {
    "name": "nginx 1.24.0",
    "targets": {"labels": {"role": "web"}},
    "plan": [
        {
            "type": "download",
            "url": "https://artifacts.example.com/nginx_1.24.0_amd64.deb",
            "sha256": "0" * 64,
            "name": "nginx_1.24.0_amd64.deb",
        },
        {"type": "service", "action": "stop", "name": "nginx"},
        {
            "type": "package",
            "manager": "dpkg",
            "name": "nginx",
            "version": "1.24.0",
            "src": "nginx_1.24.0_amd64.deb",
        },
        {"type": "service", "action": "start", "name": "nginx"},
        {"type": "health", "check": "http", "target": "http://127.0.0.1/", "retries": 5, "interval_s": 2},
    ],
    "strategy": {"waves": [1, "25%", "100%"], "soak_s": 30},
    "failure": {"max_failed": 0, "on_failure": "rollback"},
}
#: name -> (summary, value); every value must validate as a RolloutSpec (a test checks).
SPEC_EXAMPLES: dict[str, tuple[str, dict[str, Any]]] = {
    "script": ("a script with its rollback, on every node labelled role=web", _EXAMPLE_SCRIPT_SPEC),
    "package": (
        "nginx .deb in waves with an HTTP health check (put your URL and sha256 in)",
        _EXAMPLE_PACKAGE_SPEC,
    ),
}


class HubApi(Protocol):
    """What the bridge needs from the hub service."""

    @property
    def is_connected(self) -> bool:
        """True while the hub's broker connection is up."""

    @property
    def missing_subscriptions(self) -> tuple[str, ...]:
        """Subscriptions the broker has not granted (the hub is deaf to part of the fleet)."""

    async def request(self, op: str, body: dict[str, Any]) -> Any:
        """Carry out one request op (the MQTT request path)."""

    async def handle(self, request: RolloutRequest) -> Any:
        """Carry out one rollout request decoded here (create and plan: the spec validated once)."""

    async def metrics_text(self) -> bytes:
        """The Prometheus exposition of the hub's metrics (built off the event loop)."""


# ---------------------------------------------------------------------- documented bodies


class ErrorBody(BaseModel):
    """Every 4xx/5xx answer."""

    model_config = ConfigDict(extra="allow")

    detail: str = Field(description="One line naming the offending field, node or id.")
    nodes: list[str] | None = Field(default=None, description="409: the offline or unknown targets.")
    errors: list[dict[str, str]] | None = Field(
        default=None, description="422: every invalid field, as {field, message}."
    )


class Created(BaseModel):
    """``POST /api/updates`` accepted the rollout."""

    rollout: str = Field(description="The new rollout's id.")
    existing: bool = Field(
        default=False,
        description="Present (true) only when the idempotency key named a rollout started earlier: "
        "nothing new started.",
    )


class Accepted(BaseModel):
    """An abort, rollback, pause or resume was accepted."""

    rollout: str
    state: str = Field(description="The rollout's state right after the request.")


class Health(BaseModel):
    """``GET /api/health``."""

    ok: bool
    broker: str = Field(
        description='"connected", "disconnected", or "degraded" (connected, a subscription not granted).'
    )


class _Refused(Exception):
    """An HTTP error answer: status, ``detail`` and extra JSON fields."""

    def __init__(self, status: int, detail: str, headers: dict[str, str] | None = None, **extra: Any) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail
        self.headers = headers
        self.extra = extra


_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorBody, "description": text}
    for code, text in (
        (401, "Missing or wrong bearer token."),
        (503, "The hub cannot do it now (no broker connection, no signing key)."),
    )
}


def _responses(*codes: int) -> dict[int | str, dict[str, Any]]:
    texts = {
        400: "Malformed JSON or an empty body.",
        404: "Unknown rollout id.",
        409: "Offline or unknown targets (named in `nodes`), or a state that does not allow this.",
        413: f"Body larger than {MAX_BODY_BYTES} bytes.",
        422: "Invalid input: `detail` names the field path, `errors` lists every invalid field.",
    }
    return {**_ERRORS, **{code: {"model": ErrorBody, "description": texts[code]} for code in codes}}


# ---------------------------------------------------------------------- errors and bodies


def _pair(text: str, what: str, *, required: bool) -> tuple[str, str | None]:
    """``NAME=VALUE`` (or ``NAME`` when the value is optional) of a query parameter; 422 otherwise."""
    name, sep, value = text.partition("=")
    if not name or (required and not sep):
        raise _Refused(
            422, f"{what} must be NAME=VALUE" if required else f"{what} must be NAME or NAME=VALUE"
        )
    return name, value if sep else None


async def _read_json_object(request: Request, limit: int) -> dict[str, Any]:
    """The request body as a JSON object: 413 past ``limit`` (unread), 400 if not JSON, 422 if no object."""
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            length = int(declared)
        except ValueError:
            raise _Refused(400, f"Content-Length {declared[:40]!r} is not a number") from None
        if length > limit:
            raise _Refused(413, f"body of {length} bytes exceeds the {limit}-byte limit")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise _Refused(413, f"body exceeds the {limit}-byte limit")
        chunks.append(chunk)
    raw = b"".join(chunks)
    content_type = request.headers.get("content-type", "")
    hint = "" if not content_type or "json" in content_type else f" (sent as {content_type[:60]}; send JSON)"
    if not raw.strip():
        raise _Refused(400, "empty body: expected a RolloutSpec JSON object")
    try:
        value = json.loads(raw)
    except (ValueError, RecursionError) as exc:
        raise _Refused(400, f"malformed JSON body: {' '.join(str(exc).split())[:200]}{hint}") from None
    if not isinstance(value, dict):
        kind = {list: "an array", str: "a string", bool: "a boolean", type(None): "null"}.get(
            type(value), "a number"
        )
        raise _Refused(422, f"(body): expected a RolloutSpec JSON object, got {kind}")
    return value


def _openapi_components() -> dict[str, Any]:
    """RolloutSpec's JSON Schema and its definitions, as OpenAPI components."""
    schema = RolloutSpec.model_json_schema(ref_template="#/components/schemas/{model}")
    definitions: dict[str, Any] = schema.pop("$defs", {})
    return {**definitions, "RolloutSpec": schema}


_CREATE_BODY: dict[str, Any] = {
    # hub.postman: the generated request stores the new id in the collection's {{rollout}}.
    "x-fleet-saves": {"rollout": "rollout"},
    "requestBody": {
        "required": True,
        "description": f"A RolloutSpec (DESIGN section 2), at most {MAX_BODY_BYTES} bytes.",
        "content": {
            "application/json": {
                "schema": {"$ref": "#/components/schemas/RolloutSpec"},
                "examples": {
                    name: {"summary": summary, "value": value}
                    for name, (summary, value) in SPEC_EXAMPLES.items()
                },
            }
        },
    },
}


# ---------------------------------------------------------------------- the app


def bridge_hosts(host: str, port: int) -> frozenset[str]:
    """The ``Host`` headers that name a bridge bound to ``host:port`` (loopback names included)."""
    names = {host.lower()}
    if is_loopback(host):
        names |= {"localhost", "127.0.0.1", "::1"}
    shown = {f"[{name}]" if ":" in name else name for name in names}
    return frozenset({f"{name}:{port}" for name in shown} | (shown if port == 80 else set()))


def _media_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";", 1)[0].strip().lower()


def _cross_site_reason(request: Request, hosts: frozenset[str]) -> tuple[int, str] | None:
    """Why a tokenless bridge refuses this request as possibly sent by a web page, or None.

    Without a token, any page open in a browser on this machine could reach the
    loopback bridge (issue 16): a foreign ``Host`` is DNS rebinding, a foreign
    ``Origin`` a cross-site request, and a write without ``application/json`` a
    "simple" request that a browser sends without asking first.
    """
    host = request.headers.get("host", "").lower()
    if host not in hosts:
        return 421, f"Host {host[:100]!r} does not name this bridge ({', '.join(sorted(hosts))})"
    origin = request.headers.get("origin")
    if origin is not None and origin.lower() != f"http://{host}":
        return 403, f"cross-origin request from {origin[:100]!r} refused (the bridge has no token)"
    if request.method not in ("GET", "HEAD", "OPTIONS") and _media_type(request) != "application/json":
        return 415, "writes need Content-Type: application/json"
    return None


def make_app(
    service: HubApi,
    token: str | None,
    *,
    max_body_bytes: int = MAX_BODY_BYTES,
    bound: tuple[str, int] | None = None,
) -> FastAPI:
    """The FastAPI app of one hub.

    Args:
        service: the hub (``hub.service.HubService``) or anything with its request API.
        token: the bearer token every call but health and docs needs; None turns auth off.
        max_body_bytes: larger request bodies are refused (413) before they are read.
        bound: the (host, port) it serves on. Without a token, requests must name it
            in ``Host``, carry no foreign ``Origin``, and writes must be JSON.

    Returns:
        The app; serve it with ``serve_http`` (or any ASGI server).
    """
    app = FastAPI(
        title="fleetbus hub",
        version="1",
        description=(
            "Start, follow, abort and roll back fleet rollouts (the same requests as the MQTT "
            "`hub/request` topic). Every call except /api/health, /docs and /openapi.json needs "
            "`Authorization: Bearer <token>` when the hub runs with --http-token."
        ),
    )
    bearer = HTTPBearer(auto_error=False, description="The hub's --http-token.")
    expected = token.encode() if token else None

    if expected is None and bound is not None:
        hosts = bridge_hosts(*bound)

        @app.middleware("http")
        async def same_site_only(request: Request, call_next: Any) -> Any:
            refused = _cross_site_reason(request, hosts)
            if refused is not None:
                return JSONResponse({"detail": refused[1]}, status_code=refused[0])
            return await call_next(request)

    def authorize(credentials: HTTPAuthorizationCredentials | None = Depends(bearer)) -> None:  # noqa: B008
        if expected is None:
            return
        given = credentials.credentials.encode() if credentials is not None else b""
        # Constant time: the comparison does not reveal how much of the token matched.
        if not hmac.compare_digest(given, expected):
            reason = "missing bearer token" if credentials is None else "wrong bearer token"
            raise _Refused(401, reason, headers={"WWW-Authenticate": "Bearer"})

    @app.exception_handler(_Refused)
    async def _refused(_request: Request, exc: _Refused) -> JSONResponse:
        return JSONResponse({"detail": exc.detail, **exc.extra}, status_code=exc.status, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_request: Request, exc: RequestValidationError) -> JSONResponse:
        # Only path parameters are left to FastAPI; name them like the body's fields.
        errors = [
            {
                "field": ".".join(str(p) for p in err.get("loc", ())) or "(request)",
                "message": str(err.get("msg")),
            }
            for err in exc.errors()[:LISTED]
        ]
        return JSONResponse({"detail": one_line(errors), "errors": errors}, status_code=422)

    async def answer(call: Awaitable[Any], op: str) -> Any:
        """The hub's answer to one request; its refusal as an HTTP error (``bus.errors``' table)."""
        try:
            return await asyncio.wait_for(call, _REQUEST_TIMEOUT_S)
        except Conflict as exc:
            raise _Refused(exc.status.http, exc.reason, nodes=list(exc.nodes)) from exc
        except FleetError as exc:
            raise _Refused(exc.status.http, exc.reason) from exc
        except asyncio.TimeoutError:
            raise _Refused(504, f"the hub did not answer {op} within {_REQUEST_TIMEOUT_S:g} s") from None

    async def ask(op: str, body: dict[str, Any]) -> Any:
        """One request through the hub's common path (the MQTT request's)."""
        return await answer(service.request(op, body), op)

    auth = [Depends(authorize)]

    @app.post(
        "/api/updates",
        status_code=202,
        dependencies=auth,
        tags=["rollouts"],
        summary="Start a rollout",
        openapi_extra=_CREATE_BODY,
        responses={
            **_responses(400, 409, 413, 422),
            200: {"description": "dry_run=true: the plan (`kind: plan`); nothing was started."},
        },
        response_model=Created,
        response_model_exclude_unset=True,  # "existing" only when true: DESIGN 5's {"rollout": id}
    )
    async def create_update(
        request: Request,
        dry_run: Annotated[
            bool,
            Query(
                description="true: start nothing; answer 200 with the plan (targets, waves, timing and "
                "every online target's pre-flight), as `fleet rollout plan` and the `plan` request op."
            ),
        ] = False,
        idempotency_key: Annotated[
            str | None,
            Header(
                alias="Idempotency-Key",
                description="The spec's idempotency_key: a retry with the same key returns the same "
                "rollout (existing: true) instead of starting a second one. 1 to 128 printable ASCII "
                "characters without spaces (a UUID, a CI job id).",
                pattern=_IDEMPOTENCY_KEY_PATTERN,
                min_length=1,
                max_length=_IDEMPOTENCY_KEY_MAX,
            ),
        ] = None,
    ) -> Any:
        """Start a rollout from a RolloutSpec: 202 with its id; 409 names offline or unknown targets.

        With ``dry_run=true`` nothing starts: 200 with the plan (``"kind": "plan"``).
        """
        data = await _read_json_object(request, max_body_bytes)
        if idempotency_key is not None:
            given = data.get("idempotency_key")
            if given is not None and given != idempotency_key:
                raise _Refused(422, "the Idempotency-Key header and the body's idempotency_key differ")
            data = {**data, "idempotency_key": idempotency_key}
        try:
            spec = RolloutSpec.model_validate(data)
        except ValidationError as exc:
            errors = explain(exc, data)
            raise _Refused(422, one_line(errors), errors=errors) from None
        if dry_run:
            return JSONResponse(await answer(service.handle(PlanRollout(spec)), "plan"), status_code=200)
        result = await answer(service.handle(CreateRollout(spec)), "create_rollout")
        return Created.model_validate(result)

    @app.get(
        "/api/rollouts", dependencies=auth, tags=["rollouts"], summary="List rollouts", responses=_ERRORS
    )
    async def list_rollouts() -> list[RolloutSummary]:
        """Every rollout the hub knows, newest first."""
        return [RolloutSummary.model_validate(item) for item in await ask("list", {})]

    @app.get(
        "/api/rollouts/{rollout}",
        dependencies=auth,
        tags=["rollouts"],
        summary="Show a rollout",
        responses=_responses(404, 422),
    )
    async def show_rollout(rollout: str) -> dict[str, Any]:
        """One rollout's RolloutSummary, plus its ``plan`` and latest ``audit`` entries; 404 if unknown."""
        result: dict[str, Any] = await ask("show", {"rollout": rollout})
        return result

    def operation(op: str, summary: str, doc: str) -> None:
        async def endpoint(rollout: str) -> Accepted:
            return Accepted.model_validate(await ask(op, {"rollout": rollout}))

        endpoint.__doc__ = doc
        endpoint.__name__ = f"{op}_rollout"
        app.post(
            f"/api/rollouts/{{rollout}}/{op}",
            status_code=202,
            dependencies=auth,
            tags=["rollouts"],
            summary=summary,
            responses=_responses(404, 409, 422),
        )(endpoint)

    operation("abort", "Abort a rollout", "Abort: coordinated rollback of every node it touched.")
    operation("rollback", "Roll back a rollout", "Roll back a finished rollout wherever it was applied.")
    operation("pause", "Pause a rollout", "Pause: no new waves; running nodes finish.")
    operation("resume", "Resume a rollout", "Resume a paused rollout.")

    @app.get(
        "/api/nodes",
        dependencies=auth,
        tags=["fleet"],
        summary="List nodes",
        response_model=list[dict[str, Any]],
        responses={
            **_ERRORS,
            200: {
                "description": "The matching nodes, sorted by id (one page of them with `limit`).",
                "headers": {
                    "X-Total-Count": {
                        "description": "How many nodes match the filters (all pages together).",
                        "schema": {"type": "integer"},
                    },
                    "Link": {
                        "description": 'The next page, `<URL>; rel="next"`, while there is one.',
                        "schema": {"type": "string"},
                    },
                },
            },
        },
    )
    async def list_nodes(
        request: Request,
        limit: Annotated[
            int | None,
            Query(ge=1, le=10_000, description="At most this many nodes (a page); none: every node."),
        ] = None,
        offset: Annotated[
            int, Query(ge=0, description="Skip this many matching nodes (the page's start).")
        ] = 0,
        state: Annotated[
            Literal["online", "offline"] | None, Query(description="Only nodes in this state.")
        ] = None,
        node: Annotated[
            str | None, Query(max_length=200, description="Glob on the node id, e.g. `web-*`.")
        ] = None,
        label: Annotated[
            list[str] | None, Query(description="`NAME=VALUE`, repeatable: every label must match.")
        ] = None,
        version: Annotated[
            list[str] | None,
            Query(description="`SOFTWARE` or `SOFTWARE=VERSION`, repeatable: every one must match."),
        ] = None,
    ) -> Response:
        """Every known node: {node, online, last_seen, labels, inventory, job}, sorted by id.

        Without parameters, every node (as before paging existed). `limit` and
        `offset` page through the matching nodes; `X-Total-Count` says how many
        match and `Link` names the next page.
        """
        body: dict[str, Any] = {"offset": offset, "total": True}
        if limit is not None:
            body["limit"] = limit
        if state is not None:
            body["state"] = state
        if node is not None:
            body["node"] = node
        if label:
            body["labels"] = dict(_pair(item, "label", required=True) for item in label)
        if version:
            body["versions"] = dict(_pair(item, "version", required=False) for item in version)
        result = await ask("nodes", body)
        # {"total", "nodes"}; a bare list from a hub that does not count: all there is.
        rows: list[dict[str, Any]] = result["nodes"] if isinstance(result, dict) else result
        total: int = result["total"] if isinstance(result, dict) else offset + len(rows)
        headers = {"X-Total-Count": str(total)}
        if offset + len(rows) < total and rows:
            following = request.url.include_query_params(offset=offset + len(rows))
            headers["Link"] = f'<{following}>; rel="next"'
        # Encoded here, in one C call: FastAPI's own encoding of 10,000 nodes would hold
        # the hub's event loop (and its broker connection's keepalive) for seconds.
        encoded = json.dumps(rows, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
        return Response(encoded, media_type="application/json", headers=headers)

    @app.get(
        "/api/health",
        tags=["fleet"],
        summary="Health (no token needed)",
        responses={503: {"model": Health, "description": "No broker connection, or a subscription missing."}},
    )
    async def health() -> JSONResponse:
        """Liveness of the hub and its broker connection; reveals nothing about the fleet."""
        connected = service.is_connected
        # Connected, but a subscription not granted (a cluster refusing it): deaf to part of the fleet.
        degraded = connected and bool(service.missing_subscriptions)
        state = "degraded" if degraded else "connected" if connected else "disconnected"
        ok = connected and not degraded
        return JSONResponse(Health(ok=ok, broker=state).model_dump(), status_code=200 if ok else 503)

    @app.get(
        "/metrics",
        dependencies=auth,
        tags=["fleet"],
        summary="Prometheus metrics",
        response_class=Response,
        responses=_ERRORS,
    )
    async def metrics() -> Response:
        """The hub's metrics in the Prometheus text format."""
        return Response(await service.metrics_text(), media_type=CONTENT_TYPE_LATEST)

    default_openapi = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            document = default_openapi()
            schemas = document.setdefault("components", {}).setdefault("schemas", {})
            for name, schema in _openapi_components().items():
                schemas.setdefault(name, schema)
        return app.openapi_schema or {}

    app.openapi = openapi  # type: ignore[method-assign]
    return app


# ---------------------------------------------------------------------- serving


class _QuietServer(uvicorn.Server):
    """uvicorn without its own signal handlers: the hub process owns SIGTERM/SIGINT."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        """Install nothing."""
        yield


def _listen(host: str, port: int) -> socket.socket:
    """A listening TCP socket on host:port; ConfigError naming the address if it cannot be had."""
    try:
        family, kind, proto, _name, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
        sock = socket.socket(family, kind, proto)
    except OSError as exc:
        raise ConfigError(f"cannot serve HTTP on {host}:{port}: {exc.strerror or exc}") from exc
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(128)
    except OSError as exc:
        sock.close()
        raise ConfigError(f"cannot serve HTTP on {host}:{port}: {exc.strerror or exc}") from exc
    sock.setblocking(False)
    return sock


async def serve_http(service: HubApi, host: str, port: int, token: str | None) -> None:
    """Serve the bridge on the running loop until cancelled.

    The socket is bound before this returns control to the loop, so a client
    may connect as soon as the task has started (its connection waits in the
    backlog until uvicorn accepts it).

    Raises:
        ConfigError: a non-loopback address without a token, or an address that
            cannot be bound (in use, not local).
    """
    if not token and not is_loopback(host):
        raise ConfigError(
            f"refusing to serve HTTP on non-loopback {host} without a token (pass --http-token)"
        )
    sock = _listen(host, port)
    config = uvicorn.Config(
        make_app(service, token or None, bound=(host, port)),
        host=host,
        port=port,
        log_level="warning",
        lifespan="off",
        access_log=False,
    )
    server = _QuietServer(config)
    task = asyncio.create_task(server.serve(sockets=[sock]), name="fleet-http")
    try:
        await asyncio.shield(task)
    except asyncio.CancelledError:
        server.should_exit = True
        with contextlib.suppress(asyncio.CancelledError, asyncio.TimeoutError, Exception):
            await asyncio.wait_for(task, 5)
        raise
    finally:
        sock.close()
    _LOGGER.warning("the HTTP bridge on %s:%d stopped", host, port)
