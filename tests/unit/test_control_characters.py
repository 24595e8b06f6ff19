"""Issue 16: names and labels that reach operators' terminals carry no control characters."""

from __future__ import annotations

import json
from typing import Any

import pytest
from pydantic import ValidationError

from bus.display import has_control, printable
from bus.errors import InvalidInput
from bus.messages import NodeState, RolloutSpec, decode

ATTACKS = ["\x1b]0;owned\x07", "\x1b[2J\x1b[31mred", "two\nlines", "bell\x07", "c1\x9b31m", "del\x7f"]


def spec(**over: Any) -> dict[str, Any]:
    return {"name": "ok", "targets": "all", "plan": [{"type": "script", "name": "a.sh"}], **over}


@pytest.mark.parametrize("text", ATTACKS)
def test_a_rollout_name_with_control_characters_is_refused(text: str) -> None:
    with pytest.raises(ValidationError, match="control characters"):
        RolloutSpec.model_validate(spec(name=f"update {text}"))


@pytest.mark.parametrize("text", ATTACKS)
def test_target_labels_with_control_characters_are_refused(text: str) -> None:
    with pytest.raises(ValidationError, match="control characters"):
        RolloutSpec.model_validate(spec(targets={"labels": {"role": text}}))


@pytest.mark.parametrize("text", ATTACKS)
def test_a_node_announcing_labels_with_control_characters_is_refused(text: str) -> None:
    for labels in ({"role": text}, {text: "web"}):
        birth: dict[str, Any] = {"v": 1, "node": "n1", "state": "online", "session": "s1", "reason": "birth"}
        birth["labels"] = labels
        with pytest.raises(InvalidInput, match="control characters"):
            decode(NodeState, json.dumps(birth).encode())


def test_printable_unicode_is_still_fine() -> None:
    assert RolloutSpec.model_validate(spec(name="Café 2.0 — wave ✓")).name == "Café 2.0 — wave ✓"
    birth = {"v": 1, "node": "n1", "state": "online", "session": "s1", "reason": "birth",
             "labels": {"site": "Zürich"}}  # fmt: skip
    assert decode(NodeState, json.dumps(birth).encode()).labels == {"site": "Zürich"}


# ---------------------------------------------------------------------- the second line: display


def test_printable_shows_every_control_character_visibly() -> None:
    for text in ATTACKS:
        shown = printable(text)
        assert not has_control(shown), repr(shown)
        assert "\x1b" not in shown
        assert "\x07" not in shown
    assert printable("a\tb\nc") == "a\tb\nc"
    assert printable("\x1b[31m") == "\\x1b[31m"
    assert printable("\u202eevil") == "\\u202eevil"


def test_the_tui_feed_never_passes_escape_sequences_on() -> None:
    """A node's job detail and a log line with ESC/BEL/CSI: the TUI's model gets them visible."""
    from bus.messages import JobSnapshot, LogLine, encode
    from bus.topics import Topics
    from tui.feed import parse_message

    topics = Topics("fleet-t-esc/v1")
    job = JobSnapshot(node="n1", id="c1", rollout="r1", action="apply", phase="failed",
                      detail="boom\x1b]0;owned\x07\x9b2J")  # fmt: skip
    update = parse_message(topics, topics.node("n1", "job"), encode(job))
    assert isinstance(update, JobSnapshot)
    assert update.detail == "boom\\x1b]0;owned\\x07\\x9b2J"
    line = LogLine.model_validate({"node": "n1", "command": "c1", "rollout": "r1", "index": 0,
                                   "stream": "stderr", "line": "\x1b[2Jwiped", "ts": 1.0})  # fmt: skip
    logged = parse_message(topics, topics.node("n1", "log"), encode(line))
    assert isinstance(logged, LogLine)
    assert logged.line == "\\x1b[2Jwiped"
    plain = JobSnapshot(node="n1", id="c1", rollout="r1", action="apply", phase="failed", detail="ok")
    assert parse_message(topics, topics.node("n1", "job"), encode(plain)) == plain


def test_fleet_nodes_and_rollout_show_print_bus_text_escaped(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Text from an older or hostile hub/agent (past the contract's checks) never drives the
    operator's terminal; --json keeps the exact data (JSON escapes it anyway)."""
    import contextlib

    from bus.messages import Reply
    from cli import main as cli_main
    from cli import nodes as cli_nodes
    from cli import rollout as cli_rollout

    evil = "\x1b]0;owned\x07\x1b[2J"
    node = {"node": "n1", "online": True, "last_seen": 1.0, "labels": {"role": evil}, "job": None}

    async def fake_nodes(_config: Any, *_hubs: Any) -> tuple[list[dict[str, Any]], str | None]:
        return [node], None

    monkeypatch.setattr(cli_nodes, "fetch_nodes", fake_nodes)

    class Session:
        async def call(self, op: str, body: dict[str, Any]) -> Reply:
            nodes = {"n1": {"phase": "failed", "detail": evil}}
            shown = {"id": "r1", "name": evil, "state": "failed", "nodes": nodes}
            return Reply(request="x", ok=True, body=shown)

    @contextlib.asynccontextmanager
    async def fake_session(_config: Any) -> Any:
        yield Session()

    monkeypatch.setattr(cli_rollout, "hub_session", fake_session)
    assert cli_main.main(["nodes", "--broker", "mqtt://127.0.0.1:1"]) == 0
    assert cli_main.main(["rollout", "show", "r1", "--broker", "mqtt://127.0.0.1:1"]) == 0
    out = capsys.readouterr().out
    assert "\x1b" not in out
    assert "\x07" not in out
    assert "\\x1b]0;owned\\x07" in out
    assert cli_main.main(["nodes", "--json", "--broker", "mqtt://127.0.0.1:1"]) == 0
    assert json.loads(capsys.readouterr().out)[0]["labels"]["role"] == evil


# ---------------------------------------------------------------------- passwords in errors, token files


@pytest.mark.parametrize(
    "url",
    ["mqtt://u:s3cret@host:notaport", "http://u:s3cret@host:1883", "mqtt://u:s3cret@[::1", "mqtt://:s3cret@"],
)
def test_an_invalid_broker_url_is_never_echoed_with_its_password(
    url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    from cli import main as cli_main

    assert cli_main.main(["nodes", "--broker", url]) == 2
    err = capsys.readouterr().err
    assert "s3cret" not in err
    assert "invalid broker URL" in err
    assert ":***@" in err


def test_the_http_token_comes_from_a_file(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    from bus.errors import ConfigError
    from cli.hub import read_token_file

    token = tmp_path / "token"
    token.write_text("s3cret-token\n")
    assert read_token_file(token) == "s3cret-token"
    with pytest.raises(ConfigError, match="not both"):
        read_token_file(token, given=True)
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(ConfigError, match="is empty"):
        read_token_file(tmp_path / "empty")
    with pytest.raises(ConfigError, match="cannot read"):
        read_token_file(tmp_path / "missing")
