"""The inbound SMTP session: aiosmtpd's protocol engine with the gateway's own rules.

aiosmtpd (pinned to 1.4.x) supplies the command loop, STARTTLS and the reply plumbing. The
gateway overrides what it cannot trust or must do differently:

- the greeting: a peer in no client's `networks` gets 554 and is closed, before anything else;
- MAIL and RCPT: parsed from the raw argument with the gateway's strict grammar
  (aiosmtpd's own parser follows lenient header rules and silently drops source routes);
- DATA: read in blocks through `DataReader` into an encrypted spool file, never held whole
  in memory, with smuggling, size and header checks;
- EHLO: its reply lines written at once;
- the end of a session: its reference cycles broken, so that it is freed at once;
- exceptions: a fixed 451 and a logged event, never the exception text.
"""

from __future__ import annotations

import asyncio
import collections
import ssl
import warnings
from typing import Any, AnyStr

import structlog
from aiosmtpd.smtp import SMTP, TLSSetupException

from gateway import replies
from gateway.addresses import Address, MailPath, parse_path
from gateway.config import Client
from gateway.errors import AddressError, SpoolError
from gateway.headers import received_field
from gateway.inbound import Inbound, Transaction
from gateway.logconfig import get_logger
from gateway.policy import OnInsecure
from gateway.reference import new_reference
from gateway.smtp_auth import AuthMechanisms, certificate_fingerprint, identity_missing
from gateway.smtp_data import END_AFTER_LINE, DataError, DataReader

log = get_logger("smtp_in")

# aiosmtpd 1.4 sets the deprecated Session.login_data itself after every successful AUTH;
# the warning is about its own internals, not ours.
warnings.filterwarnings(
    "ignore", message="Session.login_data is deprecated", category=DeprecationWarning
)

_WRITE_CHUNK = 64 * 1024  # content handed to the spool writer per trip to a thread
_DATA_READ_LIMIT = 32 * 1024  # read-ahead while in DATA (commands keep aiosmtpd's 1001)
_RATE_CHECK_EVERY = 1.0  # seconds between looks at a slow upload's rate


def _set_read_limit(stream: asyncio.StreamReader, limit: int) -> int:
    """Set the stream's limit and return the old one.

    asyncio.StreamReader has no public setter: its `_limit` bounds both readuntil's search
    and the read-ahead (the transport pauses at twice it). aiosmtpd sets it to its command
    line limit, which would read DATA a kilobyte at a time.
    """
    old: int = getattr(stream, "_limit")  # noqa: B009 (private attribute, named as such)
    setattr(stream, "_limit", limit)  # noqa: B010
    return old


_DATA_ERROR_REPLIES = {
    DataError.SMUGGLING: replies.SMUGGLING,
    DataError.LINE_TOO_LONG: replies.LINE_TOO_LONG,
    DataError.TOO_BIG: replies.SIZE_EXCEEDED,
    DataError.HEADER_TOO_LARGE: replies.HEADER_TOO_LARGE,
}


class GatewaySMTP(AuthMechanisms, SMTP):
    """One inbound SMTP connection."""

    inbound: Inbound
    client: Client | None

    def __init__(
        self, inbound: Inbound, *, tls_context: ssl.SSLContext | None, implicit_tls: bool
    ) -> None:
        server = inbound.config.server
        super().__init__(
            _NoHooks(),
            data_size_limit=server.max_message_size,
            enable_SMTPUTF8=True,
            hostname=server.hostname,
            ident="secure transfer gateway",
            tls_context=None if implicit_tls else tls_context,
            require_starttls=False,  # enforced at MAIL with the SPEC's 530 5.7.0
            timeout=server.idle_timeout,
        )
        if implicit_tls:
            # The whole connection is TLS: offer AUTH at once (aiosmtpd only looks for STARTTLS).
            self._auth_require_tls = False
        # aiosmtpd keeps command length limits in a class-level dict that every EHLO raises:
        # give each session its own, reset at each EHLO.
        self.command_size_limits = collections.defaultdict(lambda: SMTP.command_size_limit)
        self.inbound = inbound
        self.implicit_tls = implicit_tls
        self.errors = 0
        self._gathered: list[str] | None = None  # reply lines held back during EHLO
        self._in_data = False  # reading DATA: arrivals count towards the rate and idle time
        self._arrived = 0
        self.client: Client | None = None
        self.peer_ip = ""
        self._reset_transaction()

    # -- state -------------------------------------------------------------------------------

    def _reset_transaction(self) -> None:
        self.sender: Address | None = None
        self.smtputf8 = False
        self.recipients: list[Address] = []

    def _set_post_data_state(self) -> None:
        super()._set_post_data_state()  # type: ignore[no-untyped-call]
        self._reset_transaction()

    def tls_version(self) -> str | None:
        """The TLS version and cipher of this session, or None in clear text."""
        transport = self.transport
        if transport is None:
            return None
        ssl_object = transport.get_extra_info("ssl_object")
        if ssl_object is None:
            return None
        cipher = ssl_object.cipher()
        return f"{ssl_object.version()}:{cipher[0] if cipher else 'unknown'}"

    # -- connection --------------------------------------------------------------------------

    async def _handle_client(self) -> None:
        peer: Any = self.session.peer if self.session else None
        self.peer_ip = str(peer[0]) if isinstance(peer, tuple) and peer else ""
        self.client = self.inbound.config.client_for(self.peer_ip)
        if self.client is None:
            log.warning("connection_refused", peer=self.peer_ip, reason="not_a_client")
            self.inbound.metrics.message_refused("not_a_client")
            await self.push(replies.NOT_A_CLIENT)
            self._close()
            return
        if not self.inbound.accepting:
            await self.push(replies.SHUTTING_DOWN)
            self._close()
            return
        if not self.inbound.admit(self.peer_ip):
            log.warning("connection_refused", peer=self.peer_ip, reason="too_many_connections")
            self.inbound.metrics.message_refused("too_many_connections")
            await self.push(replies.TOO_MANY_CONNECTIONS)
            self._close()
            return
        self.inbound.sessions.add(self)
        self.inbound.metrics.session_opened()
        try:
            await super()._handle_client()
        except (asyncio.CancelledError, ConnectionResetError):
            # The connection is gone (aiosmtpd cancels this task on connection_lost and then
            # re-raises). The session ends here: the exception's traceback would hold this
            # session, its TLS buffers and its frames in a reference cycle until a full
            # garbage collection, some hundreds of KiB per connection; ending cleanly lets
            # reference counting free them at once.
            pass
        finally:
            self.inbound.sessions.discard(self)
            self.inbound.release(self.peer_ip)
            self.inbound.metrics.session_closed()
            self._forget()

    def _forget(self) -> None:
        """Break the session's reference cycles, so that it is freed when it ends.

        aiosmtpd keeps this session's bound command and AUTH methods in dicts on the session
        itself, and a lost connection leaves its exception (whose traceback holds the
        transport) in the stream reader: each a cycle that only a full garbage collection
        would free, with the TLS buffers of the connection in it.
        """
        self._smtp_methods.clear()
        self._auth_methods.clear()
        self._handle_hooks.clear()
        self._client_connected_cb = None  # asyncio's StreamReaderProtocol: a bound method
        self._reader = self._writer = None  # type: ignore[assignment]

    @property
    def busy(self) -> bool:
        """True while a mail transaction is open (MAIL accepted, DATA not yet answered)."""
        return self.sender is not None

    @property
    def finished(self) -> bool:
        """True once nothing more will happen here: not busy, and closing or closed."""
        return not self.busy and (self.transport is None or self.transport.is_closing())

    def abort(self) -> None:
        """Drop the connection at once (end of the shutdown grace period)."""
        transport = self.transport
        if isinstance(transport, asyncio.WriteTransport):
            transport.abort()

    def shut(self) -> None:
        """At shutdown: an idle session is told 421 and closed; a busy one may finish."""
        if self.busy or self.transport is None or self.transport.is_closing():
            return
        self._writer.write(replies.SHUTTING_DOWN.encode("ascii") + b"\r\n")
        self._close()

    async def push(self, status: AnyStr) -> None:
        """Send a reply; after `hard_error_limit` error replies, say goodbye and close."""
        text = status if isinstance(status, str) else status.decode("ascii", "replace")
        if self._gathered is not None:
            self._gathered.append(text)
            return
        if text.startswith('500 Error: command "'):
            # aiosmtpd echoes the unknown command back; replies never echo client input.
            text = replies.UNKNOWN_COMMAND
        await super().push(text)
        if text[:1] in ("4", "5") and self.transport is not None:
            # Every refusal leaves a line in the operational log. Replies never carry client
            # input beyond reason codes and domains, so the reply itself is safe to log.
            log.info("command_refused", reply=text[:120], client=self._client_name())
            self.errors += 1
            if self.errors >= self.inbound.config.server.hard_error_limit:
                log.warning("session_closed", reason="too_many_errors", client=self._client_name())
                self.inbound.metrics.message_refused("too_many_errors")
                await super().push(replies.TOO_MANY_ERRORS)
                self._close()

    def _timeout_cb(self) -> None:
        """Idle too long: say so with 421 4.4.2 before closing (aiosmtpd closes silently)."""
        if self.transport is not None and not self.transport.is_closing():
            log.info("session_closed", reason="idle_timeout", client=self._client_name())
            self.inbound.metrics.message_refused("idle_timeout")
            self._writer.write(replies.TIMEOUT.encode("ascii") + b"\r\n")
        super()._timeout_cb()  # type: ignore[no-untyped-call]

    def _close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    async def handle_exception(self, error: Exception) -> str:
        """Never echo exception text to the peer: log it and answer a fixed 451."""
        if isinstance(error, TLSSetupException):
            # A client that asked for STARTTLS and did not complete the handshake: its loss.
            log.info("tls_handshake_failed", client=self._client_name(), peer=self.peer_ip)
            self.inbound.metrics.tls_failure("tls_handshake_failed")
            return replies.INTERNAL_ERROR  # not sent: aiosmtpd closes the connection
        log.error("session_error", error_type=type(error).__name__, client=self._client_name())
        return replies.INTERNAL_ERROR

    def _client_name(self) -> str | None:
        return self.client.name if self.client else None

    # -- commands ----------------------------------------------------------------------------

    async def smtp_EHLO(self, hostname: str) -> None:
        """EHLO, with this session's command length limits reset first.

        aiosmtpd writes each line of the reply on its own (a TLS record and a send each);
        the lines are gathered and sent in one write.
        """
        self.command_size_limits.clear()
        self._gathered = []
        try:
            await super().smtp_EHLO(hostname)
        finally:
            lines, self._gathered = self._gathered, None
        if len(lines) == 1:
            await self.push(lines[0])  # a refusal: counted as one
        elif lines:
            await super().push("\r\n".join(lines))

    async def smtp_STARTTLS(self, arg: str) -> None:
        """Refuse a second STARTTLS inside TLS; otherwise aiosmtpd's handshake."""
        if self.tls_version() is not None:
            await self.push(replies.ALREADY_TLS)
            return
        await super().smtp_STARTTLS(arg)

    async def smtp_AUTH(self, arg: str) -> None:
        """AUTH PLAIN or LOGIN, only inside TLS (530 5.7.0 before it, as the SPEC says)."""
        if self.tls_version() is None:
            self.inbound.metrics.message_refused("tls_required")
            await self.push(replies.TLS_REQUIRED)
            return
        await super().smtp_AUTH(arg)

    async def _mail_allowed(self) -> bool:
        if await self.check_helo_needed():
            return False
        if not self.inbound.accepting:
            await self.push(replies.SHUTTING_DOWN)
            self._close()
            return False
        if self.inbound.config.server.require_tls and self.tls_version() is None:
            self.inbound.metrics.message_refused("tls_required")
            await self.push(replies.TLS_REQUIRED)
            return False
        if self.client is not None:
            transport = self.transport
            missing = identity_missing(
                self.client,
                authenticated=bool(self.session and self.session.authenticated),
                fingerprint=certificate_fingerprint(
                    transport.get_extra_info("ssl_object") if transport else None
                ),
            )
            if missing is not None:
                log.info("sender_refused", reason=missing, client=self.client.name)
                self.inbound.metrics.message_refused(missing)
                await self.push(replies.AUTH_REQUIRED)
                return False
        return True

    async def smtp_MAIL(self, arg: str | None) -> None:
        """MAIL FROM, parsed strictly; the sender's domain must be one the client may use."""
        if not await self._mail_allowed():
            return
        if self.sender is not None:
            await self.push(replies.NESTED_MAIL)
            return
        if arg is None or arg[:5].upper() != "FROM:":
            await self.push(replies.SYNTAX_MAIL)
            return
        try:
            path = parse_path(arg[5:])
        except AddressError as exc:
            self.inbound.metrics.message_refused(exc.reason)
            log.info(
                "address_refused", command="MAIL", reason=exc.reason, client=self._client_name()
            )
            await self.push(replies.bad_address(exc.reason))
            return
        problem = self._check_mail_params(path)
        if problem is not None:
            await self.push(problem)
            return
        client = self.client
        if (
            path.address is None
            or client is None
            or not client.allows_sender_domain(path.address.domain)
        ):
            log.info(
                "sender_refused",
                reason="sender_not_allowed",
                client=self._client_name(),
                domain=path.address.domain if path.address else "",
            )
            self.inbound.metrics.message_refused("sender_not_allowed")
            await self.push(replies.sender_not_allowed())
            return
        if not self.inbound.has_space():
            log.warning("spool_low_on_space", client=client.name)
            await self.push(replies.LOW_ON_SPACE)
            return
        self.sender = path.address
        self.smtputf8 = path.has("SMTPUTF8")
        await self.push(replies.SENDER_OK)

    def _check_mail_params(self, path: MailPath) -> str | None:
        for name, value in path.params:
            if name == "SIZE":
                if value is None or not value.isdigit():
                    return replies.SYNTAX_MAIL
                if int(value) > self.inbound.config.server.max_message_size:
                    return replies.SIZE_EXCEEDED
            elif name == "BODY":
                if value is None or value.upper() not in ("7BIT", "8BITMIME"):
                    return replies.BODY_NOT_SUPPORTED
            elif name == "SMTPUTF8":
                if value is not None:
                    return replies.SYNTAX_MAIL
            else:
                return replies.PARAMETER_NOT_SUPPORTED
        return None

    async def smtp_RCPT(self, arg: str | None) -> None:
        """RCPT TO, parsed strictly; refused at once if insecure and the policy says reject."""
        if await self.check_helo_needed():
            return
        if self.sender is None or self.client is None:
            await self.push(replies.NEED_MAIL)
            return
        if arg is None or arg[:3].upper() != "TO:":
            await self.push(replies.SYNTAX_RCPT)
            return
        try:
            path = parse_path(arg[3:], smtputf8=self.smtputf8)
        except AddressError as exc:
            self.inbound.metrics.message_refused(exc.reason)
            log.info("address_refused", command="RCPT", reason=exc.reason, client=self.client.name)
            await self.push(replies.bad_address(exc.reason))
            return
        if path.params:
            await self.push(replies.PARAMETER_NOT_SUPPORTED)
            return
        if path.address is None:
            await self.push(replies.bad_address("bad_syntax"))
            return
        if len(self.recipients) >= self.inbound.config.server.max_recipients:
            self.inbound.metrics.message_refused("too_many_recipients")
            await self.push(replies.TOO_MANY_RECIPIENTS)
            return
        recipient = path.address
        policy, verdict = self.inbound.classify(recipient.domain)
        if not verdict.secure and policy.on_insecure is OnInsecure.REJECT:
            reply = await self.inbound.refuse_recipient(
                self.client, self.sender, recipient, policy, verdict
            )
            await self.push(reply)
            return
        if recipient.normalised not in {r.normalised for r in self.recipients}:
            self.recipients.append(recipient)
        await self.push(replies.RECIPIENT_OK)

    async def smtp_DATA(self, arg: str | None) -> None:
        """Stream the message into the encrypted spool, then decide, record and answer."""
        if await self.check_helo_needed():
            return
        if self.sender is None or self.client is None:
            await self.push(replies.NEED_MAIL)
            return
        if not self.recipients:
            await self.push(replies.NEED_RCPT)
            return
        if arg:
            await self.push("501 5.5.4 Syntax: DATA")
            return
        txn = Transaction(self.client, self.sender, tuple(self.recipients), self.smtputf8)
        inbound = self.inbound
        now = inbound.clock()
        ref = new_reference(now)
        try:
            writer = inbound.spool.new_message(ref)  # no I/O: the file comes with the data
        except SpoolError:
            log.exception("spool_write_failed", ref=ref)
            self.inbound.metrics.message_refused("spool_failed")
            await self.push(replies.SPOOL_FAILED)
            self._set_post_data_state()
            return
        reader = DataReader(
            max_size=inbound.config.server.max_message_size,
            prefix=received_field(
                helo=(self.session.host_name if self.session else None) or "",
                peer_ip=self.peer_ip,
                hostname=inbound.config.server.hostname,
                tls=self.tls_version(),
                authenticated=bool(self.session and self.session.authenticated),
                ref=ref,
                moment=now,
            ),
        )
        await self.push(replies.START_DATA)
        try:
            with structlog.contextvars.bound_contextvars(ref=ref):
                reply = await self._receive(ref, txn, reader, writer)
        except BaseException:
            await asyncio.to_thread(writer.abort)
            raise
        self._set_post_data_state()
        await self.push(reply)
        if reply is replies.TOO_SLOW:
            self._close()
        elif not self.inbound.accepting:
            # Shutting down: this transaction is answered; the next one goes elsewhere.
            await self.push(replies.SHUTTING_DOWN)
            self._close()

    async def _receive(self, ref: str, txn: Transaction, reader: DataReader, writer: Any) -> str:
        """Read DATA in blocks through `reader` into `writer`; the reply, or the commit's."""
        pending = bytearray()
        failed = False
        loop = asyncio.get_running_loop()
        started = loop.time()
        server = self.inbound.config.server
        stream = self._reader
        self._arrived = 0
        self._in_data = True
        line_limit = _set_read_limit(stream, _DATA_READ_LIMIT)
        # The block read waits for CRLF . CRLF, so it must start where a CRLF still to come
        # precedes any end of data: lines that begin with a dot (the end of data itself, or a
        # stuffed line) or with a CR (an empty line's CRLF) are read whole at first; the first
        # octet of any other line starts the blocks.
        at_line_start = True
        lead = b""  # the first octet of a line, read but not yet fed
        try:
            while not reader.finished:
                # Every read below consumes nothing when cancelled by the timeout.
                try:
                    async with asyncio.timeout(_RATE_CHECK_EVERY):
                        if not at_line_start:
                            # Up to the end of data, or a block of what has come so far. The
                            # stream stops at the first CRLF . CRLF and keeps what follows (a
                            # pipelined command) for the command loop; a partial block never
                            # ends inside a possible end of data.
                            block = await stream.readuntil(END_AFTER_LINE)
                        else:
                            lead = lead or await stream.readexactly(1)
                            if lead in (b".", b"\r"):  # a dot line, or perhaps an empty one
                                block = lead + await stream.readuntil(b"\n")
                            else:  # a bare LF stays at the start of a line
                                block, at_line_start = lead, lead == b"\n"
                            lead = b""
                except asyncio.LimitOverrunError as exc:
                    block, lead = lead + await stream.readexactly(exc.consumed), b""
                    at_line_start = False  # inside a long line now
                except TimeoutError:
                    block = b""  # nothing complete yet: look at the rate, then wait again
                if block:
                    pending += reader.feed_block(block)
                elapsed = loop.time() - started
                if (
                    elapsed > server.idle_timeout + self._arrived / server.min_data_rate
                    or elapsed > server.max_data_time
                ):
                    # A trickle (slower than min_data_rate after the idle_timeout's grace), or
                    # an upload past the overall DATA time limit.
                    await asyncio.to_thread(writer.abort)
                    self.inbound.metrics.message_refused("too_slow")
                    log.warning(
                        "message_refused", ref=ref, reason="too_slow", client=txn.client.name
                    )
                    return replies.TOO_SLOW
                if len(pending) >= _WRITE_CHUNK:
                    if not failed:
                        try:
                            await asyncio.to_thread(writer.write, pending)
                        except SpoolError:
                            log.exception("spool_write_failed", ref=ref)
                            failed = True
                    pending = bytearray()  # the written one is the writer's to copy, not ours
        finally:
            self._in_data = False
            _set_read_limit(stream, line_limit)
        if reader.error is not None:
            await asyncio.to_thread(writer.abort)
            log.warning(
                "message_refused", ref=ref, reason=str(reader.error), client=txn.client.name
            )
            self.inbound.metrics.message_refused(str(reader.error))
            return _DATA_ERROR_REPLIES[reader.error]
        if failed:
            self.inbound.recheck_space()
            await asyncio.to_thread(writer.abort)
            self.inbound.metrics.message_refused("spool_failed")
            return replies.SPOOL_FAILED
        return await self.inbound.accept(
            ref,
            txn,
            writer,
            size=reader.size,
            digest=reader.digest,
            marking=reader.marking,
            purpose_header=reader.purpose_header,
            tail=bytes(pending),
        )

    def data_received(self, data: bytes) -> None:
        """Count what arrives during DATA, and count it as activity for idle_timeout."""
        if self._in_data:
            self._arrived += len(data)
            self._reset_timeout()
        super().data_received(data)


class _NoHooks:
    """aiosmtpd wants a handler object; every decision lives in GatewaySMTP instead."""
