"""A real NATS cluster on loopback for tests and benchmarks: nats-server processes, by pid.

``NatsCluster`` writes the cluster's configs with ``broker_config.nats`` on free
ports, starts one ``nats-server`` per server, waits until every server takes
MQTT clients (JetStream has a leader and the MQTT streams exist), and can kill
any one server with SIGKILL (by pid, never by name) and start it again.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import subprocess
import time
import uuid
from pathlib import Path

from broker_config.nats import NatsConfig, write_nats_config
from bus.errors import BusError
from bus.mqtt import MqttClient, parse_broker_urls
from cli.ports import free_port


def nats_binary() -> str | None:
    """Path of nats-server, or None."""
    return shutil.which("nats-server") or (
        "/usr/bin/nats-server" if Path("/usr/bin/nats-server").exists() else None
    )


class NatsCluster:
    """``servers`` nats-server processes forming one cluster; the fleet's users unless ``anonymous``."""

    def __init__(
        self,
        directory: Path,
        nodes: list[str],
        *,
        prefix: str,
        servers: int = 3,
        anonymous: bool = False,
    ) -> None:
        binary = nats_binary()
        if binary is None:
            raise FileNotFoundError("nats-server is not installed: apt-get install -y nats-server")
        self.binary = binary
        self.directory = directory
        ports: list[int] = []
        while len(ports) < 3 * servers:  # free_port may hand out one port twice (it binds and lets go)
            port = free_port()
            if port not in ports:
                ports.append(port)
        self.config: NatsConfig = write_nats_config(
            directory,
            nodes,
            servers=servers,
            prefix=prefix,
            mqtt_ports=ports[0:servers],
            client_ports=ports[servers : 2 * servers],
            cluster_ports=ports[2 * servers :],
            anonymous=anonymous,
        )
        self.procs: dict[int, subprocess.Popen[bytes]] = {}

    @property
    def servers(self) -> int:
        return self.config.settings.servers

    def url(self, client: str = "hub") -> str:
        """The client's URL list (every server)."""
        return self.config.url(client)

    def server_url(self, client: str, index: int) -> str:
        """The client's URL of server ``index`` (from 1) alone."""
        return self.url(client).split(",")[index - 1]

    def mqtt_port(self, index: int) -> int:
        return self.config.settings.mqtt_ports[index - 1]

    def pid(self, index: int) -> int:
        return self.procs[index].pid

    def start_server(self, index: int) -> None:
        log = self.directory / f"nats-{index}.log"
        with log.open("ab") as out:
            self.procs[index] = subprocess.Popen(
                [self.binary, "-c", str(self.config.server_conf(index))], stdout=out, stderr=out
            )

    async def start(self, timeout: float = 90.0) -> None:
        """Start every server; return once each one serves MQTT with retained messages."""
        for index in range(1, self.servers + 1):
            self.start_server(index)
        await self.wait_ready(timeout)

    async def wait_ready(self, timeout: float = 90.0, indexes: list[int] | None = None) -> None:
        """Until a retained message published through each server is read back through it."""
        deadline = time.monotonic() + timeout
        for index in indexes or list(range(1, self.servers + 1)):
            while True:
                try:
                    await self._probe(index)
                    break
                except (BusError, asyncio.TimeoutError) as exc:
                    proc = self.procs.get(index)
                    if proc is not None and proc.poll() is not None:
                        raise RuntimeError(f"nats-server {index} exited: {self.log(index)}") from exc
                    if time.monotonic() > deadline:
                        raise TimeoutError(
                            f"NATS server {index} not ready: {exc}\n{self.log(index)}"
                        ) from exc
                    await asyncio.sleep(0.5)

    async def _probe(self, index: int) -> None:
        url = parse_broker_urls(self.server_url("hub", index))
        topic = f"{self.config.settings.prefix}/events"
        async with MqttClient(url, connect_timeout=5, keepalive=5) as client:
            await client.subscribe(topic, qos=0)
            payload = uuid.uuid4().hex.encode()
            await asyncio.wait_for(client.publish(topic, payload, qos=1, wait=True), 5)

            async def read() -> None:
                async for message in client.messages():
                    if message.payload == payload:
                        return

            await asyncio.wait_for(read(), 5)

    def kill(self, index: int) -> None:
        """SIGKILL server ``index`` by pid (a crash: no goodbye to clients or routes)."""
        proc = self.procs.pop(index)
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait(30)

    def stop(self) -> None:
        """SIGTERM every server still running (by pid), SIGKILL if it lingers."""
        for index in list(self.procs):
            proc = self.procs.pop(index)
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(15)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(15)

    def log(self, index: int, tail: int = 3000) -> str:
        path = self.directory / f"nats-{index}.log"
        return path.read_text(errors="replace")[-tail:] if path.exists() else ""
