"""Start a rollout: load or paste a spec, preview targets and waves, confirm, send."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any, ClassVar

from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Horizontal, Vertical
from textual.widgets import Footer, Header, Input, Label, OptionList, Static, TextArea

from bus.errors import FleetError
from bus.messages import MAX_PAYLOAD_BYTES, loads_object
from tui.context import Context
from tui.messages import HubRequest
from tui.model import Changes
from tui.preview import Preview, hub_plan_lines, make_preview, parse_spec
from tui.screens.base import ModelScreen
from tui.screens.confirm import ConfirmScreen

__all__ = ["NewRolloutScreen", "read_spec_file"]

_EXAMPLES_SHOWN = 50


def read_spec_file(path: Path) -> str:
    """A spec file's text, refusing huge files. Call through asyncio.to_thread.

    Raises:
        OSError: the file cannot be read.
        ValueError: it is larger than a bus payload may be.
    """
    with path.expanduser().open("rb") as handle:
        data = handle.read(MAX_PAYLOAD_BYTES + 1)
    if len(data) > MAX_PAYLOAD_BYTES:
        raise ValueError(f"{path} is larger than {MAX_PAYLOAD_BYTES} bytes")
    return data.decode("utf-8", errors="replace")


class NewRolloutScreen(ModelScreen):
    """A path box and the example specs on the left, the JSON on the right, the preview below."""

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("escape", "app.pop_screen", "Back"),
        Binding("ctrl+s", "create", "Create rollout"),
        Binding("ctrl+t", "plan", "Plan (dry run)"),
    ]

    def __init__(self, ctx: Context) -> None:
        super().__init__(ctx)
        self.preview: Preview | None = None
        self.error: str | None = None
        self._body: dict[str, Any] | None = None

    def compose(self) -> ComposeResult:
        """Pickers | JSON editor, preview, footer."""
        yield Header()
        with Horizontal(id="new-body"):
            with Vertical(id="new-pickers"):
                yield Label("Spec file (Enter loads):")
                yield Input(placeholder="path/to/rollout.json", id="spec-path")
                yield Label(f"Examples in {self.ctx.examples_dir}/:")
                yield OptionList(id="examples")
            yield TextArea(id="spec-json", soft_wrap=False, show_line_numbers=False)
        yield Static("Load or paste a rollout spec (JSON); ctrl+s creates it.", id="preview", markup=False)
        yield Footer()

    async def on_mount(self) -> None:
        """List the example specs, focus the path box."""
        self.title = "fleet: new rollout"
        examples = await asyncio.to_thread(self._list_examples, self.ctx.examples_dir)
        options = self.query_one("#examples", OptionList)
        options.add_options([str(p) for p in examples] or ["(none)"])
        options.highlighted = 0
        self.query_one("#spec-path", Input).focus()

    @staticmethod
    def _list_examples(directory: Path) -> list[Path]:
        """The JSON files in ``directory`` (blocking: call through asyncio.to_thread)."""
        if not directory.is_dir():
            return []
        return sorted(directory.glob("*.json"))[:_EXAMPLES_SHOWN]

    async def load(self, path: Path) -> bool:
        """Load a spec file into the editor; notify and return False when it cannot be read."""
        try:
            text = await asyncio.to_thread(read_spec_file, path)
        except (OSError, ValueError) as exc:
            self.notify(f"cannot read {path}: {exc}", severity="error", title="New rollout", markup=False)
            return False
        self.query_one("#spec-json", TextArea).text = text
        self._update_preview(text)
        return True

    async def on_input_submitted(self, event: Input.Submitted) -> None:
        """Enter in the path box loads that file."""
        if event.input.id == "spec-path" and event.value.strip():
            await self.load(Path(event.value.strip()))

    async def on_option_list_option_selected(self, event: OptionList.OptionSelected) -> None:
        """Choosing an example loads it."""
        prompt = str(event.option.prompt)
        if prompt != "(none)":
            self.query_one("#spec-path", Input).value = prompt
            await self.load(Path(prompt))

    def on_text_area_changed(self, event: TextArea.Changed) -> None:
        """Re-preview as the JSON is edited or pasted."""
        self._update_preview(event.text_area.text)

    def _update_preview(self, text: str) -> None:
        box = self.query_one("#preview", Static)
        if not text.strip():
            self.preview, self.error, self._body = None, None, None
            box.update("Load or paste a rollout spec (JSON); ctrl+s creates it.")
            return
        try:
            spec = parse_spec(text)
            body = loads_object(text)
        except FleetError as exc:
            self.preview, self.error, self._body = None, exc.reason, None
            box.update(f"! {exc.reason}")
            return
        self.preview = make_preview(spec, self.ctx.model.nodes, self.ctx.clock())
        self.error, self._body = None, body
        box.update("\n".join(self.preview.lines()))

    def model_changed(self, changes: Changes) -> None:
        """Targets may have come online or gone offline: re-preview."""
        if self.is_mounted and self.preview is not None and (changes.nodes or changes.removed_nodes):
            self._update_preview(self.query_one("#spec-json", TextArea).text)

    def action_plan(self) -> None:
        """Ask the hub for its plan of this spec: nothing starts, every online node pre-flights it."""
        if self._body is None:
            reason = self.error or "No rollout spec to plan."
            self.notify(reason, severity="error", title="Plan", markup=False)
            return
        self.query_one("#preview", Static).update(
            "PLAN (dry run): asking the hub; every online target checks the plan without changing anything..."
        )
        self.post_message(HubRequest("plan", self._body))

    def show_plan(self, plan: dict[str, Any]) -> None:
        """Show the hub's plan in place of the local preview (it is labelled a plan)."""
        self.query_one("#preview", Static).update("\n".join(hub_plan_lines(plan)))

    def action_create(self) -> None:
        """Confirm, then send ``create_rollout``; the hub's answer comes back as a notification."""
        if self.preview is None or self._body is None:
            reason = self.error or "No rollout spec to create."
            self.notify(reason, severity="error", title="New rollout", markup=False)
            return
        preview, body = self.preview, self._body
        problems = preview.problems
        detail = "\n".join(preview.lines(limit=4))
        if problems:
            detail += "\nThe hub will probably refuse it: " + "; ".join(problems)

        def answered(yes: bool | None) -> None:
            if yes:
                self.post_message(HubRequest("create_rollout", body))

        self.app.push_screen(
            ConfirmScreen(
                f"Create rollout {preview.spec.name} on {len(preview.targets)} node(s)?", detail, danger=False
            ),
            answered,
        )
