"""`fleet demo` dies with its children, however it is stopped (real processes, real signals)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cli.demo_fleet import DemoFleet, wrap_command

pytestmark = pytest.mark.e2e


def _ignore_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # as a shell does for a background job


def _started(root: Path, *args: str, sigint_ignored: bool = False) -> tuple[subprocess.Popen[bytes], Path]:
    """`fleet demo --nodes 2 --no-tui` in its own session, up and printing its intro."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLEET_")}
    env["FLEET_NO_CONFIG_DISCOVERY"] = "1"
    out = root.parent / f"{root.name}.out"
    with out.open("w") as sink:
        proc = subprocess.Popen(
            [sys.executable, "-m", "cli.main", "demo", "--nodes", "2", "--no-tui", "--dir", str(root), *args],
            stdout=sink,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
            preexec_fn=_ignore_sigint if sigint_ignored else None,
        )
    deadline = time.monotonic() + 90
    while "Try, in another terminal" not in out.read_text():
        if proc.poll() is not None or time.monotonic() > deadline:
            os.killpg(proc.pid, signal.SIGKILL)
            pytest.fail(f"fleet demo did not come up:\n{out.read_text()}")
        time.sleep(0.2)
    return proc, out


def _processes_under(root: Path) -> list[str]:
    """Every process whose command line names the demo's directory (hub, agents, services, watchdog)."""
    found = subprocess.run(["pgrep", "-af", str(root)], capture_output=True, text=True, check=False)
    return [line for line in found.stdout.splitlines() if line.strip()]


def _gone(root: Path, timeout: float = 40.0) -> list[str]:
    deadline = time.monotonic() + timeout
    left = _processes_under(root)
    while left and time.monotonic() < deadline:
        time.sleep(0.2)
        left = _processes_under(root)
    return left


@pytest.mark.parametrize(
    ("signum", "sigint_ignored"),
    [(signal.SIGTERM, False), (signal.SIGHUP, False), (signal.SIGKILL, False), (signal.SIGINT, True)],
    ids=["SIGTERM", "SIGHUP", "SIGKILL", "SIGINT-ignored-at-start"],
)
def test_no_child_outlives_the_demo(tmp_path: Path, signum: signal.Signals, sigint_ignored: bool) -> None:
    root = tmp_path / "fleet"
    proc, out = _started(root, sigint_ignored=sigint_ignored)
    try:
        children = _processes_under(root)
        # the hub, 2 agents, 2 demo services and the watchdog
        assert len(children) >= 6, children
        os.kill(proc.pid, signum)
        proc.wait(40)
        left = _gone(root)
        assert left == [], f"left behind after {signum.name}:\n" + "\n".join(left) + "\n" + out.read_text()
        if signum != signal.SIGKILL:
            assert proc.returncode == 0
            assert f"stopping ({signum.name})" in out.read_text()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        for line in _processes_under(root):
            os.kill(int(line.split()[0]), signal.SIGKILL)


def test_demo_says_what_starts_and_its_commands_fit_80_columns(tmp_path: Path) -> None:
    root = tmp_path / "fleet"
    proc, out = _started(root)
    try:
        text = out.read_text()
        for step in ("starting the broker", "starting the hub", "starting 2 agents", "2 of 2 nodes online"):
            assert step in text
        intro = text[text.index("fleet demo: 2 nodes up") :].split("\n\n")[0]
        assert str(root / "http.env") in intro
        # Paths under the temporary directory are long: a line may pass 80 columns only
        # because one path is that long (lines break between words, never inside one).
        for line in intro.splitlines():
            assert len(line) <= 80 or max(len(word) for word in line.split()) > 60, line
    finally:
        os.kill(proc.pid, signal.SIGTERM)
        proc.wait(40)
    assert _gone(root) == []


def test_commands_break_between_words() -> None:
    words = [
        "curl",
        "-X POST",
        '-H "Authorization: Bearer $FLEET_HTTP_TOKEN"',
        "-H 'Content-Type: application/json'",
        "--data @.fleet-demo/rollouts/good.json",
        '"$FLEET_HTTP_URL/api/updates"',
    ]
    lines = wrap_command(words, 79)
    assert all(len(line) <= 79 for line in lines)
    assert all(line.endswith(" \\") for line in lines[:-1])
    joined = " ".join(line.removesuffix(" \\").strip() for line in lines)
    assert joined == " ".join(words)
    assert wrap_command(["fleet", "nodes", "# a comment"], 79) == ["    fleet nodes   # a comment"]


def test_intro_of_the_default_directory_fits_80_columns(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    fleet = DemoFleet(
        tmp_path / ".fleet-demo", nodes=5, broker_port=0, http_addr="127.0.0.1:0", verbose=False
    )
    fleet._urls = {"tui": "mqtt://tui:x@127.0.0.1:1883"}  # what start() would have set
    text = fleet.intro_text()
    assert max(len(line) for line in text.splitlines()) <= 80
    assert "curl" in text
    assert ". .fleet-demo/http.env" in text


@pytest.mark.skipif(shutil.which("tmux") is None, reason="needs tmux to drive the demo's terminal UI")
def test_ctrl_c_in_the_demos_tui_quits_the_demo_and_its_children(tmp_path: Path) -> None:
    root = tmp_path / "fleet"
    socket = f"fleet-test-{os.getpid()}"
    tmux = ["tmux", "-L", socket]
    env_words = " ".join(
        f"{k}={v}"
        for k, v in (("PYTHONPATH", os.environ.get("PYTHONPATH", "")), ("FLEET_NO_CONFIG_DISCOVERY", "1"))
    )
    command = f"env -u FLEET_BROKER {env_words} {sys.executable} -m cli.main demo --nodes 1 --dir {root}"
    subprocess.run([*tmux, "new-session", "-d", "-s", "demo", "-x", "80", "-y", "24", command], check=True)
    try:

        def screen() -> str:
            return subprocess.run(
                [*tmux, "capture-pane", "-p", "-t", "demo"], capture_output=True, text=True, check=False
            ).stdout

        deadline = time.monotonic() + 90
        while "fleet: nodes" not in screen() or "node-1" not in screen():
            assert time.monotonic() < deadline, screen()
            time.sleep(0.3)
        # The help screen shows the HTTP bridge's token, read from the demo's file.
        token = dict(line.split("=", 1) for line in (root / "http.env").read_text().splitlines())[
            "FLEET_HTTP_TOKEN"
        ]
        subprocess.run([*tmux, "send-keys", "-t", "demo", "?"], check=True)
        while token not in screen():
            assert time.monotonic() < deadline, screen()
            time.sleep(0.2)
        subprocess.run([*tmux, "send-keys", "-t", "demo", "?"], check=True)  # ? closes it again
        while token in screen():
            assert time.monotonic() < deadline, screen()
            time.sleep(0.2)
        subprocess.run([*tmux, "send-keys", "-t", "demo", "C-c"], check=True)
        assert _gone(root) == []
    finally:
        subprocess.run([*tmux, "kill-server"], check=False, capture_output=True)
        for line in _processes_under(root):
            os.kill(int(line.split()[0]), signal.SIGKILL)


def _record_during_a_stop(fleet: DemoFleet, done: list[str]) -> None:
    with fleet.deferring_stops():
        fleet.stop_requested(KeyboardInterrupt("SIGTERM"))  # as the signal handler would
        done.append("the child's pid was recorded")


def test_a_stop_during_bookkeeping_waits_for_it(tmp_path: Path) -> None:
    fleet = DemoFleet(tmp_path / "d", nodes=1, broker_port=0, http_addr="127.0.0.1:0", verbose=False)
    done: list[str] = []
    with pytest.raises(KeyboardInterrupt):
        _record_during_a_stop(fleet, done)
    assert done == ["the child's pid was recorded"]
    with pytest.raises(KeyboardInterrupt):
        fleet.stop_requested(KeyboardInterrupt())  # outside: at once
