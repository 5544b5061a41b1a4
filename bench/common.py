"""What the benchmarks in bench/ share: set-up, a small SMTP client, helpers (and procstat.py:
figures from /proc).

bench/ is not a package. `python bench/x.py` puts bench/ first on sys.path (a script's own
folder), so a script imports this module as `common`; importing it puts the project root (ROOT)
on sys.path too, so that `tests.harness` and `gateway` import after it. bench/floor.py does not
import it: the floor is measured, and this module's code would count in its memory.

- set-up: ROOT; the envelope every benchmark sends (SENDER, RECIPIENT); the header section of
  a message carrying an X-Bench-Id (make_head) and reading it back (header_section, bench_id);
  certificate files issued by a trustme CA (write_cert_files) and a server's TLS context made
  from them (server_context); the soft limit on open files raised (raise_nofile);
- the load: Client, a minimal SMTP client on asyncio streams (TCP_NODELAY, and TCP_QUICKACK
  after every write on request), RefusedError, Outcomes (replies and exceptions by step, and
  `recording`, which counts them) and Results (the latencies of accepted messages as well);
- the receiving side: CountingSink, an aiosmtpd handler counting what it is delivered;
- helper subprocesses (a sink, a downstream): HelperProcess starts this script again and asks
  it over pipes; answer_requests is the other end;
- the gateway: log_event (one JSON log line), log_problems (its warnings and errors) and
  stop_gateway (by its own PID).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import resource
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:
    import trustme
    from aiosmtpd.smtp import SMTP, Envelope, Session

    from tests.harness import GatewayProcess

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

SENDER = "duty.officer@bromley.gcsx.gov.uk"
RECIPIENT = "lead@nhs.net"
BENCH_HEADER = b"X-Bench-Id: "
DECISION_HEADER = b"X-Safeguarding-Decision: "
FILLER_LINE = b"Lorem ipsum dolor sit amet, consectetur adipiscing elit, sed do eiusmod tempor.\r\n"


# -- set-up -------------------------------------------------------------------------------------


def make_head(tag: str, kind: str = "bench") -> bytes:
    """The header section of a plain message carrying `tag` in X-Bench-Id (and its subject)."""
    return (
        f"From: Duty Officer <{SENDER}>\r\n"
        f"To: Safeguarding Lead <{RECIPIENT}>\r\n"
        f"Subject: OFFICIAL-SENSITIVE {kind} message {tag}\r\n"
        f"Message-ID: <{kind}-{tag}@bromley.gcsx.gov.uk>\r\n"
        "Date: Tue, 25 Nov 2025 03:42:30 +0000\r\n"
        "MIME-Version: 1.0\r\n"
        "Content-Type: text/plain; charset=us-ascii\r\n"
        f"X-Bench-Id: {tag}\r\n"
        "\r\n"
    ).encode()


def header_section(content: bytes) -> bytes:
    """The header lines of a received message (looked for in its first 256 KiB), or b""."""
    end = content.find(b"\r\n\r\n", 0, 256 * 1024)
    return content[: end + 2] if end >= 0 else b""


def bench_id(head: bytes) -> bytes | None:
    """The value of the first X-Bench-Id header in `head`, or None."""
    start = head.find(BENCH_HEADER)
    if start < 0:
        return None
    return head[start + len(BENCH_HEADER) : head.find(b"\r\n", start)]


def write_cert_files(ca: trustme.CA, folder: Path) -> None:
    """Make `folder` with cert.pem and key.pem: a certificate for localhost and 127.0.0.1."""
    folder.mkdir()
    cert = ca.issue_cert("localhost", "127.0.0.1")
    cert.private_key_pem.write_to_path(str(folder / "key.pem"))
    cert.cert_chain_pems[0].write_to_path(str(folder / "cert.pem"))


def server_context(folder: Path) -> ssl.SSLContext:
    """A server's TLS context with the certificate and key written by write_cert_files."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(str(folder / "cert.pem"), str(folder / "key.pem"))
    return context


def raise_nofile() -> int:
    """Raise the soft limit on open files to the hard limit; return the soft limit now."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = hard if hard != resource.RLIM_INFINITY else max(soft, 65536)
    if soft < want:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


# -- the load -----------------------------------------------------------------------------------

EHLO = b"EHLO agency.test\r\n"
MAIL = f"MAIL FROM:<{SENDER}>\r\n".encode()
RCPT = f"RCPT TO:<{RECIPIENT}>\r\n".encode()


class RefusedError(Exception):
    """A reply other than the one expected."""

    def __init__(self, step: str, code: int, text: str) -> None:
        super().__init__(f"{step} {code} {text}")
        self.step, self.code, self.text = step, code, text


class Client:
    """A minimal SMTP client on asyncio streams (cheap on CPU: no per-command machinery).

    It sets TCP_NODELAY and, with `quickack`, TCP_QUICKACK after connecting, after every write
    and after the TLS handshake. `step` names the step in hand ("connect", "greeting", "ehlo",
    "starttls", "ehlo2", "mail", "rcpt", "data", ...), for reports of what failed where.
    """

    def __init__(self, quickack: bool = False) -> None:
        self.quickack = quickack
        self.step = "connect"
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None
        self.sock: Any = None

    def _ack_now(self) -> None:
        if self.quickack and self.sock is not None:
            with contextlib.suppress(OSError):
                self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK, 1)

    def _writer(self) -> asyncio.StreamWriter:
        if self.writer is None:
            raise ConnectionError("not connected")
        return self.writer

    async def connect(self, port: int) -> None:
        self.step = "connect"
        self.reader, self.writer = await asyncio.open_connection("127.0.0.1", port)
        self.sock = self.writer.get_extra_info("socket")
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._ack_now()

    async def _lines(self, step: str) -> list[bytes]:
        self.step = step
        if self.reader is None:
            raise ConnectionError("not connected")
        lines = []
        while True:
            line = await self.reader.readline()
            if not line.endswith(b"\n"):
                raise ConnectionError(f"connection closed at {step}")
            lines.append(line)
            if line[3:4] != b"-":
                return lines

    async def reply(self, step: str) -> tuple[int, str]:
        """The next reply: its code and its text."""
        lines = await self._lines(step)
        return int(lines[-1][:3]), b"".join(lines).decode("utf-8", "replace").strip()

    async def expect(self, step: str, code: int) -> None:
        """Read the next reply; RefusedError unless its code is `code`."""
        lines = await self._lines(step)
        got = int(lines[-1][:3])
        if got != code:
            raise RefusedError(step, got, b"".join(lines).decode("utf-8", "replace").strip())

    async def command(self, step: str, data: bytes, code: int) -> None:
        """Write `data`, then expect `code`."""
        self.step = step
        self._writer().write(data)
        self._ack_now()
        await self.expect(step, code)

    async def starttls(self, context: ssl.SSLContext) -> None:
        await self.command("starttls", b"STARTTLS\r\n", 220)
        await self._writer().start_tls(context, server_hostname="localhost")
        self._ack_now()

    async def hello(self, port: int, context: ssl.SSLContext) -> None:
        """Connect, greeting, EHLO, STARTTLS (verified with `context`, for localhost), EHLO."""
        await self.connect(port)
        await self.expect("greeting", 220)
        await self.command("ehlo", EHLO, 250)
        await self.starttls(context)
        await self.command("ehlo2", EHLO, 250)

    async def envelope(self) -> None:
        """MAIL from SENDER, RCPT to RECIPIENT, DATA up to its 354."""
        await self.command("mail", MAIL, 250)
        await self.command("rcpt", RCPT, 250)
        await self.command("data", b"DATA\r\n", 354)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.transport.abort()


@dataclass
class Outcomes:
    """What went wrong on the client side, by step, with the first text of each kind."""

    text_width: ClassVar[int | None] = None  # first texts are cut to this many characters

    attempted: int = 0
    replies: Counter[str] = field(default_factory=Counter)  # unexpected replies, "step code"
    errors: Counter[str] = field(default_factory=Counter)  # exceptions, "step Type"
    first_error: dict[str, str] = field(default_factory=dict)

    def refused(self, step: str, code: int, text: str) -> None:
        """Count a reply other than the one expected."""
        key = f"{step} {code}"
        self.replies[key] += 1
        self.first_error.setdefault(key, text[: self.text_width])

    def failed(self, step: str, exc: BaseException) -> None:
        """Count a client-side exception."""
        key = f"{step} {type(exc).__name__}"
        self.errors[key] += 1
        self.first_error.setdefault(key, (str(exc) or type(exc).__name__)[: self.text_width])

    @contextlib.contextmanager
    def recording(self, client: Client) -> Iterator[None]:
        """Count a refusal or a client-side exception in the block (at `client.step`), then
        close the client; anything else propagates."""
        try:
            yield
        except RefusedError as exc:
            self.refused(exc.step, exc.code, exc.text)
        except (OSError, ssl.SSLError, TimeoutError, ValueError) as exc:
            self.failed(client.step, exc)
        finally:
            client.close()


@dataclass
class Results(Outcomes):
    """Outcomes, and per accepted message: end of DATA -> 250 and connect -> 250, seconds."""

    data_s: list[float] = field(default_factory=list)
    total_s: list[float] = field(default_factory=list)
    accepted: int = 0
    first_start: float = 0.0
    last_end: float = 0.0


# -- the receiving side -------------------------------------------------------------------------


@dataclass
class CountingSink:
    """An aiosmtpd handler counting what it is delivered; it keeps no bodies.

    Messages received, distinct ones by X-Bench-Id (and by phase: the id up to its last "-"),
    those without one, those with the gateway's decision header, those that start with a DKIM
    signature, the largest, and when the last came (time.monotonic).
    """

    received: int = 0
    ids: set[bytes] = field(default_factory=set)
    by_phase: Counter[str] = field(default_factory=Counter)
    without_tag: int = 0
    decision: int = 0
    dkim: int = 0
    largest: int = 0
    last_at: float = 0.0

    async def handle_DATA(  # noqa: N802 (aiosmtpd hook name)
        self, _server: SMTP, _session: Session, envelope: Envelope
    ) -> str:
        content = envelope.original_content or b""
        self.last_at = time.monotonic()
        self.received += 1
        self.largest = max(self.largest, len(content))
        head = header_section(content)
        self.decision += DECISION_HEADER in head
        self.dkim += head.startswith(b"DKIM-Signature:")
        tag = bench_id(head)
        if tag is None:
            self.without_tag += 1
        elif tag not in self.ids:
            self.ids.add(tag)
            self.by_phase[tag.rsplit(b"-", 1)[0].decode("ascii", "replace")] += 1
        return "250 2.0.0 Ok: sunk"


# -- helper subprocesses ------------------------------------------------------------------------


class HelperProcess:
    """A helper subprocess: `python script arguments`, asked over pipes, stopped by its PID.

    It prints one JSON line when it is ready (kept in `ready`, e.g. its ports), then answers
    every request line on its stdin with one JSON line (see answer_requests); it stops when its
    stdin closes, or else by SIGTERM, then SIGKILL.
    """

    def __init__(
        self, script: str, arguments: list[str], *, name: str, stderr: Path | None = None
    ) -> None:
        self.stderr = stderr.open("wb") if stderr is not None else None
        self.proc = subprocess.Popen(
            [sys.executable, str(Path(script).resolve()), *arguments],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.stderr,
            text=True,
        )
        if self.proc.stdin is None or self.proc.stdout is None:
            raise RuntimeError(f"no pipes to {name}")
        self.stdin, self.stdout = self.proc.stdin, self.proc.stdout
        self.lock = threading.Lock()
        line = self.stdout.readline()
        if not line:
            self.stop()
            raise RuntimeError(f"{name} did not start")
        self.ready: dict[str, Any] = json.loads(line)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def ask(self, request: str) -> dict[str, Any]:
        with self.lock:
            self.stdin.write(request + "\n")
            self.stdin.flush()
            answer: dict[str, Any] = json.loads(self.stdout.readline())
        return answer

    def stop(self) -> None:
        with contextlib.suppress(OSError):
            self.stdin.close()
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        if self.stderr is not None:
            self.stderr.close()


async def answer_requests(ready: object, requests: Mapping[str, Callable[[], object]]) -> None:
    """The helper's end: print `ready`, answer request lines on stdin until EOF or an unknown one.

    Each answer is taken in this event loop's thread (where the SMTP handlers change the
    counts) and printed as one JSON line.
    """
    loop = asyncio.get_running_loop()
    print(json.dumps(ready), flush=True)
    done = asyncio.Event()

    async def take(request: str) -> object:
        return requests[request]()

    def answer() -> None:
        for line in sys.stdin:
            if line.strip() not in requests:
                break
            state = asyncio.run_coroutine_threadsafe(take(line.strip()), loop).result(30)
            print(json.dumps(state), flush=True)
        loop.call_soon_threadsafe(done.set)

    threading.Thread(target=answer, daemon=True).start()
    await done.wait()


# -- the gateway --------------------------------------------------------------------------------


PROBLEM_LEVELS = frozenset({"warning", "error", "critical"})


def log_event(line: str) -> tuple[str, str, dict[str, Any]] | None:
    """The level, the event name and the whole event of a JSON log line; None if not JSON."""
    try:
        event = json.loads(line)
    except ValueError:
        return None
    return str(event.get("level", "")), str(event.get("event", "")), event


def log_problems(lines: list[str], width: int | None = 300) -> tuple[dict[str, int], list[str]]:
    """Warning/error events (and deferrals) by level:event, with the first line of each kind.

    `lines` is the gateway's output (JSON lines); each sample line is cut to `width` characters.
    """
    counts: Counter[str] = Counter()
    samples: list[str] = []
    for line in list(lines):
        if (parsed := log_event(line)) is None:
            kind = "unparsed_output"
        else:
            level, name, _ = parsed
            if level not in PROBLEM_LEVELS and name != "message_deferred":
                continue
            kind = f"{level}:{name}"
        if kind not in counts:
            samples.append(line.rstrip()[:width])
        counts[kind] += 1
    return dict(counts), samples


def stop_gateway(process: GatewayProcess, *, quiet: bool = False) -> int:
    """SIGTERM to the gateway's own PID (SIGKILL if it does not stop); its exit status.

    Unless `quiet`, a status other than 0 is printed on stderr with the last output lines.
    """
    try:
        status = process.terminate()
    except Exception:  # noqa: BLE001 (a stuck gateway must still be reaped)
        process.kill()
        status = -9
    if status != 0 and not quiet:
        tail = "".join(process.output[-20:])
        print(f"gateway exited with status {status}; last output:\n{tail}", file=sys.stderr)
    return status
