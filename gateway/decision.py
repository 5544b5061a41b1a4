"""The decision for one message: envelope recipients + policy -> release or hold, with reasons.

Pure: the caller passes the time and the reference. The message is released only when every
recipient domain is secure; otherwise the whole message is held, never split.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum

from gateway.policy import DomainVerdict, Policy


class Verdict(StrEnum):
    """What happens to an accepted message."""

    RELEASE = "release"
    HOLD = "hold"


@dataclass(frozen=True)
class Decision:
    """The decision on one message.

    `reasons` holds one `reason:domain` string per distinct (reason, domain) pair, in envelope
    order of first appearance (e.g. `insecure_domain:gmail.com`); empty when released.
    `recipients` holds one verdict per envelope recipient, in envelope order.
    """

    ref: str
    verdict: Verdict
    reasons: tuple[str, ...]
    policy_version: str
    recipients: tuple[DomainVerdict, ...]
    at: dt.datetime

    def reply_detail(self) -> str:
        """Render the reasons for the held reply: `insecure_domain: a.com, b.com; entry_...`."""
        grouped: dict[str, list[str]] = {}
        for reason in self.reasons:
            code, _, domain = reason.partition(":")
            grouped.setdefault(code, []).append(domain)
        return "; ".join(f"{code}: {', '.join(domains)}" for code, domains in grouped.items())


def decide(
    recipient_domains: Sequence[str], policy: Policy, now: dt.datetime, ref: str
) -> Decision:
    """Release when every recipient domain is secure under `policy` today; otherwise hold."""
    if not recipient_domains:
        raise ValueError("a decision needs at least one recipient")
    if now.tzinfo is None:
        raise ValueError("the time of a decision must be timezone-aware")
    today = now.astimezone(dt.UTC).date()
    verdicts = tuple(policy.classify(domain, today) for domain in recipient_domains)
    reasons: dict[str, None] = {}
    for verdict in verdicts:
        if not verdict.secure:
            reasons[f"{verdict.reason}:{_printable(verdict.domain)}"] = None
    return Decision(
        ref=ref,
        verdict=Verdict.HOLD if reasons else Verdict.RELEASE,
        reasons=tuple(reasons),
        policy_version=policy.version,
        recipients=verdicts,
        at=now,
    )


def _printable(domain: str) -> str:
    """Escape anything but printable ASCII, so that a reason can go into an SMTP reply."""
    text = domain.encode("unicode_escape").decode("ascii")
    return "".join(char if "!" <= char <= "~" else f"\\x{ord(char):02x}" for char in text)
