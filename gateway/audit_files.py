"""The transfer log's files: names, canonical lines, durable small files, reading back.

Folder layout (`[audit] path`):

    transfer-000000000001.jsonl   records, one canonical line each; the name is the seq of the
    transfer-000000001204.jsonl   file's first record (12 digits), so name order is chain order;
                                  the newest file is the one being written
    head.json                     a copy of the newest signed checkpoint line (truncation anchor)
    anchor.json                   the last line of the newest file removed by retention
    writer.lock                   flock'ed by the one running writer

A log from before rotation existed is one file, `transfer.jsonl`; it is read as the first file,
and the writer renames it to `transfer-000000000001.jsonl` when it next starts.

Canonical line: `json.dumps(record, ensure_ascii=True, separators=(",", ":"))` encoded as ASCII,
keys NOT sorted: `seq, ts, event, prev, [ref]`, then the event's fields in the order
`gateway.records` builds them.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import itertools
import json
import os
import re
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any, NamedTuple

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from gateway.errors import AuditError, AuditIntegrityError

GENESIS = "0" * 64
LEGACY_NAME = "transfer.jsonl"
HEAD_NAME = "head.json"
ANCHOR_NAME = "anchor.json"
LOCK_NAME = "writer.lock"
HEAD_KEYS = ("seq", "ts", "event", "prev")
_FILE_NAME = re.compile(r"transfer-([0-9]{12,})\.jsonl")
_TAIL_CHUNK = 65536


def file_name(first_seq: int) -> str:
    """Return the name of the log file whose first record is `first_seq`."""
    return f"transfer-{first_seq:012d}.jsonl"


def first_seq_of(path: Path) -> int:
    """Return the seq a log file's name says its first record has (1 for `transfer.jsonl`)."""
    found = _FILE_NAME.fullmatch(path.name)
    return 1 if found is None else int(found[1])


def log_files(folder: Path) -> list[Path]:
    """Return every log file of the folder in chain order, oldest first (the last is current)."""
    if not folder.is_dir():
        raise AuditError(f"{folder}: no transfer log folder")
    numbered = sorted(
        (int(found[1]), path)
        for path in folder.iterdir()
        if (found := _FILE_NAME.fullmatch(path.name)) is not None
    )
    legacy = folder / LEGACY_NAME
    return ([legacy] if legacy.is_file() else []) + [path for _, path in numbered]


def canonical_line(record: dict[str, Any]) -> bytes:
    """Return a record's canonical line (no line feed): compact ASCII JSON, keys as given."""
    text = json.dumps(record, ensure_ascii=True, separators=(",", ":"), allow_nan=False)
    return text.encode("ascii")


def line_hash(line: bytes) -> str:
    """Return the SHA-256 hex digest of a line: the next record's `prev`."""
    return hashlib.sha256(line).hexdigest()


def format_ts(moment: datetime) -> str:
    """Render an aware datetime as RFC 3339 UTC with milliseconds, e.g. 2026-11-25T03:42:30.123Z."""
    if moment.tzinfo is None:
        raise ValueError("the audit clock must return an aware datetime")
    utc = moment.astimezone(UTC)
    return utc.strftime("%Y-%m-%dT%H:%M:%S") + f".{utc.microsecond // 1000:03d}Z"


def key_id_of(public_key: Ed25519PublicKey) -> str:
    """First 16 hex digits of the SHA-256 of the raw public key (as `Keys.key_id`)."""
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def unsigned_part(record: dict[str, Any]) -> bytes:
    """Return what a checkpoint's `sig` signs: its canonical line without the `sig` field."""
    return canonical_line({key: value for key, value in record.items() if key != "sig"})


def parse_ts(text: str) -> datetime:
    """Read a record's `ts` back into an aware UTC datetime."""
    return datetime.strptime(text, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC)


def parse_record(line: bytes) -> dict[str, Any] | None:
    """Return the record on a line, or None when the line is not one."""
    try:
        record = json.loads(line)
    except ValueError:
        return None
    if not isinstance(record, dict) or tuple(record)[: len(HEAD_KEYS)] != HEAD_KEYS:
        return None
    seq = record["seq"]
    if not isinstance(seq, int) or isinstance(seq, bool) or seq < 1:
        return None
    return record


def write_all(fd: int, data: bytes) -> None:
    """Write every byte of data to fd (os.write may write less than asked)."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def fsync_folder(folder: Path) -> None:
    """Make the folder's entries (new, renamed, removed names) durable."""
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def replace_atomically(path: Path, data: bytes) -> None:
    """Replace path with data: write a temporary file, fsync, rename, fsync the folder."""
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
    try:
        try:
            write_all(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        tmp.replace(path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    fsync_folder(path.parent)


def reverse_segments(handle: IO[bytes]) -> Iterator[bytes]:
    """Yield the file's line-feed-separated segments, last first (the very last may be torn)."""
    position, head = handle.seek(0, os.SEEK_END), b""
    while position > 0:
        step = min(_TAIL_CHUNK, position)
        position -= step
        handle.seek(position)
        parts = (handle.read(step) + head).split(b"\n")
        head = parts[0]
        yield from reversed(parts[1:])
    yield head


def last_record(path: Path) -> tuple[bytes, dict[str, Any]] | None:
    """Return the last complete line of a file that is a record, with the record, or None."""
    with path.open("rb") as handle:
        segments = reverse_segments(handle)
        next(segments)  # after the last line feed: empty, or a torn line
        for line in segments:
            record = parse_record(line)
            if record is not None:
                return line, record
    return None


def first_record(path: Path) -> dict[str, Any] | None:
    """Return the first record of a file (looking at its first 64 KiB), or None."""
    with path.open("rb") as handle:
        start = handle.read(_TAIL_CHUNK)
    for line in start.split(b"\n")[:-1]:
        record = parse_record(line)
        if record is not None:
            return record
    return None


def lock_folder(folder: Path) -> int:
    """Create the folder (0700) and take the writer's lock; return the lock's descriptor."""
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd = os.open(folder / LOCK_NAME, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError as exc:
        os.close(fd)
        raise AuditError(f"{folder}: another writer holds the transfer log") from exc
    return fd


def adopt_legacy(folder: Path) -> list[Path]:
    """Rename a pre-rotation `transfer.jsonl` to the first numbered name; return the files.

    The list is never empty: a new log gets the name of its first file.
    """
    files = log_files(folder)
    if files and files[0].name == LEGACY_NAME:
        if len(files) > 1:
            raise AuditError(f"{folder}: both {LEGACY_NAME} and rotated files; keep one")
        files = [files[0].rename(folder / file_name(1))]
        fsync_folder(folder)
    return files or [folder / file_name(1)]


class Tail(NamedTuple):
    """The head of the chain found at start, and what a crash left after it."""

    seq: int  # of the last complete record (0: none)
    prev: str  # its line's hash (GENESIS: none)
    torn: bytes | None  # the bytes after it, without a final line feed; None: nothing
    ends_in_line_feed: bool  # False: the writer must add one first


def find_tail(files: list[Path]) -> Tail:
    """Find the last complete record, looking back across files if the newest has none."""
    junk: list[bytes] = []
    seq, prev = 0, GENESIS
    if files[-1].exists():
        with files[-1].open("rb") as handle:
            segments = reverse_segments(handle)
            tail = next(segments)
            record = parse_record(tail) if tail else None
            if record is not None:  # whole but for its line feed: a record, not a torn line
                return Tail(int(record["seq"]), line_hash(tail), None, ends_in_line_feed=False)
            for line in segments:
                record = parse_record(line)
                if record is not None:
                    return Tail(int(record["seq"]), line_hash(line), _torn(junk, tail), not tail)
                junk.append(line)
    else:
        tail = b""
    for older in reversed(files[:-1]):
        found = last_record(older)
        if found is not None:
            seq, prev = int(found[1]["seq"]), line_hash(found[0])
            break
    return Tail(seq, prev, _torn(junk, tail), not tail)


def _torn(junk: list[bytes], tail: bytes) -> bytes | None:
    if not junk and not tail:
        return None
    return b"\n".join([*reversed(junk), *([tail] if tail else [])])


def count_unsealed(path: Path, limit: int) -> int:
    """Count the records after the file's last checkpoint, looking back at most `limit`."""
    count = 0
    with path.open("rb") as handle:
        for line in itertools.islice(reverse_segments(handle), 1, None):
            record = parse_record(line)
            if record is None:
                continue
            if record["event"] == "checkpoint" or count >= limit:
                return count
            count += 1
    return count


def remove_expired(folder: Path, cutoff: datetime) -> list[str]:
    """Remove the oldest closed files whose last record is older than cutoff; return names.

    First `anchor.json` durably receives the last line of the newest file to go, so the rest
    of the chain still verifies from it.
    """
    doomed: list[Path] = []
    anchor = b""
    for path in log_files(folder)[:-1]:
        found = last_record(path)
        try:
            old = found is not None and parse_ts(str(found[1]["ts"])) < cutoff
        except ValueError:
            old = False
        if found is None or not old:
            break
        doomed.append(path)
        anchor = found[0]
    if doomed:
        replace_atomically(folder / ANCHOR_NAME, anchor + b"\n")
        for path in doomed:
            path.unlink()
        fsync_folder(folder)
    return [path.name for path in doomed]


def _junk_resolved(junk: list[bytes], record: dict[str, Any]) -> bool:
    """Whether a log_repaired record seals exactly these non-record lines."""
    torn = b"\n".join(junk)
    return record.get("torn_bytes") == len(torn) and record.get("torn_sha256") == line_hash(torn)


def read_records(folder: Path) -> Iterator[dict[str, Any]]:
    """Yield every record across the log's files in order.

    Lines sealed off by a `log_repaired` record (a crash's torn line) are skipped; any other line
    that is not a record, and a torn last line not yet sealed, raise AuditIntegrityError naming
    the seq expected there. Reading does not check the chain: that is `audit_verify.verify`.
    """
    expected = 1
    for path in log_files(folder):
        junk: list[bytes] = []
        junk_at = ""
        with path.open("rb") as handle:
            for number, raw in enumerate(handle, start=1):
                where = f"{path.name}:{number}"
                if not raw.endswith(b"\n"):
                    raise AuditIntegrityError(
                        f"{where}: incomplete last line (torn write) where seq {expected} "
                        "was expected",
                        seq=expected,
                    )
                record = parse_record(raw[:-1])
                if record is None:
                    junk_at = junk_at or where
                    junk.append(raw[:-1])
                    continue
                if junk and not (
                    record["event"] == "log_repaired" and _junk_resolved(junk, record)
                ):
                    break
                junk = []
                expected = int(record["seq"]) + 1
                yield record
        if junk:
            raise AuditIntegrityError(
                f"{junk_at}: not a record (torn or damaged line) where seq {expected} was expected",
                seq=expected,
            )


def records_for(folder: Path, ref: str) -> list[dict[str, Any]]:
    """Return every record about one message reference, in order."""
    return [record for record in read_records(folder) if record.get("ref") == ref]
