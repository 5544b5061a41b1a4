"""A small sd_notify client: tell systemd we are ready, what we are doing, that we are alive.

systemd names a datagram socket in `$NOTIFY_SOCKET`: a path, or an abstract name written with a
leading `@`. Each message is one datagram of `KEY=VALUE` lines (sd_notify(3)). Outside systemd
there is no socket and `SystemdNotifier.from_environment()` returns None.

Sending never raises and never blocks: a lost notification must not break the daemon, so
`OSError` (including a full socket buffer) is swallowed and counted in `failures`. The watchdog
pings come from `keep_alive`, a task in the daemon's own event loop: when the loop is stuck the
pings stop and systemd restarts the service.
"""

from __future__ import annotations

import asyncio
import os
import socket
import time
from collections.abc import Mapping


class SystemdNotifier:
    """The service manager's notification socket, addressed by `$NOTIFY_SOCKET`."""

    def __init__(
        self,
        address: str | bytes,
        watchdog_usec: str | None = None,
        watchdog_pid: str | None = None,
    ) -> None:
        self.address = address
        self.failures = 0
        self._watchdog_usec = watchdog_usec
        self._watchdog_pid = watchdog_pid
        self._sock: socket.socket | None = None

    @classmethod
    def from_environment(cls, environ: Mapping[str, str] | None = None) -> SystemdNotifier | None:
        """The notifier systemd asked for, or None when not run as a `Type=notify` service."""
        env = os.environ if environ is None else environ
        raw = env.get("NOTIFY_SOCKET", "")
        address: str | bytes
        if raw.startswith("@") and len(raw) > 1:
            address = b"\0" + os.fsencode(raw[1:])  # abstract namespace
        elif raw.startswith("/"):
            address = raw
        else:
            return None  # unset, or a kind of address we do not speak (vsock:)
        return cls(address, env.get("WATCHDOG_USEC"), env.get("WATCHDOG_PID"))

    def send(self, *assignments: str) -> bool:
        """Send `KEY=VALUE` assignments as one datagram; False (and counted) if it failed."""
        payload = "\n".join(assignments).encode()
        try:
            if self._sock is None:
                kind = socket.SOCK_DGRAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC
                self._sock = socket.socket(socket.AF_UNIX, kind)
            self._sock.sendto(payload, socket.MSG_NOSIGNAL, self.address)
        except OSError:
            self.failures += 1
            return False
        return True

    def ready(self, status: str | None = None) -> bool:
        """Start-up (or a reload) is complete: the service is serving."""
        return self.send("READY=1", *_status(status))

    def status(self, text: str) -> bool:
        """One line for `systemctl status` to show."""
        return self.send(*_status(text))

    def reloading(self, status: str | None = None) -> bool:
        """A reload has begun; `ready()` ends it (Type=notify-reload wants the timestamp)."""
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        return self.send("RELOADING=1", f"MONOTONIC_USEC={usec}", *_status(status))

    def stopping(self, status: str | None = None) -> bool:
        """Shutdown has begun."""
        return self.send("STOPPING=1", *_status(status))

    def watchdog(self) -> bool:
        """Tell the watchdog we are alive."""
        return self.send("WATCHDOG=1")

    def watchdog_interval(self) -> float | None:
        """Seconds within which systemd expects a ping, or None when no watchdog is meant for us."""
        pid = self._watchdog_pid
        if pid is not None and (not pid.isdigit() or int(pid) != os.getpid()):
            return None
        raw = self._watchdog_usec
        if raw is None or not raw.isdigit() or int(raw) == 0:
            return None
        return int(raw) / 1_000_000

    def close(self) -> None:
        """Close the socket; a later send opens it again."""
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def _status(text: str | None) -> tuple[str, ...]:
    """A STATUS= assignment on one line, or nothing."""
    return () if text is None else ("STATUS=" + " ".join(text.splitlines()),)


async def keep_alive(notifier: SystemdNotifier, interval: float) -> None:
    """Ping the watchdog every `interval` / 2 seconds from this event loop, until cancelled."""
    if interval <= 0:
        raise ValueError("the watchdog interval must be positive")
    while True:
        notifier.watchdog()
        await asyncio.sleep(interval / 2)
