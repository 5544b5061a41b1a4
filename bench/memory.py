"""Memory benchmark: the gateway's memory while many clients send it big messages at once.

    .venv/bin/python bench/memory.py [--sessions 200] [--size-mb 10] [--rounds 5] [--json]

What it checks (the issue): DATA is streamed to the encrypted spool as it arrives, so S
concurrent sessions (200) sending 10 MB messages keep the gateway under 300 MB in all; a client
that exceeds the size limit costs no more memory than one that does not; memory is flat over a
long run.

Built from nothing in a temporary folder and torn down afterwards, loopback only:

- a trustme CA; one certificate for "localhost"/127.0.0.1 for the sink, one for the gateway;
- a receiving sink (aiosmtpd with STARTTLS required, `data_size_limit` twice the gateway's
  limit) in a process of its own, so its memory is not the gateway's. It keeps no bodies: per
  message it reads the X-Bench-Id header, counts it (distinct, per phase) and drops the rest;
- the gateway as a real subprocess (`tests.harness.make_setup` and `GatewayProcess`): TLS in,
  verified TLS out, encrypted spool, audit log, DKIM, `max_message_size` the message size plus
  at least 0.5 MB rounded up to a whole MiB (11 MiB for 10 MB), `max_connections` and
  `max_connections_per_address` raised to at least S (every client comes from 127.0.0.1), the
  rest as shipped (`[delivery] concurrency` 20). A fresh gateway, in a folder of its own, for
  each of the three phases below, so that "over" starts from the same idle state as "fit"
  (memory a process has once touched mostly stays with it: in one process, "over" would start
  where "fit" left off).

The client is one asyncio process with a minimal SMTP client on asyncio streams: per session
connect, EHLO, STARTTLS (verified against the CA, name "localhost"), EHLO, MAIL, RCPT
lead@nhs.net, DATA, the message, QUIT; all S sessions of a phase start at once. The message
body (76-byte text lines: 74 characters and CRLF) is built once per size and shared by every
session; each message adds only its own small header section carrying a unique X-Bench-Id. The
body is written in 64 KiB slices of that one object, each followed by `drain()`, so the client
holds one copy of the body, not S.

Phases, in order, each bounded by --timeout (every round of "long" is a phase of its own):

- fit: S sessions at once, each a message of --size-mb MB (10 MB); then wait until the sink has
  every accepted message (distinct by X-Bench-Id);
- over: S sessions at once, each a message over the limit (--size-mb + 2 MB, 12 MB against
  11 MiB, no SIZE= at MAIL, so the limit is met while reading DATA); every one must get the
  gateway's `552 5.3.4` at the end of DATA, and none may be delivered;
- long: --rounds rounds (5) of phase fit in a row in one gateway; after each round is
  delivered, the gateway's settled PSS is recorded (see below).

Memory figures, of the gateway's process tree (the process and any children, re-read each time):

- peak PSS: the largest sum of "Pss:" from /proc/<pid>/smaps_rollup, sampled every 0.2 s by a
  thread from the start of the phase until its last message is delivered (so it covers both
  receiving and delivering), with the time of the peak from the start of the phase, and the
  first sample ("start");
- VmHWM: the largest resident set (RSS high-water mark) of each process, summed, over the phase:
  it is reset at the start of each phase (writing 5 to /proc/<pid>/clear_refs) when the kernel
  allows it, else it counts from the gateway's start (the report says which). Unlike sampled PSS
  it misses no short spike, but counts shared pages (libraries) in full;
- settled PSS: one second after the phase's last delivery, the median of five samples 0.2 s
  apart. "Long run growth" is the settled PSS after the last round minus after the first.

MB here is 10^6 bytes (message sizes and memory alike). Also reported per phase: accepted and
delivered counts, non-250 replies by step and code, client-side errors, the time to send and to
deliver, and the CPU seconds of the gateway and of the sink; for the whole run, the gateway's
warning and error log events (in phase "over" one `message_refused` warning per session is
expected).

Verdicts, each yes or no; the exit status is 0 only when all are yes:

- fit: peak PSS < --max-pss-mb (300); every session accepted and every message delivered;
- over: every session got 552 and nothing of it was delivered; its peak PSS <= fit's peak PSS
  plus --tolerance-mb (5: two samplings of the same load differ by a few MB), with the ratio;
- long: every round complete and its peak PSS < --max-pss-mb; the settled PSS after the last
  round is at most --max-growth-mb (10) above the one after the first.

Bounded: every session and every wait by its phase's deadline, the whole run by --budget (which
keeps 30 s of it for stopping the gateway and the sink by their own PIDs). The soft limit on
open files is raised to the hard limit first: each side holds S sockets.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import math
import os
import ssl
import statistics
import sys
import tempfile
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trustme
from aiosmtpd.smtp import SMTP
from common import (
    Client,
    CountingSink,
    HelperProcess,
    Outcomes,
    RefusedError,
    answer_requests,
    log_problems,
    make_head,
    raise_nofile,
    server_context,
    stop_gateway,
    write_cert_files,
)
from procstat import (
    SAMPLE_EVERY,
    PssSampler,
    cell,
    descendants,
    proc_kib,
    pss_kib,
    tree_cpu,
)

# Importable once `common` has put the project root on sys.path.
from tests.harness import GatewayProcess, make_setup

MB = 1_000_000
MIB = 1024 * 1024
WRITE_PIECE = 64 * 1024
LINE_TEXT = b"safeguarding chronology: contact, concern, action taken, outcome."  # 65 bytes
TEARDOWN_S = 30.0


# -- /proc: memory of a process tree (the rest: common) -----------------------------------------


def hwm_kib(root: int) -> int:
    """VmHWM (peak resident set) summed over a process tree, in KiB."""
    return sum(proc_kib(f"/proc/{pid}/status", "VmHWM:") for pid in descendants(root))


def reset_hwm(root: int) -> bool:
    """Reset VmHWM of every process in the tree (clear_refs 5); False if the kernel refused."""
    try:
        for pid in descendants(root):
            Path(f"/proc/{pid}/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def mb(kib: float) -> float:
    """KiB to MB (10^6 bytes), one decimal."""
    return round(kib * 1024 / MB, 1)


async def settled_pss_kib(root: int) -> int:
    """After a second's rest, the median of five PSS samples 0.2 s apart."""
    await asyncio.sleep(1.0)
    values = []
    for _ in range(5):
        values.append(pss_kib(descendants(root)))
        await asyncio.sleep(SAMPLE_EVERY)
    return int(statistics.median(values))


# -- the sink: a process of its own -------------------------------------------------------------


def sink_main(folder: Path, limit: int) -> int:
    """Run the sink, print its port, answer each `stat` line on stdin; stop at EOF."""
    logging.getLogger("mail.log").setLevel(logging.WARNING)
    context = server_context(folder)
    handler = CountingSink()

    def snapshot() -> dict[str, Any]:
        return {
            "received": handler.received,
            "distinct": len(handler.ids),
            "by_phase": dict(handler.by_phase),
            "without_tag": handler.without_tag,
            "without_decision": handler.received - handler.decision,
            "largest": handler.largest,
        }

    async def serve() -> None:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(
            lambda: SMTP(
                handler,
                data_size_limit=limit,
                tls_context=context,
                require_starttls=True,
                hostname="localhost",
                ident="bench sink",
            ),
            "127.0.0.1",
            0,
            backlog=512,
        )
        port = server.sockets[0].getsockname()[1]
        await answer_requests({"port": port}, {"stat": snapshot})
        server.close()

    asyncio.run(serve())
    return 0


class SinkProcess(HelperProcess):
    """The sink subprocess: its port; its counts."""

    def __init__(self, folder: Path, limit: int) -> None:
        super().__init__(__file__, ["--sink-process", str(folder), str(limit)], name="the sink")
        self.port: int = self.ready["port"]

    def stat(self) -> dict[str, Any]:
        return self.ask("stat")


# -- messages -----------------------------------------------------------------------------------


def make_body(size: int) -> bytes:
    """`size` bytes of 76-byte numbered text lines (no line starts with a dot)."""
    full, rest = divmod(size, 76)
    if 0 < rest < 3 and full:
        full, rest = full - 1, rest + 76
    lines = [b"%08d %s\r\n" % (number % 10**8, LINE_TEXT) for number in range(full)]
    if rest:
        lines.append(b"x" * (rest - 2) + b"\r\n")
    return b"".join(lines)


@dataclass(frozen=True)
class Load:
    """What a phase sends: one shared body, a head per message, the reply expected at the dot."""

    body: bytes
    expect: int

    def size(self, tag: str) -> int:
        return len(make_head(tag)) + len(self.body)


def make_load(total: int, longest_tag: str, expect: int) -> Load:
    """A message of `total` bytes (with the longest head), its body built once."""
    return Load(make_body(total - len(make_head(longest_tag))), expect)


# -- the client ---------------------------------------------------------------------------------


class StreamingClient(Client):
    """The minimal client of common, writing a message's body in slices."""

    async def message(self, head: bytes, body: bytes) -> tuple[int, str]:
        """Write head, the shared body in 64 KiB slices (drained), the final dot; the reply."""
        self.step = "dot"
        writer = self._writer()
        writer.write(head)
        view = memoryview(body)
        for start in range(0, len(view), WRITE_PIECE):
            writer.write(view[start : start + WRITE_PIECE])
            await writer.drain()
        writer.write(b".\r\n")
        await writer.drain()
        return await self.reply("dot")


@dataclass
class Results(Outcomes):
    accepted: int = 0
    refused_as_expected: int = 0  # phase "over": the 552 at the dot
    session_s: list[float] = field(default_factory=list)
    last_reply: float = 0.0


async def send_one(
    port: int,
    context: ssl.SSLContext,
    tag: str,
    load: Load,
    *,
    results: Results,
    deadline: float,
) -> None:
    """One session; every outcome lands in `results`, nothing is raised."""
    loop = asyncio.get_running_loop()
    client = StreamingClient()
    started = loop.time()
    results.attempted += 1
    with results.recording(client):
        async with asyncio.timeout_at(deadline):
            await client.hello(port, context)
            await client.envelope()
            code, text = await client.message(make_head(tag), load.body)
            results.last_reply = loop.time()
            results.session_s.append(results.last_reply - started)
            if code == 250:
                results.accepted += 1
            else:
                results.refused("dot", code, text)
                results.refused_as_expected += code == load.expect
            with contextlib.suppress(RefusedError, OSError):
                await client.command("quit", b"QUIT\r\n", 221)


# -- one phase ----------------------------------------------------------------------------------


@dataclass
class Target:
    """The running gateway and sink, and how to reach them."""

    pid: int
    port: int
    context: ssl.SSLContext
    sink: SinkProcess


async def wait_delivered(sink: SinkProcess, phase: str, target: int, deadline: float) -> int:
    """Poll the sink until it holds `target` distinct messages of `phase` or the deadline."""
    loop = asyncio.get_running_loop()
    while True:
        state = await asyncio.to_thread(sink.stat)
        have = int(state["by_phase"].get(phase, 0))
        if have >= target or loop.time() >= deadline:
            return have
        await asyncio.sleep(0.25)


async def run_phase(
    name: str, target: Target, load: Load, sessions: int, deadline: float
) -> dict[str, Any]:
    """S sessions at once, then wait for delivery, sampling the gateway's PSS throughout."""
    loop = asyncio.get_running_loop()
    hwm_reset = reset_hwm(target.pid)
    cpu_before, sink_cpu_before = tree_cpu(target.pid)[0], tree_cpu(target.sink.pid)[0]
    sampler = PssSampler(target.pid)
    sampler.start()
    results = Results()
    started = loop.time()
    try:
        async with asyncio.TaskGroup() as group:
            for number in range(sessions):
                tag = f"{name}-{number}"
                group.create_task(
                    send_one(
                        target.port, target.context, tag, load, results=results, deadline=deadline
                    )
                )
        sent = loop.time()
        delivered = await wait_delivered(target.sink, name, results.accepted, deadline)
        done = loop.time()
        timed_out = delivered < results.accepted or any(
            key.endswith(" TimeoutError") for key in results.errors
        )
        settled = None if timed_out else await settled_pss_kib(target.pid)
    finally:
        sampler.finish()
    return {
        "phase": name,
        "sessions": sessions,
        "message_bytes": load.size(f"{name}-{sessions - 1}"),
        "attempted": results.attempted,
        "accepted": results.accepted,
        "refused_as_expected": results.refused_as_expected,
        "delivered": delivered,
        "timed_out": timed_out,
        "send_s": round(sent - started, 1),
        "send_and_deliver_s": round(done - started, 1),
        "session_s": {
            "p50": round(statistics.median(results.session_s), 1) if results.session_s else None,
            "max": round(max(results.session_s), 1) if results.session_s else None,
        },
        "start_pss_mb": mb(sampler.first_kib or 0),
        "peak_pss_mb": mb(sampler.peak_kib),
        "peak_at_s": round(sampler.peak_at, 1),
        "pss_samples": sampler.samples,
        "settled_pss_mb": mb(settled) if settled is not None else None,
        "vmhwm_mb": mb(hwm_kib(target.pid)),
        "vmhwm_since": "phase start" if hwm_reset else "gateway start",
        "gateway_cpu_s": round(tree_cpu(target.pid)[0] - cpu_before, 1),
        "sink_cpu_s": round(tree_cpu(target.sink.pid)[0] - sink_cpu_before, 1),
        "non_250_replies": dict(results.replies),
        "client_errors": dict(results.errors),
        "first_error_text": results.first_error,
    }


# -- the whole run ------------------------------------------------------------------------------


def limits(size_mb: float) -> tuple[int, int, int]:
    """(message bytes, the gateway's max_message_size, over-limit message bytes)."""
    size = round(size_mb * MB)
    limit = math.ceil((size + MB // 2) / MIB) * MIB
    return size, limit, size + 2 * MB


@contextlib.asynccontextmanager
async def running_gateway(
    folder: Path, ca: trustme.CA, sink: SinkProcess, server_extra: str, record: dict[str, Any]
) -> AsyncIterator[Target]:
    """A fresh gateway subprocess; stopped by its PID at the end, its log summed up in `record`."""
    setup = make_setup(folder, ca, receiver_port=sink.port, server_extra=server_extra)
    record["delivery_concurrency"] = setup.config.delivery.concurrency
    process = GatewayProcess(setup)
    try:
        port = await asyncio.to_thread(process.start)
        if process.proc is None:
            raise RuntimeError("the gateway did not start")
        target = Target(process.proc.pid, port, setup.client_context, sink)
        record["idle_pss_mb"] = mb(await settled_pss_kib(target.pid))
        yield target
    finally:
        record["exit_status"] = await asyncio.to_thread(stop_gateway, process)
        record["log_problems"], record["log_samples"] = log_problems(process.output)


async def bench(args: argparse.Namespace, nofile: int) -> dict[str, Any]:
    """Set up, run the phases, tear down; --budget bounds it all."""
    loop = asyncio.get_running_loop()
    started = loop.time()
    work_deadline = started + args.budget - TEARDOWN_S
    size, limit, over = limits(args.size_mb)
    cap = max(200, args.sessions + 10)
    report: dict[str, Any] = {
        "host": {"cpus": os.cpu_count(), "loadavg_before": os.getloadavg()},
        "sessions": args.sessions,
        "rounds": args.rounds,
        "message_bytes": size,
        "over_bytes": over,
        "max_message_size": limit,
        "max_connections": cap,
        "open_files_limit": nofile,
        "max_pss_mb": args.max_pss_mb,
        "tolerance_mb": args.tolerance_mb,
        "max_growth_mb": args.max_growth_mb,
        "gateways": [],
        "phases": [],
        "skipped": [],
    }
    server_extra = (
        f"max_message_size = {limit}\n"
        f"max_connections = {cap}\n"
        f"max_connections_per_address = {cap}\n"
    )
    longest = f"long{args.rounds}-{args.sessions - 1}"
    fit = make_load(size, longest, 250)
    over_limit = make_load(over, longest, 552)
    # One fresh gateway per phase: each starts from the same idle state.
    plan = [
        ("fit", [("fit", fit)]),
        ("over", [("over", over_limit)]),
        ("long", [(f"long{n}", fit) for n in range(1, args.rounds + 1)]),
    ]
    ca = trustme.CA()
    with tempfile.TemporaryDirectory(prefix="gateway-memory-") as tmp:
        root = Path(tmp)
        write_cert_files(ca, root / "sink")
        sink = await asyncio.to_thread(SinkProcess, root / "sink", 2 * limit)
        try:
            for group, phases in plan:
                if work_deadline - loop.time() < 20:
                    report["skipped"].extend(f"{name}: over --budget" for name, _ in phases)
                    continue
                record: dict[str, Any] = {"phase": group}
                report["gateways"].append(record)
                async with running_gateway(root / group, ca, sink, server_extra, record) as target:
                    for name, load in phases:
                        if work_deadline - loop.time() < 10:
                            report["skipped"].append(f"{name}: over --budget")
                            continue
                        print(
                            f"... {name}: {args.sessions} sessions x {load.size(longest)} bytes",
                            file=sys.stderr,
                        )
                        deadline = min(loop.time() + args.timeout, work_deadline)
                        report["phases"].append(
                            await run_phase(name, target, load, args.sessions, deadline)
                        )
            report["sink"] = await asyncio.to_thread(sink.stat)
            report["sink_vmhwm_mb"] = mb(hwm_kib(sink.pid))
        finally:
            await asyncio.to_thread(sink.stop)
    report["wall_s"] = round(loop.time() - started, 1)
    report["host"]["loadavg_after"] = os.getloadavg()
    report["verdicts"] = verdicts(report)
    return report


def verdicts(report: dict[str, Any]) -> list[dict[str, Any]]:
    """One line per requirement, each with ok true or false."""
    found: list[dict[str, Any]] = []

    def add(text: str, ok: object) -> None:
        found.append({"verdict": text, "ok": bool(ok)})

    sessions, cap = report["sessions"], report["max_pss_mb"]
    phases = {phase["phase"]: phase for phase in report["phases"]}
    by_phase = report.get("sink", {}).get("by_phase", {})

    def complete(phase: dict[str, Any]) -> bool:
        return phase["accepted"] == sessions == phase["delivered"] and not phase["timed_out"]

    fit = phases.get("fit")
    if fit is None:
        add("fit: not run", ok=False)
    else:
        add(f"fit: peak PSS {fit['peak_pss_mb']} MB < {cap:g} MB", fit["peak_pss_mb"] < cap)
        add(
            f"fit: accepted {fit['accepted']}/{sessions}, "
            f"delivered {fit['delivered']}/{fit['accepted']}",
            complete(fit),
        )
    over = phases.get("over")
    if over is None:
        add("over: not run", ok=False)
    else:
        delivered = by_phase.get("over", 0)
        add(
            f"over: 552 to {over['refused_as_expected']}/{sessions} sessions, "
            f"{delivered} delivered",
            over["refused_as_expected"] == sessions and not delivered,
        )
        if fit is not None:
            ratio = over["peak_pss_mb"] / fit["peak_pss_mb"] if fit["peak_pss_mb"] else math.inf
            tolerance = report["tolerance_mb"]
            add(
                f"over-limit peak {over['peak_pss_mb']} MB <= fit peak {fit['peak_pss_mb']} MB"
                f"{f' + {tolerance:g} MB' if tolerance else ''} (ratio {ratio:.2f})",
                over["peak_pss_mb"] <= fit["peak_pss_mb"] + tolerance,
            )
    rounds = report["rounds"]
    runs = [phases[name] for n in range(1, rounds + 1) if (name := f"long{n}") in phases]
    if not runs:
        add(f"long: 0/{rounds} rounds run", ok=False)
        return found
    peak = max(phase["peak_pss_mb"] for phase in runs)
    add(f"long: peak PSS {peak} MB < {cap:g} MB in every round", peak < cap)
    done = sum(complete(phase) for phase in runs)
    add(f"long: {done}/{rounds} rounds with every message accepted and delivered", done == rounds)
    settled = [phase["settled_pss_mb"] for phase in runs]
    if len(settled) < 2 or None in settled:
        add(f"long run growth: unknown (settled PSS after each round: {settled})", ok=False)
    else:
        growth = settled[-1] - settled[0]
        add(
            f"long run growth: {growth:+.1f} MB over {len(settled)} rounds "
            f"(<= {report['max_growth_mb']:g} MB)",
            growth <= report["max_growth_mb"],
        )
    return found


def render(report: dict[str, Any]) -> str:
    host = report["host"]
    delivery = next(
        (g["delivery_concurrency"] for g in report["gateways"] if "delivery_concurrency" in g), "-"
    )
    lines = [
        (
            f"{report['sessions']} sessions at once; messages {report['message_bytes']} bytes, "
            f"over-limit {report['over_bytes']} bytes, max_message_size "
            f"{report['max_message_size']} ({report['max_message_size'] / MIB:g} MiB); "
            f"delivery concurrency {delivery}"
        ),
        (
            f"host: {host['cpus']} CPUs, load average before "
            f"{' '.join(f'{x:.2f}' for x in host['loadavg_before'])}, after "
            f"{' '.join(f'{x:.2f}' for x in host['loadavg_after'])}; "
            f"open files limit {report['open_files_limit']}; MB = 10^6 bytes"
        ),
        "",
        (
            f"{'phase':7}{'accepted':>9}{'delivered':>10}{'552':>5}{'send s':>8}{'+deliver s':>11}"
            f"{'start MB':>9}{'peak PSS MB':>12}{'at s':>7}{'settled MB':>11}{'VmHWM MB':>9}"
            f"{'gw CPU s':>9}{'sink CPU s':>11}"
        ),
    ]
    lines.extend(
        f"{phase['phase']:7}{phase['accepted']:>9}{phase['delivered']:>10}"
        f"{phase['refused_as_expected']:>5}{phase['send_s']:>8}"
        f"{phase['send_and_deliver_s']:>11}{phase['start_pss_mb']:>9}{phase['peak_pss_mb']:>12}"
        f"{phase['peak_at_s']:>7}{cell(phase['settled_pss_mb']):>11}"
        f"{phase['vmhwm_mb']:>9}{phase['gateway_cpu_s']:>9}{phase['sink_cpu_s']:>11}"
        for phase in report["phases"]
    )
    for phase in report["phases"]:
        notes = [
            f"non-250 replies {phase['non_250_replies'] or 'none'}",
            f"client errors {phase['client_errors'] or 'none'}",
        ]
        if phase["first_error_text"]:
            notes.append(f"first error texts {phase['first_error_text']}"[:600])
        if phase["timed_out"]:
            notes.append("TIMED OUT (partial)")
        lines.append(f"  {phase['phase']}: " + "; ".join(notes))
    settled = [p["settled_pss_mb"] for p in report["phases"] if p["phase"].startswith("long")]
    if settled:
        lines.append(f"long run: settled PSS after each round {', '.join(map(cell, settled))} MB")
    if report["phases"]:
        first = report["phases"][0]
        lines.append(
            f"session connect -> reply at the dot (fit): p50 {first['session_s']['p50']} s, "
            f"max {first['session_s']['max']} s; VmHWM since {first['vmhwm_since']}"
        )
    if sink := report.get("sink"):
        lines.append(
            f"sink: {sink['received']} received, {sink['distinct']} distinct, by phase "
            f"{sink['by_phase']}, {sink['without_decision']} without decision header, "
            f"{sink['without_tag']} without X-Bench-Id, largest {sink['largest']} bytes; "
            f"its VmHWM {report['sink_vmhwm_mb']} MB"
        )
    for gateway in report["gateways"]:
        problems = gateway.get("log_problems") or "no warnings or errors"
        lines.append(
            f"gateway for {gateway['phase']}: PSS at idle {gateway.get('idle_pss_mb', '-')} MB; "
            f"log {problems}; exit status {gateway.get('exit_status', '-')}"
        )
        lines.extend(f"  {sample}" for sample in gateway.get("log_samples", [])[:5])
    lines.extend(f"SKIPPED {skipped}" for skipped in report["skipped"])
    lines.append("")
    lines.extend(
        f"{verdict['verdict']}: {'yes' if verdict['ok'] else 'no'}"
        for verdict in report["verdicts"]
    )
    lines.append(f"wall time {report['wall_s']} s")
    return "\n".join(lines)


def main() -> int:
    if len(sys.argv) == 4 and sys.argv[1] == "--sink-process":
        return sink_main(Path(sys.argv[2]), int(sys.argv[3]))
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--sessions", type=int, default=200, help="sessions at once (200)")
    parser.add_argument("--size-mb", type=float, default=10.0, help="message size, MB (10)")
    parser.add_argument("--rounds", type=int, default=5, help="rounds of the long run (5)")
    parser.add_argument("--timeout", type=float, default=300.0, help="bound per phase, s (300)")
    parser.add_argument("--budget", type=float, default=1200.0, help="bound overall, s (1200)")
    parser.add_argument("--max-pss-mb", type=float, default=300.0, help="PSS budget, MB (300)")
    parser.add_argument(
        "--tolerance-mb",
        type=float,
        default=5.0,
        help="over-limit peak may pass the fit peak by this much (sampling noise), MB (5)",
    )
    parser.add_argument(
        "--max-growth-mb", type=float, default=10.0, help="long-run growth allowed, MB (10)"
    )
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = parser.parse_args()
    if args.sessions < 1 or args.size_mb < 0.01 or args.rounds < 2:
        parser.error("--sessions >= 1, --size-mb >= 0.01, --rounds >= 2")
    if args.tolerance_mb < 0 or args.max_growth_mb < 0 or args.max_pss_mb <= 0:
        parser.error("--tolerance-mb and --max-growth-mb >= 0, --max-pss-mb > 0")
    if args.timeout <= 0 or args.budget <= TEARDOWN_S + 10:
        parser.error(f"--timeout > 0, --budget > {TEARDOWN_S + 10:g}")
    logging.getLogger("mail.log").setLevel(logging.WARNING)
    nofile = raise_nofile()  # before the sink and the gateway start: they inherit it
    if nofile < 2 * args.sessions + 100:
        print(f"warning: open files limited to {nofile}", file=sys.stderr)
    report = asyncio.run(bench(args, nofile))
    print(json.dumps(report, indent=2) if args.json else render(report))
    return 0 if all(verdict["ok"] for verdict in report["verdicts"]) else 1


if __name__ == "__main__":
    sys.exit(main())
