r"""Text from the bus, made safe for a terminal (issue 16).

Anything a node or the hub publishes can end up on an operator's terminal:
labels, names, step details, log lines. Control characters in it (ESC and CSI
sequences, BEL, backspace, carriage return, DEL, the C1 range, bidirectional
overrides) could rewrite the screen, set the window title or hide text, so
they are shown as visible escapes (``\x1b``) instead. Tab and newline stay:
they cannot do more than move the cursor forward.

The contract refuses control characters in rollout names and labels
(bus.messages); this is the second line, for every other field.
"""

from __future__ import annotations

import json
import re
from typing import Any

__all__ = ["has_control", "printable", "printable_payload", "printable_value"]

_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")
#: In raw JSON: a \u escape of a control character, a short \b \f \r escape, or a raw
#: UTF-8 C1 or bidi character. Payloads without any skip the JSON walk.
_JSON_CONTROL = re.compile(
    rb"\\u00[01][0-9a-fA-F]|\\u007[fF]|\\u00[89][0-9a-fA-F]|\\u20(?:2[a-eA-E]|6[6-9])|\\[bfr]"
    rb"|\xc2[\x80-\x9f]|\xe2\x80[\xaa-\xae]|\xe2\x81[\xa6-\xa9]"
)


def _visible(match: re.Match[str]) -> str:
    code = ord(match.group())
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def has_control(text: str) -> bool:
    """True when ``text`` holds a character ``printable`` would escape."""
    return _CONTROL.search(text) is not None


def printable(text: str) -> str:
    """``text`` with every control character shown as a visible escape (tab and newline kept)."""
    return _CONTROL.sub(_visible, text)


def printable_value(value: Any) -> Any:
    """A JSON value with every string in it (keys too) made ``printable``."""
    if isinstance(value, str):
        return printable(value)
    if isinstance(value, list):
        return [printable_value(item) for item in value]
    if isinstance(value, dict):
        return {printable(str(key)): printable_value(item) for key, item in value.items()}
    return value


def printable_payload(payload: bytes) -> bytes:
    """A JSON payload with its strings made ``printable``; unchanged when nothing needs it.

    A payload that is not JSON is returned as it is (the decoder refuses it).
    """
    if _JSON_CONTROL.search(payload) is None:
        return payload
    try:
        value = json.loads(payload)
    except (ValueError, RecursionError):
        return payload
    return json.dumps(printable_value(value), separators=(",", ":")).encode()
