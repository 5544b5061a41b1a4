"""The durable, encrypted message queue; no plaintext of a message or envelope touches disk.

Layout under the spool root (folders 0700, files 0600):

    tmp/                  files being written; stale ones are removed by `prepare`
    data/<ref>.msg        message content, immutable once committed
    active/<ref>.meta     envelope and state; likewise deferred/ and held/

Both kinds of file are `MAGIC + salt(16)` and then chunks, each `length(4, big-endian) +
AES-GCM ciphertext` of at most 64 KiB plaintext. The file key is HKDF-SHA256 of the spool key
with the salt and an info naming the kind of file and the ref; the nonce is an 8-byte chunk
counter and a 4-byte flag that is 1 only on the last chunk; the ref is the associated data.
A flipped bit, a reordered or missing chunk, a truncation or a file of another ref fails with
`SpoolCorruptError`. A `.meta` is one chunk; its state must match the folder it lies in.

Commit is two steps so that the caller can record the decision in between (`stage`, then
`publish`): content and `.meta` written and fsynced under tmp/; then content renamed into data/,
the `.meta` into its state folder, and the folders fsynced. A crash before `publish` leaves only
temporary files, removed at start; a `.msg` without a `.meta` was never acknowledged and is
removed at start too.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import secrets
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import IO

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.hashes import SHA256
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from gateway.dirsync import DirectorySync
from gateway.errors import SpoolCorruptError, SpoolError
from gateway.queue_entry import REF_PATTERN, QueueEntry, Recipient, State

__all__ = ["CHUNK_SIZE", "MAGIC", "QueueEntry", "Recipient", "Spool", "Staged", "State"]

MAGIC = b"SGSPOOL1"
SALT_LENGTH = 16
CHUNK_SIZE = 64 * 1024
READ_BLOCK = 4 * CHUNK_SIZE  # plaintext per step of `content_blocks`
_TAG = 16
_REF = REF_PATTERN
_MSG_INFO = b"gateway spool message "
_META_INFO = b"gateway spool meta "


def _check_ref(ref: str) -> str:
    if not isinstance(ref, str) or not _REF.fullmatch(ref):
        raise SpoolError("not a spool reference (expected SG- and 26 Crockford base32 chars)")
    return ref


def _file_key(spool_key: bytes, salt: bytes, info: bytes) -> AESGCM:
    return AESGCM(HKDF(SHA256(), 32, salt, info).derive(spool_key))


def _nonce(counter: int, *, final: bool) -> bytes:
    return counter.to_bytes(8, "big") + (b"\0\0\0\1" if final else b"\0\0\0\0")


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _fsync_file(fd: int) -> None:
    """Fsync one file; a failure is final (fsyncgate: never retry it)."""
    os.fsync(fd)


# One group-commit point for every spool in the process: concurrent messages share fsyncs.
_DIRECTORIES = DirectorySync()


def _fsync_dir(folder: Path) -> None:
    """Fsync a folder so that names created or removed in it survive a power cut."""
    _DIRECTORIES.sync(folder)


def _create(path: Path) -> int:
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW
    return os.open(path, flags, 0o600)


def _unlink_quietly(*paths: Path) -> None:
    for path in paths:
        with contextlib.suppress(OSError):
            path.unlink()


def _read_exact(file: IO[bytes], size: int, path: Path) -> bytes:
    data = file.read(size)
    if len(data) != size:
        raise SpoolCorruptError(f"{path}: truncated")
    return data


def _decrypt_chunks(
    file: IO[bytes], spool_key: bytes, info: bytes, ref: bytes, path: Path
) -> Iterator[bytes]:
    """Yield verified plaintext chunks; the last one must carry the final flag."""
    if _read_exact(file, len(MAGIC), path) != MAGIC:
        raise SpoolCorruptError(f"{path}: not a spool file")
    aead = _file_key(spool_key, _read_exact(file, SALT_LENGTH, path), info + ref)
    header, counter = _read_exact(file, 4, path), 0
    while True:
        length = int.from_bytes(header, "big")
        if not _TAG <= length <= CHUNK_SIZE + _TAG:
            raise SpoolCorruptError(f"{path}: bad chunk length")
        ciphertext = _read_exact(file, length, path)
        header = file.read(4)
        try:
            plaintext = aead.decrypt(_nonce(counter, final=not header), ciphertext, ref)
        except InvalidTag as exc:
            raise SpoolCorruptError(f"{path}: chunk {counter} failed authentication") from exc
        yield plaintext
        if not header:
            return
        if len(header) != 4:
            raise SpoolCorruptError(f"{path}: truncated")
        counter += 1


class MessageWriter:
    """Encrypts a message into a temporary file as it arrives (blocking; use a thread)."""

    def __init__(self, ref: str, path: Path, spool_key: bytes) -> None:
        self.ref = ref
        self.size = 0
        self.path = path
        self._hash = hashlib.sha256()
        self._buffer = bytearray()
        self._counter = 0
        salt = secrets.token_bytes(SALT_LENGTH)
        self._aead = _file_key(spool_key, salt, _MSG_INFO + ref.encode())
        self._salt = salt
        # The file is created by the first write (or the finish of an empty message): a
        # session can start a message without a trip to a thread.
        self._fd: int | None = None
        self._closed = False

    def _open(self) -> int:
        """The temporary file's descriptor, creating the file on first use (raises OSError)."""
        if self._closed:
            raise SpoolError(f"spool file {self.path.name} is closed")
        if self._fd is None:
            fd = _create(self.path)
            self._fd = fd
            _write_all(fd, MAGIC + self._salt)
        return self._fd

    @property
    def digest(self) -> str:
        """Return `sha256:<hex>` of the plaintext written so far."""
        return "sha256:" + self._hash.hexdigest()

    def write(self, data: bytes) -> None:
        """Add content; each full 64 KiB chunk is encrypted and written at once."""
        if self._closed:
            raise SpoolError(f"spool file {self.path.name} is closed")
        self._buffer += data
        self.size += len(data)
        self._hash.update(data)
        try:
            self._open()
            while len(self._buffer) > CHUNK_SIZE:  # keep a remainder for the final chunk
                self._emit(bytes(self._buffer[:CHUNK_SIZE]), final=False)
                del self._buffer[:CHUNK_SIZE]
        except OSError as exc:
            self.abort()
            raise SpoolError(f"cannot write spool file {self.path.name}: {exc.strerror}") from exc

    def _emit(self, plaintext: bytes, *, final: bool) -> None:
        fd = self._open()
        nonce = _nonce(self._counter, final=final)
        ciphertext = self._aead.encrypt(nonce, plaintext, self.ref.encode())
        _write_all(fd, len(ciphertext).to_bytes(4, "big") + ciphertext)
        self._counter += 1

    def _finish(self) -> None:
        """Write the final chunk, fsync and close; raises OSError (for `Spool.commit`)."""
        self._emit(bytes(self._buffer), final=True)
        self._buffer.clear()
        fd, self._fd, self._closed = self._open(), None, True
        try:
            _fsync_file(fd)
        finally:
            os.close(fd)

    def abort(self) -> None:
        """Close and remove the temporary file; never raises for a missing file."""
        fd, self._fd, self._closed = self._fd, None, True
        self._buffer.clear()
        if fd is not None:
            with contextlib.suppress(OSError):
                os.close(fd)
        _unlink_quietly(self.path)


@dataclass(frozen=True)
class Staged:
    """A message written and fsynced under tmp/, not yet published into the queue."""

    ref: str
    msg_tmp: Path
    meta_tmp: Path
    meta: Path
    entry: QueueEntry


class Spool:
    """The spool folder: commit, update, read and remove queued messages (blocking calls)."""

    def __init__(self, root: Path, spool_key: bytes) -> None:
        if len(spool_key) != 32:
            raise SpoolError("the spool key must be 32 bytes")
        self.root = root
        self._key = spool_key
        self.tmp, self.data = root / "tmp", root / "data"
        # Called with (ref, entry) after a publish or save, (ref, None) after a remove.
        self.observers: list[Callable[[str, QueueEntry | None], None]] = []

    @contextlib.contextmanager
    def locked(self, *, wait: bool) -> Iterator[None]:
        """Hold the spool's lock: the daemon for its whole life, the CLI for one action.

        Without `wait`, a lock held elsewhere is a SpoolError at once (the caller says whether
        that means "the daemon is running" or "another command is at work").
        """
        self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(self.root / "lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
            except BlockingIOError as exc:
                raise SpoolError(f"{self.root}: the spool is in use by another process") from exc
            yield
        finally:
            os.close(fd)

    def _meta(self, ref: str, state: State) -> Path:
        return self.root / state.value / f"{ref}.meta"

    def _msg(self, ref: str) -> Path:
        return self.data / f"{ref}.msg"

    def _tmp_name(self, ref: str, kind: str) -> Path:
        return self.tmp / f"{ref}.{kind}.{os.getpid()}.{secrets.token_hex(4)}.tmp"

    def prepare(self, *, process_start: float) -> list[str]:
        """Create folders and repair what a crash left; return short problem notes."""
        problems: list[str] = []
        touched: set[Path] = set()
        try:
            self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
            for folder in (self.tmp, self.data, *(self.root / s.value for s in State)):
                folder.mkdir(mode=0o700, exist_ok=True)
                folder.chmod(0o700)
            for path in self.tmp.iterdir():
                if path.lstat().st_mtime < process_start:
                    path.unlink()
                    touched.add(self.tmp)
                    problems.append(f"removed stale temporary file {path.name}")
            placed: dict[str, list[State]] = {}
            for state in State:
                for ref in self.refs(state):
                    placed.setdefault(ref, []).append(state)
            for ref, states in placed.items():
                if len(states) > 1:
                    keep = max(states, key=lambda s: self._revision_or_minus_one(ref, s))
                    for state in states:
                        if state != keep:
                            self._meta(ref, state).unlink()
                            touched.add(self.root / state.value)
                    problems.append(f"kept {keep} copy of {ref} found in {len(states)} states")
                    states[:] = [keep]
                if not self._msg(ref).exists():
                    self._meta(ref, states[0]).unlink()
                    touched.add(self.root / states[0].value)
                    problems.append(f"removed envelope without content {ref}")
            for path in self.data.iterdir():
                ref = path.name.removesuffix(".msg")
                if path.suffix == ".msg" and _REF.fullmatch(ref) and ref not in placed:
                    path.unlink()
                    touched.add(self.data)
                    problems.append(f"removed orphan data {ref}")
            for folder in touched:
                _fsync_dir(folder)
        except OSError as exc:
            raise SpoolError(f"cannot prepare spool {self.root}: {exc.strerror}") from exc
        return problems

    def _revision_or_minus_one(self, ref: str, state: State) -> int:
        try:
            return self._read_meta(ref, state).revision
        except SpoolError:
            return -1

    def new_message(self, ref: str) -> MessageWriter:
        """Start writing the content of message `ref` into tmp/."""
        return MessageWriter(_check_ref(ref), self._tmp_name(ref, "msg"), self._key)

    def commit(self, writer: MessageWriter, entry: QueueEntry) -> None:
        """Make the message and its entry durable, or leave nothing and raise SpoolError."""
        self.publish(self.stage(writer, entry))

    def stage(self, writer: MessageWriter, entry: QueueEntry) -> Staged:
        """First half of a commit: content and entry written and fsynced under tmp/.

        A staged message is durable but not yet in the queue: a crash now leaves only
        temporary files, which `prepare` removes. The caller records the decision (audit),
        then calls `publish`, or `discard` if the record could not be written.
        """
        ref = _check_ref(entry.ref)
        if writer.ref != ref:
            writer.abort()
            raise SpoolError(f"writer for {writer.ref} committed as {ref}")
        if self._msg(ref).exists() or self._find(ref):
            writer.abort()
            raise SpoolError(f"{ref} is already in the spool")
        meta_tmp = self._tmp_name(ref, "meta")
        try:
            writer._finish()
            self._write_meta(meta_tmp, entry)
        except OSError as exc:
            writer.abort()
            _unlink_quietly(meta_tmp)
            raise SpoolError(f"cannot commit {ref} to the spool: {exc.strerror}") from exc
        return Staged(ref, writer.path, meta_tmp, self._meta(ref, entry.state), entry)

    def publish(self, staged: Staged) -> None:
        """Second half of a commit: rename into data/ and the state folder, fsync folders."""
        msg = self._msg(staged.ref)
        created: list[Path] = []
        try:
            staged.msg_tmp.rename(msg)
            created.append(msg)
            staged.meta_tmp.rename(staged.meta)
            created.append(staged.meta)
            # The new names must survive a power cut; the old ones in tmp/ need not be seen
            # to go (a rename moves one inode, and `prepare` clears tmp/ at start anyway).
            for folder in (self.data, staged.meta.parent):
                _fsync_dir(folder)
        except OSError as exc:
            _unlink_quietly(staged.msg_tmp, staged.meta_tmp, *reversed(created))
            for folder in (self.tmp, self.data, staged.meta.parent):  # best effort: the removals
                with contextlib.suppress(OSError):
                    _fsync_dir(folder)
            raise SpoolError(f"cannot commit {staged.ref} to the spool: {exc.strerror}") from exc
        self._changed(staged.ref, staged.entry)

    def discard(self, staged: Staged) -> None:
        """Drop a staged message that will not be published."""
        _unlink_quietly(staged.msg_tmp, staged.meta_tmp)

    def _write_meta(self, path: Path, entry: QueueEntry) -> None:
        """Encrypt `entry` into a new file at `path` and fsync it (raises OSError)."""
        ref = entry.ref.encode()
        salt = secrets.token_bytes(SALT_LENGTH)
        aead = _file_key(self._key, salt, _META_INFO + ref)
        ciphertext = aead.encrypt(_nonce(0, final=True), entry.to_json(), ref)
        fd = _create(path)
        try:
            _write_all(fd, MAGIC + salt + len(ciphertext).to_bytes(4, "big") + ciphertext)
            _fsync_file(fd)
        finally:
            os.close(fd)

    def save(self, entry: QueueEntry) -> QueueEntry:
        """Store a changed entry atomically under a new revision and return it.

        The entry must carry the revision last stored (from `load` or a previous `save`);
        otherwise someone else changed it meanwhile and SpoolError is raised.
        """
        current = self.load(entry.ref)
        if current.revision != entry.revision:
            raise SpoolError(f"{entry.ref} changed since it was loaded; reload and retry")
        saved = replace(entry, revision=entry.revision + 1)
        meta_tmp, target = self._tmp_name(entry.ref, "meta"), self._meta(entry.ref, saved.state)
        try:
            self._write_meta(meta_tmp, saved)
            meta_tmp.rename(target)
            _fsync_dir(target.parent)
            for state in self._find(entry.ref):
                if state != saved.state:
                    self._meta(entry.ref, state).unlink()
                    _fsync_dir(self.root / state.value)
        except OSError as exc:
            _unlink_quietly(meta_tmp)
            raise SpoolError(f"cannot save {entry.ref}: {exc.strerror}") from exc
        self._changed(saved.ref, saved)
        return saved

    def _find(self, ref: str) -> list[State]:
        return [state for state in State if self._meta(ref, state).exists()]

    def _read_meta(self, ref: str, state: State) -> QueueEntry:
        path = self._meta(ref, state)
        try:
            with path.open("rb") as file:
                plain = b"".join(_decrypt_chunks(file, self._key, _META_INFO, ref.encode(), path))
        except OSError as exc:
            raise SpoolError(f"cannot read {path}: {exc.strerror}") from exc
        entry = QueueEntry.from_json(plain)
        if entry.ref != ref or entry.state != state:
            raise SpoolCorruptError(f"{path}: entry does not belong in this place")
        return entry

    def contains(self, ref: str) -> bool:
        """True when `ref` has an entry in any state folder."""
        return bool(self._find(_check_ref(ref)))

    def load(self, ref: str) -> QueueEntry:
        """Return the entry of `ref`; SpoolError if it is not in the spool."""
        states = self._find(_check_ref(ref))
        if not states:
            raise SpoolError(f"{ref} is not in the spool")
        return max((self._read_meta(ref, s) for s in states), key=lambda e: e.revision)

    def entries(self, state: State | None = None) -> Iterator[QueueEntry]:
        """Yield every entry, or those in one state, oldest ref first."""
        if state is not None:
            for ref in self.refs(state):
                yield self._read_meta(ref, state)
            return
        for ref in sorted({ref for s in State for ref in self.refs(s)}):
            yield self.load(ref)

    def refs(self, state: State) -> list[str]:
        """List the refs in one state by file name alone, oldest first."""
        try:
            names = [path.name for path in (self.root / state.value).iterdir()]
        except FileNotFoundError:
            return []  # a spool the daemon has not prepared yet holds nothing
        except OSError as exc:
            raise SpoolError(f"cannot list {self.root / state.value}: {exc.strerror}") from exc
        found = (n.removesuffix(".meta") for n in names if n.endswith(".meta"))
        return sorted(ref for ref in found if _REF.fullmatch(ref))

    def open_content(self, ref: str) -> Generator[bytes, None, None]:
        """Return an iterator of the message's plaintext chunks, each verified when read.

        Chunks before a damaged one are yielded before SpoolCorruptError is raised, so a
        consumer must not treat the content as complete until the iterator is exhausted.
        """
        return self._content(self._msg(_check_ref(ref)), ref)

    def _content(self, path: Path, ref: str) -> Generator[bytes, None, None]:
        try:
            with path.open("rb") as file:
                yield from _decrypt_chunks(file, self._key, _MSG_INFO, ref.encode(), path)
        except OSError as exc:
            raise SpoolError(f"cannot read {path}: {exc.strerror}") from exc

    def content_blocks(self, ref: str, size: int = READ_BLOCK) -> Generator[bytes, None, None]:
        """Return an iterator of the plaintext in blocks of whole chunks, about `size` bytes each.

        For a reader in a thread: one step decrypts a few chunks (fewer trips to the thread
        than one per chunk) and memory is one block, whatever the size of the message. No
        block is empty; an empty message yields none. Closing the iterator closes the file.
        """
        with contextlib.closing(self.open_content(ref)) as chunks:
            block: list[bytes] = []
            held = 0
            for chunk in chunks:
                if chunk:
                    block.append(chunk)
                    held += len(chunk)
                if held >= size:
                    yield b"".join(block)
                    block, held = [], 0
            if block:
                yield b"".join(block)

    def read_content(self, ref: str) -> bytes:
        """Return the whole decrypted message (small ones only: delivery streams the blocks)."""
        return b"".join(self.open_content(ref))

    def remove(self, ref: str) -> None:
        """Delete the entry and then the content of `ref` (idempotent) and fsync folders."""
        _check_ref(ref)
        try:
            for state in self._find(ref):
                self._meta(ref, state).unlink()
                _fsync_dir(self.root / state.value)
            with contextlib.suppress(FileNotFoundError):
                self._msg(ref).unlink()
            _fsync_dir(self.data)
        except OSError as exc:
            raise SpoolError(f"cannot remove {ref}: {exc.strerror}") from exc
        self._changed(ref, None)

    def _changed(self, ref: str, entry: QueueEntry | None) -> None:
        """Tell each observer (e.g. the daemon's queue index) that `ref` changed or left."""
        for observer in self.observers:
            observer(ref, entry)
