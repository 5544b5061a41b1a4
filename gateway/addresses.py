"""Strict RFC 5321 envelope paths: parse, check, normalise; refuse, never repair.

`parse_path` reads the raw text after `MAIL FROM:` or `RCPT TO:` (aiosmtpd's own parser is
lenient and is not trusted). Our own grammar runs first; email-validator (no DNS) then checks
and normalises what passed, and the domain becomes its lower-case ASCII A-label. Anything that
would need fixing is an `AddressError` with one of these stable reason codes:

    bad_syntax          no angle brackets, comments, white space, encoded words, control
                        characters, backslash, quoted local part, bad dots or labels
    routing_in_address  source route, `%` or `!` in the local part, more than one `@`
    ip_literal          `[1.2.3.4]`, `[IPv6:...]` or a bare dotted quad as the domain
    invalid_utf8        the line was not UTF-8 (decoded with errors="surrogateescape")
    smtputf8_required   non-ASCII without the SMTPUTF8 parameter on MAIL
    too_long            local part > 64, domain > 255 or path > 256 octets

An error's `detail` never repeats the address, so it is safe to log.
"""

from __future__ import annotations

import ipaddress
import re
import unicodedata
from dataclasses import dataclass

import idna
from email_validator import EmailNotValidError, validate_email

from gateway.errors import AddressError

BAD_SYNTAX = "bad_syntax"
ROUTING_IN_ADDRESS = "routing_in_address"
IP_LITERAL = "ip_literal"
INVALID_UTF8 = "invalid_utf8"
SMTPUTF8_REQUIRED = "smtputf8_required"
TOO_LONG = "too_long"

MAX_LOCAL = 64
MAX_DOMAIN = 255
MAX_PATH = 256

_ATEXT = re.compile(r"[A-Za-z0-9#$&'*+/=?^_`{|}~-]+")
_ASCII_LABEL = re.compile(r"[A-Za-z0-9]([A-Za-z0-9-]*[A-Za-z0-9])?")
_KEYWORD = re.compile(r"[A-Za-z0-9][A-Za-z0-9-]*")
_VALUE = re.compile(r"[\x21-\x3c\x3e-\x7e]+")
_UNICODE_DOTS = frozenset("\u3002\uff0e\uff61")


@dataclass(frozen=True)
class Address:
    """A checked mailbox: the local part as sent and the domain as a lower-case A-label."""

    local: str  # personal data: never log it
    domain: str

    @property
    def normalised(self) -> str:
        """`local@domain`: the form pseudonyms are computed over."""
        return f"{self.local}@{self.domain}"


@dataclass(frozen=True)
class MailPath:
    """A parsed MAIL or RCPT argument: the address (None for `<>`) and its ESMTP parameters."""

    address: Address | None
    params: tuple[tuple[str, str | None], ...]

    def has(self, name: str) -> bool:
        """Tell whether parameter `name` (any case) was given, with or without a value."""
        wanted = name.upper()
        return any(key == wanted for key, _ in self.params)

    def param(self, name: str) -> str | None:
        """Return the value of parameter `name` (any case); None when absent or valueless."""
        wanted = name.upper()
        for key, value in self.params:
            if key == wanted:
                return value
        return None


def parse_path(argument: str, *, smtputf8: bool | None = None) -> MailPath:
    """Parse `<local@domain> PARAMS` strictly.

    `smtputf8` says whether this transaction declared SMTPUTF8; None (for MAIL) means "take it
    from this argument's own parameters". Leading spaces before `<` are allowed.
    """
    _check_characters(argument)
    text = argument.lstrip(" ")
    if not text.startswith("<"):
        raise AddressError(BAD_SYNTAX, "the path must be enclosed in angle brackets")
    end = text.find(">")
    if end < 0:
        raise AddressError(BAD_SYNTAX, "the path must be enclosed in angle brackets")
    inner, rest = text[1:end], text[end + 1 :]
    if rest and not rest.startswith(" "):
        raise AddressError(BAD_SYNTAX, "text after the path must be parameters")
    params = _parse_params(rest)
    declared = any(key == "SMTPUTF8" for key, _ in params) if smtputf8 is None else smtputf8
    if not inner:
        return MailPath(None, params)
    if len(inner.encode("utf-8", "surrogateescape")) + 2 > MAX_PATH:
        raise AddressError(TOO_LONG, f"the path is longer than {MAX_PATH} octets")
    return MailPath(_parse_mailbox(inner, smtputf8=declared), params)


def parse_address(text: str, *, smtputf8: bool = False) -> Address:
    """Parse a bare `local@domain` (no angle brackets) with the same strict rules."""
    _check_characters(text)
    if text.startswith("<") or text.endswith(">"):
        raise AddressError(BAD_SYNTAX, "give the address without angle brackets")
    if len(text.encode("utf-8")) + 2 > MAX_PATH:
        raise AddressError(TOO_LONG, f"the path is longer than {MAX_PATH} octets")
    return _parse_mailbox(text, smtputf8=smtputf8)


def _check_characters(text: str) -> None:
    """Refuse invalid UTF-8 and control characters anywhere in the argument."""
    if any("\ud800" <= char <= "\udfff" for char in text):
        raise AddressError(INVALID_UTF8, "the argument is not valid UTF-8")
    if any(ord(char) < 0x20 or ord(char) == 0x7F for char in text):
        raise AddressError(BAD_SYNTAX, "control characters are not allowed")


def _parse_params(rest: str) -> tuple[tuple[str, str | None], ...]:
    params: list[tuple[str, str | None]] = []
    seen: set[str] = set()
    for word in rest.split(" "):
        if not word:
            continue
        keyword, has_value, value = word.partition("=")
        if not _KEYWORD.fullmatch(keyword):
            raise AddressError(BAD_SYNTAX, "malformed ESMTP parameter keyword")
        if has_value and not _VALUE.fullmatch(value):
            raise AddressError(BAD_SYNTAX, f"malformed value for ESMTP parameter {keyword.upper()}")
        keyword = keyword.upper()
        if keyword in seen:
            raise AddressError(BAD_SYNTAX, f"ESMTP parameter {keyword} given twice")
        seen.add(keyword)
        params.append((keyword, value if has_value else None))
    return tuple(params)


def _parse_mailbox(text: str, *, smtputf8: bool) -> Address:
    """Check `local@domain` with our own grammar, then normalise with email-validator."""
    if text.startswith("@"):
        raise AddressError(ROUTING_IN_ADDRESS, "source routes are not accepted")
    if text.startswith('"'):
        if text.count("@") > 1:
            raise AddressError(ROUTING_IN_ADDRESS, "quoted local part containing @")
        raise AddressError(BAD_SYNTAX, "quoted local parts are not accepted")
    if "(" in text or ")" in text:
        raise AddressError(BAD_SYNTAX, "comments are not accepted")
    if "=?" in text:
        raise AddressError(BAD_SYNTAX, "encoded words are not accepted")
    if "\\" in text or '"' in text:
        raise AddressError(BAD_SYNTAX, "backslashes and quotes are not accepted")
    if any(unicodedata.category(char)[0] in "ZC" for char in text):
        raise AddressError(BAD_SYNTAX, "white space or invisible characters in the path")
    local, at, domain = text.rpartition("@")
    if not at:
        raise AddressError(BAD_SYNTAX, "the address has no @")
    if "@" in local:
        raise AddressError(ROUTING_IN_ADDRESS, "more than one @ in the address")
    if "%" in local or "!" in local:
        raise AddressError(ROUTING_IN_ADDRESS, "% or ! in the local part")
    if domain.startswith("[") or ":" in domain:
        raise AddressError(IP_LITERAL, "address literals are not accepted")
    _check_local(local, smtputf8=smtputf8)
    _check_domain(domain, smtputf8=smtputf8)
    return _normalise(local, domain, smtputf8=smtputf8)


def _check_local(local: str, *, smtputf8: bool) -> None:
    if not local:
        raise AddressError(BAD_SYNTAX, "the local part is empty")
    if len(local.encode("utf-8")) > MAX_LOCAL:
        raise AddressError(TOO_LONG, f"the local part is longer than {MAX_LOCAL} octets")
    if not local.isascii() and not smtputf8:
        raise AddressError(SMTPUTF8_REQUIRED, "non-ASCII local part without SMTPUTF8")
    for atom in local.split("."):
        if not atom:
            raise AddressError(BAD_SYNTAX, "empty atom in the local part (misplaced dot)")
        ascii_part = "".join(char for char in atom if char.isascii())
        if ascii_part and not _ATEXT.fullmatch(ascii_part):
            raise AddressError(BAD_SYNTAX, "character not allowed in the local part")
    if unicodedata.normalize("NFC", local) != local:
        raise AddressError(BAD_SYNTAX, "the local part is not in Unicode normal form C")


def _check_domain(domain: str, *, smtputf8: bool) -> None:
    if not domain:
        raise AddressError(BAD_SYNTAX, "the domain is empty")
    if any(char in _UNICODE_DOTS for char in domain):
        raise AddressError(BAD_SYNTAX, "only the ASCII full stop may separate labels")
    if len(domain.encode("utf-8")) > MAX_DOMAIN:
        raise AddressError(TOO_LONG, f"the domain is longer than {MAX_DOMAIN} octets")
    if not domain.isascii() and not smtputf8:
        raise AddressError(SMTPUTF8_REQUIRED, "non-ASCII domain without SMTPUTF8")
    if is_ipv4(domain):
        raise AddressError(IP_LITERAL, "an IP address is not a domain")
    for label in domain.split("."):
        if not label:
            raise AddressError(BAD_SYNTAX, "empty label in the domain (misplaced dot)")
        if label.startswith("-") or label.endswith("-"):
            raise AddressError(BAD_SYNTAX, "a domain label may not start or end with -")
        if label.isascii():
            if len(label) > 63:
                raise AddressError(BAD_SYNTAX, "a domain label is longer than 63 octets")
            if not _ASCII_LABEL.fullmatch(label):
                raise AddressError(BAD_SYNTAX, "character not allowed in the domain")


def is_ipv4(domain: str) -> bool:
    """True when `domain` is a dotted-quad IPv4 address, not a name."""
    try:
        ipaddress.IPv4Address(domain)
    except ValueError:
        return False
    return True


def _normalise(local: str, domain: str, *, smtputf8: bool) -> Address:
    try:
        result = validate_email(
            f"{local}@{domain}",
            check_deliverability=False,
            allow_smtputf8=smtputf8,
            allow_quoted_local=False,
            allow_domain_literal=False,
        )
    except EmailNotValidError as exc:
        reason = TOO_LONG if "too long" in str(exc) else BAD_SYNTAX
        raise AddressError(reason, "refused by the address validator") from exc
    ascii_domain = result.ascii_domain.lower()
    if result.local_part != local or _to_unicode(ascii_domain) != domain.lower():
        # The validator mapped something (e.g. fullwidth letters) to a different form:
        # accepting it would be "normalise then allow".
        raise AddressError(BAD_SYNTAX, "the address is not in its canonical form")
    return Address(local=local, domain=ascii_domain)


def _to_unicode(ascii_domain: str) -> str:
    try:
        return idna.decode(ascii_domain)
    except idna.IDNAError as exc:
        raise AddressError(BAD_SYNTAX, "the domain is not valid IDNA") from exc
