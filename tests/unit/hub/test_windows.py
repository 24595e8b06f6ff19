"""Maintenance windows: the cron parser, zones and DST, and the engine starting waves only inside windows."""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from zoneinfo import ZoneInfo

import pytest

from bus.errors import InvalidInput
from hub.core.engine import Audit, ClearCommand, PresenceChanged, RolloutCreated, Tick
from hub.core.windows import Schedule, next_start, parse_cron
from tests.unit.hub.test_engine import Fleet, make_spec, published

BERLIN = ZoneInfo("Europe/Berlin")
NEW_YORK = ZoneInfo("America/New_York")


def at(zone: ZoneInfo, year: int, month: int, day: int, hour: int, minute: int) -> float:
    return dt.datetime(year, month, day, hour, minute, tzinfo=zone).timestamp()


def test_cron_fields_lists_ranges_steps_and_names() -> None:
    cron = parse_cron("*/15 2-4,22 1,15 jan-mar,DEC mon-fri")
    assert cron.minutes == (0, 15, 30, 45)
    assert cron.hours == (2, 3, 4, 22)
    assert cron.days == {1, 15}
    assert cron.months == {1, 2, 3, 12}
    assert cron.weekdays == {1, 2, 3, 4, 5}
    assert parse_cron("5/20 0 * * 7").minutes == (5, 25, 45)
    assert parse_cron("0 0 * * 7").weekdays == {0}  # 7 is Sunday too
    assert parse_cron("0-30/10 * * * *").minutes == (0, 10, 20, 30)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("0 2 * *", "expected 5 fields"),
        ("60 2 * * *", "minute: '60' is outside 0-59"),
        ("0 24 * * *", "hour: '24' is outside 0-23"),
        ("0 2 0 * *", "day-of-month: '0' is outside 1-31"),
        ("0 2 * 13 *", "month: '13' is outside 1-12"),
        ("0 2 * * 8", "day-of-week: '8' is outside 0-6"),
        ("0 2 * * funday", "day-of-week: 'funday' is not a number"),
        ("*/0 2 * * *", "minute: step must be at least 1"),
        ("5-1 2 * * *", "minute: '5-1' is outside"),
        ("1,,2 2 * * *", "minute: empty item"),
    ],
)
def test_bad_cron_is_named(text: str, message: str) -> None:
    with pytest.raises(InvalidInput, match=message):
        parse_cron(text)


def test_next_start_in_the_nodes_zone() -> None:
    nightly = parse_cron("0 2 * * *")
    noon_berlin = at(BERLIN, 2024, 6, 3, 12, 0)
    assert next_start(nightly, BERLIN, noon_berlin) == at(BERLIN, 2024, 6, 4, 2, 0)
    assert next_start(nightly, NEW_YORK, noon_berlin) == at(NEW_YORK, 2024, 6, 4, 2, 0)
    # Inclusive: a start exactly now is now.
    assert next_start(nightly, BERLIN, at(BERLIN, 2024, 6, 4, 2, 0)) == at(BERLIN, 2024, 6, 4, 2, 0)
    # Day-of-month and day-of-week both restricted: either matches (cron's rule).
    either = parse_cron("0 0 13 * 5")
    friday = at(BERLIN, 2024, 9, 6, 0, 0)
    assert next_start(either, BERLIN, at(BERLIN, 2024, 9, 1, 0, 0)) == friday
    leap = parse_cron("0 0 29 2 *")
    assert next_start(leap, BERLIN, at(BERLIN, 2025, 1, 1, 0, 0)) == at(BERLIN, 2028, 2, 29, 0, 0)


def test_a_window_in_the_skipped_hour_opens_an_hour_later() -> None:
    # 2024-03-31: Berlin clocks jump from 02:00 to 03:00.
    start = next_start(parse_cron("30 2 * * *"), BERLIN, at(BERLIN, 2024, 3, 31, 0, 0))
    assert start is not None
    assert dt.datetime.fromtimestamp(start, BERLIN).strftime("%H:%M") == "03:30"


def test_schedule_open_closed_per_zone_and_across_midnight() -> None:
    schedule = Schedule([("0 23 * * *", 3 * 3600)], default_tz="UTC")
    late = at(BERLIN, 2024, 6, 3, 23, 30)
    assert schedule.is_open("Europe/Berlin", late)
    assert schedule.is_open("Europe/Berlin", at(BERLIN, 2024, 6, 4, 1, 59))  # past midnight
    assert not schedule.is_open("Europe/Berlin", at(BERLIN, 2024, 6, 4, 2, 0))  # closed at 02:00
    assert not schedule.is_open("America/New_York", late)  # 17:30 there
    assert schedule.state("America/New_York", late) == (False, at(NEW_YORK, 2024, 6, 3, 23, 0))
    assert schedule.state("Europe/Berlin", late) == (True, late)
    # No tz label, or a zone nobody knows: the rollout's default zone.
    assert schedule.zone(None).key == "UTC"
    assert schedule.zone("Mars/Olympus_Mons").key == "UTC"
    assert schedule.describe("Europe/Berlin", late) == "2024-06-03 23:30 Europe/Berlin"
    with pytest.raises(InvalidInput, match=r"windows\.0\.cron: cron minute"):
        Schedule([("x 1 * * *", 60)])
    with pytest.raises(InvalidInput, match="window_tz: unknown time zone 'Nowhere/City'"):
        Schedule([("0 1 * * *", 60)], default_tz="Nowhere/City")


NIGHTLY = {"windows": [{"cron": "0 2 * * *", "duration_s": 7200}]}


def window_audits(actions: Sequence[object]) -> list[str]:
    return [a.message for a in actions if isinstance(a, Audit) and a.kind == "window_wait"]


def test_waves_start_only_inside_each_nodes_window() -> None:
    fleet = Fleet()
    fleet.now = at(BERLIN, 2024, 6, 3, 12, 0)
    spec = make_spec(["b1", "b2", "ny1"], **NIGHTLY)
    zones = {"b1": "Europe/Berlin", "b2": "Europe/Berlin", "ny1": "America/New_York"}
    actions = fleet.do(RolloutCreated("r1", spec, ("b1", "b2", "ny1"), frozenset(zones), zones))
    assert published(actions) == {}
    assert window_audits(actions) == [
        "wave 1 waits for a maintenance window (3 node(s)); the next opens 2024-06-04 02:00 Europe/Berlin"
    ]
    assert fleet.summary().detail.startswith("wave 1 waits for a maintenance window")
    assert fleet.engine.next_deadline() == at(BERLIN, 2024, 6, 4, 2, 0)
    # Berlin's window opens: its nodes start; New York's is still hours away.
    actions = fleet.do(Tick(), at=at(BERLIN, 2024, 6, 4, 2, 0))
    assert published(actions) == {"b1": "apply", "b2": "apply"}
    fleet.succeed("b1", "b2")
    assert "ny1" not in fleet.sent
    assert fleet.engine.next_deadline() == at(NEW_YORK, 2024, 6, 4, 2, 0)  # a timer wakes it then
    actions = fleet.do(Tick(), at=at(NEW_YORK, 2024, 6, 4, 2, 0))
    assert published(actions) == {"ny1": "apply"}
    fleet.succeed("ny1")
    assert fleet.state() == "succeeded"
    assert fleet.summary().detail == "succeeded on 3 nodes"


@pytest.mark.parametrize(("mode", "sent_late"), [("finish", True), ("pause", False)])
def test_a_wave_finishes_or_pauses_at_the_windows_end(mode: str, sent_late: bool) -> None:
    fleet = Fleet()
    fleet.now = at(BERLIN, 2024, 6, 4, 3, 0)  # inside 02:00-04:00
    spec = make_spec(
        ["a", "b"], strategy={"max_parallel": 1}, on_window_end=mode, window_tz="Europe/Berlin", **NIGHTLY
    )
    actions = fleet.do(RolloutCreated("r1", spec, ("a", "b"), frozenset({"a", "b"})))
    assert published(actions) == {"a": "apply"}  # max_parallel 1: b waits its turn
    fleet.now = at(BERLIN, 2024, 6, 4, 4, 30)  # the window closed meanwhile
    fleet.succeed("a")
    assert ("b" in fleet.sent) is sent_late
    if not sent_late:
        assert fleet.summary().detail.startswith("window closed: wave 1 paused with 1 node(s) not started")
        actions = fleet.do(Tick(), at=at(BERLIN, 2024, 6, 5, 2, 0))
        assert published(actions) == {"b": "apply"}
    fleet.succeed("b")
    assert fleet.state() == "succeeded"


def test_a_bad_window_is_refused_at_creation() -> None:
    fleet = Fleet()
    with pytest.raises(InvalidInput, match=r"windows\.0\.cron"):
        fleet.create(["a"], windows=[{"cron": "0 25 * * *", "duration_s": 60}])
    assert not fleet.engine.has("r1")


def test_start_deadline_makes_an_offline_node_not_started_not_failed() -> None:
    fleet = Fleet()
    t0 = fleet.now
    fleet.create(["up", "down"], online=["up"], require_online=False, start_deadline_s=600)
    fleet.succeed("up")
    assert fleet.phases()["down"] == "pending"
    assert fleet.engine.next_deadline() == t0 + 600
    actions = fleet.do(Tick(), at=t0 + 601)
    assert [a.node for a in actions if isinstance(a, ClearCommand)] == ["down"]
    summary = fleet.summary()
    assert summary.nodes["down"].phase == "not_started"
    assert summary.nodes["down"].detail == "not started within start_deadline_s (600 s): queued: node offline"
    assert (summary.counts.not_started, summary.counts.failed) == (1, 0)
    assert fleet.state() == "succeeded"
    # It comes back later: nothing is waiting for it any more, it started nothing.
    assert published(fleet.do(PresenceChanged("down", True))) == {}
    # Without start_deadline_s the same node fails at expiry, as before.
    old = Fleet()
    old.create(["up", "down"], online=["up"], require_online=False, expires_after_s=600)
    old.succeed("up")
    old.do(Tick(), at=old.now + 601)
    assert old.phases()["down"] == "timed_out"


def test_start_deadline_bounds_the_deferral_in_the_command() -> None:
    fleet = Fleet()
    fleet.create(["a"], max_defer_s=3600, start_deadline_s=300)
    command = fleet.last("a")
    assert command.defer_until == command.issued_at + 300
