"""The real-host lab: Debian 12 hosts booted with systemd as PID 1, each in namespaces of its own.

Layout (tests/README.md, "The real-host lab"):

- ``rootfs()``: a debootstrapped Debian 12 root file system, built ONCE and kept in
  ``$FLEET_LAB_CACHE`` (default ``/var/cache/fleetbus-lab``) under ``ROOTFS_VERSION``;
  every host boots an overlayfs of its own on top of it (the cache is never written).
- ``LabNet``: the test's network namespace (a ``sleep`` process made with ``unshare -n``):
  the broker, the hub, the artifact server, dockerd and the registry run there, and it
  holds the broker's address ``BROKER_IP`` on its loopback. Nothing of the lab touches
  the machine's own network namespace.
- ``Host``: cgroups of its own, then ``unshare -C -p -f -m -u -i -n`` + ``chroot`` +
  ``/lib/systemd/systemd --system``;
  linked to the ``LabNet`` by a veth pair (``10.231.N.0/30``: .1 the lab side, .2 the host,
  default route via .1); driven with ``nsenter``. ``Host.install_agent`` runs the project's
  own ``deploy/setup.sh`` inside the host, from an offline wheelhouse.
- ``Fleet``: ``fleet broker-config`` + mosquitto + hub in the ``LabNet``; ``fleet`` CLI calls.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
CACHE = Path(os.environ.get("FLEET_LAB_CACHE", "/var/cache/fleetbus-lab"))
#: Bump when INCLUDE or _customize changes: a new cache entry is built.
ROOTFS_VERSION = "bookworm-2"
SUITE = "bookworm"
INCLUDE = (
    "systemd", "systemd-sysv", "dbus", "python3", "python3-venv", "iproute2", "ca-certificates",
    # for the broker image of docker-compose (Debian's mosquitto, nc for its health check)
    "mosquitto", "netcat-openbsd",
)  # fmt: skip
#: Units a booted host does not need (no consoles; the broker image's mosquitto).
MASKED = ("getty@.service", "serial-getty@.service", "console-getty.service", "mosquitto.service")
BROKER_IP = "10.231.255.1"
BROKER_PORT = 1883


def _run(
    argv: Sequence[str],
    *,
    check: bool = True,
    timeout: float = 120,
    env: dict[str, str] | None = None,
    input: str | bytes | None = None,
) -> subprocess.CompletedProcess[str]:
    text_input = input.decode() if isinstance(input, bytes) else input
    result = subprocess.run(
        list(argv), capture_output=True, text=True, timeout=timeout, env=env, input=text_input, check=False
    )
    if check and result.returncode != 0:
        raise RuntimeError(
            f"{' '.join(argv)} exited {result.returncode}:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
        )
    return result


def wait_for(what: str, condition: Callable[[], Any], timeout: float = 60, interval: float = 0.2) -> Any:
    """Poll ``condition`` until it returns something true; fail naming ``what`` after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(interval)


# ------------------------------------------------------------------ can the lab run here?


def unavailable() -> str | None:
    """Why the lab cannot run on this machine, or None."""
    if os.geteuid() != 0:
        return "the real-host lab needs root (namespaces, mounts, veth links)"
    for tool in ("unshare", "nsenter", "ip", "chroot", "mount"):
        if shutil.which(tool) is None:
            return f"the real-host lab needs {tool} (util-linux, iproute2)"
    if not (CACHE / ROOTFS_VERSION / "ready").exists() and shutil.which("debootstrap") is None:
        return "the real-host lab needs debootstrap (apt-get install debootstrap) to build its Debian root"
    if "overlay" not in Path("/proc/filesystems").read_text():
        return "the real-host lab needs overlayfs"
    probe = _run(["unshare", "-p", "-f", "-m", "-u", "-i", "-n", "true"], check=False, timeout=30)
    if probe.returncode != 0:
        return f"no PID/mount/UTS/IPC/network namespaces here: {probe.stderr.strip()}"
    return None


def debian_mirror() -> str:
    """The Debian mirror this machine's apt uses (one-line or deb822 sources), else deb.debian.org."""
    files = [Path("/etc/apt/sources.list"), *sorted(Path("/etc/apt/sources.list.d").glob("*"))]
    for path in files:
        with contextlib.suppress(OSError):
            text = path.read_text()
            for match in re.finditer(r"^\s*(?:deb\s+(?:\[[^\]]*\]\s+)?|URIs:\s*)(\S+)", text, re.M):
                uri = match.group(1).rstrip("/")
                if uri.startswith(("http://", "https://")) and not uri.endswith("-security"):
                    return uri
    return "http://deb.debian.org/debian"


# ------------------------------------------------------------------ the cached root file system


def _customize(root: Path) -> None:
    for unit in MASKED:
        link = root / "etc/systemd/system" / unit
        link.unlink(missing_ok=True)
        link.symlink_to("/dev/null")
    # Hosts reach no mirror: apt knows only the repositories a test adds.
    sources = root / "etc/apt/sources.list"
    if sources.exists():
        sources.rename(root / "etc/apt/sources.list.debootstrap")
    (root / "etc/apt/sources.list").write_text("")
    (root / "etc/machine-id").write_text("")


def rootfs(log: Callable[[str], None] = print) -> Path:
    """The cached Debian 12 root (built on first use, under a lock; ``ready`` holds the build time)."""
    entry = CACHE / ROOTFS_VERSION
    ready = entry / "ready"
    if ready.exists():
        return entry / "rootfs"
    CACHE.mkdir(parents=True, exist_ok=True)
    with (CACHE / ".lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if ready.exists():
            return entry / "rootfs"
        building = CACHE / f"{ROOTFS_VERSION}.building"
        shutil.rmtree(building, ignore_errors=True)
        building.mkdir()
        mirror = debian_mirror()
        log(f"lab: debootstrap {SUITE} from {mirror} into {building} (once; cached)")
        started = time.monotonic()
        _run(
            [
                "debootstrap", "--variant=minbase", f"--include={','.join(INCLUDE)}",
                SUITE, str(building / "rootfs"), mirror,
            ],
            timeout=1200,
        )  # fmt: skip
        _customize(building / "rootfs")
        took = time.monotonic() - started
        (building / "ready").write_text(json.dumps({"built_s": round(took, 1), "mirror": mirror}) + "\n")
        shutil.rmtree(entry, ignore_errors=True)
        building.rename(entry)
        log(f"lab: root file system built in {took:.0f} s")
    return entry / "rootfs"


def wheelhouse(out: Path) -> Path:
    """``out`` with the fleetbus wheel of this checkout and every wheel it needs (offline installs).

    The dependency wheels are kept in the cache, keyed by pyproject.toml's dependency list.
    """
    pyproject = (REPO / "pyproject.toml").read_text()
    deps = re.search(r"^dependencies = \[(.*?)^\]", pyproject, re.M | re.S)
    key = hashlib.sha256(((deps.group(1) if deps else pyproject) + sys.version[:4]).encode()).hexdigest()[:12]
    cached = CACHE / f"wheels-{key}"
    out.mkdir(parents=True, exist_ok=True)
    _run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(out), str(REPO)], timeout=300)
    if not (cached / "ready").exists():
        CACHE.mkdir(parents=True, exist_ok=True)
        with (CACHE / ".lock").open("w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if not (cached / "ready").exists():
                building = CACHE / f"wheels-{key}.building"
                shutil.rmtree(building, ignore_errors=True)
                wheel = next(out.glob("fleetbus-*.whl"))
                _run(
                    [sys.executable, "-m", "pip", "wheel", "-q", "-w", str(building), str(wheel)], timeout=900
                )
                # and what a source build needs (the Dockerfile's `pip install .`)
                _run(
                    [
                        sys.executable,
                        "-m",
                        "pip",
                        "download",
                        "-q",
                        "-d",
                        str(building),
                        "setuptools>=77",
                        "wheel",
                    ],
                    timeout=300,
                )
                for own in building.glob("fleetbus-*.whl"):
                    own.unlink()
                (building / "ready").write_text("")
                shutil.rmtree(cached, ignore_errors=True)
                building.rename(cached)
    for wheel in cached.iterdir():
        if wheel.suffix == ".whl":
            shutil.copy2(wheel, out / wheel.name)
    return out


# ------------------------------------------------------------------ the test's network namespace


class LabNet:
    """A network namespace of the lab's own (held by a ``sleep``); ``BROKER_IP`` on its loopback."""

    def __init__(self, logs: Path) -> None:
        self.logs = logs
        logs.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(["unshare", "-n", "sleep", "infinity"])
        own = os.readlink("/proc/self/ns/net")
        wait_for(
            "the lab's network namespace", lambda: self._ns() not in ("", own), timeout=10, interval=0.05
        )
        self.children: list[subprocess.Popen[bytes]] = []
        self.run(["ip", "link", "set", "lo", "up"])
        self.run(["ip", "addr", "add", f"{BROKER_IP}/32", "dev", "lo"])

    def _ns(self) -> str:
        try:
            return os.readlink(f"/proc/{self.proc.pid}/ns/net")
        except OSError:
            return ""

    @property
    def pid(self) -> int:
        return self.proc.pid

    def argv(self, argv: Sequence[str]) -> list[str]:
        return ["nsenter", "-t", str(self.pid), "-n", *argv]

    def run(self, argv: Sequence[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
        """Run a command in the lab's network namespace (same files, same processes)."""
        return _run(self.argv(argv), **kwargs)

    def spawn(
        self, name: str, argv: Sequence[str], env: dict[str, str] | None = None
    ) -> subprocess.Popen[bytes]:
        """Start a long-running process in the namespace; its output goes to ``logs/NAME.log``."""
        with (self.logs / f"{name}.log").open("ab") as log:
            proc = subprocess.Popen(self.argv(argv), stdout=log, stderr=log, env=env, start_new_session=True)
        self.children.append(proc)
        return proc

    def stop(self, proc: subprocess.Popen[bytes], timeout: float = 20) -> None:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)

    def wait_port(self, host: str, port: int, timeout: float = 30) -> None:
        probe = f"import socket; socket.create_connection(({host!r}, {port}), 1).close()"
        wait_for(
            f"{host}:{port} in the lab's namespace",
            lambda: self.run([sys.executable, "-c", probe], check=False).returncode == 0,
            timeout=timeout,
            interval=0.3,
        )

    def close(self) -> None:
        for proc in reversed(self.children):
            self.stop(proc)
        self.proc.kill()
        self.proc.wait(10)


# ------------------------------------------------------------------ hosts


def _cgroup_dirs(leaf: str) -> list[Path]:
    """``leaf`` under this process's cgroup in every mounted hierarchy (v1 controllers, name=systemd, v2).

    Each host gets cgroups of its own, and a cgroup namespace rooted there: without them every
    host's systemd would use the same /system.slice/UNIT.service groups of this machine, and
    one host stopping a unit would kill or break the same-named unit of another (seen as
    "status=219/CGROUP" and "Failed to kill control group ...: Input/output error").
    """
    root = Path("/sys/fs/cgroup")
    dirs: list[Path] = []
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        if controllers == "":
            mount = root / "unified" if (root / "unified").is_dir() else root
        elif controllers.startswith("name="):
            mount = root / controllers.removeprefix("name=")
        else:
            mount = root / controllers
        if (mount / "cgroup.procs").exists():
            dirs.append(mount / path.lstrip("/") / leaf)
    return dirs


def _make_cgroups(dirs: list[Path]) -> None:
    for directory in dirs:
        directory.mkdir(exist_ok=True)
        for knob in ("cpuset.cpus", "cpuset.mems"):  # v1 cpuset: empty until copied from the parent
            if (directory / knob).exists() and not (directory / knob).read_text().strip():
                (directory / knob).write_text((directory.parent / knob).read_text())


def _remove_cgroups(dirs: list[Path]) -> None:
    for directory in dirs:
        if directory.is_dir():
            for sub in sorted((d for d in directory.rglob("*") if d.is_dir()), key=lambda d: -len(d.parts)):
                with contextlib.suppress(OSError):
                    sub.rmdir()
            with contextlib.suppress(OSError):
                directory.rmdir()


class Host:
    """A Debian 12 host with systemd as PID 1, in its own PID/mount/UTS/IPC/network namespaces."""

    def __init__(self, net: LabNet, name: str, index: int, base: Path, lower: Path) -> None:
        self.net = net
        self.name = name
        self.index = index
        self.base = base
        self.lower = lower
        self.veth = f"vh{index}"
        self.ip = f"10.231.{index}.2"
        self.gateway = f"10.231.{index}.1"
        self.proc: subprocess.Popen[bytes] | None = None
        self.pid = 0
        self.cgroups: list[Path] = []

    # --------------------------------------------------------------- life

    def start(self, stage: Callable[[Path], None] | None = None, boot_timeout: float = 90) -> None:
        """Boot the host; ``stage(upper)`` may put files into its overlay's upper dir first."""
        upper, work, merged = self.base / "upper", self.base / "work", self.base / "merged"
        for directory in (upper / "etc", work, merged):
            directory.mkdir(parents=True, exist_ok=True)
        (upper / "etc/hostname").write_text(self.name + "\n")
        # debootstrap writes no /etc/hosts and copies this machine's resolv.conf, whose server the
        # host cannot reach: every reverse lookup (Python's HTTPServer does one before it listens)
        # would wait 10 s for DNS. A host of its own: localhost, its name, the broker; no DNS.
        (upper / "etc/hosts").write_text(
            f"127.0.0.1\tlocalhost\n127.0.1.1\t{self.name}\n::1\tlocalhost ip6-localhost\n"
            f"{BROKER_IP}\tbroker\n"
        )
        (upper / "etc/resolv.conf").write_text("")
        if stage is not None:
            stage(upper)
        script = (
            f"mount -t overlay overlay -o lowerdir={self.lower},upperdir={upper},workdir={work} {merged}"
            f" && mount -t proc proc {merged}/proc && hostname {self.name}"
            f" && exec chroot {merged} /lib/systemd/systemd --system"
        )
        self.cgroups = _cgroup_dirs(f"fleetbus-lab-{os.getpid()}-{self.name}")
        _make_cgroups(self.cgroups)
        enter = "".join(f'echo $$ > "{d}/cgroup.procs" && ' for d in self.cgroups)
        with (self.base / "console.log").open("ab") as console:
            self.proc = subprocess.Popen(
                ["sh", "-c", f'{enter}exec unshare -C -p -f -m -u -i -n sh -c "$0"', script],
                stdout=console,
                stderr=console,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                env={
                    "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                    "LANG": "C.UTF-8",
                },
            )
        self.pid = int(wait_for(f"PID 1 of {self.name}", self._child, timeout=10, interval=0.02))
        wait_for(
            f"systemd as PID 1 of {self.name}",
            lambda: (
                Path(f"/proc/{self.pid}/root/run/systemd/private").exists()
                if os.readlink(f"/proc/{self.pid}/exe").endswith("systemd")
                else False
            ),
            timeout=30,
        )
        self._link()
        state = wait_for(
            f"{self.name} to finish booting",
            lambda: (
                self.run(["systemctl", "is-system-running"], check=False).stdout.strip()
                not in ("", "initializing", "starting")
                and self.run(["systemctl", "is-system-running"], check=False).stdout.strip()
            ),
            timeout=boot_timeout,
            interval=0.3,
        )
        if state != "running":
            failed = self.run(["systemctl", "--failed", "--no-legend", "--plain"], check=False).stdout
            raise RuntimeError(f"{self.name} booted {state}: {failed}")

    def _child(self) -> int | None:
        assert self.proc is not None
        try:
            children = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children").read_text().split()
        except OSError:
            return None
        return int(children[0]) if children else None

    def _link(self) -> None:
        self.net.run(
            ["ip", "link", "add", self.veth, "type", "veth", "peer", "name", "eth0", "netns", str(self.pid)]
        )
        self.net.run(["ip", "addr", "add", f"{self.gateway}/30", "dev", self.veth])
        self.net.run(["ip", "link", "set", self.veth, "up"])
        inside = ["nsenter", "-t", str(self.pid), "-n"]
        _run([*inside, "ip", "addr", "add", f"{self.ip}/30", "dev", "eth0"])
        _run([*inside, "ip", "link", "set", "eth0", "up"])
        _run([*inside, "ip", "route", "add", "default", "via", self.gateway])

    def stop(self) -> None:
        """SIGKILL to the host's PID 1 ends its namespaces (systemd ignores SIGTERM)."""
        if self.pid:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)
        if self.proc is not None:
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        self.pid = 0
        _remove_cgroups(self.cgroups)

    # --------------------------------------------------------------- commands

    def argv(self, argv: Sequence[str]) -> list[str]:
        return ["nsenter", "-t", str(self.pid), "-p", "-m", "-u", "-i", "-n", "-C", "-r", "-w", *argv]

    def run(self, argv: Sequence[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
        """Run a command inside the host (its root, namespaces and PATH)."""
        env = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8"}
        env.update(kwargs.pop("env", None) or {})
        return _run(self.argv(argv), env=env, **kwargs)

    def sh(self, script: str, **kwargs: Any) -> subprocess.CompletedProcess[str]:
        return self.run(["sh", "-c", script], **kwargs)

    def put(self, path: str, content: str | bytes, mode: str = "0644") -> None:
        """Write a file inside the host (through its mount namespace, so its overlay sees it)."""
        data = content if isinstance(content, bytes) else content.encode()
        with subprocess.Popen(
            self.argv(
                ["sh", "-c", f'mkdir -p "$(dirname "$1")" && cat > "$1" && chmod {mode} "$1"', "put", path]
            ),
            stdin=subprocess.PIPE,
        ) as proc:
            proc.communicate(data, timeout=60)
        if proc.returncode != 0:
            raise RuntimeError(f"writing {path} into {self.name} failed")

    def systemctl(self, *args: str, check: bool = True) -> str:
        return self.run(["systemctl", *args], check=check).stdout.strip()

    def unit_prop(self, unit: str, prop: str) -> str:
        return self.systemctl("show", "-P", prop, unit)

    def journal(self, unit: str) -> str:
        return self.run(["journalctl", "-u", unit, "--no-pager", "-o", "cat"], check=False).stdout

    def http(self, port: int, path: str = "/") -> str:
        """GET http://127.0.0.1:PORT/PATH inside the host ('' when nothing answers)."""
        code = (
            "import sys, urllib.request as u\n"
            f"try: sys.stdout.write(u.urlopen('http://127.0.0.1:{port}{path}', timeout=3).read().decode())\n"
            "except Exception: pass\n"
        )
        return self.run(["python3", "-c", code], check=False).stdout

    # --------------------------------------------------------------- the network

    def link(self, up: bool) -> None:
        """Take the host's link down (a half-open partition: no FIN reaches anyone) or up again."""
        self.net.run(["ip", "link", "set", self.veth, "up" if up else "down"])

    def degrade(self, loss: float, delay_ms: int, rate: str = "512kbit") -> str:
        """A lossy, slow link: ``tc netem`` where the kernel has it, else what it has.

        Without sch_netem (this machine kind's kernel: no modules), random loss comes from
        iptables' ``statistic`` match and the slowness from a ``tbf`` rate limit, both on the
        lab's end of the link. Returns what was used.
        """
        tried = self.net.run(
            ["tc", "qdisc", "replace", "dev", self.veth, "root", "netem",
             "delay", f"{delay_ms}ms", "loss", f"{loss * 100:g}%"],
            check=False,
        )  # fmt: skip
        if tried.returncode == 0:
            return "netem"
        for chain, flag in (("INPUT", "-i"), ("OUTPUT", "-o")):
            self.net.run(["iptables", "-A", chain, flag, self.veth, "-m", "statistic", "--mode", "random",
                          "--probability", f"{loss:g}", "-j", "DROP"])  # fmt: skip
        self.net.run(["tc", "qdisc", "replace", "dev", self.veth, "root", "tbf", "rate", rate,
                      "burst", "8kbit", "latency", f"{max(delay_ms, 50)}ms"])  # fmt: skip
        return f"iptables statistic drop + tbf ({tried.stderr.strip()})"

    def restore_link(self) -> None:
        """Undo ``degrade``."""
        self.net.run(["tc", "qdisc", "del", "dev", self.veth, "root"], check=False)
        for chain in ("INPUT", "OUTPUT"):
            while self.net.run(["iptables", "-S", chain], check=False).stdout.count(self.veth):
                rule = next(
                    r for r in self.net.run(["iptables", "-S", chain]).stdout.splitlines() if self.veth in r
                )
                self.net.run(["iptables", "-D", *rule.split()[1:]])

    # --------------------------------------------------------------- the agent

    def install_agent(
        self,
        credentials: Path,
        trust: Path,
        *,
        policy: str | None = None,
        scripts: dict[str, str] | None = None,
        labels: Iterable[str] = (),
        agent_settings: str = "",
    ) -> subprocess.CompletedProcess[str]:
        """deploy/setup.sh inside the host: the venv from the wheelhouse, /etc/fleet, fleet-agent.service.

        The wheelhouse is ``/srv/wheels`` (staged by the fixture); ``agent_settings`` lines are
        added to the [agent] table before the unit starts (e.g. shorter heartbeats for tests).
        """
        self.put("/srv/setup/credentials.url", credentials.read_text(), "0600")
        self.put("/srv/setup/hub.pub", trust.read_text())
        args = ["--node-id", self.name, "--credentials", "/srv/setup/credentials.url"]
        args += ["--trust", "/srv/setup/hub.pub", "--no-start"]
        if policy is not None:
            self.put("/srv/setup/policy.toml", policy)
            args += ["--policy", "/srv/setup/policy.toml"]
        if scripts:
            for name, text in scripts.items():
                self.put(f"/srv/setup/scripts/{name}", text, "0755")
            args += ["--scripts", "/srv/setup/scripts"]
        for label in labels:
            args += ["--label", label]
        wheel = self.run(["sh", "-c", "ls /srv/wheels/fleetbus-*.whl"]).stdout.strip()
        result = self.run(
            ["bash", "/srv/deploy/setup.sh", *args, "--package", wheel],
            env={"PIP_NO_INDEX": "1", "PIP_FIND_LINKS": "/srv/wheels"},
            timeout=600,
        )
        if agent_settings:
            self.sh(f"cat >> /etc/fleet/agent.toml <<'EOF'\n{agent_settings}\nEOF")
        self.systemctl("daemon-reload")
        self.systemctl("enable", "--now", "fleet-agent.service")
        return result


def stage_host_files(upper: Path, wheels: Path) -> None:
    """The wheelhouse and the deploy directory of this checkout, at /srv/wheels and /srv/deploy."""
    shutil.copytree(wheels, upper / "srv/wheels", dirs_exist_ok=True)
    shutil.copytree(REPO / "deploy", upper / "srv/deploy", dirs_exist_ok=True)


# ------------------------------------------------------------------ broker, hub, CLI


class Fleet:
    """mosquitto (generated config) and the hub in the lab's namespace; the ``fleet`` CLI there."""

    def __init__(self, net: LabNet, root: Path, nodes: Sequence[str]) -> None:
        from broker_config.generate import write_broker_config
        from bus.signing import generate_keypair

        self.net = net
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        generated = write_broker_config(
            root / "broker", nodes, host=BROKER_IP, port=BROKER_PORT, bind="0.0.0.0", broker_user="root"
        )
        self.urls = {client: generated.url(client) for client in generated.credentials}
        self.key, self.pub = generate_keypair(root / "keys")
        self.mosquitto = net.spawn("mosquitto", [shutil.which("mosquitto") or "/usr/sbin/mosquitto",
                                                  "-c", str(root / "broker" / "mosquitto.conf")])  # fmt: skip
        net.wait_port(BROKER_IP, BROKER_PORT)
        self.hub = net.spawn(
            "hub",
            [
                sys.executable,
                "-m",
                "cli.main",
                "hub",
                "--db",
                str(root / "hub.json"),
                "--signing-key",
                str(self.key),
            ],
            env=self.env("hub"),
        )

    def env(self, client: str = "tui") -> dict[str, str]:
        base = {k: v for k, v in os.environ.items() if not k.startswith("FLEET_")}
        return {
            **base,
            "PYTHONPATH": str(REPO),
            "FLEET_NO_CONFIG_DISCOVERY": "1",
            "FLEET_BROKER": self.urls[client],
            "FLEET_LOG_LEVEL": "INFO",
        }

    def credentials(self, node: str) -> Path:
        return self.root / "broker" / "credentials" / f"{node}.url"

    def fleet(self, *args: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
        """``fleet ARGS`` in the lab's namespace, as the TUI/tools client."""
        return self.net.run(
            [sys.executable, "-m", "cli.main", *args], check=False, timeout=timeout, env=self.env()
        )

    def nodes(self) -> dict[str, dict[str, Any]]:
        result = self.fleet("nodes", "--json")
        if result.returncode != 0:
            return {}
        return {node["node"]: node for node in json.loads(result.stdout)}

    def wait_online(self, names: Iterable[str], online: bool = True, timeout: float = 120) -> None:
        wanted = set(names)
        wait_for(
            f"nodes {sorted(wanted)} {'online' if online else 'offline'} at the hub",
            lambda: all(self.nodes().get(n, {}).get("online", False) == online for n in wanted),
            timeout=timeout,
            interval=0.5,
        )

    def rollout(self, spec: dict[str, Any], *, wait: bool = True) -> tuple[str, dict[str, Any]]:
        """Create a rollout (``--wait``); its id and ``rollout show --json``."""
        path = self.root / f"rollout-{time.monotonic_ns()}.json"
        path.write_text(json.dumps(spec))
        result = self.fleet("rollout", "create", str(path), *(["--wait"] if wait else []), timeout=600)
        rollout = result.stdout.strip().splitlines()[-1] if result.stdout.strip() else ""
        if not re.fullmatch(r"[0-9a-f-]{36}", rollout):
            raise RuntimeError(f"rollout create failed ({result.returncode}): {result.stdout}{result.stderr}")
        return rollout, self.show(rollout)

    def show(self, rollout: str) -> dict[str, Any]:
        result = self.fleet("rollout", "show", rollout, "--json")
        shown: dict[str, Any] = json.loads(result.stdout)
        return shown

    def wait_state(self, rollout: str, states: Iterable[str], timeout: float = 300) -> dict[str, Any]:
        wanted = set(states)
        shown: dict[str, Any] = wait_for(
            f"rollout {rollout} in {sorted(wanted)}",
            lambda: (lambda s: s if s.get("state") in wanted else None)(self.show(rollout)),
            timeout=timeout,
            interval=0.5,
        )
        return shown

    def close(self) -> None:
        self.net.stop(self.hub)
        self.net.stop(self.mosquitto)


class Artifacts:
    """Files the hosts download: ``python3 -m http.server`` on BROKER_IP in the lab's namespace."""

    def __init__(self, net: LabNet, directory: Path, port: int = 8088) -> None:
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        self.port = port
        self.proc = net.spawn(
            "artifacts",
            [
                sys.executable,
                "-m",
                "http.server",
                "--bind",
                BROKER_IP,
                str(port),
                "--directory",
                str(directory),
            ],
        )
        net.wait_port(BROKER_IP, port)

    def add(self, name: str, content: str | bytes) -> dict[str, str]:
        """Serve ``name``; the download step's fields for it."""
        data = content if isinstance(content, bytes) else content.encode()
        (self.directory / name).write_bytes(data)
        return {
            "type": "download",
            "url": f"http://{BROKER_IP}:{self.port}/{name}",
            "sha256": hashlib.sha256(data).hexdigest(),
            "name": name,
        }
