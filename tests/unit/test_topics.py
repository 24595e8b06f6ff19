"""Topic names of DESIGN section 1: building, parsing, and refusing what is not a node id."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from bus.errors import InvalidInput, InvalidNodeId
from bus.topics import (
    DEFAULT_PREFIX,
    NODE_CHANNELS,
    NODE_ID_PATTERN,
    NodeTopic,
    Topics,
    check_node_id,
    is_node_id,
)

node_ids = st.from_regex(f"^{NODE_ID_PATTERN}$", fullmatch=True).filter(lambda s: "\n" not in s)


def test_default_topics_match_design_section_1() -> None:
    topics = Topics()
    assert DEFAULT_PREFIX == "fleet/v1"
    assert [topics.node("n1", channel) for channel in NODE_CHANNELS] == [
        "fleet/v1/node/n1/state",
        "fleet/v1/node/n1/heartbeat",
        "fleet/v1/node/n1/cmd",
        "fleet/v1/node/n1/status",
        "fleet/v1/node/n1/job",
        "fleet/v1/node/n1/log",
    ]
    assert topics.hub_state == "fleet/v1/hub/state"
    assert topics.hub_request == "fleet/v1/hub/request"
    assert topics.hub_reply("tui-1") == "fleet/v1/hub/reply/tui-1"
    assert topics.rollout("r-1") == "fleet/v1/rollout/r-1"
    assert topics.rollout_filter == "fleet/v1/rollout/+"
    assert topics.events == "fleet/v1/events"
    assert topics.node_filter("state") == "fleet/v1/node/+/state"
    assert topics.node_filter() == "fleet/v1/node/+/#"
    assert topics.node_filter("#", node="n1") == "fleet/v1/node/n1/#"


def test_prefix_is_configurable() -> None:
    topics = Topics("fleet-t-abc/v1")
    assert topics.node("n1", "cmd") == "fleet-t-abc/v1/node/n1/cmd"
    assert topics.parse_node("fleet-t-abc/v1/node/n1/cmd") == NodeTopic("n1", "cmd")
    assert topics.parse_node("fleet/v1/node/n1/cmd") is None


@pytest.mark.parametrize(
    "prefix", ["", "/fleet", "fleet/", "fleet//v1", "fleet/+", "fleet/#", "a b", "flëet"]
)
def test_invalid_prefix_refused(prefix: str) -> None:
    with pytest.raises(InvalidInput):
        Topics(prefix)


@pytest.mark.parametrize("node", ["a", "n1", "edge-07.eu_west", "0", "A" * 64, "n..1"])
def test_valid_node_ids(node: str) -> None:
    assert is_node_id(node)
    assert check_node_id(node) == node


@pytest.mark.parametrize(
    "node",
    [
        "",
        "..",
        ".hidden",
        "../n1",
        "n1/../n2",
        "n1/cmd",
        "/n1",
        "n+",
        "+",
        "#",
        "n#",
        "nöde",
        "节点",
        "n1\n",
        "n1\x00",
        "n 1",
        " n1",
        "-n1",
        "_n1",
        "A" * 65,
        "$SYS",
    ],
)
def test_invalid_node_ids_refused(node: str) -> None:
    assert not is_node_id(node)
    with pytest.raises(InvalidNodeId) as raised:
        check_node_id(node)
    assert isinstance(raised.value, InvalidInput)
    assert "\n" not in raised.value.reason  # one line, whatever the input
    with pytest.raises(InvalidNodeId):
        Topics().node(node, "cmd")


def test_non_string_node_id_refused() -> None:
    with pytest.raises(InvalidNodeId):
        check_node_id(7)  # type: ignore[arg-type]


@given(node=node_ids, channel=st.sampled_from(NODE_CHANNELS))
def test_node_topics_parse_back(node: str, channel: str) -> None:
    topics = Topics()
    topic = topics.node(node, channel)  # type: ignore[arg-type]
    assert topics.parse_node(topic) == NodeTopic(node, channel)  # type: ignore[arg-type]
    assert "+" not in topic
    assert "#" not in topic


@pytest.mark.parametrize(
    "topic",
    [
        "fleet/v1/node/n1",
        "fleet/v1/node/n1/cmd/extra",
        "fleet/v1/node/n1/unknown",
        "fleet/v1/node/+/cmd",
        "fleet/v1/node/../cmd",
        "fleet/v1/node//cmd",
        "fleet/v1/hub/state",
        "fleet/v2/node/n1/cmd",
        "xfleet/v1/node/n1/cmd",
    ],
)
def test_parse_node_rejects_other_topics(topic: str) -> None:
    assert Topics().parse_node(topic) is None


@pytest.mark.parametrize(
    "reply_to",
    [
        "fleet/v1/node/n1/cmd",
        "fleet/v1/hub/reply/../../node/n1/cmd",
        "fleet/v1/hub/reply/tui/../../../node/n1/cmd",
        "../node/n1/cmd",
        "fleet/v1/rollout/r1",
        "fleet/v1/hub/reply/",
        "fleet/v1/hub/reply/+",
        "fleet/v1/hub/reply/#",
        "+",
        "#",
        "",
        "a/b",
        "tui\n",
        "x" * 129,
    ],
)
def test_reply_to_cannot_leave_hub_reply(reply_to: str) -> None:
    with pytest.raises(InvalidInput):
        Topics().parse_reply_to(reply_to)


def test_reply_to_accepts_a_client_id_or_its_full_topic() -> None:
    topics = Topics()
    assert topics.parse_reply_to("tui-1") == "fleet/v1/hub/reply/tui-1"
    assert topics.parse_reply_to("fleet/v1/hub/reply/tui-1") == "fleet/v1/hub/reply/tui-1"


@given(st.text(max_size=200))
def test_reply_to_never_leaves_hub_reply(reply_to: str) -> None:
    topics = Topics()
    try:
        topic = topics.parse_reply_to(reply_to)
    except InvalidInput:
        return
    head = "fleet/v1/hub/reply/"
    assert topic.startswith(head)
    client = topic[len(head) :]
    assert client
    assert "/" not in client
    assert "+" not in client
    assert "#" not in client
    assert client not in (".", "..")


@pytest.mark.parametrize("rollout", ["", "../x", "r/1", "+", "#", "r 1", "x" * 129])
def test_invalid_rollout_ids_refused(rollout: str) -> None:
    with pytest.raises(InvalidInput):
        Topics().rollout(rollout)


def test_parse_rollout() -> None:
    topics = Topics()
    assert topics.parse_rollout("fleet/v1/rollout/r-1") == "r-1"
    assert topics.parse_rollout("fleet/v1/rollout/r-1/x") is None
    assert topics.parse_rollout("fleet/v1/rollout/") is None
    assert topics.parse_rollout("fleet/v1/events") is None


def test_client_ids_belong_to_their_user() -> None:
    """Issue 16: ``user`` or ``user~anything``; no other user's name is a prefix that counts."""
    from bus.topics import is_own_client_id, own_client_id

    assert is_own_client_id("n1", "n1")
    assert is_own_client_id("n1", "n1~agent-n1")
    assert not is_own_client_id("n1", "n1-a")  # node n1-a's name
    assert not is_own_client_id("n1", "n2~agent-n2")
    assert not is_own_client_id("n1", "hub")
    assert not is_own_client_id("hub", "hub-x")
    assert own_client_id("n1", "agent-n1") == "n1~agent-n1"
    assert own_client_id("n1", "n1~x") == "n1~x"
    assert own_client_id(None, "fleet-hub") == "fleet-hub"
    assert Topics().hub_reply("tui~fleet-tui-1a2b") == "fleet/v1/hub/reply/tui~fleet-tui-1a2b"
