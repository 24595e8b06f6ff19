"""bus.mqtt.MqttClient against real brokers (both kinds unless a feature is mosquitto's)."""

from __future__ import annotations

import asyncio
import datetime as dt
import getpass
import ipaddress
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from bus.broker import BrokerThread, load_config
from bus.errors import BusError, ConfigError
from bus.mqtt import Message, MqttClient, Will, parse_broker_url
from bus.topics import Topics
from tests.conftest import RestartableBroker, RunningBroker, free_port, mosquitto_binary, wait_port

pytestmark = pytest.mark.broker


# --------------------------------------------------------------------------- helpers


async def next_message(client: MqttClient, timeout: float = 10.0, *, retained: bool | None = None) -> Message:
    """The next message (optionally only retained or only live ones) within ``timeout``."""

    async def first() -> Message:
        async for message in client.messages():
            if retained is None or message.retain == retained:
                return message
        raise AssertionError("client closed")

    return await asyncio.wait_for(first(), timeout)


async def wait_until(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        await asyncio.sleep(0.02)


def has_nodelay(client: MqttClient) -> bool:
    sock = client._paho.socket()
    assert isinstance(sock, socket.socket)
    return sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0


def start_custom_mosquitto(directory: Path, port: int, lines: list[str]) -> subprocess.Popen[bytes]:
    binary = mosquitto_binary()
    if binary is None:
        pytest.skip("mosquitto not installed: apt-get install -y mosquitto")
    conf = directory / "mosquitto.conf"
    # user root: mosquitto started as root otherwise drops to 'mosquitto', which
    # cannot read pytest's private tmp directories.
    conf.write_text("\n".join([f"listener {port} 127.0.0.1", "user root", *lines]) + "\n")
    with (directory / "mosquitto.log").open("ab") as log:
        proc = subprocess.Popen([binary, "-c", str(conf)], stdout=log, stderr=log)
    try:
        wait_port(port)
    except TimeoutError:
        proc.kill()
        proc.wait()
        raise
    return proc


def stop_process(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)


# ------------------------------------------------------------------ publish/subscribe


async def test_publish_and_subscribe_qos0_and_qos1(broker: RunningBroker, topics: Topics) -> None:
    topic = topics.node("n1", "status")
    async with MqttClient(broker.url) as subscriber, MqttClient(broker.url) as publisher:
        await subscriber.subscribe(topics.node_filter("status"), qos=1)
        await publisher.publish(topic, b"at-least-once", qos=1, wait=True)
        at_least_once = await next_message(subscriber)
        await publisher.publish(topic, "at-most-once", qos=0)
        at_most_once = await next_message(subscriber)

    assert (at_least_once.topic, at_least_once.payload, at_least_once.qos) == (topic, b"at-least-once", 1)
    assert not at_least_once.retain
    assert (at_most_once.topic, at_most_once.payload) == (topic, b"at-most-once")
    assert at_most_once.qos <= 1  # amqtt says 1 (FINDINGS defect 4), mosquitto 0


async def test_a_full_queue_drops_the_incoming_qos0_message_not_a_buffered_one(
    broker: RunningBroker, topics: Topics
) -> None:
    dropped, kept = topics.node("n1", "heartbeat"), topics.node("n1", "status")
    async with MqttClient(broker.url, queue_limit=2) as subscriber, MqttClient(broker.url) as publisher:
        await subscriber.subscribe(dropped, qos=0)
        await subscriber.subscribe(kept, qos=1)
        for payload in (b"first", b"second", b"third"):
            await publisher.publish(dropped, payload, qos=0)
        await wait_until(lambda: subscriber.stats.received == 3, 10, "three QoS 0 messages")
        await publisher.publish(kept, b"at-least-once", qos=1, wait=True)
        await wait_until(lambda: subscriber.stats.received == 4, 10, "the QoS 1 message")
        got = [(await next_message(subscriber)).payload for _ in range(3)]
    assert subscriber.stats.dropped == 1
    assert got == [b"first", b"second", b"at-least-once"]  # the oldest kept, the newest QoS 0 dropped


async def test_qos1_acknowledgements_take_the_light_path(
    broker: RunningBroker, topics: Topics, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A 3.1.1 PUBACK is settled without paho's MQTT 5 decoding (bus.mqtt._Paho).
    import paho.mqtt.client as paho

    slow: list[str] = []
    original = paho.Client._handle_pubackcomp

    def counted(self: paho.Client, cmd: Any) -> Any:
        slow.append(cmd)
        return original(self, cmd)

    monkeypatch.setattr(paho.Client, "_handle_pubackcomp", counted)
    async with MqttClient(broker.url, client_id=f"{topics.prefix}-acks") as client:
        for index in range(20):
            await client.publish(topics.node("n1", "status"), b"%d" % index, qos=1, wait=True)
        assert client.stats.sent >= 20
    assert slow == []


async def test_a_burst_of_every_size_arrives_whole_and_in_order_on_the_light_path(
    broker: RunningBroker, topics: Topics, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Read 64 KiB at a time, many packets per wake-up, a PUBLISH without paho's MQTTMessage
    (bus.mqtt._Paho): packets cut at every buffer boundary come out whole, in order."""
    import paho.mqtt.client as paho

    slow: list[int] = []
    original = paho.Client._handle_publish

    def counted(self: paho.Client) -> Any:
        slow.append(1)
        return original(self)

    monkeypatch.setattr(paho.Client, "_handle_publish", counted)
    sizes = [0, 1, 100, 70_000, 5, 200_000, 3, 65_536, 2]
    sent = [(index, bytes([index % 251]) * sizes[index % len(sizes)]) for index in range(120)]
    async with MqttClient(broker.url) as subscriber, MqttClient(broker.url) as publisher:
        await subscriber.subscribe(topics.node_filter("job"), qos=1)
        for index, payload in sent:
            await publisher.publish(topics.node(f"n{index}", "job"), payload, qos=1)
        got = [await next_message(subscriber) for _ in sent]
        await publisher.publish(topics.node("n-last", "job"), b"last", qos=0)
        last = await next_message(subscriber)
    assert [(m.topic, m.payload, m.qos, m.retain) for m in got] == [
        (topics.node(f"n{index}", "job"), payload, 1, False) for index, payload in sent
    ]
    assert (last.topic, last.payload) == (topics.node("n-last", "job"), b"last")
    assert slow == []


async def test_retained_message_reaches_late_subscriber_until_cleared(
    broker: RunningBroker, topics: Topics
) -> None:
    topic = topics.node("n1", "cmd")
    async with MqttClient(broker.url) as hub:
        await hub.publish(topic, b"command-1", qos=1, retain=True, wait=True)
        async with MqttClient(broker.url) as node:
            await node.subscribe(topic, qos=1)
            first = await next_message(node)
        await hub.publish(topic, b"", qos=1, retain=True, wait=True)  # DESIGN 3.2: cleared
        async with MqttClient(broker.url) as late, MqttClient(broker.url) as probe:
            await late.subscribe(topic, qos=1)
            await probe.publish(topic, b"live", qos=1, wait=True)
            after_clear = await next_message(late)

    assert (first.payload, first.retain) == (b"command-1", True)
    assert (after_clear.payload, after_clear.retain) == (b"live", False)


async def test_subscribe_returns_once_the_broker_routes(broker: RunningBroker, topics: Topics) -> None:
    """No sleep between subscribe and publish: subscribe waits for the SUBACK."""
    async with MqttClient(broker.url) as subscriber, MqttClient(broker.url) as publisher:
        for i in range(20):
            topic = topics.node(f"n{i}", "log")
            await subscriber.subscribe(topic, qos=1)
            await publisher.publish(topic, str(i), qos=1)
            assert (await next_message(subscriber)).payload == str(i).encode()
            await subscriber.unsubscribe(topic)


async def test_refused_subscription_raises_and_is_retried(tmp_path: Path, topics: Topics) -> None:
    config = load_config(None, "127.0.0.1", free_port())
    config["plugins"] = {
        "amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True},
        "amqtt.plugins.topic_checking.TopicTabooPlugin": {},
    }
    thread = BrokerThread(config)
    thread.start()
    try:
        url = f"mqtt://{config['listeners']['default']['bind']}"
        async with MqttClient(url) as client:
            with pytest.raises(BusError, match="refused subscription to prohibited"):
                await client.subscribe("prohibited", qos=1)
            await client.subscribe(topics.events, qos=1)  # the connection is still fine
            # Never dropped for good: missing, and asked again with backoff (a cluster may grant it later).
            assert client.missing_subscriptions == ("prohibited",)
            deadline = asyncio.get_running_loop().time() + 10
            while client._refusals.get("prohibited", 0) < 2:
                assert asyncio.get_running_loop().time() < deadline, (
                    "the refused subscription was not retried"
                )
                await asyncio.sleep(0.05)
            await client.unsubscribe("prohibited")  # forgotten on request only
            assert list(client.missing_subscriptions) == []
            assert not client._retries
    finally:
        thread.stop()


# ----------------------------------------------------------------------- last will


CHILD = """
import asyncio, sys
from bus.mqtt import MqttClient, Will

async def main() -> None:
    url, topic = sys.argv[1], sys.argv[2]
    client = MqttClient(url, keepalive=60, will=lambda: Will(topic, b"lost", qos=1, retain=True))
    await client.start()
    await client.publish(topic, b"online", qos=1, retain=True, wait=True)
    print("ready", flush=True)
    await asyncio.sleep(3600)

asyncio.run(main())
"""


async def test_will_fires_when_the_process_is_killed(broker: RunningBroker, topics: Topics) -> None:
    topic = topics.node("victim", "state")
    async with MqttClient(broker.url) as watcher:
        await watcher.subscribe(topic, qos=1)
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-c", CHILD, broker.url, topic, stdout=asyncio.subprocess.PIPE
        )
        try:
            assert proc.stdout is not None
            line = await asyncio.wait_for(proc.stdout.readline(), 30)
            assert line == b"ready\n"
            birth = await next_message(watcher)
            proc.kill()  # SIGKILL: no DISCONNECT, the kernel closes the socket
            killed_at = time.monotonic()
            will = await next_message(watcher, 10)
            latency = time.monotonic() - killed_at
        finally:
            if proc.returncode is None:
                proc.kill()
            await proc.wait()

    assert birth.payload == b"online"
    assert (will.topic, will.payload) == (topic, b"lost")
    assert latency < 5  # generous: ~ms on loopback (FINDINGS), keepalive is 60 s


async def test_will_is_built_fresh_for_every_connect(broker: RunningBroker, topics: Topics) -> None:
    topic = topics.node("n1", "state")
    calls: list[int] = []

    def will() -> Will:
        calls.append(len(calls) + 1)
        return Will(topic, f"session-{len(calls)}".encode(), qos=1, retain=False)

    async with MqttClient(broker.url) as watcher:
        await watcher.subscribe(topic, qos=1)
        client = MqttClient(broker.url, will=will, backoff=(0.05, 0.5))
        async with client:
            client.abort()  # as a crash would: the broker publishes the will of session 1
            first = await next_message(watcher)
            await wait_until(lambda: client.is_connected and client.stats.reconnects == 1, 15, "reconnect")
            client.abort()
            second = await next_message(watcher)
            await wait_until(lambda: client.is_connected and client.stats.reconnects == 2, 15, "reconnect")
        # a clean close publishes no will
        await watcher.publish(f"{topics.prefix}/marker", b"m", qos=1, wait=True)
        await watcher.subscribe(f"{topics.prefix}/marker", qos=1)
        await watcher.publish(f"{topics.prefix}/marker", b"m", qos=1, wait=True)
        after_close = await next_message(watcher)

    assert (first.payload, second.payload) == (b"session-1", b"session-2")
    assert calls == [1, 2, 3]
    assert after_close.topic == f"{topics.prefix}/marker"


# ------------------------------------------------------------------ reconnect


async def test_reconnects_after_broker_restart(restartable_broker: RestartableBroker, topics: Topics) -> None:
    broker = restartable_broker
    topic = topics.node("n1", "cmd")
    hook_runs: list[bool] = []

    async def birth() -> None:
        hook_runs.append(client.is_connected)

    client = MqttClient(broker.url, backoff=(0.05, 0.5), client_id="reconnecting")
    client.on_connect(birth)
    async with client:
        await client.subscribe(topic, qos=1)
        await wait_until(lambda: len(hook_runs) == 1, 10, "first on_connect hook")
        assert has_nodelay(client)
        first_socket = client._paho.socket()

        await asyncio.to_thread(broker.stop)
        await wait_until(lambda: not client.is_connected, 15, "the loss to be noticed")
        # QoS 1 while disconnected: queued and sent after the reconnect
        await client.publish(topic, b"sent-while-down", qos=1)
        await asyncio.to_thread(broker.start)
        await client.wait_connected(30)
        await wait_until(lambda: len(hook_runs) == 2, 10, "on_connect hook after the reconnect")
        assert has_nodelay(client)
        assert client._paho.socket() is not first_socket

        queued = await next_message(client, 15)  # the subscription was renewed first
        async with MqttClient(broker.url) as other:
            await other.publish(topic, b"after-restart", qos=1, wait=True)
        live = await next_message(client, 15, retained=False)

    assert hook_runs == [True, True]
    assert client.stats.reconnects == 1
    assert queued.payload == b"sent-while-down"
    assert live.payload == b"after-restart"


async def test_tcp_nodelay_after_connect_and_after_reconnect(broker: RunningBroker) -> None:
    client = MqttClient(broker.url, backoff=(0.05, 0.5))
    async with client:
        assert has_nodelay(client)
        client.abort()
        await wait_until(lambda: client.stats.reconnects == 1 and client.is_connected, 15, "reconnect")
        assert has_nodelay(client)


async def test_first_connect_gives_up_after_timeout(topics: Topics) -> None:
    port = free_port()  # nothing listens
    started = time.monotonic()
    with pytest.raises(BusError, match="no connection"):
        async with MqttClient(f"mqtt://127.0.0.1:{port}", connect_timeout=1.0, backoff=(0.05, 0.2)):
            pass
    assert time.monotonic() - started < 10


# ---------------------------------------------------------------- in-flight window


async def test_qos1_window_bounds_unacknowledged_publishes(broker: RunningBroker, topics: Topics) -> None:
    window, total = 32, 20_000
    topic = topics.node("n1", "status")
    received: set[int] = set()
    everything = asyncio.Event()

    async with MqttClient(broker.url) as subscriber, MqttClient(broker.url, max_inflight=window) as publisher:
        await subscriber.subscribe(topic, qos=1)

        async def consume() -> None:
            async for message in subscriber.messages():
                received.add(int(message.payload))
                if len(received) == total:
                    everything.set()
                    return

        # Instrument the one place messages enter paho: how many it holds unacknowledged.
        most_unacked = 0
        paho_publish = publisher._paho.publish

        def counting_publish(*args: Any, **kwargs: Any) -> Any:
            nonlocal most_unacked
            info = paho_publish(*args, **kwargs)
            most_unacked = max(most_unacked, len(publisher._paho._out_messages), len(publisher._pending))
            return info

        publisher._paho.publish = counting_publish  # type: ignore[method-assign]
        consumer = asyncio.create_task(consume())
        try:
            for i in range(total):
                await publisher.publish(topic, str(i), qos=1)
            await publisher.publish(topic, str(total - 1), qos=1, wait=True)
            await asyncio.wait_for(everything.wait(), 120)
        finally:
            consumer.cancel()
            await asyncio.gather(consumer, return_exceptions=True)

    assert most_unacked <= window
    assert most_unacked == window  # the window was actually the limit
    assert received == set(range(total))


async def test_close_releases_blocked_publishers_and_iterators() -> None:
    port = free_port()  # nothing listens: QoS 1 publishes stay unacknowledged
    client = MqttClient(f"mqtt://127.0.0.1:{port}", max_inflight=1, backoff=(0.05, 0.2))
    await client.start(wait=False)
    await client.publish("t/queued", b"1", qos=1)  # takes the only slot
    blocked = asyncio.create_task(client.publish("t/queued", b"2", qos=1))
    waiting = asyncio.create_task(client.publish("t/queued", b"3", qos=1, wait=True))

    async def iterate() -> list[Message]:
        return [m async for m in client.messages()]

    reader = asyncio.create_task(iterate())
    await asyncio.sleep(0)  # let them block
    assert not blocked.done()
    await client.close()

    with pytest.raises(BusError, match="closed"):
        await asyncio.wait_for(blocked, 5)
    with pytest.raises(BusError, match="closed"):
        await asyncio.wait_for(waiting, 5)
    assert await asyncio.wait_for(reader, 5) == []
    with pytest.raises(BusError, match="closed"):
        await client.publish("t/queued", b"4", qos=1)


# ------------------------------------------------------------ credentials and TLS


@pytest.fixture
def mosquitto_with_passwords(tmp_path: Path) -> Iterator[tuple[int, str, str]]:
    """mosquitto with a password file and no anonymous access: (port, user, password)."""
    user, password = "node-n1", "p@ss:w/rd %1"
    passwords = tmp_path / "passwords"
    tool = shutil.which("mosquitto_passwd")
    if tool is None:
        pytest.skip("mosquitto_passwd not installed")
    subprocess.run([tool, "-b", "-c", str(passwords), user, password], check=True, capture_output=True)
    port = free_port()
    proc = start_custom_mosquitto(
        tmp_path, port, ["allow_anonymous false", f"password_file {passwords}", "set_tcp_nodelay true"]
    )
    yield port, user, password
    stop_process(proc)


async def test_credentials_from_the_url(
    mosquitto_with_passwords: tuple[int, str, str], topics: Topics
) -> None:
    port, user, password = mosquitto_with_passwords
    url = f"mqtt://{quote(user, safe='')}:{quote(password, safe='')}@127.0.0.1:{port}"
    assert parse_broker_url(url).password == password
    async with MqttClient(url) as client:
        await client.subscribe(topics.events, qos=1)
        await client.publish(topics.events, b"hello", qos=1)
        assert (await next_message(client)).payload == b"hello"


@pytest.mark.parametrize("credentials", ["node-n1:wrong@", "", "someone:p%40ss@"])
async def test_bad_credentials_are_refused_at_once(
    mosquitto_with_passwords: tuple[int, str, str], credentials: str
) -> None:
    port, _, _ = mosquitto_with_passwords
    started = time.monotonic()
    with pytest.raises(BusError, match="refused the connection: Not authorized") as raised:
        async with MqttClient(f"mqtt://{credentials}127.0.0.1:{port}", connect_timeout=30):
            pass
    assert time.monotonic() - started < 10  # refused, not timed out
    assert "wrong" not in str(raised.value)  # the password never reaches a log line


def make_ca(name: str) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = dt.datetime.now(dt.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return key, cert


def make_server_cert(
    ca_key: ec.EllipticCurvePrivateKey, ca_cert: x509.Certificate
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fleet broker")]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    return key, cert


def write_pem(path: Path, obj: x509.Certificate | ec.EllipticCurvePrivateKey) -> Path:
    if isinstance(obj, x509.Certificate):
        path.write_bytes(obj.public_bytes(serialization.Encoding.PEM))
    else:
        path.write_bytes(
            obj.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        )
        path.chmod(0o600)
    return path


@pytest.fixture
def mosquitto_tls(tmp_path: Path) -> Iterator[tuple[int, Path, Path]]:
    """mosquitto with a TLS listener: (port, the CA that signed it, another CA)."""
    ca_key, ca_cert = make_ca("fleet test CA")
    server_key, server_cert = make_server_cert(ca_key, ca_cert)
    ca = write_pem(tmp_path / "ca.pem", ca_cert)
    _, other_cert = make_ca("someone else's CA")
    other_ca = write_pem(tmp_path / "other-ca.pem", other_cert)
    port = free_port()
    proc = start_custom_mosquitto(
        tmp_path,
        port,
        [
            "allow_anonymous true",
            f"cafile {ca}",
            f"certfile {write_pem(tmp_path / 'server.pem', server_cert)}",
            f"keyfile {write_pem(tmp_path / 'server.key', server_key)}",
        ],
    )
    yield port, ca, other_ca
    stop_process(proc)


async def test_tls_with_the_right_ca(mosquitto_tls: tuple[int, Path, Path], topics: Topics) -> None:
    port, ca, _ = mosquitto_tls
    async with MqttClient(f"mqtts://127.0.0.1:{port}?ca={quote(str(ca))}") as client:
        assert client.url.tls
        assert has_nodelay(client)
        await client.subscribe(topics.events, qos=1)
        await client.publish(topics.events, b"secret", qos=1)
        assert (await next_message(client)).payload == b"secret"


async def test_a_burst_over_tls_arrives_whole_and_in_order(
    mosquitto_tls: tuple[int, Path, Path], topics: Topics
) -> None:
    """TLS records cut packets elsewhere than TCP does: the buffered read still serves them whole."""
    port, ca, _ = mosquitto_tls
    url = f"mqtts://127.0.0.1:{port}?ca={quote(str(ca))}"
    sent = [bytes([index % 251]) * (1 + (index * 7919) % 40_000) for index in range(60)]
    async with MqttClient(url) as subscriber, MqttClient(url) as publisher:
        await subscriber.subscribe(topics.events, qos=1)
        for payload in sent:
            await publisher.publish(topics.events, payload, qos=1)
        got = [(await next_message(subscriber)).payload for _ in sent]
    assert got == sent


@pytest.mark.parametrize("which", ["other", "system"])
async def test_tls_with_a_wrong_ca_is_refused(mosquitto_tls: tuple[int, Path, Path], which: str) -> None:
    port, _, other_ca = mosquitto_tls
    query = f"?ca={quote(str(other_ca))}" if which == "other" else ""
    started = time.monotonic()
    with pytest.raises(BusError, match="does not verify"):
        async with MqttClient(f"mqtts://127.0.0.1:{port}{query}", connect_timeout=30):
            pass
    assert time.monotonic() - started < 10


def test_unreadable_ca_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot load CA file"):
        MqttClient(f"mqtts://127.0.0.1:8883?ca={tmp_path / 'missing.pem'}")


# ----------------------------------------------------------------- several broker URLs (a cluster)


async def test_a_dead_url_in_the_list_is_skipped(broker: RunningBroker, topics: Topics) -> None:
    dead = free_port()
    url = f"mqtt://127.0.0.1:{dead},{broker.url}"
    async with MqttClient(url, connect_timeout=15) as client, MqttClient(broker.url) as publisher:
        assert client.url.port == broker.port
        await client.subscribe(topics.events, qos=1)
        await publisher.publish(topics.events, b"through the live one", qos=1)
        assert (await next_message(client)).payload == b"through the live one"


async def test_every_url_refusing_the_credentials_fails_fast(tmp_path: Path) -> None:
    """Both brokers refuse the password: the first connect ends at once, naming both."""
    from broker_config.generate import write_broker_config

    procs = []
    urls = []
    try:
        for name in ("a", "b"):
            port = free_port()
            generated = write_broker_config(
                tmp_path / name, ("n1",), port=port, prefix="fleet/v1", broker_user=getpass.getuser()
            )
            procs.append(_start_generated_mosquitto(generated.directory, port))
            urls.append(f"mqtt://hub:wrong@127.0.0.1:{port}")
        started = time.monotonic()
        with pytest.raises(
            BusError, match=r"refused the connection.*; mqtt://hub:\*\*\*@127.0.0.1:\d+ refused"
        ):
            async with MqttClient(",".join(urls), connect_timeout=20):
                pass
        assert time.monotonic() - started < 10
    finally:
        _stop_all(procs)


async def test_each_url_brings_its_own_credentials_and_the_client_moves_on(
    tmp_path: Path, topics: Topics
) -> None:
    """Two mosquittos with different passwords: when the first dies the client logs in to the second."""
    from broker_config.generate import write_broker_config

    procs: list[subprocess.Popen[bytes]] = []
    try:
        generated = []
        for name in ("a", "b"):
            port = free_port()
            config = write_broker_config(
                tmp_path / name, ("n1",), port=port, prefix=topics.prefix, broker_user=getpass.getuser()
            )
            procs.append(_start_generated_mosquitto(config.directory, port))
            generated.append(config)
        first, second = (config.url("hub") for config in generated)
        assert first.split("@")[0] != second.split("@")[0]  # the passwords differ
        births: list[int] = []
        client = MqttClient(f"{first},{second}", backoff=(0.05, 1.0))
        client.on_connect(lambda: _note(births, client.url.port))
        await client.subscribe(topics.hub_request, qos=1)
        await client.start()
        try:
            await wait_until(lambda: len(births) == 1, 10, "the first birth")
            assert births == [generated[0].settings.port]
            _stop_all(procs[:1])
            await wait_until(lambda: len(births) == 2, 20, "a birth at the second server")
            assert births[1] == generated[1].settings.port
            assert client.missing_subscriptions == ()
            # Another user: a client id belongs to its user, so a second "hub" would take over.
            async with MqttClient(generated[1].url("tui")) as publisher:
                await publisher.publish(topics.hub_request, b"after the failover", qos=1)
            assert (await next_message(client)).payload == b"after the failover"
        finally:
            await client.close()
    finally:
        _stop_all(procs)


async def test_on_connect_hooks_wait_until_every_subscription_is_granted(topics: Topics) -> None:
    """The birth is withheld while a subscription is refused, and sent once it is granted (here: dropped)."""
    config = load_config(None, "127.0.0.1", free_port())
    config["plugins"] = {
        "amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True},
        "amqtt.plugins.topic_checking.TopicTabooPlugin": {},
    }
    thread = BrokerThread(config)
    thread.start()
    try:
        url = f"mqtt://{config['listeners']['default']['bind']}"
        births: list[int] = []
        client = MqttClient(url)
        client.on_connect(lambda: _note(births, 1))
        await client.subscribe(topics.events, qos=1)
        await client.subscribe("prohibited", qos=1)
        await client.start(wait=False)
        try:
            await client.wait_connected(10)
            await wait_until(lambda: client._refusals.get("prohibited", 0) >= 2, 10, "a retried refusal")
            assert births == []  # not announced while deaf to part of what it asked for
            assert client.missing_subscriptions == ("prohibited",)
            await client.unsubscribe("prohibited")
            await wait_until(lambda: births == [1], 5, "the birth")
        finally:
            await client.close()
    finally:
        thread.stop()


async def _note(births: list[int], value: int) -> None:
    births.append(value)


def _start_generated_mosquitto(directory: Path, port: int) -> subprocess.Popen[bytes]:
    binary = mosquitto_binary()
    if binary is None:
        pytest.skip("mosquitto not installed: apt-get install -y mosquitto")
    with (directory / "mosquitto.log").open("ab") as log:
        proc = subprocess.Popen([binary, "-c", str(directory / "mosquitto.conf")], stdout=log, stderr=log)
    try:
        wait_port(port)
    except TimeoutError:
        proc.kill()
        raise
    return proc


def _stop_all(procs: list[subprocess.Popen[bytes]]) -> None:
    for proc in procs:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)


async def test_a_server_that_never_answers_is_skipped(
    mosquitto_broker: RunningBroker, topics: Topics
) -> None:
    """It takes the TCP connection but sends no CONNACK (a half-open path): the next URL within seconds."""
    from tests.fault.conftest import FreezableProxy

    proxy = FreezableProxy(mosquitto_broker.port)
    await proxy.start()
    proxy.freeze()
    try:
        started = time.monotonic()
        async with MqttClient(f"{proxy.url},{mosquitto_broker.url}", connect_timeout=20) as client:
            assert client.url.port == mosquitto_broker.port
            assert time.monotonic() - started < 15
            await client.subscribe(topics.events, qos=1)
            async with MqttClient(mosquitto_broker.url) as publisher:
                await publisher.publish(topics.events, b"past the silent one", qos=1)
            assert (await next_message(client)).payload == b"past the silent one"
    finally:
        proxy.heal()
        await proxy.close()
