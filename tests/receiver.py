"""A real receiving SMTP server for tests: aiosmtpd in the test's own loop, on a real port."""

from __future__ import annotations

import asyncio
import ssl
from dataclasses import dataclass, field

from aiosmtpd.smtp import SMTP, Envelope, Session


@dataclass(frozen=True)
class Received:
    """One message as the receiver got it."""

    mail_from: str
    rcpt_tos: tuple[str, ...]
    content: bytes
    tls_version: str | None


@dataclass
class Receiver:
    """An aiosmtpd handler that records envelopes and can be told to fail."""

    fail_rcpt: dict[str, int] = field(default_factory=dict)
    fail_data: int | None = None
    drop_after_data: bool = False
    messages: list[Received] = field(default_factory=list)
    sessions: list[SMTP] = field(default_factory=list)

    @property
    def envelopes(self) -> list[tuple[str, list[str], bytes, str | None]]:
        """The messages as (mail_from, rcpt_tos, content, tls_version) tuples."""
        return [(m.mail_from, list(m.rcpt_tos), m.content, m.tls_version) for m in self.messages]

    async def handle_RCPT(  # noqa: N802 (aiosmtpd hook name)
        self, _server: SMTP, _session: Session, envelope: Envelope, address: str, _options: object
    ) -> str:
        """Refuse the addresses listed in `fail_rcpt` with their code."""
        code = self.fail_rcpt.get(address)
        if code is not None:
            return f"{code} {'5.1.1' if code >= 500 else '4.2.1'} refused for the test"
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(  # noqa: N802 (aiosmtpd hook name)
        self, server: SMTP, session: Session, envelope: Envelope
    ) -> str:
        """Record the message, or fail or hang up as configured."""
        if self.fail_data is not None:
            return f"{self.fail_data} {'5.3.0' if self.fail_data >= 500 else '4.3.0'} test failure"
        ssl_object = (session.ssl or {}).get("ssl_object")
        self.messages.append(
            Received(
                mail_from=envelope.mail_from,
                rcpt_tos=tuple(envelope.rcpt_tos),
                content=envelope.original_content,
                tls_version=ssl_object.version() if ssl_object is not None else None,
            )
        )
        if self.drop_after_data:
            server.transport.close()
        return "250 2.0.0 Ok: queued"

    def drop_connections(self) -> None:
        """Hang up every open connection, as a server's idle timeout would."""
        for session in self.sessions:
            if session.transport is not None:
                session.transport.close()

    async def wait_gone(self) -> None:
        """Hang up, then wait for every connection to be lost and its handler to end."""
        self.drop_connections()
        lost: list[asyncio.Future[None]] = []
        for session in self.sessions:
            started = session._original_transport is not None
            if started and session.transport is session._original_transport:
                continue  # a failed TLS handshake: asyncio already closed its socket
            lost.append(session._closed)
        if lost:
            await asyncio.wait(lost, timeout=5)
        tasks = [s._handler_coroutine for s in self.sessions if s._handler_coroutine is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await asyncio.sleep(0)  # the socket of a failed handshake closes on the next turn


async def start_receiver(
    *,
    tls_context: ssl.SSLContext | None,
    host: str = "127.0.0.1",
    port: int = 0,
    require_starttls: bool = False,
    hostname: str = "localhost",
    fail_rcpt: dict[str, int] | None = None,
    fail_data: int | None = None,
    drop_after_data: bool = False,
    smtputf8: bool = True,
) -> tuple[asyncio.Server, int, Receiver]:
    """Start a receiver on `host` (port 0: a free port); return the server, its port, handler."""
    receiver = Receiver(
        fail_rcpt=dict(fail_rcpt or {}), fail_data=fail_data, drop_after_data=drop_after_data
    )
    loop = asyncio.get_running_loop()

    def session() -> SMTP:
        smtp = SMTP(
            receiver,
            tls_context=tls_context,
            require_starttls=require_starttls,
            hostname=hostname,
            ident="test receiver",
            enable_SMTPUTF8=smtputf8,
            loop=loop,
        )
        receiver.sessions.append(smtp)
        return smtp

    server = await loop.create_server(session, host, port)
    real_port = server.sockets[0].getsockname()[1]
    return server, real_port, receiver


async def stop_receiver(server: asyncio.Server, receiver: Receiver) -> None:
    """Stop listening, hang up every connection and wait for all of it to finish."""
    server.close()
    await receiver.wait_gone()
    await server.wait_closed()
