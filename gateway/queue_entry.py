"""A queued message's envelope, decision and delivery state: the spool's value objects.

`QueueEntry` is what the spool stores (encrypted) in each `.meta` file. Its JSON form is
canonical (sorted keys, ISO 8601 times) and read back strictly: an unknown, missing or
mistyped field is `SpoolCorruptError`, never a silent default.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, fields
from datetime import datetime
from enum import StrEnum
from typing import Any

from gateway.errors import SpoolCorruptError

REF_PATTERN = re.compile(r"SG-[0-9A-HJKMNP-TV-Z]{26}")
_FORMAT = 2  # 2 added `notice`; entries of format 1 are read with notice = false
_OLD_FORMATS = {1: {"notice": False}}


class State(StrEnum):
    """Which queue a message is in; also the name of its folder."""

    ACTIVE = "active"
    DEFERRED = "deferred"
    HELD = "held"


@dataclass(frozen=True)
class Recipient:
    """One envelope recipient and how far its delivery has come."""

    address: str
    domain: str
    pseudonym: str
    status: str = "pending"


_STATUSES = frozenset({"pending", "delivered", "bounced", "dropped"})


@dataclass(frozen=True)
class QueueEntry:
    """A queued message's envelope, decision and delivery state (stored encrypted)."""

    ref: str
    state: State
    received: datetime
    client: str
    sender: str
    sender_domain: str
    sender_pseudonym: str
    recipients: tuple[Recipient, ...]
    verdict: str
    reasons: tuple[str, ...]
    policy: str
    decided_at: datetime
    size: int
    digest: str
    smtputf8: bool = False
    attempts: int = 0
    next_attempt: datetime | None = None
    last_error: str | None = None
    revision: int = 0
    notice: bool = False  # a notice to a sender: sent from <>, not subject to the policy

    def pending(self) -> tuple[Recipient, ...]:
        """Return the recipients not yet delivered, bounced or dropped."""
        return tuple(r for r in self.recipients if r.status == "pending")

    def summary(self) -> dict[str, Any]:
        """What `gateway queue list` shows: no content, no address, only domains and codes."""
        return {
            "ref": self.ref,
            "state": str(self.state),
            "received": self.received.strftime("%Y-%m-%dT%H:%M:%SZ"),
            "sender_domain": self.sender_domain,
            "recipient_domains": sorted({r.domain for r in self.pending()}),
            "reasons": list(self.reasons),
            "notice": self.notice,
        }

    def details(self) -> dict[str, Any]:
        """What `gateway queue show` shows: the summary, envelope as pseudonyms, state."""
        return self.summary() | {
            "client": self.client,
            "sender": {"domain": self.sender_domain, "pseudonym": self.sender_pseudonym},
            "recipients": [
                {"domain": r.domain, "pseudonym": r.pseudonym, "status": r.status}
                for r in self.recipients
            ],
            "verdict": self.verdict,
            "policy": self.policy,
            "decided_at": self.decided_at.strftime("%Y-%m-%dT%H:%M:%SZ"),
            "size": self.size,
            "digest": self.digest,
            "attempts": self.attempts,
            "next_attempt": self.next_attempt.strftime("%Y-%m-%dT%H:%M:%SZ")
            if self.next_attempt
            else None,
            "last_error": self.last_error,
        }

    def to_json(self) -> bytes:
        """Serialise to canonical JSON bytes."""
        data: dict[str, Any] = asdict(self)
        for name in ("received", "decided_at", "next_attempt"):
            value = data[name]
            data[name] = value.isoformat() if value is not None else None
        data["format"] = _FORMAT
        return json.dumps(data, sort_keys=True, separators=(",", ":")).encode()

    @classmethod
    def from_json(cls, data: bytes) -> QueueEntry:
        """Parse `to_json` output strictly; anything unexpected is `SpoolCorruptError`."""
        try:
            raw = json.loads(data)
            version = raw.pop("format", None) if isinstance(raw, dict) else None
            if version in _OLD_FORMATS:
                raw = _OLD_FORMATS[version] | raw
            elif version != _FORMAT:
                raise _bad("not a queue entry of a known format")
            entry = cls(**_fields(cls, raw))
        except (ValueError, TypeError) as exc:  # JSON, enum and time errors
            raise _bad(str(exc)) from exc
        bad_status = any(r.status not in _STATUSES for r in entry.recipients)
        if (
            bad_status
            or entry.verdict not in {"release", "hold"}
            or not REF_PATTERN.fullmatch(entry.ref)
        ):
            raise _bad("bad ref, verdict or recipient status")
        return entry


def _bad(problem: str) -> SpoolCorruptError:
    return SpoolCorruptError(f"malformed queue entry: {problem}")


_SIMPLE: dict[str, type] = {"str": str, "int": int, "bool": bool, "datetime": str}


def _fields(cls: type[QueueEntry | Recipient], raw: Any) -> dict[str, Any]:
    """Check the JSON object `raw` against the fields of `cls` and convert its values."""
    hints = {f.name: str(f.type) for f in fields(cls)}
    if not isinstance(raw, dict) or set(raw) != set(hints):
        raise _bad(f"fields of {cls.__name__} missing or unknown")
    out: dict[str, Any] = {}
    for name, hint in hints.items():
        value: Any = raw[name]
        if hint.endswith(" | None") and value is None:
            pass
        elif hint == "State":
            value = State(value)
        elif name == "recipients" and isinstance(value, list):
            value = tuple(Recipient(**_fields(Recipient, item)) for item in value)
        elif name == "reasons" and isinstance(value, list):
            if not all(isinstance(item, str) for item in value):
                raise _bad("reasons must be strings")
            value = tuple(value)
        elif type(value) is not _SIMPLE.get(hint.removesuffix(" | None")):
            raise _bad(f"{name} has the wrong type")
        elif hint.startswith("datetime"):
            value = datetime.fromisoformat(str(value))
            if value.tzinfo is None:
                raise _bad(f"{name} has no time zone")
        out[name] = value
    return out
