import os
import secrets
import stat
import subprocess
import sys
import time
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from gateway.errors import SpoolCorruptError, SpoolError
from gateway.spool import CHUNK_SIZE, MAGIC, SALT_LENGTH, QueueEntry, Recipient, Spool, State

KEY = bytes(range(32))
ADDRESS = "alice.canary7@example.org"
BODY_CANARY = b"Subject: CANARY-BODY-4711 child protection plan"
FOLDERS = ("tmp", "data", "active", "deferred", "held")


def make_ref(n: int) -> str:
    """Return the n-th test reference."""
    return f"SG-01JABCDEFGHJKMNPQRSTVWX{n:03d}"


def make_entry(ref: str, state: State = State.ACTIVE) -> QueueEntry:
    """Return a plausible entry whose addresses are canaries."""
    now = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
    return QueueEntry(
        ref=ref,
        state=state,
        received=now,
        client="bromley-council",
        sender="sender.canary@bromley.gov.uk",
        sender_domain="bromley.gov.uk",
        sender_pseudonym="p" * 16,
        recipients=(Recipient(ADDRESS, "example.org", "q" * 16),),
        verdict="hold" if state is State.HELD else "release",
        reasons=("insecure_domain:example.org",) if state is State.HELD else (),
        policy="a" * 64,
        decided_at=now,
        size=0,
        digest="sha256:" + "0" * 64,
    )


@pytest.fixture
def spool(tmp_path):
    """Return a prepared, empty spool in a temporary folder."""
    spool = Spool(tmp_path / "spool", KEY)
    assert spool.prepare(process_start=time.time()) == []
    return spool


def store(spool: Spool, ref: str, body: bytes, state: State = State.ACTIVE) -> QueueEntry:
    """Write `body` in pieces and commit it with a matching entry."""
    writer = spool.new_message(ref)
    for start in range(0, len(body), 10_000):
        writer.write(body[start : start + 10_000])
    entry = replace(make_entry(ref, state), size=writer.size, digest=writer.digest)
    spool.commit(writer, entry)
    return entry


def files(spool: Spool) -> list[str]:
    """List every file under the spool root, relative and sorted."""
    return sorted(str(p.relative_to(spool.root)) for p in spool.root.rglob("*") if p.is_file())


def split_chunks(data: bytes) -> tuple[bytes, list[bytes]]:
    """Split a spool file into its header and its length-prefixed chunks."""
    header, rest, chunks = data[: len(MAGIC) + SALT_LENGTH], data[len(MAGIC) + SALT_LENGTH :], []
    while rest:
        length = int.from_bytes(rest[:4], "big")
        chunks.append(rest[: 4 + length])
        rest = rest[4 + length :]
    return header, chunks


BIG = BODY_CANARY + secrets.token_bytes(200 * 1024) + BODY_CANARY


@pytest.mark.parametrize("size", [0, 1, CHUNK_SIZE, CHUNK_SIZE + 1, len(BIG)])
def test_content_round_trip(spool, size):
    """Content of any size, across chunk boundaries, reads back byte-identical."""
    body = BIG[:size]
    entry = store(spool, make_ref(1), body)
    assert spool.read_content(entry.ref) == body
    assert entry.size == size
    assert spool.load(entry.ref) == entry


def test_content_streams_in_chunks(spool):
    """A 200 KiB message is read back as several chunks of at most 64 KiB."""
    store(spool, make_ref(1), BIG)
    chunks = list(spool.open_content(make_ref(1)))
    assert len(chunks) == 4
    assert max(len(c) for c in chunks) == CHUNK_SIZE


def test_no_plaintext_on_disk(spool):
    """Neither the body nor any address appears in any spool file."""
    entry = store(spool, make_ref(1), BIG, State.HELD)
    spool.save(replace(entry, state=State.DEFERRED, last_error="451 from mx.example.net"))
    assert files(spool) == [f"data/{make_ref(1)}.msg", f"deferred/{make_ref(1)}.meta"]
    for path in spool.root.rglob("*.m*"):
        data = path.read_bytes()
        assert data.startswith(MAGIC)
        for canary in (BODY_CANARY, b"CANARY-BODY", ADDRESS.encode(), b"alice.canary7", b"451"):
            assert canary not in data


def test_layout_is_private(spool):
    """Spool folders are 0700 and spool files 0600."""
    store(spool, make_ref(1), b"hello")
    for name in FOLDERS:
        assert stat.S_IMODE((spool.root / name).stat().st_mode) == 0o700
    for path in spool.root.rglob("*.m*"):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600


def tamper_bit_flip(header, chunks):
    """Flip one bit inside the second chunk's ciphertext."""
    middle = bytearray(chunks[1])
    middle[100] ^= 0x01
    return header + chunks[0] + bytes(middle) + b"".join(chunks[2:])


TAMPERS = {
    "bit flip": tamper_bit_flip,
    "truncated at a chunk boundary": lambda h, c: h + b"".join(c[:2]),
    "final chunk dropped": lambda h, c: h + b"".join(c[:-1]),
    "two chunks swapped": lambda h, c: h + c[1] + c[0] + b"".join(c[2:]),
    "truncated inside a chunk": lambda h, c: (h + b"".join(c))[:-7],
    "bytes appended": lambda h, c: h + b"".join(c) + b"\0\0\0\0",
    "salt changed": lambda h, c: h[:-1] + bytes([h[-1] ^ 1]) + b"".join(c),
    "header only": lambda h, _c: h,
}


@pytest.mark.parametrize("tamper", TAMPERS.values(), ids=TAMPERS.keys())
def test_tampered_content_is_refused(spool, tamper):
    """Any change to a stored message fails authentication."""
    store(spool, make_ref(1), BIG)
    path = spool.root / "data" / f"{make_ref(1)}.msg"
    header, chunks = split_chunks(path.read_bytes())
    assert len(chunks) == 4
    path.write_bytes(tamper(header, chunks))
    with pytest.raises(SpoolCorruptError):
        spool.read_content(make_ref(1))


def test_content_of_another_ref_is_refused(spool):
    """A .msg renamed from another message does not decrypt."""
    store(spool, make_ref(1), b"first message")
    store(spool, make_ref(2), b"second message")
    data = spool.root / "data"
    (data / f"{make_ref(2)}.msg").replace(data / f"{make_ref(1)}.msg")
    with pytest.raises(SpoolCorruptError):
        spool.read_content(make_ref(1))


def test_entry_of_another_ref_is_refused(spool):
    """A .meta renamed from another message does not decrypt."""
    store(spool, make_ref(1), b"first")
    store(spool, make_ref(2), b"second")
    active = spool.root / "active"
    (active / f"{make_ref(2)}.meta").replace(active / f"{make_ref(1)}.meta")
    with pytest.raises(SpoolCorruptError):
        spool.load(make_ref(1))


def test_entry_moved_to_another_state_is_refused(spool):
    """A held entry moved into active/ by hand is not released: its state must match."""
    store(spool, make_ref(1), b"held mail", State.HELD)
    (spool.root / "held" / f"{make_ref(1)}.meta").rename(
        spool.root / "active" / f"{make_ref(1)}.meta"
    )
    with pytest.raises(SpoolCorruptError, match="does not belong"):
        spool.load(make_ref(1))


def test_save_moves_between_states(spool):
    """Save moves the entry to its new state's folder, keeps one .meta and bumps revision."""
    entry = store(spool, make_ref(1), b"body", State.HELD)
    later = datetime(2026, 3, 1, 13, 0, tzinfo=UTC)
    saved = spool.save(replace(entry, state=State.DEFERRED, attempts=1, next_attempt=later))
    assert saved.revision == 1
    assert spool.refs(State.DEFERRED) == [make_ref(1)]
    assert spool.refs(State.HELD) == []
    again = spool.save(replace(saved, state=State.DEFERRED, attempts=2))
    assert files(spool) == [f"data/{make_ref(1)}.msg", f"deferred/{make_ref(1)}.meta"]
    assert spool.load(make_ref(1)) == again
    assert again.revision == 2
    assert again.next_attempt == later


def test_save_refuses_a_stale_entry(spool):
    """Saving an entry that was changed meanwhile is refused rather than lost."""
    entry = store(spool, make_ref(1), b"body", State.HELD)
    spool.save(replace(entry, state=State.ACTIVE))
    with pytest.raises(SpoolError, match="changed since"):
        spool.save(replace(entry, state=State.DEFERRED))
    assert spool.load(make_ref(1)).state is State.ACTIVE


def test_entries_and_refs(spool):
    """Entries can be listed per state or all together, oldest ref first."""
    store(spool, make_ref(2), b"b", State.HELD)
    store(spool, make_ref(1), b"a")
    store(spool, make_ref(3), b"c", State.HELD)
    assert spool.refs(State.HELD) == [make_ref(2), make_ref(3)]
    assert [e.ref for e in spool.entries(State.ACTIVE)] == [make_ref(1)]
    assert [e.ref for e in spool.entries()] == [make_ref(1), make_ref(2), make_ref(3)]
    assert [len(e.pending()) for e in spool.entries()] == [1, 1, 1]


def test_remove_deletes_content_and_entry(spool):
    """Remove leaves no file of the message behind and may be repeated."""
    store(spool, make_ref(1), b"body")
    spool.remove(make_ref(1))
    spool.remove(make_ref(1))
    assert files(spool) == []
    with pytest.raises(SpoolError, match="not in the spool"):
        spool.load(make_ref(1))


@pytest.mark.parametrize(
    "ref", ["../../etc/passwd", "SG-../x", "SG-01jabcdefghjkmnpqrstvwx001", ""]
)
def test_bad_refs_are_refused(spool, ref):
    """A ref that is not SG- plus 26 Crockford characters never reaches a path."""
    with pytest.raises(SpoolError, match="not a spool reference"):
        spool.new_message(ref)
    with pytest.raises(SpoolError, match="not a spool reference"):
        spool.open_content(ref)
    with pytest.raises(SpoolError, match="not a spool reference"):
        spool.remove(ref)


def test_commit_refuses_a_duplicate_ref(spool):
    """Committing a ref already in the spool fails and keeps the first message."""
    store(spool, make_ref(1), b"first")
    with pytest.raises(SpoolError, match="already in the spool"):
        store(spool, make_ref(1), b"second")
    assert spool.read_content(make_ref(1)) == b"first"
    assert files(spool) == [f"active/{make_ref(1)}.meta", f"data/{make_ref(1)}.msg"]


def test_a_new_message_touches_the_disk_only_when_written(spool):
    """Starting a message costs no I/O; the first write creates its file; abort removes it."""
    writer = spool.new_message(make_ref(1))
    assert files(spool) == []
    writer.abort()  # nothing to remove
    with pytest.raises(SpoolError, match="closed"):
        writer.write(b"late")
    assert files(spool) == []
    empty = spool.new_message(make_ref(2))
    spool.commit(empty, make_entry(make_ref(2)))
    assert spool.read_content(make_ref(2)) == b""


def test_abort_removes_the_temporary_file(spool):
    """Abort removes the partial file and can be called twice."""
    writer = spool.new_message(make_ref(1))
    writer.write(BIG)
    assert len(files(spool)) == 1
    writer.abort()
    writer.abort()
    assert files(spool) == []
    with pytest.raises(SpoolError, match="closed"):
        writer.write(b"more")


def test_prepare_removes_only_old_temporary_files(spool):
    """Prepare removes tmp files older than the process, never one still being written."""
    old = spool.root / "tmp" / "old.tmp"
    old.write_bytes(b"x")
    os.utime(old, (time.time() - 3600, time.time() - 3600))
    writer = spool.new_message(make_ref(1))
    writer.write(b"in flight")
    problems = spool.prepare(process_start=time.time() - 60)
    assert problems == ["removed stale temporary file old.tmp"]
    assert files(spool) == [f"tmp/{writer.path.name}"]
    writer.abort()


@pytest.mark.parametrize(("stale", "kept"), [(State.ACTIVE, State.DEFERRED), (State.HELD, None)])
def test_prepare_keeps_the_highest_revision(spool, stale, kept):
    """A .meta left in two state folders by a crash mid-move resolves to the newest."""
    entry = store(spool, make_ref(1), b"body", State.ACTIVE)
    old_meta = (spool.root / "active" / f"{make_ref(1)}.meta").read_bytes()
    saved = spool.save(replace(entry, state=State.DEFERRED))
    if kept is None:  # the newer copy is the one in held/
        saved = spool.save(replace(saved, state=State.HELD))
        old_meta = (spool.root / "held" / f"{make_ref(1)}.meta").read_bytes()
        saved = spool.save(replace(saved, state=State.DEFERRED))
        saved = spool.save(replace(saved, state=State.HELD))
        (spool.root / "deferred" / f"{make_ref(1)}.meta").write_bytes(b"junk")
        kept = State.HELD
    else:
        (spool.root / stale.value / f"{make_ref(1)}.meta").write_bytes(old_meta)
    problems = spool.prepare(process_start=time.time())
    assert len(problems) == 1
    assert problems[0].startswith(f"kept {kept.value} copy of {make_ref(1)}")
    assert spool.load(make_ref(1)) == saved
    assert files(spool) == sorted([f"data/{make_ref(1)}.msg", f"{kept.value}/{make_ref(1)}.meta"])


def test_prepare_removes_orphans(spool):
    """Prepare removes content without an entry and an entry without content."""
    store(spool, make_ref(1), b"never acknowledged")
    store(spool, make_ref(2), b"lost content")
    store(spool, make_ref(3), b"fine")
    (spool.root / "active" / f"{make_ref(1)}.meta").unlink()
    (spool.root / "data" / f"{make_ref(2)}.msg").unlink()
    problems = spool.prepare(process_start=time.time())
    assert sorted(problems) == [
        f"removed envelope without content {make_ref(2)}",
        f"removed orphan data {make_ref(1)}",
    ]
    assert files(spool) == [f"active/{make_ref(3)}.meta", f"data/{make_ref(3)}.msg"]
    assert ADDRESS not in "".join(problems)


def test_queue_entry_json_round_trip():
    """An entry survives to_json and from_json unchanged."""
    entry = replace(
        make_entry(make_ref(1), State.DEFERRED),
        next_attempt=datetime(2026, 3, 2, tzinfo=UTC) + timedelta(seconds=1),
        last_error="451 from mx.example.net",
        smtputf8=True,
        attempts=3,
    )
    assert QueueEntry.from_json(entry.to_json()) == entry


@pytest.mark.parametrize(
    "change",
    [
        lambda raw: raw.replace(b'"attempts":0', b'"attempts":0,"extra":1'),
        lambda raw: raw.replace(b'"attempts":0,', b""),
        lambda raw: raw.replace(b'"attempts":0', b'"attempts":"0"'),
        lambda raw: raw.replace(b'"attempts":0', b'"attempts":false'),
        lambda raw: raw.replace(b'"status":"pending"', b'"status":"lost"'),
        lambda raw: raw.replace(b'"state":"active"', b'"state":"gone"'),
        lambda raw: raw.replace(b"+00:00", b""),
        lambda raw: raw.replace(b'"format":2', b'"format":3'),
        lambda raw: raw[:-1],
    ],
)
def test_queue_entry_json_is_strict(change):
    """Unknown, missing, mistyped or malformed fields are a SpoolCorruptError."""
    raw = make_entry(make_ref(1)).to_json()
    assert change(raw) != raw
    with pytest.raises(SpoolCorruptError):
        QueueEntry.from_json(change(raw))


CHILD = """
import resource, sys
from pathlib import Path
from gateway.errors import SpoolError
from gateway.spool import QueueEntry, Spool

root, entry_json, size, limit = sys.argv[1:]
spool = Spool(Path(root), bytes(range(32)))
entry = QueueEntry.from_json(entry_json.encode())
hard = resource.getrlimit(resource.RLIMIT_FSIZE)[1]
resource.setrlimit(resource.RLIMIT_FSIZE, (int(limit), hard))
writer = spool.new_message(entry.ref)
try:
    writer.write(b"x" * int(size))
    spool.commit(writer, entry)
except SpoolError as exc:
    print("SPOOL_ERROR", exc)
else:
    print("COMMITTED")
"""


@pytest.mark.parametrize(
    ("size", "limit", "outcome"),
    [
        (300 * 1024, 100_000, "SPOOL_ERROR"),  # EFBIG while writing DATA
        (120 * 1024, 100_000, "SPOOL_ERROR"),  # EFBIG on the final chunk, inside commit
        (120 * 1024, 10_000_000, "COMMITTED"),  # the same harness without a limit
    ],
)
def test_failed_write_leaves_nothing(spool, size, limit, outcome):
    """A real write failure (EFBIG from RLIMIT_FSIZE) raises SpoolError and leaves no file."""
    entry = make_entry(make_ref(1))
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            CHILD,
            str(spool.root),
            entry.to_json().decode(),
            str(size),
            str(limit),
        ],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    assert result.stdout.split(" ", 1)[0].strip() == outcome, result.stdout + result.stderr
    if outcome == "SPOOL_ERROR":
        assert "File too large" in result.stdout
        assert files(spool) == []
    else:
        assert spool.read_content(make_ref(1)) == b"x" * size


def test_failed_rename_leaves_nothing(spool):
    """A commit whose entry cannot be placed (state folder is not a folder) removes its content."""
    (spool.root / "held").rmdir()
    (spool.root / "held").write_bytes(b"")
    writer = spool.new_message(make_ref(1))
    writer.write(BIG)
    with pytest.raises(SpoolError, match="cannot commit"):
        spool.commit(writer, make_entry(make_ref(1), State.HELD))
    assert files(spool) == ["held"]


def test_staged_message_is_durable_but_not_queued_until_published(spool):
    """Between stage and publish a message is only temporary files, invisible to the queue."""
    ref = make_ref(900)
    writer = spool.new_message(ref)
    writer.write(b"staged body")
    staged = spool.stage(writer, replace(make_entry(ref), size=writer.size, digest=writer.digest))
    assert spool.refs(State.ACTIVE) == []
    assert all(name.startswith("tmp/") for name in files(spool))
    spool.publish(staged)
    assert spool.refs(State.ACTIVE) == [ref]
    assert spool.read_content(ref) == b"staged body"
    assert not any(name.startswith("tmp/") for name in files(spool))


def test_discarded_stage_leaves_nothing(spool):
    """A staged message whose decision could not be recorded is dropped without a trace."""
    ref = make_ref(901)
    writer = spool.new_message(ref)
    writer.write(b"never recorded")
    spool.discard(spool.stage(writer, replace(make_entry(ref), size=writer.size)))
    assert files(spool) == []


def test_a_crash_between_stage_and_publish_leaves_only_what_prepare_removes(spool, tmp_path):
    """Staged files left by a dead process are removed at the next start, before listening."""
    ref = make_ref(902)
    writer = spool.new_message(ref)
    writer.write(b"crashed before publish")
    spool.stage(writer, replace(make_entry(ref), size=writer.size))
    restarted = Spool(spool.root, KEY)
    notes = restarted.prepare(process_start=time.time() + 1)
    assert files(restarted) == []
    assert len(notes) == 2


def test_entry_of_format_1_is_read_as_a_message_not_a_notice():
    """An entry written before notices existed (format 1) still loads, as an ordinary message."""
    entry = make_entry(make_ref(950))
    raw = entry.to_json().replace(b'"format":2', b'"format":1').replace(b'"notice":false,', b"")
    assert b"notice" not in raw
    assert QueueEntry.from_json(raw) == entry


@pytest.mark.parametrize("size", [0, 1, CHUNK_SIZE, 4 * CHUNK_SIZE, 4 * CHUNK_SIZE + 1, len(BIG)])
def test_content_blocks_are_whole_chunks_of_about_the_block_size(spool, size):
    """Blocks join to the content, each but the last at least the block size, none empty."""
    body = (BIG * 2)[:size]
    store(spool, make_ref(1), body)
    blocks = list(spool.content_blocks(make_ref(1), 2 * CHUNK_SIZE))
    assert b"".join(blocks) == body
    assert all(2 * CHUNK_SIZE <= len(b) <= 3 * CHUNK_SIZE for b in blocks[:-1])
    assert all(blocks)


def test_closing_content_blocks_early_closes_the_file(spool):
    """A reader that stops after one block and closes leaves no file open."""
    store(spool, make_ref(1), BIG)
    path = spool.root / "data" / f"{make_ref(1)}.msg"

    def is_open():
        """Whether this process holds the content file open (Linux /proc)."""
        targets = []
        for fd in Path("/proc/self/fd").iterdir():
            try:
                targets.append(fd.readlink())
            except OSError:  # the listing's own descriptor, gone already
                continue
        return path in targets

    blocks = spool.content_blocks(make_ref(1), CHUNK_SIZE)
    assert len(next(blocks)) == CHUNK_SIZE
    assert is_open()
    blocks.close()
    assert not is_open()
