"""The control channel: the CLI's way to the running daemon, over a Unix socket.

One request per connection, one JSON object each way, each on one line:

    -> {"command": "reload"}
    <- {"ok": true, "result": {...}}      or      {"ok": false, "error": "one clear line"}

The socket is made with mode 0660, so the service's group decides who may use it. The actor
recorded in the transfer log for an admin action is the Unix user of the peer process, read
from the kernel (SO_PEERCRED), never a name the client sends.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import pwd
import socket
import struct
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any

from gateway.errors import GatewayError
from gateway.logconfig import get_logger

log = get_logger("control")

MAX_REQUEST = 64 * 1024
TIMEOUT = 30.0

Handler = Callable[[dict[str, Any], str], Awaitable[Any]]


class ControlError(GatewayError):
    """A control request failed; the message is the one line shown to the admin."""


def peer_user(sock: socket.socket) -> str:
    """The Unix user name of the process at the other end of a Unix socket."""
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    _pid, uid, _gid = struct.unpack("3i", creds)
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return f"uid:{uid}"


class ControlServer:
    """Serves control requests to the handlers registered by command name."""

    def __init__(self, path: Path, handlers: Mapping[str, Handler]) -> None:
        self.path = path
        self.handlers = dict(handlers)
        self._server: asyncio.AbstractServer | None = None

    async def start(self) -> None:
        """Listen on the socket path (replacing a stale socket), mode 0660."""
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o750)
        with contextlib.suppress(FileNotFoundError):
            if self.path.is_socket():
                self.path.unlink()
        old_umask = os.umask(0o117)
        try:
            self._server = await asyncio.start_unix_server(
                self._serve, path=str(self.path), limit=MAX_REQUEST
            )
        finally:
            os.umask(old_umask)
        self.path.chmod(0o660)

    async def close(self) -> None:
        """Stop listening and remove the socket."""
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            sock = writer.get_extra_info("socket")
            actor = peer_user(sock) if sock is not None else "unknown"
            async with asyncio.timeout(TIMEOUT):
                line = await reader.readline()
                if not line:
                    return  # a liveness probe (`daemon_running`): connected, sent nothing
                reply = await self._answer(line, actor)
            # A big answer (100,000 queue rows) is encoded off the event loop.
            data = await asyncio.to_thread(_encode, reply)
            writer.write(data)
            await writer.drain()
        except (TimeoutError, ConnectionError, ValueError):
            log.warning("control_request_dropped")
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    async def _answer(self, line: bytes, actor: str) -> dict[str, Any]:
        try:
            request = json.loads(line)
        except ValueError:
            return {"ok": False, "error": "not a JSON request"}
        if not isinstance(request, dict) or not isinstance(request.get("command"), str):
            return {"ok": False, "error": "a request needs a command"}
        handler = self.handlers.get(request["command"])
        if handler is None:
            return {"ok": False, "error": f"unknown command {request['command'][:40]}"}
        try:
            result = await handler(request, actor)
        except GatewayError as exc:
            return {"ok": False, "error": str(exc)}
        except Exception:
            log.exception("control_request_failed", command=request["command"])
            return {"ok": False, "error": "internal error; see the daemon's log"}
        log.info("control_request_served", command=request["command"], actor=actor)
        return {"ok": True, "result": result}


def _encode(reply: dict[str, Any]) -> bytes:
    return json.dumps(reply, ensure_ascii=False, separators=(",", ":")).encode("utf-8") + b"\n"


def request(path: Path, command: str, **fields: Any) -> Any:
    """Send one request to the daemon and return its result; ControlError on failure."""
    payload = json.dumps({"command": command, **fields}).encode("utf-8") + b"\n"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(TIMEOUT)
        try:
            sock.connect(str(path))
        except OSError as exc:
            raise ControlError(f"{path}: cannot reach the daemon: {exc.strerror or exc}") from exc
        sock.sendall(payload)
        chunks = []
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                break
            chunks.append(chunk)
    try:
        reply = json.loads(b"".join(chunks))
    except ValueError as exc:
        raise ControlError("the daemon sent no answer") from exc
    if not reply.get("ok"):
        raise ControlError(str(reply.get("error", "the daemon refused the request")))
    return reply.get("result")


def daemon_running(path: Path) -> bool:
    """True when something accepts connections on the control socket."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(2)
        try:
            sock.connect(str(path))
        except OSError:
            return False
    return True
