"""Transfer-log benchmark: write N records, then time verify, searches and a CSV export.

    .venv/bin/python bench/audit.py [--records 1000000] [--timeout 900] [--keep] [--profile]

Run on demand, not in the tests. The records are written straight to a file in a temporary
folder, in exactly the chain format `gateway.audit.AuditLog` writes (`seq`, `ts`, `event`,
`prev`, `ref` when about a message, then the fields of a `gateway.records` builder, encoded with
`canonical_line` and chained with `line_hash`), without a million awaits and fdatasyncs. The mix
is what a busy gateway writes: about 40% `accepted` (1 to 3 recipients, a quarter held), 40%
`delivered`, 10% `deferred`, 5% `refused` and 5% others (`held`, `bounced`, `policy_loaded`),
over 12 clients, 40 domains and 20,000 addresses, about 2.5 s apart (a month for a million).

Checkpoints: when `gateway.records.checkpoint` exists, every 1000th record and the last are
signed checkpoints made exactly as the writer makes them (fresh Ed25519 key), and `head.json`
holds the last; otherwise the log is a plain chain and the report says so.

Then, each timed on its own: (a) verify: `gateway.audit_verify.verify(folder, public_key)` when
that module exists, else `gateway.audit.verify_chain(folder)`; (b) search by a domain; (c) by
an address's pseudonym; (d) by a one-day time range; (e) CSV export of about 1% of the records
(a seven-hour range) to a file; (f) search with no filter (every line parsed). Figures: records
in the log per second of wall time (rows per second too for the export), matches, and the
process's peak RSS. `--profile` also prints verify's cProfile hot spots.
"""

from __future__ import annotations

import argparse
import cProfile
import hashlib
import importlib
import importlib.util
import io
import pstats
import random
import resource
import signal
import sys
import tempfile
import time
from collections import deque
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey  # noqa: E402
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat  # noqa: E402

from gateway import audit, records  # noqa: E402
from gateway.audit_query import Filters, export_csv, search  # noqa: E402
from gateway.pseudonym import pseudonym  # noqa: E402

START = datetime(2026, 11, 1, tzinfo=UTC)
POLICY = "bcd224fe1d0ffb778317b6f8cbf0111e5e80995cc07459ed33239fb45285ec2e"
KEY = bytes(range(32))
SECURE = [
    "nhs.net",
    "bromley.gcsx.gov.uk",
    "met.pnn.police.uk",
    "kent.pnn.police.uk",
    "lewisham.gov.uk",
    "croydon.gov.uk",
    "cafcass.gov.uk",
    "justice.gov.uk",
]
CLIENTS = [f"agency-{number:02d}" for number in range(12)]
MARKINGS = [None, None, "OFFICIAL", "OFFICIAL-SENSITIVE", "OFFICIAL-SENSITIVE [PERSONAL]"]
TLS = {"version": "TLSv1.3", "cipher": "TLS_AES_256_GCM_SHA384", "verified": True}
CHECKPOINT_EVERY = 1000
FLUSH_EVERY = 10_000


class Generator:
    """Makes the event bodies of a plausible transfer log, reproducibly."""

    def __init__(self, seed: int = 5) -> None:
        self.random = random.Random(seed)
        insecure = [f"partner{number}.example.org" for number in range(24)]
        insecure += ["gmail.com", "outlook.com", "yahoo.co.uk", "btinternet.com"]
        self.domains = SECURE + insecure
        self.secure = frozenset(SECURE)
        self.addresses = []
        for number in range(20_000):
            domain = self.domains[number % len(self.domains)]
            self.addresses.append((domain, pseudonym(KEY, f"user{number}@{domain}")))
        self.senders = [self.addresses[n] for n in range(0, 20_000, 50) if n % 40 < 8]
        self.recent: deque[tuple[str, list[str]]] = deque(maxlen=500)
        self.messages = 0

    def body(self) -> dict[str, Any]:
        draw = self.random.random()
        if draw < 0.40 or not self.recent:
            return self.accepted()
        ref, aliases = self.recent[self.random.randrange(len(self.recent))]
        if draw < 0.80:
            return self.delivery("delivered", ref, aliases, tls=TLS, response=250, reason=None)
        if draw < 0.90:
            return self.delivery(
                "deferred", ref, aliases, tls=None, response=None, reason="connect"
            )
        if draw < 0.95:
            return self.refused()
        if draw < 0.975:
            return records.held(ref=ref, reasons=["entry_expired:nhs.net"], policy=POLICY).body()
        if draw < 0.995:
            return self.delivery("bounced", ref, aliases, tls=TLS, response=550, reason=None)
        return records.policy_loaded(policy=POLICY, source="/etc/gateway/policies").body()

    def accepted(self) -> dict[str, Any]:
        self.messages += 1
        ref = f"SG-01M{self.messages:023d}"
        chosen = self.random.sample(self.addresses, self.random.randint(1, 3))
        recipients = [(d, p, d in self.secure, d if d in self.secure else None) for d, p in chosen]
        reasons = sorted({f"insecure_domain:{d}" for d, _, secure, _ in recipients if not secure})
        sender_domain, sender_alias = self.random.choice(self.senders)
        self.recent.append((ref, [p for _, p in chosen]))
        return records.accepted(
            ref=ref,
            client=self.random.choice(CLIENTS),
            verdict="hold" if reasons else "release",
            reasons=reasons,
            policy=POLICY,
            sender_domain=sender_domain,
            sender_pseudonym=sender_alias,
            recipients=recipients,
            digest="sha256:" + self.random.randbytes(32).hex(),
            size=self.random.randint(2_000, 10_000_000),
            marking=self.random.choice(MARKINGS),
            purpose=None,
        ).body()

    def delivery(self, event, ref, aliases, *, tls, response, reason) -> dict[str, Any]:
        return records.delivery(
            event,
            ref=ref,
            recipients=aliases,
            host="mx.example.net" if response else None,
            tls=tls,
            response=response,
            reason=reason,
        ).body()

    def refused(self) -> dict[str, Any]:
        domain, alias = self.random.choice(self.addresses[len(SECURE) :: len(self.domains)])
        sender_domain, sender_alias = self.random.choice(self.senders)
        return records.refused(
            client=self.random.choice(CLIENTS),
            policy=POLICY,
            sender_domain=sender_domain,
            sender_pseudonym=sender_alias,
            recipient_domain=domain,
            recipient_pseudonym=alias,
            reasons=[f"insecure_domain:{domain}"],
        ).body()


def _checkpoint_maker(signing_key: Ed25519PrivateKey) -> Callable[[int, str, str], bytes] | None:
    """Return (seq, ts, prev) -> signed checkpoint line, if this gateway has checkpoints.

    Mirrors the writer (`gateway.audit`): the record built from `records.checkpoint(head=prev,
    key_id=...)`, then `sig`, the hex Ed25519 signature of its canonical line without `sig`.
    """
    build = getattr(records, "checkpoint", None)
    if build is None:
        return None
    raw = signing_key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    key_id = hashlib.sha256(raw).hexdigest()[:16]

    def line(seq: int, ts: str, prev: str) -> bytes:
        record = _record(seq, ts, prev, build(head=prev, key_id=key_id).body())
        record["sig"] = signing_key.sign(audit.canonical_line(record)).hex()
        return audit.canonical_line(record)

    return line


def _record(seq: int, ts: str, prev: str, body: dict[str, Any]) -> dict[str, Any]:
    record: dict[str, Any] = {"seq": seq, "ts": ts, "event": body["event"], "prev": prev}
    record.update((key, value) for key, value in body.items() if key != "event")
    return record


def write_log(
    folder: Path,
    count: int,
    checkpoint: Callable[[int, str, str], bytes] | None,
) -> Path:
    """Write count records in the writer's exact chain format; return the file.

    With checkpoints, every 1000th record and the last one are checkpoints (as the writer seals
    the log at close), and head.json holds the last one, as the writer leaves it.
    """
    generator = Generator()
    path = folder / "transfer-000000000001.jsonl"
    seq, prev, moment = 0, audit.GENESIS, START
    pending: list[bytes] = []
    last_checkpoint = b""
    with path.open("wb") as handle:
        while seq < count:
            seq += 1
            moment += timedelta(milliseconds=generator.random.randint(0, 5000))
            ts = moment.strftime("%Y-%m-%dT%H:%M:%S") + f".{moment.microsecond // 1000:03d}Z"
            if checkpoint is not None and (seq % CHECKPOINT_EVERY == 0 or seq == count):
                line = last_checkpoint = checkpoint(seq, ts, prev)
            else:
                line = audit.canonical_line(_record(seq, ts, prev, generator.body()))
            prev = audit.line_hash(line)
            pending.append(line)
            if len(pending) == FLUSH_EVERY:
                handle.write(b"\n".join(pending) + b"\n")
                pending.clear()
        if pending:
            handle.write(b"\n".join(pending) + b"\n")
    if last_checkpoint:
        (folder / "head.json").write_bytes(last_checkpoint + b"\n")
    if path not in audit.log_files(folder):  # before rotation: one file, transfer.jsonl
        path = path.rename(folder / "transfer.jsonl")
        if path not in audit.log_files(folder):
            raise SystemExit(f"gateway.audit.log_files does not list {path.name}; update the bench")
    return path


def _verifier(public_key: Any) -> tuple[str, Callable[[Path], object]]:
    """Return the verify to time: audit_verify.verify with the key if it exists, else the chain."""
    if importlib.util.find_spec("gateway.audit_verify") is None:
        return "gateway.audit.verify_chain", audit.verify_chain
    module = importlib.import_module("gateway.audit_verify")

    def verify(folder: Path) -> object:
        report = module.verify(folder, public_key)
        if getattr(report, "ok", True) is False:
            raise SystemExit(f"verify failed: {getattr(report, 'problem', report)}")
        return report

    return "gateway.audit_verify.verify", verify


def _timed(name: str, count: int, action: Callable[[], int]) -> None:
    started = time.perf_counter()
    found = action()
    took = time.perf_counter() - started
    print(f"{name:<44} {took:8.2f} s  {count / took:>11,.0f} records/s  ({found:,} found)")


def _checked(report: object, count: int) -> int:
    """The records verify says it checked (audit_verify's report), else count."""
    checked = getattr(report, "records", count)
    sealed = getattr(report, "checkpoints", None)
    if sealed is not None:
        print(f"    verify report: ok, {checked:,} records, {sealed:,} checkpoints")
    return int(checked)


def _csv_export(folder: Path, filters: Filters, out_path: Path) -> int:
    with out_path.open("w", encoding="utf-8", newline="") as out:
        return export_csv(search(folder, filters), out)


def _on_alarm(_signum: int, _frame: object) -> None:
    raise TimeoutError


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=1_000_000)
    parser.add_argument("--timeout", type=int, default=900, help="seconds for the whole run")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder")
    parser.add_argument("--profile", action="store_true", help="print verify's hot spots")
    args = parser.parse_args()
    signal.signal(signal.SIGALRM, _on_alarm)
    signal.alarm(args.timeout)
    folder = Path(tempfile.mkdtemp(prefix="audit-bench-"))
    signing_key = Ed25519PrivateKey.generate()
    count = args.records
    try:
        checkpoint = _checkpoint_maker(signing_key)
        started = time.perf_counter()
        path = write_log(folder, count, checkpoint)
        took = time.perf_counter() - started
        size = path.stat().st_size
        print(f"log: {folder} ({count:,} records, {size / 2**20:,.1f} MiB, {size // count} B each)")
        print(
            f"checkpoints: {'every 1000 records, signed' if checkpoint else 'none (plain chain)'}"
        )
        print(
            f"{'write (generate, encode, hash, write)':<44} {took:8.2f} s  "
            f"{count / took:>11,.0f} records/s"
        )
        name, verify = _verifier(signing_key.public_key())
        _timed(f"(a) verify: {name}", count, lambda: _checked(verify(folder), count))
        middle = START + timedelta(milliseconds=1250 * count)  # records are 2.5 s apart
        probes = [
            ("(b) search --domain met.pnn.police.uk", Filters(domain="met.pnn.police.uk")),
            (
                "(c) search --address (pseudonym)",
                Filters(pseudonym=pseudonym(KEY, "user0@nhs.net")),  # Generator.addresses[0]
            ),
            (
                "(d) search --since/--until (one day)",
                Filters(since=middle, until=middle + timedelta(days=1)),
            ),
            ("(f) search, no filter (every line parsed)", Filters()),
        ]
        for label, filters in probes[:3]:
            _timed(label, count, lambda f=filters: sum(1 for _ in search(folder, f)))
        window = timedelta(milliseconds=25 * count)  # about 1% of the log's time span
        sample = Filters(since=START + window * 40, until=START + window * 41)
        out_path = folder / "sample.csv"
        _timed(
            "(e) export --format csv (about 1%)",
            count,
            lambda: _csv_export(folder, sample, out_path),
        )
        label, filters = probes[3]
        _timed(label, count, lambda: sum(1 for _ in search(folder, filters)))
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        print(f"peak RSS: {peak / 1024:,.0f} MiB")
        if args.profile:
            profiler = cProfile.Profile()
            profiler.enable()
            verify(folder)
            profiler.disable()
            text = io.StringIO()
            pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(12)
            print(text.getvalue())
    except TimeoutError:
        print(f"stopped: --timeout {args.timeout} s reached", file=sys.stderr)
        return 1
    finally:
        signal.alarm(0)
        if not args.keep:
            for child in folder.iterdir():
                child.unlink()
            folder.rmdir()
    return 0


if __name__ == "__main__":
    sys.exit(main())
