"""What a job's health checks saw answering, held against the versions the node reports.

A health check with ``expect`` set to a version (``"2.0"``, ``"1.24.0"``) that
passed has *seen* that version answering. When the version the node reports
for the service or package the plan changed says otherwise (a version file not
rewritten, a package database out of step with the running binary), the agent
says so in its inventory (``Inventory.health_saw``) rather than let one of the
two stand as the truth.

Pure: the runner hands over the job's plan and step outcomes, the agent
compares with the versions it re-read.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from bus.messages import ContainerStep, HealthStep, ModuleStep, PackageStep, ServiceStep, Step

__all__ = ["Claim", "claims_of", "disagreements", "looks_like_version", "seen_version"]

#: A version as people write one: starts with a digit (or v and a digit) and has a dot.
_VERSION = re.compile(r"^v?\d+(\.[0-9A-Za-z]+)+([-+~:_][0-9A-Za-z.+~:_-]*)?$")
_SUBJECTS = (ServiceStep, PackageStep, ModuleStep, ContainerStep)


@dataclass(frozen=True)
class Claim:
    """A version a passed health check saw answering for ``subject``, and the check in one line.

    ``version`` empty: the job changed ``subject`` but no passed check saw a version of it
    (what an earlier job's check saw no longer speaks for it).
    """

    subject: str
    version: str
    check: str


def looks_like_version(text: str) -> bool:
    """True for ``2.0``, ``v1.24.0``, ``1.24.0-1``; False for ``ok``, ``200``, ``healthy``."""
    return bool(_VERSION.match(text.strip()))


def seen_version(expect: str) -> str | None:
    """The version an expected text names: itself, or its one version-like word (``version 2.0``)."""
    if looks_like_version(expect):
        return expect.strip()
    words = [w for w in expect.split() if looks_like_version(w)]
    return words[0] if len(words) == 1 else None


def _subjects(plan: Sequence[Step]) -> list[str]:
    names: list[str] = []
    for step in plan:
        if isinstance(step, _SUBJECTS) and step.name not in names:
            names.append(step.name)
    return names


def claims_of(plan: Sequence[Step], passed: Mapping[int, str | None]) -> list[Claim]:
    """The versions the passed health checks of ``plan`` saw, each tied to what it checks.

    Args:
        plan: the job's steps.
        passed: step index -> the ``expect`` text of the check that passed there
            (the apply's, or the restore check's after an undo); None: it passed
            without looking for a text.

    A check is tied to the subject (service, package, module, container) whose
    name its target mentions, else to the plan's only subject; a check that
    could be about several subjects, or whose text names no one version, claims nothing.
    Every other subject of the plan gets an empty claim.
    """
    subjects = _subjects(plan)
    claims: dict[str, Claim] = {}
    for index, expect in sorted(passed.items()):
        version = seen_version(expect) if expect is not None else None
        step = plan[index] if 0 <= index < len(plan) else None
        if version is None or not isinstance(step, HealthStep):
            continue
        named = [s for s in subjects if s in step.target]
        tied = named if len(named) == 1 else subjects if len(subjects) == 1 and not named else []
        for subject in tied:
            claims[subject] = Claim(subject, version, f"{step.check} {step.target}")
    return [claims.get(subject, Claim(subject, "", "")) for subject in subjects]


def disagreements(claims: Mapping[str, str], reported: Mapping[str, str]) -> dict[str, str]:
    """``subject -> version seen`` for each claim the reported version does not bear out.

    A reported version bears a claim out when it contains the seen version
    (``1.24.0-1`` bears out ``1.24.0``). A subject the node does not report is
    left out: nothing to disagree with.
    """
    return {
        subject: seen
        for subject, seen in claims.items()
        if seen and subject in reported and seen.removeprefix("v") not in reported[subject]
    }
