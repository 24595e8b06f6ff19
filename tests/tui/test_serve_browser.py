"""`fleet tui --serve` in a real browser: headless Chromium opens the page and gets the fleet table.

The terminal is drawn on a canvas, so the test listens to what the page's
websocket receives (Chrome DevTools Protocol ``Network.webSocketFrameReceived``):
the served app's screen, which must show the node published on the broker.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import pytest

from bus.messages import NodeState, encode
from bus.mqtt import MqttClient
from bus.topics import Topics
from tests.conftest import RunningBroker, free_port, wait_port

pytestmark = pytest.mark.e2e

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
BROWSER_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def _frames_text(params: dict[str, object]) -> bytes:
    response = params.get("response")
    if not isinstance(response, dict):
        return b""
    data = str(response.get("payloadData", ""))
    if response.get("opcode") == 2:
        return base64.b64decode(data)
    return data.encode()


async def _page_receives(debug_port: int, url: str, wanted: bytes, timeout: float) -> bool:
    async with aiohttp.ClientSession() as session:
        deadline = time.monotonic() + timeout
        targets: list[dict[str, str]] = []
        while not targets and time.monotonic() < deadline:
            try:
                async with session.get(f"http://127.0.0.1:{debug_port}/json/list") as response:
                    targets = [t for t in await response.json() if t.get("type") == "page"]
            except aiohttp.ClientError:
                await asyncio.sleep(0.2)
        assert targets, "headless Chromium exposed no page"
        async with session.ws_connect(targets[0]["webSocketDebuggerUrl"], max_msg_size=0) as cdp:
            await cdp.send_json({"id": 1, "method": "Network.enable"})
            await cdp.send_json({"id": 2, "method": "Page.navigate", "params": {"url": url}})
            seen = b""
            while time.monotonic() < deadline:
                try:
                    message = await cdp.receive(timeout=max(0.1, deadline - time.monotonic()))
                except asyncio.TimeoutError:
                    break
                if message.type != aiohttp.WSMsgType.TEXT:
                    continue
                event = json.loads(message.data)
                if event.get("method") == "Network.webSocketFrameReceived":
                    seen += _frames_text(event.get("params", {}))
                    if wanted in seen:
                        return True
            return False


async def _publish_node(url: str, topics: Topics, node: str) -> None:
    async with MqttClient(url) as client:
        birth = NodeState(node=node, state="online", session="s1", reason="birth", labels={"role": "web"})
        await client.publish(topics.node(node, "state"), encode(birth), retain=True, wait=True)


@pytest.mark.skipif(CHROMIUM is None and not os.environ.get("CI"), reason="chromium not installed")
def test_headless_chromium_shows_the_fleet_table(amqtt_broker: RunningBroker, tmp_path: Path) -> None:
    assert CHROMIUM is not None, ".ci/run installs Debian's chromium"
    pytest.importorskip("textual_serve")
    topics = Topics(f"fleet-t-serve{os.getpid()}/v1")
    asyncio.run(_publish_node(amqtt_broker.url, topics, "web-042"))
    serve_port, debug_port = free_port(), free_port()
    env = {**os.environ, "FLEET_NO_CONFIG_DISCOVERY": "1"}
    serve = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "cli.main",
            "tui",
            "--broker",
            amqtt_broker.url,
            "--prefix",
            topics.prefix,
            "--serve",
            f"127.0.0.1:{serve_port}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=env,
    )
    browser = subprocess.Popen(
        [
            CHROMIUM,
            *BROWSER_FLAGS,
            f"--remote-debugging-port={debug_port}",
            f"--user-data-dir={tmp_path / 'chromium'}",
            "about:blank",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_port(serve_port, 30)
        shown = asyncio.run(_page_receives(debug_port, f"http://127.0.0.1:{serve_port}/", b"web-042", 60))
        assert shown, "the served page never showed the node web-042"
    finally:
        for proc in (browser, serve):
            proc.terminate()
        for proc in (browser, serve):
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
