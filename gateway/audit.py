"""The transfer log's single writer (SPEC section 6): hash chain, signed checkpoints, rotation.

Records and files are described in `gateway.audit_files`, verification in `gateway.audit_verify`.

One writer: `AuditLog` owns a thread that alone writes the log. `append()` puts a plain dict on a
`queue.SimpleQueue` and awaits a future. The thread takes everything queued, numbers and chains
it, writes all lines with one `write`, calls one `os.fdatasync` (group commit), and only then
resolves the callers' futures through `loop.call_soon_threadsafe`. Input `(ticket, body dict)`
and output `(ticket, record or None, error or None)` are serialisable, so the thread can become
a process behind a pipe without changing callers. After a failed write or fsync the writer never
writes again (fsyncgate): every later append raises `AuditError` until a restart.

Checkpoints (with a signing key): the thread itself writes a `checkpoint` record after every
`checkpoint_every` other records (inside the batch), when a record has waited unsealed for
`checkpoint_interval` seconds (it wakes up for this even when nothing is appended), before a
rotation, after a crash repair, and at close. `head` is the hash of the record before it
(equal to its `prev`), `key_id` the first 16 hex digits of SHA-256 of the raw public key, and
`sig`, always the last field, the hex Ed25519 signature of the checkpoint's canonical line
without `sig`. After each checkpoint is durable the writer replaces `head.json` with its line.

Rotation ("daily": the UTC date of a batch differs from the current file's first record;
"size": the current file reached `rotate_size`) happens at a batch boundary, right after a
checkpoint, so every closed file ends with a signed checkpoint; the chain runs on across files.
Retention (`retain_days` > 0), at start and after each rotation: whole closed files whose last
record is older are removed, oldest first, after `anchor.json` receives the last line of the
newest of them.

Crash repair, at start: bytes after the last complete record of the current file (a torn line,
left by a crash mid-write) are never rewritten. The writer ends them with a line feed if needed
and writes `log_repaired` (`torn_bytes`, `torn_sha256` of those bytes, without the added line
feed) chained from the last complete record, then a checkpoint. A last record that is whole but
for its line feed is kept: the writer only adds the line feed. A failed retention pass does not
stop the log: `retention_error` says why, and it is tried again after the next rotation.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import errno
import itertools
import os
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from gateway import records
from gateway.audit_files import (
    GENESIS,
    HEAD_NAME,
    adopt_legacy,
    canonical_line,
    count_unsealed,
    file_name,
    find_tail,
    first_record,
    format_ts,
    fsync_folder,
    key_id_of,
    line_hash,
    lock_folder,
    log_files,
    parse_record,
    read_records,
    records_for,
    remove_expired,
    replace_atomically,
    write_all,
)
from gateway.audit_verify import verify
from gateway.config import AuditConfig
from gateway.errors import AuditError, AuditIntegrityError
from gateway.records import AuditEvent

__all__ = [
    "GENESIS",
    "AuditLog",
    "canonical_line",
    "format_ts",
    "key_id_of",
    "line_hash",
    "log_files",
    "read_records",
    "records_for",
    "verify_chain",
]

MAX_BATCH = 4096  # records per write: bounds memory and the latency of the first in a batch
ROTATIONS = ("never", "daily", "size")

Request = tuple[int, dict[str, Any]]  # (ticket, event body), the writer's input
Outcome = tuple[int, dict[str, Any] | None, str | None]  # (ticket, record, error), its output


def _utc_now() -> datetime:
    return datetime.now(UTC)


def _record_line(
    seq: int, ts: str, prev: str, body: dict[str, Any]
) -> tuple[dict[str, Any], bytes]:
    """Number, stamp and chain an event body; ValueError/TypeError if it cannot be a record."""
    record: dict[str, Any] = {"seq": seq, "ts": ts, "event": body.get("event"), "prev": prev}
    record.update((key, value) for key, value in body.items() if key != "event")
    if not isinstance(record["event"], str) or len(record) != len(body) + 3:
        raise ValueError("bad event name or reserved key")
    return record, canonical_line(record)


@dataclass(frozen=True)
class _Settings:
    signing_key: Ed25519PrivateKey | None
    key_id: str
    every: int
    interval: float
    rotate: str
    rotate_size: int
    retain_days: int


class _ChainWriter:
    """Owns the files and the head of the chain; used only by the writer thread."""

    def __init__(self, folder: Path, settings: _Settings, clock: Callable[[], datetime]) -> None:
        self.folder, self.settings, self.clock = folder, settings, clock
        self.lock_fd = self.fd = -1
        self.seq, self.prev, self.since = 0, GENESIS, 0
        self.file_day: str | None = None
        self.file_size = 0
        self.unsealed_at: float | None = None
        self.broken: str | None = None
        self.batches_committed = 0
        self.repaired_seq: int | None = None
        self.removed_files: list[str] = []
        self.retention_error: str | None = None

    # -- start ---------------------------------------------------------------------------------

    def open(self) -> None:
        """Lock the folder, recover the chain's head, seal a torn tail, apply retention."""
        self.lock_fd = lock_folder(self.folder)
        files = adopt_legacy(self.folder)
        self.fd = os.open(files[-1], os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        fsync_folder(self.folder)
        tail = find_tail(files)
        self.seq, self.prev = tail.seq, tail.prev
        if tail.torn is not None:
            self._repair(tail.torn, tail.ends_in_line_feed)
        elif not tail.ends_in_line_feed and tail.seq:
            write_all(self.fd, b"\n")
            os.fdatasync(self.fd)
        self.since = count_unsealed(files[-1], self.settings.every)
        self.unsealed_at = time.monotonic() if self.since else None
        first = first_record(files[-1])
        self.file_day = None if first is None else str(first["ts"])[:10]
        self.file_size = os.fstat(self.fd).st_size
        self._retain()

    def _repair(self, torn: bytes, ends_in_line_feed: bool) -> None:
        ts = format_ts(self.clock())
        event = records.log_repaired(torn_bytes=len(torn), torn_sha256=line_hash(torn))
        _, line = _record_line(self.seq + 1, ts, self.prev, event.body())
        lines = [line]
        head = self.prev = line_hash(line)
        if self.settings.signing_key is not None:
            lines.append(self._checkpoint_line(self.seq + 2, ts, head))
        data = (b"" if ends_in_line_feed else b"\n") + b"\n".join(lines) + b"\n"
        write_all(self.fd, data)
        os.fdatasync(self.fd)
        self.repaired_seq = self.seq + 1
        self.seq, self.prev = self.seq + len(lines), line_hash(lines[-1])
        if len(lines) > 1:
            replace_atomically(self.folder / HEAD_NAME, lines[-1] + b"\n")

    # -- the thread ----------------------------------------------------------------------------

    def run(
        self,
        inbox: queue.SimpleQueue[Request | None],
        acknowledge: Callable[[list[Outcome]], None],
    ) -> None:
        """Commit batches until the stop sign (None), sealing on time and at the end."""
        stop = False
        while not stop:
            try:
                first = inbox.get(timeout=self._seal_timeout())
            except queue.Empty:
                self._guarded(self._seal)
                continue
            if first is None:
                break
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
        self._guarded(self._seal)

    def _seal_timeout(self) -> float | None:
        if self.unsealed_at is None or self.settings.signing_key is None or self.broken:
            return None
        return max(0.0, self.unsealed_at + self.settings.interval - time.monotonic())

    def _guarded(self, action: Callable[[], None]) -> None:
        try:
            action()
        except Exception as exc:  # noqa: BLE001 - thread edge: report through `broken`
            self._break(exc)

    def _break(self, exc: BaseException) -> None:
        if isinstance(exc, OSError):
            name = errno.errorcode.get(exc.errno or 0, "unknown error")
            self.broken = f"transfer log write failed ({name}); no more records until restart"
        else:
            self.broken = f"transfer log writer failed: {type(exc).__name__}"

    def _checkpoint_line(self, seq: int, ts: str, prev: str) -> bytes:
        key = self.settings.signing_key
        if key is None:
            raise AuditError("no signing key")
        body = records.checkpoint(head=prev, key_id=self.settings.key_id).body()
        record, unsigned = _record_line(seq, ts, prev, body)
        record["sig"] = key.sign(unsigned).hex()
        return canonical_line(record)

    def _seal(self) -> None:
        """Write a checkpoint now if any record is unsealed and the writer can sign."""
        if self.broken or self.since == 0 or self.settings.signing_key is None:
            return
        self._write([self._checkpoint_line(self.seq + 1, format_ts(self.clock()), self.prev)], 0)

    def _write(self, lines: list[bytes], since: int, checkpoint: bytes | None = None) -> None:
        """Append lines with one write and one fdatasync; then move the head of the chain."""
        data = b"\n".join(lines) + b"\n"
        write_all(self.fd, data)
        os.fdatasync(self.fd)
        self.seq, self.prev = self.seq + len(lines), line_hash(lines[-1])
        self.file_size += len(data)
        if since == 0:
            self.unsealed_at = None
        elif self.unsealed_at is None:
            self.unsealed_at = time.monotonic()
        self.since = since
        last = checkpoint if since else lines[-1]
        if last is not None and self.settings.signing_key is not None:
            try:
                replace_atomically(self.folder / HEAD_NAME, last + b"\n")
            except OSError as exc:  # these records are durable; later ones are refused
                self._break(exc)

    def commit(self, batch: list[Request]) -> list[Outcome]:
        """Write a batch (numbered, chained, sealed as due) with one write and one fdatasync."""
        if self.broken is not None:
            return [(ticket, None, self.broken) for ticket, _ in batch]
        ts = format_ts(self.clock())
        try:
            self._rotate_if_due(ts)
        except OSError as exc:
            self._break(exc)
            return [(ticket, None, self.broken) for ticket, _ in batch]
        signing = self.settings.signing_key is not None
        seq, prev, since = self.seq, self.prev, self.since
        lines: list[bytes] = []
        outcomes: list[Outcome] = []
        checkpoint: bytes | None = None
        for ticket, body in batch:
            try:
                if body.get("event") in records.WRITER_EVENTS:
                    raise ValueError("checkpoint and log_repaired are the writer's own")  # noqa: TRY301
                record, line = _record_line(seq + 1, ts, prev, body)
            except (TypeError, ValueError) as exc:
                outcomes.append((ticket, None, f"audit record refused: {exc}"))
                continue
            seq, prev, since = seq + 1, line_hash(line), since + 1
            lines.append(line)
            outcomes.append((ticket, record, None))
            if signing and since >= self.settings.every:
                checkpoint = self._checkpoint_line(seq + 1, ts, prev)
                seq, prev, since = seq + 1, line_hash(checkpoint), 0
                lines.append(checkpoint)
        waited = self.unsealed_at is not None and (
            time.monotonic() - self.unsealed_at >= self.settings.interval
        )
        if signing and since and waited:
            lines.append(self._checkpoint_line(seq + 1, ts, prev))
            since = 0
        if lines:
            try:
                self._write(lines, since, checkpoint)
            except OSError as exc:
                self._break(exc)
                return [(ticket, None, self.broken) for ticket, _ in batch]
            self.file_day = self.file_day or ts[:10]
            self.batches_committed += 1
        return outcomes

    # -- rotation and retention ----------------------------------------------------------------

    def _rotate_if_due(self, ts: str) -> None:
        rotate = self.settings.rotate
        due = (rotate == "daily" and self.file_day is not None and ts[:10] != self.file_day) or (
            rotate == "size" and self.file_size >= self.settings.rotate_size
        )
        if not due or self.file_size == 0:
            return
        self._seal()
        fd = os.open(
            self.folder / file_name(self.seq + 1),
            os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC,
            0o600,
        )
        os.close(self.fd)
        self.fd, self.file_day, self.file_size = fd, None, 0
        fsync_folder(self.folder)
        self._retain()

    def _retain(self) -> None:
        """Apply retention; a failure is kept in `retention_error` and retried next time."""
        if self.settings.retain_days:
            cutoff = self.clock() - timedelta(days=self.settings.retain_days)
            try:
                self.removed_files += remove_expired(self.folder, cutoff)
            except OSError as exc:
                self.retention_error = f"retention failed: {exc}"
            else:
                self.retention_error = None

    def close(self) -> None:
        """Close the current file and release the folder lock."""
        for fd in (self.fd, self.lock_fd):
            if fd >= 0:
                os.close(fd)
        self.fd = self.lock_fd = -1


class AuditLog:
    """The transfer log's single writer, driven from the event loop (see the module docstring)."""

    def __init__(
        self,
        folder: Path,
        *,
        signing_key: Ed25519PrivateKey | None = None,
        checkpoint_every: int = 1000,
        checkpoint_interval: float = 3600,
        rotate: str = "never",
        rotate_size: int = 100 * 1024 * 1024,
        retain_days: int = 0,
        clock: Callable[[], datetime] = _utc_now,
    ) -> None:
        if rotate not in ROTATIONS:
            raise ValueError(f"rotate must be one of {list(ROTATIONS)}")
        if checkpoint_every < 1 or checkpoint_interval <= 0 or rotate_size < 1 or retain_days < 0:
            raise ValueError("checkpoint_every, checkpoint_interval, rotate_size must be positive")
        self.folder = folder
        key_id = "" if signing_key is None else key_id_of(signing_key.public_key())
        self._settings = _Settings(
            signing_key, key_id, checkpoint_every, checkpoint_interval, rotate, rotate_size,
            retain_days,
        )  # fmt: skip
        self._clock = clock
        self._inbox: queue.SimpleQueue[Request | None] = queue.SimpleQueue()
        self._pending: dict[int, asyncio.Future[dict[str, Any]]] = {}
        # Callers in worker threads (append_blocking), settled by the writer thread itself.
        self._waiting: dict[int, concurrent.futures.Future[dict[str, Any]]] = {}
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

    @property
    def repaired_seq(self) -> int | None:
        """The seq of the `log_repaired` record start() wrote for a torn tail, if it did."""
        return None if self._writer is None else self._writer.repaired_seq

    @property
    def retention_error(self) -> str | None:
        """Why the last retention pass failed (it is tried again after the next rotation)."""
        return None if self._writer is None else self._writer.retention_error

    @property
    def removed_files(self) -> tuple[str, ...]:
        """Names of the files retention has removed since start (including at start)."""
        return () if self._writer is None else tuple(self._writer.removed_files)

    @classmethod
    def from_config(cls, config: AuditConfig, signing_key: Ed25519PrivateKey) -> AuditLog:
        """The transfer log as `[audit]` describes it, sealed with `signing_key`."""
        return cls(
            config.path,
            signing_key=signing_key,
            checkpoint_every=config.checkpoint_every,
            checkpoint_interval=config.checkpoint_interval,
            rotate=config.rotate,
            rotate_size=config.rotate_size,
            retain_days=config.retain_days,
        )

    async def start(self) -> None:
        """Open the log, recover and repair its tail, and start the writer thread."""
        if self._writer is not None or self._closed:
            raise AuditError("the transfer log was already started")
        self._loop = asyncio.get_running_loop()
        if self._settings.signing_key is not None:
            await asyncio.to_thread(_check_sealing_key, self.folder, self._settings.key_id)
        writer = _ChainWriter(self.folder, self._settings, self._clock)
        try:
            await asyncio.to_thread(writer.open)
        except OSError as exc:
            writer.close()
            raise AuditError(f"{self.folder}: cannot open the transfer log: {exc}") from exc
        except BaseException:
            writer.close()
            raise
        self._writer = writer
        self._thread = threading.Thread(
            target=writer.run,
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

    def append_blocking(self, event: AuditEvent) -> dict[str, Any]:
        """`append` for a worker thread: block it, not the event loop, until the batch is durable.

        The writer settles the caller's future itself, so the record costs no trip through the
        event loop (the accept path stages, records and publishes in one thread call).
        """
        writer = self._writer
        if writer is None or self._loop is None or self._closed:
            raise AuditError("the transfer log is not open")
        if writer.broken is not None:
            raise AuditError(writer.broken)
        ticket = next(self._tickets)
        future: concurrent.futures.Future[dict[str, Any]] = concurrent.futures.Future()
        self._waiting[ticket] = future
        self._inbox.put((ticket, event.body()))
        return future.result()

    async def close(self) -> None:
        """Write what is queued, seal it with a checkpoint, stop the thread, close the files."""
        if self._closed:
            return
        self._closed = True
        if self._writer is None or self._thread is None:
            return
        self._inbox.put(None)
        await asyncio.to_thread(self._thread.join)
        self._writer.close()
        for ticket in list(self._waiting):  # put after the stop sign: never written
            if (waiter := self._waiting.pop(ticket, None)) is not None:
                waiter.set_exception(AuditError("the transfer log is closed"))

    def _acknowledge(self, outcomes: list[Outcome]) -> None:
        """Settle waiting threads at once; hand the rest to the event loop (writer thread)."""
        for_loop: list[Outcome] = []
        for outcome in outcomes:
            ticket, record, error = outcome
            waiter = self._waiting.pop(ticket, None)
            if waiter is None:
                for_loop.append(outcome)
            elif record is not None:
                waiter.set_result(record)
            else:
                waiter.set_exception(AuditError(error or "transfer log write failed"))
        if self._loop is None or not for_loop:
            return
        try:
            self._loop.call_soon_threadsafe(self._settle, for_loop)
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


def verify_chain(folder: Path) -> int:
    """Check the log without signatures (`audit_verify.verify`); return the last seq.

    Raises AuditIntegrityError naming the first bad seq; AuditError if there is no log folder.
    """
    report = verify(folder, None)
    if not report.ok:
        raise AuditIntegrityError(
            report.problem or "the transfer log does not verify", seq=report.first_bad_seq
        )
    return report.last_seq


def _check_sealing_key(folder: Path, key_id: str) -> None:
    """Refuse to extend a log sealed with another key (e.g. after restoring the wrong keys).

    Checkpoints under a different key would make the log fail `gateway audit verify` for good;
    better not to write than to damage the record.
    """
    try:
        line = (folder / HEAD_NAME).read_bytes().strip()
    except FileNotFoundError:
        return
    except OSError as exc:
        raise AuditError(f"{folder / HEAD_NAME}: cannot read: {exc.strerror}") from exc
    sealed_with = (parse_record(line) or {}).get("key_id")
    if sealed_with is not None and sealed_with != key_id:
        raise AuditError(
            f"{folder}: the transfer log is sealed with key {sealed_with}, but the audit-signing "
            f"key is {key_id}: restore the right key folder (see docs/operations.md)"
        )
