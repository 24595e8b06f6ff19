"""The processes and files of ``fleet demo`` (blocking orchestration, no event loop)."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import http.server
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import threading
import time
from importlib import resources
from pathlib import Path
from typing import Any

from cli.ports import free_port, service_port

__all__ = ["DemoFleet"]

_ASSETS = ("demo_service.py", "check_app.sh", "install_update.sh", "rollback.sh")
_PREFIX = "fleet/v1"


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


class DemoFleet:
    """Broker, hub, artifact server and N agents, all on 127.0.0.1 under ``root``."""

    def __init__(self, root: Path, *, nodes: int, broker_port: int, http_addr: str, verbose: bool) -> None:
        self.root = root
        self.node_ids = [f"node-{i}" for i in range(1, nodes + 1)]
        self.verbose = verbose
        self.broker_port = free_port(broker_port or 1883)
        host, _, port = http_addr.rpartition(":")
        self.http_host = host or "127.0.0.1"
        self.http_port = free_port(int(port or 0))
        self.token = secrets.token_urlsafe(24)
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self._broker: Any = None
        self._artifacts: http.server.ThreadingHTTPServer | None = None
        self._urls: dict[str, str] = {}

    @property
    def broker_url(self) -> str:
        """The URL (with the tools' credentials) that the CLI and TUI use."""
        return self._urls["tui"]

    @property
    def tools_url_file(self) -> Path:
        """The file holding the tools' broker URL (credentials included)."""
        return self.root / "broker" / "credentials" / "tui.url"

    # ------------------------------------------------------------------ start

    def start(self) -> None:
        """Lay out the files and start every process."""
        if self.root.exists():
            self._stop_leftover_services()
            shutil.rmtree(self.root)
        (self.root / "logs").mkdir(parents=True)
        from bus.signing import generate_keypair

        self.key, self.pub = generate_keypair(self.root / "keys")
        self._start_broker()
        self._start_artifacts()
        self._write_rollouts()
        self._start_hub()
        for index, node in enumerate(self.node_ids, start=1):
            self._start_agent(index, node)
        self._wait_fleet_online()

    def _start_broker(self) -> None:
        """The embedded broker, locked down: passwords and the fleet's ACL (DESIGN section 7)."""
        from broker_config.generate import write_broker_config
        from bus.broker import BrokerThread, load_config

        generated = write_broker_config(self.root / "broker", self.node_ids, port=self.broker_port)
        self._urls = {client: generated.url(client) for client in generated.credentials}
        config = load_config(self.root / "broker" / "amqtt.yaml", "127.0.0.1", self.broker_port)
        self._broker = BrokerThread(config)
        self._broker.start()

    def _start_artifacts(self) -> None:
        art = self.root / "artifacts"
        art.mkdir()
        (art / "demo-app-2.0.json").write_text(json.dumps({"version": "2.0"}) + "\n")
        (art / "demo-app-2.1.json").write_text(json.dumps({"version": "2.1", "requires_hw": "rev-b"}) + "\n")
        handler = functools.partial(_QuietHandler, directory=str(art))
        self._artifacts = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=self._artifacts.serve_forever, name="demo-artifacts", daemon=True).start()

    @property
    def artifacts_url(self) -> str:
        """Base URL of the demo's artifact server."""
        assert self._artifacts is not None  # noqa: S101 - after start()
        return f"http://127.0.0.1:{self._artifacts.server_address[1]}"

    def _write_rollouts(self) -> None:
        out = self.root / "rollouts"
        out.mkdir()
        # Each health check also says how a restore is verified (DESIGN 3.4): the version the
        # node ran before answers again (1.0 before good.json; 2.0 before bad.json, run after it).
        for version, old, name, waves in (
            ("2.0", "1.0", "good", ["1", "50%"]),
            ("2.1", "2.0", "bad", ["100%"]),
        ):
            artifact = self.root / "artifacts" / f"demo-app-{version}.json"
            spec = {
                "name": f"demo-app {version}",
                "targets": {"labels": {"role": "web"}},
                "plan": [
                    {
                        "type": "download",
                        "url": f"{self.artifacts_url}/{artifact.name}",
                        "sha256": _sha256(artifact),
                        "name": artifact.name,
                    },
                    {"type": "service", "action": "stop", "name": "demo-app"},
                    {"type": "file", "src": artifact.name, "dest": "app/version.json", "mode": "0644"},
                    {"type": "service", "action": "start", "name": "demo-app"},
                    {
                        "type": "health",
                        "check": "command",
                        "target": "check_app.sh",
                        "expect": version,
                        "retries": 5,
                        "interval_s": 0.5,
                        "verify": {"target": f"check_app.sh {old}", "expect": f"version {old}"},
                    },
                ],
                "strategy": {"waves": [int(w) if w.isdigit() else w for w in waves]},
                "failure": {"max_failed": 0, "on_failure": "rollback"},
            }
            (out / f"{name}.json").write_text(json.dumps(spec, indent=2) + "\n")

    def _spawn(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> None:
        log = (self.root / "logs" / f"{name}.log").open("ab")
        full_env = {**os.environ, "FLEET_NO_CONFIG_DISCOVERY": "1", **(env or {})}
        self.procs[name] = subprocess.Popen(
            argv, stdout=log, stderr=log, env=full_env, start_new_session=True
        )
        log.close()

    def _tool_env(self) -> dict[str, str]:
        """The environment of the demo's own tool runs (nodes, TUI): the tools' credentials."""
        return {**os.environ, "FLEET_NO_CONFIG_DISCOVERY": "1", "FLEET_BROKER": self.broker_url}

    def _fleet(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "cli.main", *args]

    def _start_hub(self) -> None:
        # Secrets go through the environment, not argv (which `ps` shows to every user).
        self._spawn(
            "hub",
            self._fleet(
                "hub",
                "--db",
                str(self.root / "hub.json"),
                "--signing-key",
                str(self.key),
                "--http",
                f"{self.http_host}:{self.http_port}",
            ),
            env={"FLEET_BROKER": self._urls["hub"], "FLEET_HTTP_TOKEN": self.token},
        )

    def _start_agent(self, index: int, node: str) -> None:
        base = self.root / "nodes" / node
        state, scripts = base / "state", base / "scripts"
        (state / "app").mkdir(parents=True)
        scripts.mkdir(parents=True)
        assets = resources.files("cli.demo_assets")
        for asset in _ASSETS:
            target = scripts / asset
            target.write_bytes(assets.joinpath(asset).read_bytes())
            target.chmod(0o755)
        (state / "app" / "version.json").write_text(json.dumps({"version": "1.0"}) + "\n")
        app_port = service_port()
        (state / "app" / "port").write_text(f"{app_port}\n")
        hw = "rev-a" if index == 3 or (len(self.node_ids) < 3 and index == len(self.node_ids)) else "rev-b"
        policy = base / "policy.toml"
        policy.write_text(
            "# What any command may touch on this node, signed or not (DESIGN section 7).\n"
            'step_types = ["download", "service", "file", "script", "health"]\n'
            'services = ["demo-app"]\n'
            'scripts = ["check_app.sh", "install_update.sh", "rollback.sh"]\n'
            f'paths = ["{state}/app/*"]\n'
            'download_hosts = ["127.0.0.1"]\n'
        )
        config = base / "agent.toml"
        config.write_text(
            "[agent]\n"
            f'broker = "{self._urls[node]}"\n'
            f'node_id = "{node}"\n'
            f'state_dir = "{state}"\n'
            f'scripts_dir = "{scripts}"\n'
            f'trust = "{self.pub}"\n'
            f'policy = "{policy}"\n'
            "heartbeat_s = 2\n"
            "keepalive_s = 5\n"
            f'labels = {{ role = "web", hw = "{hw}", site = "lab-{1 + (index - 1) % 2}" }}\n'
            "\n[agent.services.demo-app]\n"
            f'command = ["{sys.executable}", "{scripts / "demo_service.py"}"]\n'
            f'version_file = "{state / "app" / "version.json"}"\n'
            f'env = {{ DEMO_PORT = "{app_port}", DEMO_HW = "{hw}", FLEET_STATE_DIR = "{state}" }}\n'
        )
        service_env = {"DEMO_PORT": str(app_port), "DEMO_HW": hw, "FLEET_STATE_DIR": str(state)}
        self._start_demo_app(state, scripts, service_env)
        self._spawn(f"agent-{node}", self._fleet("agent", "--config", str(config)))

    def _start_demo_app(self, state: Path, scripts: Path, env: dict[str, str]) -> None:
        """Start demo-app 1.0 the way the agent's process manager does (it adopts it by pidfile)."""
        import asyncio

        from edge_agent import system

        asyncio.run(
            system.start_service(
                "demo-app",
                argv=[sys.executable, str(scripts / "demo_service.py")],
                cwd=state,
                env={"PATH": os.environ.get("PATH", os.defpath), **env},
                state_dir=state,
            )
        )

    def _wait_fleet_online(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for name, proc in self.procs.items():
                if proc.poll() is not None:
                    log = (self.root / "logs" / f"{name}.log").read_text(errors="replace")
                    raise RuntimeError(f"{name} exited with {proc.returncode}:\n{log[-2000:]}")
            nodes = self.nodes()
            if nodes is not None and sum(1 for n in nodes if n.get("online")) == len(self.node_ids):
                return
            time.sleep(0.3)
        raise TimeoutError("the demo fleet did not come online in time; see logs in " + str(self.root))

    def nodes(self) -> list[dict[str, Any]] | None:
        """The hub's node table, or None when it does not answer yet."""
        result = subprocess.run(
            self._fleet("nodes", "--json"),
            capture_output=True,
            timeout=20,
            check=False,
            env=self._tool_env(),
        )
        if result.returncode != 0:
            return None
        value = json.loads(result.stdout)
        return value if isinstance(value, list) else None

    # ------------------------------------------------------------------ show

    def print_intro(self) -> None:
        """Tell the operator what runs where and what to try."""
        good = self.root / "rollouts" / "good.json"
        bad = self.root / "rollouts" / "bad.json"
        http = f"http://{self.http_host}:{self.http_port}"
        print(
            f"""
fleet demo: {len(self.node_ids)} nodes, broker 127.0.0.1:{self.broker_port}, files in {self.root}
  HTTP bridge  {http}/docs   (token: {self.token})
  the broker is locked down (passwords + ACL); tools use the credentials in {self.tools_url_file}
  try, in another terminal:
    export FLEET_BROKER=$(cat {self.tools_url_file})
    fleet rollout create {good} --wait     # demo-app 1.0 -> 2.0, in waves
    fleet rollout create {bad} --wait      # 2.1 fails on node-3: every node restored
    fleet nodes
    curl -s -X POST -H 'Authorization: Bearer {self.token}' -H 'Content-Type: application/json' \\
         --data @{good} {http}/api/updates
""",
            flush=True,
        )

    def watch(self, duration: float | None) -> None:
        """Print the node table every few seconds (the --no-tui view)."""
        deadline = None if duration is None else time.monotonic() + duration
        while deadline is None or time.monotonic() < deadline:
            table = subprocess.run(
                self._fleet("nodes"),
                capture_output=True,
                text=True,
                timeout=20,
                check=False,
                env=self._tool_env(),
            )
            print(time.strftime("%H:%M:%S"), "\n" + (table.stdout or table.stderr), flush=True)
            pause = 5.0 if deadline is None else max(0.0, min(5.0, deadline - time.monotonic()))
            time.sleep(pause)

    def run_tui(self) -> None:
        """Open the terminal UI in the foreground."""
        subprocess.run(
            self._fleet("tui"),
            check=False,
            env={**self._tool_env(), "FLEET_EXAMPLES": str(self.root / "rollouts")},
        )

    # ------------------------------------------------------------------ stop

    def stop(self) -> None:
        """End every process the demo started (by its pid) and the demo services."""
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs.values():
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        self._stop_leftover_services()
        if self._artifacts is not None:
            self._artifacts.shutdown()
            self._artifacts.server_close()
        if self._broker is not None:
            self._broker.stop()

    def _stop_leftover_services(self) -> None:
        """The demo-app processes outlive their agents by design; end them by pidfile."""
        for pidfile in self.root.glob("nodes/*/state/services/*.pid"):
            with contextlib.suppress(ValueError, OSError):
                pid = int(pidfile.read_text().split()[0])
                os.killpg(pid, signal.SIGTERM)
