"""The sd_notify client against a real AF_UNIX datagram socket standing in for systemd."""

from __future__ import annotations

import asyncio
import os
import secrets
import shutil
import socket
import tempfile
import time
from pathlib import Path

import pytest

from gateway.sdnotify import SystemdNotifier, keep_alive


@pytest.fixture
def manager():
    """A bound datagram socket at a short path (AF_UNIX paths are limited to 108 bytes)."""
    folder = tempfile.mkdtemp(prefix="sd-")
    path = Path(folder) / "notify"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(5)
    yield path, sock
    sock.close()
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture
def notifier(manager, monkeypatch):
    """A notifier built from $NOTIFY_SOCKET naming the stand-in manager."""
    path, _ = manager
    monkeypatch.setenv("NOTIFY_SOCKET", str(path))
    found = SystemdNotifier.from_environment()
    assert found is not None
    yield found
    found.close()


def receive(sock: socket.socket) -> str:
    """One datagram as text."""
    return sock.recv(4096).decode()


def test_no_notify_socket_means_no_notifier(monkeypatch):
    """Outside systemd ($NOTIFY_SOCKET unset) there is no notifier."""
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert SystemdNotifier.from_environment() is None


@pytest.mark.parametrize("value", ["", "@", "relative/path", "vsock:2:1234"])
def test_unusable_notify_socket_means_no_notifier(value):
    """An empty, bare '@', relative or non-AF_UNIX address gives no notifier."""
    assert SystemdNotifier.from_environment({"NOTIFY_SOCKET": value}) is None


def test_ready_carries_status(notifier, manager):
    """ready() sends READY=1 and the status line in one datagram."""
    _, sock = manager
    assert notifier.ready("serving: 2 listeners, 5 recovered")
    assert receive(sock) == "READY=1\nSTATUS=serving: 2 listeners, 5 recovered"


def test_each_message_is_exact(notifier, manager):
    """status(), watchdog() and stopping() each send exactly their assignments."""
    _, sock = manager
    notifier.status("queue: 3 active, 1 deferred, 0 held")
    notifier.watchdog()
    notifier.stopping()
    notifier.ready()
    expected = [
        "STATUS=queue: 3 active, 1 deferred, 0 held",
        "WATCHDOG=1",
        "STOPPING=1",
        "READY=1",
    ]
    assert expected == [receive(sock) for _ in expected]
    assert notifier.failures == 0


def test_status_is_one_line(notifier, manager):
    """A status with line breaks is sent on one line, so it cannot smuggle assignments."""
    _, sock = manager
    notifier.status("reload failed\nREADY=1")
    assert receive(sock) == "STATUS=reload failed READY=1"


def test_reloading_carries_monotonic_timestamp(notifier, manager):
    """reloading() sends RELOADING=1 with MONOTONIC_USEC, as Type=notify-reload requires."""
    _, sock = manager
    before = time_usec()
    notifier.reloading("reloading policy")
    after = time_usec()
    first, stamp, status = receive(sock).split("\n")
    assert first == "RELOADING=1"
    key, _, value = stamp.partition("=")
    assert key == "MONOTONIC_USEC"
    assert before <= int(value) <= after
    assert status == "STATUS=reloading policy"


def time_usec() -> int:
    """CLOCK_MONOTONIC in microseconds, as systemd reads it."""
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000


def test_abstract_socket_name(monkeypatch):
    """A NOTIFY_SOCKET starting with '@' names a socket in the abstract namespace."""
    name = f"gateway-test-{secrets.token_hex(8)}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(5)
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        notifier = SystemdNotifier.from_environment()
        assert notifier is not None
        assert notifier.ready("up")
        notifier.close()
        assert receive(sock) == "READY=1\nSTATUS=up"


def test_send_failure_is_counted_not_raised(tmp_path):
    """A socket that is gone makes send() return False and count, never raise."""
    notifier = SystemdNotifier.from_environment({"NOTIFY_SOCKET": str(tmp_path / "gone")})
    assert notifier is not None
    assert not notifier.ready()
    assert not notifier.watchdog()
    assert notifier.failures == 2
    notifier.close()


def test_full_socket_buffer_does_not_block(notifier, manager):
    """When the manager stops reading, sends fail fast and are counted instead of blocking."""
    sent = 0
    while notifier.watchdog():
        sent += 1
        assert sent < 100_000, "the datagram queue never filled"
    assert notifier.failures == 1


@pytest.mark.parametrize(
    ("environ", "expected"),
    [
        ({"WATCHDOG_USEC": "30000000"}, 30.0),
        ({"WATCHDOG_USEC": "500000"}, 0.5),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "{pid}"}, 30.0),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "{other}"}, None),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "x"}, None),
        ({"WATCHDOG_USEC": "0"}, None),
        ({"WATCHDOG_USEC": "-5"}, None),
        ({"WATCHDOG_USEC": "30s"}, None),
        ({}, None),
    ],
)
def test_watchdog_interval(environ, expected):
    """WATCHDOG_USEC gives the interval in seconds, unless WATCHDOG_PID names another process."""
    pid = os.getpid()
    filled = {k: v.format(pid=pid, other=pid + 1) for k, v in environ.items()}
    notifier = SystemdNotifier.from_environment({"NOTIFY_SOCKET": "/run/notify", **filled})
    assert notifier is not None
    assert expected == notifier.watchdog_interval()


def test_watchdog_interval_from_process_environment(monkeypatch):
    """from_environment() with no argument reads the process environment."""
    monkeypatch.setenv("NOTIFY_SOCKET", "/run/systemd/notify")
    monkeypatch.setenv("WATCHDOG_USEC", "30000000")
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    notifier = SystemdNotifier.from_environment()
    assert notifier is not None
    assert notifier.watchdog_interval() == 30.0


async def test_keep_alive_pings_from_the_loop(notifier, manager):
    """keep_alive sends WATCHDOG=1 every interval/2: at least 5 pings well within the bound."""
    _, sock = manager
    sock.settimeout(0)  # non-blocking, for loop.sock_recv
    loop = asyncio.get_running_loop()
    task = loop.create_task(keep_alive(notifier, 0.05))
    pings = []
    try:
        async with asyncio.timeout(10):
            while len(pings) < 5:
                pings.append((await loop.sock_recv(sock, 4096)).decode())
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    assert pings == ["WATCHDOG=1"] * 5
    assert notifier.failures == 0


async def test_keep_alive_pings_at_half_the_interval(notifier, manager):
    """keep_alive pings at once, then waits half the interval (30 s of 60) before the next."""
    _, sock = manager
    sock.settimeout(0)  # non-blocking, for loop.sock_recv
    loop = asyncio.get_running_loop()
    task = loop.create_task(keep_alive(notifier, 60))
    try:
        async with asyncio.timeout(10):
            first = await loop.sock_recv(sock, 4096)
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.2):
                await loop.sock_recv(sock, 4096)
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    assert first == b"WATCHDOG=1"


async def test_keep_alive_refuses_a_non_positive_interval(notifier):
    """A zero interval would spin the loop: keep_alive refuses it."""
    with pytest.raises(ValueError, match="positive"):
        await keep_alive(notifier, 0)
