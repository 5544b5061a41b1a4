"""Real storage faults under a real gateway process: EFBIG, EIO on fsync, ENOSPC, a kill.

No mock of our code: the faults come from the kernel (RLIMIT_FSIZE, a full tmpfs) or from
strace's syscall fault injection (`-e inject=SYSCALL:error=EIO`), wrapped around the daemon.
Each test asserts what a client must see (a 4xx, never a 250, for anything not durable), that
nothing of the failed message is delivered or left behind, and that a restart without any
repair by hand verifies its audit log and accepts mail again.

strace's `when=N` counts per thread, so the injections below aim by path (`-P`) or at the
audit writer, which is one thread: its first fdatasync is the start's `policy_loaded`, its
second the first message's `accepted`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import smtplib
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from gateway import replies
from gateway.audit import read_records
from gateway.audit_files import file_name
from gateway.audit_verify import verify
from gateway.keys import load_public_key
from tests import crashlib
from tests.harness import GatewayProcess, GatewaySetup, eventually, make_setup, smtp_send

SENDER = "duty.officer@bromley.gcsx.gov.uk"
STRACE = shutil.which("strace")


def _strace_usable() -> str | None:
    """None if strace can trace and inject here, else why not."""
    if STRACE is None:
        return "strace is not installed (apt-get install -y strace)"
    script = "import os, sys\ntry:\n os.fsync(0)\nexcept OSError as e:\n sys.exit(e.errno)"
    inject = ["-e", "trace=fsync", "-e", "inject=fsync:error=EIO"]
    probe = subprocess.run(
        [STRACE, "-f", "-qq", "-o", "/dev/null", *inject, sys.executable, "-c", script],
        capture_output=True,
        timeout=30,
        check=False,
    )
    if probe.returncode != 5:
        return f"strace cannot inject faults here (ptrace not permitted?): {probe.stderr[-200:]!r}"
    return None


needs_strace = pytest.mark.skipif(_strace_usable() is not None, reason=str(_strace_usable()))


class TracedGateway(GatewayProcess):
    """`gateway serve` under strace with fault injection; signals go to the daemon's own PID."""

    def __init__(self, setup: GatewaySetup, strace_args: list[str]) -> None:
        super().__init__(setup)
        self.strace_args = strace_args

    def start(self, timeout: float = 20) -> int:
        """Start the daemon under strace; wait for its daemon_started line; return the port."""
        code = "import sys; from gateway.cli import main; sys.exit(main(sys.argv[1:]))"
        trace = self.setup.root / "strace.out"
        self.proc = subprocess.Popen(
            [STRACE or "strace", "-f", "-qq", "-o", str(trace), *self.strace_args,
             sys.executable, "-c", code, "serve", "--config", str(self.setup.config_path)],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            env=dict(os.environ, PYTHONUNBUFFERED="1"),
        )  # fmt: skip
        started = threading.Event()
        self._reader = threading.Thread(target=self._drain, args=(started,), daemon=True)
        self._reader.start()
        if not started.wait(timeout) or not self.port:
            self.kill()
            raise RuntimeError("gateway did not start under strace:\n" + "".join(self.output))
        return self.port

    def daemon_pid(self) -> int | None:
        """The PID of the daemon, strace's only child."""
        if self.proc is None or self.proc.poll() is not None:
            return None
        path = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children")
        with contextlib.suppress(OSError, ValueError):
            return int(path.read_text().split()[0])
        return None

    def terminate(self, timeout: float = 20) -> int:
        """SIGTERM to the daemon itself; strace then exits with the daemon's status."""
        pid = self.daemon_pid()
        if pid is not None:
            os.kill(pid, signal.SIGTERM)
        return self.finish(timeout)

    def kill(self) -> None:
        """SIGKILL the daemon, then strace if it is still there."""
        pid = self.daemon_pid()
        if pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if self.proc is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(5)
        super().kill()


def _send(port: int, setup: GatewaySetup, token: str, rcpt: str = "lead@nhs.net"):
    body = f"Subject: fault\r\n\r\n{token}\r\n".encode()
    return smtp_send(port, setup.client_context, SENDER, [rcpt], body)


def _delivered(handler, token: str) -> int:
    return sum(token.encode() in m.content for m in handler.messages)


def _spool_files(setup: GatewaySetup) -> list[str]:
    spool = setup.root / "spool"
    return sorted(
        str(p.relative_to(spool)) for p in spool.rglob("*") if p.is_file() and p.name != "lock"
    )


def _verify(setup: GatewaySetup):
    return verify(
        setup.config.audit_path, load_public_key(setup.root / "keys" / "audit-signing.pub")
    )


async def _restart_and_send(setup: GatewaySetup, handler, token: str) -> None:
    """Restart with nothing repaired by hand: the log verifies, and new mail is accepted."""
    process = GatewayProcess(setup)
    port = await asyncio.to_thread(process.start)
    try:
        seen = await asyncio.to_thread(_send, port, setup, token)
        assert seen.code("data") == 250
        await eventually(lambda: _delivered(handler, token) == 1)
    finally:
        assert await asyncio.to_thread(process.terminate) == 0
    report = _verify(setup)
    assert report.ok, report.problem
    assert not list((setup.root / "spool" / "tmp").iterdir())


def _refs_with(setup: GatewaySetup, event: str) -> list[str]:
    return [r["ref"] for r in read_records(setup.config.audit_path) if r["event"] == event]


# -- EFBIG on the audit log ---------------------------------------------------------------------


async def test_audit_write_efbig_answers_452_delivers_nothing_and_restart_seals_the_tear(
    tmp_path, ca, receiver
):
    """RLIMIT_FSIZE just past the log's size: the `accepted` record is cut off (EFBIG).

    A first run measures the log: its size and the length of a `policy_loaded` line. The
    second run's limit lets its own `policy_loaded` in and cuts the next record after 64 bytes,
    while the spool's small files stay far below it. The message gets 452 4.3.1; so does every
    later one (the writer stops after a failed write); nothing is delivered or left; a restart
    seals the torn line with `log_repaired` and the log verifies.
    """
    port, handler = receiver
    setup = make_setup(tmp_path, ca, receiver_port=port)
    probe = GatewayProcess(setup)
    smtp_port = await asyncio.to_thread(probe.start)
    try:
        for number in range(4):  # some records, so that the log outgrows the spool's files
            assert (await asyncio.to_thread(_send, smtp_port, setup, f"probe{number}")).code(
                "data"
            ) == 250
        await eventually(lambda: len(handler.messages) == 4)
    finally:
        assert await asyncio.to_thread(probe.terminate) == 0
    log_file = setup.config.audit_path / file_name(1)
    lines = log_file.read_bytes().splitlines(keepends=True)
    policy_line = next(line for line in reversed(lines) if b'"event":"policy_loaded"' in line)
    limit = log_file.stat().st_size + len(policy_line) + 64
    assert limit > 4096  # the spool's files of a small message (about 1 KiB) fit below it

    limited = GatewayProcess(setup, file_size_limit=limit)
    smtp_port = await asyncio.to_thread(limited.start)
    try:
        first = await asyncio.to_thread(_send, smtp_port, setup, "efbigfirst")
        second = await asyncio.to_thread(_send, smtp_port, setup, "efbigsecond")
    finally:
        assert await asyncio.to_thread(limited.terminate) == 0
    assert f"{first.code('data')} {first.text('data')}" == replies.SPOOL_FAILED
    assert f"{second.code('data')} {second.text('data')}" == replies.SPOOL_FAILED
    assert any(e.get("event") == "audit_write_failed" for e in limited.events())
    assert _spool_files(setup) == []
    assert not log_file.read_bytes().endswith(b"\n")  # the torn record is on disk

    await _restart_and_send(setup, handler, "efbigafter")
    assert _delivered(handler, "efbigfirst") == _delivered(handler, "efbigsecond") == 0
    assert len(_verify(setup).repaired) == 1


# -- EIO on fsync (strace) ----------------------------------------------------------------------


@needs_strace
async def test_spool_folder_fsync_eio_answers_452_then_refuses_until_restart(
    tmp_path, ca, receiver
):
    """EIO from every fsync of spool/data: publish fails after the record is durable.

    The message is answered 452 4.3.1 (never 250) and its published files are taken back; the
    error is sticky (fsyncgate: a later fsync may "succeed" without the data), so the daemon
    goes on answering but refuses every later message until it is restarted.
    """
    port, handler = receiver
    setup = make_setup(tmp_path, ca, receiver_port=port)
    spool_data = str(setup.root / "spool" / "data")
    traced = TracedGateway(
        setup, ["-P", spool_data, "-e", "trace=fsync", "-e", "inject=fsync:error=EIO"]
    )
    smtp_port = await asyncio.to_thread(traced.start)
    try:
        first = await asyncio.to_thread(_send, smtp_port, setup, "eiofirst")
        second = await asyncio.to_thread(_send, smtp_port, setup, "eiosecond")
    finally:
        assert await asyncio.to_thread(traced.terminate) == 0
    for seen in (first, second):
        assert seen.code("mail") == 250  # still answering
        assert f"{seen.code('data')} {seen.text('data')}" == replies.SPOOL_FAILED
    assert "EIO (Input/output error) (INJECTED)" in (setup.root / "strace.out").read_text()
    assert _spool_files(setup) == []
    # Recorded, then not published: the log holds an `accepted` the client never saw (by design).
    assert len(_refs_with(setup, "accepted")) == 2

    await _restart_and_send(setup, handler, "eioafter")
    assert _delivered(handler, "eiofirst") == _delivered(handler, "eiosecond") == 0


@needs_strace
async def test_audit_fdatasync_eio_answers_452_until_restart(tmp_path, ca, receiver):
    """EIO from the audit writer's second fdatasync (the first message's `accepted` batch).

    That message and every later one get 452 4.3.1 until restart; recipients refused by policy
    too would get 451. Nothing is delivered, nothing left in the spool; the restarted gateway
    finds a log that verifies and accepts mail.
    """
    port, handler = receiver
    setup = make_setup(tmp_path, ca, receiver_port=port)
    traced = TracedGateway(
        setup, ["-e", "trace=fdatasync", "-e", "inject=fdatasync:error=EIO:when=2"]
    )
    smtp_port = await asyncio.to_thread(traced.start)
    try:
        first = await asyncio.to_thread(_send, smtp_port, setup, "syncfirst")
        second = await asyncio.to_thread(_send, smtp_port, setup, "syncsecond")
        third = await asyncio.to_thread(_send, smtp_port, setup, "syncthird")
    finally:
        assert await asyncio.to_thread(traced.terminate) == 0
    for seen in (first, second, third):
        assert f"{seen.code('data')} {seen.text('data')}" == replies.SPOOL_FAILED
    assert "fdatasync" in (setup.root / "strace.out").read_text()
    assert _spool_files(setup) == []
    await _restart_and_send(setup, handler, "syncafter")
    assert sum(_delivered(handler, t) for t in ("syncfirst", "syncsecond", "syncthird")) == 0


@needs_strace
async def test_kill_before_delivered_record_leaves_a_duplicate_the_log_explains(
    tmp_path, ca, receiver
):
    """SIGKILL as the writer starts the `delivered` record (its fourth write to the log file).

    Writes to the first log file: policy_loaded, the message's accepted, its attempt, then its
    delivered; strace kills the daemon at the entry of that fourth write. The receiver already
    has the message; the restarted gateway sends it again, and the unfinished attempt in the
    log explains the duplicate.
    """
    port, handler = receiver
    setup = make_setup(tmp_path, ca, receiver_port=port)
    log_file = str(setup.config.audit_path / file_name(1))
    traced = TracedGateway(
        setup, ["-P", log_file, "-e", "trace=write", "-e", "inject=write:signal=SIGKILL:when=4"]
    )
    smtp_port = await asyncio.to_thread(traced.start)
    try:
        seen = await asyncio.to_thread(_send, smtp_port, setup, "killwindow")
        assert seen.code("data") == 250
        await asyncio.to_thread(traced.finish)  # strace kills the daemon at that write
    finally:
        traced.kill()
    assert _delivered(handler, "killwindow") == 1
    ref = crashlib.REF.search(seen.text("data")).group()
    first_run = list(read_records(setup.config.audit_path))
    assert [r["event"] for r in first_run if r.get("ref") == ref] == ["accepted", "attempt"]

    process = GatewayProcess(setup)
    await asyncio.to_thread(process.start)
    try:
        await eventually(lambda: _delivered(handler, "killwindow") == 2)
    finally:
        assert await asyncio.to_thread(process.terminate) == 0
    assert _verify(setup).ok
    events = [r for r in read_records(setup.config.audit_path) if r.get("ref") == ref]
    explained = (
        any(r["event"] == "deferred" and r.get("reason") == "ambiguous" for r in events)
        or sum(r["event"] == "delivered" for r in events) >= 2
        or crashlib.unfinished_attempts(events) >= 1
    )
    assert explained, json.dumps([r["event"] for r in events])


# -- ENOSPC on a small tmpfs --------------------------------------------------------------------


@pytest.fixture
def small_spool(tmp_path):
    """A 4 MiB tmpfs mounted where the gateway's spool goes; skipped if mounting is refused."""
    mount_point = tmp_path / "spool"
    mount_point.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=4m,mode=0700", "tmpfs", str(mount_point)],
        capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {mounted.stderr.strip()}")
    try:
        yield mount_point
    finally:
        if subprocess.run(["umount", str(mount_point)], timeout=30, check=False).returncode:
            subprocess.run(["umount", "-l", str(mount_point)], timeout=30, check=False)


def _fill(folder: Path) -> Path:
    """Write a file until the file system is full (ENOSPC); return it."""
    filler = folder / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        block = b"\0" * 65536
        with contextlib.suppress(OSError):
            for _ in range(4096):  # bounded: 256 MiB, far more than the tmpfs
                os.write(fd, block)
    finally:
        os.close(fd)
    return filler


async def test_spool_enospc_answers_452_keeps_nothing_and_recovers(
    tmp_path, ca, receiver, small_spool
):
    """The spool's file system fills up between MAIL and the end of DATA: 452, nothing kept.

    `queue_minfree` (452 at MAIL) is passed first; the disk is filled after the 354, so the
    ENOSPC comes from the spool writes themselves. Then MAIL is refused for lack of space; once
    space is freed, mail flows again without a restart.
    """
    port, handler = receiver
    setup = make_setup(tmp_path, ca, receiver_port=port, server_extra="max_message_size = 1048576")
    process = GatewayProcess(setup)
    smtp_port = await asyncio.to_thread(process.start)
    body = b"Subject: full\r\n\r\nenospcfirst\r\n" + b"y" * 998 + b"\r\n"

    def session() -> tuple[str, str]:
        with smtplib.SMTP("127.0.0.1", smtp_port, local_hostname="agency.test", timeout=20) as c:
            c.ehlo()
            c.starttls(context=setup.client_context)
            c.ehlo()
            assert c.docmd("MAIL", f"FROM:<{SENDER}>")[0] == 250
            assert c.docmd("RCPT", "TO:<lead@nhs.net>")[0] == 250
            assert c.docmd("DATA")[0] == 354
            filler = _fill(small_spool)
            c.send(body * 100 + b".\r\n")
            code, text = c.getreply()
            c.rset()
            mail_code, mail_text = c.docmd("MAIL", f"FROM:<{SENDER}>")
            filler.unlink()
            return f"{code} {text.decode()}", f"{mail_code} {mail_text.decode()}"

    try:
        data_reply, mail_reply = await asyncio.to_thread(session)
        after = await asyncio.to_thread(_send, smtp_port, setup, "enospcafter")
        assert after.code("data") == 250
        await eventually(lambda: _delivered(handler, "enospcafter") == 1)
    finally:
        assert await asyncio.to_thread(process.terminate) == 0
    assert data_reply == replies.SPOOL_FAILED
    assert mail_reply == replies.LOW_ON_SPACE
    assert any(e.get("event") == "spool_write_failed" for e in process.events())
    assert _delivered(handler, "enospcfirst") == 0
    assert _spool_files(setup) == []
    assert _verify(setup).ok
