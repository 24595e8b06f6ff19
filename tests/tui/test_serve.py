"""``fleet tui --serve``: the same app served to a browser by textual-serve, on loopback."""

from __future__ import annotations

import subprocess
import sys
import time

import httpx
import pytest

from tests.conftest import free_port

pytestmark = pytest.mark.e2e


def test_serve_answers_a_browser_on_loopback() -> None:
    pytest.importorskip("textual_serve")
    port = free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "cli.main",
            "tui",
            "--broker",
            "mqtt://127.0.0.1:1",
            "--serve",
            f"127.0.0.1:{port}",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 30
        page = None
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                page = httpx.get(f"http://127.0.0.1:{port}/", timeout=2)
                break
            except httpx.TransportError:
                time.sleep(0.1)
        assert page is not None, "nothing answered on the --serve port"
        assert page.status_code == 200
        assert "fleet" in page.text
        assert f"ws://127.0.0.1:{port}/ws" in page.text
    finally:
        proc.terminate()
        try:
            out, err = proc.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
    assert b"warning" not in err
    assert f"serving on http://127.0.0.1:{port}".encode() in out
