"""``container`` step through the fake docker CLI: recreate with the old configuration, roll back."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from bus.errors import StepError
from bus.messages import ContainerStep
from edge_agent import versions
from edge_agent.managers import DockerManager
from edge_agent.settings import Policy
from edge_agent.steps import container
from tests.integration.test_managers import FakeSystem, install_fakes, make_ctx

OLD_RUN = [
    "--name",
    "web",
    "-e",
    "MODE=prod",
    "-e",
    "DB=postgres://db/app",
    "-p",
    "127.0.0.1:8080:80",
    "-p",
    "8443:443/tcp",
    "-v",
    "/srv/web:/data:ro",
    "-v",
    "webcache:/cache",
    "--restart",
    "on-failure:3",
    "--network",
    "backend",
    "web:1",
    "serve",
    "--port",
    "80",
]


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> FakeSystem:
    system = install_fakes(monkeypatch, tmp_path)
    system.write(
        "docker.json",
        {
            "registry": {
                "web:1": {"env": ["PATH=/usr/bin", "MODE=dev"], "cmd": ["run"]},
                "web:2": {"env": ["PATH=/usr/local/bin:/usr/bin", "MODE=dev"], "cmd": ["run"]},
                "web:crash": {"env": ["PATH=/usr/bin"], "exit_code": 3},
            }
        },
    )
    return system


async def _inspect(fake: FakeSystem, name: str = "web") -> dict[str, Any]:
    found = await DockerManager(fake.tools()).inspect_container(name, timeout=10)
    assert found is not None
    return found


def _shape(found: dict[str, Any]) -> dict[str, Any]:
    """The parts of a container the step promises to carry over."""
    return {
        "env": sorted(e for e in found["Config"]["Env"] if not e.startswith("PATH=")),
        "cmd": found["Config"]["Cmd"],
        "ports": found["HostConfig"]["PortBindings"],
        "binds": found["HostConfig"]["Binds"],
        "restart": found["HostConfig"]["RestartPolicy"],
        "network": found["HostConfig"]["NetworkMode"],
        "running": found["State"]["Running"],
    }


async def test_recreates_with_the_new_image_and_the_old_config_then_rolls_back(
    fake: FakeSystem, tmp_path: Path
) -> None:
    docker = DockerManager(fake.tools())
    await docker.create(OLD_RUN, start=True, timeout=10)
    before = await _inspect(fake)
    settings = fake.settings(tmp_path, policy=Policy(images=["web:*"]))
    step = ContainerStep(name="web", image="web:2")
    assert container.check(step, settings) is None
    ctx, calls = make_ctx(settings)

    record = await container.apply(step, ctx)

    after = await _inspect(fake)
    assert after["Id"] != before["Id"]
    assert after["Config"]["Image"] == "web:2"
    assert _shape(after) == _shape(before)
    # The new image's own PATH applies: only the variables set at "docker run" were carried over.
    assert "PATH=/usr/local/bin:/usr/bin" in after["Config"]["Env"]
    assert calls.checkpoints[0]["created"] is False
    assert calls.checkpoints[0]["old"]["image"] == "web:1"
    assert record["created"] is True
    assert await versions.container_image("web", fake.tools()) == "web:2"

    undo_ctx, _ = make_ctx(settings, phase="rollback")
    await container.undo(step, undo_ctx, record)
    restored = await _inspect(fake)
    assert restored["Config"]["Image"] == "web:1"
    assert restored["Image"] == before["Image"]
    assert _shape(restored) == _shape(before)
    assert "PATH=/usr/bin" in restored["Config"]["Env"]

    # Undo again (an agent restart mid-undo): the old container is left as it is.
    await container.undo(step, undo_ctx, record)
    assert (await _inspect(fake))["Id"] == restored["Id"]


async def test_rollback_uses_the_old_image_id_when_the_tag_moved(fake: FakeSystem, tmp_path: Path) -> None:
    docker = DockerManager(fake.tools())
    registry = fake.read("docker.json")
    registry["registry"]["web:latest"] = {"env": ["PATH=/bin"], "cmd": ["v1"]}
    fake.write("docker.json", registry)
    await docker.create(["--name", "web", "web"], start=True, timeout=10)
    old_id = (await _inspect(fake))["Image"]
    registry = fake.read("docker.json")
    registry["registry"]["web:latest"] = {"env": ["PATH=/bin"], "cmd": ["v2"]}  # a new push of :latest
    fake.write("docker.json", registry)
    ctx, _ = make_ctx(fake.settings(tmp_path))
    step = ContainerStep(name="web", image="web:latest", pull="always")

    record = await container.apply(step, ctx)
    assert (await _inspect(fake))["Config"]["Cmd"] == ["v2"]
    await container.undo(step, ctx, record)

    restored = await _inspect(fake)
    assert restored["Image"] == old_id
    assert restored["Config"]["Cmd"] == ["v1"]


async def test_a_container_that_does_not_start_fails_the_step_and_undo_brings_the_old_back(
    fake: FakeSystem, tmp_path: Path
) -> None:
    docker = DockerManager(fake.tools())
    await docker.create(OLD_RUN, start=True, timeout=10)
    before = await _inspect(fake)
    ctx, calls = make_ctx(fake.settings(tmp_path))
    step = ContainerStep(name="web", image="web:crash")
    with pytest.raises(StepError, match=r"container web is exited \(exit code 3\)"):
        await container.apply(step, ctx)
    await container.undo(step, ctx, calls.checkpoints[-1])
    restored = await _inspect(fake)
    assert restored["Image"] == before["Image"]
    assert _shape(restored) == _shape(before)


async def test_pull_failure_changes_nothing(fake: FakeSystem, tmp_path: Path) -> None:
    docker = DockerManager(fake.tools())
    await docker.create(OLD_RUN, start=True, timeout=10)
    before = await _inspect(fake)
    setup = len(fake.calls("docker"))
    ctx, calls = make_ctx(fake.settings(tmp_path))
    step = ContainerStep(name="web", image="web:9")
    with pytest.raises(StepError, match=r"manifest for web:9 not found"):
        await container.apply(step, ctx)
    assert (await _inspect(fake))["Id"] == before["Id"]
    await container.undo(step, ctx, calls.checkpoints[-1])
    assert (await _inspect(fake))["Id"] == before["Id"]
    assert [c[0] for c in fake.calls("docker")[setup:] if c[0] not in ("container", "image")] == ["pull"]


async def _air_gapped(fake: FakeSystem) -> None:
    """web:1 runs and web:2 is on the node (loaded earlier); the node reaches no registry any more."""
    docker = DockerManager(fake.tools())
    await docker.create(OLD_RUN, start=True, timeout=10)
    await docker.pull("web:2", timeout=10)
    data = fake.read("docker.json")
    data["registry"] = {}
    fake.write("docker.json", data)


async def test_pull_missing_uses_a_local_image_without_a_registry(fake: FakeSystem, tmp_path: Path) -> None:
    await _air_gapped(fake)
    setup = len(fake.calls("docker"))
    ctx, calls = make_ctx(fake.settings(tmp_path))
    step = ContainerStep(name="web", image="web:2")
    assert step.pull == "missing"
    record = await container.apply(step, ctx)
    assert (await _inspect(fake))["Config"]["Image"] == "web:2"
    assert "pull" not in [c[0] for c in fake.calls("docker")[setup:]]
    assert "image web:2 is on the node (pull: missing): not pulled" in calls.logs
    await container.undo(step, ctx, record)
    assert (await _inspect(fake))["Config"]["Image"] == "web:1"


async def test_pull_missing_pulls_an_absent_image_and_always_pulls_a_present_one(
    fake: FakeSystem, tmp_path: Path
) -> None:
    docker = DockerManager(fake.tools())
    await docker.create(OLD_RUN, start=True, timeout=10)
    ctx, _ = make_ctx(fake.settings(tmp_path))
    setup = len(fake.calls("docker"))
    await container.apply(ContainerStep(name="web", image="web:2"), ctx)
    assert [c[:2] for c in fake.calls("docker")[setup:] if c[0] == "pull"] == [["pull", "web:2"]]
    setup = len(fake.calls("docker"))
    await container.apply(ContainerStep(name="web", image="web:2", pull="always"), ctx)
    assert [c[:2] for c in fake.calls("docker")[setup:] if c[0] == "pull"] == [["pull", "web:2"]]


async def test_pull_never_fails_clearly_when_the_image_is_absent(fake: FakeSystem, tmp_path: Path) -> None:
    await _air_gapped(fake)
    before = await _inspect(fake)
    setup = len(fake.calls("docker"))
    ctx, _ = make_ctx(fake.settings(tmp_path))
    step = ContainerStep(name="web", image="web:3", pull="never")
    with pytest.raises(StepError, match=r"image web:3 is not on this node and the step says pull: never"):
        await container.apply(step, ctx)
    assert [c[0] for c in fake.calls("docker")[setup:]] == ["container", "image", "image"]
    assert (await _inspect(fake))["Id"] == before["Id"]
    # A present image is used as it is.
    await container.apply(ContainerStep(name="web", image="web:2", pull="never"), ctx)
    assert (await _inspect(fake))["Config"]["Image"] == "web:2"


async def test_port_conflict_leaves_a_created_container_that_undo_replaces(
    fake: FakeSystem, tmp_path: Path
) -> None:
    docker = DockerManager(fake.tools())
    await docker.create(OLD_RUN, start=True, timeout=10)
    ctx, calls = make_ctx(fake.settings(tmp_path))
    step = ContainerStep(name="web", image="web:2")
    await container.apply(step, ctx)
    # Someone grabs the port the old container used, while the new one runs: undo must still recreate.
    await docker.stop("web", timeout=10)
    await docker.create(["--name", "other", "-p", "127.0.0.1:8080:80", "web:1"], start=True, timeout=10)
    with pytest.raises(StepError, match="port is already allocated"):
        await container.undo(step, ctx, calls.checkpoints[-1])
    found = await _inspect(fake)
    assert found["State"]["Status"] == "created"
    assert found["Config"]["Image"] == "web:1"
    await docker.remove("other", timeout=10)
    await container.undo(step, ctx, calls.checkpoints[-1])
    assert (await _inspect(fake))["State"]["Running"]


async def test_first_deploy_and_its_undo(fake: FakeSystem, tmp_path: Path) -> None:
    ctx, _ = make_ctx(fake.settings(tmp_path))
    step = ContainerStep(name="api", image="web:1")
    record = await container.apply(step, ctx)
    assert record["old"] is None
    assert (await _inspect(fake, "api"))["State"]["Running"]
    await container.undo(step, ctx, record)
    assert await DockerManager(fake.tools()).inspect_container("api", timeout=10) is None


async def test_intake_checks_the_image_policy(fake: FakeSystem, tmp_path: Path) -> None:
    settings = fake.settings(tmp_path, policy=Policy(images=["registry.local/*"]))
    assert container.check(ContainerStep(name="web", image="web:2"), settings) == (
        "image web:2 is not allowed by this node's policy"
    )
    assert container.check(ContainerStep(name="web", image="registry.local/web:2"), settings) is None


def test_config_and_run_args_are_pure() -> None:
    inspected = {
        "Id": "c1",
        "Image": "sha256:aa",
        "State": {"Running": False},
        "Config": {"Image": "web:1", "Env": ["PATH=/bin", "A=1"], "Cmd": ["run"]},
        "HostConfig": {
            "PortBindings": {"80/tcp": [{"HostIp": "", "HostPort": ""}]},
            "Binds": None,
            "RestartPolicy": {"Name": "no", "MaximumRetryCount": 0},
            "NetworkMode": "default",
        },
    }
    config = container.container_config(inspected, {"Config": {"Env": ["PATH=/bin"], "Cmd": ["run"]}})
    assert config == {
        "id": "c1",
        "image": "web:1",
        "image_id": "sha256:aa",
        "running": False,
        "env": ["A=1"],
        "cmd": [],
        "ports": ["80/tcp"],
        "volumes": [],
        "restart": "",
        "network": "",
    }
    assert container.run_args("web", "web:2", config) == [
        "--name",
        "web",
        "-e",
        "A=1",
        "-p",
        "80/tcp",
        "web:2",
    ]
