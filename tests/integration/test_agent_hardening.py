"""Issue 16 on the agent: attacks through signed commands the hub was tricked into sending, or
replayed from a capture, each refused with a clear reason and nothing changed.

Real CommandRunner, real scripts and files, a real local web server for downloads.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from bus.messages import DownloadStep, FileStep, ScriptStep, encode
from bus.topics import Topics
from edge_agent.runner import CommandRunner
from edge_agent.settings import ExecutorSettings, Policy
from tests.integration.conftest import (
    FIXTURES,
    NODE,
    Recorder,
    cmd_topic,
    command,
    make_settings,
    run_command,
)
from tests.webfiles import Web

EVIL = b'#!/bin/sh\necho owned > "$FLEET_STATE_DIR/owned"\n'


def old_layout(tmp_path: Path, key: Ed25519PrivateKey, **extra: Any) -> ExecutorSettings:
    """The layout the review attacked: the scripts dir inside the state dir (the old default)."""
    scripts = tmp_path / "state" / "scripts"
    scripts.mkdir(parents=True)
    shutil.copy(FIXTURES / "record.sh", scripts / "record.sh")
    (scripts / "record.sh").chmod(0o755)
    return make_settings(tmp_path, scripts, key, **extra)


@pytest.mark.parametrize(
    ("policy", "dest"),
    [
        (Policy(), "scripts/record.sh"),  # relative to the state dir, no policy paths
        (Policy(paths=["/**", "*"]), "scripts/record.sh"),  # a policy allowing every path
        (Policy(paths=["/**", "*"]), "ABSOLUTE"),  # the same file named absolutely
        (Policy(), "link/record.sh"),  # through a symlink in the state dir
    ],
)
async def test_a_file_step_never_replaces_a_script(
    tmp_path: Path,
    key: Ed25519PrivateKey,
    web: Web,
    recorder: Recorder,
    topics: Topics,
    policy: Policy,
    dest: str,
) -> None:
    settings = old_layout(tmp_path, key, policy=policy)
    (settings.state_dir / "link").symlink_to(settings.scripts_dir)
    before = (settings.scripts_dir / "record.sh").read_bytes()
    target = str(settings.scripts_dir / "record.sh") if dest == "ABSOLUTE" else dest
    url = web.add("/evil.sh", EVIL)
    runner = CommandRunner(settings, topics, recorder.publish)
    try:
        final = await run_command(
            runner,
            recorder,
            topics,
            command(
                key,
                [
                    DownloadStep(url=url, sha256=hashlib.sha256(EVIL).hexdigest(), name="evil.sh"),
                    FileStep(src="evil.sh", dest=target, mode="0755"),
                    ScriptStep(name="record.sh"),
                ],
            ),
        )
    finally:
        await runner.close()
    assert final.phase == "rejected"
    assert "scripts directory, which steps never write" in final.detail, final.detail
    assert (settings.scripts_dir / "record.sh").read_bytes() == before
    assert not (settings.state_dir / "owned").exists()
    assert not (settings.state_dir / "cache" / "evil.sh").exists()  # nothing ran at all


async def test_a_download_never_lands_in_the_scripts_directory(
    tmp_path: Path, key: Ed25519PrivateKey, web: Web, recorder: Recorder, topics: Topics
) -> None:
    """A node configured with its scripts dir as the download cache: downloads are refused."""
    state = tmp_path / "state"
    scripts = state / "cache"
    scripts.mkdir(parents=True)
    shutil.copy(FIXTURES / "record.sh", scripts / "record.sh")
    settings = make_settings(tmp_path, scripts, key)
    url = web.add("/record.sh", EVIL)
    runner = CommandRunner(settings, topics, recorder.publish)
    try:
        final = await run_command(
            runner,
            recorder,
            topics,
            command(key, [DownloadStep(url=url, sha256=hashlib.sha256(EVIL).hexdigest(), name="record.sh")]),
        )
    finally:
        await runner.close()
    assert final.phase == "rejected"
    assert "scripts directory" in final.detail
    assert (scripts / "record.sh").read_bytes() == (FIXTURES / "record.sh").read_bytes()


async def test_the_download_cache_is_private(
    tmp_path: Path, key: Ed25519PrivateKey, web: Web, recorder: Recorder, topics: Topics
) -> None:
    """A secret installed with mode 600 must not stay world-readable in the cache."""
    scripts = tmp_path / "scripts"
    scripts.mkdir()
    settings = make_settings(tmp_path, scripts, key)
    settings.cache_dir.mkdir(parents=True, mode=0o755)  # an older agent's cache
    os.chmod(settings.cache_dir, 0o755)  # noqa: S103 - the world-readable cache under test
    secret = b"api-key=hunter2\n"
    url = web.add("/secret", secret)
    runner = CommandRunner(settings, topics, recorder.publish)
    try:
        final = await run_command(
            runner,
            recorder,
            topics,
            command(
                key,
                [
                    DownloadStep(url=url, sha256=hashlib.sha256(secret).hexdigest(), name="secret"),
                    FileStep(src="secret", dest="secret.conf", mode="0600"),
                ],
            ),
        )
    finally:
        await runner.close()
    assert final.phase == "succeeded", recorder.summary()
    assert (settings.state_dir / "secret.conf").stat().st_mode & 0o777 == 0o600
    assert settings.cache_dir.stat().st_mode & 0o777 == 0o700


async def test_a_reset_journal_does_not_run_a_captured_command_again(
    tmp_path: Path, key: Ed25519PrivateKey, recorder: Recorder, topics: Topics
) -> None:
    """The command ran; the journal is lost (deleted, or moved aside as corrupt); the captured
    command, still unexpired, is delivered again: refused, nothing runs a second time."""
    scripts = tmp_path / "scripts"
    scripts.mkdir()
    shutil.copy(FIXTURES / "record.sh", scripts / "record.sh")
    settings = make_settings(tmp_path, scripts, key)
    cmd = command(key, [ScriptStep(name="record.sh", args=["once"])])
    runner = CommandRunner(settings, topics, recorder.publish)
    try:
        assert (await run_command(runner, recorder, topics, cmd)).phase == "succeeded"
    finally:
        await runner.close()
    settings.journal_path.unlink()
    replayed = Recorder()
    again = CommandRunner(settings, topics, replayed.publish)
    try:
        await again.handle_command(cmd_topic(topics), encode(cmd))
        final = await replayed.final_of(cmd.id)
    finally:
        await again.close()
    assert final.phase == "rejected"
    assert "not later than the last command run" in final.detail
    assert (settings.state_dir / "record.log").read_text().splitlines() == ["apply record.sh once"]
    assert settings.replay_floor_path.stat().st_mode & 0o777 == 0o600
    assert NODE in cmd_topic(topics)


async def test_the_download_preflight_applies_the_host_policy_to_redirects(
    tmp_path: Path, key: Ed25519PrivateKey, web: Web
) -> None:
    """The dry run said "looks good" for a URL that redirects to a forbidden host; the real
    download then failed. Both refuse now, naming the redirect."""
    from edge_agent.preflight import run_preflight

    body = b"payload"
    web.add("/file", body)
    web.redirects["/moved"] = web.url("/file", host="localhost")
    scripts = tmp_path / "scripts"
    scripts.mkdir()
    settings = make_settings(tmp_path, scripts, key, policy=Policy(download_hosts=["127.0.0.1"]))
    step = DownloadStep(url=web.url("/moved"), sha256=hashlib.sha256(body).hexdigest(), name="file")
    checks = await run_preflight([step], settings)
    assert checks[0].state == "failed", checks
    assert "redirected to http://localhost" in checks[0].detail
    assert "policy does not allow" in checks[0].detail
    assert "/file" not in web.hits  # the forbidden host was never asked
    direct = DownloadStep(url=web.url("/file"), sha256=hashlib.sha256(body).hexdigest(), name="file")
    assert (await run_preflight([direct], settings))[0].state == "succeeded"
    forbidden = DownloadStep(url=web.url("/file", host="localhost"), sha256="0" * 64, name="file")
    denied = (await run_preflight([forbidden], settings))[0]
    assert denied.state == "failed"
    assert "not allowed by this node's policy" in denied.detail
