"""Prometheus metrics: values in the exposition, scrape-time sources, and a real HTTP scrape."""

from __future__ import annotations

import asyncio
import re
import socket
import time
import urllib.error
import urllib.request
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from prometheus_client.parser import text_string_to_metric_families

from gateway import __version__, records
from gateway.audit import AuditLog
from gateway.metrics import (
    CONTENT_TYPE,
    OTHER,
    REASON_CODES,
    AuditState,
    Metrics,
    MetricsServer,
    QueueState,
    audit_source,
    queue_source,
    queue_states,
)
from gateway.queue_entry import State
from gateway.queue_index import QueueIndex
from gateway.spool import Spool
from tests.test_spool import KEY, make_entry, make_ref

NOW = datetime(2026, 11, 25, 12, 0, 0, tzinfo=UTC)
CANARIES = ("alice.smith@example.org", "Alice Smith", "gmail.com", "insecure_domain:gmail.com")


def samples(metrics: Metrics) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Parse render() back: (sample name, labels) -> value."""
    text = metrics.render().decode("utf-8")
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(metrics: Metrics, name: str, **labels: str) -> float | None:
    """One sample's value from the exposition, or None when it is absent."""
    return samples(metrics).get((name, frozenset(labels.items())))


def test_counters_appear_with_their_values():
    """Each event method shows up in the text exposition with the counted value."""
    metrics = Metrics()
    metrics.message_accepted("release")
    metrics.message_accepted("release")
    metrics.message_accepted("hold")
    metrics.message_refused("smuggling_suspected")
    metrics.delivery("delivered", None, seconds=42.0, recipients=3)
    metrics.delivery("deferred", "certificate")
    metrics.delivery("bounced", "smtp_5xx", recipients=2)
    metrics.tls_failure("tls_handshake_failed")
    metrics.admin_action("released")
    assert value(metrics, "gateway_build_info", version=__version__) == 1
    assert value(metrics, "gateway_messages_total", outcome="released") == 2
    assert value(metrics, "gateway_messages_total", outcome="held") == 1
    assert value(metrics, "gateway_refusals_total", reason="smuggling_suspected") == 1
    assert value(metrics, "gateway_deliveries_total", outcome="delivered", reason="") == 3
    assert value(metrics, "gateway_deliveries_total", outcome="deferred", reason="certificate") == 1
    assert value(metrics, "gateway_deliveries_total", outcome="bounced", reason="smtp_5xx") == 2
    assert value(metrics, "gateway_delivery_latency_seconds_count") == 1
    assert value(metrics, "gateway_delivery_latency_seconds_sum") == 42.0
    assert value(metrics, "gateway_delivery_latency_seconds_bucket", le="60.0") == 1
    assert value(metrics, "gateway_delivery_latency_seconds_bucket", le="15.0") == 0
    assert (
        value(metrics, "gateway_tls_failures_total", direction="outbound", kind="certificate") == 1
    )
    assert (
        value(
            metrics, "gateway_tls_failures_total", direction="inbound", kind="tls_handshake_failed"
        )
        == 1
    )
    assert value(metrics, "gateway_admin_actions_total", action="released") == 1
    assert value(metrics, "gateway_admin_actions_total", action="expired") == 0


def test_sessions_gauge_follows_open_and_close():
    """Sessions in progress go up and down; the sessions counter only goes up."""
    metrics = Metrics()
    metrics.session_opened()
    metrics.session_opened()
    metrics.session_closed()
    assert value(metrics, "gateway_sessions_active") == 1
    assert value(metrics, "gateway_sessions_total") == 2


def test_latency_is_observed_only_for_deliveries():
    """Deferrals and bounces count as outcomes but add nothing to the latency histogram."""
    metrics = Metrics()
    metrics.delivery("deferred", "connect", seconds=10.0)
    metrics.delivery("bounced", "queue_lifetime", seconds=10.0)
    assert value(metrics, "gateway_delivery_latency_seconds_count") == 0


def test_two_instances_do_not_share_counts():
    """Each Metrics has its own registry: two in one process neither clash nor mix."""
    first, second = Metrics(), Metrics()
    first.message_refused("not_a_client")
    assert value(first, "gateway_refusals_total", reason="not_a_client") == 1
    assert value(second, "gateway_refusals_total", reason="not_a_client") is None


def test_no_label_carries_an_address_or_free_text():
    """Addresses, names and domains passed as codes become `other` or lose their domain."""
    metrics = Metrics()
    for canary in CANARIES:
        metrics.message_accepted(canary)
        metrics.message_refused(canary)
        metrics.delivery(canary, canary)
        metrics.tls_failure(canary, direction=canary)
        metrics.admin_action(canary)
    text = metrics.render().decode("utf-8")
    for word in ("alice", "Alice", "example.org", "gmail"):
        assert word not in text
    assert value(metrics, "gateway_refusals_total", reason=OTHER) == 3
    assert value(metrics, "gateway_refusals_total", reason="insecure_domain") == 1
    fixed = {OTHER, "", __version__, "released", "held", "delivered", "inbound", "outbound"}
    fixed |= {"rejected", "expired"}
    for _, labels in samples(metrics):
        for name, label in labels:
            assert name == "le" or label in REASON_CODES | fixed, (name, label)


def test_every_documented_reason_code_is_a_label():
    """Every refusal, delivery and hold code of docs/reason-codes.md is a label of its own."""
    text = (Path(__file__).parents[1] / "docs" / "reason-codes.md").read_text("utf-8")
    # verify-message's answers are the CLI's, never the daemon's: not counted.
    text = text.partition("## Message signatures")[0]
    documented = set()
    for line in text.splitlines():
        if line.startswith("| `"):
            documented |= set(re.findall(r"`([a-z0-9_]+)`", line.split("|")[1]))
    assert documented
    assert documented - REASON_CODES == set()


def test_sources_are_read_at_each_scrape():
    """Queue and audit gauges come from the sources, called once per render()."""
    metrics = Metrics()
    calls = []

    def queues():
        calls.append("queue")
        return {
            "active": QueueState(2, 30.0),
            "deferred": QueueState(5, 1200.0),
            "held": QueueState(1, 7200.0),
        }

    def audit():
        calls.append("audit")
        return AuditState(records=120, checkpoint_seq=100, checkpoint_age=65.5)

    metrics.set_queue_source(queues)
    metrics.set_audit_source(audit)
    assert calls == []
    assert value(metrics, "gateway_queue_messages", state="deferred") == 5
    assert calls == ["queue", "audit"]
    assert value(metrics, "gateway_queue_oldest_seconds", state="held") == 7200
    assert value(metrics, "gateway_audit_records_total") == 120
    assert value(metrics, "gateway_audit_last_checkpoint_age_seconds") == 65.5
    assert value(metrics, "gateway_audit_unsealed_records") == 20
    assert calls == ["queue", "audit"] * 5


def test_unknown_sources_leave_their_metrics_out():
    """No source, or a source that does not know yet, means no series rather than zeros."""
    metrics = Metrics()
    assert value(metrics, "gateway_queue_messages", state="active") is None
    metrics.set_queue_source(lambda: None)
    metrics.set_audit_source(
        lambda: AuditState(records=3, checkpoint_seq=None, checkpoint_age=None)
    )
    found = {name for name, _ in samples(metrics)}
    assert "gateway_queue_messages" not in found
    assert "gateway_audit_records_total" in found
    assert "gateway_audit_last_checkpoint_age_seconds" not in found


def test_a_failing_source_spoils_nothing_else():
    """A source that raises is counted and skipped; the rest of the scrape is served."""
    metrics = Metrics()

    def broken():
        raise OSError("disk gone")

    metrics.set_audit_source(broken)
    metrics.set_queue_source(lambda: {"held": QueueState(4, 10.0)})
    metrics.message_accepted("hold")
    assert value(metrics, "gateway_queue_messages", state="held") == 4
    assert value(metrics, "gateway_messages_total", outcome="held") == 1
    assert value(metrics, "gateway_metrics_source_errors_total", source="audit") == 2


def test_queue_states_counts_and_ages_by_state():
    """Summaries are counted per state with the oldest age; empty states read 0 and 0."""
    rows = [
        {"state": "deferred", "received": "2026-11-25T11:30:00Z"},
        {"state": "deferred", "received": "2026-11-25T11:50:00Z"},
        {"state": "held", "received": "2026-11-25T08:00:00Z"},
    ]
    assert queue_states(rows, NOW) == {
        "active": QueueState(0, 0.0),
        "deferred": QueueState(2, 1800.0),
        "held": QueueState(1, 14400.0),
    }


def test_queue_source_reads_the_queue_index(tmp_path):
    """The queue source answers None until the index has loaded, then what the spool holds."""
    spool = Spool(tmp_path / "spool", KEY)
    spool.prepare(process_start=time.time())
    index = QueueIndex(spool)
    source = queue_source(index, lambda: NOW)
    assert source() is None
    for number, state in ((1, State.HELD), (2, State.DEFERRED), (3, State.DEFERRED)):
        ref = make_ref(number)
        writer = spool.new_message(ref)
        writer.write(b"body")
        spool.commit(
            writer, replace(make_entry(ref, state), size=writer.size, digest=writer.digest)
        )
    index.load()
    states = source()
    assert states is not None
    assert {state: q.count for state, q in states.items()} == {
        "active": 0,
        "deferred": 2,
        "held": 1,
    }


async def test_audit_source_reads_the_head_of_the_log(tmp_path):
    """The audit source gives the last seq and the newest checkpoint's seq and age."""
    clock = [NOW]
    log = AuditLog(
        tmp_path,
        signing_key=Ed25519PrivateKey.generate(),
        checkpoint_every=2,
        clock=lambda: clock[0],
    )
    source = audit_source(log, lambda: clock[0] + timedelta(seconds=90))
    assert source() == AuditState(records=0, checkpoint_seq=None, checkpoint_age=None)
    await log.start()
    try:
        for _ in range(3):
            await log.append(records.policy_loaded(policy="p1", source="policy.toml"))
        # seq 1, 2, checkpoint 3, then 4 unsealed
        assert source() == AuditState(records=4, checkpoint_seq=3, checkpoint_age=90.0)
    finally:
        await log.close()
    assert source() == AuditState(records=5, checkpoint_seq=5, checkpoint_age=90.0)


# -- over HTTP -------------------------------------------------------------------------------


@pytest.fixture
async def server():
    """A MetricsServer on 127.0.0.1 with a free port, closed after the test."""
    metrics = Metrics()
    metrics_server = MetricsServer(metrics, "127.0.0.1", 0, timeout=2.0)
    port = await metrics_server.start()
    yield metrics, metrics_server, port
    await metrics_server.close()


def _get(port: int, path: str) -> tuple[int, str, bytes]:
    """A plain urllib GET: (status, content type, body), HTTP errors included."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as response:
            return response.status, response.headers["Content-Type"], response.read()
    except urllib.error.HTTPError as error:
        with error:
            return error.code, error.headers["Content-Type"], error.read()


async def _raw(port: int, request: bytes, *, eof: bool = False) -> bytes:
    """Send raw bytes, then read until the server closes the connection."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(request)
        if eof:
            writer.write_eof()
        async with asyncio.timeout(5):
            return await reader.read()
    finally:
        writer.close()
        await writer.wait_closed()


async def test_scrape_over_http(server):
    """GET /metrics answers 200 with the text format and the current counts."""
    metrics, _, port = server
    metrics.message_refused("not_a_client")
    status, content_type, body = await asyncio.to_thread(_get, port, "/metrics")
    assert status == 200
    assert content_type == CONTENT_TYPE
    assert b'gateway_refusals_total{reason="not_a_client"} 1.0' in body
    assert body == metrics.render()


async def test_other_paths_are_not_found(server):
    """Any path but /metrics is 404; a query string on /metrics is ignored."""
    _, _, port = server
    assert (await asyncio.to_thread(_get, port, "/"))[0] == 404
    assert (await asyncio.to_thread(_get, port, "/metrics/../admin"))[0] == 404
    assert (await asyncio.to_thread(_get, port, "/metrics?x=1"))[0] == 200


async def test_bad_requests_get_an_answer_and_a_closed_connection(server):
    """Garbage, a truncated request, an oversized head and POST are refused; serving goes on."""
    _, _, port = server
    assert (await _raw(port, b"\x16\x03\x01\x00\xff garbage\r\n\r\n")).startswith(b"HTTP/1.1 400 ")
    assert (await _raw(port, b"GET /metrics", eof=True)).startswith(b"HTTP/1.1 400 ")
    assert (await _raw(port, b"GET /metrics HTTP/1.1\r\nX: " + b"a" * 100_000)).startswith(
        b"HTTP/1.1 400 "
    )
    post = await _raw(port, b"POST /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
    assert post.startswith(b"HTTP/1.1 405 ")
    assert b"\r\nAllow: GET\r\n" in post
    assert (await asyncio.to_thread(_get, port, "/metrics"))[0] == 200


async def test_a_silent_client_is_dropped_after_the_timeout():
    """A connection that sends nothing is closed once the timeout passes."""
    metrics_server = MetricsServer(Metrics(), "127.0.0.1", 0, timeout=0.2)
    port = await metrics_server.start()
    try:
        assert await _raw(port, b"") == b""
    finally:
        await metrics_server.close()


async def test_connections_beyond_the_limit_get_503():
    """With the connection limit reached, a further connection is answered 503 at once."""
    metrics_server = MetricsServer(Metrics(), "127.0.0.1", 0, max_connections=1)
    port = await metrics_server.start()
    _, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        while not metrics_server._tasks:
            await asyncio.sleep(0.01)
        assert (await _raw(port, b"")).startswith(b"HTTP/1.1 503 ")
    finally:
        writer.close()
        await writer.wait_closed()
        await metrics_server.close()


async def test_close_ends_connections_in_flight():
    """close() stops listening and ends a connection still waiting for its request."""
    metrics_server = MetricsServer(Metrics(), "127.0.0.1", 0)
    port = await metrics_server.start()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        while not metrics_server._tasks:
            await asyncio.sleep(0.01)
        await metrics_server.close()
        async with asyncio.timeout(5):
            assert await reader.read() == b""
    finally:
        writer.close()
        await writer.wait_closed()
    with pytest.raises(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
        pass


async def test_a_port_in_use_is_an_oserror(server):
    """Starting on a port already taken raises OSError for the daemon to report."""
    _, _, port = server
    with pytest.raises(OSError):
        await MetricsServer(Metrics(), "127.0.0.1", port).start()
