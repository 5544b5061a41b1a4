"""Operations: metrics scraped over HTTP, and systemd's notify protocol from a real daemon."""

from __future__ import annotations

import asyncio
import signal
import socket
import urllib.request

from tests.harness import GatewayProcess, eventually, make_setup, running_gateway, smtp_send

SENDER = "duty.officer@bromley.gcsx.gov.uk"


def scrape(port: int) -> str:
    """GET /metrics over HTTP."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        return response.read().decode()


def value(text: str, line_start: str) -> float:
    """The value of the first sample line starting with `line_start`."""
    line = next(line for line in text.splitlines() if line.startswith(line_start))
    return float(line.rsplit(" ", 1)[1])


async def test_metrics_count_outcomes_refusals_and_queue_sizes(tmp_path, ca, receiver):
    """A scrape shows released and held counts, refusals by reason and the held queue."""
    port, handler = receiver
    setup = make_setup(tmp_path, ca, receiver_port=port)
    text = setup.config_path.read_text() + '\n[metrics]\nlisten = "127.0.0.1:0"\n'
    setup.config_path.write_text(text)
    async with running_gateway(setup) as (daemon, smtp_port):
        for recipients in (["lead@nhs.net"], ["x@gmail.com"], ["bad%x@nhs.net"]):
            await asyncio.to_thread(
                smtp_send, smtp_port, setup.client_context, SENDER, recipients, b"\r\nx\r\n"
            )
        await eventually(lambda: any("lead@nhs.net" in m.rcpt_tos for m in handler.messages))
        await asyncio.to_thread(daemon.admin.index.loaded.wait, 10)
        metrics = await asyncio.to_thread(scrape, daemon.metrics_port)
    assert value(metrics, 'gateway_messages_total{outcome="released"}') == 1
    assert value(metrics, 'gateway_messages_total{outcome="held"}') == 1
    assert value(metrics, 'gateway_refusals_total{reason="routing_in_address"}') == 1
    assert value(metrics, 'gateway_queue_messages{state="held"}') == 1
    assert value(metrics, "gateway_audit_records_total") >= 3
    assert "gmail" not in metrics
    assert "lead" not in metrics


async def test_daemon_speaks_systemds_notify_protocol(tmp_path, ca, receiver):
    """READY after listening, watchdog pings, RELOADING/READY on SIGHUP, STOPPING on SIGTERM."""
    port, _handler = receiver
    setup = make_setup(tmp_path, ca, receiver_port=port)
    path = tmp_path / "notify.sock"
    sink = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sink.bind(str(path))
    sink.setblocking(False)  # noqa: FBT003
    received: list[str] = []

    def drain() -> list[str]:
        while True:
            try:
                received.append(sink.recv(4096).decode())
            except BlockingIOError:
                return received

    process = GatewayProcess(setup, env={"NOTIFY_SOCKET": str(path), "WATCHDOG_USEC": "400000"})
    await asyncio.to_thread(process.start)
    try:
        await eventually(lambda: any("READY=1" in m for m in drain()))
        await eventually(lambda: sum(m == "WATCHDOG=1" for m in drain()) >= 3)
        process.proc.send_signal(signal.SIGHUP)
        await eventually(lambda: any("RELOADING=1" in m for m in drain()))
        await eventually(lambda: sum("READY=1" in m for m in drain()) >= 2)
    finally:
        assert await asyncio.to_thread(process.terminate) == 0
        drain()
        sink.close()
    assert any("STOPPING=1" in m for m in received)
    ready = next(m for m in received if "READY=1" in m)
    assert "STATUS=serving on 127.0.0.1:" in ready
