"""``module`` step through the fake modprobe/modinfo, and a driver package rolled back with real dpkg.

The fakes keep the kernel's view in ``$FLEET_FAKE_STATE/proc/modules`` and
``.../sys/module/<m>/version`` (the agent reads those through ``SystemTools``);
module files are ``.ko`` files whose ``.modinfo``-style ``version=`` string the
fakes read, like the real modinfo.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from bus.errors import StepError
from bus.messages import ModuleStep, PackageStep
from edge_agent import versions
from edge_agent.settings import Policy
from edge_agent.steps import module, package
from tests.integration.test_managers import FakeSystem, install_fakes, make_ctx
from tests.integration.test_package_dpkg import cache, deb_settings, make_world


def ko(version: str) -> bytes:
    """A module file's bytes: its .modinfo strings as the kernel build writes them."""
    return b"\x7fELF\0\0fake\0license=GPL\0version=" + version.encode() + b"\0srcversion=ABC\0"


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> FakeSystem:
    system = install_fakes(monkeypatch, tmp_path)
    modules = system.state / "modules" / "kernel" / "drivers"
    modules.mkdir(parents=True)
    (modules / "fleet_drv.ko").write_bytes(ko("1.0"))
    (modules / "fleet-busy.ko.xz").write_bytes(ko("4.2"))
    system.write("modules.json", {"in_use": ["fleet_busy"]})
    (system.state / "sys" / "module" / "fleet_core").mkdir(parents=True)  # built into the kernel
    return system


async def test_load_and_undo_unloads(fake: FakeSystem, tmp_path: Path) -> None:
    settings = fake.settings(tmp_path, policy=Policy(modules=["fleet*"]))
    step = ModuleStep(name="fleet-drv", action="load")
    assert module.check(step, settings) is None
    ctx, calls = make_ctx(settings)
    record = await module.apply(step, ctx)
    assert record == {"was_loaded": False, "version": None}
    assert calls.checkpoints == [record]
    assert await versions.module_version("fleet_drv", fake.tools()) == "1.0"
    assert fake.calls("modprobe") == [["fleet-drv"]]
    assert await module.apply(step, ctx) == {"was_loaded": True, "version": "1.0"}  # already loaded: no call
    assert fake.calls("modprobe") == [["fleet-drv"]]

    await module.undo(step, ctx, record)
    assert await versions.module_version("fleet_drv", fake.tools()) is None
    await module.undo(step, ctx, record)  # idempotent
    assert fake.calls("modprobe") == [["fleet-drv"], ["-r", "fleet-drv"]]


async def test_unload_and_undo_loads(fake: FakeSystem, tmp_path: Path) -> None:
    ctx, _ = make_ctx(fake.settings(tmp_path))
    await module.load("fleet_drv", ctx)
    step = ModuleStep(name="fleet_drv", action="unload")
    record = await module.apply(step, ctx)
    assert record == {"was_loaded": True, "version": "1.0"}
    assert "fleet_drv" not in await versions.loaded_modules(fake.tools())
    await module.undo(step, ctx, record)
    assert "fleet_drv" in await versions.loaded_modules(fake.tools())


async def test_reload_picks_up_the_new_module_file(fake: FakeSystem, tmp_path: Path) -> None:
    ctx, _ = make_ctx(fake.settings(tmp_path))
    await module.load("fleet_drv", ctx)
    (fake.state / "modules" / "kernel" / "drivers" / "fleet_drv.ko").write_bytes(ko("2.0"))
    assert (
        await versions.module_version("fleet_drv", fake.tools()) == "1.0"
    )  # the file changed, not the kernel
    assert await versions.module_file_version("fleet_drv", fake.tools()) == "2.0"
    step = ModuleStep(name="fleet_drv")
    record = await module.apply(step, ctx)
    assert record == {"was_loaded": True, "version": "1.0"}
    assert await versions.module_version("fleet_drv", fake.tools()) == "2.0"
    assert fake.calls("modprobe")[-2:] == [["-r", "fleet_drv"], ["fleet_drv"]]


async def test_a_module_in_use_means_reboot_required(fake: FakeSystem, tmp_path: Path) -> None:
    ctx, calls = make_ctx(fake.settings(tmp_path))
    await module.load("fleet-busy", ctx)
    step = ModuleStep(name="fleet-busy")
    with pytest.raises(StepError) as failed:
        await module.apply(step, ctx)
    assert failed.value.reason == (
        "reboot required: module fleet-busy cannot be unloaded: modprobe: FATAL: Module fleet_busy is in use."
    )
    assert await versions.module_version("fleet_busy", fake.tools()) == "4.2"
    before = len(fake.calls("modprobe"))
    await module.undo(step, ctx, calls.checkpoints[-1])  # still the recorded version: nothing to do
    assert len(fake.calls("modprobe")) == before


async def test_builtin_and_unknown_modules(fake: FakeSystem, tmp_path: Path) -> None:
    ctx, _ = make_ctx(fake.settings(tmp_path))
    assert await versions.module_version("fleet_core", fake.tools()) == "builtin"
    with pytest.raises(StepError, match="reboot required: module fleet_core is built into the kernel"):
        await module.apply(ModuleStep(name="fleet_core", action="unload"), ctx)
    with pytest.raises(StepError, match=r"reboot required: .*Module fleet_core is builtin"):
        await module.unload("fleet_core", ctx)
    with pytest.raises(
        StepError, match=r"modprobe: FATAL: Module nosuch not found in directory /lib/modules/"
    ):
        await module.apply(ModuleStep(name="nosuch", action="load"), ctx)
    with pytest.raises(StepError, match="modinfo: ERROR: Module nosuch not found"):
        await versions.module_file_version("nosuch", fake.tools())


async def test_intake_checks_policy_and_modprobe(fake: FakeSystem, tmp_path: Path) -> None:
    settings = fake.settings(tmp_path, policy=Policy(modules=["fleet_*"]))
    assert module.check(ModuleStep(name="e1000e"), settings) == (
        "kernel module e1000e is not allowed by this node's policy"
    )
    missing = fake.settings(tmp_path, modprobe=str(tmp_path / "nomodprobe"))
    assert module.check(ModuleStep(name="fleet_drv"), missing) == (
        f"{tmp_path / 'nomodprobe'} is not installed on this node"
    )


@pytest.mark.skipif(shutil.which("dpkg") is None, reason="needs dpkg")
async def test_driver_package_rollback_reloads_the_old_driver(
    fake: FakeSystem, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    world = make_world(tmp_path)
    release_dir = "lib/modules/6.1.0-fake-amd64/updates"
    monkeypatch.setenv("FLEET_FAKE_MODULES", str(world.root / "lib" / "modules"))
    world.deb("1.0", {f"{release_dir}/fleet_drv.ko": ko("1.0")})
    world.deb("2.0", {f"{release_dir}/fleet_drv.ko": ko("2.0")})
    world.install_by_hand("1.0")
    tools = fake.tools(dpkg_root=world.root, dpkg_force=world.tools.dpkg_force)
    settings = deb_settings(tmp_path, tools)
    ctx, _ = make_ctx(settings)
    await module.load("fleet_drv", ctx)

    # The plan of a driver update: the package, then a reload of its module.
    pkg = PackageStep(manager="dpkg", name=world.name, src=cache(settings, world.deb("2.0")))
    reload_step = ModuleStep(name="fleet_drv")
    pkg_record = await package.apply(pkg, ctx)
    mod_record = await module.apply(reload_step, ctx)
    assert await versions.module_version("fleet_drv", tools) == "2.0"

    # Rollback, last step first: the module's undo runs while 2.0 is still on disk; the package's
    # undo puts 1.0 back and reloads the module it ships, so the old driver runs again.
    await module.undo(reload_step, ctx, mod_record)
    await package.undo(pkg, ctx, pkg_record)
    assert world.state() == ("1.0", "installed")
    assert await versions.module_version("fleet_drv", tools) == "1.0"
    assert fake.calls("modprobe")[-2:] == [["-r", "fleet_drv"], ["fleet_drv"]]
