"""Version probes (pure parsers and /sys, /proc readers) and the tool options they run with."""

from __future__ import annotations

from pathlib import Path

import pytest

from bus.errors import StepError
from edge_agent import versions
from edge_agent.steps.package import parse_control
from edge_agent.system import RunResult
from edge_agent.tools import SystemTools, tool_message
from edge_agent.versions import PackageState


def test_parse_dpkg_status_keeps_packages_on_disk_only() -> None:
    text = (
        "libfoo1:amd64\t1.2-3\tinstalled\n"
        "app\t2.0\thalf-configured\n"
        "gone\t1.0\tconfig-files\n"
        "never\t\tnot-installed\n"
        "garbage line\n"
    )
    assert versions.parse_dpkg_status(text) == {
        "libfoo1": PackageState("1.2-3", "installed"),
        "app": PackageState("2.0", "half-configured"),
    }
    assert not versions.parse_dpkg_status(text)["app"].is_installed


def test_parse_rpm_versions_skips_missing_and_keeps_the_last_of_several() -> None:
    text = "kernel\t6.1-1\nkernel\t6.2-1\npackage nope is not installed\napp\t1.0-1\n"
    assert versions.parse_rpm_versions(text) == {"kernel": "6.2-1", "app": "1.0-1"}


def test_parse_proc_modules() -> None:
    text = "e1000e 290816 0 - Live 0x0\nptp 32768 1 e1000e, Live 0x0\n\n"
    assert versions.parse_proc_modules(text) == {"e1000e", "ptp"}


def test_package_family() -> None:
    assert [versions.package_family(m) for m in ("apt", "dpkg", "dnf", "yum", "rpm")] == [
        "deb",
        "deb",
        "rpm",
        "rpm",
        "rpm",
    ]
    with pytest.raises(StepError, match="unknown package manager pip"):
        versions.package_family("pip")


@pytest.fixture
def kernel(tmp_path: Path) -> SystemTools:
    sys_module = tmp_path / "sys" / "module"
    for name, version in (("e1000e", "3.2.6-k"), ("ptp", None), ("vt", None)):
        (sys_module / name).mkdir(parents=True)
        if version:
            (sys_module / name / "version").write_text(f"{version}\n")
    proc = tmp_path / "proc" / "modules"
    proc.parent.mkdir()
    proc.write_text("e1000e 290816 0 - Live 0x0\nptp 32768 1 e1000e, Live 0x0\n")
    return SystemTools(sys_module=sys_module, proc_modules=proc)


async def test_module_version_from_sys_module(kernel: SystemTools) -> None:
    assert await versions.module_version("e1000e", kernel) == "3.2.6-k"
    assert await versions.module_version("ptp", kernel) == "loaded"
    assert await versions.module_version("vt", kernel) == "builtin"
    assert await versions.module_version("nosuch", kernel) is None
    assert await versions.loaded_modules(kernel) == {"e1000e", "ptp"}


async def test_loaded_modules_without_proc_modules(tmp_path: Path) -> None:
    assert await versions.loaded_modules(SystemTools(proc_modules=tmp_path / "none")) == set()


async def test_probes_report_a_tool_that_cannot_run(tmp_path: Path) -> None:
    tools = SystemTools(dpkg_query=str(tmp_path / "no-dpkg-query"), rpm=str(tmp_path / "no-rpm"))
    with pytest.raises(StepError, match="cannot run"):
        await versions.deb_package("x", tools)
    with pytest.raises(StepError, match="cannot run"):
        await versions.rpm_package("x", tools)
    assert await versions.package_versions(["x"], tools) == {}


def test_tool_options_for_a_throwaway_root(tmp_path: Path) -> None:
    tools = SystemTools(dpkg_root=tmp_path, dpkg_instdir=tmp_path / "inst", dpkg_force=("not-root",))
    assert tools.dpkg_args() == [f"--root={tmp_path}", f"--instdir={tmp_path / 'inst'}", "--force-not-root"]
    assert tools.dpkg_query_args() == [f"--root={tmp_path}"]
    assert tools.admindir == tmp_path / "var/lib/dpkg"
    assert tools.instdir == tmp_path / "inst"
    live = SystemTools()
    assert (live.dpkg_args(), live.apt_args(), live.admindir, live.instdir) == (
        [],
        [],
        Path("/var/lib/dpkg"),
        Path("/"),
    )


def test_tool_message_quotes_the_last_lines() -> None:
    result = RunResult(("dpkg",), 1, "", "a\n\nb\nc\nd\ne\n")
    assert tool_message(result) == "b | c | d | e"
    assert tool_message(RunResult(("x",), 3, "only stdout", "")) == "only stdout"
    assert tool_message(RunResult(("x",), 3, "", "")) == "exit status 3"


def test_parse_control_keeps_continuations() -> None:
    text = (
        "Package: app\nStatus: install ok installed\nVersion: 1.0\n"
        "Conffiles:\n /etc/app.conf 0123 \n /etc/old.conf 4567 obsolete\n"
        "Description: short\n long line one\n .\n\nPackage: next\n"
    )
    fields = parse_control(text)
    assert [name for name, _ in fields] == ["Package", "Status", "Version", "Conffiles", "Description"]
    assert dict(fields)["Description"] == "short\n long line one\n ."
