"""DKIM signatures that prove a released message passed the gateway (RFC 6376, RFC 8463).

The worker signs each released message after adding the decision header: one ed25519-sha256
DKIM-Signature, c=relaxed/relaxed, over the whole body (no l= tag) and the fields named in
SIGNED_HEADERS, the decision header first. Every name goes twice into h= (RFC 6376 section
8.15): the second, absent instance is signed as empty, so a field of that name added later, such
as a second decision header or a second From, breaks the signature for every DKIM verifier.

`verify_message` works offline: no DNS. The key record is built from the public key the auditor
holds, so a message signed with any other key fails. Only a signature whose h= lists the decision
header counts. The reasons it gives, "valid" or why not:

    no_signature                no DKIM-Signature field
    no_decision_header          no X-Safeguarding-Decision field
    several_decision_headers    more than one (the gateway adds exactly one)
    malformed_decision_header   not `SG-...; verdict=...; policy=<16 hex>; at=<RFC 3339 UTC>`
    malformed_message           a line of the header section is not a header field
    decision_header_not_signed  no signature lists x-safeguarding-decision in h=
    malformed_signature         the signature's tags are wrong (missing, bad base64, t= ahead)
    body_changed                the body no longer matches the body hash (bh=)
    bad_signature               a signed header changed, or another key signed (one answer)

dkimpy has no type hints: every call into it is in this module, behind `_DkimMessage`.
"""

from __future__ import annotations

import base64
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import dkim as dkimpy  # type: ignore[import-untyped]  # dkimpy ships no type hints
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from gateway.headers import DECISION_FIELD
from gateway.keys import dkim_record_for
from gateway.reference import is_reference

DECISION = DECISION_FIELD.lower().encode("ascii")
SIGNED_HEADERS = (
    DECISION,
    b"from",
    b"sender",
    b"reply-to",
    b"to",
    b"cc",
    b"subject",
    b"date",
    b"message-id",
    b"in-reply-to",
    b"references",
    b"mime-version",
    b"content-type",
    b"content-transfer-encoding",
)
ALGORITHM = b"ed25519-sha256"
VALID = "valid"

_H_TAG = [name for name in SIGNED_HEADERS for _ in range(2)]  # each signed twice: no additions
_CANONICALIZATION = (b"relaxed", b"relaxed")
_BODY_HASH_MISMATCH = "body hash mismatch"  # how dkimpy's ValidationError for bh= begins
_DECISION_PARTS = ("verdict", "policy", "at")
_DECISION_FORMS = {
    "verdict": re.compile(r"[a-z_]+"),
    "policy": re.compile(r"[0-9a-f]{16}"),
    "at": re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ"),
}

_DnsLookup = Callable[..., bytes | None]


class _DkimMessage(Protocol):
    """The part of dkimpy's `DKIM` object this module uses."""

    headers: list[list[bytes]]  # [name, raw value with folding and CRLF], top to bottom

    def sign(
        self,
        selector: bytes,
        domain: bytes,
        privkey: bytes,
        *,
        canonicalize: tuple[bytes, bytes],
        include_headers: list[bytes],
    ) -> bytes: ...

    def verify(self, idx: int, dnsfunc: _DnsLookup) -> bool: ...


@dataclass(frozen=True)
class MessageVerification:
    """The outcome of checking a released message's DKIM signature offline."""

    reason: str  # VALID, or why not (see the module docstring)
    decision: dict[str, str] | None  # the proven ref, verdict, policy, at; None unless valid
    domain: str | None = None  # d= and s= of the signature examined, if any
    selector: str | None = None

    @property
    def valid(self) -> bool:
        """Whether the message is proven to have passed the gateway, unchanged."""
        return self.reason == VALID


def sign(message: bytes, *, key: Ed25519PrivateKey, domain: str, selector: str) -> bytes:
    """The DKIM-Signature field, ending in CRLF, to put on top of the released `message`.

    Raises ValueError when the message has not exactly one decision header, when a line of its
    header section is not a header field, or when domain or selector is not ASCII. The message
    text never appears in the error.
    """
    message_view = _parse(message)
    count = len(_values(message_view, DECISION))
    if count != 1:
        raise ValueError(f"a message to sign needs exactly one {DECISION_FIELD} field, not {count}")
    seed = key.private_bytes(
        serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
    )
    try:
        field = message_view.sign(
            selector.encode("ascii"),
            domain.encode("ascii"),
            base64.b64encode(seed),  # dkimpy takes the 32-byte Ed25519 seed in base64
            canonicalize=_CANONICALIZATION,
            include_headers=_H_TAG,
        )
    except dkimpy.DKIMException as exc:
        raise ValueError(f"dkimpy refused to sign: {type(exc).__name__}") from None
    return bytes(field)


def verify_message(message: bytes, public_key: Ed25519PublicKey) -> MessageVerification:
    """Check offline that `public_key` signed the message's decision header and body, unchanged."""
    try:
        message_view = _parse(message)
    except ValueError:
        return _refused("malformed_message")
    signatures = _values(message_view, b"dkim-signature")
    if not signatures:
        return _refused("no_signature")
    decisions = _values(message_view, DECISION)
    if not decisions:
        return _refused("no_decision_header")
    if len(decisions) > 1:
        return _refused("several_decision_headers")
    try:
        decision = parse_decision(decisions[0])
    except ValueError:
        return _refused("malformed_decision_header")
    record = dkim_record_for(public_key).encode("ascii")
    first_failure: MessageVerification | None = None
    malformed = False
    for index, value in enumerate(signatures):
        tags = _tags(value)
        if tags is None:
            malformed = True
            continue
        if DECISION not in _signed_names(tags):
            continue
        reason = _check(message_view, index, tags, record)
        domain, selector = _text(tags.get(b"d")), _text(tags.get(b"s"))
        if reason == VALID:
            return MessageVerification(VALID, decision, domain, selector)
        first_failure = first_failure or MessageVerification(reason, None, domain, selector)
    if first_failure is not None:
        return first_failure  # the topmost signature that covers the decision header
    return _refused("malformed_signature" if malformed else "decision_header_not_signed")


def parse_decision(value: bytes) -> dict[str, str]:
    """Read a decision header value, `SG-...; verdict=...; policy=<16 hex>; at=<RFC 3339 UTC>`.

    Folding is undone first. Raises ValueError for a bad reference, or a part that is missing,
    repeated, unknown or of the wrong form.
    """
    try:
        text = re.sub(r"\r?\n(?=[ \t])", "", value.decode("ascii")).strip()
    except UnicodeDecodeError:
        raise ValueError("the decision header is not ASCII") from None
    ref, *parts = (part.strip() for part in text.split(";"))
    if not is_reference(ref):
        raise ValueError("the decision header does not start with an SG- reference")
    decision = {"ref": ref}
    for part in parts:
        name, sep, part_value = (piece.strip() for piece in part.partition("="))
        if not sep or name not in _DECISION_PARTS or name in decision:
            raise ValueError(f"the decision header has an unexpected part {name[:20]!r}")
        if _DECISION_FORMS[name].fullmatch(part_value) is None:
            raise ValueError(f"the decision header's {name} is malformed")
        decision[name] = part_value
    missing = [name for name in _DECISION_PARTS if name not in decision]
    if missing:
        raise ValueError(f"the decision header lacks {', '.join(missing)}")
    return decision


def _parse(message: bytes) -> _DkimMessage:
    try:
        parsed: _DkimMessage = dkimpy.DKIM(message, signature_algorithm=ALGORITHM)
    except dkimpy.DKIMException:
        # dkimpy's text quotes the offending header line: never pass it on.
        raise ValueError("a line of the header section is not a header field") from None
    return parsed


def _values(message_view: _DkimMessage, name: bytes) -> list[bytes]:
    """The raw values of every field called `name` (lower case), top to bottom."""
    return [value for field_name, value in message_view.headers if field_name.lower() == name]


def _tags(value: bytes) -> dict[bytes, bytes] | None:
    try:
        tags: dict[bytes, bytes] = dkimpy.util.parse_tag_value(value)
    except dkimpy.util.InvalidTagValueList:
        return None
    return tags


def _signed_names(tags: dict[bytes, bytes]) -> list[bytes]:
    return [name.strip().lower() for name in tags.get(b"h", b"").split(b":")]


def _check(message_view: _DkimMessage, index: int, tags: dict[bytes, bytes], record: bytes) -> str:
    """Verify signature `index` against `record`, answered as the only DNS entry there is."""
    name = tags.get(b"s", b"") + b"._domainkey." + tags.get(b"d", b"") + b"."

    def lookup(query: bytes, timeout: float = 5) -> bytes | None:  # noqa: ARG001  (dkimpy's signature)
        return record if query == name else None

    try:
        verified = message_view.verify(idx=index, dnsfunc=lookup)
    except dkimpy.ValidationError as exc:
        return "body_changed" if str(exc).startswith(_BODY_HASH_MISMATCH) else "malformed_signature"
    except (dkimpy.DKIMException, ValueError):  # PyNaCl refuses a b= of the wrong length
        return "malformed_signature"
    return VALID if verified else "bad_signature"


def _text(value: bytes | None) -> str | None:
    return None if value is None else value.decode("ascii", "replace")


def _refused(reason: str) -> MessageVerification:
    return MessageVerification(reason, None)
