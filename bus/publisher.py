"""What every component that publishes is given: ``Publish``, one port for MQTT publishing.

``bus.mqtt.MqttClient.publish`` is one; the hub hands its rollout manager and
planner the active connection's (``hub.service.ActivePublisher``), the agent
its runner the client's; tests pass a recording fake. This module imports
nothing, so a pure module may name the port without pulling in paho.
"""

from __future__ import annotations

from typing import Protocol

__all__ = ["Publish"]


class Publish(Protocol):
    """``publish(topic, payload, *, qos=1, retain=False)``: one MQTT publish."""

    async def __call__(self, topic: str, payload: bytes, *, qos: int = ..., retain: bool = ...) -> None:
        """Publish ``payload`` on ``topic``; raises ``bus.errors.BusError`` when it cannot."""
