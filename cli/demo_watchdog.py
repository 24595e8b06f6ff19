"""``python -m cli.demo_watchdog ROOT``: ends what ``fleet demo`` started if the demo dies.

The demo starts this first, in its own session, with the read end of a pipe as
standard input, and writes ``pid N`` for every process group it starts. The demo
holds the only write end: when it ends, however it ends (even ``kill -9``), the
pipe reaches end-of-file. Unless the demo wrote ``stopped`` (it cleaned up
itself), the watchdog then ends every recorded process group and the demo
services whose pidfiles lie under ``ROOT``: SIGTERM, a grace period, SIGKILL.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import time
from collections.abc import Iterable
from pathlib import Path

__all__ = ["end_groups", "main", "service_groups"]

#: How long the groups get between SIGTERM and SIGKILL.
GRACE_S = 8.0


def service_groups(root: Path) -> list[int]:
    """Process groups of the demo services (their pidfiles under ``root``)."""
    found: list[int] = []
    for pidfile in root.glob("nodes/*/state/services/*.pid"):
        with contextlib.suppress(ValueError, OSError, IndexError):
            found.append(int(pidfile.read_text().split()[0]))
    return found


def _alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def end_groups(groups: Iterable[int], grace_s: float = GRACE_S) -> None:
    """SIGTERM each process group, wait up to ``grace_s`` for all to go, SIGKILL the rest."""
    targets = sorted({g for g in groups if g > 1 and g != os.getpgrp()})
    for pgid in targets:
        with contextlib.suppress(OSError):
            os.killpg(pgid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline and any(_alive(g) for g in targets):
        time.sleep(0.1)
    for pgid in targets:
        with contextlib.suppress(OSError):
            os.killpg(pgid, signal.SIGKILL)


def main(argv: list[str] | None = None) -> int:
    """Wait for the demo to end; clean up after it unless it said it did."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m cli.demo_watchdog ROOT", file=sys.stderr)
        return 2
    root = Path(args[0])
    # The terminal's Ctrl-C and hang-up are for the demo; this process outlives it on purpose.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    groups: set[int] = set()
    stopped = False
    for raw in sys.stdin.buffer:
        word, _, value = raw.decode("ascii", errors="replace").strip().partition(" ")
        if word == "pid" and value.isdigit():
            groups.add(int(value))
        elif word == "stopped":
            stopped = True
    if not stopped:
        end_groups([*groups, *service_groups(root)])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
