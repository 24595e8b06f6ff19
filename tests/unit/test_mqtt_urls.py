"""Broker URL lists, per-URL options and the characters each broker kind can carry."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from bus.errors import ConfigError
from bus.mqtt import MqttClient, check_topic_name, parse_broker_urls, redacted_urls, valid_broker_url
from edge_agent.config import AgentConfig
from hub.config import HubConfig


def test_a_list_parses_each_url_with_its_own_credentials_and_tls() -> None:
    urls = parse_broker_urls(
        "mqtt://hub:pw1@127.0.0.1:1883, mqtts://hub:p%2Cw@b.example:8884?ca=/etc/ca.pem,mqtt://c"
    )
    assert [(u.host, u.port, u.tls) for u in urls] == [
        ("127.0.0.1", 1883, False),
        ("b.example", 8884, True),
        ("c", 1883, False),
    ]
    assert [u.password for u in urls] == ["pw1", "p,w", None]
    assert urls[1].ca_file == "/etc/ca.pem"
    assert urls[0].ca_file is None


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("", "empty"),
        ("mqtt://a:1883,", "an empty entry"),
        ("mqtt://a:1883,,mqtt://b:1883", "an empty entry"),
        ("mqtt://a:1883,http://b:80", "scheme must be"),
        ("mqtt://a:1883,mqtt://a:1883", "listed twice"),
        ("mqtt://a:1883?kind=rabbit", "kind must be one of mqtt, nats"),
        ("mqtt://a:1883?subqos=2", "subqos must be 0 or 1"),
    ],
)
def test_a_bad_list_is_refused_naming_the_reason(text: str, reason: str) -> None:
    with pytest.raises(ConfigError, match=reason):
        parse_broker_urls(text)
    with pytest.raises(ValueError, match=reason):
        valid_broker_url(text)


def test_redacted_list_hides_every_password() -> None:
    shown = redacted_urls("mqtt://hub:secret1@a:1,mqtt://hub:secret2@b:2")
    assert shown == "mqtt://hub:***@a:1,mqtt://hub:***@b:2"


def test_subscription_qos_comes_from_kind_or_subqos() -> None:
    plain, nats, forced = parse_broker_urls("mqtt://a:1,mqtt://b:2?kind=nats,mqtt://c:3?kind=nats&subqos=1")
    assert (plain.subscription_qos, nats.subscription_qos, forced.subscription_qos) == (None, 0, 1)
    assert nats.kind == "nats"


def test_client_caps_the_subscription_qos_per_url() -> None:
    client = MqttClient("mqtt://a:1?kind=nats,mqtt://b:2")
    client._subscriptions["t"] = 1
    assert client._qos_for("t") == 0  # at the NATS server
    client._index = 1
    assert client._qos_for("t") == 1  # at the plain one
    assert MqttClient("mqtt://b:2", sub_qos=0)._qos_for("x") == 0
    assert client.redacted_urls() == "mqtt://a:1,mqtt://b:2"


def test_spread_starts_at_random_and_stays_in_the_list() -> None:
    starts = {MqttClient("mqtt://a:1,mqtt://b:2,mqtt://c:3", spread=True).url.host for _ in range(60)}
    assert starts == {"a", "b", "c"}
    assert MqttClient("mqtt://a:1,mqtt://b:2").url.host == "a"


def test_a_dot_is_refused_on_nats_only_naming_the_character() -> None:
    assert check_topic_name("mqtt://a:1", "node id", "web.1") == "web.1"
    with pytest.raises(ConfigError, match=r"node id 'web.1' contains '\.', which a nats broker"):
        check_topic_name("mqtt://a:1,mqtt://b:2?kind=nats", "node id", "web.1")
    assert check_topic_name("mqtt://b:2?kind=nats", "node id", "web-1") == "web-1"


def agent(broker: str, node_id: str, state_dir: Path, prefix: str = "fleet/v1") -> AgentConfig:
    return AgentConfig.model_validate(
        {"broker": broker, "node_id": node_id, "prefix": prefix, "state_dir": state_dir}
    )


def test_agent_on_nats_refuses_a_dotted_node_id_at_start(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match=r"contains '\.'"):
        agent("mqtt://127.0.0.1:1?kind=nats", "web.1", tmp_path)
    agent("mqtt://127.0.0.1:1", "web.1", tmp_path)  # mosquitto carries it
    with pytest.raises(ValidationError, match=r"prefix 'acme.io/v1' contains '\.'"):
        agent("mqtt://127.0.0.1:1?kind=nats", "web-1", tmp_path, prefix="acme.io/v1")


def test_hub_on_nats_refuses_a_dotted_prefix() -> None:
    with pytest.raises(ValidationError, match=r"contains '\.'"):
        HubConfig(broker="mqtt://127.0.0.1:1?kind=nats,mqtt://127.0.0.1:2?kind=nats", prefix="acme.io/v1")
    assert HubConfig(broker="mqtt://127.0.0.1:1,mqtt://127.0.0.1:2").broker.count(",") == 1


async def test_subscribing_to_a_dotted_topic_at_nats_is_refused() -> None:
    client = MqttClient("mqtt://127.0.0.1:1?kind=nats")
    with pytest.raises(ConfigError, match=r"contains '\.'"):
        await client.subscribe("fleet/v1/node/web.1/cmd")


def test_each_attempt_takes_the_credentials_and_tls_of_its_url() -> None:
    client = MqttClient("mqtt://a:pw-a@127.0.0.1:1,mqtts://b:pw-b@127.0.0.1:2")
    client._use_url(client.url)
    assert (client._paho._username, client._paho._password, client._paho._ssl) == (b"a", b"pw-a", False)
    client._move_on()
    client._use_url(client.url)
    assert (client._paho._username, client._paho._password, client._paho._ssl) == (b"b", b"pw-b", True)
    assert client._paho._ssl_context is client._tls[1]
    client._move_on()
    assert client.url.port == 1  # round and round
