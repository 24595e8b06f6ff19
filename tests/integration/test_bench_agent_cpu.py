"""bench/agent_cpu.py runs two jobs of the 5-step update on a real agent and prints its figures.

Not a timed test: it checks the script keeps working (every job succeeded, the
bare work ran) and prints the keys bench/README.md's table is made of.
"""

from __future__ import annotations

import pytest

from tests.integration.test_bench_smoke import run_bench

pytestmark = pytest.mark.e2e


def test_agent_cpu_smoke() -> None:
    result = run_bench("agent_cpu.py", "--jobs", "2", timeout=180)
    assert result["bench"] == "agent_cpu"
    assert result["jobs"] == 2
    assert (
        set(result["steps"])
        == set(result["bare_steps"])
        == {"download", "stop", "install", "start", "health"}
    )
    assert result["agent_cpu_s"] == pytest.approx(
        result["agent_own_cpu_s"] + result["agent_children_cpu_s"], abs=1e-3
    )
    assert result["agent_own_cpu_s"] > 0
    assert result["bare_cpu_s"] > 0
    assert result["ratio_agent_to_bare"] > 0
