"""Hold-queue benchmark: `queue list` and the accept rate with 100,000 held messages.

    .venv/bin/python bench/hold_queue.py [--held 100000] [--messages 1000] [--json]

Everything is built from nothing in a temporary folder and torn down afterwards, as in
bench/accept.py (whose sink, load generator and measurement this reuses): a trustme CA, two
complete gateway setups (tests.harness.make_setup), a TLS receiving sink per gateway in this
process and each gateway as a real subprocess (tests.harness.GatewayProcess). Loopback only.

1. Seeding (setup, not measured): N held messages are written straight into the first
   gateway's spool with the real `gateway.spool.Spool` API (new_message, write, commit) before
   its daemon starts: each a ~2 KiB body and a QueueEntry in state HELD, 1-3 recipients with at
   least one insecure domain and the matching reasons (`insecure_domain:gmail.com`), keyed
   pseudonyms, the policy's version and references made from increasing times over the last
   few days (younger than `[hold] max_age`, so nothing expires). A commit makes three fsyncs of
   files and three of folders; to keep the setup short the seeding workers run under Debian's
   `eatmydata` (an LD_PRELOAD that makes fsync a no-op) when it is installed, otherwise with
   real fsyncs. The daemons never run under it.
2. The daemon with N held messages: time from start to its `daemon_started` line; time until
   its queue index is loaded (the first `queue.list` request waits for the index, so the time
   until a request returns all N rows bounds it from above); then, 5 runs each (min, median,
   max): `gateway queue list --state held --json` as a subprocess, end to end (the CLI's
   start-up, the control request, printing the JSON); the same control request made in this
   process, split into the daemon's work (until the first byte of the answer), the transfer and
   the JSON decoding; `queue list --state held --domain nhs.net`; `queue show REF`; and the CLI
   asking for an empty list (`--state deferred`), i.e. start-up plus one scan of the index.
3. Accept rate: the load of bench/accept.py (C connections, each message its own connection
   with STARTTLS, one secure recipient, so every message is released and delivered to the sink)
   against the daemon holding N messages and against a second, fresh gateway with an empty hold
   queue, in alternating rounds (held, empty, empty, held, ...) while both daemons run, so a
   drift of the machine hits both alike. Printed per gateway: accepted/s, end-of-DATA-to-250
   p50/p99, gateway CPU per message and peak RSS (VmHWM); and the ratios held/empty.

The whole run is bounded by --timeout (seconds). Exit status 0 when every step ran, the held
list returned N rows, its median CLI time is under --goal seconds and the accept rate with N
held messages is at least --min-ratio of the empty gateway's.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import argparse  # noqa: E402
import asyncio  # noqa: E402
import contextlib  # noqa: E402
import hashlib  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import os  # noqa: E402
import random  # noqa: E402
import shutil  # noqa: E402
import signal  # noqa: E402
import socket  # noqa: E402
import ssl  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from datetime import UTC, datetime, timedelta  # noqa: E402
from typing import Any  # noqa: E402

import trustme  # noqa: E402

from bench.accept import Sink, log_problems, measure, peak_rss_mb, start_sink  # noqa: E402
from gateway import config as config_module  # noqa: E402
from gateway import control  # noqa: E402
from gateway.keys import load_keys  # noqa: E402
from gateway.policy import load_policy  # noqa: E402
from gateway.pseudonym import pseudonym  # noqa: E402
from gateway.queue_entry import QueueEntry, Recipient, State  # noqa: E402
from gateway.reference import new_reference  # noqa: E402
from gateway.spool import Spool  # noqa: E402
from tests import harness  # noqa: E402
from tests.harness import GatewayProcess, GatewaySetup, make_setup  # noqa: E402

SENDER_DOMAINS = ("bromley.gcsx.gov.uk", "example.org")
SECURE_DOMAINS = ("nhs.net", "lambeth.gcsx.gov.uk", "met.pnn.police.uk")
INSECURE_DOMAINS = ("gmail.com", "hotmail.co.uk", "outlook.com", "yahoo.co.uk", "btinternet.com")
SPREAD = timedelta(days=5)  # seeded messages span the 5 days before the last hour
RUNS = 5
CLI_CODE = "import sys; from gateway.cli import main; sys.exit(main(sys.argv[1:]))"


class BenchError(Exception):
    """A step of the benchmark could not be done; the message says which."""


# -- seeding (runs in child processes, under eatmydata when available) --------------------------


def seeded_body(number: int, sender: str, recipients: list[str]) -> bytes:
    """A ~2 KiB plain message."""
    head = (
        f"From: Duty Officer <{sender}>\r\n"
        f"To: {', '.join(recipients)}\r\n"
        f"Subject: OFFICIAL-SENSITIVE referral {number}\r\n"
        f"Message-ID: <held-{number}@{sender.rsplit('@', 1)[1]}>\r\n"
        "Date: Tue, 25 Nov 2025 03:42:30 +0000\r\n"
        "MIME-Version: 1.0\r\n"
        "Content-Type: text/plain; charset=us-ascii\r\n"
        "\r\n"
    ).encode()
    line = b"Lorem ipsum dolor sit amet, consectetur adipiscing elit, sed do eiusmod tempor.\r\n"
    return head + line * ((2048 - len(head)) // len(line) + 1)


def seeded_entry(number: int, received: datetime, *, pseudonym_key: bytes, policy: str) -> tuple:
    """The body and the held QueueEntry of seeded message `number` (deterministic but the ref)."""
    rng = random.Random(number)
    sender = f"officer{number % 997}@{rng.choice(SENDER_DOMAINS)}"
    insecure = rng.sample(INSECURE_DOMAINS, 1 if rng.random() < 0.85 else 2)
    secure = rng.sample(SECURE_DOMAINS, rng.randint(0, 3 - len(insecure)))
    domains = insecure + secure
    rng.shuffle(domains)
    addresses = [f"person{rng.randrange(10_000)}@{domain}" for domain in domains]
    body = seeded_body(number, sender, addresses)
    ref = new_reference(received)
    entry = QueueEntry(
        ref=ref,
        state=State.HELD,
        received=received,
        client="test-agency",
        sender=sender,
        sender_domain=sender.rsplit("@", 1)[1],
        sender_pseudonym=pseudonym(pseudonym_key, sender),
        recipients=tuple(
            Recipient(address=a, domain=a.rsplit("@", 1)[1], pseudonym=pseudonym(pseudonym_key, a))
            for a in addresses
        ),
        verdict="hold",
        reasons=tuple(f"insecure_domain:{d}" for d in domains if d in insecure),
        policy=policy,
        decided_at=received,
        size=len(body),
        digest="sha256:" + hashlib.sha256(body).hexdigest(),
    )
    return body, entry


def seed_worker(config_path: Path, first: int, count: int, total: int, end: float) -> int:
    """Commit messages first..first+count-1 of `total` held messages; the newest at `end`."""
    config = config_module.load(config_path)
    keys = load_keys(config.keys_path)
    policy = load_policy(config.policy_path).version
    spool = Spool(config.spool_path, keys.spool_key)
    last = datetime.fromtimestamp(end, UTC)
    step = SPREAD / max(1, total)
    for number in range(first, first + count):
        received = last - SPREAD + step * number
        body, entry = seeded_entry(
            number, received, pseudonym_key=keys.pseudonym_key, policy=policy
        )
        writer = spool.new_message(entry.ref)
        writer.write(body)
        spool.commit(writer, entry)
    return 0


@dataclass
class Seeding:
    held: int
    workers: int
    seconds: float
    fsync: str  # "eatmydata (fsync disabled)" or "real fsync"


def seed(setup: GatewaySetup, held: int, workers: int, deadline: float) -> Seeding:
    """Fill the spool with `held` messages from `workers` child processes."""
    config = setup.config
    Spool(config.spool_path, load_keys(config.keys_path).spool_key).prepare(
        process_start=time.time()
    )
    wrapper = shutil.which("eatmydata")
    prefix = [wrapper] if wrapper else []
    end = time.time() - 3600
    started = time.perf_counter()
    children: list[subprocess.Popen[bytes]] = []
    share = -(-held // workers)
    try:
        for first in range(0, held, share):
            count = min(share, held - first)
            argv = [sys.executable, str(Path(__file__).resolve()), "--seed-worker"]
            argv += [str(setup.config_path), str(first), str(count), str(held), repr(end)]
            children.append(subprocess.Popen([*prefix, *argv], stderr=subprocess.PIPE))
        for child in children:
            _, err = child.communicate(timeout=max(1.0, deadline - time.monotonic()))
            if child.returncode != 0:
                raise BenchError(f"seeding worker failed ({child.returncode}): {err.decode()}")
    finally:
        for child in children:
            if child.poll() is None:
                child.kill()
                child.wait()
    return Seeding(
        held=held,
        workers=len(children),
        seconds=round(time.perf_counter() - started, 1),
        fsync="eatmydata (fsync disabled)" if wrapper else "real fsync (eatmydata not found)",
    )


# -- timing the CLI and the control request ----------------------------------------------------


def spread(values: list[float]) -> dict[str, float]:
    """min / median / max in seconds, rounded to the millisecond."""
    return {
        "min": round(min(values), 3),
        "median": round(statistics.median(values), 3),
        "max": round(max(values), 3),
    }


def cli_argv() -> list[str]:
    """The installed `gateway` command beside this Python, or the same entry point via -c."""
    script = Path(sys.executable).parent / "gateway"
    return [str(script)] if script.exists() else [sys.executable, "-c", CLI_CODE]


def time_cli(setup: GatewaySetup, args: list[str], runs: int) -> dict[str, Any]:
    """Run `gateway ARGS --config ...` `runs` times; wall times and the size of its output."""
    argv = [*cli_argv(), *args, "--config", str(setup.config_path)]
    times, out = [], b""
    for _ in range(runs):
        started = time.perf_counter()
        done = subprocess.run(argv, capture_output=True, timeout=120, check=False)
        times.append(time.perf_counter() - started)
        if done.returncode != 0:
            raise BenchError(f"{' '.join(args)} failed: {done.stderr.decode().strip()}")
        out = done.stdout
    report: dict[str, Any] = {"seconds": spread(times), "output_bytes": len(out)}
    if "--json" in args:
        parsed = json.loads(out)
        report["rows"] = len(parsed) if isinstance(parsed, list) else 1
    return report


def raw_request(path: Path, command: str, **fields: Any) -> tuple[Any, dict[str, float]]:
    """gateway.control.request, taken apart: daemon time to first byte, transfer, decoding."""
    payload = json.dumps({"command": command, **fields}).encode() + b"\n"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(control.TIMEOUT)
        started = time.perf_counter()
        sock.connect(str(path))
        sock.sendall(payload)
        chunks = [sock.recv(1 << 20)]
        first = time.perf_counter()
        while chunks[-1]:
            chunks.append(sock.recv(1 << 20))
    received = time.perf_counter()
    reply = json.loads(b"".join(chunks))
    decoded = time.perf_counter()
    if not isinstance(reply, dict) or not reply.get("ok"):
        raise BenchError(f"control request {command} failed: {reply}")
    return reply["result"], {
        "first_byte": first - started,
        "transfer": received - first,
        "decode": decoded - received,
        "total": decoded - started,
        "bytes": float(sum(map(len, chunks))),
    }


def time_control(path: Path, runs: int, command: str, **fields: Any) -> dict[str, Any]:
    """gateway.control.request itself, `runs` times, and the same request taken apart."""
    whole = []
    for _ in range(runs):
        started = time.perf_counter()
        control.request(path, command, **fields)
        whole.append(time.perf_counter() - started)
    parts: dict[str, list[float]] = {}
    size = 0.0
    for _ in range(runs):
        _, timing = raw_request(path, command, **fields)
        size = timing.pop("bytes")
        for key, value in timing.items():
            parts.setdefault(key, []).append(value)
    return {
        "seconds": spread(whole),
        "parts_median_s": {k: round(statistics.median(v), 3) for k, v in parts.items()},
        "answer_bytes": int(size),
    }


def wait_for_index(path: Path, held: int, deadline: float) -> tuple[float, int, int]:
    """Ask for the held list until it has `held` rows: seconds, tries, rows last seen."""
    started = time.perf_counter()
    tries, rows = 0, -1
    while time.monotonic() < deadline:
        tries += 1
        try:
            rows = len(control.request(path, "queue.list", state="held"))
        except control.ControlError:  # the daemon drops a request after 30 s; ask again
            time.sleep(0.2)
            continue
        if rows >= held:
            return time.perf_counter() - started, tries, rows
        time.sleep(0.2)
    raise BenchError(f"the queue index did not show {held} held messages in time ({rows} rows)")


def rss_mb(pid: int) -> float:
    """VmRSS of a process in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return round(int(line.split()[1]) / 1024, 1)
    return 0.0


# -- the whole run ------------------------------------------------------------------------------


@dataclass
class Gateway:
    """One gateway under test: its setup, sink and daemon."""

    name: str
    setup: GatewaySetup
    sink: Sink
    server: asyncio.Server
    process: GatewayProcess | None = None
    rounds: list[dict[str, Any]] = field(default_factory=list)

    @property
    def pid(self) -> int:
        if self.process is None or self.process.proc is None:
            raise BenchError(f"the {self.name} gateway is not running")
        return self.process.proc.pid


async def new_gateway(name: str, root: Path, ca: trustme.CA) -> Gateway:
    sink_cert = ca.issue_cert("localhost", "127.0.0.1")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    sink_cert.configure_cert(context)
    sink = Sink()
    server = await start_sink(context, sink)
    port = server.sockets[0].getsockname()[1]
    setup = await asyncio.to_thread(make_setup, root / name, ca, receiver_port=port)
    return Gateway(name, setup, sink, server)


async def start_daemon(gateway: Gateway, deadline: float) -> float:
    """Start the gateway's daemon; seconds until its daemon_started line."""
    gateway.process = GatewayProcess(gateway.setup)
    started = time.perf_counter()
    await asyncio.to_thread(gateway.process.start, max(5.0, deadline - time.monotonic()))
    return time.perf_counter() - started


def stop_daemon(gateway: Gateway) -> int | None:
    """SIGTERM (then SIGKILL) the gateway's own daemon by its PID; its exit status."""
    process = gateway.process
    if process is None or process.proc is None:
        return None
    try:
        return process.terminate(timeout=60)
    except subprocess.TimeoutExpired:
        process.proc.send_signal(signal.SIGKILL)
        process.finish()
        return -9


def reset(sink: Sink) -> None:
    """Forget what the sink saw in earlier rounds."""
    sink.ids.clear()
    sink.received = sink.without_decision = 0
    sink.last_at = 0.0


async def accept_round(
    gateway: Gateway, args: argparse.Namespace, deadline: float, *, keep: bool = True
) -> dict[str, Any]:
    """One run of bench/accept.py's load and measurement against the gateway."""
    assert gateway.process is not None  # noqa: S101
    reset(gateway.sink)
    loop = asyncio.get_running_loop()
    bound = loop.time() + min(args.round_timeout, max(1.0, deadline - time.monotonic()))
    report = await measure(
        gateway.process,
        pid=gateway.pid,
        port=gateway.process.port,
        context=gateway.setup.client_context,
        sink=gateway.sink,
        messages=args.messages,
        concurrency=args.concurrency,
        deadline=bound,
    )
    if keep:
        gateway.rounds.append(report)
    return report


def list_forever(path: Path, stop: threading.Event, seconds: list[float]) -> None:
    """Ask for the whole held list again and again (answer read and dropped) until `stop`."""
    payload = json.dumps({"command": "queue.list", "state": "held"}).encode() + b"\n"
    while not stop.is_set():
        started = time.perf_counter()
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(control.TIMEOUT)
            sock.connect(str(path))
            sock.sendall(payload)
            while sock.recv(1 << 20):
                pass
        seconds.append(time.perf_counter() - started)


async def accept_while_listing(
    gateway: Gateway, args: argparse.Namespace, deadline: float
) -> dict[str, Any]:
    """One more accept round against the gateway while `queue list --state held` repeats."""
    stop, seconds = threading.Event(), []
    path = gateway.setup.config.control_socket
    lister = threading.Thread(target=list_forever, args=(path, stop, seconds), daemon=True)
    lister.start()
    try:
        found = await accept_round(gateway, args, deadline, keep=False)
    finally:
        stop.set()
        await asyncio.to_thread(lister.join, control.TIMEOUT + 5)
    return {
        "accepted": found["accepted"],
        "attempted": found["attempted"],
        "timed_out": found["timed_out"],
        "accepted_per_s": found["accepted_per_s"],
        "data_to_250_ms": found["data_to_250_ms"],
        "list_requests": len(seconds),
        "list_seconds_median": round(statistics.median(seconds), 3) if seconds else None,
    }


def summarise_rounds(gateway: Gateway) -> dict[str, Any]:
    rounds = gateway.rounds
    rates = [r["accepted_per_s"] or 0.0 for r in rounds]
    return {
        "rounds": len(rounds),
        "accepted": sum(r["accepted"] for r in rounds),
        "attempted": sum(r["attempted"] for r in rounds),
        "timed_out": any(r["timed_out"] for r in rounds),
        "accepted_per_s": round(statistics.fmean(rates), 1) if rates else None,
        "accepted_per_s_each": rates,
        "data_to_250_p50_ms": round(
            statistics.median(r["data_to_250_ms"]["p50"] for r in rounds), 2
        ),
        "data_to_250_p99_ms": round(
            statistics.median(r["data_to_250_ms"]["p99"] for r in rounds), 2
        ),
        "data_to_250_max_ms": max(r["data_to_250_ms"]["max"] for r in rounds),
        "data_to_250_p99_ms_each": [r["data_to_250_ms"]["p99"] for r in rounds],
        "gateway_cpu_ms_per_message": round(
            statistics.fmean(r["gateway_cpu_ms_per_message"] or 0.0 for r in rounds), 2
        ),
        "loadgen_cpu_s": round(sum(r["loadgen_cpu_s"] for r in rounds), 2),
        "non_250_replies": [r["non_250_replies"] for r in rounds if r["non_250_replies"]],
        "client_errors": [r["client_errors"] for r in rounds if r["client_errors"]],
    }


async def bench(args: argparse.Namespace) -> dict[str, Any]:
    deadline = time.monotonic() + args.timeout
    report: dict[str, Any] = {
        "held": args.held,
        "messages_per_round": args.messages,
        "concurrency": args.concurrency,
        "cpus": os.cpu_count(),
    }
    ca = trustme.CA()
    controls_before = len(harness.CONTROL_DIRS)
    gateways: list[Gateway] = []
    with tempfile.TemporaryDirectory(prefix="gateway-bench-queue-") as tmp:
        try:
            held_gw = await new_gateway("held", Path(tmp), ca)
            gateways.append(held_gw)
            empty_gw = await new_gateway("empty", Path(tmp), ca)
            gateways.append(empty_gw)

            seeding = await asyncio.to_thread(
                seed, held_gw.setup, args.held, args.workers, deadline
            )
            report["seeding"] = seeding.__dict__
            print(
                f"seeded {seeding.held} held messages in {seeding.seconds} s "
                f"({seeding.workers} workers, {seeding.fsync}; setup, not measured)",
                file=sys.stderr,
            )
            await measure_held(held_gw, args, deadline, report)
            report["empty_start_s"] = round(await start_daemon(empty_gw, deadline), 2)
            report["empty_rss_idle_mb"] = rss_mb(empty_gw.pid)
            for number in range(args.rounds):
                order = (held_gw, empty_gw) if number % 2 == 0 else (empty_gw, held_gw)
                for gateway in order:
                    print(f"accept round {number + 1}: {gateway.name}", file=sys.stderr)
                    await accept_round(gateway, args, deadline)
            for gateway in gateways:
                report[f"accept_{gateway.name}"] = summarise_rounds(gateway) | {
                    "gateway_peak_rss_mb": round(peak_rss_mb(gateway.pid), 1),
                    "gateway_rss_mb": rss_mb(gateway.pid),
                }
            if args.list_round:
                print("accept round while listing: held", file=sys.stderr)
                report["accept_held_while_listing"] = await accept_while_listing(
                    held_gw, args, deadline
                )
            held_rows = len(
                await asyncio.to_thread(
                    control.request, held_gw.setup.config.control_socket, "queue.list", state="held"
                )
            )
            report["held_rows_after_load"] = held_rows
        finally:
            for gateway in gateways:
                status = await asyncio.to_thread(stop_daemon, gateway)
                if gateway.process is not None:
                    problems, samples = log_problems(gateway.process)
                    report[f"log_{gateway.name}"] = {
                        "exit_status": status,
                        "problems": dict(problems),
                        "samples": samples[:5],
                    }
                gateway.server.close()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(gateway.server.wait_closed(), 5)
            for folder in harness.CONTROL_DIRS[controls_before:]:
                shutil.rmtree(folder, ignore_errors=True)
            del harness.CONTROL_DIRS[controls_before:]
            cleanup_started = time.perf_counter()
    report["cleanup_s"] = round(time.perf_counter() - cleanup_started, 1)
    return report


async def measure_held(
    gateway: Gateway, args: argparse.Namespace, deadline: float, report: dict[str, Any]
) -> None:
    """Start the daemon over the seeded spool and time its start, index and queue commands."""
    report["held_start_s"] = round(await start_daemon(gateway, deadline), 2)
    path = gateway.setup.config.control_socket
    seconds, tries, rows = await asyncio.to_thread(wait_for_index, path, args.held, deadline)
    report["index_ready_after_started_s"] = round(seconds, 2)
    report["index_ready_tries"] = tries
    report["held_rows"] = rows
    report["held_rss_idle_mb"] = rss_mb(gateway.pid)
    report["held_peak_rss_after_index_mb"] = round(peak_rss_mb(gateway.pid), 1)
    print(
        f"daemon started in {report['held_start_s']} s; index ready {seconds:.2f} s later",
        file=sys.stderr,
    )
    first_ref = (await asyncio.to_thread(control.request, path, "queue.list", state="held"))[
        args.held // 2
    ]["ref"]
    runs = args.runs
    setup = gateway.setup
    report["cli_list_held"] = await asyncio.to_thread(
        time_cli, setup, ["queue", "list", "--state", "held", "--json"], runs
    )
    report["cli_list_held_text"] = await asyncio.to_thread(
        time_cli, setup, ["queue", "list", "--state", "held"], runs
    )
    report["control_list_held"] = await asyncio.to_thread(
        time_control, path, runs, "queue.list", state="held"
    )
    report["cli_list_held_nhs"] = await asyncio.to_thread(
        time_cli, setup, ["queue", "list", "--state", "held", "--domain", "nhs.net", "--json"], runs
    )
    report["control_list_held_nhs"] = await asyncio.to_thread(
        time_control, path, runs, "queue.list", state="held", domain="nhs.net"
    )
    report["cli_list_empty"] = await asyncio.to_thread(
        time_cli, setup, ["queue", "list", "--state", "deferred", "--json"], runs
    )
    report["cli_show"] = await asyncio.to_thread(
        time_cli, setup, ["queue", "show", first_ref, "--json"], runs
    )
    report["control_show"] = await asyncio.to_thread(
        time_control, path, runs, "queue.show", ref=first_ref
    )
    report["cli_version"] = await asyncio.to_thread(time_cli, setup, ["--version"], runs)


# -- output -------------------------------------------------------------------------------------


def verdicts(report: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    held, empty = report["accept_held"], report["accept_empty"]
    ratio = (
        round(held["accepted_per_s"] / empty["accepted_per_s"], 3)
        if held["accepted_per_s"] and empty["accepted_per_s"]
        else None
    )
    p99 = (
        round(held["data_to_250_p99_ms"] / empty["data_to_250_p99_ms"], 3)
        if empty["data_to_250_p99_ms"]
        else None
    )
    cli = report["cli_list_held"]["seconds"]["median"]
    return {
        "accept_ratio_held_over_empty": ratio,
        "p99_ratio_held_over_empty": p99,
        "list_under_goal": cli < args.goal and report["cli_list_held"].get("rows") == args.held,
        "accept_not_hurt": ratio is not None and ratio >= args.min_ratio,
        "complete": not held["timed_out"]
        and not empty["timed_out"]
        and held["accepted"] == held["attempted"] == args.messages * args.rounds
        and empty["accepted"] == empty["attempted"] == args.messages * args.rounds,
    }


def fmt(timing: dict[str, Any]) -> str:
    s = timing["seconds"]
    return f"{s['min']:.3f} / {s['median']:.3f} / {s['max']:.3f} s"


def render(report: dict[str, Any], args: argparse.Namespace) -> str:
    seeding = report["seeding"]
    held, empty, v = report["accept_held"], report["accept_empty"], report["verdicts"]
    parts = report["control_list_held"]["parts_median_s"]
    lines = [
        f"held messages        {report['held']} (rows listed: {report['held_rows']})",
        (
            f"seeding (setup)      {seeding['seconds']} s, {seeding['workers']} workers, "
            f"{seeding['fsync']}: not part of the figures"
        ),
        (
            f"daemon start         {report['held_start_s']} s to daemon_started "
            f"(empty gateway: {report['empty_start_s']} s)"
        ),
        (
            f"index ready          {report['index_ready_after_started_s']} s after "
            f"daemon_started (upper bound: the first full held list returned; "
            f"{report['index_ready_tries']} requests)"
        ),
        "",
        f"{'command (min / median / max of ' + str(args.runs) + ')':<50}{'time':<28}output",
    ]
    table = [
        ("gateway queue list --state held --json", report["cli_list_held"]),
        ("gateway queue list --state held (text)", report["cli_list_held_text"]),
        ("control.request queue.list state=held", report["control_list_held"]),
        ("gateway queue list --state held --domain nhs.net", report["cli_list_held_nhs"]),
        ("control.request queue.list held nhs.net", report["control_list_held_nhs"]),
        ("gateway queue list --state deferred --json", report["cli_list_empty"]),
        ("gateway queue show REF --json", report["cli_show"]),
        ("control.request queue.show", report["control_show"]),
        ("gateway --version (CLI start-up)", report["cli_version"]),
    ]
    for label, timing in table:
        size = timing.get("output_bytes", timing.get("answer_bytes", 0))
        rows = f", {timing['rows']} rows" if "rows" in timing else ""
        lines.append(f"{label:<50}{fmt(timing):<28}{size / 1e6:.2f} MB{rows}")
    lines += [
        (
            f"  held list, taken apart (medians): daemon until first byte {parts['first_byte']} s, "
            f"transfer {parts['transfer']} s, client JSON decode {parts['decode']} s"
        ),
        (
            f"goal: queue list < {args.goal} s            "
            f"{'MET' if v['list_under_goal'] else 'NOT MET'} "
            f"(CLI median {report['cli_list_held']['seconds']['median']} s)"
        ),
        "",
        (
            f"accept load          {args.messages} messages x {args.rounds} rounds per gateway, "
            f"concurrency {args.concurrency}, alternating; {report['cpus']} CPUs"
        ),
        f"{'':<30}{'held ' + str(report['held']):>16}{'empty':>16}{'ratio':>10}",
    ]
    rows = [
        ("accepted/s (mean of rounds)", "accepted_per_s", v["accept_ratio_held_over_empty"]),
        ("end of DATA -> 250 p50 ms", "data_to_250_p50_ms", None),
        ("end of DATA -> 250 p99 ms", "data_to_250_p99_ms", v["p99_ratio_held_over_empty"]),
        ("end of DATA -> 250 max ms", "data_to_250_max_ms", None),
        ("gateway CPU ms/message", "gateway_cpu_ms_per_message", None),
        ("gateway peak RSS MB (VmHWM)", "gateway_peak_rss_mb", None),
        ("load generator CPU s", "loadgen_cpu_s", None),
    ]
    for label, key, ratio in rows:
        lines.append(
            f"{label:<30}{held[key]!s:>16}{empty[key]!s:>16}{'' if ratio is None else ratio:>10}"
        )
    lines += [
        (
            f"accepted/s per round          held {held['accepted_per_s_each']}, "
            f"empty {empty['accepted_per_s_each']}"
        ),
        (
            f"accepted / attempted          held {held['accepted']}/{held['attempted']}, "
            f"empty {empty['accepted']}/{empty['attempted']}"
        ),
        (
            f"idle RSS MB                   held {report['held_rss_idle_mb']} (index loaded), "
            f"empty {report['empty_rss_idle_mb']}"
        ),
        (
            f"p99 per round (ms)            held {held['data_to_250_p99_ms_each']}, "
            f"empty {empty['data_to_250_p99_ms_each']}"
        ),
    ]
    during = report.get("accept_held_while_listing")
    if during:
        data = during["data_to_250_ms"]
        lines.append(
            f"held, while listing           {during['accepted_per_s']} accepted/s "
            f"({during['accepted']}/{during['attempted']}), end of DATA -> 250 p50 {data['p50']} "
            f"ms, p99 {data['p99']} ms, max {data['max']} ms; {during['list_requests']} held "
            f"lists meanwhile (median {during['list_seconds_median']} s each)"
        )
    lines += [
        (
            f"goal: accept not hurt         {'MET' if v['accept_not_hurt'] else 'NOT MET'} "
            f"(held/empty {v['accept_ratio_held_over_empty']}, threshold {args.min_ratio})"
        ),
    ]
    for name in ("held", "empty"):
        problems = report.get(f"log_{name}", {})
        lines.append(
            f"gateway log ({name:<5})           exit {problems.get('exit_status')}, "
            f"{problems.get('problems') or 'no warnings or errors'}"
        )
        lines.extend(f"  {sample}" for sample in problems.get("samples", []))
    if report.get("log_held", {}).get("problems", {}).get("warning:control_request_dropped"):
        lines.append(
            "  (control_request_dropped: one per CLI queue command, from its daemon_running()"
            " probe, which connects and closes without a request)"
        )
    for name, found in (("held", held), ("empty", empty)):
        if found["non_250_replies"] or found["client_errors"]:
            lines.append(
                f"problems ({name})     {found['non_250_replies']} {found['client_errors']}"
            )
    lines.append(f"temporary files removed in {report['cleanup_s']} s")
    return "\n".join(lines)


def main() -> int:
    if len(sys.argv) == 7 and sys.argv[1] == "--seed-worker":
        _, _, config, first, count, total, end = sys.argv
        return seed_worker(Path(config), int(first), int(count), int(total), float(end))
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--held", type=int, default=100_000, help="held messages (100000)")
    parser.add_argument("--messages", type=int, default=1000, help="messages per round (1000)")
    parser.add_argument("--concurrency", type=int, default=20, help="connections at once (20)")
    parser.add_argument("--rounds", type=int, default=2, help="accept rounds per gateway (2)")
    parser.add_argument("--runs", type=int, default=RUNS, help="timed runs per command (5)")
    parser.add_argument(
        "--workers", type=int, default=os.cpu_count() or 1, help="seeding processes (CPUs)"
    )
    parser.add_argument("--goal", type=float, default=2.0, help="queue list bound, s (2)")
    parser.add_argument(
        "--min-ratio", type=float, default=0.9, help="held/empty accept rate at least (0.9)"
    )
    parser.add_argument("--timeout", type=float, default=900.0, help="overall bound, s (900)")
    parser.add_argument(
        "--round-timeout", type=float, default=180.0, help="bound per accept round, s (180)"
    )
    parser.add_argument(
        "--no-list-round",
        dest="list_round",
        action="store_false",
        help="skip the extra accept round run while `queue list` repeats",
    )
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = parser.parse_args()
    if min(args.held, args.messages, args.concurrency, args.rounds, args.runs, args.workers) < 1:
        parser.error("counts must be >= 1")
    if args.timeout <= 0 or args.round_timeout <= 0:
        parser.error("timeouts must be > 0")
    logging.getLogger("mail.log").setLevel(logging.WARNING)
    try:
        report = asyncio.run(asyncio.wait_for(bench(args), args.timeout + 60))
    except (BenchError, TimeoutError, subprocess.SubprocessError, OSError) as exc:
        print(f"bench/hold_queue.py: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    report["verdicts"] = verdicts(report, args)
    print(json.dumps(report, indent=2) if args.json else render(report, args))
    v = report["verdicts"]
    ok = v["list_under_goal"] and v["accept_not_hurt"] and v["complete"]
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
