"""The fleet TUI: ``FleetApp`` and ``make_app`` (the one factory for the CLI and tests)."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from functools import partial
from typing import ClassVar

from textual import work
from textual.app import App, SystemCommand
from textual.binding import Binding, BindingType
from textual.screen import Screen

from bus.errors import ConfigError, FleetError
from bus.messages import Reply, RequestOp
from bus.mqtt import redacted_urls
from bus.rpc import fetch_show
from tui.config import TuiConfig
from tui.context import Clock, Context
from tui.feed import Feed, pump
from tui.messages import FeedBatch, FeedStatus, HubRequest, RequestDone
from tui.model import Changes, FleetModel
from tui.preview import plan_request
from tui.screens.about import AboutScreen
from tui.screens.actions import rollout_title
from tui.screens.base import ModelScreen
from tui.screens.fleet import FleetScreen
from tui.screens.new_rollout import NewRolloutScreen
from tui.screens.rollout import RolloutScreen
from tui.screens.rollouts import RolloutsScreen

__all__ = ["FleetApp", "make_app"]

_LOGGER = logging.getLogger(__name__)

#: Requests that only read: they run in their own worker group, so a refresh
#: never cancels an abort in flight (and the reverse).
_QUERIES = ("show", "list", "nodes", "plan")
_DONE_WORDS = {
    "abort": "abort requested",
    "rollback": "rollback requested",
    "pause": "paused",
    "resume": "resumed",
}


def _redacted(url: str) -> str:
    """The broker URL without its password (never on screen)."""
    try:
        return redacted_urls(url)
    except ConfigError:
        return "the broker"


class FleetApp(App[None]):
    """Fleet health and rollouts over MQTT, keyboard only, fit for 80x24 over SSH."""

    CSS_PATH = "app.tcss"
    TITLE = "fleet"
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("q", "quit", "Quit"),
        # Ctrl-C quits as in any terminal program (a focused text box copies with it instead).
        Binding("ctrl+c", "quit", "Quit", show=False),
        Binding("f", "show_fleet", "Fleet"),
        Binding("o", "show_rollouts", "Rollouts"),
        Binding("n", "new_rollout", "New"),
        Binding("question_mark", "about", "Help"),
    ]

    def __init__(self, config: TuiConfig, feed: Feed, clock: Clock = time.time) -> None:
        super().__init__()
        self.config = config
        self.feed = feed
        self.model = FleetModel()
        self.ctx = Context(self.model, clock, utc=config.utc, examples_dir=config.examples_dir)
        self.connected = False
        self._last_error = ""
        self.batch_seconds: list[float] = []

    # ------------------------------------------------------------------ lifecycle

    def get_default_screen(self) -> Screen[None]:
        """The fleet screen."""
        return FleetScreen(self.ctx)

    def on_mount(self) -> None:
        """Start the feed worker and the one-second tick."""
        self.sub_title = f"{_redacted(self.config.broker)} {self.config.prefix}"
        self.run_worker(
            pump(self.feed, self.post_message, window=self.config.batch_s),
            name="feed",
            group="feed",
            exit_on_error=False,
        )
        self.set_interval(1.0, self.tick)

    async def on_unmount(self) -> None:
        """Close the broker connection."""
        try:
            await self.feed.stop()
        except FleetError as exc:
            _LOGGER.info("closing the feed: %s", exc.reason)

    # ------------------------------------------------------------------ bus -> screens

    def on_feed_batch(self, message: FeedBatch) -> None:
        """Fold a batch into the model, then let every screen update what changed."""
        started = time.perf_counter()
        changes = self.model.apply_all(message.updates, self.ctx.clock())
        self._dispatch(changes)
        self.batch_seconds.append(time.perf_counter() - started)
        del self.batch_seconds[:-1000]

    def _dispatch(self, changes: Changes) -> None:
        if changes.hub:
            self._set_subtitle()
        if not changes:
            return
        for screen in self.screen_stack:
            if isinstance(screen, ModelScreen):
                screen.model_changed(changes)

    def on_feed_status(self, message: FeedStatus) -> None:
        """Report broker trouble once per distinct reason."""
        self.connected = message.connected
        if not message.connected and message.reason != self._last_error:
            self.notify(message.reason, title="Broker", severity="error", timeout=10, markup=False)
        elif message.connected and self._last_error:
            self.notify(f"connected to {_redacted(self.config.broker)}", title="Broker", markup=False)
        self._last_error = message.reason
        self._set_subtitle()

    def tick(self) -> None:
        """Once a second: ages and stale nodes on every screen, connection state."""
        for screen in self.screen_stack:
            if isinstance(screen, ModelScreen):
                screen.tick()
        self._set_subtitle()

    def _set_subtitle(self) -> None:
        broker = "connected" if self.feed.is_connected else "NOT CONNECTED"
        hub = "unknown"
        if self.model.hub is not None:  # which hub is active, of several (DESIGN 3.9)
            state = self.model.hub
            hub = f"{state.hub} {state.state}" if state.hub else state.state
            hub += f" (term {state.term})" if state.term else ""
        self.sub_title = f"broker {broker} | hub {hub}"

    # ------------------------------------------------------------------ requests

    def on_hub_request(self, message: HubRequest) -> None:
        """Send a screen's request in the background."""
        if message.op == "plan":  # the hub's plan, with every online node's pre-flight
            self.query_hub("plan", plan_request(message.body, self.config.request_timeout_s))
        elif message.op in _QUERIES:
            self.query_hub(message.op, message.body)
        else:
            self.act(message.op, message.body)

    @work(exclusive=True, group="hub-action")
    async def act(self, op: RequestOp, body: dict[str, object]) -> None:
        """Send a request that changes the fleet; the outcome becomes a notification."""
        await self._call(op, dict(body))

    @work(exclusive=True, group="hub-query")
    async def query_hub(self, op: RequestOp, body: dict[str, object]) -> None:
        """Send a read-only request."""
        await self._call(op, dict(body))

    async def _call(self, op: RequestOp, body: dict[str, object]) -> None:
        reply: Reply | None = None
        try:
            if op == "show":  # a rollout too big for one reply comes page by page
                timeout = self.config.request_timeout_s
                reply = await fetch_show(
                    lambda o, b: self.feed.call(o, b, timeout=timeout), str(body.get("rollout"))
                )
            else:
                reply = await self.feed.call(op, body, timeout=self.config.request_timeout_s)
        except FleetError as exc:
            self.notify(exc.reason, title=f"{op} failed", severity="error", timeout=10, markup=False)
        else:
            if not reply.ok:
                self.notify(
                    reply.error or "refused by the hub",
                    title=f"{op} refused",
                    severity="error",
                    timeout=10,
                    markup=False,
                )
        self.post_message(RequestDone(op, body, reply))

    def on_request_done(self, message: RequestDone) -> None:
        """Fold replies into the model and tell the operator what happened."""
        reply = message.reply
        if reply is None or not reply.ok:
            return
        rollout = message.body.get("rollout")
        screen = self.screen
        if message.op == "plan" and isinstance(screen, NewRolloutScreen) and isinstance(reply.body, dict):
            screen.show_plan(reply.body, message.body.get("spec"))
        elif message.op == "show" and isinstance(rollout, str) and isinstance(reply.body, dict):
            self._dispatch(self.model.set_detail(rollout, reply.body))
        elif message.op == "create_rollout":
            created = reply.body.get("rollout") if isinstance(reply.body, dict) else None
            self.notify(f"rollout {created} created", title="New rollout", markup=False)
            if isinstance(self.screen, NewRolloutScreen):
                self.pop_screen()
            if isinstance(created, str):
                self.push_screen(RolloutScreen(self.ctx, created))
        elif message.op in _DONE_WORDS and isinstance(rollout, str):
            title = rollout_title(self.model, rollout, utc=self.config.utc)
            self.notify(f"{title}: {_DONE_WORDS[message.op]}", title=message.op, markup=False)

    # ------------------------------------------------------------------ navigation

    def action_show_fleet(self) -> None:
        """Back to the fleet screen."""
        while len(self.screen_stack) > 1 and not isinstance(self.screen, FleetScreen):
            self.pop_screen()

    def action_show_rollouts(self) -> None:
        """The rollout list (one instance on the stack)."""
        if isinstance(self.screen, RolloutsScreen):
            return
        self.action_show_fleet()
        self.push_screen(RolloutsScreen(self.ctx))

    def action_new_rollout(self) -> None:
        """The new-rollout screen."""
        if not isinstance(self.screen, NewRolloutScreen):
            self.push_screen(NewRolloutScreen(self.ctx))

    def action_about(self) -> None:
        """Keys, broker and the HTTP bridge's URL and token."""
        if not isinstance(self.screen, AboutScreen):
            config = self.config
            self.push_screen(AboutScreen(_redacted(config.broker), config.prefix, config.http_info))

    def get_system_commands(self, screen: Screen[object]) -> Iterable[SystemCommand]:
        """The palette offers every key binding of the screen and the app, plus Textual's own."""
        seen: set[str] = set()
        for node in (screen, self):
            for binding in node.BINDINGS:
                if not isinstance(binding, Binding) or not binding.description or binding.action in seen:
                    continue
                seen.add(binding.action)
                key = self.get_key_display(binding)
                yield SystemCommand(
                    f"{binding.description} ({key})",
                    f"Same as pressing {key}",
                    partial(node.run_action, binding.action),
                )
        yield from super().get_system_commands(screen)


def make_app(config: TuiConfig, feed: Feed, clock: Clock = time.time) -> FleetApp:
    """Build the app; the CLI passes an ``MqttFeed``, tests a ``ListFeed`` and a fixed clock."""
    return FleetApp(config, feed, clock)
