"""Byte-level work on a message's header section; bodies are never parsed.

The `email` package has quadratic paths on hostile headers (DESIGN-NOTES), so the gateway reads
only the header section, capped in size, with plain byte operations: split into fields (a field
is its first line plus any folded continuation lines), drop the fields only the gateway may set,
read the Subject for a protective marking, and add its own fields as raw bytes at the top.
"""

from __future__ import annotations

import re
from datetime import datetime

CRLF = b"\r\n"

# Fields an incoming message may not carry: only the gateway sets the decision, and no sender
# may switch off the transport rules (RFC 8689 TLS-Required: No).
FORBIDDEN_FIELDS = frozenset({b"x-safeguarding-decision", b"tls-required"})

DECISION_FIELD = "X-Safeguarding-Decision"

_MARKING = re.compile(
    rb"^\s*\[?\s*(OFFICIAL-SENSITIVE|OFFICIAL(?!-))"
    rb"(?:\s*\[\s*(PERSONAL|COMMERCIAL|LOCSEN)\s*\])?\s*\]?(?=$|[\s:\-])",
    re.IGNORECASE,
)


def split_fields(section: bytes) -> list[bytes]:
    """Split a header section (CRLF lines, no blank line) into fields, each with its CRLFs.

    A line that starts with white space continues the field before it. A leading continuation
    line (malformed) is kept as a field of its own so nothing is silently lost.
    """
    fields: list[bytes] = []
    for line in section.splitlines(keepends=True):
        if line[:1] in (b" ", b"\t") and fields:
            fields[-1] += line
        else:
            fields.append(line)
    return fields


def field_name(field: bytes) -> bytes:
    """The lower-cased name of a field (b"" when the line has no colon)."""
    name, sep, _ = field.partition(b":")
    return name.strip().lower() if sep else b""


def remove_fields(section: bytes, names: frozenset[bytes] = FORBIDDEN_FIELDS) -> tuple[bytes, int]:
    """Drop every field whose lower-cased name is in `names`; return the rest and the count."""
    kept = [f for f in split_fields(section) if field_name(f) not in names]
    removed = len(split_fields(section)) - len(kept)
    return b"".join(kept), removed


def field_value(section: bytes, name: bytes) -> bytes | None:
    """The unfolded value of the first field called `name` (lower case), or None."""
    for field in split_fields(section):
        if field_name(field) == name:
            value = field.partition(b":")[2]
            return re.sub(rb"\r?\n[ \t]", b" ", value).strip()
    return None


def count_fields(section: bytes) -> int:
    """How many fields the header section holds."""
    return len(split_fields(section))


def protective_marking(subject: bytes | None) -> str | None:
    """The protective marking at the start of a Subject, if it is one of the fixed list.

    `OFFICIAL`, `OFFICIAL-SENSITIVE`, or `OFFICIAL-SENSITIVE [PERSONAL]` (also COMMERCIAL,
    LOCSEN). Anything else, including the rest of the Subject, is never returned.
    """
    if not subject:
        return None
    match = _MARKING.match(subject)
    if match is None:
        return None
    level = match.group(1).decode("ascii").upper()
    descriptor = match.group(2)
    if descriptor is None:
        return level
    if level != "OFFICIAL-SENSITIVE":
        return None
    return f"{level} [{descriptor.decode('ascii').upper()}]"


def rfc5322_date(moment: datetime) -> str:
    """A Date-style timestamp, e.g. `Wed, 25 Nov 2026 03:42:30 +0000`."""
    return moment.strftime("%a, %d %b %Y %H:%M:%S +0000")


def rfc3339_utc(moment: datetime) -> str:
    """RFC 3339 UTC with seconds, e.g. `2026-11-25T03:42:30Z`."""
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def received_field(
    *,
    helo: str,
    peer_ip: str,
    hostname: str,
    tls: str | None,
    ref: str,
    moment: datetime,
    authenticated: bool = False,
) -> bytes:
    """The gateway's Received field (RFC 5321 section 4.4), without any recipient address."""
    helo_text = re.sub(r"[^A-Za-z0-9.\-\[\]:_]", "?", helo)[:255] or "unknown"
    protocol = ("ESMTPS" if tls else "ESMTP") + ("A" if authenticated else "")  # RFC 3848
    tls_text = f" ({tls})" if tls else ""
    text = (
        f"Received: from {helo_text} ([{peer_ip}])\r\n"
        f"\tby {hostname} with {protocol}{tls_text} id {ref};\r\n"
        f"\t{rfc5322_date(moment)}\r\n"
    )
    return text.encode("ascii", "replace")


def decision_field(*, ref: str, policy_version: str, at: datetime) -> bytes:
    """The decision header of SPEC section 5, as raw bytes with its CRLF."""
    text = (
        f"{DECISION_FIELD}: {ref}; verdict=released; policy={policy_version[:16]}; "
        f"at={rfc3339_utc(at)}\r\n"
    )
    return text.encode("ascii")
