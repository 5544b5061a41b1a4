"""The transfer log (SPEC section 6): one writer, canonical JSON lines, a SHA-256 hash chain.

File: `<folder>/transfer.jsonl` (named in `current_file` only, so rotation can come later),
one record per line, each ending in a line feed. A record's keys are, in this order: `seq`
(1, 2, 3... no gaps), `ts` (RFC 3339 UTC with milliseconds), `event`, `prev` (SHA-256 hex of
the previous record's line, its exact bytes without the line feed; 64 zeros for the first),
`ref` when the record is about a message, then the event's fields (`gateway.records`).

Canonical line: `json.dumps(record, ensure_ascii=True, separators=(",", ":"))` encoded as ASCII,
keys NOT sorted: the fixed order above is the canonical order. A verifier re-encodes each parsed
line and requires the same bytes.

One writer: `AuditLog` owns a thread that alone writes the file. `append()` puts a plain dict
on a `queue.SimpleQueue` (its `put` never blocks the event loop) and awaits a future. The thread
takes everything queued, numbers and chains it, writes all lines with one `write`, calls one
`os.fdatasync` (group commit), and only then resolves the callers' futures through
`loop.call_soon_threadsafe`. The thread's input is `(ticket, body dict)` and its output
`(ticket, record or None, error or None)`: both serialisable, so the thread can become a separate
process behind a pipe without changing callers. After a failed write or fdatasync the writer
never writes again (fsyncgate): every later append raises `AuditError` until a restart, whose
`start()` re-reads the tail. A torn last line (crash mid-write) is never rewritten: `start()`
terminates it with a line feed and chains on from the last complete valid line; readers then report
that line by position (issue 5 will seal such lines with a record of their own).
"""

from __future__ import annotations

import asyncio
import errno
import fcntl
import hashlib
import itertools
import json
import os
import queue
import threading
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

from gateway.errors import AuditError, AuditIntegrityError
from gateway.records import AuditEvent

GENESIS = "0" * 64
LOG_NAME = "transfer.jsonl"
HEAD_KEYS = ("seq", "ts", "event", "prev")
MAX_BATCH = 4096  # records per write: bounds memory and the latency of the first in a batch
_TAIL_CHUNK = 65536

Request = tuple[int, dict[str, Any]]  # (ticket, event body), the writer's input
Outcome = tuple[int, dict[str, Any] | None, str | None]  # (ticket, record, error), its output


def current_file(folder: Path) -> Path:
    """Return the file new records go to (the one place that names it)."""
    return folder / LOG_NAME


def log_files(folder: Path) -> list[Path]:
    """Return the log's files, oldest first (today only the current one, once it exists)."""
    if not folder.is_dir():
        raise AuditError(f"{folder}: no transfer log folder")
    path = current_file(folder)
    return [path] if path.exists() else []


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


def _utc_now() -> datetime:
    return datetime.now(UTC)


def _parse(line: bytes) -> dict[str, Any] | None:
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


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


class _ChainWriter:
    """Owns the file descriptor and the head of the chain; used only by the writer thread."""

    def __init__(self, fd: int, seq: int, prev: str, clock: Callable[[], datetime]) -> None:
        self.fd = fd
        self.seq = seq
        self.prev = prev
        self.clock = clock
        self.broken: str | None = None
        self.batches_committed = 0

    def run(
        self,
        inbox: queue.SimpleQueue[Request | None],
        acknowledge: Callable[[list[Outcome]], None],
    ) -> None:
        """Commit batches from inbox until the stop sign (None), acknowledging each batch."""
        stop = False
        while not stop:
            first = inbox.get()
            if first is None:
                return
            batch = [first]
            while len(batch) < MAX_BATCH:
                try:
                    item = inbox.get_nowait()
                except queue.Empty:
                    break
                if item is None:
                    stop = True
                    break
                batch.append(item)
            try:
                outcomes = self.commit(batch)
            except Exception as exc:  # noqa: BLE001 - thread edge: no caller may hang
                self.broken = f"transfer log writer failed: {type(exc).__name__}"
                outcomes = [(ticket, None, self.broken) for ticket, _ in batch]
            acknowledge(outcomes)

    def commit(self, batch: list[Request]) -> list[Outcome]:
        """Write a batch (numbered, chained) with one write and one fdatasync; return outcomes."""
        if self.broken is not None:
            return [(ticket, None, self.broken) for ticket, _ in batch]
        ts = format_ts(self.clock())
        seq, prev = self.seq, self.prev
        lines: list[bytes] = []
        outcomes: list[Outcome] = []
        for ticket, body in batch:
            record: dict[str, Any] = {"seq": seq + 1, "ts": ts, "event": body.get("event")}
            record["prev"] = prev
            record.update((key, value) for key, value in body.items() if key != "event")
            try:
                if not isinstance(record["event"], str) or len(record) != len(body) + 3:
                    raise ValueError("bad event name or reserved key")  # noqa: TRY301
                line = canonical_line(record)
            except (TypeError, ValueError) as exc:
                outcomes.append((ticket, None, f"audit record refused: {exc}"))
                continue
            seq, prev = seq + 1, line_hash(line)
            lines.append(line)
            outcomes.append((ticket, record, None))
        if lines:
            try:
                _write_all(self.fd, b"\n".join(lines) + b"\n")
                os.fdatasync(self.fd)
            except OSError as exc:
                name = errno.errorcode.get(exc.errno or 0, "unknown error")
                self.broken = f"transfer log write failed ({name}); no more records until restart"
                return [(ticket, None, self.broken) for ticket, _ in batch]
            self.seq, self.prev = seq, prev
            self.batches_committed += 1
        return outcomes


def _reverse_segments(handle: IO[bytes], size: int) -> Iterator[bytes]:
    """Yield the file's line-feed-separated segments, last first (the first one may be torn)."""
    position, head = size, b""
    while position > 0:
        step = min(_TAIL_CHUNK, position)
        position -= step
        handle.seek(position)
        parts = (handle.read(step) + head).split(b"\n")
        head = parts[0]
        yield from reversed(parts[1:])
    yield head


def _recover_tail(path: Path) -> tuple[int, str, bool]:
    """Return (last seq, hash of its line, whether the file ends torn), reading backwards."""
    with path.open("rb") as handle:
        size = handle.seek(0, os.SEEK_END)
        if size == 0:
            return 0, GENESIS, False
        segments = _reverse_segments(handle, size)
        torn = next(segments) != b""
        for line in segments:
            record = _parse(line)
            if record is not None:
                return int(record["seq"]), line_hash(line), torn
    return 0, GENESIS, torn


def _open_log(folder: Path) -> tuple[int, int, str]:
    """Open the current file for appending, locked to this writer; return (fd, seq, prev)."""
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    path = current_file(folder)
    created = not path.exists()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        if created:
            folder_fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(folder_fd)
            finally:
                os.close(folder_fd)
        seq, prev, torn = _recover_tail(path)
        if torn:
            _write_all(fd, b"\n")
            os.fdatasync(fd)
    except BlockingIOError as exc:
        os.close(fd)
        raise AuditError(f"{path}: another writer holds the transfer log") from exc
    except OSError as exc:
        os.close(fd)
        raise AuditError(f"{path}: cannot open the transfer log: {exc.strerror}") from exc
    return fd, seq, prev


class AuditLog:
    """The transfer log's single writer, driven from the event loop (see the module docstring)."""

    def __init__(self, folder: Path, *, clock: Callable[[], datetime] = _utc_now) -> None:
        self.folder = folder
        self._clock = clock
        self._inbox: queue.SimpleQueue[Request | None] = queue.SimpleQueue()
        self._pending: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._tickets = itertools.count(1)
        self._writer: _ChainWriter | None = None
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closed = False

    @property
    def last_seq(self) -> int:
        """The seq of the last durable record (0 for an empty log or before start)."""
        return 0 if self._writer is None else self._writer.seq

    @property
    def batches_committed(self) -> int:
        """How many group commits (one write and one fdatasync each) have succeeded."""
        return 0 if self._writer is None else self._writer.batches_committed

    async def start(self) -> None:
        """Open the log, recover the chain's head from its tail, and start the writer thread."""
        if self._writer is not None or self._closed:
            raise AuditError("the transfer log was already started")
        self._loop = asyncio.get_running_loop()
        fd, seq, prev = await asyncio.to_thread(_open_log, self.folder)
        self._writer = _ChainWriter(fd, seq, prev, self._clock)
        self._thread = threading.Thread(
            target=self._writer.run,
            args=(self._inbox, self._acknowledge),
            name="audit-writer",
            daemon=True,
        )
        self._thread.start()

    async def append(self, event: AuditEvent) -> dict[str, Any]:
        """Write one record; return it once the batch holding it is written and fdatasync'ed."""
        writer, loop = self._writer, self._loop
        if writer is None or loop is None or self._closed:
            raise AuditError("the transfer log is not open")
        if writer.broken is not None:
            raise AuditError(writer.broken)
        ticket = next(self._tickets)
        future: asyncio.Future[dict[str, Any]] = loop.create_future()
        self._pending[ticket] = future
        self._inbox.put((ticket, event.body()))
        return await future

    async def close(self) -> None:
        """Write what is queued, stop the writer thread and close the file."""
        if self._closed:
            return
        self._closed = True
        if self._writer is None or self._thread is None:
            return
        self._inbox.put(None)
        await asyncio.to_thread(self._thread.join)
        os.close(self._writer.fd)

    def _acknowledge(self, outcomes: list[Outcome]) -> None:
        """Hand a batch's outcomes to the event loop (runs in the writer thread)."""
        if self._loop is None:
            return
        try:
            self._loop.call_soon_threadsafe(self._settle, outcomes)
        except RuntimeError:
            return  # the loop is closed: nobody is waiting any more

    def _settle(self, outcomes: list[Outcome]) -> None:
        for ticket, record, error in outcomes:
            future = self._pending.pop(ticket, None)
            if future is None or future.done():
                continue  # the caller gave up waiting; the record stands
            if record is not None:
                future.set_result(record)
            else:
                future.set_exception(AuditError(error or "transfer log write failed"))


def _scan(folder: Path) -> Iterator[tuple[str, bytes, dict[str, Any]]]:
    """Yield (file:line, line, record) in order; a torn or bad line is an integrity error."""
    expected = 1
    for path in log_files(folder):
        with path.open("rb") as handle:
            for number, raw in enumerate(handle, start=1):
                where = f"{path.name}:{number}"
                if not raw.endswith(b"\n"):
                    raise AuditIntegrityError(
                        f"{where}: incomplete last line (torn write) where seq {expected} "
                        "was expected",
                        seq=expected,
                    )
                record = _parse(raw[:-1])
                if record is None:
                    raise AuditIntegrityError(
                        f"{where}: not a record (torn or damaged line) where seq {expected} "
                        "was expected",
                        seq=expected,
                    )
                expected = int(record["seq"]) + 1
                yield where, raw[:-1], record


def read_records(folder: Path) -> Iterator[dict[str, Any]]:
    """Yield every record in order; a torn or bad line raises AuditIntegrityError with its seq."""
    for _where, _line, record in _scan(folder):
        yield record


def records_for(folder: Path, ref: str) -> list[dict[str, Any]]:
    """Return every record about one message reference, in order."""
    return [record for record in read_records(folder) if record.get("ref") == ref]


def verify_chain(folder: Path) -> int:
    """Check seq continuity, canonical form and prev hashes; return the last seq.

    Raises AuditIntegrityError naming the first bad seq: a missing or moved record is named by
    the seq expected in its place, an altered record by its own seq (its successor's `prev` no
    longer matches). An alteration of the very last record needs signed checkpoints to detect.
    """
    expected, prev = 1, GENESIS
    for where, line, record in _scan(folder):
        seq = record["seq"]
        if seq != expected:
            raise AuditIntegrityError(
                f"{where}: seq {seq} where seq {expected} was expected "
                "(a record is missing, moved or duplicated)",
                seq=expected,
            )
        if record["prev"] != prev:
            culprit = max(seq - 1, 1)
            raise AuditIntegrityError(
                f"{where}: prev of seq {seq} does not match the hash of the record before it: "
                f"seq {culprit} was altered (or this prev was)",
                seq=culprit,
            )
        if canonical_line(record) != line:
            raise AuditIntegrityError(f"{where}: seq {seq} is not in canonical form", seq=seq)
        expected, prev = seq + 1, line_hash(line)
    return expected - 1
