"""The gateway against Debian's Postfix as the equivalent relay: the same load, side by side.

    .venv/bin/python bench/compare.py [--concurrency 1,10,50,100] [--messages N] [--json]

Built from nothing in temporary folders (all on the same disk) and torn down afterwards:

- a trustme CA; one certificate for "localhost"/127.0.0.1 per server;
- a receiving sink (aiosmtpd with STARTTLS) in a process of its own, listening on one loopback
  port per server under test, so arrivals are counted per server;
- the gateway as a real subprocess with `tests.harness.make_setup`: TLS in, verified TLS out,
  secure-domain policy, encrypted durable spool, audit log with signed checkpoints, DKIM
  (`max_connections_per_address` raised from 50 to 200: every client comes from 127.0.0.1);
- Postfix as the same relay at its best: a private instance (`tests.postfix_agency`) with smtpd
  on a loopback port requiring STARTTLS (`smtpd_tls_security_level = encrypt`), relaying only
  `nhs.net` (`relay_domains`, `reject_unauth_destination`) through `transport_maps` to the sink
  with `smtp_tls_security_level = secure` against the test CA, outbound connection reuse
  (`smtp_tls_connection_reuse = yes`, tlsproxy, scache), its queue on the same disk (Postfix
  fsyncs each queue file before its 250). Installed with apt-get when missing (root only);
- the floor (bench/floor.py): a bare aiosmtpd store-and-forward relay with the same TLS in
  and out and the same fsyncs (file and folder) before its 250, and none of the gateway's work
  (policy, encryption, transfer log, DKIM): what aiosmtpd, asyncio and TLS cost in CPython.

Each (server, concurrency) run starts the server afresh, sends a warm-up (as many messages as
clients, not measured, delivered before measuring), then the measured messages, and stops the
server by its own PID (the gateway's and the floor's process; Postfix's master by its pid file).

The load generator is one asyncio client for all: one connection per message (connect, EHLO,
STARTTLS verified against the CA with the name "localhost", EHLO, MAIL, RCPT lead@nhs.net, DATA,
a 4 KiB message, QUIT). It sets TCP_NODELAY and, after every write, TCP_QUICKACK: on loopback,
after a TLS 1.3 handshake a server that leaves Nagle on (Postfix's smtpd does) otherwise waits
~40 ms for the client's delayed ACK. Per message: connect -> 250 (from opening the connection to
the 250 after the final dot) and end of DATA -> 250 (from writing the last byte of the body and
the dot to that 250; the DATA/354 round trip is not in it).

Figures: accepted/s (250s over the sending wall time), delivered/s (sink arrivals for that
server from the first connection to the last arrival), latency percentiles, server CPU per
accepted message (utime + stime from /proc over the measured phase: for the gateway its process;
for Postfix the master, every live descendant (smtpd, cleanup, qmgr, smtp, tlsproxy,
trivial-rewrite, tlsmgr, anvil, scache, postlogd, ...) and the master's cutime/cstime for
children reaped in between; `max_use`/`max_idle` are raised so daemons are not recycled
mid-run), peak PSS (smaps_rollup summed over the server's processes, sampled every 0.2 s), the
instrument's CPU (the load-generator process: its asyncio client, the PSS sampler thread and the
thread draining the gateway's log pipe; the sink's CPU is reported apart).

Loopback only. Bounded: --timeout per run (sending and delivery), --budget for everything.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import resource
import shutil
import ssl
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trustme
from aiosmtpd.smtp import SMTP
from common import (
    FILLER_LINE,
    Client,
    CountingSink,
    HelperProcess,
    RefusedError,
    Results,
    answer_requests,
    log_problems,
    make_head,
    server_context,
    stop_gateway,
    write_cert_files,
)
from procstat import (
    CLK_TCK,
    PssSampler,
    cell,
    latencies_ms,
    tree_cpu,
)

# Importable once `common` has put the project root on sys.path.
from tests.harness import GatewayProcess, make_setup
from tests.postfix_agency import MASTER_CF as AGENCY_MASTER_CF
from tests.postfix_agency import POSTFIX, PostfixAgency, free_port, instance_root

CLIENT_TIMEOUT = 30.0
SERVERS = ("gateway", "postfix", "floor")


# -- /proc: the whole machine (a process tree's CPU and memory: common) -------------------------


def machine_cpu() -> tuple[float, float]:
    """(busy, idle) CPU seconds of the whole machine since boot, from /proc/stat."""
    values = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = values[3] + values[4]  # idle + iowait
    busy = sum(values[:8]) - idle  # user nice system irq softirq steal (guest is in user)
    return busy / CLK_TCK, idle / CLK_TCK


# -- the sink: a process of its own ---------------------------------------------------------------


def sink_main(folder: Path) -> int:
    """Run the sink (a listener per server), print their ports, answer `stat` lines on stdin."""
    logging.getLogger("mail.log").setLevel(logging.WARNING)
    context = server_context(folder)
    counts = {name: CountingSink() for name in SERVERS}

    def stat() -> dict[str, list[float]]:
        return {
            name: [c.received, len(c.ids), c.decision, c.dkim, c.last_at]
            for name, c in counts.items()
        }

    async def serve() -> None:
        loop = asyncio.get_running_loop()
        ports = {}
        for name in SERVERS:
            server = await loop.create_server(
                lambda name=name: SMTP(
                    counts[name],
                    tls_context=context,
                    require_starttls=True,
                    hostname="localhost",
                    ident="bench sink",
                ),
                "127.0.0.1",
                0,
            )
            ports[name] = server.sockets[0].getsockname()[1]
        await answer_requests(ports, {"stat": stat})

    asyncio.run(serve())
    return 0


@dataclass
class SinkCounts:
    received: int
    distinct: int
    decision: int
    dkim: int
    last_at: float


class SinkProcess(HelperProcess):
    """The sink subprocess: its port per server; counts per server."""

    def __init__(self, folder: Path) -> None:
        super().__init__(__file__, ["--sink-process", str(folder)], name="the sink")
        self.ports: dict[str, int] = self.ready

    def stat(self, server: str) -> SinkCounts:
        return SinkCounts(*self.ask("stat")[server])


# -- the load generator -------------------------------------------------------------------------


def make_message(tag: str) -> bytes:
    """A plain 4 KiB message carrying `tag` in a header the sink reads back."""
    head = make_head(tag)
    full, rest = divmod(4096 - len(head), len(FILLER_LINE))
    if rest < 2:
        full, rest = full - 1, rest + len(FILLER_LINE)
    return head + FILLER_LINE * full + b"x" * (rest - 2) + b"\r\n"


async def send_one(
    port: int, context: ssl.SSLContext, message: bytes, results: Results, quickack: bool
) -> None:
    client = Client(quickack)
    started = time.monotonic()
    results.attempted += 1
    if not results.first_start:
        results.first_start = started
    with results.recording(client):
        async with asyncio.timeout(CLIENT_TIMEOUT):
            await client.hello(port, context)
            await client.envelope()
            before = time.monotonic()
            await client.command("dot", message + b".\r\n", 250)
            done = time.monotonic()
            results.accepted += 1
            results.data_s.append(done - before)
            results.total_s.append(done - started)
            results.last_end = max(results.last_end, done)
            with contextlib.suppress(RefusedError, OSError):
                await client.command("quit", b"QUIT\r\n", 221)


async def run_load(
    port: int,
    context: ssl.SSLContext,
    tags: list[str],
    *,
    concurrency: int,
    results: Results,
    quickack: bool,
) -> None:
    todo = iter(tags)

    async def worker() -> None:
        for tag in todo:
            await send_one(port, context, make_message(tag), results, quickack)

    async with asyncio.TaskGroup() as group:
        for _ in range(min(concurrency, len(tags))):
            group.create_task(worker())


# -- the servers --------------------------------------------------------------------------------

# The relay-only services of the test harness's private instance, plus tlsproxy.
MASTER_CF = AGENCY_MASTER_CF + "tlsproxy  unix  -       -       n       -       0       tlsproxy\n"


@dataclass
class PostfixRelay(PostfixAgency):
    """A private Postfix as the equivalent relay: STARTTLS in, verified TLS out, reuse on.

    `gateway_port` (of the parent class) is the sink's port here; start/stop/log come from
    tests.postfix_agency.PostfixAgency.
    """

    cert_pem: Path = Path()
    key_pem: Path = Path()

    def write_config(self) -> None:
        if not self.smtpd_port:
            self.smtpd_port = free_port()
        self.config_dir.mkdir(parents=True, exist_ok=True)
        for folder in (self.queue_dir, self.root / "data"):
            folder.mkdir(exist_ok=True)
        shutil.chown(self.root / "data", "postfix", "postfix")
        files = {}
        for name, source, mode in (
            ("ca.pem", self.ca_pem, 0o644),
            ("cert.pem", self.cert_pem, 0o644),
            ("key.pem", self.key_pem, 0o600),
        ):
            files[name] = self.config_dir / name
            shutil.copyfile(source, files[name])
            files[name].chmod(mode)
        settings = {
            "compatibility_level": "3.6",
            "queue_directory": str(self.queue_dir),
            "data_directory": str(self.root / "data"),
            "mail_owner": "postfix",
            "setgid_group": "postdrop",
            "myhostname": "relay.bench.test",
            "mydomain": "bench.test",
            "myorigin": "$myhostname",
            "mydestination": "",
            "local_transport": "error:5.1.1 no local delivery in this instance",
            "alias_maps": "",
            "alias_database": "",
            "inet_interfaces": "127.0.0.1",
            "inet_protocols": "ipv4",
            "biff": "no",
            # The policy: relay for the agencies' network, to nhs.net only.
            "mynetworks": "127.0.0.0/8",
            "relay_domains": "nhs.net",
            "smtpd_relay_restrictions": "permit_mynetworks, reject_unauth_destination",
            "transport_maps": f"inline:{{nhs.net=relay:[localhost]:{self.gateway_port}}}",
            # TLS in: STARTTLS required.
            "smtpd_tls_security_level": "encrypt",
            "smtpd_tls_cert_file": str(files["cert.pem"]),
            "smtpd_tls_key_file": str(files["key.pem"]),
            "smtpd_tls_loglevel": "1",
            "smtpd_tls_received_header": "yes",
            # TLS out: verified against the test CA, name "localhost" (from /etc/hosts).
            "smtp_dns_support_level": "disabled",
            "smtp_host_lookup": "native",
            "smtp_tls_security_level": "secure",
            "smtp_tls_secure_cert_match": "nexthop",
            "smtp_tls_CAfile": str(files["ca.pem"]),
            "smtp_tls_loglevel": "1",
            "smtp_tls_session_cache_database": "btree:${data_directory}/smtp_scache",
            # At its best: reuse outbound connections (TLS through tlsproxy, cached in scache).
            "smtp_tls_connection_reuse": "yes",
            "smtp_connection_cache_on_demand": "yes",
            "smtp_connection_cache_destinations": "localhost",
            # Enough smtpd processes for 100 clients; no daemon recycled during a run, so no
            # CPU is lost with an exited process and none is spent re-spawning.
            "default_process_limit": "200",
            "max_use": "1000000",
            "max_idle": "3600s",
            "smtp_connect_timeout": "10s",
            "maillog_file": str(self.maillog),
            "maillog_file_prefixes": str(self.root),
        }
        main_cf = "".join(f"{key} = {value}\n" for key, value in settings.items())
        (self.config_dir / "main.cf").write_text(main_cf)
        listener = f"127.0.0.1:{self.smtpd_port} inet n - n - - smtpd\n"
        (self.config_dir / "master.cf").write_text(listener + MASTER_CF)


def ensure_postfix() -> str | None:
    """Install Debian's Postfix when missing (root, apt-get); None when available, else why."""
    if POSTFIX.exists():
        return None
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        return "Postfix is not installed and cannot be (needs root and apt-get)"
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    commands = [
        ["sh", "-c", ("echo 'postfix postfix/main_mailer_type select No configuration'"
                      " | debconf-set-selections")],
        ["apt-get", "update", "-qq"],
        ["apt-get", "install", "-y", "-qq", "--no-install-recommends", "postfix"],
    ]  # fmt: skip
    for command in commands:
        done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            return f"{' '.join(command)} failed: {done.stderr.strip()[-500:]}"
    return None if POSTFIX.exists() else "apt-get did not install /usr/sbin/postfix"


@dataclass
class Server:
    """One started server under test: its port, its root PID, how to stop it, its problems."""

    name: str
    port: int
    pid: int
    stop: Callable[[], None]
    problems: Callable[[], tuple[dict[str, int], list[str]]]
    facts: Callable[[], dict[str, int]] = dict


def start_gateway(root: Path, ca: trustme.CA, sink_port: int) -> Server:
    # Every client comes from 127.0.0.1: the per-address cap (50 by default) would refuse
    # half of 100 clients with 421, so it is raised to the global cap (200, as Postfix's
    # default_process_limit here).
    setup = make_setup(
        root, ca, receiver_port=sink_port, server_extra="max_connections_per_address = 200"
    )
    process = GatewayProcess(setup)
    port = process.start()
    if process.proc is None:
        raise RuntimeError("the gateway did not start")

    def stop() -> None:
        stop_gateway(process)

    def problems() -> tuple[dict[str, int], list[str]]:
        return log_problems(process.output)

    return Server("gateway", port, process.proc.pid, stop, problems)


def start_floor(root: Path, tmp: Path, sink_port: int) -> Server:
    """bench/floor.py: a bare aiosmtpd store-and-forward relay, the yardstick."""
    spool = root / "floor-spool"
    spool.mkdir(parents=True)
    errors = (root / "floor-stderr.txt").open("w")
    options = {
        "--cert": tmp / "server" / "cert.pem",
        "--key": tmp / "server" / "key.pem",
        "--ca": tmp / "ca.pem",
        "--spool": spool,
        "--sink-port": sink_port,
    }
    proc = subprocess.Popen(
        [
            sys.executable,
            str(Path(__file__).resolve().parent / "floor.py"),
            *(str(part) for pair in options.items() for part in pair),
        ],
        stdout=subprocess.PIPE,
        stderr=errors,
        text=True,
    )
    line = proc.stdout.readline() if proc.stdout else ""
    if not line:
        proc.kill()
        proc.wait(5)
        errors.close()
        raise RuntimeError("the floor relay did not start")

    def stop() -> None:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
        errors.close()

    def problems() -> tuple[dict[str, int], list[str]]:
        lines = (root / "floor-stderr.txt").read_text().splitlines()
        return ({"stderr": len(lines)} if lines else {}), lines[:5]

    return Server("floor", json.loads(line)["port"], proc.pid, stop, problems)


def start_postfix(tmp: Path, ca_pem: Path, sink_port: int, keep: Path) -> Server:
    relay = PostfixRelay(
        root=instance_root(),
        gateway_port=sink_port,
        ca_pem=ca_pem,
        cert_pem=tmp / "server" / "cert.pem",
        key_pem=tmp / "server" / "key.pem",
    )
    relay.write_config()
    try:
        relay.start()
    except BaseException:
        relay.stop()
        relay.remove(keep)
        raise
    pid = relay.master_pid()
    if pid is None:
        relay.stop()
        relay.remove(keep)
        raise RuntimeError("Postfix's master wrote no pid file\n" + relay.log_text())

    def stop() -> None:
        relay.stop()
        relay.remove(keep)

    def problems() -> tuple[dict[str, int], list[str]]:
        counts: Counter[str] = Counter()
        samples: list[str] = []
        for line in relay.log_text().splitlines():
            for kind in ("warning:", "error:", "fatal:", "panic:", "status=deferred"):
                if kind in line:
                    if kind not in counts:
                        samples.append(line[:300])
                    counts[kind.rstrip(":")] += 1
        return dict(counts), samples

    def facts() -> dict[str, int]:
        """What the log says about TLS in and out and connection reuse."""
        counts: Counter[str] = Counter()
        for line in relay.log_text().splitlines():
            if "postfix/smtpd[" in line and "TLS connection established from" in line:
                counts["tls_in"] += 1
            elif "Verified TLS connection established to" in line:
                counts["verified_tls_out_connections"] += 1
            elif " status=sent " in line:
                counts["sent"] += 1
                if "conn_use=" in line:
                    counts["sent_on_reused_connection"] += 1
        return dict(counts)

    return Server("postfix", relay.smtpd_port, pid, stop, problems, facts)


# -- one run ------------------------------------------------------------------------------------


async def wait_delivered(
    sink: SinkProcess, server: str, target: int, deadline: float
) -> SinkCounts:
    """Poll the sink until it has `target` arrivals for `server` or the deadline passes."""
    while True:
        counts = await asyncio.to_thread(sink.stat, server)
        if counts.received >= target or time.monotonic() >= deadline:
            return counts
        await asyncio.sleep(0.05)


async def run_one(
    name: str,
    concurrency: int,
    messages: int,
    *,
    tmp: Path,
    ca: trustme.CA,
    sink: SinkProcess,
    context: ssl.SSLContext,
    run_seconds: float,
    quickack: bool,
) -> dict[str, Any]:
    run_root = tmp / f"{name}-c{concurrency}"
    sink_port = sink.ports[name]
    if name == "gateway":
        server = await asyncio.to_thread(start_gateway, run_root, ca, sink_port)
    elif name == "floor":
        server = await asyncio.to_thread(start_floor, run_root, tmp, sink_port)
    else:
        server = await asyncio.to_thread(
            start_postfix, tmp, tmp / "ca.pem", sink_port, run_root / "postfix-log"
        )
    try:
        prefix = f"{name}-c{concurrency}"
        # Warm-up: one message per client, delivered before measuring.
        warm = Results()
        before = await asyncio.to_thread(sink.stat, name)
        await run_load(
            server.port,
            context,
            [f"{prefix}-w{n}" for n in range(concurrency)],
            concurrency=concurrency,
            results=warm,
            quickack=quickack,
        )
        await wait_delivered(sink, name, before.received + warm.accepted, time.monotonic() + 30)
        await asyncio.sleep(0.5)  # let the server settle

        sink_before = await asyncio.to_thread(sink.stat, name)
        cpu_before, processes_before = tree_cpu(server.pid)
        sink_cpu_before, _ = tree_cpu(sink.proc.pid)
        own_before = resource.getrusage(resource.RUSAGE_SELF)
        machine_before = machine_cpu()
        sampler = PssSampler(server.pid)
        sampler.start()
        results = Results()
        deadline = time.monotonic() + run_seconds
        tags = [f"{prefix}-{n}" for n in range(messages)]
        load = asyncio.ensure_future(
            run_load(
                server.port,
                context,
                tags,
                concurrency=concurrency,
                results=results,
                quickack=quickack,
            )
        )
        timed_out = False
        try:
            await asyncio.wait_for(asyncio.shield(load), max(0.0, deadline - time.monotonic()))
        except TimeoutError:
            timed_out = True
            load.cancel()
            with contextlib.suppress(asyncio.CancelledError, BaseExceptionGroup):
                await load
        sent_end = time.monotonic()
        target = sink_before.received + results.accepted
        sink_after = await wait_delivered(sink, name, target, deadline)
        timed_out = timed_out or sink_after.received < target
        cpu_after, processes_after = tree_cpu(server.pid)
        sink_cpu_after, _ = tree_cpu(sink.proc.pid)
        own_after = resource.getrusage(resource.RUSAGE_SELF)
        machine_after = machine_cpu()
        sampler.finish()
        problems, samples = server.problems()
        facts = server.facts()
    finally:
        await asyncio.to_thread(server.stop)

    delivered = sink_after.received - sink_before.received
    start = results.first_start or sent_end
    send_wall = (results.last_end or sent_end) - start
    deliver_wall = sink_after.last_at - start if delivered else 0.0
    server_cpu = cpu_after - cpu_before
    own_cpu = (own_after.ru_utime - own_before.ru_utime) + (
        own_after.ru_stime - own_before.ru_stime
    )
    return {
        "server": name,
        "concurrency": concurrency,
        "messages": messages,
        "attempted": results.attempted,
        "accepted": results.accepted,
        "delivered": delivered,
        "delivered_distinct": sink_after.distinct - sink_before.distinct,
        "delivered_with_decision_header": sink_after.decision - sink_before.decision,
        "delivered_with_dkim_signature": sink_after.dkim - sink_before.dkim,
        "timed_out": timed_out,
        "send_wall_s": round(send_wall, 3),
        "deliver_wall_s": round(deliver_wall, 3),
        "accepted_per_s": round(results.accepted / send_wall, 1) if send_wall > 0 else None,
        "delivered_per_s": round(delivered / deliver_wall, 1) if deliver_wall > 0 else None,
        "connect_to_250_ms": latencies_ms(results.total_s),
        "data_to_250_ms": latencies_ms(results.data_s, mean=True),
        "server_cpu_s": round(server_cpu, 3),
        "server_cpu_ms_per_message": (
            round(server_cpu * 1000 / results.accepted, 2) if results.accepted else None
        ),
        "server_processes": [processes_before, processes_after, sampler.max_processes],
        "server_peak_pss_mb": round(sampler.peak_kib / 1024, 1),
        "pss_samples": sampler.samples,
        "instrument_cpu_s": round(own_cpu, 2),
        "instrument_sampler_cpu_s": round(sampler.cpu_s, 2),
        "sink_cpu_s": round(sink_cpu_after - sink_cpu_before, 2),
        "machine_cpu_busy_s": round(machine_after[0] - machine_before[0], 2),
        "machine_cpu_idle_s": round(machine_after[1] - machine_before[1], 2),
        # Busy time no measured process accounts for: other processes, kernel threads.
        "other_cpu_s": round(
            (machine_after[0] - machine_before[0])
            - server_cpu
            - own_cpu
            - (sink_cpu_after - sink_cpu_before),
            2,
        ),
        "non_250_replies": dict(results.replies),
        "client_errors": dict(results.errors),
        "first_error_text": results.first_error,
        "warmup": {"sent": concurrency, "accepted": warm.accepted},
        "server_log_problems": problems,
        "server_log_samples": samples,
        "server_log_facts": facts,
    }


# -- the whole comparison -----------------------------------------------------------------------


async def compare(args: argparse.Namespace) -> dict[str, Any]:
    started = time.monotonic()
    report: dict[str, Any] = {
        "host": {"cpus": os.cpu_count(), "loadavg_before": os.getloadavg()},
        "message_bytes": len(make_message("x")),
        "quickack": not args.no_quickack,
        "runs": [],
        "skipped": [],
    }
    servers = [name for name in SERVERS if name in args.servers]
    if "postfix" in servers:
        why = await asyncio.to_thread(ensure_postfix)
        if why is not None:
            report["skipped"].append(f"postfix: {why}")
            servers.remove("postfix")
        else:
            version = await asyncio.to_thread(
                subprocess.run,
                ["/usr/sbin/postconf", "-d", "-h", "mail_version"],
                capture_output=True,
                text=True,
                check=False,
            )
            report["postfix_version"] = version.stdout.strip()
    ca = trustme.CA()
    tmp = Path(tempfile.mkdtemp(prefix="gateway-compare-"))
    try:
        for folder in ("sink", "server"):
            write_cert_files(ca, tmp / folder)
        ca.cert_pem.write_to_path(str(tmp / "ca.pem"))
        context = ssl.create_default_context(cafile=str(tmp / "ca.pem"))
        sink = await asyncio.to_thread(SinkProcess, tmp / "sink")
        try:
            for concurrency in args.concurrency:
                messages = args.messages or (200 if concurrency == 1 else 1000)
                for name in servers:
                    if time.monotonic() - started + args.timeout > args.budget:
                        report["skipped"].append(f"{name} C={concurrency}: over --budget")
                        continue
                    print(f"... {name} C={concurrency} ({messages} messages)", file=sys.stderr)
                    try:
                        run = await run_one(
                            name,
                            concurrency,
                            messages,
                            tmp=tmp,
                            ca=ca,
                            sink=sink,
                            context=context,
                            run_seconds=args.timeout,
                            quickack=not args.no_quickack,
                        )
                    except Exception as exc:  # noqa: BLE001 (report it, go on with the rest)
                        report["skipped"].append(f"{name} C={concurrency}: {exc!r}"[:2000])
                        continue
                    report["runs"].append(run)
        finally:
            await asyncio.to_thread(sink.stop)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    report["wall_s"] = round(time.monotonic() - started, 1)
    report["host"]["loadavg_after"] = os.getloadavg()
    return report


ROWS: list[tuple[str, Callable[[dict[str, Any]], Any]]] = [
    ("accepted/s", lambda r: r["accepted_per_s"]),
    ("delivered/s", lambda r: r["delivered_per_s"]),
    ("connect->250 p50 ms", lambda r: r["connect_to_250_ms"]["p50"]),
    ("connect->250 p99 ms", lambda r: r["connect_to_250_ms"]["p99"]),
    ("end of DATA->250 p50 ms", lambda r: r["data_to_250_ms"]["p50"]),
    ("end of DATA->250 p99 ms", lambda r: r["data_to_250_ms"]["p99"]),
    ("server CPU ms/message", lambda r: r["server_cpu_ms_per_message"]),
    ("server peak PSS MB", lambda r: r["server_peak_pss_mb"]),
    ("instrument CPU s", lambda r: r["instrument_cpu_s"]),
    ("  of which PSS sampler s", lambda r: r["instrument_sampler_cpu_s"]),
    ("sink CPU s", lambda r: r["sink_cpu_s"]),
    ("machine CPU busy s", lambda r: r["machine_cpu_busy_s"]),
    ("machine CPU idle s", lambda r: r["machine_cpu_idle_s"]),
    ("  busy, not measured here s", lambda r: r["other_cpu_s"]),
    ("accepted / delivered", lambda r: f"{r['accepted']}/{r['delivered']}"),
]


def render(report: dict[str, Any]) -> str:
    lines = [
        (
            f"host: {report['host']['cpus']} CPUs, load average before "
            f"{' '.join(f'{x:.2f}' for x in report['host']['loadavg_before'])}; "
            f"Postfix {report.get('postfix_version', '-')}; "
            f"{report['message_bytes']}-byte messages; TCP_QUICKACK {report['quickack']}"
        ),
    ]
    by_c: dict[int, dict[str, dict[str, Any]]] = {}
    for run in report["runs"]:
        by_c.setdefault(run["concurrency"], {})[run["server"]] = run
    for concurrency, runs in by_c.items():
        present = [runs[name] for name in SERVERS if name in runs]
        messages = present[0]["messages"]
        lines += ["", f"C = {concurrency} ({messages} messages per server)"]
        ratios = [("gw/pf", "postfix"), ("gw/floor", "floor")]
        ratios = [(label, other) for label, other in ratios if other in runs and "gateway" in runs]
        header = "".join(f"{run['server']:>11}" for run in present)
        lines.append(f"  {'':26}{header}" + "".join(f"{label:>9}" for label, _ in ratios))
        for label, get in ROWS:
            cells = "".join(f"{cell(get(run)):>11}" for run in present)
            shown = ""
            for _, other in ratios:
                left, right = get(runs["gateway"]), get(runs[other])
                ratio = ""
                if isinstance(left, (int, float)) and isinstance(right, (int, float)) and right:
                    ratio = f"{left / right:.2f}"
                shown += f"{ratio:>9}"
            lines.append(f"  {label:26}{cells}{shown}")
        for run in present:
            notes = []
            if run["timed_out"]:
                notes.append("TIMED OUT (partial)")
            notes.extend(
                f"{key} {run[key]}"
                for key in ("non_250_replies", "client_errors", "server_log_problems")
                if run[key]
            )
            if run["first_error_text"]:
                notes.append(f"first errors {run['first_error_text']}")
            if run["server"] == "gateway" and run["delivered"]:
                notes.append(
                    f"decision header {run['delivered_with_decision_header']}/"
                    f"{run['delivered']}, DKIM {run['delivered_with_dkim_signature']}"
                )
            if run["server_log_facts"]:
                notes.append(f"log (whole run, warm-up included) {run['server_log_facts']}")
            start, end, most = run["server_processes"]
            notes.append(f"processes {start} at start, {end} at end, {most} at most")
            lines.append(f"  {run['server']}: " + "; ".join(notes))
            lines.extend(f"    {sample}" for sample in run["server_log_samples"][:5])
    for skipped in report["skipped"]:
        lines.append(f"SKIPPED {skipped}")
    lines.append(f"wall time {report['wall_s']} s")
    return "\n".join(lines)


def main() -> int:
    if len(sys.argv) == 3 and sys.argv[1] == "--sink-process":
        return sink_main(Path(sys.argv[2]))
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument(
        "--concurrency",
        type=lambda text: [int(x) for x in text.split(",")],
        default=[1, 10, 50, 100],
        help="comma-separated client counts (1,10,50,100)",
    )
    parser.add_argument(
        "--messages", type=int, default=0, help="messages per run (200 at C=1, else 1000)"
    )
    parser.add_argument("--timeout", type=float, default=120.0, help="bound per run, s (120)")
    parser.add_argument("--budget", type=float, default=1800.0, help="bound overall, s (1800)")
    parser.add_argument(
        "--servers",
        type=lambda text: text.split(","),
        default=list(SERVERS),
        help="gateway,postfix",
    )
    parser.add_argument(
        "--no-quickack", action="store_true", help="leave TCP_QUICKACK off (to see the trap)"
    )
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = parser.parse_args()
    if min(args.concurrency) < 1 or args.messages < 0 or args.timeout <= 0:
        parser.error("--concurrency >= 1, --messages >= 0, --timeout > 0")
    if unknown := set(args.servers) - set(SERVERS):
        parser.error(f"unknown servers: {sorted(unknown)}")
    report = asyncio.run(compare(args))
    print(json.dumps(report, indent=2) if args.json else render(report))
    complete = all(
        run["accepted"] == run["messages"] == run["delivered"] and not run["timed_out"]
        for run in report["runs"]
    )
    return 0 if complete and not report["skipped"] else 1


if __name__ == "__main__":
    sys.exit(main())
