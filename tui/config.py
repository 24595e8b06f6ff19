"""The TUI's one configuration model (flags, FLEET_* environment)."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from bus.topics import DEFAULT_PREFIX

__all__ = ["TuiConfig"]


class TuiConfig(BaseModel):
    """Settings of ``fleet tui``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    broker: str = Field(default="mqtt://127.0.0.1:1883", description="Broker URL (mqtt:// or mqtts://).")
    prefix: str = Field(default=DEFAULT_PREFIX, description="Topic prefix of the fleet.")
    examples_dir: Path = Field(
        default=Path("examples"),
        description="Directory whose *.json rollout specs the new-rollout screen lists.",
    )
    batch_s: float = Field(
        default=0.1,
        ge=0,
        le=5,
        description="Bus updates are applied to the screen in batches this far apart.",
    )
    request_timeout_s: float = Field(
        default=10.0, gt=0, le=300, description="How long to wait for a hub reply."
    )
    utc: bool = Field(default=False, description="Show wall-clock times in UTC instead of local time.")
