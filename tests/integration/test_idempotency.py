"""Idempotent triggers: the same idempotency key returns the same rollout, over MQTT, HTTP and the CLI.

Real broker, real hub service (manager, store), real agents running real scripts:
the proof that nothing started twice is on the nodes themselves (``record.log``).
"""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path
from typing import Any

import pytest

from bus.topics import Topics
from tests.conftest import RunningBroker
from tests.integration.live_fleet import RECORD_PLAN, LiveFleet, until

pytestmark = pytest.mark.broker


def spec(key: str | None = None, **changes: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"name": "app 2.0", "targets": ["n1", "n2"], "plan": RECORD_PLAN, **changes}
    if key is not None:
        body["idempotency_key"] = key
    return body


async def test_the_same_key_returns_the_same_rollout_and_runs_it_once(
    broker: RunningBroker, topics: Topics, tmp_path: Path
) -> None:
    async with LiveFleet(broker, topics, tmp_path) as fleet:
        n1, n2 = await fleet.agent("n1"), await fleet.agent("n2")
        first = await fleet.ask("create_rollout", spec("deploy-42"))
        assert "existing" not in first
        again = await fleet.ask("create_rollout", spec("deploy-42"))
        assert again == {"rollout": first["rollout"], "existing": True}
        await fleet.wait_state(first["rollout"], "succeeded")
        # After it finished, the key still names it (a retry hours later starts nothing).
        late = await fleet.ask("create_rollout", spec("deploy-42"))
        assert late == {"rollout": first["rollout"], "existing": True}
        rollouts = await fleet.ask("list")
        assert [r["id"] for r in rollouts] == [first["rollout"]]
        assert n1.records() == ["apply record.sh 2.0"]
        assert n2.records() == ["apply record.sh 2.0"]
        # The same key for another spec is refused, naming the rollout it belongs to.
        reply = await fleet.call("create_rollout", spec("deploy-42", name="app 3.0"))
        assert not reply.ok
        assert reply.body["kind"] == "conflict"
        assert first["rollout"] in (reply.error or "")
        # Without a key, or with another key, a new rollout starts as before.
        other = await fleet.ask("create_rollout", spec("deploy-43"))
        assert other["rollout"] != first["rollout"]
        await fleet.wait_state(other["rollout"], "succeeded")
        assert n1.records() == ["apply record.sh 2.0"] * 2


async def test_concurrent_requests_with_one_key_start_one_rollout(
    broker: RunningBroker, topics: Topics, tmp_path: Path
) -> None:
    async with LiveFleet(broker, topics, tmp_path) as fleet:
        n1, _n2 = await fleet.agent("n1"), await fleet.agent("n2")
        replies = await asyncio.gather(*(fleet.ask("create_rollout", spec("burst")) for _ in range(5)))
        ids = {reply["rollout"] for reply in replies}
        assert len(ids) == 1
        assert sum(1 for reply in replies if reply.get("existing")) == 4
        await fleet.wait_state(ids.pop(), "succeeded")
        assert n1.records() == ["apply record.sh 2.0"]


async def test_a_refused_create_does_not_use_up_the_key(
    broker: RunningBroker, topics: Topics, tmp_path: Path
) -> None:
    async with LiveFleet(broker, topics, tmp_path) as fleet:
        await fleet.agent("n1")
        reply = await fleet.call("create_rollout", spec("retry-me"))  # n2 is unknown yet
        assert not reply.ok
        assert reply.body["nodes"] == ["n2"]
        await fleet.agent("n2")
        created = await fleet.ask("create_rollout", spec("retry-me"))
        assert "existing" not in created
        await fleet.wait_state(created["rollout"], "succeeded")


async def test_keys_survive_a_hub_restart(broker: RunningBroker, topics: Topics, tmp_path: Path) -> None:
    async with LiveFleet(broker, topics, tmp_path) as fleet:
        n1 = await fleet.agent("n1")
        await fleet.agent("n2")
        first = await fleet.ask("create_rollout", spec("nightly-7"))
        await fleet.wait_state(first["rollout"], "succeeded")
        await fleet.restart_hub()
        again = await fleet.ask("create_rollout", spec("nightly-7"))
        assert again == {"rollout": first["rollout"], "existing": True}
        assert n1.records() == ["apply record.sh 2.0"]


async def test_http_idempotency_key_header(broker: RunningBroker, topics: Topics, tmp_path: Path) -> None:
    async with LiveFleet(broker, topics, tmp_path) as fleet:
        n1 = await fleet.agent("n1")
        await fleet.agent("n2")
        async with fleet.http() as http:
            headers = {"Idempotency-Key": "ci-run-1001"}
            first = await http.post("/api/updates", json=spec(), headers=headers)
            assert first.status_code == 202, first.text
            assert first.json() == {"rollout": first.json()["rollout"]}
            again = await http.post("/api/updates", json=spec(), headers=headers)
            assert again.status_code == 202
            assert again.json() == {"rollout": first.json()["rollout"], "existing": True}
            # The header and the body's key are the same thing.
            body_key = await http.post("/api/updates", json=spec("ci-run-1001"))
            assert body_key.json() == {"rollout": first.json()["rollout"], "existing": True}
            # ... so they must not disagree.
            clash = await http.post("/api/updates", json=spec("ci-run-2"), headers=headers)
            assert clash.status_code == 422
            assert "Idempotency-Key" in clash.json()["detail"]
            changed = await http.post("/api/updates", json=spec(name="other"), headers=headers)
            assert changed.status_code == 409
            bad = await http.post("/api/updates", json=spec(), headers={"Idempotency-Key": "has space"})
            assert bad.status_code == 422
            assert "idempotency_key" in bad.json()["detail"]
        await fleet.wait_state(first.json()["rollout"], "succeeded")
        assert n1.records() == ["apply record.sh 2.0"]


async def test_cli_idempotency_key(broker: RunningBroker, topics: Topics, tmp_path: Path) -> None:
    async with LiveFleet(broker, topics, tmp_path) as fleet:
        n1 = await fleet.agent("n1")
        await fleet.agent("n2")
        path = tmp_path / "rollout.json"
        path.write_text(json.dumps(spec()))
        argv = [
            "rollout",
            "--broker",
            broker.url,
            "--prefix",
            topics.prefix,
            "create",
            str(path),
            "--idempotency-key",
            "release-9",
        ]
        outputs = []
        for _ in range(2):
            proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "cli.main",
                *argv,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
            )
            out, err = await asyncio.wait_for(proc.communicate(), 60)
            assert proc.returncode == 0, err.decode()
            outputs.append((out.decode().strip(), err.decode()))
        assert outputs[0][0] == outputs[1][0]
        assert "idempotency key" not in outputs[0][1]
        assert "started earlier with this idempotency key" in outputs[1][1]
        await fleet.wait_state(outputs[0][0], "succeeded")
        await until(lambda: n1.records() == ["apply record.sh 2.0"], "one apply on n1")
