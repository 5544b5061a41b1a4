"""Acceptance benchmark: N messages over C concurrent connections through a real gateway.

    .venv/bin/python bench/accept.py --messages 500 --concurrency 50 [--json]

Everything is built from nothing in a temporary folder and torn down afterwards: a trustme CA,
a complete gateway setup (tests.harness.make_setup), a TLS receiving sink in this process
(aiosmtpd, STARTTLS with a certificate from the same CA) and the gateway itself as a real
subprocess (tests.harness.GatewayProcess), so its CPU time and memory are measured apart from
the load generator's. Loopback only.

The load generator is aiosmtplib with C workers; every message has its own connection:
connect, EHLO, STARTTLS (verified against the test CA), EHLO, MAIL, RCPT to a secure domain,
DATA with a ~4 KiB message, QUIT. Per message it measures

- "end of DATA to 250": the time around aiosmtplib's `data()` call. That call sends DATA, waits
  for the 354, writes the body and the final ".", then waits for the 250, so the figure also
  includes one DATA/354 round trip and handing ~4 KiB to the kernel (microseconds on loopback);
  it is an upper bound on the gateway's spool + audit + decision time;
- "connect to 250": from opening the TCP connection to the 250 after DATA (QUIT excluded).

Figures printed: accepted/s (250s over the wall time of the sending phase), delivered/s
(messages received by the sink, from the start of sending to the last delivery; the wait is
bounded by --timeout), latency percentiles, the gateway's CPU milliseconds per accepted message
(utime + stime of the gateway process, all its threads, from /proc, over the sending and
delivery phases), its peak RSS (VmHWM), the load generator's own CPU (if it is near one core per
second of wall time, the client is the bottleneck, not the gateway), every non-250 reply by step
and code, client-side exceptions, and the gateway's warning/error log events.

The sink shares this process's event loop with the load generator, so under heavy load its
work adds to the measured client-side latencies as well.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import resource
import socket
import ssl
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiosmtplib
import trustme
from aiosmtpd.smtp import SMTP, Envelope, Session
from common import (
    DECISION_HEADER,
    FILLER_LINE,
    RECIPIENT,
    SENDER,
    Results,
    bench_id,
    log_problems,
    make_head,
    stop_gateway,
)
from procstat import (
    cpu_seconds,
    latencies_ms,
    proc_kib,
)

# Importable once `common` has put the project root on sys.path.
from tests.harness import GatewayProcess, make_setup, without_dkim

CLIENT_TIMEOUT = 30.0


# -- the sink -----------------------------------------------------------------------------------


@dataclass
class Sink:
    """An aiosmtpd handler that counts what the gateway delivers and when."""

    ids: set[bytes] = field(default_factory=set)
    received: int = 0
    without_decision: int = 0
    last_at: float = 0.0
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    async def handle_DATA(  # noqa: N802 (aiosmtpd hook name)
        self, _server: SMTP, _session: Session, envelope: Envelope
    ) -> str:
        content = envelope.original_content or b""
        self.received += 1
        self.last_at = time.perf_counter()
        if not without_dkim(content).startswith(DECISION_HEADER):
            self.without_decision += 1
        if (tag := bench_id(content)) is not None:
            self.ids.add(tag)
        self.changed.set()
        return "250 2.0.0 Ok: sunk"


async def start_sink(context: ssl.SSLContext, sink: Sink) -> asyncio.Server:
    loop = asyncio.get_running_loop()
    return await loop.create_server(
        lambda: SMTP(sink, tls_context=context, hostname="localhost", ident="bench sink"),
        "127.0.0.1",
        0,
    )


# -- the gateway process ------------------------------------------------------------------------


def peak_rss_mb(pid: int) -> float:
    """VmHWM of a process in MiB, from /proc/<pid>/status."""
    return proc_kib(f"/proc/{pid}/status", "VmHWM:") / 1024


# -- the load generator -------------------------------------------------------------------------


def make_message(number: int) -> bytes:
    """A plain ~4 KiB message carrying its number in a header the sink reads back."""
    head = make_head(str(number))
    return head + FILLER_LINE * ((4096 - len(head)) // len(FILLER_LINE) + 1)


def set_nodelay(client: aiosmtplib.SMTP) -> None:
    """TCP_NODELAY on the client socket (asyncio already sets it; made explicit here)."""
    transport = client.transport
    sock = transport.get_extra_info("socket") if transport is not None else None
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


async def send_one(port: int, context: ssl.SSLContext, message: bytes, results: Results) -> None:
    step = "connect"
    client = aiosmtplib.SMTP(
        hostname="127.0.0.1",
        port=port,
        local_hostname="agency.test",
        start_tls=False,
        tls_context=context,
        timeout=CLIENT_TIMEOUT,
    )
    started = time.perf_counter()
    results.attempted += 1
    if not results.first_start:
        results.first_start = started
    try:
        await client.connect()
        set_nodelay(client)
        step = "ehlo"
        await client.ehlo()
        step = "starttls"
        await client.starttls()
        step = "ehlo2"
        await client.ehlo()
        step = "mail"
        await client.mail(SENDER)
        step = "rcpt"
        await client.rcpt(RECIPIENT)
        step = "data"
        before_data = time.perf_counter()
        reply = await client.data(message)
        done = time.perf_counter()
        if reply.code != 250:
            results.replies[f"data {reply.code}"] += 1
            return
        results.accepted += 1
        results.data_s.append(done - before_data)
        results.total_s.append(done - started)
        results.last_end = max(results.last_end, done)
        step = "quit"
        with contextlib.suppress(aiosmtplib.SMTPException, OSError):
            await client.quit()
    except aiosmtplib.SMTPResponseException as exc:
        results.refused(step, exc.code, f"{exc.code} {exc.message}")
    except (aiosmtplib.SMTPException, OSError, TimeoutError) as exc:
        results.failed(step, exc)
    finally:
        client.close()


async def run_load(
    port: int, context: ssl.SSLContext, messages: int, concurrency: int, results: Results
) -> None:
    numbers = iter(range(messages))

    async def worker() -> None:
        for number in numbers:
            await send_one(port, context, make_message(number), results)

    async with asyncio.TaskGroup() as group:
        for _ in range(min(concurrency, messages)):
            group.create_task(worker())


# -- the whole run ------------------------------------------------------------------------------


async def bench(messages: int, concurrency: int, budget: float) -> dict[str, object]:
    """Set up, run, measure and tear down; `budget` bounds the whole run in seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + budget
    ca = trustme.CA()
    with tempfile.TemporaryDirectory(prefix="gateway-bench-") as tmp:
        root = Path(tmp)
        sink_cert = ca.issue_cert("localhost", "127.0.0.1")
        sink_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        sink_cert.configure_cert(sink_context)
        sink = Sink()
        sink_server = await start_sink(sink_context, sink)
        sink_port = sink_server.sockets[0].getsockname()[1]
        process: GatewayProcess | None = None
        try:
            setup = make_setup(root / "gateway", ca, receiver_port=sink_port)
            process = GatewayProcess(setup)
            port = await asyncio.to_thread(process.start)
            if process.proc is None:
                raise RuntimeError("gateway did not start")
            pid = process.proc.pid
            return await measure(
                process,
                pid=pid,
                port=port,
                context=setup.client_context,
                sink=sink,
                messages=messages,
                concurrency=concurrency,
                deadline=deadline,
            )
        finally:
            if process is not None:
                await asyncio.to_thread(stop_gateway, process)
            sink_server.close()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(sink_server.wait_closed(), 5)


async def measure(
    process: GatewayProcess,
    *,
    pid: int,
    port: int,
    context: ssl.SSLContext,
    sink: Sink,
    messages: int,
    concurrency: int,
    deadline: float,
) -> dict[str, object]:
    loop = asyncio.get_running_loop()
    results = Results()
    cpu_before = cpu_seconds(pid, reaped=False)
    own_before = resource.getrusage(resource.RUSAGE_SELF)
    load = loop.create_task(run_load(port, context, messages, concurrency, results))
    timed_out = False
    try:
        await asyncio.wait_for(asyncio.shield(load), max(0.0, deadline - loop.time()))
    except TimeoutError:
        timed_out = True
        load.cancel()
        with contextlib.suppress(asyncio.CancelledError, BaseExceptionGroup):
            await load
    sent_end = time.perf_counter()
    while sink.received < results.accepted and loop.time() < deadline:
        sink.changed.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(sink.changed.wait(), max(0.0, deadline - loop.time()))
    if sink.received < results.accepted:
        timed_out = True
    cpu_after = cpu_seconds(pid, reaped=False)
    own_after = resource.getrusage(resource.RUSAGE_SELF)
    rss = peak_rss_mb(pid)

    start = results.first_start or sent_end
    send_wall = (results.last_end or sent_end) - start
    deliver_wall = (sink.last_at - start) if sink.received else 0.0
    per_message = (cpu_after - cpu_before) / results.accepted if results.accepted else None
    own_cpu = (own_after.ru_utime - own_before.ru_utime) + (
        own_after.ru_stime - own_before.ru_stime
    )
    problems, samples = log_problems(process.output, width=None)
    return {
        "messages": messages,
        "concurrency": concurrency,
        "attempted": results.attempted,
        "unfinished": results.attempted
        - results.accepted
        - results.replies.total()
        - results.errors.total(),
        "accepted": results.accepted,
        "delivered": sink.received,
        "delivered_distinct": len(sink.ids),
        "delivered_without_decision_header": sink.without_decision,
        "timed_out": timed_out,
        "send_wall_s": round(send_wall, 3),
        "deliver_wall_s": round(deliver_wall, 3),
        "accepted_per_s": round(results.accepted / send_wall, 1) if send_wall > 0 else None,
        "delivered_per_s": round(sink.received / deliver_wall, 1) if deliver_wall > 0 else None,
        "data_to_250_ms": latencies_ms(results.data_s, mean=True),
        "connect_to_250_ms": latencies_ms(results.total_s),
        "gateway_cpu_ms_per_message": round(per_message * 1000, 2) if per_message else None,
        "gateway_cpu_s": round(cpu_after - cpu_before, 2),
        "gateway_peak_rss_mb": round(rss, 1),
        "loadgen_cpu_s": round(own_cpu, 2),
        "non_250_replies": dict(results.replies),
        "client_errors": dict(results.errors),
        "first_error_text": results.first_error,
        "gateway_log_problems": problems,
        "gateway_log_samples": samples,
    }


def render(report: dict[str, object]) -> str:
    data: Any = report["data_to_250_ms"]
    total: Any = report["connect_to_250_ms"]
    lines = [
        (
            f"messages            {report['messages']} (attempted {report['attempted']}, "
            f"unfinished {report['unfinished']}, accepted {report['accepted']}, "
            f"delivered {report['delivered']}, "
            f"distinct {report['delivered_distinct']})"
        ),
        f"concurrency         {report['concurrency']}",
        (
            f"wall time           send {report['send_wall_s']} s, "
            f"send+deliver {report['deliver_wall_s']} s"
            f"{'  (TIMED OUT: partial results)' if report['timed_out'] else ''}"
        ),
        f"accepted/s          {report['accepted_per_s']}",
        f"delivered/s         {report['delivered_per_s']}",
        f"end of DATA -> 250  p50 {data['p50']} ms, p99 {data['p99']} ms, max {data['max']} ms",
        f"connect -> 250      p50 {total['p50']} ms, p99 {total['p99']} ms, max {total['max']} ms",
        (
            f"gateway CPU         {report['gateway_cpu_ms_per_message']} ms/message "
            f"({report['gateway_cpu_s']} s total)"
        ),
        f"gateway peak RSS    {report['gateway_peak_rss_mb']} MB",
        f"load generator CPU  {report['loadgen_cpu_s']} s",
        f"non-250 replies     {report['non_250_replies'] or 'none'}",
        f"client errors       {report['client_errors'] or 'none'}",
    ]
    if report["first_error_text"]:
        lines.append(f"first error text    {report['first_error_text']}")
    if report["delivered_without_decision_header"]:
        lines.append(
            f"WITHOUT DECISION    {report['delivered_without_decision_header']} delivered messages"
        )
    lines.append(f"gateway log         {report['gateway_log_problems'] or 'no warnings or errors'}")
    samples: Any = report["gateway_log_samples"]
    lines.extend(f"  {sample}" for sample in samples)
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--messages", type=int, default=500, help="messages to send (500)")
    parser.add_argument("--concurrency", type=int, default=20, help="connections at once (20)")
    parser.add_argument("--timeout", type=float, default=120.0, help="overall bound, s (120)")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = parser.parse_args()
    if args.messages < 1 or args.concurrency < 1 or args.timeout <= 0:
        parser.error("--messages and --concurrency must be >= 1, --timeout > 0")
    logging.getLogger("mail.log").setLevel(logging.WARNING)
    report = asyncio.run(bench(args.messages, args.concurrency, args.timeout))
    print(json.dumps(report, indent=2) if args.json else render(report))
    return 0 if report["accepted"] == args.messages and not report["timed_out"] else 1


if __name__ == "__main__":
    sys.exit(main())
