"""Inbound SMTP replies (SPEC section 4) over real sockets, with a raw line-level client."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import ssl

import pytest

from gateway import replies
from gateway.smtp_in import GatewaySMTP
from gateway.spool import State
from tests.harness import make_setup, running_gateway, smtp_send

SENDER = "duty.officer@bromley.gcsx.gov.uk"


class RawClient:
    """A line-level SMTP client that can send anything, including smuggling attempts."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def connect(cls, port: int, *, local_addr: tuple[str, int] | None = None) -> RawClient:
        """Connect to 127.0.0.1:port."""
        reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=local_addr)
        return cls(reader, writer)

    async def reply(self) -> str:
        """Read one (possibly multi-line) reply; return its last line with the code."""
        async with asyncio.timeout(10):
            while True:
                line = (await self.reader.readline()).decode()
                if not line:
                    return ""
                if line[3:4] != "-":
                    return line.rstrip("\r\n")

    async def command(self, text: str) -> str:
        """Send one command line and read the reply."""
        self.writer.write(text.encode() + b"\r\n")
        await self.writer.drain()
        return await self.reply()

    async def send_raw(self, data: bytes) -> None:
        """Send bytes exactly as given."""
        self.writer.write(data)
        await self.writer.drain()

    async def starttls(self, context: ssl.SSLContext) -> None:
        """EHLO, STARTTLS, handshake, EHLO again."""
        await self.command("EHLO agency.test")
        assert (await self.command("STARTTLS")).startswith("220")
        await self.writer.start_tls(context, server_hostname="localhost")
        await self.command("EHLO agency.test")

    async def close(self) -> None:
        """Close the connection."""
        self.writer.close()
        with contextlib.suppress(ConnectionError, ssl.SSLError):
            await self.writer.wait_closed()


@pytest.fixture
async def gateway(tmp_path, ca, receiver):
    """A running gateway (max 3 recipients, 64 KiB messages) and its set-up."""
    port, _handler = receiver
    setup = make_setup(
        tmp_path,
        ca,
        receiver_port=port,
        server_extra="max_recipients = 3\nmax_message_size = 65536",
    )
    async with running_gateway(setup) as (daemon, smtp_port):
        yield setup, daemon, smtp_port


@pytest.fixture
async def client(gateway):
    """A raw client connected over STARTTLS."""
    setup, _daemon, port = gateway
    raw = await RawClient.connect(port)
    await raw.reply()
    await raw.starttls(setup.client_context)
    yield raw
    await raw.close()


async def test_unknown_client_is_refused_at_greeting(tmp_path, ca, receiver):
    """A peer in no client's networks gets 554 5.7.1 as its greeting, then the close."""
    port, _ = receiver
    setup = make_setup(tmp_path, ca, receiver_port=port)
    text = setup.config_path.read_text().replace('["127.0.0.0/8"]', '["127.0.0.1/32"]')
    setup.config_path.write_text(text)
    async with running_gateway(setup) as (_daemon, smtp_port):
        raw = await RawClient.connect(smtp_port, local_addr=("127.0.0.2", 0))
        assert await raw.reply() == replies.NOT_A_CLIENT
        assert await raw.reader.read() == b""
        await raw.close()


async def test_mail_before_starttls_is_refused(gateway):
    """require_tls: MAIL in clear text gets 530 5.7.0."""
    _setup, _daemon, port = gateway
    raw = await RawClient.connect(port)
    await raw.reply()
    await raw.command("EHLO agency.test")
    assert await raw.command(f"MAIL FROM:<{SENDER}>") == replies.TLS_REQUIRED
    assert await raw.command("AUTH PLAIN AGZvbwBiYXI=") == replies.TLS_REQUIRED
    await raw.close()


async def test_second_starttls_is_refused(client):
    """STARTTLS inside TLS is answered 503, never a second handshake."""
    assert await client.command("STARTTLS") == replies.ALREADY_TLS


@pytest.mark.parametrize(
    ("path", "reason"),
    [
        ("<x%y@nhs.net@bromley.gcsx.gov.uk>", "routing_in_address"),
        ("<a!b@bromley.gcsx.gov.uk>", "routing_in_address"),
        ('<"a@b"@bromley.gcsx.gov.uk>', "routing_in_address"),
        ("<a@[192.0.2.1]>", "ip_literal"),
        ("<a(comment)@bromley.gcsx.gov.uk>", "bad_syntax"),
        ("<=?utf-8?q?a?=@bromley.gcsx.gov.uk>", "bad_syntax"),
        ("a@bromley.gcsx.gov.uk", "bad_syntax"),
    ],
)
async def test_routing_tricks_are_refused_at_mail(client, path, reason):
    """Every routing trick in MAIL FROM is refused with 553 5.1.3 and its reason code."""
    assert await client.command(f"MAIL FROM:{path}") == replies.bad_address(reason)


async def test_routing_tricks_are_refused_at_rcpt(client):
    """A source route in RCPT TO is refused, never silently stripped to its last hop."""
    assert await client.command(f"MAIL FROM:<{SENDER}>") == replies.SENDER_OK
    reply = await client.command("RCPT TO:<@evil.example:lead@nhs.net>")
    assert reply == replies.bad_address("routing_in_address")
    assert await client.command("RCPT TO:<lead%evil.example@nhs.net>") == replies.bad_address(
        "routing_in_address"
    )


async def test_non_ascii_address_needs_smtputf8(client):
    """A Unicode address without SMTPUTF8 on MAIL is refused with 553 5.1.3."""
    assert await client.command("MAIL FROM:<dutyofficér@bromley.gcsx.gov.uk>") == (
        replies.bad_address("smtputf8_required")
    )


async def test_too_many_recipients_get_452(client):
    """Past max_recipients each further RCPT gets 452 4.5.3."""
    await client.command(f"MAIL FROM:<{SENDER}>")
    for number in range(3):
        assert await client.command(f"RCPT TO:<r{number}@nhs.net>") == replies.RECIPIENT_OK
    assert await client.command("RCPT TO:<r9@nhs.net>") == replies.TOO_MANY_RECIPIENTS


async def test_declared_size_over_the_limit_gets_552(client):
    """A SIZE parameter over max_message_size is refused at MAIL."""
    assert await client.command(f"MAIL FROM:<{SENDER}> SIZE=70000") == replies.SIZE_EXCEEDED


async def test_message_over_the_limit_gets_552_and_nothing_is_kept(gateway, client):
    """A client that ignores SIZE is cut at the limit while reading; nothing is spooled."""
    _setup, daemon, _port = gateway
    await client.command(f"MAIL FROM:<{SENDER}>")
    await client.command("RCPT TO:<lead@nhs.net>")
    assert (await client.command("DATA")).startswith("354")
    await client.send_raw(b"Subject: big\r\n\r\n" + (b"y" * 998 + b"\r\n") * 80 + b".\r\n")
    assert await client.reply() == replies.SIZE_EXCEEDED
    assert daemon.spool.refs(State.ACTIVE) == []
    assert list((daemon.config.spool_path / "tmp").iterdir()) == []


@pytest.mark.parametrize(
    "data",
    [
        b"Subject: x\r\n\r\nhello\n.\nMAIL FROM:<a@evil.example>\r\n",
        b"Subject: x\r\n\r\nhello\r\n.\nRCPT TO:<a@gmail.com>\r\n",
        b"Subject: x\r\n\r\nhello\r.\rsmuggled\r\n",
        b"Subject: x\r\n\r\nnul \x00 byte\r\n",
    ],
)
async def test_smuggling_in_data_is_refused_and_nothing_spooled(gateway, client, data):
    """Bare LF, bare CR and NUL in DATA get 550 5.6.0; only CRLF.CRLF ends the data."""
    _setup, daemon, _port = gateway
    await client.command(f"MAIL FROM:<{SENDER}>")
    await client.command("RCPT TO:<lead@nhs.net>")
    assert (await client.command("DATA")).startswith("354")
    await client.send_raw(data + b".\r\n")
    assert await client.reply() == replies.SMUGGLING
    assert daemon.spool.refs(State.ACTIVE) == []
    # The session is still in step: the next command is a command, not message data.
    assert await client.command("NOOP") == "250 OK"


async def test_overlong_line_in_data_is_refused(gateway, client):
    """A DATA line over 1000 octets gets 500 5.5.2 and nothing is spooled."""
    _setup, daemon, _port = gateway
    await client.command(f"MAIL FROM:<{SENDER}>")
    await client.command("RCPT TO:<lead@nhs.net>")
    await client.command("DATA")
    await client.send_raw(b"Subject: x\r\n\r\n" + b"z" * 5000 + b"\r\n.\r\n")
    assert await client.reply() == replies.LINE_TOO_LONG
    assert daemon.spool.refs(State.ACTIVE) == []


async def test_commands_in_order_are_enforced(client):
    """RCPT before MAIL and DATA before RCPT are refused with 503."""
    assert await client.command("RCPT TO:<lead@nhs.net>") == replies.NEED_MAIL
    await client.command(f"MAIL FROM:<{SENDER}>")
    assert await client.command("DATA") == replies.NEED_RCPT
    assert await client.command(f"MAIL FROM:<{SENDER}>") == replies.NESTED_MAIL


async def test_rcpt_parameters_are_refused(client):
    """DSN parameters are not supported: 555, never silently ignored."""
    await client.command(f"MAIL FROM:<{SENDER}>")
    assert await client.command("RCPT TO:<lead@nhs.net> NOTIFY=NEVER") == (
        replies.PARAMETER_NOT_SUPPORTED
    )


async def test_invalid_utf8_and_overlong_addresses_are_refused(client):
    """Invalid UTF-8 and a 65-octet local part are refused with 553 5.1.3, never repaired."""
    await client.send_raw(b"MAIL FROM:<duty\xff@bromley.gcsx.gov.uk> SMTPUTF8\r\n")
    assert await client.reply() == replies.bad_address("invalid_utf8")
    local = "a" * 65
    assert await client.command(f"MAIL FROM:<{local}@bromley.gcsx.gov.uk>") == (
        replies.bad_address("too_long")
    )
    assert await client.command(f"MAIL FROM:<{SENDER}>") == replies.SENDER_OK
    await client.send_raw(b"RCPT TO:<lead\xc3@nhs.net>\r\n")
    assert await client.reply() == replies.bad_address("invalid_utf8")


async def test_overlong_command_line_is_refused(client):
    """A command line over the RFC 5321 limit (512 octets) is refused, not executed."""
    long_path = "<" + "a" * 60 + "@" + ("b" * 60 + ".") * 8 + "gcsx.gov.uk>"
    assert (await client.command(f"MAIL FROM:{long_path}")).startswith("500")
    assert await client.command("RCPT TO:<lead@nhs.net>") == replies.NEED_MAIL


async def test_unknown_command_reply_does_not_echo_it(client):
    """An unknown command gets a fixed 500 that does not repeat what the client sent."""
    assert await client.command("XCANARY secret") == replies.UNKNOWN_COMMAND


async def test_ehlo_reply_comes_whole_in_one_segment(gateway):
    """The multi-line EHLO reply is written at once: one read holds every line, in order."""
    _setup, _daemon, port = gateway
    raw = await RawClient.connect(port)
    await raw.reply()
    await raw.send_raw(b"EHLO agency.test\r\n")
    async with asyncio.timeout(10):
        data = await raw.reader.read(65536)
    lines = data.decode().split("\r\n")
    assert lines[-1] == ""  # nothing cut off
    lines = lines[:-1]
    assert lines[0] == "250-gateway.test"
    assert all(line.startswith("250-") for line in lines[:-1])
    assert lines[-1].startswith("250 ")
    assert "250-STARTTLS" in lines
    assert "250-SIZE 65536" in lines
    await raw.close()


async def test_ehlo_refusals_still_count_towards_the_error_limit(gateway):
    """EHLO without a name is answered 501 alone, and counts as an error."""
    _setup, _daemon, port = gateway
    raw = await RawClient.connect(port)
    await raw.reply()
    for _ in range(20):
        reply = await raw.command("EHLO")
        assert reply.startswith("501 ")
    assert await raw.reply() == replies.TOO_MANY_ERRORS
    assert await raw.reader.read() == b""
    await raw.close()


# -- DATA read in blocks ------------------------------------------------------------------------


@pytest.fixture
async def delivering(tmp_path, ca, receiver):
    """A running gateway with a 1-second idle timeout, its set-up, and the receiver."""
    port, handler = receiver
    setup = make_setup(
        tmp_path, ca, receiver_port=port, server_extra="idle_timeout = 1\nmin_data_rate = 20"
    )
    async with running_gateway(setup) as (daemon, smtp_port):
        yield setup, daemon, smtp_port, handler


async def _open_data(setup, port: int) -> RawClient:
    raw = await RawClient.connect(port)
    await raw.reply()
    await raw.starttls(setup.client_context)
    assert await raw.command(f"MAIL FROM:<{SENDER}>") == replies.SENDER_OK
    assert (await raw.command("RCPT TO:<lead@nhs.net>")).startswith("250")
    assert (await raw.command("DATA")).startswith("354")
    return raw


async def _arrived(handler, marker: bytes) -> bytes:
    async with asyncio.timeout(15):
        while True:
            for message in handler.messages:
                if marker in message.content:
                    return message.content
            await asyncio.sleep(0.05)


@pytest.mark.parametrize(
    "pieces",
    [
        [b"Subject: a\r\n\r\nsplit-end-1\r\n", b".\r\n"],  # the end alone, after a whole line
        [b"Subject: a\r\n\r\nsplit-end-2\r", b"\n", b".", b"\r", b"\n"],  # octet by octet
        [b".", b"\r\n"],  # an empty message
        [b"\r\n.\r\n"],  # an empty line, then the end
        [b"\r", b"\n", b".\r\n"],  # the same in pieces
        [b"\r\n\r\n\r\nsplit-end-5\r\n", b".\r\n"],  # empty lines first
        [b".Subject: a\r\n\r\n..split-end-3\r\n.\r\n"],  # dot-stuffed lines, start and body
        [b"Subject: a\r\n\r\nsplit-end-4\r\n.\r\nQUIT\r\n"],  # a command after the end
    ],
)
async def test_the_end_of_data_is_found_however_it_arrives(delivering, pieces):
    """CRLF . CRLF ends DATA whatever the packets; what follows it is the next command."""
    setup, _daemon, port, _handler = delivering
    raw = await _open_data(setup, port)
    for piece in pieces:
        await raw.send_raw(piece)
        await asyncio.sleep(0.05)
    assert (await raw.reply()).startswith("250 2.0.0")
    if pieces[-1].endswith(b"QUIT\r\n"):
        assert (await raw.reply()).startswith("221")
    else:
        assert (await raw.command("NOOP")).startswith("250")
    await raw.close()


async def test_a_large_message_arrives_byte_identical(delivering):
    """A 3 MB body with dot-stuffed lines is spooled and delivered exactly."""
    setup, _daemon, port, handler = delivering
    body = b"".join(
        (b"." if n % 7 == 0 else b"") + b"line %07d of the large-body test\r\n" % n
        for n in range(90_000)
    )
    stuffed = (b"Subject: large-body-test\r\n\r\n" + body).replace(b"\r\n.", b"\r\n..")
    raw = await _open_data(setup, port)
    await raw.send_raw(stuffed + b".\r\n")
    assert (await raw.reply()).startswith("250 2.0.0")
    await raw.close()
    content = await _arrived(handler, b"large-body-test")
    received = content[content.index(b"\r\n\r\n") + 4 :]
    assert len(received) == len(body)
    assert received == body


async def test_a_slow_steady_upload_is_not_idle(delivering):
    """Data that keeps coming (above min_data_rate) outlasts idle_timeout within one block."""
    setup, _daemon, port, handler = delivering
    raw = await _open_data(setup, port)
    await raw.send_raw(b"Subject: steady-upload\r\n\r\n")
    for _ in range(12):  # 3 s of partial lines, far beyond the 1 s idle_timeout
        await raw.send_raw(b"x" * 20)
        await asyncio.sleep(0.25)
    await raw.send_raw(b"\r\n.\r\n")
    assert (await raw.reply()).startswith("250 2.0.0")
    await raw.close()
    await _arrived(handler, b"steady-upload")


async def test_silence_inside_data_gets_421(delivering):
    """A client that stops in the middle of DATA is told 421 4.4.2 after idle_timeout."""
    setup, daemon, port, _handler = delivering
    raw = await _open_data(setup, port)
    await raw.send_raw(b"Subject: silent\r\n\r\nhalf a li")
    assert await raw.reply() == replies.TIMEOUT
    await raw.close()
    assert list((daemon.config.spool_path / "tmp").iterdir()) == []


async def test_a_finished_session_is_freed_at_once(delivering):
    """Sessions leave no reference cycle behind: freed without the cyclic garbage collector.

    aiosmtpd's sessions sit in cycles (bound methods kept on themselves, a lost connection's
    exception in the stream reader) that held each connection's TLS buffers until a full
    collection: memory swung by a hundred MB under load.
    """
    setup, _daemon, port, _handler = delivering
    gc.collect()
    gc.disable()
    try:
        for _ in range(3):
            await asyncio.to_thread(
                smtp_send, port, setup.client_context, SENDER, ["lead@nhs.net"], b"\r\nfreed\r\n"
            )
        reset = await RawClient.connect(port)  # one that goes away without a word
        await reset.reply()
        await reset.starttls(setup.client_context)
        reset.writer.transport.abort()
        quiet = await RawClient.connect(port)  # and one closed by the idle timeout
        await quiet.reply()
        async with asyncio.timeout(10):
            while await quiet.reader.read(1024):
                pass
        await quiet.close()
        await reset.close()
        await asyncio.sleep(0.2)
        alive = [o for o in gc.get_objects() if isinstance(o, GatewaySMTP)]
    finally:
        gc.enable()
    assert alive == []


async def test_a_trickle_of_dot_lines_is_cut_off(delivering):
    """Lines that all begin with a dot, sent slower than min_data_rate, still get 421."""
    setup, daemon, port, _handler = delivering
    raw = await _open_data(setup, port)
    reply = ""
    async with asyncio.timeout(15):
        while not reply:
            await raw.send_raw(b"..\r\n")
            try:
                reply = (await asyncio.wait_for(raw.reader.readline(), 0.5)).decode().rstrip()
            except TimeoutError:
                continue
    assert reply == replies.TOO_SLOW
    await raw.close()
    assert list((daemon.config.spool_path / "tmp").iterdir()) == []
