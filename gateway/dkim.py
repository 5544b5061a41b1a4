"""DKIM signatures that prove a released message passed the gateway (RFC 6376, RFC 8463).

The worker signs each released message after adding the decision header: one ed25519-sha256
DKIM-Signature, c=relaxed/relaxed, over the whole body (no l= tag) and the fields named in
SIGNED_HEADERS, the decision header first. Every name goes twice into h= (RFC 6376 section
8.15): the second, absent instance is signed as empty, so a field of that name added later, such
as a second decision header or a second From, breaks the signature for every DKIM verifier.

The message is never held whole to sign it: `MessageScan` takes it in pieces, keeps the header
section and hashes the body as it passes (`RelaxedBodyHash`), and `sign_scan` builds the field
from those two alone, signing with `cryptography`'s Ed25519. dkimpy still reads the header
section (so what counts as malformed is what it always was), folds the field, and verifies.

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
import hashlib
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import dkim as dkimpy  # type: ignore[import-untyped]  # dkimpy ships no type hints
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

# A header section longer than this is not signed: ten times what the DATA reader accepts.
MAX_HEADER_SECTION = 1024 * 1024

_SIGNATURE_NAME = b"DKIM-Signature"
_WSP = re.compile(rb"[\t ]+")
_LINE_END = re.compile(rb" ?\r?\n")  # after white space is compressed: linear, never rescans
_UNFOLD = re.compile(rb"\r?\n")
_EMPTY_LINE = re.compile(rb"(?:\A|\n)(\r?\n)")  # the line end of the first empty line
_CRLFS = b"\r\n" * 4096

_DnsLookup = Callable[..., bytes | None]


class _DkimMessage(Protocol):
    """The part of dkimpy's `DKIM` object this module uses."""

    headers: list[list[bytes]]  # [name, raw value with folding and CRLF], top to bottom

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


class RelaxedBodyHash:
    """SHA-256 of a message body under relaxed canonicalisation (RFC 6376 3.4.4), fed in pieces.

    The same result as dkimpy gives for the whole body: a bare LF ends a line as CRLF does, a
    lone CR is an ordinary byte, white-space runs become one space, white space before a line
    end goes, and empty lines at the end are ignored (an empty body hashes as nothing). Memory
    is the piece fed plus two bytes: the end of the data so far that the next piece may change
    (a white-space run, a CR that a LF may follow); empty lines are held back as a count until
    text follows them. Every pattern is linear: no white-space run is ever scanned twice.
    """

    def __init__(self) -> None:
        self._hash = hashlib.sha256()
        self._carry = b""  # b"", b" ", b"\r" or b" \r": undecided until more data comes
        self._held = 0  # line ends not hashed yet: the first ends the last text, the rest are empty
        self._text = False  # some text hashed: the body is not empty
        self._digest: bytes | None = None

    def update(self, data: bytes) -> None:
        """Add the next piece of the body."""
        if self._digest is not None:
            raise ValueError("the body hash is already finished")
        if not data:
            return
        data = _WSP.sub(b" ", self._carry + data)
        cr = data.endswith(b"\r")
        settled = (data[:-1] if cr else data).rstrip(b" ")
        self._carry = (b" " if len(settled) < len(data) - cr else b"") + (b"\r" if cr else b"")
        self._add(_LINE_END.sub(b"\r\n", settled))

    def digest(self) -> bytes:
        """The SHA-256 digest of the canonical body; no more data may follow."""
        if self._digest is None:
            self._add(self._carry)  # a last line without a line end keeps its white space
            self._carry = b""
            if self._text:
                self._hash.update(b"\r\n")  # the last text line's end, or one added for it
            self._digest = self._hash.digest()
        return self._digest

    def _add(self, text: bytes) -> None:
        """Hash canonical text, holding back the line ends at its end."""
        if not text:
            return
        content_end = len(text.rstrip(b"\r\n"))
        ends = text[content_end:]  # CRLFs and lone CRs (text has no LF outside a CRLF)
        run = len(ends) - (ends.rfind(b"\r\r") + 1) if ends.endswith(b"\r\n") else 0
        run_start = len(text) - run
        if run_start:
            self._flush_held()
            self._hash.update(memoryview(text)[:run_start])
            self._text = True
        self._held += run // 2

    def _flush_held(self) -> None:
        while self._held:
            count = min(self._held, len(_CRLFS) // 2)
            self._hash.update(_CRLFS[: 2 * count])
            self._held -= count


class MessageScan:
    """One pass over a message fed in pieces: its header section and its relaxed body hash.

    The header section ends at the first empty line, lines split on CRLF or a bare LF, as
    dkimpy splits them; with no empty line the whole message is header section and the body
    is empty. At most `max_header` bytes of header section are kept: a longer one is marked
    `too_large` (it cannot be signed) and the body is not hashed.
    """

    def __init__(self, *, hash_body: bool = True, max_header: int = MAX_HEADER_SECTION) -> None:
        self.max_header = max_header
        self.too_large = False
        self._pending: bytearray | None = bytearray()  # None once the header section is known
        self._header = b""
        self._body = RelaxedBodyHash() if hash_body else None
        self._finished = False

    @property
    def header(self) -> bytes:
        """The header section, with its last line end, without the empty line (after finish)."""
        if not self._finished:
            raise ValueError("the message scan is not finished")
        return self._header

    def update(self, data: bytes) -> None:
        """Take the next piece of the message."""
        if self._finished:
            raise ValueError("the message scan is already finished")
        pending = self._pending
        if pending is not None:
            start = max(0, len(pending) - 2)  # an empty line is at most 3 bytes: b"\n\r\n"
            pending += data
            blank = _EMPTY_LINE.search(pending, start)
            header_end = len(pending) if blank is None else blank.start(1)
            if header_end > self.max_header:
                self.too_large, self._pending = True, None
                self._header = bytes(pending[: self.max_header])
                return
            if blank is None:
                return
            self._header = bytes(pending[:header_end])
            data = bytes(pending[blank.end(1) :])
            self._pending = None
        if self._body is not None and not self.too_large:
            self._body.update(data)

    def finish(self) -> None:
        """Mark the end of the message."""
        if self._pending is not None:  # no empty line: all header section, empty body
            self._header, self._pending = bytes(self._pending), None
        self._finished = True

    def body_hash(self) -> bytes:
        """The SHA-256 digest of the relaxed canonical body (after finish)."""
        if not self._finished or self._body is None:
            raise ValueError("the body was not hashed, or the scan is not finished")
        return self._body.digest()


def sign(message: bytes, *, key: Ed25519PrivateKey, domain: str, selector: str) -> bytes:
    """The DKIM-Signature field, ending in CRLF, to put on top of the released `message`.

    Raises ValueError when the message has not exactly one decision header, when a line of its
    header section is not a header field, or when domain or selector is not ASCII. The message
    text never appears in the error.
    """
    scan = MessageScan()
    scan.update(message)
    scan.finish()
    return sign_scan(scan, key=key, domain=domain, selector=selector)


def sign_scan(
    scan: MessageScan,
    *,
    key: Ed25519PrivateKey,
    domain: str,
    selector: str,
    timestamp: int | None = None,
) -> bytes:
    """The DKIM-Signature field for a message scanned in pieces (see `sign`).

    Only the header section and the body hash are needed, so the body is never held whole.
    Also raises ValueError for a header section over the scan's limit.
    """
    if scan.too_large:
        raise ValueError("the header section is too large to sign")
    fields = _header_fields(scan.header)
    count = sum(1 for name, _ in fields if name.lower() == DECISION)
    if count != 1:
        raise ValueError(f"a message to sign needs exactly one {DECISION_FIELD} field, not {count}")
    domain_bytes, selector_bytes = domain.encode("ascii"), selector.encode("ascii")
    when = int(time.time()) if timestamp is None else timestamp
    tags = [
        (b"v", b"1"),
        (b"a", ALGORITHM),
        (b"c", b"/".join(_CANONICALIZATION)),
        (b"d", domain_bytes),
        (b"i", b"@" + domain_bytes),
        (b"q", b"dns/txt"),
        (b"s", selector_bytes),
        (b"t", str(when).encode("ascii")),
        (b"h", b" : ".join(_H_TAG)),
        (b"bh", base64.b64encode(scan.body_hash())),
        (b"b", b"0" * 60),  # dkimpy's placeholder: b= folds onto a line of its own
    ]
    # As dkimpy does: fold with the placeholder, then sign the field with b= empty.
    unsigned = _fold(b"; ".join(b"=".join(tag) for tag in tags))
    unsigned = bytes(dkimpy.RE_BTAG.sub(rb"\1", unsigned))
    digest = hashlib.sha256(_signed_header_text(fields, b" " + unsigned)).digest()
    tags[-1] = (b"b", base64.b64encode(key.sign(digest)))  # RFC 8463: Ed25519 over the SHA-256
    return _SIGNATURE_NAME + b": " + _fold(b"; ".join(b"=".join(tag) for tag in tags) + b"\r\n")


def _header_fields(header: bytes) -> list[tuple[bytes, bytes]]:
    """The header section's fields as dkimpy reads them: (name, raw value with its CRLFs).

    dkimpy decides what is malformed: a line that is neither a field, a continuation nor an
    mbox `From ` line (which it skips), or a continuation line with no field before it.
    """
    try:
        parsed, _ = dkimpy.rfc822_parse(header)
    except (dkimpy.DKIMException, IndexError):
        # dkimpy's text quotes the offending header line: never pass it on.
        raise ValueError("a line of the header section is not a header field") from None
    return [(bytes(name), bytes(value)) for name, value in parsed]


def _relaxed_field(name: bytes, value: bytes) -> bytes:
    """One field in relaxed header canonicalisation (RFC 6376 3.4.2), without its CRLF."""
    unfolded = _WSP.sub(b" ", _UNFOLD.sub(b"", value)).strip()
    return name.lower().rstrip() + b":" + unfolded


def _signed_header_text(fields: list[tuple[bytes, bytes]], signature_value: bytes) -> bytes:
    """What the signature signs: each field named in h=, then the DKIM-Signature field.

    Each name in h= takes the lowest field of that name not taken yet, so the second instance
    of a name that appears once signs nothing and stops a field of that name being added.
    """
    taken: dict[bytes, int] = {}
    lines: list[bytes] = []
    for wanted in _H_TAG:
        index = taken.get(wanted, len(fields))
        while index > 0:
            index -= 1
            name, value = fields[index]
            if name.lower() == wanted:
                lines.append(_relaxed_field(name, value) + b"\r\n")
                break
        taken[wanted] = index
    lines.append(_relaxed_field(_SIGNATURE_NAME, signature_value))  # last, without CRLF
    return b"".join(lines)


def _fold(value: bytes) -> bytes:
    """Fold the signature's value as dkimpy folds it (lines of at most 72 characters)."""
    return bytes(dkimpy.fold(value, namelen=len(_SIGNATURE_NAME), linesep=b"\r\n"))


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
