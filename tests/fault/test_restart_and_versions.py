"""A "file, then restart" plan rolls back to the truth, and a node's versions are announced at a job's end.

A real hub and a real agent process with the ``process`` service manager. The
service reads its version file once, at start, and serves it over HTTP. The
plan is download -> file -> ``service restart`` -> health (issue 24): rolled
back, the restart's undo must run after the file's, so the node answers 1.0
again (and the health check's ``verify`` shows it). The agent's heartbeat is
long (5 s) and the jobs are short: the node's retained birth must carry the new
version within a moment of each job's end anyway (issue 14), not at some later
heartbeat, or never.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

from bus.topics import Topics
from edge_agent import system
from tests.conftest import RunningBroker, free_port
from tests.fault.conftest import Fleet, Observer, SlowWeb, http_answer, observing, start_fleet

_LOGGER = logging.getLogger(__name__)

NODE = "v1"
SERVER = r"""
import http.server, os, sys
state, port = sys.argv[1], int(sys.argv[2])
version = open(os.path.join(state, "version")).read().strip()  # read once, at start
class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = ("version %s\n" % version).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *args):
        pass
http.server.HTTPServer(("127.0.0.1", port), Handler).serve_forever()
"""


async def _version_seen(observer: Observer, wanted: str) -> float:
    """Wait until the node's retained state says ``app`` runs ``wanted``; return when (monotonic)."""

    def seen() -> float | None:
        state = observer.states.get(NODE)
        ok = state is not None and state.state == "online" and state.inventory.services.get("app") == wanted
        return time.monotonic() if ok else None

    found: float = await observer.wait(seen, f"{NODE} reporting app {wanted}", 15.0)
    return found


async def _app_node(
    fleet: Fleet, slow_web: SlowWeb, server: str, *, dest: str
) -> tuple[Path, int, Path, list[dict[str, Any]]]:
    """Node ``NODE`` running ``app`` 1.0 (``server``); its config; a plan writing 2.0 into ``dest``.

    The plan: download 2.0, write it to ``dest``, restart ``app``, check that 2.0
    answers (its restore check: that 1.0 answers). Returns (state dir, port, config, plan).
    """
    state = fleet.prepare_node(NODE)
    port = free_port()
    (fleet.scripts / "server.py").write_text(server)
    for name in {"version", dest}:
        (state / name).write_text("1.0\n")
    argv = [sys.executable, str(fleet.scripts / "server.py"), str(state), str(port)]
    config = fleet.root / "agent.toml"
    config.write_text(f'[agent.services.app]\ncommand = {json.dumps(argv)}\nversion_file = "version"\n')
    await system.start_service("app", argv=argv, cwd=state, env=dict(os.environ), state_dir=state)
    url, sha = slow_web.add("/app-2.0", b"2.0\n")
    plan: list[dict[str, Any]] = [
        {"type": "download", "url": url, "sha256": sha, "name": "app-2.0"},
        {"type": "file", "src": "app-2.0", "dest": dest, "mode": "0644"},
        {"type": "service", "action": "restart", "name": "app"},
        {
            "type": "health", "check": "http", "target": f"http://127.0.0.1:{port}/", "expect": "2.0",
            "retries": 30, "interval_s": 0.1, "verify": {"expect": "version 1.0"},
        },
    ]  # fmt: skip
    return state, port, config, plan


async def test_file_then_restart_rolls_back_to_the_old_file_and_versions_follow_each_job(
    amqtt_broker: RunningBroker, topics: Topics, make_fleet: Any, slow_web: SlowWeb
) -> None:
    fleet: Fleet = make_fleet(amqtt_broker.url, topics)
    state, port, config, plan = await _app_node(fleet, slow_web, SERVER, dest="version")
    figures: list[float] = []
    try:
        async with observing(amqtt_broker.url, topics) as observer:
            await start_fleet(fleet, observer, [NODE], "--config", str(config), heartbeat_s=5.0)
            await _version_seen(observer, "1.0")
            for cycle in range(3):
                spec = {"name": f"restart {cycle}", "targets": [NODE], "plan": plan}
                rollout = (await observer.ok("create_rollout", spec))["rollout"]
                snap, ended = await observer.job_end(NODE, rollout)
                assert snap.phase == "succeeded", fleet.logs()
                assert http_answer(port) == "version 2.0"
                figures.append(await _version_seen(observer, "2.0") - ended)

                await observer.ok("rollback", {"rollout": rollout})
                snap, ended = await observer.job_end(NODE, rollout, undo=True)
                assert snap.action == "rollback", snap
                # The restart was undone last, on the restored 1.0 file: 1.0 answers, verified.
                assert http_answer(port) == "version 1.0", f"{snap}\n{fleet.logs()}"
                assert (state / "version").read_text() == "1.0\n"
                assert snap.phase == "rolled_back", f"{snap}\n{fleet.logs()}"
                assert "restore verified: step 4 (health)" in snap.detail
                figures.append(await _version_seen(observer, "1.0") - ended)
            _LOGGER.warning(
                "job end -> version on the state topic: max %.3f s, mean %.3f s, %d job ends (heartbeat 5 s)",
                max(figures),
                sum(figures) / len(figures),
                len(figures),
            )
            assert max(figures) < 3.0, figures  # announced at the job's end, not at a heartbeat
    finally:
        with contextlib.suppress(Exception):
            await system.stop_service("app", state_dir=state, grace_s=2)
        await asyncio.sleep(0)


STALE_SERVER = SERVER.replace('"version"', '"served"')  # answers what it serves, not the version file


async def test_a_version_its_health_check_contradicts_is_named_until_a_check_bears_it_out(
    amqtt_broker: RunningBroker, topics: Topics, make_fleet: Any, slow_web: SlowWeb
) -> None:
    """The service serves 2.0 while its version file still says 1.0: the node says both."""
    fleet: Fleet = make_fleet(amqtt_broker.url, topics)
    # The version file (what the node reports) is never rewritten by this plan.
    state, port, config, plan = await _app_node(fleet, slow_web, STALE_SERVER, dest="served")

    def health_saw(wanted: dict[str, str]) -> bool:
        node = observer.states.get(NODE)
        return node is not None and node.state == "online" and node.inventory.health_saw == wanted

    try:
        async with observing(amqtt_broker.url, topics) as observer:
            births = observer.hub_births
            fleet.start_hub()
            fleet.start_agent(NODE, "--config", str(config), heartbeat_s=5.0)
            await observer.hub_ready(births)
            await observer.online([NODE])
            await _version_seen(observer, "1.0")
            assert observer.states[NODE].inventory.health_saw == {}

            rollout = (
                await observer.ok("create_rollout", {"name": "stale", "targets": [NODE], "plan": plan})
            )["rollout"]
            snap, _ = await observer.job_end(NODE, rollout)
            assert snap.phase == "succeeded", fleet.logs()
            assert http_answer(port) == "version 2.0"
            await observer.wait(lambda: health_saw({"app": "2.0"}) or None, "app named as seen at 2.0", 15.0)
            assert observer.states[NODE].inventory.services["app"] == "1.0"  # the report stays as read
            # The hub passes it on to every operator surface (fleet nodes, GET /api/nodes, the TUI).
            listed = await observer.ok("nodes", {})
            rows = listed["nodes"] if isinstance(listed, dict) else listed
            (row,) = [r for r in rows if r["node"] == NODE]
            assert row["inventory"]["health_saw"] == {"app": "2.0"}

            # Rolled back, the restore check sees 1.0, as reported: nothing left to name.
            await observer.ok("rollback", {"rollout": rollout})
            snap, _ = await observer.job_end(NODE, rollout, undo=True)
            assert snap.phase == "rolled_back", fleet.logs()
            await observer.wait(lambda: health_saw({}) or None, "the disagreement cleared", 15.0)
    finally:
        with contextlib.suppress(Exception):
            await system.stop_service("app", state_dir=state, grace_s=2)
        await asyncio.sleep(0)
