"""The Textual terminal UI: fleet health and rollouts over MQTT (DESIGN sections 1-2).

Import what you need from its modules (``tui.app.make_app``, ``tui.feed.MqttFeed``,
``tui.config.TuiConfig``): the package imports nothing itself, so ``import
tui.model`` (pure) does not pull in Textual.
"""

__all__: list[str] = []
