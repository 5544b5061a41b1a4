"""Group commit of folder fsyncs: shared between concurrent callers, errors never forgotten."""

from __future__ import annotations

import threading

import pytest

from gateway.dirsync import DirectorySync


def test_concurrent_requests_share_fsyncs(tmp_path):
    """Forty threads asking at once all return, with fewer fsyncs than requests."""
    sync = DirectorySync()
    start = threading.Barrier(40)
    errors: list[BaseException] = []

    def ask() -> None:
        start.wait()
        try:
            for _ in range(5):
                sync.sync(tmp_path)
        except BaseException as exc:  # noqa: BLE001  (collected for the assertion)
            errors.append(exc)

    threads = [threading.Thread(target=ask) for _ in range(40)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert errors == []
    assert 1 <= sync.fsyncs < 200


def test_a_failed_sync_fails_every_later_request_for_that_folder(tmp_path):
    """After an error the folder stays failed (fsyncgate); other folders are unaffected."""
    sync = DirectorySync()
    gone = tmp_path / "gone"
    gone.mkdir()
    sync.sync(gone)
    gone.rmdir()
    with pytest.raises(OSError):
        sync.sync(gone)
    gone.mkdir()
    with pytest.raises(OSError):
        sync.sync(gone)
    sync.sync(tmp_path)


def test_each_request_is_covered_by_an_fsync_that_started_after_it(tmp_path):
    """A request returns only after an fsync begun after it was made (sequential case)."""
    sync = DirectorySync()
    for expected in range(1, 4):
        sync.sync(tmp_path)
        assert sync.fsyncs == expected
