"""Two real Debian 12 hosts (systemd as PID 1), the agent installed by deploy/setup.sh, a real hub.

Service steps restart real units, package steps install and roll back real .debs with apt,
the module step meets a kernel that cannot load modules, the agent is SIGKILLed mid-step by
systemd, and the hosts' links go down or lossy mid-rollout.
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest

from tests.lab import hostkit, lab
from tests.lab.hostkit import LabFleet, served, spec

pytestmark = pytest.mark.lab


@pytest.fixture
def kit(lab_fleet: LabFleet) -> LabFleet:
    return lab_fleet


def test_setup_sh_installs_the_agent_as_an_enabled_unit_that_logs_its_work(kit: LabFleet) -> None:
    for name, host in kit.hosts.items():
        assert host.systemctl("is-active", "fleet-agent") == "active"
        assert host.systemctl("is-enabled", "fleet-agent") == "enabled"
        assert host.unit_prop("fleet-agent", "User") == ""  # root, as the unit says
        out = kit.setup_out[name]
        assert "installed /srv/wheels/fleetbus-0.1.0-py3-none-any.whl into /opt/fleetbus" in out
        # python3, python3-venv and ca-certificates are there: apt is not touched at all.
        assert "Reading package lists" not in out
        assert not host.run(
            ["test", "-e", "/opt/fleetbus/bin/pip3.11"], check=False
        ).returncode  # venv's own pip
        pip_status = host.run(["dpkg-query", "-W", "-f", "${Status}", "python3-pip"], check=False).stdout
        assert "ok installed" not in pip_status
    # Default log level: INFO, so the journal shows normal operation.
    lab.wait_for(
        "the agent's ready line in its journal",
        lambda: "agent h1 ready" in kit.hosts["h1"].journal("fleet-agent"),
    )


def test_service_restart_restarts_the_real_unit(kit: LabFleet) -> None:
    host = kit.hosts["h1"]
    pid_before = hostkit.served_pid(host)
    main_before = host.unit_prop("demo-web", "ExecMainPID")
    rollout, shown = kit.fleet.rollout(
        spec(["h1"], [
            {"type": "service", "action": "restart", "name": "demo-web"},
            {"type": "health", "check": "systemd", "target": "demo-web", "retries": 5, "interval_s": 0.3},
            hostkit.health_http("1.0") | {"expect": None, "retries": 10},
        ])
    )  # fmt: skip
    assert shown["state"] == "succeeded", kit.why(shown)
    assert host.unit_prop("demo-web", "ExecMainPID") != main_before
    assert hostkit.served_pid(host) not in (0, pid_before)
    journal = host.journal("fleet-agent")
    assert "step 0 (service) succeeded" in journal
    assert ("apply" in journal and rollout[:8] in journal) or "accepted" in journal


def test_update_and_rollback_of_a_real_unit_on_two_hosts(kit: LabFleet) -> None:
    _, good = kit.fleet.rollout(spec(["h1", "h2"], hostkit.stop_file_start(kit.artifacts, "2.0", "2.0")))
    assert good["state"] == "succeeded", kit.why(good)
    assert [served(h) for h in kit.hosts.values()] == ["2.0", "2.0"]
    _, bad = kit.fleet.rollout(spec(["h1", "h2"], hostkit.stop_file_start(kit.artifacts, "3.0", "9.9")))
    assert bad["state"] == "rolled_back", kit.why(bad)
    for host in kit.hosts.values():
        assert served(host) == "2.0"
        assert hostkit.file_on_disk(host) == "2.0"
        assert host.systemctl("is-active", "demo-web") == "active"


# ------------------------------------------------------------------ packages: real apt, a local repository


def _deb(out: Path, name: str, version: str) -> Path:
    root = out / f"{name}-{version}"
    (root / "DEBIAN").mkdir(parents=True)
    (root / "usr/share" / name).mkdir(parents=True)
    (root / "usr/share" / name / "version").write_text(version + "\n")
    (root / "DEBIAN/control").write_text(
        f"Package: {name}\nVersion: {version}\nArchitecture: all\nMaintainer: lab <lab@example.invalid>\n"
        f"Description: fleetbus lab package {version}\n"
    )
    deb = out / f"{name}_{version}_all.deb"
    subprocess.run(["dpkg-deb", "--root-owner-group", "-Zgzip", "--build", str(root), str(deb)],
                   check=True, capture_output=True)  # fmt: skip
    return deb


@pytest.fixture(scope="module")
def apt_repo(lab_fleet: LabFleet, tmp_path_factory: pytest.TempPathFactory) -> None:
    """lab-demo 1.0, 2.0 and 3.0 in a file: repository inside h1; 1.0 installed with apt."""
    out = tmp_path_factory.mktemp("debs")
    debs = [_deb(out, "lab-demo", v) for v in ("1.0", "2.0", "3.0")]
    packages = subprocess.run(["dpkg-scanpackages", "-m", ".", "/dev/null"], cwd=out, check=True,
                              capture_output=True, text=True).stdout  # fmt: skip
    host = lab_fleet.hosts["h1"]
    for deb in debs:
        host.put(f"/srv/repo/{deb.name}", deb.read_bytes())
    host.put("/srv/repo/Packages", packages)
    host.put("/etc/apt/sources.list.d/lab.list", "deb [trusted=yes] file:/srv/repo ./\n")
    host.run(["apt-get", "update", "-q"], timeout=120)
    host.run(["apt-get", "install", "-y", "-q", "lab-demo=1.0"], env={"DEBIAN_FRONTEND": "noninteractive"})


def _installed(host: lab.Host) -> str:
    return host.run(["dpkg-query", "-W", "-f", "${Version}", "lab-demo"], check=False).stdout.strip()


def test_package_step_installs_and_rolls_back_real_debs_with_apt(kit: LabFleet, apt_repo: None) -> None:
    host = kit.hosts["h1"]
    assert _installed(host) == "1.0"
    health = {"type": "health", "check": "command", "target": "lab-demo-version.sh", "retries": 1}
    _, good = kit.fleet.rollout(spec(["h1"], [
        {"type": "package", "manager": "apt", "name": "lab-demo", "version": "2.0"},
        {**health, "expect": "2.0"},
    ]))  # fmt: skip
    assert good["state"] == "succeeded", kit.why(good)
    assert _installed(host) == "2.0"
    assert host.run(["cat", "/usr/share/lab-demo/version"]).stdout.strip() == "2.0"
    _, bad = kit.fleet.rollout(spec(["h1"], [
        {"type": "package", "manager": "apt", "name": "lab-demo", "version": "3.0"},
        {**health, "expect": "9.9"},
    ]))  # fmt: skip
    assert bad["state"] == "rolled_back", kit.why(bad)
    assert _installed(host) == "2.0"
    assert host.run(["cat", "/usr/share/lab-demo/version"]).stdout.strip() == "2.0"
    # apt and dpkg agree, nothing half-configured
    assert host.run(["dpkg", "--audit"]).stdout.strip() == ""


def test_module_step_says_what_it_cannot_do_where_modules_cannot_load(kit: LabFleet) -> None:
    host = kit.hosts["h2"]
    _, shown = kit.fleet.rollout(spec(["h2"], [{"type": "module", "name": "dummy", "action": "load"}]))
    # A minimal Debian host has no kmod, and this kernel loads no modules at all: the agent
    # refuses the command at intake, naming what is missing, and nothing runs.
    assert shown["nodes"]["h2"]["phase"] == "rejected", shown["nodes"]
    assert shown["nodes"]["h2"]["detail"] == (
        "rejected the command: step 1 (module): modprobe is not installed on this node"
    )
    assert host.systemctl("is-active", "fleet-agent") == "active"


# ------------------------------------------------------------------ crashes and partitions


def test_agent_sigkilled_by_systemd_mid_step_is_restarted_and_undoes(kit: LabFleet) -> None:
    host = kit.hosts["h2"]
    before = served(host)
    restarts = int(host.unit_prop("fleet-agent", "NRestarts") or 0)
    plan = hostkit.stop_file_start(kit.artifacts, "5.0", "5.0")
    plan.insert(3, {"type": "script", "name": "slow.sh"})  # after stop and file: the unit is down
    rollout, _ = kit.fleet.rollout(spec(["h2"], plan), wait=False)
    lab.wait_for(
        "the slow step to run", lambda: "step 3 (script) running" in host.journal("fleet-agent"), timeout=60
    )
    assert hostkit.file_on_disk(host) == "5.0"
    assert served(host) == ""
    host.systemctl("kill", "-s", "KILL", "fleet-agent")
    lab.wait_for(
        "systemd to restart the agent",
        lambda: int(host.unit_prop("fleet-agent", "NRestarts") or 0) > restarts,
        timeout=30,
    )
    shown = kit.fleet.wait_state(rollout, ("rolled_back", "failed", "rollback_failed"), timeout=120)
    assert shown["state"] == "rolled_back", kit.why(shown)
    assert served(host) == before
    assert hostkit.file_on_disk(host) == before
    assert host.systemctl("is-active", "fleet-agent") == "active"
    # systemctl kill reached the whole cgroup: the script died with the agent
    assert (
        host.sh("cat /proc/[0-9]*/cmdline 2>/dev/null | tr '\\0' ' '", check=False).stdout.count("slow.sh")
        == 0
    )


def test_link_down_is_seen_by_keepalive_and_the_node_comes_back(kit: LabFleet) -> None:
    host = kit.hosts["h1"]
    host.link(up=False)
    try:
        started = time.monotonic()
        kit.fleet.wait_online(["h1"], online=False, timeout=60)
        print(f"lab: link down seen as offline after {time.monotonic() - started:.1f} s (keepalive 4 s)")
        assert host.systemctl("is-active", "fleet-agent") == "active"  # half-open: the agent still runs
    finally:
        host.link(up=True)
    kit.fleet.wait_online(["h1"], timeout=60)


def test_rollout_over_a_lossy_slow_link_succeeds(kit: LabFleet) -> None:
    h1, h2 = kit.hosts["h1"], kit.hosts["h2"]
    how = h2.degrade(loss=0.1, delay_ms=150)
    print(f"lab: h2's link is lossy and slow through {how}")
    try:
        started = time.monotonic()
        _, shown = kit.fleet.rollout(spec(["h1", "h2"], hostkit.stop_file_start(kit.artifacts, "6.0", "6.0")))
        print(f"lab: rollout over the lossy link took {time.monotonic() - started:.1f} s")
    finally:
        h2.restore_link()
    assert shown["state"] == "succeeded", kit.why(shown)
    assert [served(h) for h in (h1, h2)] == ["6.0", "6.0"]
