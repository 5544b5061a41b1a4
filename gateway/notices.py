"""Notices to senders (SPEC section 1 step 6): held, rejected, expired, bounced, partly sent.

`build_notice` is pure: it turns a queue entry and what happened into a complete RFC 5322
message, a `multipart/report; report-type=delivery-status` (RFC 6522, RFC 3464) that the
sender's mail server files as a delivery report. The worker sends it with `MAIL FROM:<>`, so
nobody ever answers a notice with another notice.

What a notice holds, and what it never holds:

- part 1, text/plain in ASCII: what happened, the reference, when the message was received, the
  recipient DOMAINS concerned with a count, each reason code in plain words, what to do next;
- part 2, message/delivery-status: `Reporting-MTA`, `Arrival-Date`, `X-Safeguarding-Reference`,
  then one block per concerned domain;
- never a third part: no subject, body or header of the original, and no recipient address.
  RFC 3464 wants `Final-Recipient` to carry an address; ours carries the domain under the
  extension address type `x-safeguarding` (`Final-Recipient: x-safeguarding; gmail.com`).

Status codes (RFC 3463; class 4 with `Action: failed` means abandoned after a persistent
transient failure, as RFC 3463 describes class 4):

    kind      Action    Status
    held      delayed   4.7.1   delivery not authorised (yet): waiting for an administrator
    rejected  failed    5.7.1   delivery not authorised: an administrator rejected it
    dropped   failed    5.7.1   the same, for the recipients dropped by `--drop-insecure`
    expired   failed    4.4.7   delivery time expired: held longer than `hold.max_age`
    bounced   failed    by the first reason that applies to the domain: policy codes
                        (insecure_domain, entry_expired, ...) 5.7.1, queue_lifetime 4.4.7,
                        no_starttls 4.7.4, certificate and tls_handshake 4.7.5,
                        connect 4.4.1, disconnected and ambiguous 4.4.2,
                        no_route 4.4.4, ehlo 4.5.0, smtp_4xx and recipient_deferred 4.0.0,
                        no_smtputf8 5.6.7, bad_address 5.1.7, smtp_5xx, rejected and
                        anything else 5.0.0

`Diagnostic-Code: x-safeguarding; <codes>` lists the reason codes for the domain; rejected,
expired and dropped notices put `rejected_by_admin`, `hold_max_age` or `dropped_by_admin` first.
A reason is a code alone (`queue_lifetime`), a code and the domain it concerns
(`insecure_domain:gmail.com`), or a code and words (`no_starttls at mx.example.net:25`, of
which only the code is used); anything else counts as `unspecified`.
"""

from __future__ import annotations

import re
import textwrap
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum

from gateway.headers import rfc5322_date
from gateway.queue_entry import QueueEntry, Recipient

ADMIN_REASON_LIMIT = 500
DISPLAY_NAME = "Secure transfer gateway"

_WIDTH = 72
_MAX_CODES = 10  # reason codes per domain: keeps Diagnostic-Code within 998 octets
_REASON = re.compile(r"([a-z][a-z0-9_]{0,39})(?::([a-z0-9.-]{1,253}))?(?=$|[\s;,])")
_HOSTNAME = re.compile(r"[A-Za-z0-9]([A-Za-z0-9.-]{0,252}[A-Za-z0-9])?")
_ADDRESS_LIKE = re.compile(r"\S*@\S*")
_PUNCTUATION = str.maketrans(
    {"\u2018": "'", "\u2019": "'", "\u201c": '"', "\u201d": '"', "\u2013": "-", "\u2014": "-"}
)
_SECURE_EXAMPLES = "name@nhs.net, name@<council>.gcsx.gov.uk or name@<force>.pnn.police.uk"


class NoticeKind(StrEnum):
    """What happened to the message; the value is also in the notice's Message-ID."""

    HELD = "held"
    REJECTED = "rejected"
    EXPIRED = "expired"
    BOUNCED = "bounced"
    RELEASED_PARTLY = "dropped"  # released with --drop-insecure: insecure recipients dropped


@dataclass(frozen=True)
class Notice:
    """A notice ready to send: to `sender` (the original envelope sender), from the null path."""

    sender: str
    message: bytes


@dataclass(frozen=True)
class _Wording:
    subject: str
    happened: str
    next_steps: str


_NOT_SECURE = "Safeguarding information may only be sent to secure addresses such as "
_WORDING = {
    NoticeKind.HELD: _Wording(
        "Held: your message {ref} was not sent (recipient domain not secure)",
        "Your message has been HELD by the secure transfer gateway. It has not been sent to "
        "anyone yet, because at least one recipient's domain is not secure. The gateway "
        "keeps it safely until an administrator decides what happens to it.",
        "An administrator will review it; you do not need to send it again. If it is urgent, "
        "contact your IT service desk quoting the reference {ref}.",
    ),
    NoticeKind.REJECTED: _Wording(
        "Rejected: your message {ref} was not sent (recipient domain not secure)",
        "Your message was held by the secure transfer gateway and an administrator has "
        "REJECTED it. It has not been sent to anyone and its content has been deleted from "
        "the gateway.",
        "If the information must still be shared, send it again to a secure address, "
        f"such as {_SECURE_EXAMPLES}. If you have questions, contact your IT service desk "
        "quoting the reference {ref}.",
    ),
    NoticeKind.EXPIRED: _Wording(
        "Expired: your message {ref} was not sent (held too long)",
        "Your message was held by the secure transfer gateway and no administrator released "
        "it in time, so it has EXPIRED. It has not been sent to anyone and its content has "
        "been deleted from the gateway.",
        "If the information must still be shared, send it again to a secure address, "
        f"such as {_SECURE_EXAMPLES}. If you believe the recipient's address is secure, "
        "contact your IT service desk quoting the reference {ref}.",
    ),
    NoticeKind.BOUNCED: _Wording(
        "Undeliverable: your message {ref} could not be delivered",
        "The secure transfer gateway could NOT DELIVER your message to the recipients at the "
        "domains below, and it will not try again. Recipients at other domains are not "
        "affected.",
        "Check the recipient's address and send the message again. If the problem was a "
        "secure connection, the receiving organisation's IT team must fix it first; contact "
        "your IT service desk quoting the reference {ref}.",
    ),
    NoticeKind.RELEASED_PARTLY: _Wording(
        "Partly sent: your message {ref} was not sent to some recipients",
        "Your message was held by the secure transfer gateway. An administrator has released "
        "it to the recipients at secure domains only: it was NOT SENT to the recipients at "
        "the domains below, and never will be.",
        "If those recipients still need the information, send it to a secure address, "
        f"such as {_SECURE_EXAMPLES}. If you have questions, contact your IT service desk "
        "quoting the reference {ref}.",
    ),
}

_KIND_CODES = {
    NoticeKind.REJECTED: "rejected_by_admin",
    NoticeKind.EXPIRED: "hold_max_age",
    NoticeKind.RELEASED_PARTLY: "dropped_by_admin",
}
_FIXED_STATUS = {
    NoticeKind.REJECTED: "5.7.1",
    NoticeKind.RELEASED_PARTLY: "5.7.1",
    NoticeKind.EXPIRED: "4.4.7",
}

_NO_SECURE_CONNECTION = (
    "the receiving server could not prove a secure connection ({}), and the gateway never "
    "sends mail without one"
)
# code -> (status, explanation in words)
_REASONS: dict[str, tuple[str, str]] = {
    "insecure_domain": (
        "5.7.1",
        (
            "the recipient's domain is not on the secure-domain list (for example an ordinary "
            f"webmail address). {_NOT_SECURE}{_SECURE_EXAMPLES}"
        ),
    ),
    "entry_expired": (
        "5.7.1",
        (
            "the recipient's domain is on the secure-domain list, but its entry is past its "
            "review date, so it no longer counts as secure until the list is reviewed"
        ),
    ),
    "ip_literal": ("5.7.1", "the recipient's address uses a network address, never secure"),
    "not_a_domain": ("5.7.1", "the recipient's domain is not a well-formed domain name"),
    "rejected_by_admin": ("5.7.1", "an administrator of the gateway rejected the message"),
    "dropped_by_admin": (
        "5.7.1",
        "an administrator released the message to the recipients at secure domains only",
    ),
    "hold_max_age": ("4.4.7", "the message was held for longer than the gateway keeps mail"),
    "queue_lifetime": (
        "4.4.7",
        "the gateway kept trying for longer than it keeps mail, without success",
    ),
    "no_starttls": ("4.7.4", _NO_SECURE_CONNECTION.format("it offers no encryption")),
    "certificate": ("4.7.5", _NO_SECURE_CONNECTION.format("its certificate did not verify")),
    "tls_handshake": ("4.7.5", _NO_SECURE_CONNECTION.format("the encryption set-up failed")),
    "connect": ("4.4.1", "the receiving server could not be reached"),
    "disconnected": ("4.4.2", "the connection to the receiving server was lost"),
    "ambiguous": ("4.4.2", "the connection to the receiving server was lost"),
    "no_route": ("4.4.4", "the gateway has no route to the recipient's domain"),
    "ehlo": ("4.5.0", "the receiving server refused to talk to the gateway"),
    "smtp_4xx": ("4.0.0", "the receiving server kept answering 'try again later'"),
    "recipient_deferred": ("4.0.0", "the receiving server kept answering 'try again later'"),
    "smtp_5xx": ("5.0.0", "the receiving server refused the message"),
    "rejected": ("5.0.0", "the receiving server refused the recipient's address"),
    "no_smtputf8": (
        "5.6.7",
        "the message needs international address support, which the receiving server lacks",
    ),
    "bad_address": ("5.1.7", "your own address cannot be passed on to the receiving server"),
    "unspecified": ("5.0.0", "no further detail was recorded"),
}


def build_notice(
    entry: QueueEntry,
    kind: NoticeKind,
    *,
    concerned: Sequence[Recipient],
    reasons: Sequence[str],
    now: datetime,
    from_address: str,
    reporting_mta: str,
    message_id_domain: str,
    admin_reason: str | None = None,
) -> Notice | None:
    """The notice about `entry` for its sender, or None when no notice may be sent.

    None when the sender is the null path or not a plain address, or the message is a notice
    itself (an entry marked `notice`, or from `MAILER-DAEMON` or the gateway's notice address).
    `concerned` are the recipients the notice is about: their domains appear, never addresses.
    `admin_reason` is shown for rejected and dropped notices only: control characters and
    anything that looks like an address are removed, then it is cut to 500 characters.
    """
    if now.tzinfo is None:
        raise ValueError("the time of a notice must be timezone-aware")
    for name, value in (("reporting_mta", reporting_mta), ("message_id_domain", message_id_domain)):
        if not _HOSTNAME.fullmatch(value):
            raise ValueError(f"{name} is not a host name")
    from_field = _from_field(from_address)
    if entry.notice or not _may_notify(entry.sender, from_field):
        return None
    known = {r.address for r in entry.recipients}
    if not concerned or any(r.address not in known for r in concerned):
        raise ValueError("a notice needs recipients, all of them from the message")
    domains = _domains(concerned)
    codes = _codes_by_domain(kind, domains, reasons)
    wording = _WORDING[kind]
    reason_text = (
        _clean_admin_reason(admin_reason)
        if kind in {NoticeKind.REJECTED, NoticeKind.RELEASED_PARTLY} and admin_reason
        else ""
    )
    text = _text(entry, kind, domains, codes, reason_text)
    report = _report(entry, kind, reporting_mta, codes)
    boundary = f"=_notice_{entry.ref}_{kind.value}"
    while boundary in text or boundary in report:
        boundary += "_"
    to_field = entry.sender if entry.sender.isascii() else "undisclosed-recipients:;"
    head = [
        f"From: {from_field}",
        f"To: {to_field}",
        f"Subject: {wording.subject.format(ref=entry.ref)}",
        f"Date: {rfc5322_date(now.astimezone(UTC))}",
        f"Message-ID: <{entry.ref}-notice-{kind.value}@{message_id_domain}>",
        "Auto-Submitted: auto-replied",
        "X-Auto-Response-Suppress: All",
        "MIME-Version: 1.0",
        f'Content-Type: multipart/report; report-type=delivery-status; boundary="{boundary}"',
        "Content-Transfer-Encoding: 7bit",
        "",
        "This is a delivery report in MIME format.",
        "",
        f"--{boundary}",
        'Content-Type: text/plain; charset="utf-8"',
        "Content-Transfer-Encoding: 7bit",
        "Content-Description: Notification",
        "Content-Language: en",
        "",
        text,
        f"--{boundary}",
        "Content-Type: message/delivery-status",
        "Content-Description: Delivery report",
        "",
        report,
        f"--{boundary}--",
        "",
    ]
    message = "\r\n".join(head).encode("ascii")
    return Notice(sender=entry.sender, message=message)


def _from_field(from_address: str) -> str:
    """The From field's value: `from_address` as given, or a bare address with a name."""
    printable = all(char.isprintable() for char in from_address)
    if not from_address.isascii() or not printable or len(from_address) > 300:
        raise ValueError("the notice From address must be printable ASCII, 300 at most")
    if "<" in from_address:
        return from_address.strip()
    return f"{DISPLAY_NAME} <{from_address.strip()}>"


def _may_notify(sender: str, from_field: str) -> bool:
    """Tell whether `sender` is a plain address that a notice may go to."""
    local, at, domain = sender.rpartition("@")
    if not at or not local or not domain or len(sender) > 256:
        return False
    if any(char.isspace() or not char.isprintable() or char in "<>" for char in sender):
        return False
    own = from_field.rpartition("<")[2].rstrip(">").strip().lower()
    return local.lower() != "mailer-daemon" and sender.lower() != own


def _domains(concerned: Sequence[Recipient]) -> dict[str, int]:
    """Each concerned domain (as printable ASCII) and how many recipients it had, sorted."""
    counts: dict[str, int] = {}
    for recipient in concerned:
        domain = "".join(c if c.isascii() and c.isprintable() else "?" for c in recipient.domain)
        counts[domain.lower()] = counts.get(domain.lower(), 0) + 1
    return dict(sorted(counts.items()))


def _codes_by_domain(
    kind: NoticeKind, domains: dict[str, int], reasons: Sequence[str]
) -> dict[str, list[str]]:
    """For each domain, the reason codes that apply, the deciding one first."""
    general: list[str] = []
    tagged: dict[str, list[str]] = {}
    for reason in reasons:
        match = _REASON.match(reason.strip().lower())
        code = match.group(1) if match else "unspecified"
        target = tagged.setdefault(match.group(2), []) if match and match.group(2) else general
        target.append(code)
    lead = [_KIND_CODES[kind]] if kind in _KIND_CODES else []
    return {
        domain: list(dict.fromkeys(lead + tagged.get(domain, []) + general))[:_MAX_CODES]
        or ["unspecified"]
        for domain in domains
    }


def _status(kind: NoticeKind, codes: list[str]) -> str:
    """The RFC 3463 status for one domain (see the module docstring)."""
    if kind in _FIXED_STATUS:
        return _FIXED_STATUS[kind]
    status = _REASONS.get(codes[0], _REASONS["unspecified"])[0]
    return "4" + status[1:] if kind is NoticeKind.HELD else status


def _text(
    entry: QueueEntry,
    kind: NoticeKind,
    domains: dict[str, int],
    codes: dict[str, list[str]],
    admin_reason: str,
) -> str:
    """Part 1: the notice in plain words, ASCII, CRLF lines of at most 72 characters."""
    wording = _WORDING[kind]
    received = entry.received.astimezone(UTC).strftime("%d %b %Y %H:%M UTC")
    lines = [
        *_wrap(
            "This is an automatic notice from the secure transfer gateway. It contains none "
            "of your message's content."
        ),
        "",
        "WHAT HAPPENED",
        *_wrap(wording.happened),
        "",
        f"Reference:  {entry.ref}",
        f"Received:   {received}",
        "Recipient domains concerned:",
    ]
    for domain, count in domains.items():
        lines.append(f"  - {domain} ({count} recipient{'s' if count > 1 else ''})")
    lines += ["", "WHY"]
    by_code: dict[str, list[str]] = {}
    for domain, domain_codes in codes.items():
        for code in domain_codes:
            by_code.setdefault(code, []).append(domain)
    for code, code_domains in by_code.items():
        words = _REASONS.get(code, _REASONS["unspecified"])[1]
        where = ", ".join(code_domains)
        lines += _wrap(f"- {where}: {words} (code {code}).", rest="  ")
    if admin_reason:
        lines += ["", "The administrator's reason:", *_wrap(admin_reason, first="  ", rest="  ")]
    lines += ["", "WHAT TO DO NEXT", *_wrap(wording.next_steps.format(ref=entry.ref)), ""]
    return "\r\n".join(lines)


def _report(
    entry: QueueEntry, kind: NoticeKind, reporting_mta: str, codes: dict[str, list[str]]
) -> str:
    """Part 2: the RFC 3464 delivery-status fields, one block per concerned domain."""
    arrival = rfc5322_date(entry.received.astimezone(UTC))
    per_message = (
        f"Reporting-MTA: dns; {reporting_mta}\r\n"
        f"Arrival-Date: {arrival}\r\n"
        f"X-Safeguarding-Reference: {entry.ref}\r\n"
    )
    blocks = [per_message]
    action = "delayed" if kind is NoticeKind.HELD else "failed"
    for domain, domain_codes in codes.items():
        blocks.append(
            f"Final-Recipient: x-safeguarding; {domain}\r\n"
            f"Action: {action}\r\n"
            f"Status: {_status(kind, domain_codes)}\r\n"
            f"Diagnostic-Code: x-safeguarding; {', '.join(domain_codes)}\r\n"
        )
    return "\r\n".join(blocks)


def _clean_admin_reason(reason: str) -> str:
    """The admin's words as one line of printable ASCII: no controls, no addresses, capped."""
    folded = unicodedata.normalize("NFKD", reason.translate(_PUNCTUATION))
    kept: list[str] = []
    for char in folded:
        category = unicodedata.category(char)
        if char.isspace():
            kept.append(" ")
        elif category == "Mn" or category[0] == "C":
            continue  # accents after NFKD; control, format, private and unassigned characters
        else:
            kept.append(char if char.isascii() else "?")
    text = _ADDRESS_LIKE.sub("[address removed]", "".join(kept))
    text = " ".join(text.split())
    if len(text) > ADMIN_REASON_LIMIT:
        text = text[: ADMIN_REASON_LIMIT - 3] + "..."
    return text


def _wrap(text: str, first: str = "", rest: str = "") -> list[str]:
    """Wrap `text` to the notice's width; very long words are broken."""
    return textwrap.wrap(
        text, _WIDTH, initial_indent=first, subsequent_indent=rest, break_on_hyphens=False
    )
