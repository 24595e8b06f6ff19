"""Wave planning: counts, percents (rounded up, at least one), the last entry repeating."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from bus.errors import InvalidInput
from bus.waves import dispatchable, plan_waves, wave_sizes


def test_default_is_one_wave_of_everything() -> None:
    assert wave_sizes(["100%"], 7) == [7]
    assert wave_sizes([], 3) == [3]


def test_counts_with_the_last_entry_repeating() -> None:
    assert wave_sizes([1, 2], 8) == [1, 2, 2, 2, 1]


def test_percents_round_up_and_repeat() -> None:
    assert wave_sizes(["10%", "25%"], 10) == [1, 3, 3, 3]
    assert wave_sizes(["10%"], 30) == [3] * 10  # not 4: 30 * 0.1 is 3.0000000000000004


def test_a_percent_is_at_least_one_node() -> None:
    assert wave_sizes(["1%"], 5) == [1, 1, 1, 1, 1]


def test_mixed_counts_and_percents() -> None:
    assert wave_sizes([1, "50%"], 10) == [1, 5, 4]


def test_a_wave_larger_than_what_is_left_is_cut() -> None:
    assert wave_sizes([5], 3) == [3]
    assert wave_sizes([2, 100], 5) == [2, 3]


def test_no_targets_no_waves() -> None:
    assert wave_sizes(["100%"], 0) == []


@pytest.mark.parametrize("entry", [0, -1, "0%", "150%", "x%", "5"])
def test_bad_entries_are_refused(entry: int | str) -> None:
    with pytest.raises(InvalidInput, match=r"strategy\.waves"):
        wave_sizes([entry], 10)


def test_plan_keeps_the_target_order() -> None:
    assert plan_waves(["a", "b", "c", "d"], [1, "50%"]) == [["a"], ["b", "c"], ["d"]]


def test_dispatchable_respects_max_parallel() -> None:
    assert dispatchable(["a", "b", "c"], busy=0, max_parallel=None) == ["a", "b", "c"]
    assert dispatchable(["a", "b", "c"], busy=1, max_parallel=2) == ["a"]
    assert dispatchable(["a", "b", "c"], busy=3, max_parallel=2) == []


@given(
    total=st.integers(min_value=1, max_value=500),
    waves=st.lists(
        st.one_of(
            st.integers(min_value=1, max_value=50),
            st.integers(min_value=1, max_value=100).map(lambda p: f"{p}%"),
        ),
        min_size=1,
        max_size=5,
    ),
)
def test_waves_always_cover_every_target_once(total: int, waves: list[int | str]) -> None:
    sizes = wave_sizes(waves, total)
    assert sum(sizes) == total
    assert all(size >= 1 for size in sizes)
    targets = [f"n{i}" for i in range(total)]
    assert [n for wave in plan_waves(targets, waves) for n in wave] == targets
