"""Maintenance windows: a tiny cron parser and "is this node inside a window now?" (pure).

A rollout's ``windows`` are ``{"cron": "0 2 * * 1-5", "duration_s": 7200}``:
each time the cron expression matches (``minute hour day-of-month month
day-of-week``, in the *node's* time zone), a window opens for ``duration_s``.
Fields take ``*``, numbers, lists (``1,3,5``), ranges (``1-5``), steps
(``*/15``, ``0-30/10``, ``5/10``) and names (``jan``-``dec``, ``sun``-``sat``;
day-of-week 0 and 7 are Sunday). As in cron, when both day-of-month and
day-of-week are restricted a day matching either one matches.

A node's zone is its ``tz`` label (``tz=Europe/Berlin``), else the rollout's
``window_tz``, else UTC. Times are wall-clock times of that zone: a window
at 02:30 on the night the clocks skip 02:00-03:00 opens at 03:30.

``Schedule`` answers ``is_open(zone, now)`` and ``next_open(zone, now)``
(epoch seconds in, epoch seconds out), caching per zone and minute so a
rollout of a thousand nodes in a few zones costs a few evaluations.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from bus.errors import InvalidInput
from bus.messages import RolloutSpec

__all__ = ["Cron", "Schedule", "next_start", "parse_cron", "schedule_of", "zone_of"]

_MONTHS = {
    name: i
    for i, name in enumerate(
        ("jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec"), 1
    )
}
_DAYS = {name: i for i, name in enumerate(("sun", "mon", "tue", "wed", "thu", "fri", "sat"))}
#: How far ahead a match is looked for (a cron like "0 0 29 2 *" matches every four years).
_HORIZON_DAYS = 366 * 8 + 2
_UTC = ZoneInfo("UTC")


@dataclass(frozen=True)
class Cron:
    """A parsed ``minute hour day-of-month month day-of-week`` expression."""

    text: str
    minutes: tuple[int, ...]
    hours: tuple[int, ...]
    days: frozenset[int]
    months: frozenset[int]
    weekdays: frozenset[int]  # 0 = Sunday
    any_day: bool
    any_weekday: bool

    def matches_day(self, day: dt.date) -> bool:
        """Whether the expression can fire on ``day`` (month, day-of-month, day-of-week)."""
        if day.month not in self.months:
            return False
        dom = day.day in self.days
        dow = (day.isoweekday() % 7) in self.weekdays
        if self.any_day or self.any_weekday:
            return dom and dow
        return dom or dow  # both restricted: either (as cron does)


def _number(text: str, names: dict[str, int], field: str) -> int:
    word = text.strip().lower()
    if word in names:
        return names[word]
    if not word.isdigit():
        raise InvalidInput(f"cron {field}: {text!r} is not a number")
    return int(word)


def _field(
    text: str, low: int, high: int, field: str, names: dict[str, int] | None = None
) -> tuple[set[int], bool]:
    """The values a cron field allows, and whether it is ``*`` (unrestricted)."""
    values: set[int] = set()
    names = names or {}
    for item in text.split(","):
        if not item:
            raise InvalidInput(f"cron {field}: empty item in {text!r}")
        base, _, step_text = item.partition("/")
        step = 1
        if step_text:
            step = _number(step_text, {}, field)
            if step < 1:
                raise InvalidInput(f"cron {field}: step must be at least 1 in {item!r}")
        if base == "*":
            start, end = low, high
        elif "-" in base:
            first, _, last = base.partition("-")
            start, end = _number(first, names, field), _number(last, names, field)
        else:
            start = _number(base, names, field)
            end = high if step_text else start
        high_ok = 7 if field == "day-of-week" else high  # 7 is Sunday too
        if not (low <= start <= high_ok and low <= end <= high_ok) or start > end:
            raise InvalidInput(f"cron {field}: {item!r} is outside {low}-{high}")
        values.update(range(start, end + 1, step))
    return values, text == "*"


def parse_cron(text: str) -> Cron:
    """Parse ``minute hour day-of-month month day-of-week``.

    Raises:
        InvalidInput: not five fields, or a field out of range (the message names it).
    """
    parts = text.split()
    if len(parts) != 5:
        raise InvalidInput(
            f"cron {text[:60]!r}: expected 5 fields (minute hour day-of-month month day-of-week)"
        )
    minutes, _ = _field(parts[0], 0, 59, "minute")
    hours, _ = _field(parts[1], 0, 23, "hour")
    days, any_day = _field(parts[2], 1, 31, "day-of-month")
    months, _ = _field(parts[3], 1, 12, "month", _MONTHS)
    weekdays, any_weekday = _field(parts[4], 0, 6, "day-of-week", _DAYS)
    weekdays = {d % 7 for d in weekdays}
    return Cron(
        text=text,
        minutes=tuple(sorted(minutes)),
        hours=tuple(sorted(hours)),
        days=frozenset(days),
        months=frozenset(months),
        weekdays=frozenset(weekdays),
        any_day=any_day,
        any_weekday=any_weekday,
    )


def zone_of(name: str | None) -> ZoneInfo:
    """The zone named ``name`` (IANA, e.g. Europe/Berlin); UTC for None.

    Raises:
        InvalidInput: an unknown zone name.
    """
    if not name:
        return _UTC
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError) as exc:
        raise InvalidInput(f"unknown time zone {name[:64]!r}") from exc


def next_start(cron: Cron, zone: ZoneInfo, after: float) -> float | None:
    """The first instant at or after ``after`` (epoch seconds) at which ``cron`` fires in ``zone``."""
    local = dt.datetime.fromtimestamp(after, zone)
    day = local.date()
    for _ in range(_HORIZON_DAYS):
        if cron.matches_day(day):
            for hour in cron.hours:
                for minute in cron.minutes:
                    when = dt.datetime(day.year, day.month, day.day, hour, minute, tzinfo=zone).timestamp()
                    if when >= after:
                        return when
        day += dt.timedelta(days=1)
    return None


@dataclass(frozen=True)
class Window:
    """One compiled window: when it opens, how long it stays open."""

    cron: Cron
    duration_s: float


class Schedule:
    """The windows of one rollout, answering per zone (see the module docstring).

    Args:
        windows: (cron text, duration in seconds) of each window.
        default_tz: the zone of nodes without a ``tz`` label (None: UTC).

    Raises:
        InvalidInput: a cron expression or zone that cannot be used (the field is named).
    """

    def __init__(self, windows: Sequence[tuple[str, float]], default_tz: str | None = None) -> None:
        compiled = []
        for index, (text, duration) in enumerate(windows):
            try:
                compiled.append(Window(parse_cron(text), duration))
            except InvalidInput as exc:
                raise InvalidInput(f"windows.{index}.cron: {exc.reason}") from exc
        self.windows = tuple(compiled)
        try:
            self.default = zone_of(default_tz)
        except InvalidInput as exc:
            raise InvalidInput(f"window_tz: {exc.reason}") from exc
        self._cache: dict[tuple[str, int], tuple[bool, float | None]] = {}

    def zone(self, name: str | None) -> ZoneInfo:
        """A node's zone: its ``tz`` label if it names a known zone, else the rollout's default."""
        if not name:
            return self.default
        try:
            return zone_of(name)
        except InvalidInput:
            return self.default

    def state(self, tz: str | None, now: float) -> tuple[bool, float | None]:
        """(open now, when it next opens: ``now`` if open, None if never) for a node in zone ``tz``."""
        zone = self.zone(tz)
        key = (zone.key, int(now // 60))
        found = self._cache.get(key)
        if found is None:
            found = self._evaluate(zone, now)
            if len(self._cache) > 4096:
                self._cache.clear()
            self._cache[key] = found
        is_open, when = found
        return is_open, (now if is_open else when)

    def _evaluate(self, zone: ZoneInfo, now: float) -> tuple[bool, float | None]:
        # Evaluate at the start of the minute so the per-minute cache holds for all of it.
        minute = now - now % 60
        soonest: float | None = None
        for window in self.windows:
            # A window open now began no earlier than now - duration.
            began = next_start(window.cron, zone, minute - window.duration_s + 0.001)
            if began is not None and began <= minute:
                return True, minute
            upcoming = next_start(window.cron, zone, minute + 1)
            if upcoming is not None and (soonest is None or upcoming < soonest):
                soonest = upcoming
        return False, soonest

    def is_open(self, tz: str | None, now: float) -> bool:
        """Whether a node in zone ``tz`` is inside a window at ``now``."""
        return self.state(tz, now)[0]

    def describe(self, tz: str | None, when: float) -> str:
        """``when`` as wall-clock time in the node's zone, e.g. ``2024-06-02 02:00 Europe/Berlin``."""
        zone = self.zone(tz)
        return dt.datetime.fromtimestamp(when, zone).strftime("%Y-%m-%d %H:%M ") + zone.key


def schedule_of(spec: RolloutSpec) -> Schedule | None:
    """The compiled windows of a rollout spec, or None when it has none.

    Raises:
        InvalidInput: a cron expression or ``window_tz`` that cannot be used.
    """
    if not spec.windows:
        return None
    return Schedule([(w.cron, w.duration_s) for w in spec.windows], spec.window_tz)
