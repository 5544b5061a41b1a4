"""Property-based fuzzing of the SMTP front door of a real gateway subprocess.

One daemon (a real `gateway serve` subprocess) and one receiver (in a thread with its own event
loop) serve the whole module. hypothesis throws random and mutated SMTP sessions at the daemon
over plain blocking sockets; a small model of the session, driven only by what the test sent and
what the server answered, checks every reply:

- every reply line is well formed (`ddd ` or `ddd-`) and names no exception or traceback;
- no 451 4.3.0 (the reply of an unexpected exception in a session);
- a MAIL or RCPT whose path is certainly invalid under SPEC section 4 (routing tricks, quoted
  `@`, source routes, IP literals, comments, encoded words, white space or control characters,
  invalid UTF-8, over-long parts, no angle brackets) is never answered 250;
- MAIL is never answered 250 before STARTTLS, nor twice in one transaction, and RCPT only after
  an accepted MAIL;
- DATA is answered 250 only for a transaction with an accepted MAIL and RCPT and a clean body:
  bare CR, bare LF, NUL or an over-long line gets 5xx;
- the exactly valid commands still work in the middle of all this (no false refusals), the
  session stays in step (NOOP answers 250 OK afterwards) and nothing hangs.

After the fuzzing, the daemon is still running, answers a fresh connection with 220, accepts
and delivers a normal message, stops cleanly on SIGTERM, and its whole output has no traceback,
no `session_error` event and no event at level error or critical.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import re
import socket
import ssl
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway import replies, tls
from tests.harness import GatewayProcess, GatewaySetup, make_setup, smtp_send
from tests.receiver import Receiver, start_receiver, stop_receiver

SENDER = b"duty@bromley.gcsx.gov.uk"
RECIPIENT = b"lead@nhs.net"
READ_TIMEOUT = 5.0
MAX_STEPS = 15

EHLO = b"EHLO agency.test"
MAIL_OK = b"MAIL FROM:<" + SENDER + b">"
RCPT_OK = b"RCPT TO:<" + RECIPIENT + b">"
VALID_LINES = (EHLO, MAIL_OK, RCPT_OK, b"RSET", b"NOOP", b"QUIT", b"DATA", b"STARTTLS")
CLEAN_BODY = b"Subject: fuzz\r\n\r\nhello\r\n"

REPLY_LINE = re.compile(r"\d{3}[ -]")
EXCEPTION_TEXT = re.compile(r"Traceback|\b[A-Z]\w*(?:Error|Exception)\b|Error: \(|Cannot describe")

# Bytes that make a path certainly invalid wherever they appear between its angle brackets.
TRICK_BYTES = frozenset(b'%!"()[]\\:,;<> ') | frozenset(range(0x20)) | {0x7F}
TRICK_INSERTS = (
    b"%",
    b"!",
    b'"',
    b"(",
    b")",
    b"[",
    b"]",
    b"\\",
    b":",
    b",",
    b";",
    b"<",
    b">",
    b"@",
    b" ",
    b"\t",
    b"\r",
    b"\x00",
    b"\x01",
    b"\x1b",
    b"\x7f",
    b"\xff",
    b"\xc3",
    b"\xc0\xae",
    b"=?utf-8?q?x?=",
    b"(c)",
)
TRICK_PATHS = (
    b"<lead%evil.example@nhs.net>",
    b"<evil.example!lead@nhs.net>",
    b'<"lead@evil.example"@nhs.net>',
    b'<"lead"@nhs.net>',
    b"<@evil.example:lead@nhs.net>",
    b"<@a.example,@b.example:lead@nhs.net>",
    b"<lead@[192.0.2.1]>",
    b"<lead@[IPv6:2001:db8::1]>",
    b"<lead@192.0.2.1>",
    b"<lead(comment)@nhs.net>",
    b"<lead@nhs.net(comment)>",
    b"<=?utf-8?q?lead?=@nhs.net>",
    b"<lead\x00@nhs.net>",
    b"<lead@nhs.net\x00>",
    b"<le\tad@nhs.net>",
    b"< lead@nhs.net>",
    b"<lead@nhs.net >",
    b"<lead\x7f@nhs.net>",
    b"<\x1b[31mlead@nhs.net>",
    b"<lead\xff@nhs.net>",
    b"<lead@nhs\xc3.net>",
    b"<lead\\@nhs.net>",
    b"<lead@@nhs.net>",
    b"<lead@nhs.net@evil.example>",
    b"<" + b"l" * 65 + b"@nhs.net>",
    b"<lead@" + b"a" * 64 + b".nhs.net>",
    b"<lead@"
    + b"a" * 60
    + b"."
    + b"b" * 60
    + b"."
    + b"c" * 60
    + b"."
    + b"d" * 60
    + b"."
    + b"e" * 60
    + b".nhs.net>",
    b"<>",
    b"<lead@nhs.net",
    b"lead@nhs.net",
    b"<lead@nhs.net>junk",
)


# -- the model ----------------------------------------------------------------------------


def split_command(line: bytes) -> tuple[bytes, bytes]:
    """Split one command line as aiosmtpd does: verb (upper case) and stripped argument."""
    verb, _, arg = line.rstrip(b"\r\n").partition(b" ")
    return verb.upper(), arg.strip()


def _is_ipv4(domain: bytes) -> bool:
    try:
        ipaddress.IPv4Address(domain.decode("ascii"))
    except (ValueError, UnicodeDecodeError):
        return False
    return True


def certainly_invalid(verb: bytes, arg: bytes, *, smtputf8: bool) -> bool:
    """Tell whether a MAIL/RCPT argument must be refused under SPEC section 4, whatever else."""
    prefix = b"FROM:" if verb == b"MAIL" else b"TO:"
    if arg[: len(prefix)].upper() != prefix:
        return True
    text = arg[len(prefix) :].lstrip(b" ")
    end = text.find(b">")
    if not text.startswith(b"<") or end < 0:
        return True
    inner, rest = text[1:end], text[end + 1 :]
    if (rest and not rest.startswith(b" ")) or not inner:
        return True
    try:
        inner.decode("utf-8")
    except UnicodeDecodeError:
        return True
    if any(byte in TRICK_BYTES for byte in inner) or b"=?" in inner:
        return True
    if inner.count(b"@") != 1:
        return True
    local, _, domain = inner.partition(b"@")
    if verb == b"MAIL":
        smtputf8 = b"SMTPUTF8" in rest.upper()
    return (
        len(local) > 64
        or len(domain) > 255
        or len(inner) + 2 > 256
        or any(len(label) > 63 for label in domain.split(b"."))
        or _is_ipv4(domain)
        or (not inner.isascii() and not smtputf8)
    )


def body_is_clean(body: bytes) -> bool:
    """Tell whether DATA content (without the end marker) is free of smuggling and long lines."""
    for line in server_lines(body):
        limit = 1000 + line.startswith(b".")
        if (
            len(line) > limit
            or not line.endswith(b"\r\n")
            or b"\r" in line[:-2]
            or b"\n" in line[:-2]
            or b"\0" in line
        ):
            return False
    return True


def server_lines(data: bytes) -> list[bytes]:
    """Split bytes into lines as the server reads them: each up to and including an LF."""
    parts = data.split(b"\n")
    lines = [part + b"\n" for part in parts[:-1]]
    if parts[-1]:
        lines.append(parts[-1])
    return lines


def frame_body(body: bytes) -> bytes:
    """The body plus CRLF . CRLF, dot-stuffed so that only our marker ends the data."""
    lines = server_lines(body + b"\r\n")
    stuffed = [b"..\r\n" if line == b".\r\n" else line for line in lines]
    return b"".join(stuffed) + b".\r\n"


@dataclass
class Model:
    """What the test knows about the session, from what it sent and what the server said."""

    tls: bool = False
    helo: bool = False
    mail: bool = False
    smtputf8: bool = False
    recipients: int = 0
    only_secure: bool = True
    closed: bool = False
    log: list[str] = field(default_factory=list)

    def reset(self) -> None:
        """Forget the transaction (RSET, EHLO, HELO, end of DATA)."""
        self.mail = False
        self.smtputf8 = False
        self.recipients = 0
        self.only_secure = True


class SessionError(AssertionError):
    """A property of the session failed."""


class Client:
    """A blocking SMTP client that sends raw bytes and checks every reply line it reads."""

    def __init__(self, port: int) -> None:
        self.sock: socket.socket = socket.create_connection(
            ("127.0.0.1", port), timeout=READ_TIMEOUT
        )
        self.buffer = b""

    def close(self) -> None:
        """Close the socket."""
        self.sock.close()

    def send(self, data: bytes) -> None:
        """Send bytes exactly as given."""
        self.sock.sendall(data)

    def reply(self) -> list[str] | None:
        """Read one reply (all its lines); None when the server closed the connection."""
        lines: list[str] = []
        while True:
            while b"\r\n" not in self.buffer:
                try:
                    chunk = self.sock.recv(65536)
                except TimeoutError as exc:
                    raise SessionError(
                        f"no reply within {READ_TIMEOUT} s: the server hangs"
                    ) from exc
                except (ConnectionError, ssl.SSLError):
                    chunk = b""
                if not chunk:
                    if self.buffer or lines:
                        raise SessionError(f"connection closed mid-reply: {self.buffer!r} {lines}")
                    return None
                self.buffer += chunk
            raw, _, self.buffer = self.buffer.partition(b"\r\n")
            text = raw.decode("utf-8", "replace")
            if not REPLY_LINE.match(text):
                raise SessionError(f"malformed reply line {text!r}")
            if EXCEPTION_TEXT.search(text):
                raise SessionError(f"reply names an exception: {text!r}")
            if text.startswith(replies.INTERNAL_ERROR[:9]):
                raise SessionError(f"internal error (session_error) in reply: {text!r}")
            lines.append(text)
            if text[3] == " ":
                return lines

    def starttls(self, context: ssl.SSLContext) -> None:
        """Wrap the socket in TLS (after a 220 to STARTTLS)."""
        if self.buffer:
            raise SessionError(f"unexpected bytes before the TLS handshake: {self.buffer!r}")
        self.sock = context.wrap_socket(self.sock, server_hostname="localhost")


class Runner:
    """Play one generated session against the daemon and check each reply against the model."""

    def __init__(self, port: int, context: ssl.SSLContext) -> None:
        self.port = port
        self.context = context
        self.model = Model()
        self.client = Client(port)

    def expect(self, condition: bool, message: str) -> None:
        """Fail with the session so far when `condition` does not hold."""
        if not condition:
            trail = "\n".join(self.model.log[-30:])
            raise SessionError(f"{message}\n--- session so far ---\n{trail}")

    def fail(self, message: str) -> None:
        """Fail with the session so far."""
        self.expect(condition=False, message=message)

    def read(self, sent: bytes) -> str | None:
        """Read the reply to `sent`; return its last line, or None if the server hung up."""
        lines = self.client.reply()
        self.model.log.append(f">> {sent[:120]!r}")
        if lines is None:
            self.model.log.append("<< (closed)")
            self.model.closed = True
            return None
        self.model.log.extend(f"<< {line}" for line in lines)
        return lines[-1]

    def opening(self, *, use_tls: bool) -> None:
        """Greeting, then (most of the time) EHLO and STARTTLS."""
        greeting = self.read(b"(connect)")
        self.expect(greeting is not None and greeting.startswith("220 "), "no 220 greeting")
        if not use_tls:
            return
        self.command(EHLO)
        self.client.send(b"STARTTLS\r\n")
        reply = self.read(b"STARTTLS")
        self.expect(reply is not None and reply.startswith("220 "), "STARTTLS refused")
        self.client.starttls(self.context)
        self.model.tls = True
        self.model.helo = False
        self.model.reset()

    def command(self, line: bytes, terminator: bytes = b"\r\n", label: str = "unknown") -> None:
        """Send one command line and check its reply."""
        self.client.send(line + terminator)
        self.check(line, label)

    def pipeline(self, lines: tuple[tuple[bytes, str], ...]) -> None:
        """Send several commands in one write, then check the replies in order."""
        self.client.send(b"".join(line + b"\r\n" for line, _ in lines))
        for line, label in lines:
            if self.model.closed:
                return
            self.check(line, label, in_pipeline=True)

    def check(self, line: bytes, label: str, *, in_pipeline: bool = False) -> None:
        """Read the reply to one command line and hold it against the model."""
        model = self.model
        verb, arg = split_command(line)
        reply = self.read(line)
        if reply is None:
            self.fail(f"connection closed without a closing reply after {line!r}")
            return
        code = reply[:3]
        if code in ("221", "421") or reply.startswith("502 5.5.1 Too many unrecognized"):
            model.closed = True
            return
        if verb in (b"MAIL", b"RCPT"):
            self.check_envelope(verb, arg, label, code)
        elif verb in (b"EHLO", b"HELO", b"RSET") and code == "250":
            model.reset()
            if verb != b"RSET":
                model.helo = True
        if code == "220":
            self.expect(not model.tls, f"220 to {line!r} inside TLS (a second handshake)")
            self.expect(not in_pipeline, f"220 to a pipelined {line!r}")
            # A STARTTLS we did not plan (a mutation that still reads as STARTTLS): go along
            # with it, as a real client would. Abandoning the handshake is its own test below.
            self.client.starttls(self.context)
            model.tls = True
            model.helo = False
            model.reset()
        if code == "354":
            self.expect(not in_pipeline, f"354 to a pipelined {line!r}")
            self.data_phase(CLEAN_BODY)

    def check_envelope(self, verb: bytes, arg: bytes, label: str, code: str) -> None:
        """MAIL and RCPT: no 250 for an invalid path, out of order or before TLS."""
        model = self.model
        invalid = certainly_invalid(verb, arg, smtputf8=model.smtputf8)
        what = f"{verb.decode()} {arg[:120]!r}"
        if label == "invalid":
            self.expect(invalid, f"test bug: {what} is labelled invalid but the model disagrees")
        if label == "valid":
            self.expect(not invalid, f"test bug: {what} is labelled valid but the model disagrees")
        if code == "250":
            self.expect(not invalid, f"250 to a certainly invalid {what}")
        if verb == b"MAIL":
            if label == "valid" and model.tls and model.helo and not model.mail:
                self.expect(code == "250", f"valid {what} refused with {code}")
            if code == "250":
                self.expect(model.tls, f"250 to {what} before STARTTLS")
                self.expect(model.helo, f"250 to {what} before EHLO/HELO")
                self.expect(not model.mail, f"250 to a nested {what}")
                model.mail = True
                model.smtputf8 = b"SMTPUTF8" in arg.upper()
            return
        if label == "valid" and model.mail and model.recipients < 100:
            self.expect(code == "250", f"valid {what} refused with {code}")
        if code == "250":
            self.expect(model.mail, f"250 to {what} without an accepted MAIL")
            model.recipients += 1
            model.only_secure = model.only_secure and label == "valid"

    def data(self, body: bytes) -> None:
        """DATA, and the body if the server asks for it."""
        model = self.model
        self.client.send(b"DATA\r\n")
        reply = self.read(b"DATA")
        if reply is None:
            self.fail("connection closed without a reply to DATA")
            return
        ready = model.mail and model.recipients > 0
        if reply.startswith("354"):
            self.data_phase(body)
            return
        self.expect(not ready or not model.tls, f"DATA refused with {reply!r} for a valid envelope")

    def data_phase(self, body: bytes) -> None:
        """Send the body and CRLF.CRLF; check the verdict against the envelope and the body."""
        model = self.model
        self.expect(model.mail and model.recipients > 0, "354 without an accepted MAIL and RCPT")
        framed = frame_body(body)
        self.client.send(framed)
        reply = self.read(b"(data) " + framed[:60])
        if reply is None:
            self.fail("connection closed without a reply to the message")
            return
        code = reply[:3]
        if body_is_clean(framed[:-3]):
            self.expect(code == "250", f"clean message refused: {reply!r}")
            self.expect(
                "queued as SG-" in reply or "held as SG-" in reply, f"250 without ref: {reply!r}"
            )
            if model.only_secure:
                self.expect("queued as SG-" in reply, f"secure message not released: {reply!r}")
        else:
            self.expect(code.startswith("5"), f"smuggling or long line answered {reply!r}")
        model.reset()

    def finish(self) -> None:
        """The session is still in step: NOOP gets 250 OK, QUIT gets 221."""
        if self.model.closed:
            return
        self.client.send(b"NOOP\r\n")
        self.expect(self.read(b"NOOP") == "250 OK", "session out of step: NOOP not answered 250")
        self.client.send(b"QUIT\r\n")
        reply = self.read(b"QUIT")
        self.expect(reply is not None and reply.startswith("221"), "QUIT not answered 221")


def play(port: int, context: ssl.SSLContext, session: dict[str, object]) -> None:
    """Run one generated session to the end."""
    runner = Runner(port, context)
    try:
        runner.opening(use_tls=bool(session["tls"]))
        steps = session["steps"]
        assert isinstance(steps, list)
        for step in steps[:MAX_STEPS]:
            if runner.model.closed:
                break
            kind = step[0]
            if kind == "line":
                runner.command(step[1], step[2], step[3])
            elif kind == "pipeline":
                runner.pipeline(step[1])
            else:
                runner.data(step[1])
        runner.finish()
    finally:
        runner.client.close()


# -- strategies ---------------------------------------------------------------------------


def _insert(base: bytes, index: int, chunk: bytes) -> bytes:
    return base[:index] + chunk + base[index:]


@st.composite
def tricky_path(draw: st.DrawFn, address: bytes) -> bytes:
    """A path that is certainly invalid: a known trick, or a trick byte inside the address."""
    if draw(st.booleans()):
        return draw(st.sampled_from(TRICK_PATHS))
    chunk = draw(st.sampled_from(TRICK_INSERTS))
    index = draw(st.integers(0, len(address)))
    return b"<" + _insert(address, index, chunk) + b">"


@st.composite
def tricky_command(draw: st.DrawFn) -> tuple[bytes, str]:
    """MAIL FROM or RCPT TO with a certainly invalid path."""
    if draw(st.booleans()):
        return b"MAIL FROM:" + draw(tricky_path(SENDER)), "invalid"
    return b"RCPT TO:" + draw(tricky_path(RECIPIENT)), "invalid"


@st.composite
def mutated_command(draw: st.DrawFn) -> bytes:
    """A valid command with a few bytes inserted, deleted or replaced."""
    line = draw(st.sampled_from(VALID_LINES))
    for _ in range(draw(st.integers(1, 3))):
        index = draw(st.integers(0, len(line)))
        chunk = draw(st.binary(min_size=1, max_size=4))
        operation = draw(st.sampled_from(["insert", "delete", "replace"]))
        if operation == "insert":
            line = _insert(line, index, chunk)
        elif operation == "delete":
            line = line[:index] + line[index + len(chunk) :]
        else:
            line = line[:index] + chunk + line[index + len(chunk) :]
    return line


overlong_line = st.integers(500, 5000).flatmap(
    lambda n: st.sampled_from(
        [
            b"N" * n,
            b"MAIL FROM:<" + b"a" * n + b"@bromley.gcsx.gov.uk>",
            b"RCPT TO:<" + b"a" * n + b"@nhs.net>",
            b"EHLO " + b"h" * n,
        ]
    )
)

valid_line = st.sampled_from([EHLO, MAIL_OK, RCPT_OK, b"RSET", b"NOOP"]).map(
    lambda line: (line, "valid")
)

line_step = st.one_of(
    valid_line,
    st.just((b"QUIT", "valid")),
    tricky_command(),
    mutated_command().map(lambda line: (line, "unknown")),
    st.binary(max_size=300).map(lambda line: (line, "unknown")),
    overlong_line.map(lambda line: (line, "unknown")),
).flatmap(
    lambda item: st.tuples(
        st.just("line"),
        st.just(item[0].replace(b"\n", b"")),
        st.sampled_from([b"\r\n", b"\r\n", b"\r\n", b"\n"]),
        st.just(item[1]),
    )
)

pipeline_step = st.tuples(
    st.just("pipeline"),
    st.lists(st.one_of(valid_line, tricky_command()), min_size=2, max_size=6).map(tuple),
)

clean_body = st.lists(
    st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=80), max_size=5
).map(lambda lines: b"Subject: fuzz\r\n\r\n" + b"".join(x.encode() + b"\r\n" for x in lines))


@st.composite
def dirty_body(draw: st.DrawFn) -> bytes:
    """A body with bare LF, bare CR, NUL, an over-long line, or random bytes."""
    base = draw(clean_body)
    kind = draw(st.sampled_from(["lf", "cr", "nul", "long", "random", "smuggle"]))
    index = draw(st.integers(0, len(base)))
    if kind == "lf":
        return _insert(base, index, b"x\nx")
    if kind == "cr":
        return _insert(base, index, b"x\rx")
    if kind == "nul":
        return _insert(base, index, b"\x00")
    if kind == "long":
        return base + b"z" * draw(st.integers(1001, 5000)) + b"\r\n"
    if kind == "smuggle":
        return base + b"hi\n.\nMAIL FROM:<a@evil.example>\r\nRCPT TO:<b@gmail.com>\r\nDATA\r\n"
    return draw(st.binary(max_size=200))


data_step = st.tuples(st.just("data"), st.one_of(clean_body, clean_body, dirty_body()))

transaction = st.tuples(
    st.just(("line", MAIL_OK, b"\r\n", "valid")),
    st.just(("line", RCPT_OK, b"\r\n", "valid")),
    data_step,
).map(list)

steps = st.lists(
    st.one_of(
        line_step.map(lambda step: [step]),
        line_step.map(lambda step: [step]),
        pipeline_step.map(lambda step: [step]),
        data_step.map(lambda step: [step]),
        transaction,
        transaction,
    ),
    min_size=1,
    max_size=8,
).map(lambda groups: [step for group in groups for step in group][:MAX_STEPS])

sessions = st.fixed_dictionaries(
    {
        "tls": st.sampled_from([True, True, True, True, False]),
        "ehlo_after_tls": st.sampled_from([True, True, True, False]),
        "open_transaction": st.booleans(),
        "steps": steps,
    }
).map(
    lambda s: {
        "tls": s["tls"],
        "steps": ([("line", EHLO, b"\r\n", "valid")] if s["ehlo_after_tls"] else [])
        + ([("line", MAIL_OK, b"\r\n", "valid")] if s["open_transaction"] else [])
        + s["steps"],
    }
)


# -- fixtures -----------------------------------------------------------------------------


class ReceiverThread:
    """A test receiver served by an event loop of its own, in a background thread."""

    def __init__(self, context: ssl.SSLContext) -> None:
        self.context = context
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.port = 0
        self.handler = Receiver()
        self._server: asyncio.Server | None = None

    def start(self) -> None:
        """Start the loop and the receiver on a free port."""
        self.thread.start()
        future = asyncio.run_coroutine_threadsafe(
            start_receiver(tls_context=self.context), self.loop
        )
        self._server, self.port, self.handler = future.result(20)

    def stop(self) -> None:
        """Stop the receiver, then the loop, then close it."""
        if self._server is not None:
            asyncio.run_coroutine_threadsafe(
                stop_receiver(self._server, self.handler), self.loop
            ).result(20)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(20)
        self.loop.run_until_complete(self.loop.shutdown_asyncgens())
        self.loop.close()


@dataclass
class Bed:
    """The daemon under fuzzing, its set-up and the receiver it delivers to."""

    setup: GatewaySetup
    process: GatewayProcess
    receiver: ReceiverThread

    @property
    def port(self) -> int:
        """The daemon's SMTP port."""
        return self.process.port


@pytest.fixture(scope="module")
def bed(tmp_path_factory, localhost_cert, ca) -> Iterator[Bed]:
    """One gateway subprocess and one receiver for the whole module."""
    root: Path = tmp_path_factory.mktemp("fuzz")
    cert, key = root / "receiver-cert.pem", root / "receiver-key.pem"
    localhost_cert.cert_chain_pems[0].write_to_path(cert)
    localhost_cert.private_key_pem.write_to_path(key)
    receiver = ReceiverThread(tls.server_context(cert, key))
    receiver.start()
    try:
        setup = make_setup(root / "gateway", ca, receiver_port=receiver.port)
        process = GatewayProcess(setup)
        process.start()
        try:
            yield Bed(setup, process, receiver)
        finally:
            process.kill()
    finally:
        receiver.stop()


def new_output(process: GatewayProcess, start: int) -> list[str]:
    """The daemon's output lines since `start` that show an exception or an error event."""
    bad = []
    for line in process.output[start:]:
        if "Traceback" in line or "session_error" in line:
            bad.append(line)
            continue
        with contextlib.suppress(ValueError, AttributeError):
            if json.loads(line).get("level") in ("error", "critical"):
                bad.append(line)
    return bad


FUZZ_SETTINGS = settings(
    max_examples=120,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


# -- tests --------------------------------------------------------------------------------


@FUZZ_SETTINGS
@given(session=sessions)
def test_random_and_mutated_sessions_are_refused_cleanly(bed, session):
    """No crash, no traceback, no 250 to an invalid envelope, no hang, for any session."""
    start = len(bed.process.output)
    play(bed.port, bed.setup.client_context, session)
    time.sleep(0.01)  # let the output reader catch up with the session's last log lines
    assert new_output(bed.process, start) == []


@settings(max_examples=30, deadline=None, database=None)
@given(
    verb=st.sampled_from([b"MAIL FROM:", b"RCPT TO:"]),
    data=st.data(),
)
def test_every_routing_trick_is_refused_at_mail_and_rcpt(bed, verb, data):
    """A certainly invalid path in MAIL or RCPT is refused (never 250), pipelined or not."""
    address = SENDER if verb == b"MAIL FROM:" else RECIPIENT
    tricks = data.draw(st.lists(tricky_path(address), min_size=1, max_size=5))
    lines = [(b"MAIL FROM:<" + SENDER + b">", "valid")] if verb == b"RCPT TO:" else []
    lines += [(verb + path, "invalid") for path in tricks]
    runner = Runner(bed.port, bed.setup.client_context)
    try:
        runner.opening(use_tls=True)
        runner.command(EHLO, label="valid")
        runner.pipeline(tuple(lines))
        runner.finish()
    finally:
        runner.client.close()


def test_fuzz_model_classifies_known_paths():
    """The test's own model: the valid envelope is valid; every trick path is invalid."""
    for verb, arg in ((b"MAIL", b"FROM:<" + SENDER + b">"), (b"RCPT", b"TO:<" + RECIPIENT + b">")):
        assert certainly_invalid(verb, arg, smtputf8=False) is False
    for path in TRICK_PATHS:
        assert certainly_invalid(b"RCPT", b"TO:" + path, smtputf8=False) is True
    assert body_is_clean(CLEAN_BODY) is True
    assert body_is_clean(b"a\nb\r\n") is False
    assert frame_body(b".\r\n") == b"..\r\n\r\n.\r\n"


def test_daemon_survives_fuzzing_and_still_delivers(bed):
    """After the fuzzing: still running, 220 to a new connection, a valid message delivered."""
    process = bed.process
    assert process.proc is not None
    assert process.proc.poll() is None
    with socket.create_connection(("127.0.0.1", bed.port), timeout=READ_TIMEOUT) as sock:
        assert sock.recv(1024).startswith(b"220 ")
    token = uuid.uuid4().hex
    message = f"Subject: after fuzzing {token}\r\n\r\nstill here\r\n".encode()
    seen = smtp_send(
        bed.port, bed.setup.client_context, SENDER.decode(), [RECIPIENT.decode()], message
    )
    assert seen.code("data") == 250
    assert "queued as SG-" in seen.text("data")
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if any(token.encode() in m.content for m in list(bed.receiver.handler.messages)):
            break
        time.sleep(0.05)
    assert any(token.encode() in m.content for m in list(bed.receiver.handler.messages))
    assert process.terminate() == 0
    assert new_output(process, 0) == []
    events = [e.get("event") for e in process.events()]
    assert "session_error" not in events


def wait_for_event(process: GatewayProcess, start: int, event: str, timeout: float) -> bool:
    """Tell whether the daemon logs `event` within `timeout` seconds after output line `start`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(f'"event": "{event}"' in line for line in process.output[start:]):
            return True
        time.sleep(0.05)
    return False


def test_abandoned_starttls_handshake_is_not_a_session_error(tmp_path, ca, bed):
    """A client that sends plain text after 220 to STARTTLS is closed without an error event."""
    setup = make_setup(tmp_path, ca, receiver_port=bed.receiver.port)
    process = GatewayProcess(setup)
    port = process.start()
    try:
        client = Client(port)
        try:
            assert (client.reply() or [""])[-1].startswith("220 ")
            client.send(b"EHLO agency.test\r\nSTARTTLS\r\n")
            assert (client.reply() or [""])[-1].startswith("250 ")
            assert (client.reply() or [""])[-1].startswith("220 ")
            client.send(b"QUIT\r\n")  # plain text where the TLS ClientHello should be
        finally:
            client.close()
        assert wait_for_event(process, 0, "session_error", timeout=3) is False
    finally:
        assert process.terminate() == 0
