"""What the systemd-host tests share: a demo unit that reads its version at start, the policy, plans."""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from tests.lab import lab

#: A unit that takes /srv/demo/NAME.json when it starts (ExecStartPre) and serves it on PORT.
DEMO_WEB_PY = """\
import http.server, json, os, sys, time
name, port = sys.argv[1], int(sys.argv[2])
version = json.load(open(f"/run/demo/{name}.json"))["version"]
body = json.dumps({"version": version, "pid": os.getpid(), "started": time.time()}).encode()
class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *args):
        pass
http.server.HTTPServer(("127.0.0.1", port), Handler).serve_forever()
"""

DEMO_WEB_UNIT = """\
[Unit]
Description=demo web service of the lab (reads /srv/demo/{name}.json when it starts)
{unit_extra}
[Service]
# The version is taken when the unit starts, before systemd calls it started.
RuntimeDirectory=demo
RuntimeDirectoryPreserve=yes
ExecStartPre=/bin/cp /srv/demo/{name}.json /run/demo/{name}.json
ExecStart=/usr/bin/python3 /srv/demo/web.py {name} {port}
Restart=no

[Install]
WantedBy=multi-user.target
"""

POLICY = """\
paths = ["/srv/demo/*"]
services = ["demo-*"]
packages = ["lab-*"]
modules = ["*"]
images = ["*"]
"""

#: Scripts a plan may run (installed by setup.sh --scripts).
SCRIPTS = {
    "slow.sh": "#!/bin/sh\necho slow step started\nsleep 300\n",
    # Outlasts a link drop and its detection (keepalive 4 s), even on a loaded machine.
    "pause.sh": "#!/bin/sh\nsleep 20\n",
    "lab-demo-version.sh": "#!/bin/sh\ndpkg-query -W -f '${Version}' lab-demo\n",
}

#: Short heartbeats and keepalive, so partitions are seen in seconds (mosquitto: 1.5 x keepalive).
AGENT_SETTINGS = "heartbeat_s = 1\nkeepalive_s = 4"


def install_demo_web(
    host: lab.Host,
    version: str = "1.0",
    *,
    name: str = "demo-web",
    port: int = 8000,
    start_limit: bool = False,
) -> None:
    """NAME.service serving ``version`` (from /srv/demo/NAME.json) on PORT; no start limit unless asked."""
    host.put("/srv/demo/web.py", DEMO_WEB_PY)
    host.put(f"/srv/demo/{name}.json", json.dumps({"version": version}) + "\n")
    extra = "" if start_limit else "StartLimitIntervalSec=0\n"
    host.put(
        f"/etc/systemd/system/{name}.service", DEMO_WEB_UNIT.format(unit_extra=extra, name=name, port=port)
    )
    host.systemctl("daemon-reload")
    host.systemctl("reset-failed", f"{name}.service", check=False)
    host.systemctl("restart", f"{name}.service")
    lab.wait_for(f"{name} on {host.name}", lambda: served(host, port) == version, timeout=20)


def served(host: lab.Host, port: int = 8000) -> str:
    """The version the demo unit on PORT serves ('' when it does not answer)."""
    text = host.http(port)
    return str(json.loads(text)["version"]) if text else ""


def served_pid(host: lab.Host, port: int = 8000) -> int:
    text = host.http(port)
    return int(json.loads(text)["pid"]) if text else 0


def file_on_disk(host: lab.Host, name: str = "demo-web") -> str:
    return str(json.loads(host.run(["cat", f"/srv/demo/{name}.json"]).stdout)["version"])


def spec(targets: list[str], plan: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
    return {
        "name": extra.pop("name", "lab"),
        "targets": targets,
        "plan": plan,
        "failure": {"max_failed": 0, "on_failure": "rollback"},
        **extra,
    }


def stop_file_start(
    artifacts: lab.Artifacts, version: str, expect: str, *, name: str = "demo-web", port: int = 8000
) -> list[dict[str, Any]]:
    """The documented update pattern: download, stop, file, start, HTTP health."""
    src = f"{name}-{version}.json"
    return [
        artifacts.add(src, json.dumps({"version": version}) + "\n"),
        {"type": "service", "action": "stop", "name": name},
        {"type": "file", "src": src, "dest": f"/srv/demo/{name}.json"},
        {"type": "service", "action": "start", "name": name},
        health_http(expect, port),
    ]


def health_http(expect: str, port: int = 8000) -> dict[str, Any]:
    return {"type": "health", "check": "http", "target": f"http://127.0.0.1:{port}/", "expect": f'"{expect}"',
            "retries": 5, "interval_s": 0.3}  # fmt: skip


class LabFleet:
    """A fleet of booted hosts with the agent installed by setup.sh, the hub and the broker."""

    def __init__(self, fleet: lab.Fleet, artifacts: lab.Artifacts, hosts: dict[str, lab.Host]) -> None:
        self.fleet = fleet
        self.artifacts = artifacts
        self.hosts = hosts
        self.setup_out: dict[str, str] = {}

    def why(self, shown: dict[str, Any], units: tuple[str, ...] = ("fleet-agent", "demo-web")) -> str:
        """The nodes' state at the hub and the last journal lines of the hosts' units (for failures)."""
        lines = [json.dumps(shown.get("nodes", shown))[:3000]]
        for name, host in self.hosts.items():
            for unit in units:
                tail = host.journal(unit).splitlines()[-15:]
                lines += [f"--- {name} {unit}", *tail]
        return "\n".join(lines)


def build_fleet(net: lab.LabNet, boot: Any, root: Path, names: list[str]) -> LabFleet:
    fleet = lab.Fleet(net, root, names)
    artifacts = lab.Artifacts(net, root / "artifacts")
    hosts: dict[str, lab.Host] = {}
    kit = LabFleet(fleet, artifacts, hosts)
    for index, name in enumerate(names, start=1):
        hosts[name] = boot(name, index)
        install_demo_web(hosts[name])

    def install(host: lab.Host) -> str:
        started = time.monotonic()
        result = host.install_agent(
            fleet.credentials(host.name),
            fleet.pub,
            policy=POLICY,
            scripts=SCRIPTS,
            labels=["role=lab"],
            agent_settings=AGENT_SETTINGS,
        )
        print(f"lab: setup.sh on {host.name} took {time.monotonic() - started:.1f} s")
        return result.stdout + result.stderr

    with ThreadPoolExecutor(len(names)) as pool:  # setup.sh on every host at once
        kit.setup_out = dict(zip(names, pool.map(install, hosts.values()), strict=True))
    fleet.wait_online(names)
    return kit
