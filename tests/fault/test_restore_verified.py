"""An abort mid-start never orphans the daemon the start launched, and ``rolled_back`` is always true.

A real hub and a real agent process. The plan is the one of issue 14: ``svc.sh
stop`` -> ``install.sh 2.0`` -> ``svc.sh start`` -> http health (expects 2.0,
``verify`` expects 1.0). ``svc.sh start`` is an init script: it launches the
service detached (double fork + ``setsid``) and waits for it; the service reads
its version at start, writes its pidfile only after a seeded delay, then serves
its version over HTTP. Each trial aborts the rollout at a seeded moment while
the start runs. Whatever the node reports must be true: ``rolled_back`` only
with version 1.0 answering and no 2.0 process alive anywhere; a restore the
agent cannot show (a rollback script that restores nothing) is
``rollback_failed`` with the evidence. ``FLEET_FAULT_TRIALS=N`` runs N trials.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

from bus.topics import Topics
from tests.conftest import RunningBroker, free_port
from tests.fault.conftest import DEADLINE, Fleet, http_answer, observing, start_fleet, trials

_LOGGER = logging.getLogger(__name__)

NODE = "d1"

APP = r"""
import http.server, os, sys, time
state, delay = sys.argv[1], float(sys.argv[2])
version = open(os.path.join(state, "version")).read().strip()  # read once, at start
time.sleep(delay)  # a slow start: the pidfile comes late
tmp = os.path.join(state, "app.pid.tmp")
with open(tmp, "w") as f:
    f.write("%d %s\n" % (os.getpid(), version))
os.replace(tmp, os.path.join(state, "app.pid"))
class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = ("version %s\n" % version).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *args):
        pass
port = int(open(os.path.join(state, "port")).read())
http.server.HTTPServer(("127.0.0.1", port), Handler).serve_forever()
"""

SVC = r"""#!/bin/sh
# svc.sh start|stop: the service's init script (FLEET_PHASE=rollback does the opposite).
action=$1
if [ "$FLEET_PHASE" = rollback ]; then
    case $action in start) action=stop ;; stop) action=start ;; esac
fi
S=$FLEET_STATE_DIR
running() { [ -f "$S/app.pid" ] && kill -0 "$(cut -d' ' -f1 "$S/app.pid")" 2>/dev/null; }
case $action in
start)
    if running; then echo "already running"; exit 0; fi
    rm -f "$S/app.pid"
    delay=$(cat "$S/delay" 2>/dev/null || echo 0.2)
    # Detached, as init scripts do: double fork, a session of its own, no tty, no pipes.
    ( setsid python3 "$(dirname "$0")/app.py" "$S" "$delay" </dev/null >>"$S/app.log" 2>&1 & ) &
    for _ in $(seq 200); do running && exit 0; sleep 0.05; done
    echo "service did not start"; exit 1 ;;
stop)
    if ! running; then echo "not running"; rm -f "$S/app.pid"; exit 0; fi
    pid=$(cut -d' ' -f1 "$S/app.pid"); kill "$pid"
    for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || { rm -f "$S/app.pid"; exit 0; }; sleep 0.05; done
    kill -9 "$pid"; rm -f "$S/app.pid" ;;
esac
"""

INSTALL = r"""#!/bin/sh
# install.sh VERSION: write the service's version file (rollback: put the saved one back).
S=$FLEET_STATE_DIR
if [ "$FLEET_PHASE" = rollback ]; then
    [ -f "$S/version.saved" ] && mv "$S/version.saved" "$S/version"
else
    cp "$S/version" "$S/version.saved"; echo "$1" > "$S/version"
fi
"""

NOOP = "#!/bin/sh\necho 'restores nothing'\n"


def _app_processes(state: Path) -> dict[int, str]:
    """Every live service process of the node, with the version it read (from its own pidfile line
    when it wrote one, else from the version file it was started on: unknown, '?')."""
    found: dict[int, str] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            argv = (entry / "cmdline").read_bytes().split(b"\0")
            if len(argv) > 2 and argv[1].endswith(b"app.py") and argv[2] == str(state).encode():
                stat = (entry / "stat").read_text()
                if stat[stat.rfind(")") + 2] not in "ZX":
                    found[int(entry.name)] = "?"
    with contextlib.suppress(OSError, ValueError):
        pid, version = (state / "app.pid").read_text().split()
        if int(pid) in found:
            found[int(pid)] = version
    return found


def _kill_apps(state: Path) -> None:
    for pid in _app_processes(state):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def _setup(fleet: Fleet) -> tuple[Path, int]:
    for name, text in (("svc.sh", SVC), ("install.sh", INSTALL), ("noop.sh", NOOP), ("app.py", APP)):
        (fleet.scripts / name).write_text(text)
        (fleet.scripts / name).chmod(0o755)
    state = fleet.prepare_node(NODE)
    port = free_port()
    (state / "port").write_text(f"{port}\n")
    (state / "version").write_text("1.0\n")
    return state, port


def _start_old(fleet: Fleet, state: Path, port: int) -> None:
    """The node before a trial: 1.0 installed and answering, nothing else running."""
    _kill_apps(state)
    for name in ("app.pid", "version.saved"):
        (state / name).unlink(missing_ok=True)
    (state / "version").write_text("1.0\n")
    (state / "delay").write_text("0\n")
    env = {"PATH": os.environ.get("PATH", os.defpath), "FLEET_STATE_DIR": str(state), "FLEET_PHASE": "apply"}
    subprocess.run([str(fleet.scripts / "svc.sh"), "start"], env=env, check=True, timeout=30)
    deadline = time.monotonic() + DEADLINE
    while http_answer(port) != "version 1.0":
        assert time.monotonic() < deadline, http_answer(port)
        time.sleep(0.05)


def _plan(port: int, *, install_rollback: str = "install.sh") -> list[dict[str, Any]]:
    return [
        {"type": "script", "name": "svc.sh", "args": ["stop"], "rollback": "svc.sh"},
        {"type": "script", "name": "install.sh", "args": ["2.0"], "rollback": install_rollback},
        {"type": "script", "name": "svc.sh", "args": ["start"], "rollback": "svc.sh"},
        {
            "type": "health", "check": "http", "target": f"http://127.0.0.1:{port}/", "expect": "2.0",
            "retries": 30, "interval_s": 0.1, "verify": {"expect": "version 1.0"},
        },
    ]  # fmt: skip


async def test_abort_mid_daemonizing_start_is_true_every_time(
    amqtt_broker: RunningBroker, topics: Topics, make_fleet: Any, rng: random.Random
) -> None:
    fleet: Fleet = make_fleet(amqtt_broker.url, topics)
    state, port = _setup(fleet)
    count = trials(6, cap=200)
    outcomes: list[tuple[str, str, str]] = []
    try:
        async with observing(amqtt_broker.url, topics) as observer:
            await start_fleet(fleet, observer, [NODE])
            for trial in range(count):
                await asyncio.to_thread(_start_old, fleet, state, port)
                delay = rng.uniform(0.2, 1.2)  # how late the daemon writes its pidfile
                (state / "delay").write_text(f"{delay:.3f}\n")
                spec = {"name": f"daemon trial {trial}", "targets": [NODE], "plan": _plan(port)}
                before = len(observer.statuses)
                rollout = (await observer.ok("create_rollout", spec))["rollout"]
                await observer.status(rollout, "running", index=2, after=before)
                await asyncio.sleep(rng.uniform(0.0, delay))  # mid-start: before the pidfile
                await observer.ok("abort", {"rollout": rollout})
                snap, _ = await observer.job_end(NODE, rollout, undo=True)
                answer = http_answer(port)
                processes = await asyncio.to_thread(_app_processes, state)
                summary = await observer.final(rollout)
                outcomes.append((snap.phase, answer, summary.state))
                context = (
                    f"trial {trial} (delay {delay:.2f} s): {snap}\n{answer}\n{processes}\n{fleet.logs()}"
                )
                # The truth: rolled_back means the old version answers and nothing of 2.0 runs.
                assert snap.phase == "rolled_back", context
                assert answer == "version 1.0", context
                assert list(processes.values()) == ["1.0"], context
                assert "restore verified: step 4 (health)" in snap.detail, context
            killed = fleet.agents[NODE].log(10**7).count("apply: killed")
            _LOGGER.warning(
                "daemonizing-abort trials: %d; a daemon left running by the aborted step killed in %d; "
                "node phases %s; rollout states %s",
                count,
                killed,
                sorted({o[0] for o in outcomes}),
                sorted({o[2] for o in outcomes}),
            )

            # A restore that is not one: the install's rollback restores nothing. Reported as such.
            await asyncio.to_thread(_start_old, fleet, state, port)
            (state / "delay").write_text("0.1\n")
            spec = {"name": "lie", "targets": [NODE], "plan": _plan(port, install_rollback="noop.sh")}
            before = len(observer.statuses)
            rollout = (await observer.ok("create_rollout", spec))["rollout"]
            await observer.status(rollout, "running", index=2, after=before)
            await observer.ok("abort", {"rollout": rollout})
            snap, _ = await observer.job_end(NODE, rollout, undo=True)
            context = f"{snap}\n{fleet.logs()}"
            assert snap.phase == "rollback_failed", context
            assert http_answer(port) == "version 2.0"  # what the node really runs
            assert snap.detail.startswith("restore not verified: step 4 (health) "), context
            assert "'version 1.0' not in the response" in snap.detail, context
            assert "(it said: version 2.0)" in snap.detail, context
            assert "\n" not in snap.detail
            assert snap.steps[3].state == "failed", context
    finally:
        _kill_apps(state)
