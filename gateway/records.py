"""Audit record bodies (SPEC section 6), built only from domains, pseudonyms, digests and codes.

Pure. Each builder returns an `AuditEvent`: the event name, the message reference when the
record is about one message, and the event's fields in their fixed order. The writer
(`gateway.audit`) adds `seq`, `ts` and `prev`, so a record on disk reads
`seq, ts, event, prev, [ref], <fields in the order built here>`.

No builder takes an address. Senders and recipients arrive as a domain and a pseudonym, and a
builder refuses (ValueError, without echoing the value) a pseudonym that does not have the
pseudonym form, a domain containing "@", or a marking outside the fixed list: an address passed
by mistake fails loudly instead of reaching the log.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Literal

from gateway.pseudonym import is_pseudonym

# Keys the writer owns; an event's fields may not use them.
RESERVED_KEYS = frozenset({"seq", "ts", "event", "prev", "ref"})

MARKINGS = frozenset(
    {
        "OFFICIAL",
        "OFFICIAL-SENSITIVE",
        "OFFICIAL-SENSITIVE [PERSONAL]",
        "OFFICIAL-SENSITIVE [COMMERCIAL]",
        "OFFICIAL-SENSITIVE [LOCSEN]",
    }
)
VERDICTS = frozenset({"release", "hold"})
# Written only by the writer itself (`gateway.audit`), never through `AuditLog.append`.
WRITER_EVENTS = frozenset({"checkpoint", "log_repaired"})
MAX_REASON_LENGTH = 500
# A Unix user name, or uid:N for a user with no passwd entry (from SO_PEERCRED).
_ACTOR = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]{0,31}|uid:[0-9]{1,10}")
_HEX64 = re.compile(r"[0-9a-f]{64}")
_KEY_ID = re.compile(r"[0-9a-f]{16}")
# Control characters, format characters (bidi overrides), line and paragraph separators.
_FORBIDDEN_CATEGORIES = frozenset({"Cc", "Cf", "Cs", "Zl", "Zp"})
DELIVERY_EVENTS = frozenset({"delivered", "deferred", "bounced"})
TLS_KEYS = ("version", "cipher", "verified")

_DIGEST = re.compile(r"sha256:[0-9a-f]{64}")

Recipient = tuple[str, str, bool, str | None]  # (domain, pseudonym, secure, rule)


@dataclass(frozen=True, slots=True)
class AuditEvent:
    """One event for the transfer log, before the writer numbers, stamps and chains it.

    `fields` is read-only and keeps its insertion order, which is the order on disk. Every value
    must be JSON-serialisable (str, int, bool, None, lists and dicts of those).
    """

    event: str
    ref: str | None = None
    fields: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.event:
            raise ValueError("an audit event needs a name")
        clash = RESERVED_KEYS.intersection(self.fields)
        if clash:
            raise ValueError(f"audit fields may not use the writer's keys: {sorted(clash)}")
        object.__setattr__(self, "fields", MappingProxyType(dict(self.fields)))

    def body(self) -> dict[str, Any]:
        """Return the plain dict the writer receives: `event`, `ref` if any, then the fields."""
        body: dict[str, Any] = {"event": self.event}
        if self.ref is not None:
            body["ref"] = self.ref
        body.update(self.fields)
        return body


def _domain(domain: str) -> str:
    if "@" in domain:
        raise ValueError("a domain was expected, not an address")
    return domain


def _pseudonym(value: str) -> str:
    if not is_pseudonym(value):
        raise ValueError("a pseudonym (p: and 32 hex digits) was expected")
    return value


def _party(domain: str, pseudonym: str) -> dict[str, Any]:
    return {"domain": _domain(domain), "pseudonym": _pseudonym(pseudonym)}


def accepted(
    *,
    ref: str,
    client: str,
    verdict: str,
    reasons: Sequence[str],
    policy: str,
    sender_domain: str,
    sender_pseudonym: str,
    recipients: Sequence[Recipient],
    digest: str,
    size: int,
    marking: str | None,
    purpose: str | None,
) -> AuditEvent:
    """Build `accepted`: a message was spooled, with its decision (release or hold)."""
    if verdict not in VERDICTS:
        raise ValueError(f"verdict must be one of {sorted(VERDICTS)}")
    if _DIGEST.fullmatch(digest) is None:
        raise ValueError("digest must be sha256: and 64 lower-case hex digits")
    if size < 0:
        raise ValueError("size must not be negative")
    if marking is not None and marking not in MARKINGS:
        raise ValueError("marking is not one of the fixed protective markings")
    fields: dict[str, Any] = {
        "client": client,
        "verdict": str(verdict),
        "reasons": list(reasons),
        "policy": policy,
        "sender": _party(sender_domain, sender_pseudonym),
        "recipients": [
            {**_party(domain, alias), "secure": secure, "rule": rule}
            for domain, alias, secure, rule in recipients
        ],
        "digest": digest,
        "size": size,
    }
    if marking is not None:
        fields["marking"] = marking
    if purpose is not None:
        fields["purpose"] = purpose
    return AuditEvent("accepted", ref, fields)


def refused(
    *,
    client: str,
    policy: str,
    sender_domain: str,
    sender_pseudonym: str,
    recipient_domain: str,
    recipient_pseudonym: str,
    reasons: Sequence[str],
) -> AuditEvent:
    """Build `refused`: a recipient was refused at RCPT by policy (no message, so no ref)."""
    fields = {
        "client": client,
        "policy": policy,
        "sender": _party(sender_domain, sender_pseudonym),
        "recipient": _party(recipient_domain, recipient_pseudonym),
        "reasons": list(reasons),
    }
    return AuditEvent("refused", None, fields)


def delivery(
    event: Literal["delivered", "deferred", "bounced"],
    *,
    ref: str,
    recipients: Sequence[str],
    host: str | None,
    tls: Mapping[str, Any] | None,
    response: int | None,
    reason: str | None = None,
) -> AuditEvent:
    """Build a delivery outcome for one recipient group; `host`, `tls`, `response` may be null."""
    if event not in DELIVERY_EVENTS:
        raise ValueError(f"delivery event must be one of {sorted(DELIVERY_EVENTS)}")
    if tls is not None and set(tls) != set(TLS_KEYS):
        raise ValueError(f"tls must have exactly the keys {list(TLS_KEYS)}")
    fields: dict[str, Any] = {
        "recipients": [_pseudonym(alias) for alias in recipients],
        "host": host,
        "tls": None if tls is None else {key: tls[key] for key in TLS_KEYS},
        "response": response,
    }
    if reason is not None:
        fields["reason"] = reason
    return AuditEvent(event, ref, fields)


def attempt(*, ref: str, recipients: Sequence[str], host: str) -> AuditEvent:
    """Record a delivery attempt before it starts.

    If the gateway dies before the outcome is recorded, the copy the recipient may receive
    twice is explained by this record.
    """
    return AuditEvent(
        "attempt", ref, {"recipients": [_pseudonym(alias) for alias in recipients], "host": host}
    )


def held(*, ref: str, reasons: Sequence[str], policy: str) -> AuditEvent:
    """Build `held`: a released message, insecure at delivery time, moved to the hold queue."""
    return AuditEvent("held", ref, {"reasons": list(reasons), "policy": policy})


def policy_loaded(*, policy: str, source: str) -> AuditEvent:
    """Build `policy_loaded`: a policy came into force (at start or reload)."""
    return AuditEvent("policy_loaded", None, {"policy": policy, "source": source})


def policy_rejected(*, error: str) -> AuditEvent:
    """Build `policy_rejected`: a new policy was invalid and the old one stays in force."""
    return AuditEvent("policy_rejected", None, {"error": error})


def _actor(actor: str) -> str:
    if _ACTOR.fullmatch(actor) is None:
        raise ValueError("actor must be a Unix user name")
    return actor


def _reason(reason: str) -> str:
    """Admit an admin's free-text reason: not blank, at most 500 characters, no control codes."""
    if not reason.strip():
        raise ValueError("a reason is required")
    if len(reason) > MAX_REASON_LENGTH:
        raise ValueError(f"reason is longer than {MAX_REASON_LENGTH} characters")
    if any(unicodedata.category(char) in _FORBIDDEN_CATEGORIES for char in reason):
        raise ValueError("reason contains control or formatting characters")
    return reason


def released(
    *, ref: str, actor: str, reason: str, recipients_dropped: Sequence[str] = ()
) -> AuditEvent:
    """Build `released`: an admin released a held message; `recipients` lists those dropped."""
    fields: dict[str, Any] = {"actor": _actor(actor), "reason": _reason(reason)}
    if recipients_dropped:
        fields["recipients"] = [_pseudonym(alias) for alias in recipients_dropped]
    return AuditEvent("released", ref, fields)


def rejected(*, ref: str, actor: str, reason: str) -> AuditEvent:
    """Build `rejected`: an admin rejected a held message (sender notified, content purged)."""
    return AuditEvent("rejected", ref, {"actor": _actor(actor), "reason": _reason(reason)})


def expired(*, ref: str, reason: str) -> AuditEvent:
    """Build `expired`: a held message passed `hold.max_age` (no actor: the gateway did it)."""
    return AuditEvent("expired", ref, {"reason": _reason(reason)})


def checkpoint(*, head: str, key_id: str) -> AuditEvent:
    """Build the unsigned part of `checkpoint`; the writer appends `sig` last, after signing."""
    if _HEX64.fullmatch(head) is None:
        raise ValueError("head must be 64 lower-case hex digits")
    if _KEY_ID.fullmatch(key_id) is None:
        raise ValueError("key_id must be 16 lower-case hex digits")
    return AuditEvent("checkpoint", None, {"head": head, "key_id": key_id})


def log_repaired(*, torn_bytes: int, torn_sha256: str) -> AuditEvent:
    """Build `log_repaired`: the writer sealed off the torn line(s) a crash left before it."""
    if torn_bytes < 0:
        raise ValueError("torn_bytes must not be negative")
    if _HEX64.fullmatch(torn_sha256) is None:
        raise ValueError("torn_sha256 must be 64 lower-case hex digits")
    return AuditEvent("log_repaired", None, {"torn_bytes": torn_bytes, "torn_sha256": torn_sha256})
