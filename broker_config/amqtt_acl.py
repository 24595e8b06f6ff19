"""The embedded broker's authentication and ACL: mosquitto's files, enforced in amqtt.

Why our own plugin rather than amqtt 0.12.1's ``FileAuthPlugin`` and
``TopicAccessControlListPlugin`` (read in ``amqtt/plugins/``):

- ``TopicAccessControlListPlugin`` takes per-user lists of allowed topics, with
  no ``%u``/``%c`` patterns, no deny rules and, through its ``Config`` dataclass,
  only ``publish_acl`` and ``acl`` (subscribe): ``receive-acl`` cannot be set.
- Its subscribe check is the one that matters, because amqtt replays retained
  messages to a new subscription without any receive check: a subscription
  that is allowed must never match a topic the client may not read.
- amqtt publishes a client's last will without any ACL check
  (``Broker._handle_disconnect``): a node could leave a retained "will" on
  another node's ``cmd`` or ``state`` topic. This plugin refuses, at CONNECT, a
  will on a topic the client may not publish to.
- ``FileAuthPlugin`` wants Argon2 or crypt(3) ``$6$`` hashes, so the two brokers
  would need two password files with the same secrets.

So one ``passwords`` file (mosquitto's ``$7$`` PBKDF2-SHA512) and one ``acl``
file (mosquitto's syntax: ``user``, ``topic``, ``pattern`` with ``%u``/``%c``,
``read|write|readwrite|deny``) serve both brokers. Both files are re-read when
they change, so ``fleet broker-config --add`` needs no broker restart: every
CONNECT looks at their modification times first (two stat calls, off the event
loop).

Differences from mosquitto, all on the strict side: a SUBSCRIBE whose filter
could match any topic the client may not read is refused (SUBACK 0x80), where
mosquitto grants it and filters each message; a refused will refuses the
connection.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from amqtt.contexts import Action
from amqtt.plugins.base import BaseAuthPlugin, BaseTopicPlugin

from broker_config.generate import parse_password_file, verify_password
from bus.errors import ConfigError

__all__ = ["Acl", "AclRule", "FleetAclPlugin"]

_LOGGER = logging.getLogger(__name__)

Access = Literal["read", "write", "readwrite", "deny"]
_CACHE_LIMIT = 100_000
_ACCESS: tuple[Access, ...] = ("read", "write", "readwrite", "deny")


@dataclass(frozen=True)
class AclRule:
    """One ``topic`` or ``pattern`` line."""

    access: Access
    topic: str

    def grants(self, wanted: Literal["read", "write"]) -> bool:
        """True when this rule allows ``wanted`` (``readwrite`` allows both)."""
        return self.access in (wanted, "readwrite")


def _levels(topic: str) -> list[str]:
    return topic.split("/")


def _matches(rule: list[str], topic: list[str]) -> bool:
    """MQTT matching of a concrete topic against a filter (``+``, ``#``)."""
    if topic and topic[0].startswith("$") and rule and rule[0] in ("+", "#"):
        return False
    for index, level in enumerate(rule):
        if level == "#":
            return True
        if index >= len(topic):
            return False
        if level not in ("+", topic[index]):
            return False
    return len(rule) == len(topic)


def _covers(rule: list[str], wanted: list[str]) -> bool:
    """True when every topic that filter ``wanted`` matches also matches ``rule``."""
    for index, level in enumerate(rule):
        if level == "#":
            return True
        if index >= len(wanted) or wanted[index] == "#":
            return False
        if level != "+" and wanted[index] != level:  # includes wanted "+" against a literal
            return False
    return len(rule) == len(wanted)


def _overlaps(first: list[str], second: list[str]) -> bool:
    """True when some topic matches both filters."""
    for index in range(max(len(first), len(second))):
        if index >= len(first):
            return second[index] == "#"
        if index >= len(second):
            return first[index] == "#"
        a, b = first[index], second[index]
        if "#" in (a, b):
            return True
        if a != b and "+" not in (a, b):
            return False
    return True


@dataclass(frozen=True)
class Acl:
    """A parsed mosquitto ACL file: per-user rules, anonymous rules, patterns."""

    users: Mapping[str, tuple[AclRule, ...]] = field(default_factory=dict)
    anonymous: tuple[AclRule, ...] = ()
    patterns: tuple[AclRule, ...] = ()
    #: (username, client id) -> its rules: every PUBLISH and every delivery is checked
    _cache: dict[tuple[str | None, str | None], list[tuple[Access, list[str]]]] = field(
        default_factory=dict, init=False, repr=False, compare=False
    )

    @classmethod
    def parse(cls, text: str) -> Acl:
        """Parse mosquitto acl_file syntax.

        Raises:
            ConfigError: a line that is not a comment, ``user``, ``topic`` or ``pattern``.
        """
        users: dict[str, list[AclRule]] = {}
        anonymous: list[AclRule] = []
        patterns: list[AclRule] = []
        current: list[AclRule] = anonymous
        for number, raw in enumerate(text.splitlines(), start=1):
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            keyword, _, rest = line.partition(" ")
            rest = rest.strip()
            if keyword == "user" and rest:
                current = users.setdefault(rest, [])
                continue
            if keyword not in ("topic", "pattern") or not rest:
                raise ConfigError(f"ACL line {number}: expected user, topic or pattern: {line[:80]!r}")
            access_word, _, topic = rest.partition(" ")
            access: Access = "readwrite"
            if access_word in _ACCESS:
                if not topic.strip():
                    raise ConfigError(f"ACL line {number}: no topic after {access_word!r}")
                access = access_word
                rest = topic.strip()
            rule = AclRule(access, rest)
            (patterns if keyword == "pattern" else current).append(rule)
        return cls(
            users={name: tuple(rules) for name, rules in users.items()},
            anonymous=tuple(anonymous),
            patterns=tuple(patterns),
        )

    def rules_for(self, username: str | None, client_id: str | None) -> list[tuple[Access, list[str]]]:
        """The rules that apply to one client, patterns substituted, as (access, levels)."""
        key = (username, client_id)
        rules = self._cache.get(key)
        if rules is None:
            if len(self._cache) >= _CACHE_LIMIT:
                self._cache.clear()  # client ids come and go; a bound, not an LRU
            rules = self._cache[key] = self._rules_for(username, client_id)
        return rules

    def _rules_for(self, username: str | None, client_id: str | None) -> list[tuple[Access, list[str]]]:
        base = self.anonymous if username is None else self.users.get(username, ())
        rules = [(rule.access, _levels(rule.topic)) for rule in base]
        for rule in self.patterns:
            levels = []
            for level in _levels(rule.topic):
                if level not in ("%u", "%c"):
                    levels.append(level)
                    continue
                value = username if level == "%u" else client_id
                # As mosquitto: a pattern never applies for a name that is missing
                # or that holds a wildcard or separator (it would widen the rule).
                if not value or any(c in value for c in "+#/"):
                    break
                levels.append(value)
            else:
                rules.append((rule.access, levels))
        return rules

    def _check(
        self, username: str | None, client_id: str | None, topic: str, wanted: Literal["read", "write"]
    ) -> bool:
        levels = _levels(topic)
        rules = self.rules_for(username, client_id)
        if any(access == "deny" and _matches(rule, levels) for access, rule in rules):
            return False
        return any(access in (wanted, "readwrite") and _matches(rule, levels) for access, rule in rules)

    def may_publish(self, username: str | None, client_id: str | None, topic: str) -> bool:
        """True when the client may publish to ``topic`` (a concrete topic)."""
        return "+" not in topic and "#" not in topic and self._check(username, client_id, topic, "write")

    def may_receive(self, username: str | None, client_id: str | None, topic: str) -> bool:
        """True when the client may receive a message published on ``topic``."""
        return self._check(username, client_id, topic, "read")

    def may_subscribe(self, username: str | None, client_id: str | None, topic_filter: str) -> bool:
        """True when every topic ``topic_filter`` can match is readable by the client."""
        wanted = _levels(topic_filter)
        rules = self.rules_for(username, client_id)
        if any(access == "deny" and _overlaps(rule, wanted) for access, rule in rules):
            return False
        return any(access in ("read", "readwrite") and _covers(rule, wanted) for access, rule in rules)


@dataclass
class _Loaded:
    passwords: dict[str, str]
    acl: Acl
    stamps: tuple[int, int]


def _stamp(path: Path) -> int:
    return os.stat(path).st_mtime_ns


def _load(password_file: Path, acl_file: Path) -> _Loaded:
    """Read both files. Blocking: call through asyncio.to_thread from async code."""
    try:
        stamps = (_stamp(password_file), _stamp(acl_file))
        passwords = parse_password_file(password_file.read_text(encoding="utf-8"))
        acl = Acl.parse(acl_file.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"cannot read broker credentials: {exc}") from exc
    return _Loaded(passwords, acl, stamps)


class FleetAclPlugin(BaseAuthPlugin, BaseTopicPlugin):  # type: ignore[misc]
    """amqtt plugin: mosquitto password file + ACL file, anonymous refused.

    Config (amqtt.yaml, under ``plugins``)::

        broker_config.amqtt_acl.FleetAclPlugin:
          password_file: /path/passwords
          acl_file: /path/acl
    """

    @dataclass
    class Config:
        """The two files this plugin enforces."""

        password_file: str = ""
        acl_file: str = ""

    def __init__(self, context: Any) -> None:
        super().__init__(context)
        config = self.context.config
        if not config.password_file or not config.acl_file:
            raise ConfigError("FleetAclPlugin needs password_file and acl_file")
        self._password_file = Path(config.password_file)
        self._acl_file = Path(config.acl_file)
        # Fail closed at start-up: a broker without its rules must not listen.
        self._loaded = _load(self._password_file, self._acl_file)
        _LOGGER.info("broker ACL: %d users from %s", len(self._loaded.passwords), self._password_file)

    def _reload_if_changed(self) -> None:
        """Re-read the files when either changed. Blocking: call through asyncio.to_thread."""
        try:
            stamps = (_stamp(self._password_file), _stamp(self._acl_file))
            if stamps == self._loaded.stamps:
                return
            self._loaded = _load(self._password_file, self._acl_file)
        except (ConfigError, OSError) as exc:
            _LOGGER.error("keeping the previous broker credentials: %s", exc)  # noqa: TRY400 - one line
            return
        _LOGGER.info("broker credentials reloaded: %d users", len(self._loaded.passwords))

    async def authenticate(self, *, session: Any) -> bool:
        """Known user, right password, and a will only on a topic it may publish to."""
        await asyncio.to_thread(self._reload_if_changed)
        username: str | None = getattr(session, "username", None)
        if not username:
            _LOGGER.info("refused an anonymous client")
            return False
        encoded = self._loaded.passwords.get(username)
        if encoded is None or not verify_password(getattr(session, "password", None) or "", encoded):
            _LOGGER.info("refused user %r: unknown user or wrong password", username[:64])
            return False
        if getattr(session, "will_flag", False):
            will_topic = getattr(session, "will_topic", None) or ""
            if not self._loaded.acl.may_publish(username, session.client_id, will_topic):
                _LOGGER.warning("refused user %r: a last will on %r it may not publish", username, will_topic)
                return False
        return True

    async def topic_filtering(
        self, *, session: Any = None, topic: str | None = None, action: Any = None
    ) -> bool:
        """Publish, subscribe and receive checks against the ACL."""
        if session is None or not topic:
            return False
        username: str | None = getattr(session, "username", None)
        client_id: str | None = getattr(session, "client_id", None)
        acl = self._loaded.acl
        if action == Action.PUBLISH:
            allowed = acl.may_publish(username, client_id, topic)
        elif action == Action.SUBSCRIBE:
            allowed = acl.may_subscribe(username, client_id, topic)
        elif action == Action.RECEIVE:
            allowed = acl.may_receive(username, client_id, topic)
        else:
            allowed = False
        if not allowed:
            _LOGGER.info("denied %s of %r to user %r", action, topic[:200], username)
        return allowed
