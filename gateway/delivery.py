"""Outbound SMTP: verified TLS or nothing.

`Deliverer.deliver` connects to a route, requires STARTTLS, verifies the certificate against the
route's `tls_name`, and only then sends MAIL, RCPT and DATA. Failures that concern the whole
message raise `TemporaryDeliveryError` (defer) or `PermanentDeliveryError` (bounce), with a
`kind` and, when the server replied, its `code`; per-recipient replies come back in the
`Attempt`. Exception messages name the host and code only, never an address, and are raised
`from None` where the library's exception would carry one.

Idle verified connections are kept for reuse, up to `max_idle_per_route` per route (the
delivery concurrency, as Postfix's connection cache keeps several per destination); a delivery
takes one out of the pool while it runs, so concurrent deliveries never share one, and the most
recently used is taken first, so the pool shrinks back by idle expiry after a burst.

A message is an `OutgoingMessage`: the fields the gateway puts on top, the header section (it
alone decides SMTPUTF8), the size, and a way to open a fresh stream of the content. After the
354 the content is written block by block, dot-stuffed as it passes (`DotStuffer`), waiting for
the socket to drain between blocks, so a delivery holds one block, never the whole message. A
connection lost while the content is being written is a deferral (`disconnected`): the end of
data was never sent, so the server cannot have taken the message. Only a loss once the end of
data may have been sent is `ambiguous`.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import aiosmtplib

from gateway.config import Route
from gateway.errors import DeliveryError, PermanentDeliveryError, TemporaryDeliveryError

QUIT_TIMEOUT = 5.0  # seconds to wait for a polite QUIT before just closing
CLOSE_TIMEOUT = 5.0  # seconds to wait for the socket to be gone after closing
MEMORY_BLOCK = 256 * 1024  # piece size when a message held in memory is streamed

RouteKey = tuple[str, int, str]


@dataclass(frozen=True)
class TLSInfo:
    """The TLS session a delivery went over."""

    version: str
    cipher: str
    verified: bool


@dataclass(frozen=True)
class RecipientOutcome:
    """One recipient's result: the reply code that decided it (RCPT, or the DATA reply)."""

    address: str
    code: int
    delivered: bool
    permanent: bool


@dataclass(frozen=True)
class Attempt:
    """The result of one delivery attempt that reached the recipients stage."""

    host: str
    tls: TLSInfo | None
    outcomes: tuple[RecipientOutcome, ...]
    response: int | None
    ambiguous: bool


class _Client(aiosmtplib.SMTP):
    """aiosmtplib's client, which also tells when its socket is gone."""

    def __init__(self, *, hostname: str, port: int, local_hostname: str, timeout: float) -> None:
        super().__init__(
            hostname=hostname,
            port=port,
            local_hostname=local_hostname,
            timeout=timeout,
            use_tls=False,
            start_tls=False,  # done by hand, so that a missing STARTTLS is a deferral
        )
        self.lost: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.secure = False  # TLS established and verified

    def _on_connection_lost(self, protocol: aiosmtplib.protocol.SMTPProtocol) -> None:
        super()._on_connection_lost(protocol)
        if not self.lost.done():
            self.lost.set_result(None)


@dataclass
class _Connection:
    client: _Client
    tls: TLSInfo
    messages: int = 0
    last_used: float = 0.0
    clean: bool = True  # no transaction open: safe to pool
    timer: asyncio.TimerHandle | None = field(default=None, repr=False)


class _StaleConnectionError(Exception):
    """A reused connection was found dead before anything was sent."""


class ContentStream(Protocol):
    """A message's content as blocks of bytes, read once; `aclose` releases what it holds."""

    def __aiter__(self) -> AsyncIterator[bytes]: ...

    async def aclose(self) -> None:
        """Stop reading: close files, release buffers (also after the last block)."""


@dataclass(frozen=True)
class OutgoingMessage:
    """A message to deliver, without its content in memory: the content is opened as a stream.

    `top` is what the gateway puts above the content (its DKIM-Signature and decision fields),
    `header` the header section of the whole message (enough of it to decide SMTPUTF8), `size`
    the length of `top` and content together (SIZE=), `open_content` opens a fresh stream of
    the content each time it is called (each route's delivery reads its own).
    """

    top: bytes
    header: bytes
    size: int
    open_content: Callable[[], ContentStream]

    @classmethod
    def in_memory(cls, message: bytes) -> OutgoingMessage:
        """A message held whole in memory (a small one), streamed in pieces all the same."""
        header_end = message.find(b"\r\n\r\n")
        header = message if header_end < 0 else message[:header_end]
        return cls(b"", header, len(message), lambda: MemoryStream(message))


class MemoryStream:
    """Content held in memory (a small message), as a `ContentStream` of slices."""

    def __init__(self, message: bytes) -> None:
        self._message = message
        self._offset = 0

    def __aiter__(self) -> MemoryStream:
        return self

    async def __anext__(self) -> bytes:
        start = self._offset
        if start >= len(self._message):
            raise StopAsyncIteration
        self._offset += MEMORY_BLOCK
        return self._message[start : self._offset]

    async def aclose(self) -> None:
        """Nothing to release: the message is the caller's."""
        self._offset = len(self._message)


class DotStuffer:
    """Dot-stuffs a message given in pieces cut anywhere (RFC 5321 section 4.5.2).

    A dot that starts a line (at the very start, or after any LF) is doubled, whether or not
    the line began in an earlier piece; `end` adds the CRLF the message lacks, if it does, and
    the end-of-data line.
    """

    def __init__(self) -> None:
        self._line_start = True
        self._last = b""  # the last two bytes seen

    def feed(self, piece: bytes) -> bytes:
        """The stuffed form of the next piece."""
        if not piece:
            return piece
        stuffed = piece.replace(b"\n.", b"\n..")
        if self._line_start and piece.startswith(b"."):
            stuffed = b"." + stuffed
        self._line_start = piece.endswith(b"\n")
        self._last = (self._last + piece[-2:])[-2:]
        return stuffed

    def end(self) -> bytes:
        """What follows the last piece: a CRLF if the message did not end with one, then `.`."""
        return (b"" if self._last == b"\r\n" else b"\r\n") + b".\r\n"


def _needs_smtputf8(sender: str, recipients: Sequence[str], header: bytes) -> bool:
    """Whether an address or the header section is not ASCII (anything after it is ignored)."""
    if not sender.isascii() or not all(r.isascii() for r in recipients):
        return True
    header_end = header.find(b"\r\n\r\n")
    return not (header if header_end < 0 else header[:header_end]).isascii()


def _temporary(host: str, command: str, code: int, kind: str) -> TemporaryDeliveryError:
    return TemporaryDeliveryError(f"{host}: {command} refused with {code}", code=code, kind=kind)


def _reply_error(host: str, command: str, code: int) -> DeliveryError:
    if 500 <= code < 600:
        text = f"{host}: {command} refused with {code}"
        return PermanentDeliveryError(text, code=code, kind="smtp_5xx")
    return _temporary(host, command, code, "smtp_4xx")


async def _ehlo(client: _Client, host: str) -> None:
    try:
        await client.ehlo()
    except aiosmtplib.SMTPResponseException as exc:
        raise _temporary(host, "EHLO", exc.code, "ehlo") from None
    except aiosmtplib.SMTPException as exc:
        raise TemporaryDeliveryError(f"{host}: connection lost", kind="disconnected") from exc


class Deliverer:
    """Delivers messages over verified TLS, reusing idle connections per route."""

    def __init__(
        self,
        *,
        tls_context: ssl.SSLContext,
        helo_name: str,
        connect_timeout: float,
        idle_reuse: float = 30.0,
        max_messages_per_connection: int = 100,
        max_idle_per_route: int = 1,
        command_timeout: float = 300.0,
    ) -> None:
        if tls_context.verify_mode != ssl.CERT_REQUIRED or not tls_context.check_hostname:
            raise ValueError("delivery needs a context that verifies certificates and names")
        self._tls_context = tls_context
        self._helo_name = helo_name
        self._connect_timeout = connect_timeout
        self._command_timeout = command_timeout
        self._idle_reuse = idle_reuse
        self._max_messages = max_messages_per_connection
        self._max_idle = max_idle_per_route
        self._idle: dict[RouteKey, list[_Connection]] = {}  # per route, most recent last
        self._closing: set[asyncio.Task[None]] = set()
        self._closed = False
        self.connections_opened = 0
        self.connections_reused = 0

    async def deliver(
        self,
        route: Route,
        sender: str,
        recipients: Sequence[str],
        message: OutgoingMessage | bytes,
    ) -> Attempt:
        """Try to deliver `message` to `recipients` through `route`, once."""
        if self._closed:
            raise RuntimeError("the deliverer is closed")
        if isinstance(message, bytes):
            message = OutgoingMessage.in_memory(message)
        key: RouteKey = (route.host, route.port, route.tls_name)
        conn = await self._take_idle(key)
        if conn is not None:
            self.connections_reused += 1
            try:
                return await self._transact(key, conn, sender, recipients, message)
            except _StaleConnectionError:
                pass  # nothing was sent: open a fresh connection below
        return await self._transact(key, await self._open(route), sender, recipients, message)

    async def close(self) -> None:
        """Say QUIT on every idle connection and wait until all are closed."""
        self._closed = True
        idle = [conn for stack in self._idle.values() for conn in stack]
        self._idle.clear()
        for conn in idle:
            if conn.timer is not None:
                conn.timer.cancel()
        await asyncio.gather(*(self._dispose(conn.client, polite=True) for conn in idle))
        if self._closing:
            await asyncio.gather(*self._closing)

    # -- connections --------------------------------------------------------------------

    async def _open(self, route: Route) -> _Connection:
        client = _Client(
            hostname=route.host,
            port=route.port,
            local_hostname=self._helo_name,
            timeout=self._command_timeout,
        )
        self.connections_opened += 1
        try:
            return _Connection(client, await self._secure(client, route))
        except BaseException:
            await self._dispose(client, polite=False)
            raise

    async def _secure(self, client: _Client, route: Route) -> TLSInfo:
        """Connect, EHLO, STARTTLS with a verified certificate for `tls_name`, EHLO again."""
        host = f"{route.host}:{route.port}"
        try:
            await client.connect(timeout=self._connect_timeout)
        except aiosmtplib.SMTPConnectResponseError as exc:
            raise _temporary(host, "greeting", exc.code, "connect") from None
        except (aiosmtplib.SMTPConnectError, aiosmtplib.SMTPTimeoutError, OSError) as exc:
            raise TemporaryDeliveryError(f"{host}: cannot connect", kind="connect") from exc
        await _ehlo(client, host)
        if not client.supports_extension("starttls"):
            raise TemporaryDeliveryError(f"{host}: STARTTLS not offered", kind="no_starttls")
        try:
            await client.starttls(
                server_hostname=route.tls_name,
                tls_context=self._tls_context,
                timeout=self._connect_timeout,
            )
        except aiosmtplib.SMTPResponseException as exc:
            raise _temporary(host, "STARTTLS", exc.code, "no_starttls") from None
        except (ssl.SSLError, aiosmtplib.SMTPServerDisconnected, aiosmtplib.SMTPTimeoutError) as e:
            if isinstance(e, ssl.SSLCertVerificationError):
                why = f"certificate not valid for {route.tls_name}: {e.verify_message}"
                raise TemporaryDeliveryError(f"{host}: {why}", kind="certificate") from e
            why = e.reason if isinstance(e, ssl.SSLError) else type(e).__name__
            raise TemporaryDeliveryError(f"{host}: TLS failed: {why}", kind="tls_handshake") from e
        ssl_object = client.get_transport_info("ssl_object")
        if not isinstance(ssl_object, ssl.SSLObject) or not ssl_object.getpeercert():
            raise TemporaryDeliveryError(f"{host}: TLS not verified", kind="certificate")
        client.secure = True
        cipher = ssl_object.cipher()
        tls = TLSInfo(ssl_object.version() or "", cipher[0] if cipher else "", verified=True)
        await _ehlo(client, host)
        return tls

    async def _take_idle(self, key: RouteKey) -> _Connection | None:
        stack = self._idle.get(key)
        while stack:
            conn = stack.pop()
            if not stack:
                del self._idle[key]
            if conn.timer is not None:
                conn.timer.cancel()
                conn.timer = None
            age = asyncio.get_running_loop().time() - conn.last_used
            if conn.client.is_connected and age <= self._idle_reuse:
                return conn
            await self._dispose(conn.client, polite=True)
            stack = self._idle.get(key)
        return None

    async def _put_idle(self, key: RouteKey, conn: _Connection) -> None:
        full = conn.messages >= self._max_messages
        stack = self._idle.setdefault(key, [])
        if self._closed or full or len(stack) >= self._max_idle or not conn.client.is_connected:
            if not stack:
                del self._idle[key]
            await self._dispose(conn.client, polite=True)
            return
        loop = asyncio.get_running_loop()
        conn.last_used = loop.time()
        conn.timer = loop.call_later(self._idle_reuse, self._expire, key, conn)
        stack.append(conn)

    def _expire(self, key: RouteKey, conn: _Connection) -> None:
        stack = self._idle.get(key, [])
        if conn in stack:
            stack.remove(conn)
            if not stack:
                del self._idle[key]
            task = asyncio.get_running_loop().create_task(self._dispose(conn.client, polite=True))
            self._closing.add(task)
            task.add_done_callback(self._closing.discard)

    async def _dispose(self, client: _Client, *, polite: bool) -> None:
        """QUIT (when `polite` and still connected), close, and wait for the socket to go."""
        if polite and client.is_connected:
            with contextlib.suppress(aiosmtplib.SMTPException, OSError, TimeoutError):
                await client.quit(timeout=QUIT_TIMEOUT)
        client.close()
        if client.secure:  # a TLS close waits for the peer's close_notify
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(client.lost), CLOSE_TIMEOUT)
        else:  # a plain socket (or a failed handshake's) closes on the next loop turn
            await asyncio.sleep(0)

    # -- one transaction ----------------------------------------------------------------

    async def _transact(
        self,
        key: RouteKey,
        conn: _Connection,
        sender: str,
        recipients: Sequence[str],
        message: OutgoingMessage,
    ) -> Attempt:
        """Run MAIL, RCPT and DATA on a verified connection; pool it again when clean."""
        host = f"{key[0]}:{key[1]}"
        conn.clean = False
        try:
            return await self._send(conn, host, sender, recipients, message)
        except aiosmtplib.SMTPException as exc:
            # The library's text may carry an address: keep only the kind of failure.
            problem = type(exc).__name__
            raise TemporaryDeliveryError(f"{host}: {problem}", kind="disconnected") from None
        except BaseException:
            if not conn.clean:
                conn.client.close()  # cancelled or failed mid-transaction: never reuse
            raise
        finally:
            if conn.clean and conn.client.is_connected:
                await self._put_idle(key, conn)
            else:
                await self._dispose(conn.client, polite=False)

    async def _send(
        self,
        conn: _Connection,
        host: str,
        sender: str,
        recipients: Sequence[str],
        message: OutgoingMessage,
    ) -> Attempt:
        client = conn.client
        utf8 = _needs_smtputf8(sender, recipients, message.header)
        if utf8 and not client.supports_extension("smtputf8"):
            conn.clean = True
            raise PermanentDeliveryError(
                f"{host}: SMTPUTF8 needed but not offered", kind="no_smtputf8"
            )
        encoding = "utf-8" if utf8 else "ascii"
        options = ["SMTPUTF8"] if utf8 else []
        if client.supports_extension("size"):
            options.append(f"SIZE={message.size}")
        try:
            await client.mail(sender, options=options, encoding=encoding)
        except aiosmtplib.SMTPSenderRefused as exc:
            conn.clean = True
            raise _reply_error(host, "MAIL", exc.code) from None
        except aiosmtplib.SMTPServerDisconnected:
            if conn.messages > 0:  # a reused connection the server had hung up
                raise _StaleConnectionError from None
            raise
        except ValueError:
            conn.clean = True
            raise PermanentDeliveryError(
                f"{host}: sender address cannot be sent", kind="bad_address"
            ) from None
        conn.messages += 1
        refused: list[RecipientOutcome] = []
        accepted: list[tuple[str, int]] = []
        for rcpt in recipients:
            try:
                reply = await client.rcpt(rcpt, encoding=encoding)
            except aiosmtplib.SMTPRecipientRefused as exc:
                permanent = 500 <= exc.code < 600
                refused.append(
                    RecipientOutcome(rcpt, exc.code, delivered=False, permanent=permanent)
                )
            except ValueError:
                refused.append(RecipientOutcome(rcpt, 553, delivered=False, permanent=True))
            else:
                accepted.append((rcpt, reply.code))
        if not accepted:
            await client.rset()
            conn.clean = True
            return Attempt(host, conn.tls, tuple(refused), response=None, ambiguous=False)
        reply = await client.execute_command(b"DATA")
        if reply.code != 354:
            await client.rset()
            conn.clean = True
            raise _reply_error(host, "DATA", reply.code)
        protocol = client.protocol
        if protocol is None:
            raise aiosmtplib.SMTPServerDisconnected("connection lost")
        stuffer = DotStuffer()
        await self._write_content(protocol, host, message, stuffer)
        try:
            protocol.write(stuffer.end())
            final = await protocol.read_response(timeout=self._command_timeout)
        except (aiosmtplib.SMTPServerDisconnected, aiosmtplib.SMTPTimeoutError, OSError):
            # The end of data may have arrived: not delivered, but maybe a duplicate later.
            unsure = tuple(
                RecipientOutcome(a, code, delivered=False, permanent=False) for a, code in accepted
            )
            outcomes = unsure + tuple(refused)
            return Attempt(host, conn.tls, outcomes, response=None, ambiguous=True)
        conn.clean = True
        if final.code != 250:
            raise _reply_error(host, "end of data", final.code)
        delivered = tuple(
            RecipientOutcome(a, final.code, delivered=True, permanent=False) for a, _ in accepted
        )
        return Attempt(
            host, conn.tls, delivered + tuple(refused), response=final.code, ambiguous=False
        )

    async def _write_content(
        self,
        protocol: aiosmtplib.protocol.SMTPProtocol,
        host: str,
        message: OutgoingMessage,
        stuffer: DotStuffer,
    ) -> None:
        """Write the message after the 354, dot-stuffed, one block at a time, all but its end.

        Each block waits for the socket to drain (at most the command timeout), so a slow
        server holds up the reading of the content rather than letting it pile up in memory.
        A connection lost here has not seen the end of data: a deferral, never ambiguous.
        """
        content = message.open_content()
        try:
            protocol.write(stuffer.feed(message.top))
            async for block in content:
                protocol.write(stuffer.feed(block))
                async with asyncio.timeout(self._command_timeout):
                    await protocol._drain_helper()  # StreamWriter.drain's flow control
        except (aiosmtplib.SMTPServerDisconnected, OSError) as exc:  # OSError: also timeouts
            raise TemporaryDeliveryError(
                f"{host}: connection lost or stalled while sending the message", kind="disconnected"
            ) from exc
        finally:
            await content.aclose()
