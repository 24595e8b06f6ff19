"""The ``container`` step against a real dockerd 20.10 and a local docker-registry (no internet).

Pull from the registry, recreate with the old container's configuration, roll back to the old
image (by id when the tag moved), and the pull policy with a locally imported image.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from bus.errors import StepError
from bus.messages import ContainerStep
from edge_agent.managers import DockerManager
from edge_agent.settings import Policy
from edge_agent.steps import container
from edge_agent.tools import SystemTools
from tests.integration.test_managers import ToolSettings, make_ctx
from tests.lab import dockerkit, lab

pytestmark = pytest.mark.lab


@pytest.fixture(scope="session")
def docker(lab_net: lab.LabNet, lab_rootfs: Path, lab_tmp: Path) -> Iterator[dockerkit.Docker]:
    import time

    started = time.monotonic()
    daemon = dockerkit.Docker(lab_net, lab_tmp / "docker", lab_rootfs)
    for version in ("1", "2", "3"):
        daemon.web_image(f"lab/web:{version}", version)
    print(f"lab: dockerd, registry and images ready in {time.monotonic() - started:.1f} s")
    yield daemon
    daemon.close()


@pytest.fixture
def settings(docker: dockerkit.Docker, tmp_path: Path) -> ToolSettings:
    state = tmp_path / "agent-state"
    state.mkdir()
    return ToolSettings(
        node="node-1",
        state_dir=state,
        scripts_dir=tmp_path,
        service_manager="docker",
        policy=Policy(images=["*"]),
        tools=SystemTools(env={"DOCKER_HOST": docker.env["DOCKER_HOST"]}),
    )


def _inspect(docker: dockerkit.Docker, name: str) -> dict[str, Any]:
    found: list[dict[str, Any]] = json.loads(docker.docker("container", "inspect", name).stdout)
    return found[0]


def _served(docker: dockerkit.Docker, port: int) -> dict[str, Any]:
    code = (
        f"import urllib.request as u; print(u.urlopen('http://127.0.0.1:{port}/', timeout=2).read().decode())"
    )
    text = lab.wait_for(
        f"the web container on :{port}",
        lambda: docker.net.run(["python3", "-c", code], check=False).stdout.strip(),
        timeout=30,
        interval=0.3,
    )
    served: dict[str, Any] = json.loads(text)
    return served


def _shape(found: dict[str, Any]) -> dict[str, Any]:
    return {
        "env": sorted(e for e in found["Config"]["Env"] if e.startswith(("MODE=", "PORT="))),
        "binds": found["HostConfig"]["Binds"],
        "restart": found["HostConfig"]["RestartPolicy"],
        "network": found["HostConfig"]["NetworkMode"],
        "running": found["State"]["Running"],
    }


def _old_container(
    docker: dockerkit.Docker, name: str, image: str, port: int, tmp_path: Path
) -> dict[str, Any]:
    (tmp_path / "data").mkdir(exist_ok=True)
    docker.docker(
        "run", "-d", "--name", name, "--network", "host", "-e", "MODE=prod", "-e", f"PORT={port}",
        "-v", f"{tmp_path / 'data'}:/data:ro", "--restart", "on-failure:3", image,
    )  # fmt: skip
    return _inspect(docker, name)


async def test_pull_from_the_local_registry_recreate_with_the_old_config_and_roll_back(
    docker: dockerkit.Docker, settings: ToolSettings, tmp_path: Path
) -> None:
    pushed = f"{docker.registry_host}/lab/web:2"
    docker.docker("tag", "lab/web:2", pushed)
    docker.docker("push", pushed)
    docker.docker("rmi", pushed)  # only the registry has it now
    before = _old_container(docker, "web-a", "lab/web:1", 8091, tmp_path)
    assert _served(docker, 8091) == {"version": "1", "mode": "prod"}

    ctx, calls = make_ctx(settings)
    step = ContainerStep(name="web-a", image=pushed)  # pull: missing, and it is missing
    record = await container.apply(step, ctx)
    assert any("Pulling from lab/web" in line or "Pull complete" in line for _, line in calls.output), (
        calls.output
    )

    after = _inspect(docker, "web-a")
    assert after["Id"] != before["Id"]
    assert after["Config"]["Image"] == pushed
    assert _shape(after) == _shape(before)
    assert _served(docker, 8091) == {"version": "2", "mode": "prod"}  # new image, old configuration

    await container.undo(step, ctx, record)
    restored = _inspect(docker, "web-a")
    assert restored["Image"] == before["Image"]
    assert restored["Config"]["Image"] == "lab/web:1"
    assert _shape(restored) == _shape(before)
    assert _served(docker, 8091) == {"version": "1", "mode": "prod"}
    docker.docker("rm", "-f", "web-a")


async def test_rollback_to_the_exact_old_image_when_the_tag_moved(
    docker: dockerkit.Docker, settings: ToolSettings, tmp_path: Path
) -> None:
    docker.docker("tag", "lab/web:1", "lab/web:moving")
    before = _old_container(docker, "web-b", "lab/web:moving", 8092, tmp_path)
    pushed = f"{docker.registry_host}/lab/web:moving"
    docker.docker("tag", "lab/web:3", pushed)
    docker.docker("push", pushed)
    ctx, _ = make_ctx(settings)
    step = ContainerStep(name="web-b", image=pushed, pull="always")
    record = await container.apply(step, ctx)
    assert _served(docker, 8092)["version"] == "3"
    docker.docker("tag", "lab/web:2", "lab/web:moving")  # the old tag now names another image
    await container.undo(step, ctx, record)
    restored = _inspect(docker, "web-b")
    assert restored["Image"] == before["Image"]
    assert _served(docker, 8092) == {"version": "1", "mode": "prod"}
    docker.docker("rm", "-f", "web-b")


async def test_pull_policy_with_a_locally_imported_image_and_no_registry(
    docker: dockerkit.Docker, settings: ToolSettings, tmp_path: Path
) -> None:
    # A name no registry serves: "air-gapped/..." would be looked up on Docker Hub by a pull.
    docker.docker("tag", "lab/web:2", "air-gapped/web:2")
    _old_container(docker, "web-c", "lab/web:1", 8093, tmp_path)
    ctx, calls = make_ctx(settings)

    record = await container.apply(ContainerStep(name="web-c", image="air-gapped/web:2"), ctx)
    assert "image air-gapped/web:2 is on the node (pull: missing): not pulled" in calls.logs
    assert _served(docker, 8093)["version"] == "2"
    await container.undo(ContainerStep(name="web-c", image="air-gapped/web:2"), ctx, record)
    assert _served(docker, 8093)["version"] == "1"

    # never: an absent image fails before anything changes
    before = _inspect(docker, "web-c")
    with pytest.raises(
        StepError, match="image air-gapped/web:9 is not on this node and the step says pull: never"
    ):
        await container.apply(ContainerStep(name="web-c", image="air-gapped/web:9", pull="never"), ctx)
    assert _inspect(docker, "web-c")["Id"] == before["Id"]

    # always: the real daemon tries the registry, which this lab's namespace cannot reach
    with pytest.raises(StepError) as failed:
        await container.apply(ContainerStep(name="web-c", image="air-gapped/web:2", pull="always"), ctx)
    print(f"lab: pull: always without a registry: {failed.value.reason}")
    assert "docker pull air-gapped/web:2" in failed.value.reason
    assert _inspect(docker, "web-c")["Id"] == before["Id"]
    assert await DockerManager(settings.tools).is_active("web-c", timeout=30)
    docker.docker("rm", "-f", "web-c")
