"""Faithful fakes of systemctl, docker, yum, rpm, modprobe and modinfo (see tests/fakes/README.md).

Each executable next to this file calls ``main(<tool>)``. State lives in the
directory named by ``FLEET_FAKE_STATE`` (JSON files and a /proc, /sys look-alike);
every call is appended to ``calls.log`` (one JSON list per line). Arguments are
checked like the real tools do, and failures print the real tools' messages
with their exit codes.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

RELEASE = "6.1.0-fake-amd64"


class Exit(Exception):
    """Leave the fake with this status after printing ``err`` on stderr."""

    def __init__(self, code: int, err: str = "") -> None:
        super().__init__(err)
        self.code = code
        self.err = err


def state_dir() -> Path:
    value = os.environ.get("FLEET_FAKE_STATE")
    if not value:
        sys.stderr.write("fake: FLEET_FAKE_STATE is not set\n")
        raise SystemExit(70)
    path = Path(value)
    path.mkdir(parents=True, exist_ok=True)
    return path


@contextlib.contextmanager
def locked() -> Iterator[Path]:
    """The state dir, locked against concurrent fakes."""
    base = state_dir()
    with open(base / ".lock", "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield base


def load(name: str) -> dict[str, Any]:
    path = state_dir() / name
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    return data if isinstance(data, dict) else {}


def save(name: str, data: dict[str, Any]) -> None:
    path = state_dir() / name
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
    os.replace(tmp, path)


def out(text: str) -> None:
    sys.stdout.write(text if text.endswith("\n") or not text else text + "\n")


def main(tool: str) -> None:
    argv = sys.argv[1:]
    with locked() as base, open(base / "calls.log", "a") as log:
        log.write(json.dumps([tool, *argv]) + "\n")
        try:
            TOOLS[tool](argv)
        except Exit as stop:
            if stop.err:
                sys.stderr.write(stop.err if stop.err.endswith("\n") else stop.err + "\n")
            sys.stdout.flush()
            raise SystemExit(stop.code) from None


# --------------------------------------------------------------------- systemctl
# systemd.json: {"units": {"app.service": {"state": "active", "fail_start": false}}}
# A unit with "start_limit_burst": N (and "start_limit_interval_s", default 10) refuses the
# N+1th start within the interval like systemd (StartLimitBurst/StartLimitIntervalSec) until
# `reset-failed`.

_UNIT_SUFFIXES = (
    ".service",
    ".socket",
    ".timer",
    ".target",
    ".mount",
    ".path",
    ".slice",
    ".scope",
    ".device",
)
_UNIT_NAME = re.compile(r"^[A-Za-z0-9:_.\\@-]+$")


def _unit(name: str) -> str:
    if not _UNIT_NAME.match(name) or name.startswith("-"):
        raise Exit(1, f'Failed to mangle unit name: Invalid argument ("{name}")')
    return name if name.endswith(_UNIT_SUFFIXES) else f"{name}.service"


def systemctl(argv: list[str]) -> None:
    quiet = False
    words: list[str] = []
    for arg in argv:
        if arg in ("-q", "--quiet"):
            quiet = True
        elif arg in ("--no-pager", "--no-block", "--no-ask-password", "--system"):
            continue
        elif arg.startswith("-"):
            raise Exit(1, f"systemctl: unrecognized option '{arg}'")
        else:
            words.append(arg)
    data = load("systemd.json")
    units: dict[str, dict[str, Any]] = data.setdefault("units", {})
    if not words:
        for name, spec in sorted(units.items()):
            out(f"{name} loaded {spec.get('state', 'inactive')}")
        return
    verb, names = words[0], words[1:]
    if verb == "daemon-reload":
        return
    if verb not in ("start", "stop", "restart", "is-active", "status", "reset-failed"):
        raise Exit(1, f"Unknown command verb {verb}.")
    if not names:
        raise Exit(1, "Too few arguments.")
    resolved = [_unit(n) for n in names]
    if verb == "reset-failed":
        for unit in resolved:
            if unit not in units:
                raise Exit(1, f"Failed to reset failed state of unit {unit}: Unit {unit} not loaded.")
            spec = units[unit]
            spec["start_times"] = []
            if spec.get("state") == "failed":
                spec["state"] = "inactive"
        save("systemd.json", data)
        return
    if verb == "is-active":
        states = [str(units.get(u, {}).get("state", "inactive")) for u in resolved]
        if not quiet:
            for state in states:
                out(state)
        raise Exit(0 if "active" in states else 3)
    if verb == "status":
        for unit in resolved:
            if unit not in units:
                raise Exit(4, f"Unit {unit} could not be found.")
            out(f"* {unit}\n     Active: {units[unit].get('state', 'inactive')}")
        raise Exit(0 if all(units[u].get("state") == "active" for u in resolved) else 3)
    for unit in resolved:
        if unit not in units:
            missing = "not loaded" if verb == "stop" else "not found"
            raise Exit(5, f"Failed to {verb} {unit}: Unit {unit} {missing}.")
        spec = units[unit]
        burst = spec.get("start_limit_burst")
        if verb != "stop" and burst is not None:
            now = time.time()
            interval = float(spec.get("start_limit_interval_s", 10))
            recent = [t for t in spec.get("start_times", []) if now - t < interval]
            if len(recent) >= int(burst):
                spec["state"] = "failed"
                spec["start_times"] = recent
                save("systemd.json", data)
                raise Exit(
                    1,
                    f"Job for {unit} failed because start of the service was attempted too often.\n"
                    f'See "systemctl status {unit}" and "journalctl -xeu {unit}" for details.\n'
                    f'To force a start use "systemctl reset-failed {unit}"\n'
                    f'followed by "systemctl start {unit}" again.',
                )
            spec["start_times"] = [*recent, now]
        if verb == "stop":
            spec["state"] = "inactive"
        elif spec.get("fail_start"):
            spec["state"] = "failed"
            save("systemd.json", data)
            raise Exit(
                1,
                f"Job for {unit} failed because the control process exited with error code.\n"
                f'See "systemctl status {unit}" and "journalctl -xeu {unit}" for details.',
            )
        else:
            spec["state"] = "active"
            spec["starts"] = int(spec.get("starts", 0)) + 1
    save("systemd.json", data)


# ------------------------------------------------------------------------ docker
# docker.json: {"registry": {"app:1": {"env": [...], "cmd": [...], "exit_code": null}},
#               "images": {id: {...}}, "containers": {name: {...}}}


def _normalize(ref: str) -> str:
    last = ref.rsplit("/", 1)[-1]
    return ref if ":" in last or "@" in ref else f"{ref}:latest"


def _image_id(ref: str, spec: dict[str, Any]) -> str:
    digest = hashlib.sha256(json.dumps([_normalize(ref), spec], sort_keys=True).encode()).hexdigest()
    return f"sha256:{digest}"


def _find_image(data: dict[str, Any], ref: str) -> dict[str, Any] | None:
    images: dict[str, dict[str, Any]] = data.setdefault("images", {})
    if ref in images:
        return images[ref]
    for image_id, image in images.items():
        if _normalize(ref) in image["RepoTags"]:
            return image
        bare = image_id.removeprefix("sha256:")
        if len(ref.removeprefix("sha256:")) >= 12 and bare.startswith(ref.removeprefix("sha256:")):
            return image
    return None


def _pull(data: dict[str, Any], ref: str, prefix: str = "") -> dict[str, Any]:
    registry: dict[str, dict[str, Any]] = data.setdefault("registry", {})
    tag = _normalize(ref)
    spec = registry.get(tag) or registry.get(ref)
    if spec is None:
        repo = tag.rsplit(":", 1)[0]
        if any(_normalize(k).rsplit(":", 1)[0] == repo for k in registry):
            raise Exit(
                1, f"{prefix}Error response from daemon: manifest for {tag} not found: manifest unknown"
            )
        raise Exit(
            1,
            f"{prefix}Error response from daemon: pull access denied for {repo}, repository does not exist "
            "or may require 'docker login': denied: requested access to the resource is denied",
        )
    image_id = _image_id(tag, spec)
    images: dict[str, dict[str, Any]] = data.setdefault("images", {})
    for other in images.values():  # the tag moves to the new image
        if tag in other["RepoTags"] and other["Id"] != image_id:
            other["RepoTags"].remove(tag)
    image = images.setdefault(
        image_id,
        {
            "Id": image_id,
            "RepoTags": [],
            "Config": {
                "Env": list(spec.get("env") or ["PATH=/usr/bin:/bin"]),
                "Cmd": list(spec.get("cmd") or []),
            },
            "ExitCode": spec.get("exit_code"),
        },
    )
    if tag not in image["RepoTags"]:
        image["RepoTags"].append(tag)
    return image


def _find_container(data: dict[str, Any], name: str) -> dict[str, Any] | None:
    containers: dict[str, dict[str, Any]] = data.setdefault("containers", {})
    if name in containers:
        return containers[name]
    for container in containers.values():
        if len(name) >= 12 and container["Id"].startswith(name):
            return container
    return None


_RUN_VALUE_FLAGS = {
    "--name": "name",
    "-e": "env",
    "--env": "env",
    "-p": "ports",
    "--publish": "ports",
    "-v": "volumes",
    "--volume": "volumes",
    "--restart": "restart",
    "--network": "network",
    "--net": "network",
}
_PORT = re.compile(r"^(?:(?P<ip>[0-9.]+):)?(?:(?P<host>\d*):)?(?P<port>\d+)(?:/(?P<proto>tcp|udp|sctp))?$")
_RESTART = re.compile(r"^(no|always|unless-stopped|on-failure(:\d+)?)$")


def _parse_run(verb: str, argv: list[str]) -> tuple[dict[str, Any], str, list[str]]:
    opts: dict[str, Any] = {"env": [], "ports": [], "volumes": [], "detach": False}
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg in ("-d", "--detach"):
            opts["detach"] = True
        elif arg.split("=", 1)[0] in _RUN_VALUE_FLAGS:
            flag, eq, value = arg.partition("=")
            if not eq:
                i += 1
                if i >= len(argv):
                    raise Exit(
                        125,
                        f"flag needs an argument: '{flag.lstrip('-')}' in {flag}\n"
                        f"See 'docker {verb} --help'.",
                    )
                value = argv[i]
            key = _RUN_VALUE_FLAGS[flag]
            if isinstance(opts.get(key), list):
                opts[key].append(value)
            else:
                opts[key] = value
        elif arg.startswith("-"):
            raise Exit(125, f"unknown flag: {arg.split('=', 1)[0]}\nSee 'docker {verb} --help'.")
        else:
            return opts, arg, argv[i + 1 :]
        i += 1
    raise Exit(1, f"docker: 'docker {verb}' requires at least 1 argument.\n\nSee 'docker {verb} --help'.")


def _port_bindings(ports: list[str]) -> dict[str, list[dict[str, str]]]:
    bindings: dict[str, list[dict[str, str]]] = {}
    for value in ports:
        match = _PORT.match(value)
        if not match:
            raise Exit(
                125, f"docker: invalid containerPort: {value.rsplit(':', 1)[-1]}.\nSee 'docker run --help'."
            )
        key = f"{match['port']}/{match['proto'] or 'tcp'}"
        bindings.setdefault(key, []).append({"HostIp": match["ip"] or "", "HostPort": match["host"] or ""})
    return bindings


def _host_ports(container: dict[str, Any]) -> set[str]:
    found = set()
    for hosts in (container["HostConfig"]["PortBindings"] or {}).values():
        for host in hosts:
            if host["HostPort"]:
                found.add(host["HostPort"])
    return found


def _start(data: dict[str, Any], container: dict[str, Any], prefix: str = "") -> None:
    ports = _host_ports(container)
    for other in data["containers"].values():
        if other is not container and other["State"]["Running"] and ports & _host_ports(other):
            port = sorted(ports & _host_ports(other))[0]
            raise Exit(
                125 if prefix else 1,
                f"{prefix}Error response from daemon: driver failed programming external connectivity "
                "on endpoint "
                f"{container['Name'].lstrip('/')} ({container['Id']}): Bind for 0.0.0.0:{port} failed: "
                "port is already allocated",
            )
    image = data["images"].get(container["Image"], {})
    code = image.get("ExitCode")
    if code is None:
        container["State"] = {"Status": "running", "Running": True, "ExitCode": 0, "Error": ""}
    else:
        container["State"] = {"Status": "exited", "Running": False, "ExitCode": int(code), "Error": ""}
    container["Starts"] = int(container.get("Starts", 0)) + 1


def _create(data: dict[str, Any], verb: str, argv: list[str], start: bool) -> None:
    opts, ref, cmd = _parse_run(verb, argv)
    if verb == "run" and not opts["detach"]:
        raise Exit(125, "fake docker: only detached runs (-d) are supported")
    if "restart" in opts and not _RESTART.match(opts["restart"]):
        raise Exit(
            125, f"docker: invalid restart policy format: {opts['restart']}\nSee 'docker {verb} --help'."
        )
    bindings = _port_bindings(opts["ports"])
    for volume in opts["volumes"]:
        if ":" not in volume or not volume.split(":")[1].startswith("/"):
            raise Exit(125, f"docker: Error response from daemon: invalid volume specification: '{volume}'")
    name = opts.get("name") or f"fake_{len(data.setdefault('containers', {}))}"
    containers: dict[str, dict[str, Any]] = data.setdefault("containers", {})
    if name in containers:
        raise Exit(
            125,
            f'docker: Error response from daemon: Conflict. The container name "/{name}" is already in use '
            f'by container "{containers[name]["Id"]}". You have to remove (or rename) that container to be '
            "able to "
            f"reuse that name.\n\nRun 'docker {verb} --help' for more information",
        )
    image = _find_image(data, ref)
    if image is None:
        sys.stderr.write(f"Unable to find image '{_normalize(ref)}' locally\n")
        image = _pull(data, ref, prefix="docker: ")
    env: dict[str, str] = {}
    for item in [*image["Config"]["Env"], *opts["env"]]:
        key, _, value = item.partition("=")
        env[key] = value
    policy, _, count = str(opts.get("restart", "no")).partition(":")
    seq = int(data.get("seq", 0)) + 1
    data["seq"] = seq
    container_id = hashlib.sha256(f"{name}-{seq}".encode()).hexdigest()
    container = {
        "Id": container_id,
        "Name": f"/{name}",
        "Image": image["Id"],
        "State": {"Status": "created", "Running": False, "ExitCode": 0, "Error": ""},
        "Config": {
            "Image": ref,
            "Env": [f"{k}={v}" for k, v in env.items()],
            "Cmd": cmd or list(image["Config"]["Cmd"]),
        },
        "HostConfig": {
            "Binds": list(opts["volumes"]) or None,
            "PortBindings": bindings,
            "RestartPolicy": {"Name": policy, "MaximumRetryCount": int(count or 0)},
            "NetworkMode": opts.get("network", "bridge"),
        },
    }
    containers[name] = container
    if start:
        _start(data, container, prefix="docker: ")  # failing, it stays "created" (saved), like docker
    out(container_id)


def _template(fmt: str, obj: Any) -> str:
    def render(match: re.Match[str]) -> str:
        expr = match.group(1).strip()
        as_json = expr.startswith("json ")
        path = expr.removeprefix("json ").strip()
        if not path.startswith("."):
            raise Exit(1, f'template parsing error: template: :1: function "{path.split()[0]}" not defined')
        value: Any = obj
        for part in [p for p in path.split(".") if p]:
            if not isinstance(value, dict) or part not in value:
                raise Exit(
                    1,
                    f'template: :1:{match.start() + 2}: executing "" at <{path}>: '
                    f'map has no entry for key "{part}"',
                )
            value = value[part]
        if as_json:
            return json.dumps(value)
        if isinstance(value, bool):
            return "true" if value else "false"
        if value is None:
            return "<no value>"
        if isinstance(value, list):
            return "[" + " ".join(str(v) for v in value) + "]"
        return str(value)

    return re.sub(r"\{\{(.*?)\}\}", render, fmt)


def _inspect(data: dict[str, Any], kind: str | None, argv: list[str]) -> None:
    fmt = None
    names: list[str] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg in ("-f", "--format"):
            i += 1
            fmt = argv[i] if i < len(argv) else None
        elif arg.startswith("--format="):
            fmt = arg.split("=", 1)[1]
        elif arg.startswith("-"):
            raise Exit(125, f"unknown flag: {arg}\nSee 'docker inspect --help'.")
        else:
            names.append(arg)
        i += 1
    if not names:
        raise Exit(1, "docker: 'docker inspect' requires at least 1 argument.")
    found: list[Any] = []
    errors: list[str] = []
    for name in names:
        obj = None
        if kind in (None, "container"):
            obj = _find_container(data, name)
        if obj is None and kind in (None, "image"):
            image = _find_image(data, name)
            obj = {k: v for k, v in image.items() if k != "ExitCode"} if image else None
        if obj is None:
            errors.append(f"Error: No such {kind or 'object'}: {name}")
        else:
            found.append(obj)
    if fmt is None:
        out(json.dumps(found, indent=4))
    else:
        for obj in found:
            out(_template(fmt, obj))
    if errors:
        raise Exit(1, "\n".join(errors))


def docker(argv: list[str]) -> None:
    if not argv:
        raise Exit(0, "Usage:  docker [OPTIONS] COMMAND")
    verb, rest = argv[0], argv[1:]
    if verb == "container" and rest and rest[0] != "inspect":
        docker(rest)  # "docker container stop X" is "docker stop X"
        return
    data = load("docker.json")
    data.setdefault("containers", {})
    data.setdefault("images", {})
    try:
        if verb in ("container", "image") and rest and rest[0] == "inspect":
            _inspect(data, verb, rest[1:])
        elif verb == "inspect":
            _inspect(data, None, rest)
        elif verb == "pull":
            if len(rest) != 1:
                raise Exit(
                    1, "docker: 'docker pull' requires 1 argument.\n\nUsage:  docker pull [OPTIONS] NAME"
                )
            tag = _normalize(rest[0])
            before = _find_image(data, tag)
            image = _pull(data, rest[0])
            repo, _, version = tag.rpartition(":")
            out(f"{version}: Pulling from {repo}")
            out(f"Digest: {image['Id']}")
            fresh = before is None or before["Id"] != image["Id"]
            out(f"Status: {'Downloaded newer image' if fresh else 'Image is up to date'} for {tag}")
            out(tag)
        elif verb in ("run", "create"):
            _create(data, verb, rest, start=verb == "run")
        elif verb in ("start", "stop", "restart", "rm"):
            _lifecycle(data, verb, rest)
        else:
            raise Exit(1, f"docker: '{verb}' is not a docker command.\nSee 'docker --help'")
    finally:
        save("docker.json", data)


def _lifecycle(data: dict[str, Any], verb: str, argv: list[str]) -> None:
    force = False
    names: list[str] = []
    for arg in argv:
        if verb == "rm" and arg in ("-f", "--force"):
            force = True
        elif arg.startswith("-t") or arg.startswith("--time"):
            continue
        elif arg.startswith("-"):
            raise Exit(125, f"unknown flag: {arg}\nSee 'docker {verb} --help'.")
        else:
            names.append(arg)
    if not names:
        raise Exit(1, f"docker: 'docker {verb}' requires at least 1 argument.")
    for name in names:
        container = _find_container(data, name)
        if container is None:
            tail = f"\nError: failed to start containers: {name}" if verb == "start" else ""
            raise Exit(1, f"Error response from daemon: No such container: {name}{tail}")
        if verb == "rm":
            if container["State"]["Running"] and not force:
                raise Exit(
                    1,
                    f'Error response from daemon: cannot remove container "{container["Name"]}": '
                    "container is "
                    "running: stop the container before removing or force remove",
                )
            del data["containers"][container["Name"].lstrip("/")]
        elif verb == "stop":
            if container["State"]["Running"]:
                container["State"] = {"Status": "exited", "Running": False, "ExitCode": 0, "Error": ""}
        elif verb == "start":
            if not container["State"]["Running"]:
                _start(data, container)
        else:
            _start(data, container)
        out(name)


# ---------------------------------------------------------------- rpm and yum (dnf: the real one)
# rpm.json: {"repo": {"name": ["1.0-1", "2.0-1"]}, "installed": {"name": "1.0-1"},
#            "files": {"name": ["/usr/lib/..."]}}
# A local "package file" is JSON: {"name": ..., "version": ..., "release": ...}.


def rpmvercmp(a: str, b: str) -> int:
    """rpm's version comparison (segments of digits or letters, ``~`` sorts first)."""
    while a or b:
        a = re.sub(r"^[^A-Za-z0-9~^]+", "", a)
        b = re.sub(r"^[^A-Za-z0-9~^]+", "", b)
        if a.startswith("~") or b.startswith("~"):
            if not a.startswith("~"):
                return 1
            if not b.startswith("~"):
                return -1
            a, b = a[1:], b[1:]
            continue
        if not a or not b:
            break
        digits = a[0].isdigit()
        pattern = r"^\d+" if digits else r"^[A-Za-z]+"
        seg_a = re.match(pattern, a)
        seg_b = re.match(pattern, b)
        if seg_a is None:
            return -1
        if seg_b is None:
            return 1 if digits else -1
        x, y = seg_a.group(), seg_b.group()
        a, b = a[len(x) :], b[len(y) :]
        if digits:
            x, y = x.lstrip("0") or "0", y.lstrip("0") or "0"
            if len(x) != len(y):
                return 1 if len(x) > len(y) else -1
        if x != y:
            return 1 if x > y else -1
    return (len(a) > 0) - (len(b) > 0)


def _evr_cmp(a: str, b: str) -> int:
    va, _, ra = a.partition("-")
    vb, _, rb = b.partition("-")
    return rpmvercmp(va, vb) or rpmvercmp(ra, rb)


def _read_rpm_file(path: str) -> dict[str, str]:
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise Exit(1, f"error: open of {path} failed: No such file or directory") from None
    except (ValueError, UnicodeDecodeError):
        raise Exit(1, f"error: {path}: not an rpm package (or package manifest)") from None
    if not isinstance(data, dict) or not {"name", "version", "release"} <= set(data):
        raise Exit(1, f"error: {path}: not an rpm package (or package manifest)")
    return {k: str(v) for k, v in data.items()}


def _qf(fmt: str, name: str, evr: str) -> str:
    version, _, release = evr.partition("-")
    values = {
        "NAME": name,
        "VERSION": version,
        "RELEASE": release or "1",
        "ARCH": "x86_64",
        "EPOCH": "(none)",
    }
    text = re.sub(r"%\{(\w+)\}", lambda m: values.get(m.group(1).upper(), "(none)"), fmt)
    return text.replace("\\n", "\n").replace("\\t", "\t")


def rpm(argv: list[str]) -> None:
    data = load("rpm.json")
    installed: dict[str, str] = data.setdefault("installed", {})
    fmt = "%{NAME}-%{VERSION}-%{RELEASE}.%{ARCH}\\n"
    query = files = package_file = checksig = False
    names: list[str] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg in ("--qf", "--queryformat"):
            i += 1
            fmt = argv[i]
        elif arg.startswith("-") and not arg.startswith("--") and len(arg) > 1:
            for letter in arg[1:]:
                if letter == "q":
                    query = True
                elif letter == "l":
                    files = True
                elif letter == "p":
                    package_file = True
                elif letter == "K":
                    checksig = True
                elif letter == "v" and checksig:
                    continue
                else:
                    raise Exit(1, f"rpm: -{letter}: unknown option")
        elif arg == "--":
            names.extend(argv[i + 1 :])
            break
        elif arg == "--nosignature" and checksig:
            pass
        elif arg.startswith("--"):
            raise Exit(1, f"rpm: {arg}: unknown option")
        else:
            names.append(arg)
        i += 1
    if checksig:
        for name in names:
            _read_rpm_file(name)
            out(f"{name}:\n    Header SHA256 digest: OK\n    Payload SHA256 digest: OK")
        return
    if not query:
        raise Exit(1, "rpm: only queries (-q) and checks (-K) are faked; install through yum")
    if not names:
        raise Exit(1, "rpm: no arguments given for query")
    missing = 0
    for name in names:
        if package_file:
            head = _read_rpm_file(name)
            sys.stdout.write(_qf(fmt, head["name"], f"{head['version']}-{head['release']}"))
        elif name not in installed:
            out(f"package {name} is not installed")
            missing += 1
        elif files:
            for path in data.get("files", {}).get(name, []):
                out(path)
        else:
            sys.stdout.write(_qf(fmt, name, installed[name]))
    raise Exit(min(missing, 255))


def _match(data: dict[str, Any], spec: str) -> tuple[str, str] | None:
    """(name, version-release) the repository or a local file offers for ``spec``, the newest."""
    if spec.endswith(".rpm") or "/" in spec:
        head = _read_rpm_file(spec)
        return head["name"], f"{head['version']}-{head['release']}"
    repo: dict[str, list[str]] = data.get("repo", {})
    if repo.get(spec):
        best = repo[spec][0]
        for evr in repo[spec]:
            if _evr_cmp(evr, best) > 0:
                best = evr
        return spec, best
    for name, evrs in repo.items():
        for evr in evrs:
            if spec in (f"{name}-{evr}", f"{name}-{evr.partition('-')[0]}"):
                return name, evr
    return None


def _rpm_manager(tool: str, argv: list[str]) -> None:
    assume_yes = download_only = False
    download_dir = Path.cwd()
    words: list[str] = []
    for arg in argv:
        if arg in ("-y", "--assumeyes"):
            assume_yes = True
        elif arg == "--downloadonly":
            download_only = True
        elif arg.startswith("--downloaddir="):
            download_dir = Path(arg.partition("=")[2])
        elif arg in ("-q", "--quiet", "--noplugins", "-C", "--cacheonly"):
            continue
        elif arg.startswith("-"):
            raise Exit(1 if tool == "yum" else 2, f"{tool}: error: unrecognized arguments: {arg}")
        else:
            words.append(arg)
    if not words:
        raise Exit(1, f"Error: need a command. Please use /usr/bin/{tool} --help")
    verb, specs = words[0], words[1:]
    if verb not in ("install", "downgrade", "remove", "erase", "reinstall"):
        raise Exit(1, f"No such command: {verb}. Please use /usr/bin/{tool} --help")
    if not specs:
        raise Exit(1, f"Error: Need to pass a list of pkgs to {verb}")
    data = load("rpm.json")
    installed: dict[str, str] = data.setdefault("installed", {})
    if verb == "reinstall":
        _reinstall(data, specs, download_only, download_dir)
        return
    plan: dict[str, str | None] = {}
    for spec in specs:
        if verb in ("remove", "erase"):
            if spec not in installed:
                raise Exit(1, f"No match for argument: {spec}\nError: No packages marked for removal.")
            plan[spec] = None
            continue
        found = _match(data, spec)
        if found is None:
            raise Exit(1, f"No match for argument: {spec}\nError: Unable to find a match: {spec}")
        name, evr = found
        current = installed.get(name)
        nevra = f"{name}-{evr}.x86_64"
        if verb == "downgrade":
            if current is None:
                raise Exit(
                    1,
                    f"Packages for argument {name} available, but not installed.\n"
                    "Error: No packages marked for downgrade.",
                )
            if _evr_cmp(evr, current) >= 0:
                out(
                    f"Package {name}-{current}.x86_64 of lowest version already installed, "
                    "cannot downgrade it."
                )
                raise Exit(1, "Error: No packages marked for downgrade.")
        elif current == evr:
            out(f"Package {nevra} is already installed.")
            continue
        elif tool == "yum" and current is not None and _evr_cmp(evr, current) < 0:
            # yum 3: "install" of an older version does nothing, successfully.
            out(f"Package matching {nevra} already installed. Checking for update.")
            continue
        plan[name] = evr
    if not plan:
        out("Nothing to do.")
        return
    if not assume_yes:
        out("Is this ok [y/N]: ")
        raise Exit(1, "Operation aborted.")
    for name, target in plan.items():
        if target is None:
            installed.pop(name, None)
            out(f"Removed: {name}")
        else:
            installed[name] = target
            out(f"Installed: {name}-{target}.x86_64")
    save("rpm.json", data)
    out("Complete!")


def _reinstall(data: dict[str, Any], specs: list[str], download_only: bool, download_dir: Path) -> None:
    """Only ``reinstall --downloadonly``: the installed version's package file (JSON) into the dir."""
    if not download_only:
        raise Exit(1, "reinstall is only faked with --downloadonly")
    for spec in specs:
        found = _match(data, spec)
        if found is None or data["installed"].get(found[0]) != found[1]:
            raise Exit(
                1, f"Installed package {spec} not available.\nError: No packages marked for reinstall."
            )
        name, evr = found
        version, _, release = evr.partition("-")
        head = {"name": name, "version": version, "release": release}
        (download_dir / f"{name}-{evr}.x86_64.rpm").write_text(json.dumps(head))
    out("Complete!\nThe downloaded packages were saved in cache until the next successful transaction.")


# ------------------------------------------------------------ modprobe, modinfo
# Loaded modules: $STATE/proc/modules and $STATE/sys/module/<m>/version (the agent reads these).
# Module files: *.ko under $FLEET_FAKE_MODULES (default $STATE/modules) holding "version=X\0"
# like a real .modinfo section. modules.json: {"in_use": [...], "fail_load": [...]}; built-in
# modules are $STATE/sys/module/<m> directories that are not in proc/modules.


def _modules_dir() -> Path:
    return Path(os.environ.get("FLEET_FAKE_MODULES") or state_dir() / "modules")


def _module_file(name: str) -> Path | None:
    wanted = name.replace("-", "_")
    base = _modules_dir()
    if not base.is_dir():
        return None
    for path in sorted(base.rglob("*.ko*")):
        if re.sub(r"\.ko(\.xz|\.gz|\.zst)?$", "", path.name).replace("-", "_") == wanted:
            return path
    return None


def _file_version(path: Path) -> str:
    match = re.search(rb"(?:^|\0)version=([^\0\n]*)", path.read_bytes())
    return match.group(1).decode() if match else ""


def _loaded() -> list[str]:
    try:
        text = (state_dir() / "proc" / "modules").read_text()
    except FileNotFoundError:
        return []
    return [line.split()[0] for line in text.splitlines() if line.strip()]


def _write_loaded(names: list[str]) -> None:
    proc = state_dir() / "proc"
    proc.mkdir(parents=True, exist_ok=True)
    lines = [f"{n} 16384 0 - Live 0x0000000000000000" for n in names]
    (proc / "modules").write_text("".join(f"{line}\n" for line in lines))


def modprobe(argv: list[str]) -> None:
    remove = False
    names: list[str] = []
    for arg in argv:
        if arg in ("-r", "--remove"):
            remove = True
        elif arg in ("-q", "--quiet", "-v", "--verbose"):
            continue
        elif arg.startswith("-"):
            raise Exit(1, f"modprobe: unrecognized option '{arg}'\nmodprobe: ERROR: unknown option")
        else:
            names.append(arg)
    if not names:
        raise Exit(1, "modprobe: ERROR: missing parameters. See -h.")
    config = load("modules.json")
    loaded = _loaded()
    sys_module = state_dir() / "sys" / "module"
    targets = names if remove else names[:1]  # modprobe NAME [param=value ...]
    for raw in targets:
        name = raw.replace("-", "_")
        builtin = (sys_module / name).is_dir() and name not in loaded
        if remove:
            if builtin:
                raise Exit(1, f"modprobe: FATAL: Module {name} is builtin.")
            if name not in loaded:
                raise Exit(1, f"modprobe: FATAL: Module {name} is not in kernel.")
            if name in config.get("in_use", []):
                raise Exit(1, f"modprobe: FATAL: Module {name} is in use.")
            loaded.remove(name)
            for child in (sys_module / name).glob("*"):
                child.unlink()
            with contextlib.suppress(OSError):
                (sys_module / name).rmdir()
            continue
        if builtin or name in loaded:
            continue
        path = _module_file(name)
        if path is None:
            raise Exit(1, f"modprobe: FATAL: Module {name} not found in directory /lib/modules/{RELEASE}")
        if name in config.get("fail_load", []):
            raise Exit(1, f"modprobe: ERROR: could not insert '{name}': Exec format error")
        loaded.append(name)
        (sys_module / name).mkdir(parents=True, exist_ok=True)
        version = _file_version(path)
        if version:
            (sys_module / name / "version").write_text(version + "\n")
    _write_loaded(loaded)


def modinfo(argv: list[str]) -> None:
    field: str | None = None
    names: list[str] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg in ("-F", "--field"):
            i += 1
            field = argv[i] if i < len(argv) else None
        elif arg.startswith("-"):
            raise Exit(1, f"modinfo: unrecognized option '{arg}'\nmodinfo: ERROR: unknown option")
        else:
            names.append(arg)
        i += 1
    if not names:
        raise Exit(1, "modinfo: ERROR: missing module or filename.")
    for name in names:
        path = _module_file(name)
        if path is None:
            raise Exit(1, f"modinfo: ERROR: Module {name} not found.")
        version = _file_version(path)
        if field is None:
            out(f"filename:       {path}\nversion:        {version}")
        elif field == "version":
            out(version)
        elif field == "filename":
            out(str(path))
        else:
            out("")


def _yum(argv: list[str]) -> None:
    _rpm_manager("yum", argv)


TOOLS: dict[str, Callable[[list[str]], None]] = {
    "systemctl": systemctl,
    "docker": docker,
    "rpm": rpm,
    "yum": _yum,
    "modprobe": modprobe,
    "modinfo": modinfo,
}
