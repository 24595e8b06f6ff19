"""``fleet broker-config --tls`` on the real brokers: the CA makes the connection, nothing else does."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from broker_config.tls import make_ca
from bus.errors import BusError
from bus.mqtt import MqttClient, parse_broker_url
from bus.topics import Topics
from tests.conftest import free_port
from tests.integration.test_acl import Fleet, connected, generate, run_broker, synced

pytestmark = pytest.mark.broker


@pytest.fixture(scope="module", params=["amqtt", "mosquitto"])
def tls_fleet(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    """A TLS-only broker per kind, from a config generated with --tls."""
    kind: str = request.param
    topics = Topics(f"fleet-tls-{uuid.uuid4().hex[:8]}/v1")
    port = free_port()
    config = generate(tmp_path_factory.mktemp(f"tls-{kind}"), topics.prefix, port, tls=True)
    with run_broker(kind, config) as reload:
        yield Fleet(kind, port, topics, config, reload)


def without_ca(url: str) -> str:
    return url.split("?", 1)[0]


async def test_urls_name_the_generated_ca(tls_fleet: Fleet) -> None:
    for client in tls_fleet.config.settings.clients:
        url = parse_broker_url(tls_fleet.url(client))
        assert url.tls
        assert url.ca_file == str(tls_fleet.config.directory / "tls" / "ca.pem")


async def test_client_with_the_ca_connects_and_talks(tls_fleet: Fleet) -> None:
    t = tls_fleet.topics
    hub_url = tls_fleet.url("hub")
    by_name = hub_url.replace("@127.0.0.1:", "@localhost:")  # the certificate names both
    for url in (hub_url, by_name):
        async with connected(url) as hub:
            await synced(hub, t.events, t.events)  # a round trip through the broker, over TLS


async def test_client_without_the_ca_is_refused(tls_fleet: Fleet) -> None:
    with pytest.raises(BusError, match="TLS certificate"):
        async with MqttClient(without_ca(tls_fleet.url("n1")), connect_timeout=10.0):
            pass


async def test_client_trusting_another_ca_is_refused(tls_fleet: Fleet, tmp_path: Path) -> None:
    other = tmp_path / "other-ca.pem"
    other.write_bytes(make_ca("some other CA").cert_pem)
    with pytest.raises(BusError, match="TLS certificate"):
        async with MqttClient(without_ca(tls_fleet.url("n1")) + f"?ca={other}", connect_timeout=10.0):
            pass


async def test_plain_mqtt_is_not_served(tls_fleet: Fleet) -> None:
    plain = without_ca(tls_fleet.url("n1")).replace("mqtts://", "mqtt://", 1)
    with pytest.raises(BusError):
        async with MqttClient(plain, connect_timeout=3.0):
            pass


async def test_a_list_mixes_plain_and_tls_servers_each_with_its_own_options(tls_fleet: Fleet) -> None:
    """The TLS server after a plain one that is down: the client switches to TLS with that URL's CA."""
    t = tls_fleet.topics
    dead_plain = f"mqtt://hub:other-password@127.0.0.1:{free_port()}"
    async with MqttClient(f"{dead_plain},{tls_fleet.url('hub')}", connect_timeout=20.0) as hub:
        assert hub.url.tls
        assert hub.url.port == tls_fleet.port
        await synced(hub, t.events, t.events)
    # The same server without its CA, after the dead one: no connection, and the error says why.
    with pytest.raises(
        BusError, match=r"within 5 s \(mqtts://hub:\*\*\*@127.0.0.1:\d+ refused .* TLS certificate"
    ):
        await MqttClient(f"{dead_plain},{without_ca(tls_fleet.url('hub'))}", connect_timeout=5.0).start()
