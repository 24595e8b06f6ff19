"""The agent's only door to processes and HTTP.

- ``run``: commands run with ``asyncio.create_subprocess_exec`` (an argument
  list, never a shell), a timeout, and their output streamed line by line to a
  callback (the ``log`` topic). On timeout the whole process group is killed.
- ``fetch``, ``http_get``, ``tcp_connect``: downloads (streamed, hashed and
  size-bounded while they stream), health-check probes. urllib in a worker
  thread: no extra dependency on the edge.
- ``start_service``, ``stop_service``, ``service_pid``: the ``process``
  service manager. A service runs detached (its own session, reparented away
  from the agent, a pidfile holding its pid and start time), so it survives an
  agent restart and the agent never leaves a zombie behind.
- ``StepScope``, ``open_scope``, ``in_scope``: every process one step starts,
  wherever it goes (a daemon that double-forks and leaves the session
  included), so an abort, a timeout or a failure can kill all of it and wait
  until it is gone before the undo runs (see ``StepScope``).
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import fnmatch
import functools
import hashlib
import http.client
import json
import logging
import os
import shutil
import signal
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TypeVar
from urllib.parse import urlsplit, urlunsplit

from bus import files
from bus.errors import StepError

__all__ = [
    "HttpResponse",
    "LineSink",
    "RunResult",
    "StepScope",
    "fetch",
    "http_get",
    "in_scope",
    "kill_process_group",
    "open_scope",
    "process_start_time",
    "redact_url",
    "run",
    "service_log",
    "service_pid",
    "start_service",
    "stop_service",
    "tcp_connect",
]

_LOGGER = logging.getLogger(__name__)

LineSink = Callable[[str, str], Awaitable[None]]
"""Receives (stream, line) for every output line: stream is "stdout" or "stderr"."""

_MAX_KEPT = 64 * 1024


@dataclass(frozen=True)
class RunResult:
    """How a command ended, with the tail of its output."""

    argv: tuple[str, ...]
    returncode: int
    stdout: str
    stderr: str

    @property
    def ok(self) -> bool:
        """True when the command exited 0."""
        return self.returncode == 0

    def tail(self, limit: int = 400) -> str:
        """The last lines of output, for an error message."""
        text = (self.stderr.strip() or self.stdout.strip()).splitlines()
        return " | ".join(text[-3:])[-limit:]


async def run(
    argv: Sequence[str],
    *,
    timeout: float,
    cwd: Path | None = None,
    env: Mapping[str, str] | None = None,
    on_line: LineSink | None = None,
    stdin: bytes | None = None,
    on_start: Callable[[int], Awaitable[None]] | None = None,
) -> RunResult:
    """Run ``argv`` to completion.

    ``on_start(pid)`` runs once the process exists (the pid is also its process
    group id): a step journals it, so a restarted agent can kill what an
    interrupted step left running.

    Raises:
        StepError: the program cannot be started, or it ran past ``timeout``
            (then its whole process group has been killed).
    """
    scope = _SCOPE.get()
    environ = dict(env) if env is not None else None
    join: Callable[[], None] | None = None
    joined = -1
    if scope is not None:  # the step's process, and all it spawns, stay findable (StepScope)
        environ = scope.environ(environ)
        join, joined = scope.joiner()
    creation = asyncio.ensure_future(
        asyncio.create_subprocess_exec(
            *argv,
            cwd=str(cwd) if cwd else None,
            env=environ,
            stdin=asyncio.subprocess.PIPE if stdin is not None else asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            start_new_session=True,
            preexec_fn=join,
        )
    )
    try:
        # Shielded: a cancel in the middle of the creation would make asyncio kill the
        # child alone and wait for its pipes, which a daemon it forked may hold for good.
        proc = await asyncio.shield(creation)
    except asyncio.CancelledError:
        with contextlib.suppress(Exception):
            started = await creation
            _kill_group(started.pid)
            if scope is not None:
                await scope.kill()
            await asyncio.wait_for(started.wait(), 5)
        raise
    except OSError as exc:
        raise StepError(f"cannot run {argv[0]}: {exc.strerror or exc}") from exc
    finally:
        if joined >= 0:  # the child has its own copy (or has exec'd and closed it)
            os.close(joined)
    if on_start is not None:
        try:
            await on_start(proc.pid)
        except BaseException:
            _kill_group(proc.pid)
            with contextlib.suppress(Exception):
                await asyncio.wait_for(proc.wait(), 5)
            raise
    kept: dict[str, list[str]] = {"stdout": [], "stderr": []}

    async def pump(stream: asyncio.StreamReader | None, name: str) -> None:
        if stream is None:
            return
        size = 0
        while True:
            raw = await stream.readline()
            if not raw:
                return
            line = raw.decode("utf-8", errors="replace").rstrip("\n")
            size += len(line)
            if size < _MAX_KEPT:
                kept[name].append(line)
            if on_line is not None:
                try:
                    await on_line(name, line)
                except Exception:  # a failing log sink must not fail the step
                    _LOGGER.exception("log sink failed")

    async def communicate() -> int:
        if stdin is not None and proc.stdin is not None:
            proc.stdin.write(stdin)
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                await proc.stdin.drain()
            proc.stdin.close()
        await asyncio.gather(pump(proc.stdout, "stdout"), pump(proc.stderr, "stderr"))
        return await proc.wait()

    try:
        code = await asyncio.wait_for(communicate(), timeout)
    except asyncio.TimeoutError as exc:
        _kill_group(proc.pid)
        with contextlib.suppress(Exception):
            await asyncio.wait_for(proc.wait(), 5)
        raise StepError(f"{Path(argv[0]).name} timed out after {timeout:g} s") from exc
    except asyncio.CancelledError:
        _kill_group(proc.pid)
        if scope is not None:  # an abort: a daemon the command launched may hold its pipes
            with contextlib.suppress(StepError):
                await scope.kill()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(proc.wait(), 5)
        raise
    return RunResult(tuple(argv), code, "\n".join(kept["stdout"]), "\n".join(kept["stderr"]))


def _kill_group(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)


# ------------------------------------------------------------------ step scopes

#: The environment variable that marks every process of one step (inherited by all it spawns).
SCOPE_ENV = "FLEET_STEP_SCOPE"
_SCOPE: contextvars.ContextVar[StepScope | None] = contextvars.ContextVar("fleet_step_scope", default=None)
_CGROUP_PREFIX = "fleet-step-"
_T = TypeVar("_T")


def _cgroup2_home() -> Path | None:
    """The cgroup v2 directory of this process, if the unified hierarchy is mounted; else None."""
    try:
        own = next(
            line[3:].strip()
            for line in Path("/proc/self/cgroup").read_text().splitlines()
            if line.startswith("0::")
        )
        mounts = Path("/proc/self/mountinfo").read_text().splitlines()
    except (OSError, StopIteration):
        return None
    for line in mounts:
        left, _, right = line.partition(" - ")
        fields = left.split()
        if not right.startswith("cgroup2 ") or len(fields) < 5:
            continue
        root, mount = fields[3], Path(fields[4])
        if root != "/" and not own.startswith(root):
            continue
        relative = own[len(root) :] if root != "/" else own
        home = mount / relative.lstrip("/")
        return home if (home / "cgroup.procs").exists() else None
    return None


class _Cgroups:
    """Where step cgroups go (a child of the agent's own cgroup v2), found and tried once."""

    def __init__(self) -> None:
        self.checked = False
        self.home: Path | None = None
        self.kept: list[Path] = []

    def sweep_kept(self) -> None:
        """Remove the cgroups of services that ran on once they are empty (cheap: a few rmdirs)."""
        kept, self.kept = self.kept, []
        for path in kept:
            try:
                path.rmdir()
            except FileNotFoundError:
                pass
            except OSError:
                self.kept.append(path)

    def _find_home(self) -> Path | None:
        if not self.checked:
            self.checked = True
            self.home = _cgroup2_home()
            if self.home is not None:
                self._sweep(self.home)
        return self.home

    def existing(self, name: str) -> Path | None:
        """The step cgroup ``name`` if it is there (left by a crashed agent), else None."""
        home = self._find_home()
        return home / name if home is not None and (home / name).is_dir() else None

    def create(self, name: str) -> Path | None:
        home = self._find_home()
        if home is None:
            return None
        path = home / name
        try:
            path.mkdir()
        except OSError as exc:  # not ours to create (no root, no delegation): track by marker only
            _LOGGER.info(
                "no cgroup for steps under %s (%s): processes tracked by their environment", self.home, exc
            )
            self.home = None
            return None
        return path

    @staticmethod
    def _sweep(home: Path) -> None:
        """Remove the empty step cgroups of agents that are gone (a crash leaves them)."""
        with contextlib.suppress(OSError):
            for child in home.glob(f"{_CGROUP_PREFIX}*"):
                owner = child.name[len(_CGROUP_PREFIX) :].split("-", 1)[0]
                if owner.isdigit() and int(owner) != os.getpid() and not Path(f"/proc/{owner}").exists():
                    with contextlib.suppress(OSError):
                        child.rmdir()


_CGROUPS = _Cgroups()


class StepScope:
    """Every process one step (an apply or an undo) starts, wherever it goes.

    A step's command runs in its own session and process group, but a daemon it
    launches may double-fork and ``setsid`` away from both, and write its
    pidfile only later. A scope finds all of them two ways: each process of the
    step starts in a cgroup of its own (cgroup v2, a child of the agent's
    cgroup, where this node lets the agent create one), and carries
    ``FLEET_STEP_SCOPE=<token>`` in its environment, which every descendant
    inherits (the fallback where there is no cgroup to create; /proc is walked
    for it). ``kill`` kills them all (``cgroup.kill`` and SIGKILL) and returns
    once none is left; ``release`` keeps what a successful step started on
    purpose running (a service) and only removes its cgroup if it is empty.
    """

    def __init__(self, token: str) -> None:
        self.token = token
        self.cgroup: Path | None = None
        self.spawned = False
        """True once a process was started in the scope (only then is there anything to kill)."""
        self.killed: set[int] = set()
        """Every pid this scope killed, over all ``kill`` calls."""
        self._marker = f"{SCOPE_ENV}={token}".encode()

    def environ(self, env: Mapping[str, str] | None) -> dict[str, str]:
        """``env`` (None: the agent's own) with this scope's marker."""
        return {**(os.environ if env is None else env), SCOPE_ENV: self.token}

    def joiner(self) -> tuple[Callable[[], None] | None, int]:
        """What the child runs between fork and exec to join the cgroup, and the fd to close after.

        Only ``os.write`` on a descriptor opened here, in the parent (close-on-exec):
        no Python locks are taken in the child. If the write fails the child
        still runs, tracked by its marker. ``(None, -1)`` without a cgroup.
        """
        if not self.spawned:  # created with the scope's first process: most steps start none
            self.spawned = True
            self.cgroup = _CGROUPS.create(_CGROUP_PREFIX + self.token)
        if self.cgroup is None:
            return None, -1
        try:
            fd = os.open(self.cgroup / "cgroup.procs", os.O_WRONLY | os.O_CLOEXEC)
        except OSError:
            return None, -1

        def join() -> None:
            with contextlib.suppress(OSError):
                os.write(fd, b"0")

        return join, fd

    def members(self) -> set[int]:
        """Live processes of the scope (zombies excluded). Blocking: reads /proc and cgroupfs."""
        pids: set[int] = set()
        if self.cgroup is not None:
            with contextlib.suppress(OSError, ValueError):
                pids.update(int(p) for p in (self.cgroup / "cgroup.procs").read_text().split())
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            with contextlib.suppress(OSError):
                env = (entry / "environ").read_bytes()
                if self._marker in env.split(b"\0"):
                    pids.add(int(entry.name))
        pids.discard(os.getpid())
        return {pid for pid in pids if process_start_time(pid) is not None}

    def _signal_all(self, pids: set[int]) -> None:
        if self.cgroup is not None:
            with contextlib.suppress(OSError):
                (self.cgroup / "cgroup.kill").write_text("1")
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)

    async def kill(self, *, timeout: float = 10.0) -> list[int]:
        """SIGKILL every process of the scope, again until none is left; return all it ever killed.

        A zombie counts as gone (it runs nothing; its parent or init reaps it).

        Raises:
            StepError: some survive ``timeout`` seconds (named by pid).
        """
        if not self.spawned:
            return sorted(self.killed)
        deadline = time.monotonic() + timeout
        while True:
            pids = await asyncio.to_thread(self.members)
            if not pids:
                break
            self.killed |= pids
            self._signal_all(pids)
            if time.monotonic() > deadline:
                raise StepError(f"processes {sorted(pids)} of the step survive SIGKILL")
            await asyncio.sleep(0.02)
        self._remove()
        return sorted(self.killed)

    def release(self) -> None:
        """The step is over and what it left runs on purpose: its cgroup goes once it is empty."""
        self._remove()

    def _remove(self) -> None:
        if self.cgroup is not None:
            try:
                self.cgroup.rmdir()
            except OSError:  # busy: a service the step started lives in it; removed once it ends
                _CGROUPS.kept.append(self.cgroup)


_SCOPES_OPENED = 0


def open_scope(label: str) -> StepScope:
    """A new scope for one step run; ``label`` (e.g. command and step) makes it readable in cgroupfs."""
    global _SCOPES_OPENED
    _SCOPES_OPENED += 1
    _CGROUPS.sweep_kept()
    safe = "".join(c if c.isalnum() or c in "-_" else "-" for c in label)[:40]
    return StepScope(f"{os.getpid()}-{_SCOPES_OPENED}-{safe}")


def current_scope_token() -> str | None:
    """The token of the step scope the caller runs in (journalled before a step spawns), or None."""
    scope = _SCOPE.get()
    return scope.token if scope is not None else None


async def kill_left_scope(token: str, *, timeout: float = 10.0) -> list[int]:
    """Kill every process still marked with ``token``: a step an agent crash interrupted.

    The crashed agent's scope may have spawned before it journalled the pid (or the
    pid's children left its group): the marker in their environment, and the step's
    cgroup where there was one, still find them all. Returns the pids killed.
    """
    scope = StepScope(token)
    scope.spawned = True
    scope.cgroup = _CGROUPS.existing(_CGROUP_PREFIX + token)
    return await scope.kill(timeout=timeout)


async def in_scope(scope: StepScope, work: Awaitable[_T]) -> _T:
    """Await ``work`` with ``scope`` as the scope of every process it starts (``run``)."""
    marker = _SCOPE.set(scope)
    try:
        return await work
    finally:
        _SCOPE.reset(marker)


# ---------------------------------------------------------------------------- HTTP

_USER_AGENT = "fleetbus-agent/1"
_CHUNK = 64 * 1024
#: Longest a single socket operation of a download may block.
_SOCKET_TIMEOUT = 30.0


def redact_url(url: str) -> str:
    """``url`` without user and password, for messages and logs."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "(invalid URL)"
    host = parts.hostname or ""
    if parts.port is not None:
        host = f"{host}:{parts.port}"
    return urlunsplit((parts.scheme, host, parts.path, parts.query, ""))


def _is_allowed(url: str, allowed_hosts: Sequence[str] | None) -> bool:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return False
    # fnmatch, as Policy.matches does: system stays below settings (no import circle).
    return allowed_hosts is None or any(fnmatch.fnmatchcase(parts.hostname, p) for p in allowed_hosts)


class _RedirectGuard(urllib.request.HTTPRedirectHandler):
    """Follow redirects only to http(s) URLs on allowed hosts (the policy holds after a redirect)."""

    def __init__(self, allowed_hosts: Sequence[str] | None) -> None:
        super().__init__()
        self._allowed = allowed_hosts

    def redirect_request(
        self,
        req: urllib.request.Request,
        fp: IO[bytes],
        code: int,
        msg: str,
        headers: http.client.HTTPMessage,
        newurl: str,
    ) -> urllib.request.Request | None:
        if not _is_allowed(newurl, self._allowed):
            fp.close()
            raise StepError(f"redirected to {redact_url(newurl)}, which this node's policy does not allow")
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def _opener(allowed_hosts: Sequence[str] | None) -> urllib.request.OpenerDirector:
    return urllib.request.build_opener(_RedirectGuard(allowed_hosts))


def _fetch_blocking(
    url: str,
    dest: Path,
    sha256: str,
    max_bytes: int,
    timeout: float,
    allowed_hosts: Sequence[str] | None,
    cancel: threading.Event,
) -> int:
    deadline = time.monotonic() + timeout
    shown = redact_url(url)
    if not _is_allowed(url, allowed_hosts):
        raise StepError(f"download from {shown} is not allowed by this node's policy")
    request = urllib.request.Request(url, headers={"User-Agent": _USER_AGENT})  # noqa: S310 - scheme checked
    digest = hashlib.sha256()
    size = 0
    try:
        with _opener(allowed_hosts).open(request, timeout=min(timeout, _SOCKET_TIMEOUT)) as response:
            length = response.headers.get("Content-Length")
            if length is not None and length.isdigit() and int(length) > max_bytes:
                raise StepError(f"{shown} is {int(length)} bytes, more than the limit of {max_bytes}")
            # ".NAME.<random>.part" beside NAME (what download's undo sweeps after a crash);
            # it replaces NAME only once every byte is in and the sha256 matches.
            with files.replacing(dest, 0o644, suffix=".part") as out:
                while chunk := response.read(_CHUNK):
                    if cancel.is_set():
                        raise StepError("download cancelled")
                    if time.monotonic() > deadline:
                        raise StepError(f"download of {shown} timed out after {timeout:g} s")
                    size += len(chunk)
                    if size > max_bytes:
                        raise StepError(f"{shown} is larger than the limit of {max_bytes} bytes")
                    digest.update(chunk)
                    files.write_all(out, chunk)
                got = digest.hexdigest()
                if got != sha256.lower():
                    raise StepError(f"sha256 mismatch for {shown}: expected {sha256.lower()}, got {got}")
    except urllib.error.HTTPError as exc:
        exc.close()
        raise StepError(f"HTTP {exc.code} {exc.reason} from {shown}") from exc
    except urllib.error.URLError as exc:
        raise StepError(f"cannot fetch {shown}: {exc.reason}") from exc
    except (OSError, http.client.HTTPException, ValueError) as exc:
        raise StepError(f"cannot fetch {shown}: {exc}") from exc
    return size


async def fetch(
    url: str,
    dest: Path,
    *,
    sha256: str,
    max_bytes: int,
    timeout: float,
    allowed_hosts: Sequence[str] | None = None,
) -> int:
    """Download ``url`` to ``dest`` if its sha256 matches; return its size in bytes.

    The body streams to a temp file next to ``dest`` while it is hashed and
    counted; it is renamed to ``dest`` only when complete and matching, so a
    mismatch, an oversize body, a timeout or a cancel leave nothing behind.
    Redirects are followed only to hosts ``allowed_hosts`` (globs) allows.

    Raises:
        StepError: HTTP error, unreachable host, too large, timeout, or checksum mismatch.
    """
    cancel = threading.Event()
    future = asyncio.ensure_future(
        asyncio.to_thread(_fetch_blocking, url, dest, sha256, max_bytes, timeout, allowed_hosts, cancel)
    )
    future.add_done_callback(_retrieve)
    try:
        return await asyncio.shield(future)
    except asyncio.CancelledError:
        # The thread stops at its next chunk (or socket timeout) and removes its temp file.
        cancel.set()
        await asyncio.wait({future}, timeout=_SOCKET_TIMEOUT)
        raise


def _retrieve(future: asyncio.Future[int]) -> None:
    if not future.cancelled():
        future.exception()


@dataclass(frozen=True)
class HttpResponse:
    """Status and (the start of) the body of one HTTP GET."""

    status: int
    body: str


def _get_blocking(
    url: str, timeout: float, max_bytes: int, allowed_hosts: Sequence[str] | None = None
) -> HttpResponse:
    shown = redact_url(url)
    if not _is_allowed(url, None):
        raise StepError(f"not an http(s) URL: {shown}")
    if not _is_allowed(url, allowed_hosts):
        raise StepError(f"download from {shown} is not allowed by this node's policy")
    request = urllib.request.Request(url, headers={"User-Agent": _USER_AGENT})  # noqa: S310 - scheme checked
    try:
        with _opener(allowed_hosts).open(request, timeout=timeout) as response:
            return HttpResponse(response.status, response.read(max_bytes).decode("utf-8", "replace"))
    except urllib.error.HTTPError as exc:
        try:
            body = exc.read(max_bytes).decode("utf-8", "replace")
        except OSError:
            body = ""
        finally:
            exc.close()
        return HttpResponse(exc.code, body)
    except urllib.error.URLError as exc:
        raise StepError(f"GET {shown}: {exc.reason}") from exc
    except (OSError, http.client.HTTPException, ValueError) as exc:
        raise StepError(f"GET {shown}: {exc}") from exc


async def http_get(
    url: str, *, timeout: float, max_bytes: int = 1024 * 1024, allowed_hosts: Sequence[str] | None = None
) -> HttpResponse:
    """GET ``url`` (following redirects); any status comes back, only transport errors raise.

    With ``allowed_hosts`` (globs), the URL and every redirect must name an allowed
    host, as for ``fetch`` (the download pre-flight).

    Raises:
        StepError: not an http(s) URL, a host (or redirect) not allowed, no connection,
            or no answer within ``timeout``.
    """
    return await asyncio.to_thread(_get_blocking, url, timeout, max_bytes, allowed_hosts)


async def tcp_connect(host: str, port: int, *, timeout: float) -> None:
    """Open (and close) a TCP connection to ``host:port``.

    Raises:
        StepError: refused, unreachable, or no connection within ``timeout``.
    """
    try:
        _reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout)
    except asyncio.TimeoutError as exc:
        raise StepError(f"no TCP connection to {host}:{port} within {timeout:g} s") from exc
    except (OSError, ValueError) as exc:
        raise StepError(f"cannot connect to {host}:{port}: {getattr(exc, 'strerror', None) or exc}") from exc
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()


# ----------------------------------------------------------- process services

SERVICES_DIR = "services"

# Runs in a short-lived child: starts the service in its own session, writes the
# pidfile (pid and start time, so a recycled pid is never mistaken for the
# service), prints the pid and exits without waiting. The service is then
# reparented away from the agent: it outlives an agent restart and the agent
# never has to reap it.
_LAUNCHER = r"""
import json, os, subprocess, sys
spec = json.loads(sys.stdin.read())
log = os.open(spec["log"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
try:
    proc = subprocess.Popen(spec["argv"], cwd=spec["cwd"], env=spec["env"], stdin=subprocess.DEVNULL,
                            stdout=log, stderr=log, start_new_session=True, close_fds=True)
except OSError as exc:
    sys.stderr.write("cannot start %s: %s\n" % (spec["argv"][0], exc.strerror or exc))
    sys.stderr.flush()
    os._exit(1)
try:
    with open("/proc/%d/stat" % proc.pid) as f:
        stat = f.read()
    started = stat[stat.rfind(")") + 2:].split()[19]
except (OSError, IndexError):
    started = "-"
tmp = spec["pidfile"] + ".tmp"
with open(tmp, "w") as f:
    f.write("%d %s\n" % (proc.pid, started))
    f.flush()
    os.fsync(f.fileno())
os.replace(tmp, spec["pidfile"])
sys.stdout.write(str(proc.pid))
sys.stdout.flush()
os._exit(0)
"""


def _pidfile(state_dir: Path, name: str) -> Path:
    return state_dir / SERVICES_DIR / f"{name}.pid"


def service_log(state_dir: Path, name: str) -> Path:
    """Where a process service's output is appended."""
    return state_dir / SERVICES_DIR / f"{name}.log"


def process_start_time(pid: int) -> str | None:
    """The start time of a live process (``/proc/<pid>/stat`` field 22); None if gone or a zombie.

    ``"-"`` when there is no procfs to ask. (pid, start time) names a process
    for good: a recycled pid has another start time.
    """
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return None
    except OSError:
        return "-"
    fields = stat[stat.rfind(")") + 2 :].split()
    if not fields or fields[0] in ("Z", "X") or len(fields) < 20:
        return None
    return fields[19]


def _is_alive(pid: int, started: str) -> bool:
    if not Path("/proc/self/stat").exists():  # no procfs: the best we have is kill(0)
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
    now = process_start_time(pid)
    return now is not None and (started in ("-", now))


def _read_pidfile(state_dir: Path, name: str) -> tuple[int, str] | None:
    try:
        pid_text, started = _pidfile(state_dir, name).read_text().split()
        pid = int(pid_text)
    except (OSError, ValueError):
        return None
    return (pid, started) if pid > 1 else None


def service_pid(state_dir: Path, name: str) -> int | None:
    """The pid of a running process service, or None (reads its pidfile and /proc: cheap)."""
    entry = _read_pidfile(state_dir, name)
    if entry is None or not _is_alive(*entry):
        return None
    return entry[0]


def _log_size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def _log_tail(path: Path, since: int = 0, lines: int = 1) -> str:
    """The last lines the service wrote since offset ``since``: its own last words, not earlier runs'."""
    try:
        with path.open("rb") as handle:
            handle.seek(0, os.SEEK_END)
            handle.seek(max(since, handle.tell() - 4096))
            text = handle.read().decode("utf-8", "replace")
    except OSError:
        return ""
    return " | ".join([line.strip() for line in text.splitlines() if line.strip()][-lines:])


# The fast launch: ``sh`` puts ``setsid env -i VARS... ARGV`` in the background and
# prints its pid. The background child of a session leader is no group leader, so
# ``setsid`` makes it a session leader in place (no fork: ``$!`` is the service's
# pid) and ``env -i`` gives it exactly the service's environment. ``sh`` exits at
# once: the service is reparented away from the agent, as with the Python launcher
# (kept for systems without ``setsid``), at a fraction of its CPU (no Python
# interpreter start per service start: bench/agent_cpu.py).
_SH_LAUNCHER = 'log=$1; shift; "$@" </dev/null >>"$log" 2>&1 & echo $!'


def _launch_tools() -> tuple[str, str, str] | None:
    """(sh, setsid, env) when all three are installed, else None (the Python launcher is used)."""
    return _launch_tools_on(os.environ.get("PATH", os.defpath))


@functools.lru_cache(maxsize=4)
def _launch_tools_on(path: str) -> tuple[str, str, str] | None:
    sh, setsid, env = (shutil.which(tool, path=path) for tool in ("sh", "setsid", "env"))
    return (sh, setsid, env) if sh and setsid and env else None


def _cannot_exec(argv0: str, cwd: Path, env: Mapping[str, str]) -> str | None:
    """Why the service's program cannot be started (as Popen would say), or None."""
    if not cwd.is_dir():
        return f"cannot start {argv0}: No such file or directory"
    program = argv0 if os.sep in argv0 else shutil.which(argv0, path=env.get("PATH", os.defpath))
    if program is None or not os.path.exists(cwd / program):
        return f"cannot start {argv0}: No such file or directory"
    if not os.access(cwd / program, os.X_OK) or os.path.isdir(cwd / program):
        return f"cannot start {argv0}: Permission denied"
    return None


def _record_service(pidfile: Path, pid: int) -> None:
    """Write the pidfile of a just-launched service: its pid and start time. Blocking.

    Nothing is written for a service already gone (the settle check then reports
    its last words); ``-`` stands for a start time procfs cannot tell.
    """
    started = process_start_time(pid)
    if started is not None:
        files.write_atomic(pidfile, f"{pid} {started}\n", mode=0o644)


async def _launch_sh(
    tools: tuple[str, str, str],
    argv: Sequence[str],
    *,
    cwd: Path,
    env: Mapping[str, str],
    log: Path,
    pidfile: Path,
    timeout: float,
) -> RunResult:
    """Launch through ``sh`` + ``setsid`` + ``env -i``, then write the pidfile (result as the launcher's)."""
    sh, setsid, env_tool = tools
    why = _cannot_exec(argv[0], cwd, env)
    if why is not None:
        return RunResult(tuple(argv), 1, "", why)
    os.close(os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640))
    assignments = [f"{key}={value}" for key, value in env.items()]
    result = await run(
        [sh, "-c", _SH_LAUNCHER, "fleet-launch", str(log), setsid, env_tool, "-i", "--", *assignments, *argv],
        timeout=timeout,
        cwd=cwd,
    )
    if result.ok and result.stdout.strip().isdigit():
        await asyncio.to_thread(_record_service, pidfile, int(result.stdout.strip()))
    return result


async def start_service(
    name: str,
    *,
    argv: Sequence[str],
    cwd: Path,
    env: Mapping[str, str],
    state_dir: Path,
    settle_s: float = 0.5,
    timeout: float = 30.0,
) -> int:
    """Start a process service detached and return its pid (its pid if it already runs).

    Its output is appended to ``state_dir/services/<name>.log``, its pid kept in
    ``state_dir/services/<name>.pid``.

    Raises:
        StepError: it cannot be started, or it exits within ``settle_s``.
    """
    running = service_pid(state_dir, name)
    if running is not None:
        return running
    directory = state_dir / SERVICES_DIR
    directory.mkdir(parents=True, exist_ok=True)
    log = service_log(state_dir, name)
    since = _log_size(log)  # what this start writes comes after
    spec = {
        "argv": list(argv),
        "cwd": str(cwd),
        "env": dict(env),
        "log": str(log),
        "pidfile": str(_pidfile(state_dir, name)),
    }
    tools = _launch_tools()
    if tools is not None and "=" not in argv[0]:  # (env would take ``a=b`` for a variable)
        launching = _launch_sh(
            tools, argv, cwd=cwd, env=env, log=log, pidfile=_pidfile(state_dir, name), timeout=timeout
        )
    else:
        launching = run(
            [sys.executable, "-I", "-c", _LAUNCHER], timeout=timeout, stdin=json.dumps(spec).encode()
        )
    launch = asyncio.ensure_future(launching)
    try:
        result = await asyncio.shield(launch)
    except asyncio.CancelledError:
        # An abort during the launch: let the launcher finish (it takes milliseconds),
        # so the service it spawned is in the pidfile and the step's undo can stop it.
        # Killing the launcher instead could leave a detached service nobody knows of.
        with contextlib.suppress(Exception):
            await asyncio.wait_for(launch, timeout)
        raise
    if not result.ok:
        raise StepError(f"cannot start service {name}: {result.tail()}")
    try:
        pid = int(result.stdout.strip())
    except ValueError as exc:
        raise StepError(f"cannot start service {name}: launcher said {result.stdout[:200]!r}") from exc
    deadline = time.monotonic() + settle_s
    while True:
        if service_pid(state_dir, name) != pid:
            with contextlib.suppress(OSError):
                _pidfile(state_dir, name).unlink()
            said = _log_tail(log, since)
            raise StepError(f"service {name} exited within {settle_s:g} s: {said}".rstrip(": "))
        if time.monotonic() >= deadline:
            return pid
        await asyncio.sleep(min(0.1, max(0.0, deadline - time.monotonic())))


def _signal_group(pid: int, sig: signal.Signals) -> None:
    try:
        os.killpg(pid, sig)
    except ProcessLookupError:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)
    except PermissionError as exc:
        raise StepError(f"not allowed to signal pid {pid}: {exc.strerror}") from exc


async def kill_process_group(pid: int, started: str, *, timeout: float = 5.0) -> bool:
    """SIGKILL the process group led by ``pid`` if that process (same start time) still runs.

    Returns:
        True if it was running (and is gone now).
    """
    if not _is_alive(pid, started):
        return False
    with contextlib.suppress(StepError):
        _signal_group(pid, signal.SIGKILL)
    await _wait_gone(pid, started, timeout)
    return True


async def _wait_gone(pid: int, started: str, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while _is_alive(pid, started):
        if time.monotonic() >= deadline:
            return False
        await asyncio.sleep(0.05)
    return True


async def stop_service(name: str, *, state_dir: Path, grace_s: float = 10.0) -> bool:
    """Stop a process service: SIGTERM to its process group, SIGKILL after ``grace_s``.

    Returns:
        True if it was running, False if it was already stopped.

    Raises:
        StepError: it cannot be signalled or survives SIGKILL.
    """
    entry = _read_pidfile(state_dir, name)
    if entry is None or not _is_alive(*entry):
        with contextlib.suppress(OSError):
            _pidfile(state_dir, name).unlink()
        return False
    pid, started = entry
    _signal_group(pid, signal.SIGTERM)
    if not await _wait_gone(pid, started, grace_s):
        _LOGGER.warning("service %s (pid %d) ignored SIGTERM for %g s: SIGKILL", name, pid, grace_s)
        _signal_group(pid, signal.SIGKILL)
        if not await _wait_gone(pid, started, 5.0):
            raise StepError(f"service {name} (pid {pid}) survives SIGKILL")
    with contextlib.suppress(OSError):
        _pidfile(state_dir, name).unlink()
    return True
