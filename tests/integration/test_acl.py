"""The generated ACL and passwords, enforced by the real brokers (DESIGN section 7).

Each test runs once on mosquitto started with the generated mosquitto.conf and
once on the embedded broker started with the generated amqtt.yaml, and talks
to it with bus.mqtt.MqttClient through the generated credentials URLs.

"Never reaches a subscriber" is shown with a marker: the offender sends the
forbidden messages and then, on the same connection, an allowed one. Both
brokers handle one connection's packets in order, so once the marker arrives
any forbidden message that had been let through would have arrived before it.
"""

from __future__ import annotations

import asyncio
import contextlib
import getpass
import signal
import subprocess
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from broker_config.generate import GeneratedConfig, write_broker_config
from bus.broker import BrokerThread, load_config
from bus.errors import BusError, InvalidInput
from bus.messages import MAX_PACKET_BYTES
from bus.mqtt import Message, MqttClient
from bus.topics import Topics
from tests.conftest import free_port, mosquitto_binary, wait_port

pytestmark = pytest.mark.broker

NODES = ("n1", "n2")
DEADLINE_S = 15.0


@dataclass
class Fleet:
    """A running broker with a generated config, and who may connect to it."""

    kind: str
    port: int
    topics: Topics
    config: GeneratedConfig
    reload: Callable[[], None] = field(default=lambda: None)

    def url(self, client: str) -> str:
        return self.config.url(client)


def generate(
    out: Path,
    prefix: str,
    port: int,
    *,
    tls: bool = False,
    nodes: tuple[str, ...] = NODES,
    host: str = "127.0.0.1",
) -> GeneratedConfig:
    """The config under test; mosquitto keeps the current user (root would drop to `mosquitto`)."""
    return write_broker_config(
        out, nodes, host=host, port=port, prefix=prefix, tls=tls, broker_user=getpass.getuser()
    )


@contextlib.contextmanager
def run_broker(kind: str, config: GeneratedConfig) -> Iterator[Callable[[], None]]:
    """Start one broker from the generated files; yield its reload action; stop it."""
    out, port = config.directory, config.settings.port
    if kind == "amqtt":
        thread = BrokerThread(load_config(out / "amqtt.yaml", "127.0.0.1", port))
        thread.start()
        try:
            yield lambda: None  # FleetAclPlugin re-reads changed files by itself
        finally:
            thread.stop()
        return
    binary = mosquitto_binary()
    if binary is None:
        pytest.skip("mosquitto not installed: apt-get install -y mosquitto")
    with (out / "mosquitto.log").open("ab") as log:
        proc = subprocess.Popen([binary, "-c", str(out / "mosquitto.conf")], stdout=log, stderr=log)
    try:
        wait_port(port)
        yield lambda: proc.send_signal(signal.SIGHUP)
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


@pytest.fixture(scope="module", params=["amqtt", "mosquitto"])
def fleet(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    """One locked-down broker per kind for this module (nodes n1, n2; its own prefix)."""
    kind: str = request.param
    topics = Topics(f"fleet-acl-{uuid.uuid4().hex[:8]}/v1")
    port = free_port()
    config = generate(tmp_path_factory.mktemp(f"acl-{kind}"), topics.prefix, port)
    with run_broker(kind, config) as reload:
        yield Fleet(kind, port, topics, config, reload)


# ---------------------------------------------------------------- client helpers


@contextlib.asynccontextmanager
async def connected(url: str, client_id: str | None = None) -> AsyncIterator[MqttClient]:
    async with MqttClient(url, client_id=client_id, connect_timeout=DEADLINE_S) as client:
        yield client


async def collect(
    client: MqttClient, until: Callable[[Message], bool], timeout: float = DEADLINE_S
) -> list[Message]:
    """Every message the client receives up to and including the first ``until`` one."""
    seen: list[Message] = []
    stream = client.messages()

    async def read() -> None:
        async for message in stream:
            seen.append(message)
            if until(message):
                return

    try:
        await asyncio.wait_for(read(), timeout)
    except asyncio.TimeoutError:
        pytest.fail(f"no matching message within {timeout:g} s; got {[m.topic for m in seen]}")
    finally:
        if isinstance(stream, AsyncGenerator):
            await stream.aclose()
    return seen


def marker() -> bytes:
    return f"marker-{uuid.uuid4().hex}".encode()


async def synced(client: MqttClient, topic_filter: str, own_topic: str) -> list[Message]:
    """Subscribe, wait until the subscription is live; what arrived meanwhile (retained ones).

    ``own_topic`` is one the client may publish and read: its message coming back
    shows the broker handled the SUBSCRIBE packets sent before it.
    """
    await client.subscribe(topic_filter)
    covered = own_topic == topic_filter or (
        topic_filter.endswith("/#") and own_topic.startswith(topic_filter[:-1])
    )
    if not covered:  # overlapping subscriptions would deliver some messages twice
        await client.subscribe(own_topic)
    mark = marker()
    await client.publish(own_topic, mark, qos=1)
    return (await collect(client, lambda m: m.payload == mark))[:-1]


async def refused(url: str) -> bool:
    """True when the broker will not let this URL's client connect."""
    try:
        async with MqttClient(url, connect_timeout=2.0):
            return False
    except BusError:
        return True


def with_password(url: str, user: str, password: str) -> str:
    scheme, rest = url.split("://", 1)
    return f"{scheme}://{user}:{password}@{rest.split('@', 1)[1]}"


def password_of(url: str) -> str:
    return url.split("://", 1)[1].split("@", 1)[0].split(":", 1)[1]


# ---------------------------------------------------------------- tests


async def test_only_known_users_with_their_own_password_connect(fleet: Fleet) -> None:
    n1 = fleet.url("n1")
    anonymous = f"mqtt://127.0.0.1:{fleet.port}"
    outcomes = await asyncio.gather(
        refused(anonymous),
        refused(with_password(n1, "n1", "wrong-password-wrong-password")),
        refused(with_password(n1, "n9", password_of(n1))),  # unknown user, a real password
        refused(with_password(n1, "n1", password_of(fleet.url("hub")))),  # another client's password
        refused(n1),
    )
    assert list(outcomes) == [True, True, True, True, False]


async def test_node_publishes_only_on_its_own_channels(fleet: Fleet) -> None:
    t = fleet.topics
    async with connected(fleet.url("tui")) as watcher, connected(fleet.url("n1")) as n1:
        await synced(watcher, f"{t.prefix}/#", t.hub_request)
        forbidden = [
            *(t.node("n2", channel) for channel in ("state", "heartbeat", "status", "job", "log", "cmd")),
            t.node("n1", "cmd"),
            t.rollout("r1"),
            t.hub_reply("someone"),
            t.hub_state,
            t.hub_member("n1"),
            t.rollout_record("r1"),
            t.rollout_record_part("r1", 0),
            t.rollout_nodes("r1"),
            t.events,
            t.hub_request,
        ]
        for topic in forbidden:
            await n1.publish(topic, b"forged", qos=1)
        allowed = [t.node("n1", channel) for channel in ("state", "heartbeat", "status", "job", "log")]
        mark = marker()
        for topic in allowed:
            await n1.publish(topic, mark, qos=1)
        seen = await collect(watcher, lambda m: m.topic == allowed[-1] and m.payload == mark)
    assert [m.topic for m in seen if m.payload in (mark, b"forged")] == allowed


async def test_node_reads_only_its_own_cmd(fleet: Fleet) -> None:
    t = fleet.topics
    async with connected(fleet.url("hub")) as hub:
        await hub.publish(t.node("n2", "cmd"), b"for-n2-retained", qos=1, retain=True, wait=True)
        await hub.publish(t.node("n1", "cmd"), b"for-n1-retained", qos=1, retain=True, wait=True)
        try:
            async with connected(fleet.url("n1")) as n1:
                others = [
                    t.node("n2", "cmd"),
                    t.node_filter("cmd"),
                    f"{t.prefix}/#",
                    t.node_filter("#", node="n2"),
                ]
                refusals = []
                for topic_filter in others:
                    try:
                        await n1.subscribe(topic_filter)
                    except BusError:
                        refusals.append(topic_filter)
                await n1.subscribe(t.node("n1", "cmd"))
                first = await collect(n1, lambda m: m.payload == b"for-n1-retained")
                await hub.publish(t.node("n2", "cmd"), b"for-n2-live", qos=1, retain=True, wait=True)
                await hub.publish(t.node("n1", "cmd"), b"for-n1-live", qos=1, retain=True, wait=True)
                second = await collect(n1, lambda m: m.payload == b"for-n1-live")
        finally:
            for node in NODES:
                await hub.publish(t.node(node, "cmd"), b"", qos=1, retain=True, wait=True)
    received = first + second
    assert {m.topic for m in received} == {t.node("n1", "cmd")}
    # amqtt refuses what the node may not fully read (it replays retained messages
    # unchecked); mosquitto grants any subscription and checks every message.
    assert refusals == (others if fleet.kind == "amqtt" else [])
    assert {m.payload for m in received} <= {b"for-n1-retained", b"for-n1-live"}


async def test_only_the_hub_writes_commands_rollouts_replies_and_events(fleet: Fleet) -> None:
    t = fleet.topics
    hub_only = [
        t.node("n1", "cmd"),
        t.rollout("r1"),
        t.rollout_record("r1"),
        t.rollout_record_part("r1", 0),
        t.rollout_nodes("r1"),
        t.hub_reply("tui-1"),
        t.events,
        t.hub_member("hub-b"),
        t.hub_state,
    ]
    async with connected(fleet.url("hub")) as hub, connected(fleet.url("tui")) as tui:
        await synced(hub, f"{t.prefix}/#", t.events)
        await synced(tui, f"{t.prefix}/#", t.hub_request)
        for topic in [*hub_only, t.node("n1", "state")]:
            await tui.publish(topic, b"forged", qos=1)
        mark = marker()
        await tui.publish(t.hub_request, mark, qos=1)
        by_tui = await collect(hub, lambda m: m.payload == mark)
        from_hub = marker()
        for topic in hub_only:
            await hub.publish(topic, from_hub, qos=1)
        by_hub = await collect(tui, lambda m: m.topic == hub_only[-1] and m.payload == from_hub)
    assert [m.topic for m in by_tui if m.payload in (mark, b"forged")] == [t.hub_request]
    assert [m.topic for m in by_hub if m.payload in (from_hub, b"forged")] == hub_only


async def test_tui_sends_requests_and_reads_the_fleet(fleet: Fleet) -> None:
    t = fleet.topics
    async with connected(fleet.url("hub")) as hub, connected(fleet.url("n2")) as n2:
        await synced(hub, t.hub_request, t.events)
        await n2.publish(t.node("n2", "state"), b"n2-online", qos=1, retain=True, wait=True)
        try:
            async with connected(fleet.url("tui")) as tui:
                # Subscriptions are handled in order: once the retained state arrives,
                # the heartbeat subscription is live too.
                await tui.subscribe(t.node_filter("heartbeat"))
                await tui.subscribe(t.node_filter("state"))
                state = await collect(tui, lambda m: m.topic == t.node("n2", "state"))
                await n2.publish(t.node("n2", "heartbeat"), b"beat", qos=1)
                beat = await collect(tui, lambda m: m.topic == t.node("n2", "heartbeat"))
                request = marker()
                await tui.publish(t.hub_request, request, qos=1)
                got = await collect(hub, lambda m: m.payload == request)
        finally:
            await n2.publish(t.node("n2", "state"), b"", qos=1, retain=True, wait=True)
    assert state[-1].payload == b"n2-online"
    assert beat[-1].payload == b"beat"
    assert got[-1].topic == t.hub_request


def _mqtt_string(data: bytes) -> bytes:
    return len(data).to_bytes(2, "big") + data


def connect_packet(client_id: str, user: str, password: str, will_topic: str, will: bytes) -> bytes:
    """An MQTT 3.1.1 CONNECT with a retained QoS 1 last will."""
    flags = 0x80 | 0x40 | 0x20 | 0x08 | 0x04 | 0x02  # user, password, will retain, will QoS 1, will, clean
    body = _mqtt_string(b"MQTT") + bytes([4, flags]) + (30).to_bytes(2, "big")
    body += b"".join(
        _mqtt_string(p)
        for p in (client_id.encode(), will_topic.encode(), will, user.encode(), password.encode())
    )
    assert len(body) < 128
    return bytes([0x10, len(body)]) + body


async def connect_and_vanish(port: int, user: str, password: str, will_topic: str, will: bytes) -> int | None:
    """CONNECT with a will, then drop the TCP connection without DISCONNECT; the CONNACK code."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(connect_packet(f"{user}~raw-{uuid.uuid4().hex[:8]}", user, password, will_topic, will))
        await writer.drain()
        try:
            connack = await asyncio.wait_for(reader.readexactly(4), DEADLINE_S)
        except asyncio.IncompleteReadError:
            return None  # closed without a CONNACK: refused too
        return connack[3]
    finally:
        writer.transport.abort()  # no DISCONNECT: the broker must treat it as lost
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


async def test_node_cannot_plant_a_last_will_on_another_nodes_topics(fleet: Fleet) -> None:
    t = fleet.topics
    password = password_of(fleet.url("n1"))
    async with connected(fleet.url("hub")) as hub:
        await synced(hub, f"{t.prefix}/#", t.events)
        forged = [
            await connect_and_vanish(fleet.port, "n1", password, t.node("n2", "cmd"), b"forged-cmd"),
            await connect_and_vanish(fleet.port, "n1", password, t.node("n2", "state"), b"forged-state"),
        ]
        own = await connect_and_vanish(fleet.port, "n1", password, t.node("n1", "state"), b"n1-lost")
        seen = await collect(hub, lambda m: m.payload == b"n1-lost")
    async with connected(fleet.url("n1")) as n1:
        await n1.publish(t.node("n1", "state"), b"", qos=1, retain=True, wait=True)
    async with connected(fleet.url("tui")) as tui:
        retained = await synced(tui, t.node_filter("#", node="n2"), t.hub_request)
    assert own == 0
    assert [m.payload for m in seen if m.payload.startswith((b"forged", b"n1-"))] == [b"n1-lost"]
    assert [m.topic for m in retained] == []
    if fleet.kind == "amqtt":
        assert forged == [5, 5]  # FleetAclPlugin refuses the CONNECT: not authorized


async def test_added_node_connects_and_old_credentials_still_work(fleet: Fleet) -> None:
    t = fleet.topics
    before = {client: fleet.url(client) for client in fleet.config.settings.clients}
    added = write_broker_config(fleet.config.directory, ["n3"], add=True)
    fleet.reload()
    assert {client: added.url(client) for client in before} == before
    # mosquitto reloads on SIGHUP in its own time; the embedded broker on the next CONNECT.
    deadline = asyncio.get_running_loop().time() + DEADLINE_S
    while await refused(added.url("n3")):
        assert asyncio.get_running_loop().time() < deadline, "n3 still refused after --add"
        await asyncio.sleep(0.1)
    async with connected(fleet.url("tui")) as tui, connected(added.url("n3")) as n3:
        await synced(tui, t.node_filter("#", node="n3"), t.hub_request)
        await n3.publish(t.node("n1", "heartbeat"), b"n3-as-n1", qos=1)
        await n3.publish(t.node("n3", "heartbeat"), b"n3-here", qos=1)
        await n3.publish(t.node("n3", "log"), b"n3-done", qos=1)
        seen = await collect(tui, lambda m: m.payload == b"n3-done")
        async with connected(before["n1"]):
            pass
    assert [m.payload for m in seen] == [b"n3-here", b"n3-done"]


async def test_refused_client_cannot_disturb_a_session_by_reusing_its_client_id(
    fleet: Fleet, request: pytest.FixtureRequest
) -> None:
    t = fleet.topics
    hub_url = fleet.url("hub")
    async with connected(hub_url, client_id="fleet-hub-acl") as hub, connected(fleet.url("tui")) as tui:
        await synced(hub, t.hub_request, t.events)
        intruders = [f"mqtt://127.0.0.1:{fleet.port}", with_password(hub_url, "hub", "not-the-password")]
        for url in intruders:
            with pytest.raises(BusError):
                async with MqttClient(url, client_id="fleet-hub-acl", connect_timeout=DEADLINE_S):
                    pass
        request_mark = marker()
        await tui.publish(t.hub_request, request_mark, qos=1)
        # (a shorter wait: on amqtt this is the expected failure, on loopback 5 s is plenty)
        seen = await collect(hub, lambda m: m.payload == request_mark, timeout=5.0)
    assert seen[-1].topic == t.hub_request


# ---------------------------------------------------------------- client ids belong to users (issue 16)


def plain_connect_packet(client_id: str, user: str, password: str, clean: bool = True) -> bytes:
    """An MQTT 3.1.1 CONNECT without a will."""
    flags = 0x80 | 0x40 | (0x02 if clean else 0)
    body = _mqtt_string(b"MQTT") + bytes([4, flags]) + (30).to_bytes(2, "big")
    body += b"".join(_mqtt_string(p.encode()) for p in (client_id, user, password))
    assert len(body) < 128
    return bytes([0x10, len(body)]) + body


async def connect_raw(port: int, client_id: str, user: str, password: str, clean: bool = True) -> int | None:
    """CONNECT with another client's id, hold the connection a moment, leave; the CONNACK code."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(plain_connect_packet(client_id, user, password, clean))
        await writer.drain()
        try:
            connack = await asyncio.wait_for(reader.readexactly(4), DEADLINE_S)
        except asyncio.IncompleteReadError:
            return None
        if connack[3] == 0:
            await asyncio.sleep(0.5)  # the half second that rolled back a rollout
        return connack[3]
    finally:
        writer.transport.abort()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


async def test_a_node_cannot_take_over_or_squat_another_clients_id(fleet: Fleet) -> None:
    """n1's password connecting as n2's agent or as the hub: refused (embedded broker) or
    renamed to n1 (mosquitto's use_username_as_clientid); either way the real clients stay."""
    t = fleet.topics
    n1_password = password_of(fleet.url("n1"))
    async with (
        connected(fleet.url("hub"), client_id="fleet-hub") as hub,
        connected(fleet.url("n2"), client_id="agent-n2") as n2,
    ):
        assert (hub.client_id, n2.client_id) == ("hub~fleet-hub", "n2~agent-n2")
        await synced(hub, f"{t.prefix}/#", t.events)
        stolen = [hub.client_id, n2.client_id, "hub", "n2", "agent-n2", "fleet-hub"]
        codes = [await connect_raw(fleet.port, cid, "n1", n1_password) for cid in stolen]
        # A persistent session under the hub's id while the hub is away must not lock it out.
        squat = await connect_raw(fleet.port, "hub~fleet-hub-2", "n1", n1_password, clean=False)
        mark = marker()
        await n2.publish(t.node("n2", "heartbeat"), mark, qos=1)
        await collect(hub, lambda m: m.payload == mark)
        assert hub.is_connected
        assert n2.is_connected
        assert (hub.stats.reconnects, n2.stats.reconnects) == (0, 0), "a real client was disconnected"
    async with connected(fleet.url("hub"), client_id="fleet-hub-2") as hub2:
        await synced(hub2, t.events, t.events)
    if fleet.kind == "amqtt":
        assert codes == [5] * len(stolen)  # not authorized: the id is not n1's
        assert squat == 5
    else:
        assert codes == [0] * len(stolen)  # accepted, but as client "n1": nobody else is touched


# ---------------------------------------------------------------- run as root (issue 16)


def test_broker_config_as_root_gives_mosquitto_its_files_and_mosquitto_starts(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`fleet broker-config` as root without --broker-user, then the printed `mosquitto -c`:
    mosquitto drops to its own user before it reads the mode-600 password file; the files
    are handed to that user, so it starts and the credentials work."""
    import os
    import pwd
    import shutil
    import tempfile

    from cli import main as cli_main

    if os.geteuid() != 0:
        pytest.skip("needs root: what is tested is what happens when broker-config runs as root")
    try:
        account = pwd.getpwnam("mosquitto")
    except KeyError:
        pytest.skip("no mosquitto user on this machine")
    binary = mosquitto_binary()
    if binary is None:
        pytest.skip("mosquitto not installed: apt-get install -y mosquitto")
    base = Path(tempfile.mkdtemp(prefix="fleet-root-", dir="/tmp"))  # pytest's own tmp is mode 700
    try:
        base.chmod(0o755)
        out = base / "broker"
        port = free_port()
        code = cli_main.main(["broker-config", "--out", str(out), "--nodes", "n1", "--port", str(port)])
        printed = capsys.readouterr()
        assert code == 0
        assert "owner      mosquitto" in printed.out
        assert "before `mosquitto -c`" not in printed.err
        assert (out / "passwords").stat().st_uid == account.pw_uid
        assert (out / "passwords").stat().st_mode & 0o777 == 0o600
        assert (out / "credentials" / "n1.url").stat().st_uid == 0  # the clients' secrets stay root's
        config = GeneratedConfig(out, write_broker_config(out, [], add=True).settings,
                                 {"n1": out / "credentials" / "n1.url"}, ())  # fmt: skip
        cli_main.main(["broker-config", "--out", str(out), "--nodes", "n1", "--add"])  # again, as an update
        assert (out / "passwords").stat().st_uid == account.pw_uid
        with (out / "mosquitto.log").open("ab") as log:
            proc = subprocess.Popen([binary, "-c", str(out / "mosquitto.conf")], stdout=log, stderr=log)
        try:
            wait_port(port)

            async def connect() -> bool:
                return not await refused(config.url("n1"))

            assert asyncio.run(connect()), (out / "mosquitto.log").read_text()
        finally:
            proc.terminate()
            proc.wait(10)
    finally:
        shutil.rmtree(base, ignore_errors=True)


def test_broker_config_as_root_says_what_to_do_when_mosquitto_cannot_reach_the_files(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import os

    from cli import main as cli_main

    if os.geteuid() != 0:
        pytest.skip("needs root")
    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    private.chmod(0o700)
    assert cli_main.main(["broker-config", "--out", str(private / "b"), "--nodes", "n1"]) == 0
    err = capsys.readouterr().err
    assert "before `mosquitto -c`" in err
    assert "cannot reach" in err or "does not exist" in err


async def test_tools_with_their_own_credentials_run_side_by_side(fleet: Fleet) -> None:
    """`--tools ops`: a second tool user with the TUI's rights. On mosquitto each client's id is
    its user name, so the TUI and another tool at once need one credential each."""
    t = fleet.topics
    added = write_broker_config(fleet.config.directory, [], tools=["ops"], add=True)
    fleet.reload()
    assert added.settings.tools == ("ops",)
    deadline = asyncio.get_running_loop().time() + DEADLINE_S
    while await refused(added.url("ops")):
        assert asyncio.get_running_loop().time() < deadline, "ops still refused after --add"
        await asyncio.sleep(0.1)
    async with connected(fleet.url("tui")) as tui, connected(added.url("ops")) as ops:
        for client in (tui, ops):
            await synced(client, f"{t.prefix}/#", t.hub_request)
        for client in (tui, ops):
            await synced(client, f"{t.prefix}/#", t.hub_request)
        assert (tui.stats.reconnects, ops.stats.reconnects) == (0, 0)
        await ops.publish(t.node("n1", "cmd"), b"ops-may-not", qos=1)  # the TUI's rights, no more
        mark = marker()
        await ops.publish(t.hub_request, mark, qos=1)
        seen = await collect(tui, lambda m: m.payload == mark)
    assert b"ops-may-not" not in [m.payload for m in seen]
    with pytest.raises(InvalidInput, match="node or a tool"):
        write_broker_config(fleet.config.directory, ["ops"], add=True)


async def test_a_publish_over_the_packet_limit_is_dropped_on_both_brokers(fleet: Fleet) -> None:
    """Issue 16: a node announcing a 100 MB publish is disconnected before the body is read
    (generated mosquitto.conf: max_packet_size; embedded: bus.broker); the hub stays."""
    t = fleet.topics
    async with connected(fleet.url("hub"), client_id="fleet-hub-big") as hub:
        await synced(hub, f"{t.prefix}/#", t.events)
        reader, writer = await asyncio.open_connection("127.0.0.1", fleet.port)
        try:
            writer.write(plain_connect_packet("n1~big", "n1", password_of(fleet.url("n1"))))
            await writer.drain()
            assert (await asyncio.wait_for(reader.readexactly(4), DEADLINE_S))[3] == 0
            topic = t.node("n1", "log").encode()
            size, length = 100 * 1024 * 1024, bytearray()
            left = size
            while True:
                byte, left = left % 128, left // 128
                length.append(byte | (0x80 if left else 0))
                if not left:
                    break
            try:
                writer.write(bytes([0x30]) + bytes(length) + len(topic).to_bytes(2, "big") + topic)
                writer.write(b"x" * 65536)
                await writer.drain()
                rest = await asyncio.wait_for(reader.read(), DEADLINE_S)
            except ConnectionResetError:
                rest = b""  # closed while we were still sending: refused all the same
            assert rest == b"", "the broker kept reading"
        finally:
            writer.transport.abort()
        mark = marker()
        async with connected(fleet.url("n1")) as n1:
            await n1.publish(t.node("n1", "log"), mark, qos=1)
            await collect(hub, lambda m: m.payload == mark)
        assert hub.stats.reconnects == 0
    assert f"max_packet_size {MAX_PACKET_BYTES}" in (fleet.config.directory / "mosquitto.conf").read_text()
