"""Prometheus metrics (SPEC section 8): events counted as they happen, states read at scrape.

`Metrics` owns its own `CollectorRegistry`, never prometheus_client's global one, so tests and
several daemons in one process do not clash. Events are counted where they happen
(`message_accepted`, `message_refused`, `delivery`, ...). States that already live elsewhere
(queue sizes, the transfer log's head) are read when Prometheus scrapes, through sources the
daemon registers (`queue_source`, `audit_source` build them). `MetricsServer` renders in a worker
thread, so a source may block briefly but must only read thread-safe state; a source that raises
is logged and counted, and the rest of the scrape stands.

Labels carry codes only: outcomes, reason codes, states, kinds, actions. Every label value goes
through an allow-list and anything else (an address, a domain, free text) is counted as
`other`, so neither personal data nor unbounded cardinality can reach a label.

`MetricsServer` answers `GET /metrics` on `[metrics] listen` in the daemon's own loop: one
request per connection, the request head at most 8 KiB and sent within `timeout` seconds, at
most `max_connections` at once; anything else gets 400, 404, 405 or 503 and the connection is
closed.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from http import HTTPStatus
from pathlib import Path
from typing import Any, TypeVar

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from gateway import __version__
from gateway.audit import AuditLog
from gateway.audit_files import HEAD_NAME, parse_record, parse_ts
from gateway.logconfig import get_logger
from gateway.queue_entry import State
from gateway.queue_index import QueueIndex

log = get_logger("metrics")
_T = TypeVar("_T")

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
MAX_REQUEST = 8192  # bytes of request line and headers
LINGER = 2.0  # seconds to wait for the client to close after the answer
OTHER = "other"  # the label value for anything not on an allow-list

# Every code of docs/reason-codes.md, and the refusals that have a reply but no code there.
REASON_CODES = frozenset({
    # decisions on recipients
    "insecure_domain", "entry_expired", "ip_literal", "not_a_domain",
    # envelopes, messages, connections
    "sender_not_allowed", "bad_syntax", "routing_in_address", "invalid_utf8",
    "smtputf8_required", "too_long", "smuggling_suspected", "line_too_long", "message_too_big",
    "header_too_large", "not_a_client", "too_many_connections", "auth_required",
    "client_certificate_required", "too_many_errors", "idle_timeout", "too_slow",
    "tls_handshake_failed",
    # delivery
    "no_starttls", "certificate", "tls_handshake", "connect", "smtp_4xx", "smtp_5xx", "ehlo",
    "disconnected", "no_smtputf8", "bad_address", "recipient_deferred", "rejected", "ambiguous",
    "no_route", "queue_lifetime",
    # hold queue
    "rejected_by_admin", "dropped_by_admin", "hold_max_age", "unspecified", "release_when_secure",
    # replies without a code in docs/reason-codes.md
    "auth_failed", "spool_failed", "low_on_space", "too_many_recipients", "tls_required",
})  # fmt: skip
OUTCOMES = {"release": "released", "released": "released", "hold": "held", "held": "held"}
DELIVERY_OUTCOMES = frozenset({"delivered", "deferred", "bounced"})
TLS_FAILURE_KINDS = frozenset({"no_starttls", "certificate", "tls_handshake"})  # outbound
DIRECTIONS = frozenset({"inbound", "outbound"})
ADMIN_ACTIONS = frozenset({"released", "rejected", "expired"})
# From acceptance to delivery: seconds when all is well, hours to days across retries.
LATENCY_BUCKETS = (1.0, 5.0, 15.0, 60.0, 300.0, 900.0, 3600.0, 14_400.0, 86_400.0, 432_000.0)


def _label(value: str | None, allowed: Iterable[str]) -> str:
    """`value` (without a `:domain` suffix) if it is allowed, else `other`; None is ""."""
    if value is None:
        return ""
    code = value.partition(":")[0]
    return code if code in allowed else OTHER


@dataclass(frozen=True)
class QueueState:
    """How many messages one queue holds and how long the oldest has been in the gateway."""

    count: int
    oldest_seconds: float  # 0 when the queue is empty


@dataclass(frozen=True)
class AuditState:
    """The transfer log's head as the metrics see it."""

    records: int  # seq of the last durable record: every record of the chain, checkpoints too
    checkpoint_seq: int | None  # seq of the newest signed checkpoint (head.json), if any
    checkpoint_age: float | None  # seconds since that checkpoint was written


QueueSource = Callable[[], Mapping[str, QueueState] | None]
AuditSource = Callable[[], AuditState | None]


class Metrics:
    """The gateway's metrics: counters bumped by the code, gauges read from sources at scrape."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        reg = self.registry
        info = Gauge(
            "gateway_build_info", "Always 1; the version running.", ["version"], registry=reg
        )
        info.labels(__version__).set(1)
        self._messages = Counter(
            "gateway_messages", "Messages accepted, by outcome.", ["outcome"], registry=reg
        )
        self._refusals = Counter(
            "gateway_refusals",
            "Refused connections, commands and messages.",
            ["reason"],
            registry=reg,
        )
        self._deliveries = Counter(
            "gateway_deliveries",
            "Recipient outcomes of delivery attempts, by outcome and reason code.",
            ["outcome", "reason"],
            registry=reg,
        )
        self._latency = Histogram(
            "gateway_delivery_latency_seconds",
            "Time from acceptance to delivery, per delivered group of recipients.",
            buckets=LATENCY_BUCKETS,
            registry=reg,
        )
        self._tls = Counter(
            "gateway_tls_failures",
            "TLS failures by direction and kind.",
            ["direction", "kind"],
            registry=reg,
        )
        self._active = Gauge("gateway_sessions_active", "SMTP sessions in progress.", registry=reg)
        self._sessions = Counter("gateway_sessions", "SMTP sessions admitted.", registry=reg)
        self._admin = Counter(
            "gateway_admin_actions", "Hold-queue actions by admins.", ["action"], registry=reg
        )
        self._source_errors = Counter(
            "gateway_metrics_source_errors",
            "Scrape-time reads that failed.",
            ["source"],
            registry=reg,
        )
        # Series that alerts watch exist from the start, so the first increment shows in increase().
        for outcome in ("released", "held"):
            self._messages.labels(outcome)
        self._refusals.labels("spool_failed")
        self._deliveries.labels("delivered", "")
        for kind in TLS_FAILURE_KINDS:
            self._tls.labels("outbound", kind)
        self._tls.labels("inbound", "tls_handshake_failed")
        for action in ADMIN_ACTIONS:
            self._admin.labels(action)
        self._scraped = _Scraped(self._source_errors)
        reg.register(self._scraped)

    # -- events ------------------------------------------------------------------------------

    def message_accepted(self, verdict: str) -> None:
        """Count a message answered 250: `release`/`released` or `hold`/`held`."""
        self._messages.labels(OUTCOMES.get(verdict, OTHER)).inc()

    def message_refused(self, reason: str) -> None:
        """Count a refusal (connection, command or message) by its reason code."""
        self._refusals.labels(_label(reason, REASON_CODES)).inc()

    def delivery(
        self, outcome: str, reason: str | None, seconds: float | None = None, recipients: int = 1
    ) -> None:
        """Count recipient outcomes; observe latency for a delivery; count TLS failure reasons."""
        code = _label(reason, REASON_CODES)
        self._deliveries.labels(_label(outcome, DELIVERY_OUTCOMES), code).inc(recipients)
        if outcome == "delivered" and seconds is not None:
            self._latency.observe(max(0.0, seconds))
        if code in TLS_FAILURE_KINDS:
            self._tls.labels("outbound", code).inc()

    def tls_failure(self, kind: str, direction: str = "inbound") -> None:
        """Count a TLS failure not reported through `delivery` (e.g. an inbound handshake)."""
        self._tls.labels(_label(direction, DIRECTIONS), _label(kind, REASON_CODES)).inc()

    def session_opened(self) -> None:
        """Count an admitted SMTP session in."""
        self._sessions.inc()
        self._active.inc()

    def session_closed(self) -> None:
        """Count an admitted SMTP session out."""
        self._active.dec()

    def admin_action(self, action: str) -> None:
        """Count a hold-queue action: released, rejected or expired."""
        self._admin.labels(_label(action, ADMIN_ACTIONS)).inc()

    # -- scrape-time sources -----------------------------------------------------------------

    def set_queue_source(self, source: QueueSource | None) -> None:
        """Read queue sizes and ages from `source` at each scrape (None: not known yet)."""
        self._scraped.queue = source

    def set_audit_source(self, source: AuditSource | None) -> None:
        """Read the transfer log's head from `source` at each scrape."""
        self._scraped.audit = source

    def render(self) -> bytes:
        """Everything, in the Prometheus text format (version 0.0.4)."""
        return generate_latest(self.registry)


class _Scraped(Collector):
    """The gauges whose values are read from sources when Prometheus scrapes."""

    def __init__(self, errors: Counter) -> None:
        self.errors = errors
        self.queue: QueueSource | None = None
        self.audit: AuditSource | None = None

    def collect(self) -> Iterator[Metric]:
        """Read each source once; a failing one is logged and left out."""
        queues = self._read("queue", self.queue)
        if queues is not None:
            count = GaugeMetricFamily(
                "gateway_queue_messages", "Messages in the spool by state.", labels=["state"]
            )
            oldest = GaugeMetricFamily(
                "gateway_queue_oldest_seconds",
                "Age of the oldest message in each state since acceptance (0 when empty).",
                labels=["state"],
            )
            for state, value in sorted(queues.items()):
                label = _label(state, {s.value for s in State})
                count.add_metric([label], value.count)
                oldest.add_metric([label], value.oldest_seconds)
            yield count
            yield oldest
        audit = self._read("audit", self.audit)
        if audit is not None:
            yield CounterMetricFamily(
                "gateway_audit_records",
                "Records in the transfer log's chain (the last seq), checkpoints included.",
                value=audit.records,
            )
            if audit.checkpoint_seq is not None and audit.checkpoint_age is not None:
                yield GaugeMetricFamily(
                    "gateway_audit_last_checkpoint_age_seconds",
                    "Seconds since the newest signed checkpoint was written.",
                    value=audit.checkpoint_age,
                )
                yield GaugeMetricFamily(
                    "gateway_audit_unsealed_records",
                    "Records written after the newest signed checkpoint.",
                    value=max(0, audit.records - audit.checkpoint_seq),
                )

    def _read(self, name: str, source: Callable[[], _T | None] | None) -> _T | None:
        if source is None:
            return None
        try:
            return source()
        except Exception as exc:  # noqa: BLE001 - scrape edge: one bad source spoils nothing else
            log.warning("metrics_source_failed", source=name, error_type=type(exc).__name__)
            self.errors.labels(name).inc()
            return None


# -- sources ---------------------------------------------------------------------------------


def queue_states(rows: Iterable[Mapping[str, Any]], now: datetime) -> dict[str, QueueState]:
    """Count queue-index summaries by state, with each state's oldest age before `now`."""
    counts = {state.value: 0 for state in State}
    oldest: dict[str, str] = {}
    for row in rows:
        state, received = str(row["state"]), str(row["received"])
        counts[state] = counts.get(state, 0) + 1
        if state not in oldest or received < oldest[state]:
            oldest[state] = received  # ISO 8601 UTC: text order is time order
    return {
        state: QueueState(count, _age(oldest.get(state), now)) for state, count in counts.items()
    }


def _age(received: str | None, now: datetime) -> float:
    if received is None:
        return 0.0
    moment = datetime.strptime(received, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)
    return max(0.0, (now - moment).total_seconds())


def queue_source(index: QueueIndex, clock: Callable[[], datetime]) -> QueueSource:
    """A queue source over the daemon's queue index; None until the index has loaded."""

    def read() -> dict[str, QueueState] | None:
        if not index.loaded.is_set():
            return None
        return queue_states(index.select(), clock())

    return read


def audit_source(audit: AuditLog, clock: Callable[[], datetime]) -> AuditSource:
    """An audit source: the last seq, and the newest checkpoint as `head.json` holds it."""

    def read() -> AuditState:
        head = _head(audit.folder / HEAD_NAME)  # first: the seq read after it is never older
        records = audit.last_seq
        if head is None:
            return AuditState(records, None, None)
        seq, written = head
        return AuditState(records, seq, max(0.0, (clock() - written).total_seconds()))

    return read


def _head(path: Path) -> tuple[int, datetime] | None:
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return None  # no signing key, or nothing sealed yet
    record = parse_record(raw.rstrip(b"\n"))
    if record is None or record.get("event") != "checkpoint":
        raise ValueError("head.json does not hold a checkpoint")
    return int(record["seq"]), parse_ts(str(record["ts"]))


# -- the HTTP endpoint -----------------------------------------------------------------------


class MetricsServer:
    """Serves `GET /metrics` over plain HTTP/1.1 in the running event loop."""

    def __init__(
        self,
        metrics: Metrics,
        host: str,
        port: int,
        *,
        timeout: float = 10.0,
        max_connections: int = 8,
    ) -> None:
        self.metrics = metrics
        self.host = host
        self.port = port
        self.timeout = timeout
        self.max_connections = max_connections
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[Any]] = set()

    async def start(self) -> int:
        """Listen; return the bound port (useful with port 0). OSError if it cannot listen."""
        self._server = await asyncio.start_server(
            self._serve, self.host, self.port, limit=MAX_REQUEST
        )
        return int(self._server.sockets[0].getsockname()[1])

    async def close(self) -> None:
        """Stop listening and end the connections in flight."""
        if self._server is None:
            return
        self._server.close()
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self._server.wait_closed()
        self._server = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:  # always: start_server runs each connection in a task
            self._tasks.add(task)
        try:
            if len(self._tasks) > self.max_connections:
                response = _response(HTTPStatus.SERVICE_UNAVAILABLE)
            else:
                async with asyncio.timeout(self.timeout):
                    response = await self._answer(reader)
            writer.write(response)
            async with asyncio.timeout(self.timeout):
                await writer.drain()
            # Lingering close: half-close, then drop what the client still sends until it closes
            # too; closing with unread bytes would send a reset that can lose the answer.
            writer.write_eof()
            async with asyncio.timeout(min(self.timeout, LINGER)):
                while await reader.read(MAX_REQUEST):
                    pass
        except (TimeoutError, ConnectionError):
            pass  # a slow or vanished scraper: just close
        except asyncio.CancelledError:
            # close() ends connections in flight. This is the task's outermost frame and nobody
            # awaits its result; ending it cancelled makes asyncio 3.11's stream callback log an
            # error, so it ends normally instead.
            pass
        except Exception as exc:  # noqa: BLE001 - connection edge: never kill the loop
            log.warning("metrics_request_failed", error_type=type(exc).__name__)
        finally:
            if task is not None:
                self._tasks.discard(task)
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    async def _answer(self, reader: asyncio.StreamReader) -> bytes:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            return _response(HTTPStatus.BAD_REQUEST)
        parts = head.split(b"\r\n", 1)[0].split(b" ")
        if len(parts) != 3 or not parts[2].startswith(b"HTTP/1."):
            return _response(HTTPStatus.BAD_REQUEST)
        method, target = parts[0], parts[1].partition(b"?")[0]
        if target != b"/metrics":
            return _response(HTTPStatus.NOT_FOUND)
        if method != b"GET":
            return _response(HTTPStatus.METHOD_NOT_ALLOWED, extra="Allow: GET\r\n")
        body = await asyncio.to_thread(self.metrics.render)
        return _response(HTTPStatus.OK, body, CONTENT_TYPE)


def _response(
    status: HTTPStatus,
    body: bytes | None = None,
    content_type: str = "text/plain; charset=utf-8",
    extra: str = "",
) -> bytes:
    if body is None:
        body = f"{status.value} {status.phrase}\n".encode("ascii")
    head = (
        f"HTTP/1.1 {status.value} {status.phrase}\r\n"
        f"Content-Type: {content_type}\r\nContent-Length: {len(body)}\r\n"
        f"{extra}Connection: close\r\n\r\n"
    )
    return head.encode("ascii") + body
