"""The hub's HTTP bridge (DESIGN section 5): FastAPI on the hub's own event loop.

Every endpoint goes through ``HubService.request`` — the same code path as the
MQTT ``hub/request`` topic — so HTTP and MQTT can never disagree. Errors map in
one place: InvalidInput -> 422, Conflict -> 409 (with the nodes), NotFound -> 404.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import ipaddress
import json
import logging
from collections.abc import Iterator
from typing import Any, Protocol

import uvicorn
from fastapi import Body, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from bus.errors import ConfigError, Conflict, FleetError, InvalidInput, NotFound
from bus.messages import RolloutSpec, RolloutSummary

__all__ = ["HubApi", "is_loopback", "make_app", "serve_http"]

_LOGGER = logging.getLogger(__name__)

_EXAMPLE_SPEC: dict[str, Any] = {
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
_EXAMPLE_SCRIPT_SPEC: dict[str, Any] = {
    "name": "driver hotfix",
    "targets": ["node-1", "node-2"],
    "plan": [{"type": "script", "name": "install_update.sh", "args": ["1.2.3"], "rollback": "rollback.sh"}],
}


class HubApi(Protocol):
    """What the bridge needs from the hub service."""

    @property
    def is_connected(self) -> bool:
        """True while the hub's broker connection is up."""

    async def request(self, op: str, body: dict[str, Any]) -> Any:
        """Carry out one request op (the MQTT request path)."""

    def metrics_text(self) -> bytes:
        """The Prometheus exposition of the hub's metrics."""


def is_loopback(host: str) -> bool:
    """True for 127.0.0.0/8, ::1 and localhost."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _error(status: int, reason: str, **extra: Any) -> JSONResponse:
    return JSONResponse({"detail": reason, **extra}, status_code=status)


def make_app(service: HubApi, token: str | None) -> FastAPI:
    """The FastAPI app of one hub; ``token`` turns bearer auth on."""
    app = FastAPI(
        title="fleetbus hub",
        version="1",
        description=(
            "Start, follow, abort and roll back fleet rollouts. Every call except /api/health, "
            "/docs and /openapi.json needs `Authorization: Bearer <token>` when the hub runs "
            "with --http-token."
        ),
    )
    bearer = HTTPBearer(auto_error=False)

    def authorize(credentials: HTTPAuthorizationCredentials | None = Depends(bearer)) -> None:  # noqa: B008
        if token is None:
            return
        given = credentials.credentials if credentials is not None else ""
        if not hmac.compare_digest(given.encode(), token.encode()):
            raise _Unauthorized

    @app.exception_handler(RequestValidationError)
    async def _invalid(_request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        if any(err.get("type") == "json_invalid" for err in errors):
            return _error(400, "malformed JSON body")
        parts = []
        for err in errors[:5]:
            loc = ".".join(str(p) for p in err.get("loc", ()) if p != "body") or "(body)"
            parts.append(f"{loc}: {err.get('msg', 'invalid')}")
        return _error(422, "; ".join(parts), errors=json.loads(json.dumps(errors[:20], default=str)))

    @app.exception_handler(_Unauthorized)
    async def _unauthorized(_request: Request, _exc: _Unauthorized) -> JSONResponse:
        return JSONResponse(
            {"detail": "missing or wrong bearer token"},
            status_code=401,
            headers={"WWW-Authenticate": "Bearer"},
        )

    @app.exception_handler(FleetError)
    async def _fleet_error(_request: Request, exc: FleetError) -> JSONResponse:
        if isinstance(exc, Conflict):
            return _error(409, exc.reason, nodes=exc.nodes)
        if isinstance(exc, NotFound):
            return _error(404, exc.reason)
        if isinstance(exc, InvalidInput):
            return _error(422, exc.reason)
        return _error(503, exc.reason)

    auth = [Depends(authorize)]

    @app.post("/api/updates", status_code=202, dependencies=auth, tags=["rollouts"])
    async def create_update(
        spec: RolloutSpec = Body(  # noqa: B008
            openapi_examples={
                "package": {"summary": "nginx 1.24.0 in waves with a health check", "value": _EXAMPLE_SPEC},
                "script": {"summary": "a script with its rollback", "value": _EXAMPLE_SCRIPT_SPEC},
            }
        ),
    ) -> dict[str, str]:
        """Start a rollout: 202 with its id; 409 names offline or unknown targets."""
        result: dict[str, str] = await service.request("create_rollout", spec.model_dump(mode="json"))
        return result

    @app.get("/api/rollouts", dependencies=auth, tags=["rollouts"])
    async def list_rollouts() -> list[RolloutSummary]:
        """Every rollout the hub knows, newest first."""
        return [RolloutSummary.model_validate(item) for item in await service.request("list", {})]

    @app.get("/api/rollouts/{rollout}", dependencies=auth, tags=["rollouts"])
    async def show_rollout(rollout: str) -> dict[str, Any]:
        """One rollout's summary (and its audit trail); 404 if unknown."""
        result: dict[str, Any] = await service.request("show", {"rollout": rollout})
        return result

    @app.post("/api/rollouts/{rollout}/abort", status_code=202, dependencies=auth, tags=["rollouts"])
    async def abort_rollout(rollout: str) -> Any:
        """Abort: coordinated rollback of every touched node."""
        return await service.request("abort", {"rollout": rollout})

    @app.post("/api/rollouts/{rollout}/rollback", status_code=202, dependencies=auth, tags=["rollouts"])
    async def rollback_rollout(rollout: str) -> Any:
        """Roll back a finished rollout on every node that applied it."""
        return await service.request("rollback", {"rollout": rollout})

    @app.post("/api/rollouts/{rollout}/pause", status_code=202, dependencies=auth, tags=["rollouts"])
    async def pause_rollout(rollout: str) -> Any:
        """Pause: no new commands; running nodes finish their step."""
        return await service.request("pause", {"rollout": rollout})

    @app.post("/api/rollouts/{rollout}/resume", status_code=202, dependencies=auth, tags=["rollouts"])
    async def resume_rollout(rollout: str) -> Any:
        """Resume a paused rollout."""
        return await service.request("resume", {"rollout": rollout})

    @app.get("/api/nodes", dependencies=auth, tags=["fleet"])
    async def list_nodes() -> list[dict[str, Any]]:
        """Every known node: {node, online, last_seen, labels, inventory, job}."""
        result: list[dict[str, Any]] = await service.request("nodes", {})
        return result

    @app.get("/api/health", tags=["fleet"])
    async def health() -> JSONResponse:
        """Liveness of the hub and its broker connection (no token needed)."""
        connected = service.is_connected
        return JSONResponse(
            {"ok": connected, "broker": "connected" if connected else "disconnected"},
            status_code=200 if connected else 503,
        )

    @app.get("/metrics", dependencies=auth, tags=["fleet"], response_class=Response)
    async def metrics() -> Response:
        """Prometheus text format."""
        return Response(service.metrics_text(), media_type="text/plain; version=0.0.4; charset=utf-8")

    return app


class _QuietServer(uvicorn.Server):
    """uvicorn without its own signal handlers: the hub process owns SIGTERM/SIGINT."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        """Install nothing."""
        yield


class _Unauthorized(Exception):
    """Raised by the auth dependency; mapped to 401."""


async def serve_http(service: HubApi, host: str, port: int, token: str | None) -> None:
    """Serve the bridge on the running loop until cancelled.

    Raises:
        ConfigError: a non-loopback address without a token.
    """
    if token is None and not is_loopback(host):
        raise ConfigError(
            f"refusing to serve HTTP on {host} without --http-token (only loopback may go without)"
        )
    config = uvicorn.Config(
        make_app(service, token), host=host, port=port, log_level="warning", lifespan="off", access_log=False
    )
    server = _QuietServer(config)
    task = asyncio.create_task(server.serve(), name="fleet-http")
    try:
        await asyncio.shield(task)
    except asyncio.CancelledError:
        server.should_exit = True
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await asyncio.wait_for(task, 5)
        raise
