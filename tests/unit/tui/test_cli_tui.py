from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, ClassVar

import pytest

from bus.errors import ConfigError
from cli import tui as cli_tui
from cli.main import main


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("127.0.0.1:8000", ("127.0.0.1", 8000)),
        ("localhost:80", ("localhost", 80)),
        ("[::1]:8080", ("::1", 8080)),
        ("9000", ("127.0.0.1", 9000)),
        (":9001", ("127.0.0.1", 9001)),
    ],
)
def test_parse_serve(value: str, expected: tuple[str, int]) -> None:
    assert cli_tui.parse_serve(value) == expected


@pytest.mark.parametrize("value", ["host:", "host:http", "127.0.0.1:0", "127.0.0.1:70000"])
def test_parse_serve_refuses_nonsense(value: str) -> None:
    with pytest.raises(ConfigError, match="--serve"):
        cli_tui.parse_serve(value)


def test_is_loopback() -> None:
    assert cli_tui.is_loopback("127.0.0.1")
    assert cli_tui.is_loopback("127.5.0.1")
    assert cli_tui.is_loopback("::1")
    assert cli_tui.is_loopback("localhost")
    assert not cli_tui.is_loopback("0.0.0.0")
    assert not cli_tui.is_loopback("192.0.2.1")
    assert not cli_tui.is_loopback("fleet.example")


def test_a_bad_broker_url_or_prefix_is_a_one_line_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["tui", "--broker", "http://127.0.0.1:1883"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fleet tui: invalid broker URL")
    assert err.count("\n") == 1
    assert main(["tui", "--prefix", "bad prefix/#"]) == 2
    assert "invalid topic prefix" in capsys.readouterr().err


class _FakeServer:
    made: ClassVar[list[dict[str, Any]]] = []

    def __init__(self, command: str, host: str, port: int, title: str) -> None:
        self.made.append({"command": command, "host": host, "port": port, "title": title})

    def serve(self) -> None:
        """Nothing listens: this fake only records what would be served."""


def _serve_args(serve: str) -> argparse.Namespace:
    return argparse.Namespace(
        broker="mqtt://user:secret@127.0.0.1:1883",
        prefix="fleet-t-x/v1",
        serve=serve,
        examples=Path("examples"),
        utc=False,
    )


def test_serve_warns_off_loopback_and_keeps_the_password_off_the_command_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    server = pytest.importorskip("textual_serve.server")
    for name in ("FLEET_BROKER", "FLEET_PREFIX", "FLEET_EXAMPLES", "FLEET_UTC"):
        monkeypatch.setenv(name, "placeholder")  # restored after the test
    monkeypatch.setenv("FLEET_SERVE", "192.0.2.1:8000")
    monkeypatch.setattr(server, "Server", _FakeServer)
    _FakeServer.made.clear()
    assert cli_tui.run(_serve_args("192.0.2.1:8000")) == 0
    err = capsys.readouterr().err
    assert "warning" in err
    assert "not loopback" in err
    made = _FakeServer.made[0]
    assert (made["host"], made["port"]) == ("192.0.2.1", 8000)
    assert made["command"].endswith("-m cli.main tui")
    assert "secret" not in made["command"]
    import os

    assert os.environ["FLEET_BROKER"] == "mqtt://user:secret@127.0.0.1:1883"
    assert os.environ["FLEET_PREFIX"] == "fleet-t-x/v1"
    assert "FLEET_SERVE" not in os.environ  # the child runs the app, not another server
    assert cli_tui.run(_serve_args("127.0.0.1:8001")) == 0
    assert "warning" not in capsys.readouterr().err
