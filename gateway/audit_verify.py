"""Verify the transfer log with the public key alone: chain, checkpoints, anchors, repairs.

What is checked, in one pass over the files in chain order:
- every line is the next record: `seq` one more than the last, `prev` the SHA-256 of the last
  record's line (64 zeros for seq 1, or the hash of `anchor.json` after retention), and each
  file's name is the seq of its first record;
- every `checkpoint` is canonical, has `head == prev`, the expected `key_id` and a valid
  Ed25519 signature over its line without `sig`;
- `head.json` (the newest checkpoint, kept by the writer) is signed and is in the log at its
  seq: a log ending before it was truncated;
- a crash's torn line is accepted only when the next record is a `log_repaired` whose
  `torn_bytes`/`torn_sha256` match it exactly; a torn last line not yet repaired is a failure.

Speed: an ordinary record is checked by matching its fixed head with one regular expression and
hashing its line; `json.loads` runs only for checkpoints, repairs and on the way to an error.
The chain still covers every byte: the next record's `prev` (and in the end a signed
checkpoint) is the hash of each whole line. Records after the last checkpoint are reported as
not yet sealed: changing or removing them cannot be detected until a checkpoint covers them.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from gateway.audit_files import (
    ANCHOR_NAME,
    GENESIS,
    HEAD_NAME,
    LOCK_NAME,
    canonical_line,
    first_seq_of,
    key_id_of,
    line_hash,
    log_files,
    parse_record,
    unsigned_part,
)

CHECKPOINT_KEYS = ("seq", "ts", "event", "prev", "head", "key_id", "sig")
_HEAD = re.compile(
    rb'\{"seq":([1-9][0-9]*),"ts":"[^"\\]*","event":"([a-z_]+)","prev":"([0-9a-f]{64})"[,}]'
)
_SLOW_EVENTS = frozenset({b"checkpoint", b"log_repaired"})
_CHUNK = 8 * 1024 * 1024
_MAX_JUNK_LINES = 16  # a crash leaves one torn line, plus one per repair that crashed too


@dataclass(frozen=True)
class VerifyReport:
    """The outcome of `verify`: ok, or the first bad seq and the problem, and what was seen."""

    ok: bool
    first_bad_seq: int | None
    problem: str | None
    records: int  # records checked (from first_seq to last_seq)
    first_seq: int  # 1, or the first seq after anchor.json when retention removed files
    last_seq: int  # the last record found good
    last_sealed_seq: int  # the last checkpoint (or the anchor) found good; 0 if none
    unsealed: int  # records after the last checkpoint: not yet protected by a signature
    checkpoints: int
    repaired: tuple[int, ...]  # seqs of log_repaired records (crashes sealed off)
    warnings: tuple[str, ...]
    files: int


class _VerifyError(Exception):
    def __init__(self, seq: int | None, problem: str) -> None:
        super().__init__(problem)
        self.seq, self.problem = seq, problem


def _full(line: bytes) -> dict[str, Any] | None:
    """Parse a line that must be a canonical record; None when it is not."""
    record = parse_record(line)
    if record is None or canonical_line(record) != line:
        return None
    return record


def writer_running(folder: Path) -> bool:
    """Whether a gateway holds the folder's writer lock right now."""
    try:
        fd = os.open(folder / LOCK_NAME, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


def _anchor_file(path: Path, public_key: Ed25519PublicKey | None) -> tuple[int, bytes] | None:
    """Read head.json or anchor.json: (seq, line) of a checkpoint, checked when a key is given."""
    if not path.exists():
        return None
    raw = path.read_bytes()
    line = raw[:-1] if raw.endswith(b"\n") else raw
    record = _full(line)
    if record is None:
        raise _VerifyError(None, f"{path.name}: not a record")
    seq = int(record["seq"])
    if public_key is not None:
        problem = _checkpoint_problem(record, public_key, key_id_of(public_key))
        if problem is not None:
            raise _VerifyError(seq, f"{path.name}: {problem}")
    return seq, line


def _checkpoint_problem(
    record: dict[str, Any], public_key: Ed25519PublicKey | None, key_id: str
) -> str | None:
    """Say what is wrong with a checkpoint record, or None when it is good."""
    if tuple(record) != CHECKPOINT_KEYS or record["event"] != "checkpoint":
        return "not a checkpoint"
    if record["head"] != record["prev"]:
        return "checkpoint head is not the hash of the record before it"
    if public_key is None:
        return None
    if record["key_id"] != key_id:
        return f"checkpoint signed by another key (key_id {record['key_id']}, expected {key_id})"
    try:
        public_key.verify(bytes.fromhex(str(record["sig"])), unsigned_part(record))
    except (InvalidSignature, ValueError):
        return "checkpoint signature does not verify"
    return None


@dataclass
class _Verifier:
    """The state of one pass; the hot loop keeps copies in locals and syncs around slow paths."""

    public_key: Ed25519PublicKey | None
    key_id: str
    expected: int = 1
    prev: bytes = GENESIS.encode()
    prev_before: bytes = b""
    last_line: bytes = b""
    tentative: bool = False  # last_line was accepted by the fast path (a torn line may look so)
    junk: list[bytes] = field(default_factory=list)
    junk_where: str = ""
    start_seq: int = 1
    last_sealed: int = 0
    checkpoints: int = 0
    repaired: list[int] = field(default_factory=list)
    head: tuple[int, bytes] | None = None
    head_seen: bool = False
    live: bool = False  # the writer holds its lock: a last line may be half-written
    warnings: list[str] = field(default_factory=list)

    def scan(self, path: Path, *, is_last: bool) -> None:
        """Check one file's lines, continuing the chain from the previous file."""
        name = path.name
        if path.stat().st_size and first_seq_of(path) != self.expected:
            raise _VerifyError(
                self.expected,
                f"{name}: its name says it starts at seq {first_seq_of(path)}, but seq "
                f"{self.expected} comes next (a file is missing, renamed or out of place)",
            )
        self.tentative = False
        carry, number = b"", 0
        with path.open("rb") as handle:
            while chunk := handle.read(_CHUNK):
                lines = (carry + chunk).split(b"\n")
                carry = lines.pop()
                self._lines(lines, name, number)
                number += len(lines)
        if self.junk:
            raise self._junk_failure(None)
        if carry and is_last and self.live:
            self.warnings.append(f"{name}: the last line is being written (the gateway runs)")
        elif carry and is_last:
            raise _VerifyError(
                self.expected,
                f"{name}:{number + 1}: torn last line (crash during write) where seq "
                f"{self.expected} was expected; the gateway seals it off at its next start",
            )
        elif carry:
            raise _VerifyError(self.expected, f"{name}: does not end with a line feed")

    def check_last_line(self) -> None:
        """The last line was only seen by the fast path: check that it is a whole record."""
        if self.tentative and _full(self.last_line) is None:
            last = self.expected - 1
            raise _VerifyError(last, f"seq {last}, the last record, is not a canonical record")

    def _lines(self, lines: list[bytes], name: str, base: int) -> None:
        match, sha, slow_events = _HEAD.match, hashlib.sha256, _SLOW_EVENTS
        expected, prev, prev_before = self.expected, self.prev, self.prev_before
        last_line, tentative, fast = self.last_line, self.tentative, not self.junk
        for index, line in enumerate(lines):
            found = match(line)
            if (
                fast
                and found is not None
                and found[3] == prev
                and found[2] not in slow_events
                and int(found[1]) == expected
            ):
                prev_before, last_line, tentative = prev, line, True
                prev = sha(line).hexdigest().encode()
                expected += 1
                continue
            self.expected, self.prev, self.prev_before = expected, prev, prev_before
            self.last_line, self.tentative = last_line, tentative
            self._slow(line, found, f"{name}:{base + index + 1}")
            expected, prev, prev_before = self.expected, self.prev, self.prev_before
            last_line, tentative, fast = self.last_line, self.tentative, not self.junk
        self.expected, self.prev, self.prev_before = expected, prev, prev_before
        self.last_line, self.tentative = last_line, tentative

    def _accept(self, line: bytes) -> None:
        self.prev_before, self.last_line, self.tentative = self.prev, line, False
        self.prev = line_hash(line).encode()
        self.expected += 1

    def _slow(self, line: bytes, found: re.Match[bytes] | None, where: str) -> None:
        if self.junk:
            self._after_junk(line)
            return
        if found is not None and int(found[1]) == self.expected and found[3] == self.prev:
            record = _full(line)
            if record is not None and record["event"] == "checkpoint":
                self._checkpoint(record, line, where)
                return
            if record is not None and record["event"] == "log_repaired":
                raise _VerifyError(
                    self.expected,
                    f"{where}: log_repaired at seq {self.expected} seals a damaged line that "
                    "is not there (was it removed?)",
                )
        elif found is not None and self._rewound(line, []):
            return
        self.junk, self.junk_where = [line], where

    def _checkpoint(self, record: dict[str, Any], line: bytes, where: str) -> None:
        seq = self.expected
        problem = _checkpoint_problem(record, self.public_key, self.key_id)
        if problem is not None:
            raise _VerifyError(seq, f"{where}: seq {seq}: {problem}")
        if self.head is not None and self.head[0] == seq:
            if self.head[1] != line:
                raise _VerifyError(
                    seq, f"{where}: seq {seq} differs from the checkpoint in head.json"
                )
            self.head_seen = True
        self.checkpoints += 1
        self.last_sealed = seq
        self._accept(line)

    def _repaired(self, record: dict[str, Any], torn: bytes) -> bool:
        return record.get("torn_bytes") == len(torn) and record.get("torn_sha256") == line_hash(
            torn
        )

    def _rewound(self, line: bytes, junk: list[bytes]) -> bool:
        """Accept a log_repaired sealing the last accepted line (a torn line that looked whole)."""
        record = _full(line)
        if (
            record is None
            or not self.tentative
            or record["event"] != "log_repaired"
            or record["seq"] != self.expected - 1
            or record["prev"].encode() != self.prev_before
            or not self._repaired(record, b"\n".join([self.last_line, *junk]))
        ):
            return False
        self.expected, self.prev = self.expected - 1, self.prev_before
        self.repaired.append(self.expected)
        self._accept(line)
        return True

    def _after_junk(self, line: bytes) -> None:
        record = _full(line)
        if record is None:
            self.junk.append(line)
            if len(self.junk) > _MAX_JUNK_LINES:
                raise self._junk_failure(None)
            return
        if (
            record["event"] == "log_repaired"
            and record["seq"] == self.expected
            and record["prev"].encode() == self.prev
            and self._repaired(record, b"\n".join(self.junk))
        ):
            self.repaired.append(self.expected)
            self.junk = []
            self._accept(line)
            return
        if self._rewound(line, self.junk):
            self.junk = []
            return
        raise self._junk_failure(line)

    def _junk_failure(self, following: bytes | None) -> _VerifyError:
        """Name the first bad seq for a line that does not continue the chain."""
        first, where, expected = self.junk[0], self.junk_where, self.expected
        following = self.junk[1] if len(self.junk) > 1 else following
        found = _HEAD.match(first)
        seq, culprit = (0 if found is None else int(found[1])), expected - 1
        if found is not None and seq == culprit and found[3] == self.prev_before and self.tentative:
            return _VerifyError(seq, f"{where}: a second record claims seq {seq} (inserted?)")
        if self.tentative and _full(self.last_line) is None:  # e.g. its line feed was changed
            return _VerifyError(culprit, f"{where}: seq {culprit} is not a canonical record")
        if found is None:
            return _VerifyError(
                expected, f"{where}: not a record where seq {expected} was expected"
            )
        if seq != expected:
            gap = "missing" if seq > expected else "moved, duplicated or inserted"
            return _VerifyError(expected, f"{where}: seq {seq} where {expected} was due ({gap})")
        if found[3] == self.prev:
            return _VerifyError(expected, f"{where}: seq {expected} is not a canonical record")
        record = _full(first)
        problem = None
        if record is not None and record["event"] == "checkpoint":
            problem = _checkpoint_problem(record, self.public_key, self.key_id)
        if problem is not None:  # its own bytes changed, as its signature shows
            return _VerifyError(expected, f"{where}: seq {expected}: {problem}")
        if expected == self.start_seq:
            origin = "the genesis hash" if expected == 1 else ANCHOR_NAME
            return _VerifyError(expected, f"{where}: seq {expected} does not chain from {origin}")
        if following is not None:
            after = _HEAD.match(following)
            if after is None or after[3].decode() != line_hash(first):
                return _VerifyError(expected, f"{where}: seq {expected} was altered (its prev)")
        return _VerifyError(culprit, f"{where}: prev of seq {expected}: seq {culprit} was altered")


def verify(folder: Path, public_key: Ed25519PublicKey | None) -> VerifyReport:
    """Verify the log in folder; with public_key None, signatures cannot be checked (warned)."""
    files = log_files(folder)
    key_id = "" if public_key is None else key_id_of(public_key)
    state = _Verifier(public_key, key_id, live=writer_running(folder))
    warnings = state.warnings
    if public_key is None:
        warnings.append("no public key: checkpoint signatures were not checked")
    failure = head_failure = None
    try:
        try:
            state.head = _anchor_file(folder / HEAD_NAME, public_key)
        except _VerifyError as exc:
            head_failure = exc  # reported after the scan: an earlier bad seq comes first
        files = _start_after_anchor(folder, files, state, warnings)
        for index, path in enumerate(files):
            state.scan(path, is_last=index == len(files) - 1)
        state.check_last_line()
        if head_failure is not None:
            raise head_failure
        _check_head(state, warnings)
    except _VerifyError as exc:
        failure = exc
    last_seq = state.expected - 1
    if state.head is None and last_seq >= state.start_seq:
        warnings.append(
            "no head anchor (head.json): truncation after the last checkpoint cannot be detected"
        )
    return VerifyReport(
        ok=failure is None,
        first_bad_seq=None if failure is None else failure.seq,
        problem=None if failure is None else failure.problem,
        records=last_seq - state.start_seq + 1,
        first_seq=state.start_seq,
        last_seq=last_seq,
        last_sealed_seq=state.last_sealed,
        unsealed=max(0, last_seq - max(state.last_sealed, state.start_seq - 1)),
        checkpoints=state.checkpoints,
        repaired=tuple(state.repaired),
        warnings=tuple(warnings),
        files=len(files),
    )


def _start_after_anchor(
    folder: Path, files: list[Path], state: _Verifier, warnings: list[str]
) -> list[Path]:
    """Start the chain at anchor.json when retention removed the oldest files."""
    starts = [first_seq_of(path) for path in files]
    try:
        anchor = _anchor_file(folder / ANCHOR_NAME, state.public_key)
    except _VerifyError as exc:
        first = starts[0] if starts else None
        raise _VerifyError(first, f"{exc.problem}: records after it cannot be trusted") from exc
    if anchor is None or anchor[0] + 1 not in starts:
        return files
    index = starts.index(anchor[0] + 1)
    if index:
        warnings.append(f"{index} file(s) before {ANCHOR_NAME} not yet removed; not checked")
    seq, line = anchor
    state.expected = state.start_seq = seq + 1
    state.prev = line_hash(line).encode()
    state.last_sealed = seq
    if state.head is not None and state.head[0] == seq:
        state.head_seen = state.head[1] == line
    return files[index:]


def _check_head(state: _Verifier, warnings: list[str]) -> None:
    if state.head is None:
        return
    head_seq, last_seq = state.head[0], state.expected - 1
    if head_seq > last_seq:
        raise _VerifyError(
            last_seq + 1,
            f"the log ends at seq {last_seq} but {HEAD_NAME} seals seq {head_seq}: "
            f"records {last_seq + 1} to {head_seq} were removed",
        )
    if head_seq < state.start_seq and not state.head_seen:
        warnings.append(f"{HEAD_NAME} seals seq {head_seq}, before the retained records")
    elif not state.head_seen:
        raise _VerifyError(head_seq, f"seq {head_seq} is not the checkpoint in {HEAD_NAME}")


def format_report(report: VerifyReport) -> list[str]:
    """Render a report as the lines `gateway audit verify` prints (first line: the verdict)."""
    if report.ok:
        counts = (
            f"{report.records} records, {report.files} file(s), {report.checkpoints} checkpoints"
        )
        lines = [f"ok: seq {report.first_seq} to {report.last_seq} verified ({counts})"]
    else:
        lines = [f"FAILED at seq {report.first_bad_seq}: {report.problem}"]
    if report.unsealed:
        lines.append(
            f"not yet sealed: {report.unsealed} record(s) after seq {report.last_sealed_seq} "
            "(no checkpoint covers them yet)"
        )
    lines += [f"repaired crash at seq {seq} (torn line sealed off)" for seq in report.repaired]
    lines += [f"warning: {text}" for text in report.warnings]
    return lines
