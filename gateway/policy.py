"""The secure-domain policy (SPEC section 3): parse, version, classify.

Matching compares the exact lower-case ASCII labels of the domain that delivery will use.
`subdomains = false` matches the entry's domain only (rule text `nhs.net`); `subdomains = true`
matches strictly below it (rule text `*.gcsx.gov.uk`). When several entries match, the most
specific one decides. Anything non-ASCII, an IP literal, a trailing dot or an empty label is
insecure: never "normalise then allow". An entry past its `review_by` date no longer counts.

Reason codes of an insecure `DomainVerdict`: `insecure_domain`, `entry_expired`, `ip_literal`,
`not_a_domain`.

The policy version is the SHA-256 hex digest of this canonical form, which holds exactly what
affects decisions (notes, provenance, `broad` and file positions do not):

    json.dumps({"on_insecure": "hold",
                "secure_domains": [{"domain": ..., "subdomains": ..., "review_by": "2027-03-01"
                                    or null}, ...sorted by domain]},
               sort_keys=True, separators=(",", ":"), ensure_ascii=True)

encoded as UTF-8.

`[defaults] purposes` is the vocabulary of sharing purposes (`X-Sharing-Purpose`) that may be
recorded in the transfer log. It affects no decision, so it is not part of the version.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from functools import cache
from pathlib import Path

import idna
from publicsuffixlist import PublicSuffixList

from gateway import tomlfile
from gateway.addresses import is_ipv4, parse_address
from gateway.errors import AddressError, ConfigError, PolicyError

INSECURE_DOMAIN = "insecure_domain"
ENTRY_EXPIRED = "entry_expired"
IP_LITERAL = "ip_literal"
NOT_A_DOMAIN = "not_a_domain"

REVIEW_WARNING = dt.timedelta(days=30)

_LABEL = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?")


class OnInsecure(StrEnum):
    """What happens to mail for an insecure domain."""

    HOLD = "hold"
    REJECT = "reject"


UNLISTED_PURPOSE = "unlisted"
_PURPOSE = re.compile(r"[a-z0-9][a-z0-9_-]{0,63}")


@dataclass(frozen=True)
class SecureDomain:
    """One `[[secure_domains]]` entry and where it was written."""

    domain: str
    subdomains: bool
    note: str
    source: str
    approved_by: str
    review_by: dt.date | None
    broad: bool
    file: Path
    line: int | None

    @property
    def rule(self) -> str:
        """The entry as a rule: `nhs.net` (exact) or `*.gcsx.gov.uk` (strictly below)."""
        return f"*.{self.domain}" if self.subdomains else self.domain

    @property
    def where(self) -> str:
        """`file:line` of the entry."""
        return f"{self.file}:{self.line}" if self.line is not None else str(self.file)

    def expired(self, today: dt.date) -> bool:
        """Tell whether `today` is after the entry's `review_by` date."""
        return self.review_by is not None and self.review_by < today


@dataclass(frozen=True)
class DomainVerdict:
    """Whether one domain is secure, the entry that decided (`rule`) and why not (`reason`)."""

    domain: str
    secure: bool
    rule: str | None
    reason: str | None


@dataclass(frozen=True)
class Policy:
    """The secure-domain policy in force."""

    entries: tuple[SecureDomain, ...]
    on_insecure: OnInsecure
    version: str
    purposes: frozenset[str] = frozenset()
    _index: dict[tuple[str, bool], SecureDomain] = field(
        init=False, repr=False, compare=False, hash=False
    )

    def __post_init__(self) -> None:
        index = {(entry.domain, entry.subdomains): entry for entry in self.entries}
        object.__setattr__(self, "_index", index)

    @property
    def short_version(self) -> str:
        """The first 16 hex digits of the version, as in the decision header."""
        return self.version[:16]

    def classify(self, domain: str, today: dt.date) -> DomainVerdict:
        """Decide whether mail to `domain` (as delivery will use it) is secure on `today`."""
        if not domain.isascii():
            return DomainVerdict(domain, secure=False, rule=None, reason=NOT_A_DOMAIN)
        name = domain.lower()
        if name.startswith("[") or ":" in name or is_ipv4(name):
            return DomainVerdict(domain, secure=False, rule=None, reason=IP_LITERAL)
        labels = name.split(".")
        if not all(_LABEL.fullmatch(label) for label in labels):
            return DomainVerdict(domain, secure=False, rule=None, reason=NOT_A_DOMAIN)
        for start in range(len(labels)):
            entry = self._index.get((".".join(labels[start:]), start > 0))
            if entry is None:
                continue
            if entry.expired(today):
                return DomainVerdict(name, secure=False, rule=entry.rule, reason=ENTRY_EXPIRED)
            return DomainVerdict(name, secure=True, rule=entry.rule, reason=None)
        return DomainVerdict(name, secure=False, rule=None, reason=INSECURE_DOMAIN)

    def purpose(self, header_value: bytes | None) -> str | None:
        """The sharing purpose to record for an `X-Sharing-Purpose` value.

        Only a word of the policy's vocabulary is ever recorded; any other value (free text
        may name a person) is recorded as `unlisted`, and no header as nothing.
        """
        if header_value is None:
            return None
        word = header_value.strip().lower().decode("ascii", "replace")
        return word if word in self.purposes else UNLISTED_PURPOSE

    def warnings(self, today: dt.date) -> tuple[str, ...]:
        """Things an admin should know that do not make the policy invalid."""
        found: list[str] = []
        if not self.entries:
            found.append("policy: no secure_domains: every message will be held or refused")
        for entry in self.entries:
            if entry.review_by is None:
                continue
            if entry.expired(today):
                found.append(
                    f"{entry.where}: {entry.domain}: review_by {entry.review_by} has passed;"
                    " the entry no longer counts"
                )
            elif entry.review_by - today <= REVIEW_WARNING:
                found.append(
                    f"{entry.where}: {entry.domain}: review_by {entry.review_by} is within 30 days"
                )
        return tuple(found)


@dataclass(frozen=True)
class Explanation:
    """The answer of `gateway policy explain` for one address."""

    address: str
    domain: str | None
    secure: bool
    rule: str | None
    reason: str | None


def explain(policy: Policy, address_text: str, today: dt.date) -> Explanation:
    """Classify the domain of `address_text` (an address, or a bare domain without `@`)."""
    if "@" not in address_text:
        verdict = policy.classify(address_text, today)
        return Explanation(
            address_text, verdict.domain, verdict.secure, verdict.rule, verdict.reason
        )
    try:
        address = parse_address(address_text, smtputf8=True)
    except AddressError as exc:
        return Explanation(address_text, None, secure=False, rule=None, reason=exc.reason)
    verdict = policy.classify(address.domain, today)
    return Explanation(address_text, address.domain, verdict.secure, verdict.rule, verdict.reason)


def canonical_form(entries: Sequence[SecureDomain], on_insecure: OnInsecure) -> bytes:
    """Return the bytes whose SHA-256 is the policy version (see the module docstring)."""
    body = {
        "on_insecure": str(on_insecure),
        "secure_domains": [
            {
                "domain": entry.domain,
                "subdomains": entry.subdomains,
                "review_by": entry.review_by.isoformat() if entry.review_by else None,
            }
            for entry in sorted(entries, key=lambda entry: entry.domain)
        ],
    }
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return text.encode("utf-8")


def parse_policy(sources: Sequence[tuple[Path, str]]) -> Policy:
    """Build a policy from `(file, text)` pairs; any problem is a PolicyError naming file:line."""
    try:
        return _parse(sources)
    except PolicyError:
        raise
    except ConfigError as exc:
        raise PolicyError(exc.problem, file=exc.file, line=exc.line, key=exc.key) from exc


def load_policy(path: Path) -> Policy:
    """Read one policy file, or every `*.toml` file of a folder in name order."""
    if path.is_dir():
        files = sorted(
            child
            for child in path.glob("*.toml")
            if child.is_file() and not child.name.startswith(".")
        )
        if not files:
            raise PolicyError("the policy folder holds no *.toml files", file=path)
    else:
        files = [path]
    sources: list[tuple[Path, str]] = []
    for file in files:
        try:
            raw = file.read_bytes()
        except OSError as exc:
            raise PolicyError(f"cannot read: {exc.strerror or exc}", file=file) from exc
        try:
            sources.append((file, raw.decode("utf-8")))
        except UnicodeDecodeError as exc:
            raise PolicyError("not UTF-8 text", file=file) from exc
    return parse_policy(sources)


def _parse(sources: Sequence[tuple[Path, str]]) -> Policy:
    on_insecure = OnInsecure.HOLD
    defaults_at: str | None = None
    purposes: frozenset[str] = frozenset()
    entries: dict[str, SecureDomain] = {}
    for file, text in sources:
        root = tomlfile.parse_text(text, file)
        if root.has("defaults"):
            defaults = root.table("defaults")
            where = f"{file}:{root.locator.line_of('defaults', 0, None)}"
            if defaults_at is not None:
                raise defaults.error(None, f"[defaults] is already given at {defaults_at}")
            defaults_at = where
            on_insecure = OnInsecure(
                defaults.string("on_insecure", "hold", choices=tuple(OnInsecure))
            )
            purposes = frozenset(defaults.strings("purposes", []))
            for word in purposes:
                if not _PURPOSE.fullmatch(word):
                    raise defaults.error(
                        "purposes", f'"{word}" is not a purpose word (a-z, 0-9, _ and -, 1-64)'
                    )
            defaults.finish()
        for table in root.tables("secure_domains"):
            entry = _entry(table, file)
            earlier = entries.get(entry.domain)
            if earlier is not None:
                raise table.error(
                    "domain", f"{entry.domain} is listed twice (also at {earlier.where})"
                )
            entries[entry.domain] = entry
        root.finish()
    ordered = tuple(entries.values())
    version = hashlib.sha256(canonical_form(ordered, on_insecure)).hexdigest()
    return Policy(entries=ordered, on_insecure=on_insecure, version=version, purposes=purposes)


def _entry(table: tomlfile.Table, file: Path) -> SecureDomain:
    domain = table.string("domain")
    problem = _domain_problem(domain)
    if problem:
        raise table.error("domain", problem)
    broad = table.boolean("broad", default=False)
    if _public_suffixes().is_public(domain) and not broad:
        raise table.error(
            "domain", f"{domain} is a public suffix: too broad unless the entry says broad = true"
        )
    entry = SecureDomain(
        domain=domain,
        subdomains=table.boolean("subdomains", default=False),
        note=table.string("note", ""),
        source=table.string("source", ""),
        approved_by=table.string("approved_by", ""),
        review_by=table.date("review_by", None),
        broad=broad,
        file=file,
        line=table.locator.line_of(table.name, table.index, "domain"),
    )
    table.finish()
    return entry


def _domain_problem(domain: str) -> str | None:
    """Why `domain` cannot be an entry, or None when it is a valid lower-case A-label domain."""
    if not domain.isascii() or domain != domain.lower():
        return f'"{domain}" must be a lower-case ASCII (A-label) domain'
    labels = domain.split(".")
    if len(labels) < 2 or not all(_LABEL.fullmatch(label) for label in labels):
        return f'"{domain}" must be a domain of at least two labels, with no trailing dot'
    if is_ipv4(domain):
        return f'"{domain}" is an IP address, not a domain'
    for label in labels:
        if label.startswith("xn--"):
            try:
                idna.decode(label)
            except idna.IDNAError:
                return f'"{domain}": {label} is not a valid A-label'
    return None


@cache
def _public_suffixes() -> PublicSuffixList:
    """Load the public suffix list shipped with `publicsuffixlist` (ICANN and private)."""
    return PublicSuffixList()
