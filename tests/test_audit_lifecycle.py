import asyncio
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from gateway import records
from gateway.audit import AuditLog, line_hash, log_files, read_records, verify_chain
from gateway.audit_files import unsigned_part
from gateway.audit_verify import verify
from gateway.errors import AuditError

KEY = Ed25519PrivateKey.generate()
PUBLIC = KEY.public_key()
FIRST = "transfer-000000000001.jsonl"


class FakeClock:
    """A clock the test moves by hand."""

    def __init__(self, start: datetime) -> None:
        self.now = start

    def __call__(self) -> datetime:
        """Return the current fake time."""
        return self.now


def _event(number: int) -> records.AuditEvent:
    """Return a small distinct event about message SG-<number>."""
    return records.held(ref=f"SG-{number}", reasons=["insecure_domain:gmail.com"], policy="ab")


def _file_lines(path: Path) -> list[dict]:
    """Return the records of one log file."""
    return [json.loads(line) for line in path.read_bytes().splitlines()]


async def _append(log: AuditLog, count: int) -> None:
    """Append count events one after another."""
    for number in range(count):
        await log.append(_event(number))


async def test_checkpoint_every_n_records_and_at_close(tmp_path):
    """With checkpoint_every=5, 12 records give checkpoints at seq 6 and 12, and one at close."""
    log = AuditLog(tmp_path, signing_key=KEY, checkpoint_every=5)
    await log.start()
    await _append(log, 12)
    await log.close()
    lines = (tmp_path / FIRST).read_bytes().splitlines()
    found = [json.loads(line) for line in lines]
    assert [r["seq"] for r in found if r["event"] == "checkpoint"] == [6, 12, 15]
    for line, record in zip(lines, found, strict=True):
        if record["event"] == "checkpoint":
            assert list(record) == ["seq", "ts", "event", "prev", "head", "key_id", "sig"]
            assert record["head"] == record["prev"]
            PUBLIC.verify(bytes.fromhex(record["sig"]), unsigned_part(record))
            assert line[: line.rindex(b',"sig":')] + b"}" == unsigned_part(record)
    assert (tmp_path / "head.json").read_bytes() == lines[-1] + b"\n"


async def test_no_checkpoint_at_close_when_everything_is_sealed(tmp_path):
    """Closing right after a checkpoint writes no second checkpoint."""
    log = AuditLog(tmp_path, signing_key=KEY, checkpoint_every=5)
    await log.start()
    await _append(log, 5)
    await log.close()
    events = [r["event"] for r in _file_lines(tmp_path / FIRST)]
    assert events == ["held"] * 5 + ["checkpoint"]


async def test_checkpoint_after_the_interval_without_further_appends(tmp_path):
    """A record left unsealed is sealed by the writer's timer after checkpoint_interval."""
    log = AuditLog(tmp_path, signing_key=KEY, checkpoint_every=1000, checkpoint_interval=0.05)
    await log.start()
    try:
        await log.append(_event(1))
        async with asyncio.timeout(10):
            while log.last_seq < 2:
                await asyncio.sleep(0.01)
        assert [r["event"] for r in _file_lines(tmp_path / FIRST)] == ["held", "checkpoint"]
        report = verify(tmp_path, PUBLIC)
        assert (report.ok, report.unsealed) == (True, 0)
    finally:
        await log.close()


async def test_daily_rotation_continues_the_chain_across_files(tmp_path):
    """Crossing midnight opens a new file named by its first seq; the old one ends sealed."""
    clock = FakeClock(datetime(2026, 3, 1, 23, 59, tzinfo=UTC))
    log = AuditLog(tmp_path, signing_key=KEY, rotate="daily", clock=clock)
    await log.start()
    await _append(log, 3)
    clock.now += timedelta(minutes=2)
    await _append(log, 2)
    await log.close()
    files = log_files(tmp_path)
    assert [path.name for path in files] == [FIRST, "transfer-000000000005.jsonl"]
    old, new = (path.read_bytes().splitlines() for path in files)
    assert json.loads(old[-1])["event"] == "checkpoint"
    assert json.loads(new[0])["prev"] == line_hash(old[-1])
    assert json.loads(new[0])["ts"].startswith("2026-03-02")
    report = verify(tmp_path, PUBLIC)
    assert (report.ok, report.files, report.last_seq) == (True, 2, 7)
    assert [r["seq"] for r in read_records(tmp_path)] == list(range(1, 8))


async def test_size_rotation_seals_every_closed_file(tmp_path):
    """rotate="size" starts a new file once the current one reaches rotate_size."""
    log = AuditLog(tmp_path, signing_key=KEY, rotate="size", rotate_size=600)
    await log.start()
    await _append(log, 12)
    await log.close()
    files = log_files(tmp_path)
    assert len(files) >= 3
    for path in files:
        lines = _file_lines(path)
        assert path.name == f"transfer-{lines[0]['seq']:012d}.jsonl"
        assert lines[-1]["event"] == "checkpoint"
    assert verify(tmp_path, PUBLIC).ok


async def test_rotation_without_a_signing_key(tmp_path):
    """A writer without a key still rotates, and the unsigned chain verifies."""
    log = AuditLog(tmp_path, rotate="size", rotate_size=300)
    await log.start()
    await _append(log, 6)
    await log.close()
    assert len(log_files(tmp_path)) > 1
    assert verify_chain(tmp_path) == 6


async def _retained_log(folder: Path) -> FakeClock:
    """Write records over five days with daily rotation and retain_days=1."""
    clock = FakeClock(datetime(2026, 3, 1, 12, tzinfo=UTC))
    log = AuditLog(folder, signing_key=KEY, rotate="daily", retain_days=1, clock=clock)
    await log.start()
    for _ in range(4):
        await _append(log, 2)
        clock.now += timedelta(days=1)
    await _append(log, 1)
    await log.close()
    return clock


async def test_retention_removes_old_files_and_leaves_a_signed_anchor(tmp_path):
    """Files older than retain_days go; anchor.json holds the last removed line; rest verifies."""
    await _retained_log(tmp_path)
    names = [path.name for path in log_files(tmp_path)]
    assert names == [f"transfer-{seq:012d}.jsonl" for seq in (7, 10, 13)]
    anchor = (tmp_path / "anchor.json").read_bytes()
    assert json.loads(anchor)["seq"] == 6
    first = _file_lines(tmp_path / names[0])[0]
    assert first["prev"] == line_hash(anchor.rstrip(b"\n"))
    report = verify(tmp_path, PUBLIC)
    assert report.ok, report.problem
    assert (report.first_seq, report.last_seq, report.files) == (7, 14, 3)


async def test_retention_on_start(tmp_path):
    """A writer started later removes files that have aged past retain_days meanwhile."""
    clock = FakeClock(datetime(2026, 3, 1, 12, tzinfo=UTC))
    log = AuditLog(tmp_path, signing_key=KEY, rotate="daily", clock=clock)
    await log.start()
    await _append(log, 2)
    clock.now += timedelta(days=1)
    await _append(log, 2)
    await log.close()
    clock.now += timedelta(days=10)
    log = AuditLog(tmp_path, signing_key=KEY, rotate="daily", retain_days=5, clock=clock)
    await log.start()
    await log.close()
    assert log.removed_files == (FIRST,)
    assert verify(tmp_path, PUBLIC).first_seq == 4


async def test_tampered_anchor_is_detected(tmp_path):
    """An anchor.json that no longer carries a valid signature fails verification."""
    await _retained_log(tmp_path)
    anchor = tmp_path / "anchor.json"
    anchor.write_bytes(anchor.read_bytes().replace(b"2026-03-0", b"2026-04-0"))
    report = verify(tmp_path, PUBLIC)
    assert (report.ok, report.first_bad_seq) == (False, 7)
    assert "anchor.json" in (report.problem or "")


async def test_files_removed_without_an_anchor_are_detected(tmp_path):
    """Deleting the oldest file and the anchor leaves a gap named by the first missing seq."""
    await _retained_log(tmp_path)
    (tmp_path / "anchor.json").unlink()
    report = verify(tmp_path, PUBLIC)
    assert (report.ok, report.first_bad_seq) == (False, 1)


async def test_start_repairs_a_torn_tail_and_seals_it(tmp_path):
    """start() ends a torn line, writes log_repaired and a checkpoint; verify lists the repair."""
    log = AuditLog(tmp_path, signing_key=KEY, checkpoint_every=100)
    await log.start()
    await _append(log, 3)
    await log.close()
    with (tmp_path / FIRST).open("ab") as handle:
        handle.write(b'{"seq":5,"ts":"2026-03-01T12:00:00.000Z","event":"held","pr')
    report = verify(tmp_path, PUBLIC)
    assert (report.ok, report.first_bad_seq) == (False, 5)
    assert "torn last line" in (report.problem or "")
    log = AuditLog(tmp_path, signing_key=KEY)
    await log.start()
    await log.close()
    assert log.repaired_seq == 5
    events = [
        json.loads(line)["event"] for line in (tmp_path / FIRST).read_bytes().splitlines()[5:]
    ]
    assert events == ["log_repaired", "checkpoint"]
    report = verify(tmp_path, PUBLIC)
    assert report.ok, report.problem
    assert (report.repaired, report.unsealed, report.last_seq) == ((5,), 0, 6)


async def test_torn_line_that_looks_complete_up_to_its_prev_is_repaired(tmp_path):
    """A torn line whose head (seq, ts, event, prev) is intact still verifies once sealed."""
    log = AuditLog(tmp_path, signing_key=KEY, checkpoint_every=100)
    await log.start()
    await _append(log, 2)
    record = await log.append(_event(9))
    await log.close()
    line = (tmp_path / FIRST).read_bytes().splitlines()[-1]  # the close checkpoint, seq 4
    torn_record = dict(record, seq=5, prev=line_hash(line))
    torn = json.dumps(torn_record, separators=(",", ":")).encode()[:-20]
    with (tmp_path / FIRST).open("ab") as handle:
        handle.write(torn)
    for _ in range(2):  # the second start finds nothing to repair
        log = AuditLog(tmp_path, signing_key=KEY)
        await log.start()
        await log.close()
    report = verify(tmp_path, PUBLIC)
    assert report.ok, report.problem
    assert report.repaired == (5,)


async def test_crash_during_the_repair_itself_is_repaired_again(tmp_path):
    """A repair record torn by a second crash is sealed, with the first torn line, next start."""
    log = AuditLog(tmp_path, signing_key=KEY)
    await log.start()
    await _append(log, 2)
    await log.close()
    with (tmp_path / FIRST).open("ab") as handle:
        handle.write(b'{"seq":4,"ts":"2026')
    log = AuditLog(tmp_path, signing_key=KEY)
    await log.start()
    await log.close()
    lines = (tmp_path / FIRST).read_bytes().splitlines()
    (tmp_path / FIRST).write_bytes(b"\n".join([*lines[:-2], lines[-2][:50]]))  # cut the repair
    (tmp_path / "head.json").write_bytes(lines[2] + b"\n")
    log = AuditLog(tmp_path, signing_key=KEY)
    await log.start()
    await log.close()
    report = verify(tmp_path, PUBLIC)
    assert report.ok, report.problem
    assert report.repaired == (4,)


async def test_legacy_single_file_is_read_then_continued(tmp_path):
    """A pre-rotation transfer.jsonl is read as the first file and renamed on the next start."""
    log = AuditLog(tmp_path)
    await log.start()
    await _append(log, 3)
    await log.close()
    (tmp_path / FIRST).rename(tmp_path / "transfer.jsonl")
    assert [path.name for path in log_files(tmp_path)] == ["transfer.jsonl"]
    assert verify_chain(tmp_path) == 3
    log = AuditLog(tmp_path, signing_key=KEY)
    await log.start()
    await _append(log, 1)
    await log.close()
    assert [path.name for path in log_files(tmp_path)] == [FIRST]
    report = verify(tmp_path, PUBLIC)
    assert (report.ok, report.last_seq, report.unsealed) == (True, 5, 0)


async def test_writer_events_cannot_be_appended(tmp_path):
    """Callers cannot append checkpoint or log_repaired records: only the writer writes them."""
    log = AuditLog(tmp_path, signing_key=KEY)
    await log.start()
    try:
        with pytest.raises(AuditError, match="writer's own"):
            await log.append(records.checkpoint(head="0" * 64, key_id="0" * 16))
    finally:
        await log.close()
    assert not (tmp_path / "head.json").exists()


def test_bad_settings_are_refused(tmp_path):
    """An unknown rotation or a non-positive checkpoint_every is a ValueError."""
    with pytest.raises(ValueError, match="rotate"):
        AuditLog(tmp_path, rotate="weekly")
    with pytest.raises(ValueError, match="positive"):
        AuditLog(tmp_path, checkpoint_every=0)


async def test_whole_last_record_missing_only_its_line_feed_is_kept(tmp_path):
    """A crash just before a record's line feed leaves a whole record: start only ends the line."""
    log = AuditLog(tmp_path, signing_key=KEY)
    await log.start()
    await _append(log, 3)
    await log.close()
    data = (tmp_path / FIRST).read_bytes()
    (tmp_path / FIRST).write_bytes(data[:-1])
    log = AuditLog(tmp_path, signing_key=KEY)
    await log.start()
    assert (log.last_seq, log.repaired_seq) == (4, None)
    await _append(log, 1)
    await log.close()
    assert (tmp_path / FIRST).read_bytes().startswith(data)
    report = verify(tmp_path, PUBLIC)
    assert (report.ok, report.last_seq, report.repaired) == (True, 6, ())


async def test_repair_cut_before_its_checkpoint_is_continued(tmp_path):
    """A crash after the repair record but within its checkpoint is sealed at the next start."""
    log = AuditLog(tmp_path, signing_key=KEY)
    await log.start()
    await _append(log, 2)
    await log.close()
    with (tmp_path / FIRST).open("ab") as handle:
        handle.write(b'{"seq":4,"ts":"2026')
    log = AuditLog(tmp_path, signing_key=KEY)
    await log.start()
    await log.close()
    data = (tmp_path / FIRST).read_bytes()
    last = data.rstrip(b"\n").rsplit(b"\n", 1)[1]
    (tmp_path / FIRST).write_bytes(data[: -len(last) - 1] + last[:40])  # checkpoint torn
    log = AuditLog(tmp_path, signing_key=KEY)
    await log.start()
    await log.close()
    report = verify(tmp_path, PUBLIC)
    assert report.ok, report.problem
    assert report.repaired == (4, 5)


async def test_a_log_sealed_with_another_key_is_not_extended(tmp_path):
    """Starting with a different signing key fails before writing anything (wrong key restore)."""
    first = AuditLog(tmp_path, signing_key=Ed25519PrivateKey.generate())
    await first.start()
    await first.append(records.policy_loaded(policy="a" * 64, source="p"))
    await first.close()
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()}
    other = AuditLog(tmp_path, signing_key=Ed25519PrivateKey.generate())
    with pytest.raises(AuditError, match="sealed with key"):
        await other.start()
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()} == before
