"""Reading the transfer log for auditors: search it, and export it as CSV or JSON Lines.

Pure over records, plus one thin reader of the log's files (`gateway.audit.log_files`, oldest
first). `search(folder, filters)` yields the records that match every filter given, in log
order. It judges nothing: a line that is not a JSON record (a torn write, damage) is skipped,
and only counted if the caller asks; chain, canonical form and signatures are left to verify.

Speed: most lines are rejected before `json.loads`. Each filter that compares a string gives a
needle, the value as it is JSON-encoded in a canonical line (`"nhs.net"`, `"p:1c1b..."`); the
most selective needle is searched with `bytes.find` over 1 MiB blocks, so lines without it are
never split out, and the other needles are checked with `in` on each candidate line. A time
range compares the `ts` string sliced from its fixed place at the start of a canonical line
(`{"seq":N,"ts":"2026-11-25T03:58:07.760Z"`): RFC 3339 UTC strings with milliseconds sort as
the moments they name. These are necessary conditions only; every candidate is then parsed and
matched exactly (`matches`).

CSV (`export_csv`) has one row per record and the fixed columns of `CSV_COLUMNS`; JSON Lines
(`export_jsonl`) writes each record's canonical line, so an exported record has the same bytes
as in the log. Both write text to a stream the caller opened with `newline=""` and UTF-8.
"""

from __future__ import annotations

import csv
import json
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TextIO

import idna

from gateway.audit import canonical_line, log_files
from gateway.errors import AuditError

CSV_COLUMNS = (
    "seq",
    "ts",
    "event",
    "ref",
    "client",
    "verdict",
    "reasons",
    "policy",
    "sender_domain",
    "sender_pseudonym",
    "recipient_domains",
    "recipient_pseudonyms",
    "secure",
    "host",
    "tls_version",
    "tls_verified",
    "response",
    "reason",
    "marking",
    "purpose",
    "size",
    "digest",
    "actor",
    "error",
)
LIST_SEPARATOR = "; "
POLICY_DIGITS = 16  # as in the X-Safeguarding-Decision header
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")  # OWASP: CSV injection

_BLOCK = 1 << 20
_TS_KEY = b',"ts":"'
_SEQ_PREFIX = b'{"seq":'
_TS_LENGTH = len("2026-11-25T03:58:07.760Z")
_TS_SEARCH_END = len(_SEQ_PREFIX) + 20 + len(_TS_KEY)  # room for any seq's digits
_TIME_FORM = re.compile(
    r"\d{4}-\d{2}-\d{2}"
    r"(?:[Tt ]\d{2}:\d{2}(?::\d{2}(?:\.\d{1,9})?)?(?:[Zz]|[+-]\d{2}:\d{2})?)?"
)
_TIME_HINT = (
    "use a date (2026-11-25), a UTC time (2026-11-25T03:00) or RFC 3339 "
    "(2026-11-25T03:00:00Z, 2026-11-25T04:00:00+01:00)"
)


@dataclass(frozen=True)
class Filters:
    """What to look for; every filter given must match, and an empty Filters matches all.

    `since` is inclusive and `until` exclusive, on `ts`. `events` matches any of its names.
    `verdict` matches only `accepted` records. `domain` (a lower-case A-label) and `pseudonym`
    match the sender, the recipients and a refused recipient; `pseudonym` also matches the
    pseudonym list of delivery and hold-queue outcomes. The others compare one field exactly.
    """

    since: datetime | None = None
    until: datetime | None = None
    events: frozenset[str] = field(default_factory=frozenset)
    verdict: str | None = None
    domain: str | None = None
    client: str | None = None
    marking: str | None = None
    pseudonym: str | None = None
    ref: str | None = None

    def __post_init__(self) -> None:
        for name, moment in (("since", self.since), ("until", self.until)):
            if moment is not None and moment.utcoffset() is None:
                raise ValueError(f"{name} must be an aware datetime (with a time zone)")
        if self.since is not None and self.until is not None and self.since > self.until:
            raise ValueError("since is after until: the time range is empty")
        object.__setattr__(self, "events", frozenset(self.events))


def parse_time(text: str) -> datetime:
    """Parse a date, a date and time (UTC unless an offset or Z is given) or RFC 3339."""
    cleaned = text.strip()
    if _TIME_FORM.fullmatch(cleaned) is None:
        raise ValueError(f"{text!r} is not a time: {_TIME_HINT}")
    try:
        moment = datetime.fromisoformat(cleaned.upper().replace(" ", "T"))
    except ValueError as exc:
        raise ValueError(f"{text!r} is not a valid date or time: {_TIME_HINT}") from exc
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment


def normalise_domain(text: str) -> str:
    """Return a domain as the log writes it: lower case, A-label, without a final dot."""
    cleaned = text.strip().rstrip(".").lower()
    if not cleaned or "@" in cleaned:
        raise ValueError(f"{text!r} is not a domain")
    if cleaned.isascii():
        return cleaned
    try:
        return idna.encode(cleaned, uts46=True).decode("ascii")
    except idna.IDNAError as exc:
        raise ValueError(f"{text!r} is not a valid internationalised domain") from exc


# -- matching --------------------------------------------------------------------------------


def _mapping(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []


def _parties(record: dict[str, Any]) -> list[dict[str, Any]]:
    """The sender, the recipients and a refused recipient: objects with domain and pseudonym."""
    found = [party for party in _list(record.get("recipients")) if isinstance(party, dict)]
    for key in ("sender", "recipient"):
        party = record.get(key)
        if isinstance(party, dict):
            found.append(party)
    return found


def _has_pseudonym(record: dict[str, Any], alias: str) -> bool:
    if alias in _list(record.get("recipients")):
        return True
    return any(party.get("pseudonym") == alias for party in _parties(record))


def ts_bound(moment: datetime) -> str:
    """Render a bound as a log `ts` string, rounded up to the millisecond.

    Rounding up keeps string comparison exact for both ends: a record (whole milliseconds) is
    at or after `moment` exactly when its ts is at or after the rounded-up string.
    """
    utc = moment.astimezone(UTC)
    spare = utc.microsecond % 1000
    try:
        utc += timedelta(microseconds=(1000 - spare) % 1000)
    except OverflowError:
        return "9999-12-31T23:59:59.999Z~"  # after every ts
    return utc.replace(tzinfo=None).isoformat(timespec="milliseconds") + "Z"


def matches(
    record: dict[str, Any], filters: Filters, bounds: tuple[str, str] | None = None
) -> bool:
    """Tell whether a record matches every filter given (`bounds`: precomputed ts strings)."""
    if bounds is None:
        bounds = _bounds(filters)
    since, until = bounds
    if filters.since is not None or filters.until is not None:
        ts = record.get("ts")
        if not isinstance(ts, str) or not since <= ts < until:
            return False
    event = record.get("event")
    if filters.events and event not in filters.events:
        return False
    if filters.verdict is not None and (
        event != "accepted" or record.get("verdict") != filters.verdict
    ):
        return False
    for key, wanted in (
        ("client", filters.client),
        ("marking", filters.marking),
        ("ref", filters.ref),
    ):
        if wanted is not None and record.get(key) != wanted:
            return False
    if filters.domain is not None and not any(
        party.get("domain") == filters.domain for party in _parties(record)
    ):
        return False
    return filters.pseudonym is None or _has_pseudonym(record, filters.pseudonym)


def _bounds(filters: Filters) -> tuple[str, str]:
    since = "" if filters.since is None else ts_bound(filters.since)
    until = "~" if filters.until is None else ts_bound(filters.until)  # "~" sorts after digits
    return since, until


# -- reading ---------------------------------------------------------------------------------


def _needle(value: str) -> bytes:
    """The value as a canonical line holds it: a JSON string, non-ASCII escaped."""
    return json.dumps(value, ensure_ascii=True).encode("ascii")


@dataclass(frozen=True)
class _Plan:
    """Byte-level necessary conditions on a raw line, derived from Filters."""

    primary: bytes | None  # searched across whole blocks
    needles: tuple[bytes, ...]  # each must be in the line
    any_of: tuple[bytes, ...]  # one of them must be in the line (event names)
    since: bytes | None
    until: bytes | None

    @classmethod
    def of(cls, filters: Filters) -> _Plan:
        ordered = [  # most selective first
            filters.pseudonym,
            filters.ref,
            filters.domain,
            filters.client,
            filters.marking,
            filters.verdict,
        ]
        needles = [_needle(value) for value in ordered if value is not None]
        events = tuple(_needle(name) for name in sorted(filters.events))
        if len(events) == 1:
            needles.append(events[0])
            events = ()
        since, until = _bounds(filters)
        return cls(
            primary=needles[0] if needles else None,
            needles=tuple(needles[1:]),
            any_of=events,
            since=None if filters.since is None else since.encode("ascii"),
            until=None if filters.until is None else until.encode("ascii"),
        )

    def admits(self, line: bytes) -> bool:
        """Tell whether the line may match (False only when it cannot)."""
        for needle in self.needles:
            if needle not in line:
                return False
        if self.any_of and not any(needle in line for needle in self.any_of):
            return False
        if (self.since is not None or self.until is not None) and line.startswith(_SEQ_PREFIX):
            at = line.find(_TS_KEY, len(_SEQ_PREFIX), _TS_SEARCH_END)
            if at >= 0:
                start = at + len(_TS_KEY)
                ts = line[start : start + _TS_LENGTH]
                if self.since is not None and ts < self.since:
                    return False
                if self.until is not None and ts >= self.until:
                    return False
        return True


def _blocks(path: Path) -> Iterator[bytes]:
    """Yield a file's complete lines in blocks of about 1 MiB, separated by line feeds.

    A last line without its line feed (being written, or torn) is left out.
    """
    try:
        with path.open("rb") as handle:
            rest = b""
            while chunk := handle.read(_BLOCK):
                data = rest + chunk
                end = data.rfind(b"\n")
                if end < 0:
                    rest = data
                    continue
                rest = data[end + 1 :]
                if end:
                    yield data[:end]
    except OSError as exc:
        raise AuditError(f"{path}: cannot read the transfer log: {exc.strerror}") from exc


def _candidates(block: bytes, needle: bytes | None) -> Iterator[bytes]:
    """Yield the block's lines that contain needle (every line when needle is None)."""
    if needle is None:
        yield from block.split(b"\n")
        return
    position = 0
    while (hit := block.find(needle, position)) >= 0:
        start = block.rfind(b"\n", 0, hit) + 1
        end = block.find(b"\n", hit)
        if end < 0:
            end = len(block)
        yield block[start:end]
        position = end + 1


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _record(line: bytes) -> dict[str, Any] | None:
    """Return the record on a line, or None when the line is not one."""
    try:
        record = json.loads(line, parse_constant=_refuse_constant)
    except (ValueError, RecursionError):
        return None
    if not isinstance(record, dict):
        return None
    seq = record.get("seq")
    if (
        not isinstance(seq, int)
        or isinstance(seq, bool)
        or not isinstance(record.get("event"), str)
    ):
        return None
    return record


def search(
    folder: Path, filters: Filters, *, unreadable: list[str] | None = None
) -> Iterator[dict[str, Any]]:
    """Yield the records of the log in `folder` that match filters, in log order.

    A line that could have matched but is not a JSON record is skipped; when `unreadable` is
    given, the name of its file is appended to it (once per such line), so the caller can say
    that verify should judge them.
    """
    plan = _Plan.of(filters)
    bounds = _bounds(filters)
    for path in log_files(folder):
        for block in _blocks(path):
            for line in _candidates(block, plan.primary):
                if not plan.admits(line):
                    continue
                record = _record(line)
                if record is None:
                    if unreadable is not None and line:
                        unreadable.append(path.name)
                elif matches(record, filters, bounds):
                    yield record


# -- export ----------------------------------------------------------------------------------


def _text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        return LIST_SEPARATOR.join(_text(item) for item in value)
    if isinstance(value, dict):
        return json.dumps(value, ensure_ascii=False, separators=(",", ":"))
    return str(value)


def _defused(text: str) -> str:
    """Prefix an apostrophe to a cell a spreadsheet would read as a formula (OWASP)."""
    return "'" + text if text.startswith(FORMULA_STARTS) else text


def _secure(record: dict[str, Any]) -> str:
    """For `accepted`: yes when every recipient was secure, no when none was, else mixed."""
    if record.get("event") != "accepted":
        return ""
    flags = [
        party.get("secure") is True
        for party in _list(record.get("recipients"))
        if isinstance(party, dict)
    ]
    if not flags:
        return ""
    if all(flags):
        return "yes"
    return "no" if not any(flags) else "mixed"


def csv_row(record: dict[str, Any]) -> list[str]:
    """Return a record's CSV cells, in the order of CSV_COLUMNS, made safe for spreadsheets."""
    sender = _mapping(record.get("sender"))
    listed = _list(record.get("recipients"))
    parties = [party for party in listed if isinstance(party, dict)]
    parties += [_mapping(record.get("recipient"))] if "recipient" in record else []
    aliases = [party.get("pseudonym") for party in parties]
    aliases += [alias for alias in listed if not isinstance(alias, dict)]
    tls = _mapping(record.get("tls"))
    policy = record.get("policy")
    cells: dict[str, Any] = {
        key: record.get(key)
        for key in CSV_COLUMNS
        if key in record and key not in {"policy", "recipients"}
    }
    cells.update(
        policy=policy[:POLICY_DIGITS] if isinstance(policy, str) else policy,
        sender_domain=sender.get("domain"),
        sender_pseudonym=sender.get("pseudonym"),
        recipient_domains=[party.get("domain") for party in parties],
        recipient_pseudonyms=aliases,
        secure=_secure(record),
        tls_version=tls.get("version"),
        tls_verified=tls.get("verified"),
    )
    return [_defused(_text(cells.get(column))) for column in CSV_COLUMNS]


def export_csv(records: Iterable[dict[str, Any]], out: TextIO) -> int:
    """Write a header and one row per record (CRLF line ends); return the rows written."""
    writer = csv.writer(out)
    writer.writerow(CSV_COLUMNS)
    rows = 0
    for record in records:
        writer.writerow(csv_row(record))
        rows += 1
    return rows


def export_jsonl(records: Iterable[dict[str, Any]], out: TextIO) -> int:
    """Write each record's canonical line and a line feed; return the records written."""
    written = 0
    for record in records:
        out.write(canonical_line(record).decode("ascii") + "\n")
        written += 1
    return written


def export_json(records: Iterable[dict[str, Any]], out: TextIO) -> int:
    """Write a JSON list as `json.dumps(list, indent=2)` would, one record at a time."""
    written = 0
    for record in records:
        item = json.dumps(record, indent=2, ensure_ascii=False).replace("\n", "\n  ")
        out.write(("[\n  " if written == 0 else ",\n  ") + item)
        written += 1
    out.write("[]\n" if written == 0 else "\n]\n")
    return written
