import asyncio
import json
import shutil
import tempfile
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway import records
from gateway.audit import AuditLog, canonical_line, line_hash
from gateway.audit_files import unsigned_part
from gateway.audit_verify import format_report, verify
from gateway.keys import load_public_key

FIRST = "transfer-000000000001.jsonl"
KEY = Ed25519PrivateKey.generate()
OTHER_KEY = Ed25519PrivateKey.generate()


def _event(number: int) -> records.AuditEvent:
    """Return a small distinct event about message SG-<number>."""
    return records.held(ref=f"SG-{number}", reasons=["insecure_domain:gmail.com"], policy="ab")


async def _write(folder: Path, count: int, *, key=KEY, every: int = 5) -> None:
    """Append count events with a signing writer and close it (which seals the tail)."""
    log = AuditLog(folder, signing_key=key, checkpoint_every=every)
    await log.start()
    try:
        for number in range(count):
            await log.append(_event(number))
    finally:
        await log.close()


def _lines(folder: Path) -> list[bytes]:
    """Return the first log file's complete lines."""
    return (folder / FIRST).read_bytes().split(b"\n")[:-1]


def _save(folder: Path, lines: list[bytes]) -> None:
    """Replace the first log file with these lines."""
    (folder / FIRST).write_bytes(b"".join(line + b"\n" for line in lines))


def _seq(line: bytes) -> int:
    """Return a line's seq."""
    return int(json.loads(line)["seq"])


def _forged(seq: int, prev: str, key: Ed25519PrivateKey, key_id: str) -> bytes:
    """Build a checkpoint line for (seq, prev) signed with key under key_id."""
    record = {"seq": seq, "ts": "2026-01-01T00:00:00.000Z", "event": "checkpoint", "prev": prev}
    record |= {"head": prev, "key_id": key_id}
    record["sig"] = key.sign(unsigned_part(record)).hex()
    return canonical_line(record)


async def test_untouched_log_verifies_with_the_public_key_file_alone(tmp_path):
    """An auditor with only audit-signing.pub verifies an untouched log: all sealed, no warning."""
    folder = tmp_path / "audit"
    await _write(folder, 12)
    pub = tmp_path / "audit-signing.pub"
    pub.write_bytes(
        KEY.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    report = verify(folder, load_public_key(pub))
    assert report.ok, report.problem
    assert (report.last_seq, report.checkpoints, report.last_sealed_seq) == (15, 3, 15)
    assert (report.unsealed, report.files, report.warnings) == (0, 1, ())
    assert format_report(report)[0].startswith("ok: seq 1 to 15")


async def test_edited_sealed_record_names_its_seq(tmp_path):
    """Changing a field of sealed record 4 fails at seq 4."""
    await _write(tmp_path, 12)
    lines = _lines(tmp_path)
    lines[3] = lines[3].replace(b'"policy":"ab"', b'"policy":"cd"')
    _save(tmp_path, lines)
    report = verify(tmp_path, KEY.public_key())
    assert (report.ok, report.first_bad_seq) == (False, 4)
    assert "seq 4 was altered" in (report.problem or "")


async def test_inserted_record_names_its_place(tmp_path):
    """A forged record chained after seq 4 and put before the real seq 5 fails at seq 5."""
    await _write(tmp_path, 12)
    lines = _lines(tmp_path)
    forged = json.loads(lines[4])
    forged["ref"] = "SG-forged"
    lines.insert(4, canonical_line(forged))
    _save(tmp_path, lines)
    report = verify(tmp_path, KEY.public_key())
    assert (report.ok, report.first_bad_seq) == (False, 5)


async def test_deleted_record_names_the_missing_seq(tmp_path):
    """Deleting sealed record 8 fails at seq 8."""
    await _write(tmp_path, 12)
    lines = _lines(tmp_path)
    del lines[7]
    _save(tmp_path, lines)
    report = verify(tmp_path, KEY.public_key())
    assert (report.ok, report.first_bad_seq) == (False, 8)
    assert "missing" in (report.problem or "")


async def test_swapped_records_name_the_first_moved_seq(tmp_path):
    """Swapping sealed records 2 and 3 fails at seq 2."""
    await _write(tmp_path, 12)
    lines = _lines(tmp_path)
    lines[1], lines[2] = lines[2], lines[1]
    _save(tmp_path, lines)
    report = verify(tmp_path, KEY.public_key())
    assert (report.ok, report.first_bad_seq) == (False, 2)


async def test_truncation_past_the_last_checkpoint_is_caught_by_head_json(tmp_path):
    """Cutting the log back to seq 9 fails at seq 10 because head.json seals seq 15."""
    await _write(tmp_path, 12)
    _save(tmp_path, _lines(tmp_path)[:9])
    report = verify(tmp_path, KEY.public_key())
    assert (report.ok, report.first_bad_seq) == (False, 10)
    assert "head.json seals seq 15" in (report.problem or "")


async def test_truncation_without_head_json_is_only_a_warning(tmp_path):
    """Without head.json a cut log verifies, with a warning that truncation is undetectable."""
    await _write(tmp_path, 12)
    _save(tmp_path, _lines(tmp_path)[:9])
    (tmp_path / "head.json").unlink()
    report = verify(tmp_path, KEY.public_key())
    assert report.ok
    assert (report.last_seq, report.last_sealed_seq, report.unsealed) == (9, 6, 3)
    assert any("no head anchor" in warning for warning in report.warnings)


async def test_checkpoint_signed_by_another_key_fails_at_its_seq(tmp_path):
    """A checkpoint replaced by one under another key id fails at that checkpoint's seq."""
    await _write(tmp_path, 12)
    lines = _lines(tmp_path)
    prev = line_hash(lines[4])
    lines[5] = _forged(6, prev, OTHER_KEY, "0123456789abcdef")
    _save(tmp_path, lines)
    report = verify(tmp_path, KEY.public_key())
    assert (report.ok, report.first_bad_seq) == (False, 6)
    assert "another key" in (report.problem or "")


async def test_checkpoint_with_our_key_id_but_a_forged_signature_fails(tmp_path):
    """A checkpoint claiming our key id but signed by another key fails its signature."""
    await _write(tmp_path, 12)
    lines = _lines(tmp_path)
    key_id = json.loads(lines[5])["key_id"]
    lines[5] = _forged(6, line_hash(lines[4]), OTHER_KEY, key_id)
    _save(tmp_path, lines)
    report = verify(tmp_path, KEY.public_key())
    assert (report.ok, report.first_bad_seq) == (False, 6)
    assert "signature" in (report.problem or "")


async def test_log_rewritten_under_another_key_fails(tmp_path):
    """A whole log written by someone else's key fails at its first checkpoint."""
    await _write(tmp_path, 12, key=OTHER_KEY)
    report = verify(tmp_path, KEY.public_key())
    assert (report.ok, report.first_bad_seq) == (False, 6)


async def test_records_after_the_last_checkpoint_are_unsealed(tmp_path):
    """Records appended by a writer without a key are reported as not yet sealed."""
    await _write(tmp_path, 5)
    log = AuditLog(tmp_path)
    await log.start()
    await log.append(_event(6))
    await log.append(_event(7))
    await log.close()
    report = verify(tmp_path, KEY.public_key())
    assert report.ok
    assert (report.last_seq, report.last_sealed_seq, report.unsealed) == (8, 6, 2)
    assert "not yet sealed: 2 record(s) after seq 6" in format_report(report)[1]


async def test_without_a_public_key_the_chain_is_checked_and_a_warning_given(tmp_path):
    """verify(folder, None) checks the chain, warns that signatures were not checked."""
    await _write(tmp_path, 12, key=OTHER_KEY)
    report = verify(tmp_path, None)
    assert report.ok
    assert any("signatures were not checked" in warning for warning in report.warnings)


async def test_tampered_head_json_fails(tmp_path):
    """A head.json whose signature does not verify is a failure."""
    await _write(tmp_path, 12)
    head = tmp_path / "head.json"
    head.write_bytes(head.read_bytes().replace(b'"seq":15', b'"seq":16'))
    report = verify(tmp_path, KEY.public_key())
    assert (report.ok, report.first_bad_seq) == (False, 16)
    assert "head.json" in (report.problem or "")


async def test_deleted_torn_line_before_a_repair_is_detected(tmp_path):
    """Removing the torn bytes a log_repaired record seals is a failure at that record."""
    await _write(tmp_path, 3)
    with (tmp_path / FIRST).open("ab") as handle:
        handle.write(b'{"seq":5,"ts":"20')
    log = AuditLog(tmp_path, signing_key=KEY, checkpoint_every=5)
    await log.start()
    await log.close()
    lines = _lines(tmp_path)
    assert verify(tmp_path, KEY.public_key()).repaired == (5,)
    del lines[4]
    _save(tmp_path, lines)
    report = verify(tmp_path, KEY.public_key())
    assert (report.ok, report.first_bad_seq) == (False, 5)


def _sealed_log() -> bytes:
    """Write a 14-record log sealed every 4 records; return the file's bytes."""
    with tempfile.TemporaryDirectory() as name:
        asyncio.run(_write(Path(name), 11, every=4))
        return (Path(name) / FIRST).read_bytes()


SEALED = _sealed_log()


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(0, len(SEALED) - 1), st.integers(1, 255))
def test_any_single_byte_change_in_a_sealed_log_is_detected(position, delta):
    """Changing any one byte of a sealed log fails verify, naming that byte's record."""
    data = bytearray(SEALED)
    data[position] = (data[position] + delta) % 256
    line_number = SEALED.count(b"\n", 0, position)  # 0-based line of the changed byte
    with tempfile.TemporaryDirectory() as name:
        folder = Path(name)
        (folder / FIRST).write_bytes(bytes(data))
        head = SEALED.split(b"\n")[-2] + b"\n"
        (folder / "head.json").write_bytes(head)
        report = verify(folder, KEY.public_key())
    assert not report.ok
    assert report.first_bad_seq == line_number + 1, report.problem


def test_missing_folder_is_an_error(tmp_path):
    """Verifying a folder that does not exist raises AuditError, not a report."""
    from gateway.errors import AuditError  # noqa: PLC0415

    with pytest.raises(AuditError, match="no transfer log folder"):
        verify(tmp_path / "absent", None)


def test_empty_folder_verifies(tmp_path):
    """An empty folder is a valid, empty log."""
    report = verify(tmp_path, KEY.public_key())
    assert (report.ok, report.last_seq, report.records, report.warnings) == (True, 0, 0, ())


async def test_copy_of_a_verified_log_elsewhere_verifies(tmp_path):
    """A copy of the audit folder (as given to an auditor) verifies the same."""
    await _write(tmp_path / "live", 7)
    shutil.copytree(tmp_path / "live", tmp_path / "copy")
    assert verify(tmp_path / "copy", KEY.public_key()).ok


async def test_half_written_last_line_of_a_running_log_is_only_a_warning(tmp_path):
    """While the writer holds its lock, an incomplete last line is being written, not torn."""
    log = AuditLog(tmp_path, signing_key=KEY, checkpoint_every=5)
    await log.start()
    try:
        for number in range(3):
            await log.append(_event(number))
        whole = (tmp_path / FIRST).read_bytes()
        (tmp_path / FIRST).write_bytes(whole + b'{"seq":4,"ts":"2026')
        report = verify(tmp_path, KEY.public_key())
        assert (report.ok, report.last_seq, report.unsealed) == (True, 3, 3), report.problem
        assert any("being written" in warning for warning in report.warnings)
        (tmp_path / FIRST).write_bytes(whole)
    finally:
        await log.close()
    assert verify(tmp_path, KEY.public_key()).ok
