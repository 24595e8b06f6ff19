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
from collections.abc import Callable, Iterator
from importlib import resources
from pathlib import Path
from typing import Any

from cli.ports import free_port, service_port

__all__ = ["DemoFleet", "wrap_command"]

_ASSETS = ("demo_service.py", "check_app.sh", "install_update.sh", "rollback.sh")
_PREFIX = "fleet/v1"


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def wrap_command(words: list[str], width: int = 80, indent: str = "    ") -> list[str]:
    """A shell command as lines of at most ``width`` columns, broken between words (a backslash ends each).

    A trailing ``# comment`` word stays on the last line, or goes alone after it when
    it does not fit. A single word wider than a line is never split.
    """
    comment = words[-1] if words and words[-1].startswith("#") else ""
    words = words[:-1] if comment else list(words)
    if not words:
        return [indent + comment] if comment else []
    lines: list[str] = []
    current = indent + words[0]
    for word in words[1:]:
        fits_alone = len(indent) + 2 + len(word) + 2 <= width
        if fits_alone and len(current) + 1 + len(word) + 2 > width:  # room for " \\" at the end
            lines.append(current + " \\")
            current = indent + "  " + word
        else:
            current += " " + word
    if comment and len(current) + 3 + len(comment) <= width:
        lines.append(f"{current}   {comment}")
    else:
        lines.append(current)
        if comment:
            lines.append(indent + comment)
    return lines


def _terminal_state() -> list[Any] | None:
    """The terminal's settings, to put back if the UI is killed (None without a terminal)."""
    try:
        import termios

        return termios.tcgetattr(sys.stdin.fileno())
    except (ImportError, OSError, ValueError):
        return None


def _restore_terminal(saved: list[Any] | None) -> None:
    """Leave the UI's alternate screen and mouse modes, show the cursor, restore the tty settings."""
    with contextlib.suppress(OSError, ValueError):
        sys.stdout.write("\x1b[?1000l\x1b[?1003l\x1b[?1006l\x1b[?2004l\x1b[?1049l\x1b[?25h")
        sys.stdout.flush()
    if saved is not None:
        with contextlib.suppress(ImportError, OSError, ValueError):
            import termios

            termios.tcsetattr(sys.stdin.fileno(), termios.TCSADRAIN, saved)


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


class DemoFleet:
    """Broker, hub, artifact server and N agents, all on 127.0.0.1 under ``root``."""

    def __init__(
        self,
        root: Path,
        *,
        nodes: int,
        broker_port: int,
        http_addr: str,
        verbose: bool,
        say: Callable[[str], None] | None = None,
    ) -> None:
        self.root = root
        self.say = say or (lambda _text: None)
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
        self._watchdog: subprocess.Popen[bytes] | None = None
        self._watch_pipe: int | None = None
        self._deferring = 0
        self.pending_stop: BaseException | None = None

    @property
    def broker_url(self) -> str:
        """The URL (with the tools' credentials) that the CLI and TUI use."""
        return self._urls["tui"]

    @property
    def tools_url_file(self) -> Path:
        """The file holding the tools' broker URL (credentials included)."""
        return self.root / "broker" / "credentials" / "tui.url"

    @property
    def http_url(self) -> str:
        """Base URL of the hub's HTTP bridge."""
        return f"http://{self.http_host}:{self.http_port}"

    @property
    def http_info_file(self) -> Path:
        """``FLEET_HTTP_URL=`` and ``FLEET_HTTP_TOKEN=`` lines, mode 600 (``. FILE`` in a shell)."""
        return self.root / "http.env"

    # ------------------------------------------------------------------ start

    def start(self) -> None:
        """Lay out the files and start every process."""
        if self.root.exists():
            self._stop_leftover_services()
            shutil.rmtree(self.root)
        (self.root / "logs").mkdir(parents=True)
        self._start_watchdog()
        from bus.signing import generate_keypair

        self.key, self.pub = generate_keypair(self.root / "keys")
        self.say(f"starting the broker on 127.0.0.1:{self.broker_port} (passwords and ACL) ...")
        self._start_broker()
        self._start_artifacts()
        self._write_rollouts()
        self._write_http_info()
        self.say(f"starting the hub, HTTP bridge on {self.http_url} ...")
        self._start_hub()
        self.say(f"starting {len(self.node_ids)} agents, each with its demo-app 1.0 ...")
        for index, node in enumerate(self.node_ids, start=1):
            self._start_agent(index, node)
        self.say(f"waiting for the {len(self.node_ids)} nodes to come online ...")
        self._wait_fleet_online()

    def _start_watchdog(self) -> None:
        """A process that ends the demo's children if the demo dies without cleaning up (any signal)."""
        read_end, write_end = os.pipe()
        try:
            self._watchdog = subprocess.Popen(
                [sys.executable, "-m", "cli.demo_watchdog", str(self.root)],
                stdin=read_end,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                start_new_session=True,
            )
        finally:
            os.close(read_end)
        self._watch_pipe = write_end

    @contextlib.contextmanager
    def deferring_stops(self) -> Iterator[None]:
        """Within: a stop signal is kept in ``pending_stop`` (``stop_requested``); raised on leaving."""
        self._deferring += 1
        try:
            yield
        finally:
            self._deferring -= 1
        if not self._deferring and self.pending_stop is not None:
            raise self.pending_stop

    def stop_requested(self, stop: BaseException) -> None:
        """What the demo's signal handler calls: raise ``stop`` now, or once bookkeeping is done."""
        if self._deferring:
            self.pending_stop = stop
            return
        raise stop

    def _tell_watchdog(self, line: str) -> None:
        if self._watch_pipe is not None:
            with contextlib.suppress(OSError):
                os.write(self._watch_pipe, line.encode("ascii") + b"\n")

    def _write_http_info(self) -> None:
        """The HTTP bridge's URL and token, for curl and the TUI's help screen (owner-only)."""
        text = f"FLEET_HTTP_URL={self.http_url}\nFLEET_HTTP_TOKEN={self.token}\n"
        fd = os.open(self.http_info_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(text)

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
        # A stop signal between the start and the bookkeeping would leave a child no one knows
        # of: the signal handler only records a stop while this runs (see `deferring_stops`).
        with self.deferring_stops():
            self.procs[name] = subprocess.Popen(
                argv, stdout=log, stderr=log, env=full_env, start_new_session=True
            )
            self._tell_watchdog(f"pid {self.procs[name].pid}")
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
        last = -1
        while time.monotonic() < deadline:
            for name, proc in self.procs.items():
                if proc.poll() is not None:
                    log = (self.root / "logs" / f"{name}.log").read_text(errors="replace")
                    raise RuntimeError(f"{name} exited with {proc.returncode}:\n{log[-2000:]}")
            nodes = self.nodes()
            online = sum(1 for n in nodes if n.get("online")) if nodes is not None else 0
            if online != last and nodes is not None:
                self.say(f"  {online} of {len(self.node_ids)} nodes online")
                last = online
            if online == len(self.node_ids):
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

    def _shown(self, path: Path) -> str:
        """``path`` relative to the working directory when under it (shorter lines to copy)."""
        with contextlib.suppress(ValueError):
            return str(path.relative_to(Path.cwd()))
        return str(path)

    def intro_text(self, width: int = 79) -> str:
        """What runs where and what to try; every line fits ``width`` columns where paths allow."""
        root, info = self._shown(self.root), self._shown(self.http_info_file)
        good = self._shown(self.root / "rollouts" / "good.json")
        bad = self._shown(self.root / "rollouts" / "bad.json")
        lines = [
            "",
            f"fleet demo: {len(self.node_ids)} nodes up",
            f"  files   {root}",
            f"  broker  127.0.0.1:{self.broker_port} (locked down: passwords + ACL)",
            f"  HTTP    {self.http_url}/docs",
            f"  token   {self.token}",
            f"  saved   {info}",
            "          (URL and token, mode 600; the terminal UI shows them too: ?)",
            "Try, in another terminal:",
        ]
        commands = [
            ["export", f"FLEET_BROKER=$(cat {self._shown(self.tools_url_file)})"],
            ["fleet", "rollout", "create", good, "--wait", "# 1.0 -> 2.0"],
            ["fleet", "rollout", "create", bad, "--wait", "# 2.1 fails"],
            ["fleet", "nodes", "--by-version"],
            [".", info, "# sets FLEET_HTTP_URL and FLEET_HTTP_TOKEN"],
            ["curl", '-H "Authorization: Bearer $FLEET_HTTP_TOKEN"', '"$FLEET_HTTP_URL/api/nodes"'],
            [
                "curl",
                "-X POST",
                '-H "Authorization: Bearer $FLEET_HTTP_TOKEN"',
                "-H 'Content-Type: application/json'",
                f"--data @{good}",
                '"$FLEET_HTTP_URL/api/updates"',
            ],
        ]
        for words in commands:
            lines.extend(wrap_command(words, width))
        return "\n".join(lines) + "\n"

    def print_intro(self) -> None:
        """Tell the operator what runs where and what to try."""
        print(self.intro_text(), flush=True)

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
        """Open the terminal UI in the foreground; if the demo must stop, end the UI and fix the terminal."""
        saved = _terminal_state()
        env = {
            **self._tool_env(),
            "FLEET_EXAMPLES": str(self.root / "rollouts"),
            "FLEET_HTTP_INFO": str(self.http_info_file),
        }
        tui: subprocess.Popen[bytes] | None = None
        try:
            with self.deferring_stops():
                tui = subprocess.Popen(self._fleet("tui"), env=env)
                self._tell_watchdog(f"pid {tui.pid}")
            tui.wait()
        finally:
            if tui is not None and tui.poll() is None:
                tui.terminate()
                try:
                    tui.wait(5)
                except subprocess.TimeoutExpired:
                    tui.kill()
                    tui.wait(5)
                _restore_terminal(saved)

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
        self._tell_watchdog("stopped")
        if self._watch_pipe is not None:
            os.close(self._watch_pipe)
            self._watch_pipe = None
        if self._watchdog is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._watchdog.wait(5)

    def _stop_leftover_services(self) -> None:
        """The demo-app processes outlive their agents by design; end them by pidfile."""
        for pidfile in self.root.glob("nodes/*/state/services/*.pid"):
            with contextlib.suppress(ValueError, OSError):
                pid = int(pidfile.read_text().split()[0])
                os.killpg(pid, signal.SIGTERM)
