"""Crash trials: load through a real gateway, SIGKILL at random moments, restart, check.

    .venv/bin/python bench/crash.py --trials 200 --seed 1 [--timeout 3600] [--keep]

Each trial (tests/crashlib.py, shared with tests/test_crash.py) builds a fresh gateway under a
temporary folder with a receiver in this process that takes the secure routes and gmail.com,
runs client threads sending messages with unique tokens, kills the gateway with SIGKILL after a
random number of 250s or a random delay, restarts it on the same spool, audit log and keys with
no repair by hand, waits until every 250 has been delivered (bounded), stops it with SIGTERM and
checks the invariants (see tests/crashlib.py). Trial i runs with seed `--seed + i`, so one trial
is reproduced with `--seed <its seed> --trials 1`.

Prints one line per trial and a final table; exits 1 on any violation (or if --timeout ran out
before all trials ran). A duplicate whose first copy came from the killed gateway before its
`delivered` record was durable is counted as crash_window_unrecorded: explained by the timing,
not by the audit log; --strict-audit makes those fail the run too. Loopback only; every process
is stopped by its own PID.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import sys
import tempfile
import time
from collections import Counter
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import logging  # noqa: E402

import trustme  # noqa: E402

from gateway import tls  # noqa: E402
from tests.crashlib import DUPLICATE_KINDS, OUTCOMES, Settings, TrialResult, run_trial  # noqa: E402

# aiosmtpd logs every sender at INFO, and a traceback for each session the kill cuts off.
logging.getLogger("mail.log").setLevel(logging.CRITICAL)


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=200)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--timeout", type=float, default=3600.0, help="whole run, seconds")
    parser.add_argument("--clients", type=int, default=Settings.clients)
    parser.add_argument("--keep", action="store_true", help="keep the folders of failed trials")
    parser.add_argument(
        "--strict-audit",
        action="store_true",
        help="also fail on duplicates the audit log cannot explain (crash_window_unrecorded)",
    )
    return parser.parse_args(argv)


def table(results: list[TrialResult], seconds: float, planned: int) -> list[str]:
    outcomes = Counter({o: sum(r.count(o) for r in results) for o in OUTCOMES})
    duplicates: Counter[str] = Counter()
    for result in results:
        duplicates.update(result.duplicates)
    failed = [r for r in results if r.violations]
    rows = [
        ("trials run", f"{len(results)} of {planned}"),
        ("messages sent", str(sum(len(r.sent) for r in results))),
        *((f"  {o}", str(outcomes[o])) for o in OUTCOMES),
        ("delivered copies", str(sum(r.copies for r in results))),
        ("UNK delivered", str(sum(r.unk_delivered for r in results))),
        ("held notices delivered", str(sum(r.notices for r in results))),
        ("duplicates explained", str(sum(duplicates.values()))),
        *((f"  {kind}", str(duplicates[kind])) for kind in DUPLICATE_KINDS),
        ("duplicates unexplained", str(sum(r.unexplained for r in results))),
        ("restarts that removed spool leftovers", str(sum(r.recovered > 0 for r in results))),
        ("torn audit lines repaired", str(sum(r.repaired for r in results))),
        ("trials with violations", str(len(failed))),
        ("violations", str(sum(len(r.violations) for r in results))),
        ("wall time", f"{seconds:.0f} s"),
    ]
    width = max(len(name) for name, _ in rows)
    return [f"{name:<{width}}  {value}" for name, value in rows]


async def run(args: argparse.Namespace) -> int:
    ca = trustme.CA()
    work = Path(tempfile.mkdtemp(prefix="crash-trials-"))
    cert = ca.issue_cert("localhost", "127.0.0.1")
    cert.cert_chain_pems[0].write_to_path(str(work / "cert.pem"))
    cert.private_key_pem.write_to_path(str(work / "key.pem"))
    server_context = tls.server_context(work / "cert.pem", work / "key.pem")
    settings = replace(Settings(), clients=args.clients)
    results: list[TrialResult] = []
    started = time.monotonic()
    try:
        for number in range(args.trials):
            if time.monotonic() - started > args.timeout:
                print(f"--timeout {args.timeout:.0f} s reached after {number} trials")
                break
            root = work / f"trial-{number}"
            root.mkdir()
            result = await run_trial(
                root, ca, server_context, seed=args.seed + number, settings=settings
            )
            results.append(result)
            print(f"trial {number:3d} {result.summary()}", flush=True)
            for violation in result.violations:
                print(f"    VIOLATION {violation}", flush=True)
            if result.violations and args.keep:
                print(f"    kept {root}", flush=True)
            else:
                shutil.rmtree(root, ignore_errors=True)
    finally:
        if not any(r.violations for r in results) or not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    seconds = time.monotonic() - started
    print()
    for line in table(results, seconds, args.trials):
        print(line)
    ok = len(results) == args.trials and not any(r.violations for r in results)
    if args.strict_audit and any(r.duplicates["crash_window_unrecorded"] for r in results):
        print("--strict-audit: duplicates without an audit record explaining them")
        ok = False
    return 0 if ok else 1


def main(argv: list[str] | None = None) -> int:
    return asyncio.run(run(parse_args(sys.argv[1:] if argv is None else argv)))


if __name__ == "__main__":
    sys.exit(main())
