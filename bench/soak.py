"""Soak: many concurrent sessions for a long time against a slow downstream that fails often.

    .venv/bin/python bench/soak.py [--sessions 500] [--duration 600] [--dwell 20] [--json]

The issue's soak run: "500 concurrent sessions for 10 minutes with a downstream that is slow and
fails half its connections: no error the clients did not cause, memory flat, queue drains
afterwards." Everything is built from nothing in a temporary folder and torn down afterwards:

- a trustme CA; a certificate for "localhost"/127.0.0.1 for the downstream (and one for the
  gateway, from tests.harness.make_setup);
- the downstream, in a process of its own: aiosmtpd with STARTTLS required, slow (it waits
  --greeting-delay before its greeting and --data-delay before answering the end of data) and
  failing every second connection it accepts, in turn: 421 at the greeting; the connection
  dropped at RCPT; 451 to the end of data (that connection then goes on normally); the
  connection dropped after the final dot, without a reply. It keeps that last message (as a
  server that crashed after storing it would), so the gateway's outcome is "ambiguous" and its
  retry may legitimately deliver a duplicate. It counts the messages it answered 250 after the
  dot, by the unique X-Bench-Id header the load puts in each;
- the gateway as a real subprocess (tests.harness.GatewayProcess): max_connections and
  max_connections_per_address at --sessions + 50 (every client comes from 127.0.0.1), the
  retry schedule --retry-schedule (1,2,5), delivery concurrency --delivery-concurrency, the
  metrics endpoint on a loopback port (for `gateway_sessions_active`), all routes to the
  downstream.

The load keeps --sessions sessions going for --duration seconds (started evenly over --ramp
seconds). Each session loops: connect, EHLO, STARTTLS (verified against the CA for
"localhost"), EHLO, idle for half its dwell, MAIL, RCPT lead@nhs.net, DATA, a 4 KiB message,
idle for the other half, QUIT, then a think time. The dwell is uniform in [0.5, 1.5] x --dwell
(20 s; each half stays under the gateway's 60 s idle_timeout), the think time uniform in
[0.5, 1.5] x --think (1 s, at least 50 ms). So each session is connected about
dwell / (dwell + think) of the time: with the defaults about 95 % of --sessions connections are
open at any moment while the message rate stays sane for 2 cores (--sessions / (dwell + think),
about 24 messages/s). Every reply other than the expected one is counted by step and code,
every exception by step and type; each message has 60 s plus its dwell, or it counts as a
timeout. "connect -> 250" leaves the dwell out. When the duration is over, sessions finish the
message in hand and stop.

Delivery: with the downstream's delays a delivery attempt takes 0.2 to 0.8 s and half of them
fail, so the gateway's default 20 deliveries at once carry roughly 15 to 20 messages/s;
--delivery-concurrency is 50 here so that the queue can keep up with the load and drain. Set it
to 20 to see the default config fall behind (the backlog column then grows).

Every --sample seconds (5): the gateway's PSS (smaps_rollup summed over its process tree), its
open file descriptors (/proc/<pid>/fd), its SMTP sessions (metrics), the spool's active,
deferred and held entries (files in spool/active, spool/deferred, spool/held), messages
accepted by the load and answered 250 by the downstream. Printed per window (--window, 60 s;
shortened to a third of --duration for short runs): medians of PSS, fds, the gateway's sessions
and the load's open connections; the backlog (accepted by the gateway, not yet delivered) and
the spool's active + deferred entries at its end; accepted/s and delivered/s.
Flatness: median of the last load window over median of the second (the first is warm-up).

The gateway's log lines are tallied as they come (then dropped, so this process stays flat):
warnings and errors by event name, deferrals by reason. Expected, caused by the downstream:
`delivery_deferred` and `message_deferred` (info). Anything else at warning or above is
unexpected.

After the load: wait (at most --drain-timeout s) until the downstream has answered 250 to every
message the gateway accepted and the spool has no active or deferred entry. Then compare the
sets of references, report duplicates (an extra copy is explained when the downstream had kept
a copy of that message on a connection it dropped after the dot; two 250s for one message are
not explained), stop the gateway with SIGTERM (its own PID) and print the verdict. Exit 0 only
if: no client error, PSS growth and fd growth within --max-growth percent (fds: plus 20), fds
back within 10 of their level before the load once the drain is over and the gateway's idle
delivery connections (kept 30 s for reuse) have expired, drained in time, nothing missing, no
unexplained duplicate, no unexpected log warning or error, every delivered message stamped
with the decision header, and the gateway stopped with status 0.

Loopback only; the soft RLIMIT_NOFILE is raised to the hard limit first (the gateway inherits
it). Bounded: duration + 1.5 x dwell + 70 s for the load, --drain-timeout for the drain, 20 s
for each stop.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import math
import os
import random
import resource
import shutil
import ssl
import statistics
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import trustme
from aiosmtpd.smtp import SMTP, Envelope, Session
from common import (
    DECISION_HEADER,
    FILLER_LINE,
    PROBLEM_LEVELS,
    Client,
    HelperProcess,
    Outcomes,
    answer_requests,
    bench_id,
    header_section,
    log_event,
    make_head,
    raise_nofile,
    server_context,
    stop_gateway,
    write_cert_files,
)
from procstat import (
    cpu_seconds,
    descendants,
    latencies_ms,
    pss_kib,
)

# Importable once `common` has put the project root on sys.path.
from tests.harness import GatewayProcess, make_setup

MESSAGE_TIMEOUT = 60.0  # one whole message, connect to QUIT
MIN_PAUSE = 0.05  # between two messages of a session, whatever --think says
CONNECTION_MARGIN = 50
FD_SLACK = 20  # fds allowed on top of --max-growth percent (connections come and go)
FD_IDLE_SLACK = 10  # fds allowed above the pre-load level after the drain
POOL_EXPIRY = 35.0  # seconds after the drain before the last sample: idle connections expire
HARNESS_SCHEDULE = "retry_schedule = [1, 2]\n"
# Downstream fates, one per accepted connection in turn: every second one fails.
FATES = ("ok", "greeting_421", "ok", "drop_at_rcpt", "ok", "data_451", "ok", "drop_after_dot")
EXPECTED_EVENTS = {"delivery_deferred", "message_deferred"}  # caused by the downstream
HANG = 30.0  # a dropped connection's handler waits this long for its cancellation


# -- /proc (the rest: common) ---------------------------------------------------------------------


def fd_count(pids: list[int]) -> int:
    """Open file descriptors summed over `pids`."""
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError):
            total += sum(1 for _ in Path(f"/proc/{pid}/fd").iterdir())
    return total


# -- the downstream: a process of its own ----------------------------------------------------------


@dataclass
class Tally:
    """What the downstream did: connections by fate, messages by reference."""

    fates: Counter[str] = field(default_factory=Counter)
    accepted: Counter[str] = field(default_factory=Counter)  # 250 after the dot, per reference
    kept: Counter[str] = field(default_factory=Counter)  # kept, then dropped without a reply
    without_decision: int = 0


class Downstream(SMTP):
    """aiosmtpd with a fate per connection; the fate applies to its first transaction only."""

    def __init__(self, handler: Handler, fate: str, greeting_delay: float, **kwargs: Any) -> None:
        super().__init__(handler, **kwargs)
        self.fate = fate
        self.greeting_delay = greeting_delay

    async def _handle_client(self) -> None:
        await asyncio.sleep(self.greeting_delay)
        if self.fate == "greeting_421":
            await self.push("421 4.3.2 Service not available, closing transmission channel")
            if self.transport is not None:
                self.transport.close()
            return
        await super()._handle_client()

    def failing(self, fate: str) -> bool:
        """True (once) when this connection's fate is `fate`."""
        if self.fate != fate:
            return False
        self.fate = "ok"
        return True

    async def drop(self) -> None:
        """Close the connection without a reply; connection_lost cancels this handler."""
        if isinstance(self.transport, asyncio.Transport):
            self.transport.abort()
        await asyncio.sleep(HANG)


@dataclass
class Handler:
    """The downstream's hooks: slow, failing as the connection's fate says, counting."""

    tally: Tally
    data_delay: float

    async def handle_RCPT(  # noqa: N802 (aiosmtpd hook name)
        self, server: Downstream, _session: Session, envelope: Envelope, address: str, _opts: Any
    ) -> str:
        if server.failing("drop_at_rcpt"):
            await server.drop()
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 Ok"

    async def handle_DATA(  # noqa: N802 (aiosmtpd hook name)
        self, server: Downstream, _session: Session, envelope: Envelope
    ) -> str:
        await asyncio.sleep(self.data_delay)
        head = header_section(envelope.original_content or b"")
        tag = bench_id(head)
        ref = "?" if tag is None else tag.decode("ascii")
        if server.failing("data_451"):
            return "451 4.3.0 Temporary failure, try again later"
        if DECISION_HEADER not in head:
            self.tally.without_decision += 1
        if server.failing("drop_after_dot"):
            self.tally.kept[ref] += 1
            await server.drop()
        self.tally.accepted[ref] += 1
        return "250 2.0.0 Ok: stored"


def downstream_main(settings: dict[str, Any]) -> int:
    """Run the downstream, print its port, answer `stat` and `ids` lines on stdin."""
    logging.getLogger("mail.log").setLevel(logging.CRITICAL)
    context = server_context(Path(settings["folder"]))
    tally = Tally()
    handler = Handler(tally, settings["data_delay"])
    connections = iter(range(10**9))

    def protocol() -> Downstream:
        fate = FATES[next(connections) % len(FATES)]
        tally.fates[fate] += 1
        return Downstream(
            handler,
            fate,
            settings["greeting_delay"],
            tls_context=context,
            require_starttls=True,
            hostname="localhost",
            ident="slow failing downstream",
        )

    def stat() -> dict[str, Any]:
        return {
            "fates": dict(tally.fates),
            "accepted": tally.accepted.total(),
            "distinct": len(tally.accepted),
            "kept": tally.kept.total(),
            "without_decision": tally.without_decision,
        }

    def ids() -> dict[str, Any]:
        return {"accepted": dict(tally.accepted), "kept": dict(tally.kept)}

    async def serve() -> None:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(protocol, "127.0.0.1", 0, backlog=1024)
        port = server.sockets[0].getsockname()[1]
        await answer_requests({"port": port}, {"stat": stat, "ids": ids})

    asyncio.run(serve())
    return 0


class DownstreamProcess(HelperProcess):
    """The downstream subprocess: its port; ask it for `stat` or `ids`."""

    def __init__(self, settings: dict[str, Any], stderr: Path) -> None:
        super().__init__(
            __file__,
            ["--downstream", json.dumps(settings)],
            name="the downstream",
            stderr=stderr,
        )
        self.port: int = self.ready["port"]


# -- the load --------------------------------------------------------------------------------------


def make_message(ref: str) -> bytes:
    """A plain 4 KiB message carrying `ref` in a header the downstream reads back."""
    head = make_head(ref, "soak")
    return head + FILLER_LINE * ((4096 - len(head)) // len(FILLER_LINE))


@dataclass
class Load(Outcomes):
    """What the clients saw."""

    text_width: ClassVar[int | None] = 200

    accepted: set[str] = field(default_factory=set)
    in_flight: int = 0
    latencies: list[tuple[float, float]] = field(default_factory=list)  # (at, connect -> 250)


async def send_one(port: int, context: ssl.SSLContext, ref: str, load: Load, dwell: float) -> None:
    """One message on its own connection, idle for `dwell` / 2 before MAIL and before QUIT."""
    client = Client()
    started = time.monotonic()
    load.attempted += 1
    load.in_flight += 1
    try:
        with load.recording(client):
            async with asyncio.timeout(MESSAGE_TIMEOUT + dwell):
                await client.hello(port, context)
                client.step = "dwell"
                await asyncio.sleep(dwell / 2)
                started += dwell / 2  # connect -> 250 leaves the dwell out
                await client.envelope()
                await client.command("dot", make_message(ref) + b".\r\n", 250)
                done = time.monotonic()
                load.accepted.add(ref)
                load.latencies.append((done, done - started))
                client.step = "dwell"
                await asyncio.sleep(dwell / 2)
                await client.command("quit", b"QUIT\r\n", 221)
    finally:
        load.in_flight -= 1


async def session(
    number: int,
    *,
    port: int,
    context: ssl.SSLContext,
    load: Load,
    start: float,
    end: float,
    dwell: float,
    think: float,
) -> None:
    """One client's loop: a message (connected for about `dwell` s), a think time, until `end`."""
    await asyncio.sleep(max(0.0, start - time.monotonic()))
    for count in range(math.ceil((end - start) / MIN_PAUSE) + 1):
        if time.monotonic() >= end:
            return
        jitter = random.uniform(0.5, 1.5)
        await send_one(port, context, f"s{number}-{count}", load, jitter * dwell)
        pause = max(MIN_PAUSE, random.uniform(0.5, 1.5) * think)
        await asyncio.sleep(min(pause, max(0.0, end - time.monotonic())))


# -- the gateway -----------------------------------------------------------------------------------


def start_gateway(
    root: Path, ca: trustme.CA, port: int, args: argparse.Namespace
) -> GatewayProcess:
    limit = args.sessions + CONNECTION_MARGIN
    setup = make_setup(
        root,
        ca,
        receiver_port=port,
        server_extra=f"max_connections = {limit}\nmax_connections_per_address = {limit}",
        delivery_extra=f"concurrency = {args.delivery_concurrency}",
    )
    # make_setup writes its own retry schedule (a key cannot be given twice): replace it, and
    # open the metrics endpoint on a loopback port (a table of its own, at the end).
    text = setup.config_path.read_text()
    if HARNESS_SCHEDULE not in text:
        raise RuntimeError("tests.harness.make_setup no longer writes " + HARNESS_SCHEDULE)
    schedule = ", ".join(str(x) for x in args.retry_schedule)
    text = text.replace(HARNESS_SCHEDULE, f"retry_schedule = [{schedule}]\n")
    setup.config_path.write_text(text + '\n[metrics]\nlisten = "127.0.0.1:0"\n')
    config = setup.config
    if list(config.delivery.retry_schedule) != args.retry_schedule:
        raise RuntimeError(f"retry schedule not applied: {config.delivery.retry_schedule}")
    env = dict(item.split("=", 1) for item in args.gateway_env)
    process = GatewayProcess(setup, env=env)
    process.start()
    return process


def metrics_port(process: GatewayProcess) -> int | None:
    for event in process.events():
        if event.get("event") == "metrics_listening":
            return int(str(event["listen"]).rsplit(":", 1)[1])
    return None


async def sessions_active(port: int | None) -> float | None:
    """`gateway_sessions_active` from the metrics endpoint, or None."""
    if port is None:
        return None
    writer: asyncio.StreamWriter | None = None
    try:
        async with asyncio.timeout(5):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
            body = await reader.read()
    except (OSError, TimeoutError):
        return None
    finally:
        if writer is not None:
            writer.close()
    for line in body.decode("utf-8", "replace").splitlines():
        if line.startswith("gateway_sessions_active "):
            return float(line.split()[1])
    return None


def spool_counts(spool: Path) -> dict[str, int]:
    counts = {}
    for state in ("active", "deferred", "held"):
        try:
            counts[state] = sum(1 for e in os.scandir(spool / state) if e.name.endswith(".meta"))
        except OSError:
            counts[state] = -1
    return counts


@dataclass
class LogTally:
    """The gateway's log lines, tallied as they come and then dropped from its buffer."""

    process: GatewayProcess
    problems: Counter[str] = field(default_factory=Counter)  # level:event, warning and above
    deferrals: Counter[str] = field(default_factory=Counter)  # delivery_deferred by reason
    expected: Counter[str] = field(default_factory=Counter)
    samples: list[str] = field(default_factory=list)
    tail: list[str] = field(default_factory=list)
    lines: int = 0

    def take(self) -> None:
        """Tally the lines printed since the last call and drop them (keeping a short tail)."""
        output = self.process.output
        count = len(output)
        new = output[:count]
        del output[:count]  # the reader thread only appends: the lines after `count` stay
        for line in new:
            self._one(line)
        self.tail = (self.tail + new)[-20:]

    def _one(self, line: str) -> None:
        self.lines += 1
        if (parsed := log_event(line)) is None:
            kind = "unparsed_output"
        else:
            level, name, event = parsed
            if name in EXPECTED_EVENTS:
                self.expected[name] += 1
                if name == "delivery_deferred":
                    self.deferrals[str(event.get("reason"))] += 1
                return
            if level not in PROBLEM_LEVELS:
                return
            kind = f"{level}:{name}"
        if kind not in self.problems:
            self.samples.append(line.rstrip()[:300])
        self.problems[kind] += 1


# -- samples ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Sample:
    """One look at the gateway, the load and the downstream."""

    at: float  # seconds since the load started
    phase: str  # "idle" (before the load), "load", "finish", "drain" or "after"
    pss_kib: int
    fds: int
    sessions: float | None  # gateway_sessions_active
    queue: dict[str, int]  # spool entries by state
    accepted: int  # 250s seen by the load so far
    delivered: int  # distinct references the downstream answered 250 to
    in_flight: int  # connections the load has open (a message in hand)


def process_figures(pid: int) -> tuple[int, int]:
    pids = descendants(pid)
    return pss_kib(pids), fd_count(pids)


@dataclass
class Watch:
    """Everything the sampler needs, and what it collected."""

    pid: int
    metrics_port: int | None
    spool: Path
    downstream: DownstreamProcess
    load: Load
    logs: LogTally
    started: float
    phase: str = "idle"
    samples: list[Sample] = field(default_factory=list)

    async def sample(self) -> Sample:
        pss, fds = await asyncio.to_thread(process_figures, self.pid)
        queue = await asyncio.to_thread(spool_counts, self.spool)
        stat = await asyncio.to_thread(self.downstream.ask, "stat")
        await asyncio.to_thread(self.logs.take)
        taken = Sample(
            at=round(time.monotonic() - self.started, 1),
            phase=self.phase,
            pss_kib=pss,
            fds=fds,
            sessions=await sessions_active(self.metrics_port),
            queue=queue,
            accepted=len(self.load.accepted),
            delivered=stat["distinct"],
            in_flight=self.load.in_flight,
        )
        self.samples.append(taken)
        return taken

    def finish(self) -> None:
        """The duration is over: sessions finish the message in hand."""
        if self.phase == "load":
            self.phase = "finish"

    async def run(self, every: float, stop: asyncio.Event, limit: int) -> None:
        """Sample every `every` seconds until `stop` (at most `limit` samples)."""
        for _ in range(limit):
            await self.sample()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), every)
            if stop.is_set():
                return


# -- the run ---------------------------------------------------------------------------------------


async def soak(args: argparse.Namespace) -> dict[str, Any]:
    """Build everything, run, measure, tear down."""
    ca = trustme.CA()
    tmp = Path(tempfile.mkdtemp(prefix="gateway-soak-"))
    downstream: DownstreamProcess | None = None
    gateway: GatewayProcess | None = None
    try:
        write_cert_files(ca, tmp / "downstream")
        settings = {
            "folder": str(tmp / "downstream"),
            "greeting_delay": args.greeting_delay,
            "data_delay": args.data_delay,
        }
        downstream = await asyncio.to_thread(
            DownstreamProcess, settings, tmp / "downstream-stderr.txt"
        )
        gateway = await asyncio.to_thread(start_gateway, tmp / "gateway", ca, downstream.port, args)
        report = await run(args, gateway, downstream)
        stderr = (tmp / "downstream-stderr.txt").read_text(errors="replace").splitlines()
        report["downstream_stderr"] = {"lines": len(stderr), "tail": stderr[-5:]}
        return report
    finally:
        if gateway is not None and gateway.proc is not None and gateway.proc.poll() is None:
            await asyncio.to_thread(stop_gateway, gateway, quiet=True)
        if downstream is not None:
            await asyncio.to_thread(downstream.stop)
        shutil.rmtree(tmp, ignore_errors=True)


async def run(
    args: argparse.Namespace, gateway: GatewayProcess, downstream: DownstreamProcess
) -> dict[str, Any]:
    if gateway.proc is None:
        raise RuntimeError("the gateway did not start")
    pid = gateway.proc.pid
    load = Load()
    watch = Watch(
        pid=pid,
        metrics_port=metrics_port(gateway),
        spool=gateway.setup.config.spool_path,
        downstream=downstream,
        load=load,
        logs=LogTally(gateway),
        started=time.monotonic(),
    )
    idle = await watch.sample()
    cpu = {"gateway": cpu_seconds(pid), "downstream": cpu_seconds(downstream.proc.pid)}
    own = resource.getrusage(resource.RUSAGE_SELF)

    # The load, with the sampler beside it.
    started = watch.started = time.monotonic()
    watch.phase = "load"
    stop = asyncio.Event()
    bound = args.duration + 1.5 * args.dwell + MESSAGE_TIMEOUT + 10
    sampler = asyncio.create_task(
        watch.run(args.sample, stop, math.ceil((bound + args.drain_timeout) / args.sample) + 10)
    )
    end = started + args.duration
    # Sessions still finishing their message after the duration are sampled as "finish".
    asyncio.get_running_loop().call_later(args.duration, watch.finish)
    tasks = [
        asyncio.create_task(
            session(
                number,
                port=gateway.port,
                context=gateway.setup.client_context,
                load=load,
                start=started + number * args.ramp / args.sessions,
                end=end,
                dwell=args.dwell,
                think=args.think,
            )
        )
        for number in range(args.sessions)
    ]
    done, pending = await asyncio.wait(tasks, timeout=bound)
    for task in pending:
        task.cancel()
    await asyncio.gather(*pending, return_exceptions=True)
    crashed = Counter(
        type(task.exception()).__name__
        for task in done
        if not task.cancelled() and task.exception() is not None
    )
    load_end = time.monotonic()
    accepted = len(load.accepted)

    # The drain: every accepted message answered 250 downstream, no active or deferred entry.
    watch.phase = "drain"
    drained_after: float | None = None
    queue: dict[str, int] = {}
    for _ in range(math.ceil(args.drain_timeout) + 1):
        stat = await asyncio.to_thread(downstream.ask, "stat")
        queue = await asyncio.to_thread(spool_counts, watch.spool)
        if stat["distinct"] >= accepted and queue["active"] == 0 and queue["deferred"] == 0:
            drained_after = round(time.monotonic() - load_end, 1)
            break
        if time.monotonic() - load_end >= args.drain_timeout:
            break
        await asyncio.sleep(1)
    stop.set()
    await sampler
    # The gateway keeps idle delivery connections for reuse for 30 s (Deliverer's idle_reuse):
    # they are a cache, not a leak, so the last look at its fds comes after they expired.
    if drained_after is not None:
        await asyncio.sleep(POOL_EXPIRY)
    watch.phase = "after"
    after = await watch.sample()
    cpu = {
        "gateway": cpu_seconds(pid) - cpu["gateway"],
        "downstream": cpu_seconds(downstream.proc.pid) - cpu["downstream"],
    }
    own_after = resource.getrusage(resource.RUSAGE_SELF)
    cpu["load"] = own_after.ru_utime - own.ru_utime + own_after.ru_stime - own.ru_stime

    ids = await asyncio.to_thread(downstream.ask, "ids")
    stat = await asyncio.to_thread(downstream.ask, "stat")
    status = await asyncio.to_thread(stop_gateway, gateway, quiet=True)
    await asyncio.to_thread(watch.logs.take)
    return assess(
        args,
        watch=watch,
        idle=idle,
        after=after,
        crashed=crashed,
        cancelled=len(pending),
        load_s=load_end - started,
        drained_after=drained_after,
        queue=queue,
        ids=ids,
        stat=stat,
        status=status,
        cpu=cpu,
    )


def median(values: list[float]) -> float | None:
    return round(float(statistics.median(values)), 1) if values else None


def growth(first: float | None, last: float | None) -> float | None:
    return round((last - first) * 100 / first, 1) if first and last is not None else None


def series(samples: list[Sample], window: float) -> list[dict[str, Any]]:
    """Per window: medians of PSS, fds and sessions; backlog, queue and rates at its end."""
    rows: list[dict[str, Any]] = []
    previous: Sample | None = None
    for index in range(math.ceil(max((s.at for s in samples), default=0) / window) + 1):
        group = [s for s in samples if index * window <= s.at < (index + 1) * window]
        if not group:
            continue
        last = group[-1]
        span = last.at - previous.at if previous is not None else last.at
        rows.append(
            {
                "from_s": round(index * window),
                "phase": "+".join(dict.fromkeys(s.phase for s in group)),
                "pss_mib": round((median([s.pss_kib for s in group]) or 0) / 1024, 1),
                "fds": median([s.fds for s in group]),
                "sessions": median([s.sessions for s in group if s.sessions is not None]),
                "connected": median([s.in_flight for s in group]),
                "backlog": last.accepted - last.delivered,
                "queue": last.queue["active"] + last.queue["deferred"],
                "accepted_per_s": round(
                    (last.accepted - (previous.accepted if previous else 0)) / span, 1
                )
                if span > 0
                else None,
                "delivered_per_s": round(
                    (last.delivered - (previous.delivered if previous else 0)) / span, 1
                )
                if span > 0
                else None,
            }
        )
        previous = last
    return rows


def duplicates(ids: dict[str, dict[str, int]]) -> tuple[int, int, int]:
    """(extra copies, explained by a kept-then-dropped copy, references with two 250s)."""
    accepted, kept = ids["accepted"], ids["kept"]
    extra = explained = twice = 0
    for ref in set(accepted) | set(kept):
        copies = accepted.get(ref, 0) + kept.get(ref, 0)
        if copies > 1:
            extra += copies - 1
            explained += min(copies - 1, kept.get(ref, 0))
        twice += accepted.get(ref, 0) > 1
    return extra, explained, twice


def assess(
    args: argparse.Namespace,
    *,
    watch: Watch,
    idle: Sample,
    after: Sample,
    crashed: Counter[str],
    cancelled: int,
    load_s: float,
    drained_after: float | None,
    queue: dict[str, int],
    ids: dict[str, dict[str, int]],
    stat: dict[str, Any],
    status: int,
    cpu: dict[str, float],
) -> dict[str, Any]:
    load, logs = watch.load, watch.logs
    window = min(args.window, args.duration / 3)
    during = [s for s in watch.samples if s.phase == "load"]
    second = [s for s in during if window <= s.at < 2 * window]
    last = [s for s in during if s.at >= args.duration - window]  # "load" ends at --duration
    pss = (median([s.pss_kib for s in second]), median([s.pss_kib for s in last]))
    fds = (median([s.fds for s in second]), median([s.fds for s in last]))
    delivered = set(ids["accepted"])
    missing = load.accepted - delivered
    extra, explained, twice = duplicates(ids)
    client_errors = load.replies.total() + load.errors.total() + crashed.total() + cancelled
    unexpected = dict(logs.problems)
    latencies = [seconds for _, seconds in load.latencies]
    checks = {
        "no_client_error": client_errors == 0,
        "memory_flat": (growth(*pss) or 0.0) <= args.max_growth and None not in pss,
        "fds_flat": None not in fds
        and (fds[1] or 0) <= (fds[0] or 0) * (1 + args.max_growth / 100) + FD_SLACK,
        "fds_back_to_idle": after.fds <= idle.fds + FD_IDLE_SLACK,
        "drained": drained_after is not None,
        "nothing_missing": not missing,
        "duplicates_explained": twice == 0,
        "no_unexpected_log_problem": not unexpected,
        "every_message_stamped": stat["without_decision"] == 0,
        "gateway_stopped_cleanly": status == 0,
    }
    return {
        "settings": {
            key: getattr(args, key)
            for key in (
                "sessions",
                "duration",
                "ramp",
                "dwell",
                "think",
                "greeting_delay",
                "data_delay",
                "retry_schedule",
                "delivery_concurrency",
                "drain_timeout",
                "max_growth",
                "gateway_env",
            )
        }
        | {"window_s": round(window, 1), "cpus": os.cpu_count()},
        "load_s": round(load_s, 1),
        "attempted": load.attempted,
        "accepted": len(load.accepted),
        "accepted_per_s": round(len(load.accepted) / load_s, 1) if load_s else None,
        "connect_to_250_ms": latencies_ms(latencies, 1),
        "client_errors": client_errors,
        "unexpected_replies": dict(load.replies),
        "client_exceptions": dict(load.errors),
        "sessions_crashed": dict(crashed),
        "sessions_cancelled": cancelled,
        "first_error_text": load.first_error,
        "downstream": {
            "connections_by_fate": stat["fates"],
            "answered_250": stat["accepted"],
            "distinct_250": stat["distinct"],
            "kept_then_dropped": stat["kept"],
            "without_decision_header": stat["without_decision"],
        },
        "missing": len(missing),
        "missing_sample": sorted(missing)[:10],
        "delivered_not_acknowledged_to_client": len(delivered - load.accepted),
        "duplicates": {"extra_copies": extra, "explained": explained, "refs_with_two_250s": twice},
        "drained_after_s": drained_after,
        "queue_at_end_of_drain": queue,
        "pss_mib": {
            "idle": round(idle.pss_kib / 1024, 1),
            "second_window": round((pss[0] or 0) / 1024, 1),
            "last_window": round((pss[1] or 0) / 1024, 1),
            "after_drain": round(after.pss_kib / 1024, 1),
            "peak": round(max(s.pss_kib for s in watch.samples) / 1024, 1),
            "growth_pct": growth(*pss),
        },
        "fds": {
            "idle": idle.fds,
            "second_window": fds[0],
            "last_window": fds[1],
            "after_drain": after.fds,
            "growth_pct": growth(*fds),
        },
        "cpu_s": {key: round(value, 1) for key, value in cpu.items()},
        "series": series([s for s in watch.samples if s.phase != "idle"], window),
        "gateway_log": {
            "lines": logs.lines,
            "expected_downstream_caused": dict(logs.expected),
            "deferral_reasons": dict(logs.deferrals),
            "unexpected": unexpected,
            "unexpected_samples": logs.samples[:10],
        },
        "gateway_exit_status": status,
        "gateway_log_tail": [] if status == 0 else [line.rstrip() for line in logs.tail],
        "checks": checks,
        "ok": all(checks.values()),
    }


# -- output and arguments --------------------------------------------------------------------------


def render(report: dict[str, Any]) -> str:
    settings, pss, fds = report["settings"], report["pss_mib"], report["fds"]
    down, dup, log = report["downstream"], report["duplicates"], report["gateway_log"]
    drained = report["drained_after_s"]
    drain = "NOT DRAINED" if drained is None else f"drained after {drained} s"
    lines = [
        f"settings    {json.dumps(settings)}",
        (
            f"load        {report['load_s']} s, attempted {report['attempted']}, accepted "
            f"{report['accepted']} ({report['accepted_per_s']}/s), connect->250 "
            f"p50 {report['connect_to_250_ms']['p50']} ms, p99 {report['connect_to_250_ms']['p99']}"
            f" ms, max {report['connect_to_250_ms']['max']} ms"
        ),
        (
            f"client      {report['client_errors']} errors; replies "
            f"{report['unexpected_replies'] or 'none'}; exceptions "
            f"{report['client_exceptions'] or 'none'}; sessions crashed "
            f"{report['sessions_crashed'] or 'none'}, cancelled {report['sessions_cancelled']}"
        ),
    ]
    if report["first_error_text"]:
        lines.append(f"            first: {report['first_error_text']}")
    lines += [
        (
            f"downstream  connections {down['connections_by_fate']}; 250s {down['answered_250']} "
            f"({down['distinct_250']} distinct), kept then dropped {down['kept_then_dropped']}, "
            f"without decision header {down['without_decision_header']}"
        ),
        (
            f"delivery    missing {report['missing']} {report['missing_sample'] or ''}; "
            f"delivered but not acknowledged to the client "
            f"{report['delivered_not_acknowledged_to_client']}; duplicates {dup['extra_copies']} "
            f"({dup['explained']} explained by a kept-then-dropped copy; references with two "
            f"250s: {dup['refs_with_two_250s']})"
        ),
        f"drain       {drain}; spool {report['queue_at_end_of_drain']}",
        (
            f"PSS MiB     idle {pss['idle']}, 2nd window {pss['second_window']}, last window "
            f"{pss['last_window']} (growth {pss['growth_pct']} %), after drain "
            f"{pss['after_drain']}, peak {pss['peak']}"
        ),
        (
            f"fds         idle {fds['idle']}, 2nd window {fds['second_window']}, last window "
            f"{fds['last_window']} (growth {fds['growth_pct']} %), after drain {fds['after_drain']}"
        ),
        f"CPU s       {report['cpu_s']}",
        (
            f"gateway log {log['lines']} lines; expected (downstream) "
            f"{log['expected_downstream_caused']}; deferral reasons {log['deferral_reasons']}; "
            f"unexpected {log['unexpected'] or 'none'}"
        ),
    ]
    lines.extend(f"            {sample}" for sample in log["unexpected_samples"])
    lines.append(f"gateway     exit status {report['gateway_exit_status']}")
    lines.extend(f"            {line}" for line in report["gateway_log_tail"])
    if report["downstream_stderr"]["lines"]:
        lines.append(f"downstream stderr: {report['downstream_stderr']}")
    lines.append("")
    columns = {
        "from_s": "from s",
        "phase": "phase",
        "pss_mib": "PSS MiB",
        "fds": "fds",
        "sessions": "gw sessions",
        "connected": "connected",
        "backlog": "backlog",
        "queue": "spool",
        "accepted_per_s": "accepted/s",
        "delivered_per_s": "delivered/s",
    }
    lines.append(" ".join(f"{label:>11}" for label in columns.values()))
    lines.extend(
        " ".join(f"{'-' if row[key] is None else row[key]!s:>11}" for key in columns)
        for row in report["series"]
    )
    lines.append("")
    lines.extend(f"{'ok  ' if good else 'FAIL'}  {name}" for name, good in report["checks"].items())
    lines.append(f"verdict: {'PASS' if report['ok'] else 'FAIL'}")
    return "\n".join(lines)


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    add = parser.add_argument
    add("--sessions", type=int, default=500, help="concurrent client sessions (500)")
    add("--duration", type=float, default=600.0, help="seconds of load (600)")
    add("--ramp", type=float, default=10.0, help="seconds over which sessions start (10)")
    add("--dwell", type=float, default=20.0, help="mean idle time per connection, s (20)")
    add("--think", type=float, default=1.0, help="mean pause between a session's messages (1)")
    add("--greeting-delay", type=float, default=0.2, help="downstream greeting delay, s (0.2)")
    add("--data-delay", type=float, default=0.5, help="downstream end-of-data delay, s (0.5)")
    add(
        "--retry-schedule",
        type=lambda text: [int(x) for x in text.split(",")],
        default=[1, 2, 5],
        help="gateway's [delivery] retry_schedule (1,2,5)",
    )
    add("--delivery-concurrency", type=int, default=50, help="[delivery] concurrency (50)")
    add("--drain-timeout", type=float, default=300.0, help="bound of the drain, s (300)")
    add("--sample", type=float, default=5.0, help="seconds between samples (5)")
    add("--window", type=float, default=60.0, help="seconds per row of the series (60)")
    add("--max-growth", type=float, default=10.0, help="allowed PSS and fd growth, %% (10)")
    add(
        "--gateway-env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="extra environment for the gateway (e.g. MALLOC_ARENA_MAX=2); repeatable",
    )
    add("--json", action="store_true", help="print the figures as JSON")
    args = parser.parse_args(argv)
    if any("=" not in item for item in args.gateway_env):
        parser.error("--gateway-env takes NAME=VALUE")
    if args.sessions < 1 or args.duration <= 0 or args.ramp < 0 or args.think < 0:
        parser.error("--sessions >= 1, --duration > 0, --ramp and --think >= 0")
    if not 0 <= args.dwell <= 70:
        parser.error("--dwell from 0 to 70 (each half, at most 53 s, under idle_timeout 60 s)")
    if args.ramp >= args.duration or args.sample <= 0 or args.window <= 0:
        parser.error("--ramp < --duration, --sample and --window > 0")
    if min(args.retry_schedule) < 1 or args.delivery_concurrency < 1 or args.drain_timeout <= 0:
        parser.error("--retry-schedule values and --delivery-concurrency >= 1, --drain-timeout > 0")
    return args


def main() -> int:
    if len(sys.argv) == 3 and sys.argv[1] == "--downstream":
        return downstream_main(json.loads(sys.argv[2]))
    args = parse_args(sys.argv[1:])
    nofile = raise_nofile()  # before the downstream and the gateway start: they inherit it
    if nofile < 2 * args.sessions + 200:
        print(f"RLIMIT_NOFILE {nofile} is low for {args.sessions} sessions", file=sys.stderr)
    report = asyncio.run(soak(args))
    print(json.dumps(report, indent=2) if args.json else render(report))
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
