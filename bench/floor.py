"""The floor: the least a durable aiosmtpd relay can do, as a yardstick for bench/compare.py.

    .venv/bin/python bench/floor.py --cert C --key K --ca CA --sink-port P --spool DIR

A single-process store-and-forward relay on aiosmtpd with none of the gateway's work: no policy,
no encryption at rest, no transfer log, no DKIM, no decision header, no limits. It requires
STARTTLS (the same certificate as the gateway), writes each message to a file in --spool,
fsyncs the file and the folder before its 250 (the gateway's durability), and forwards it over
verified TLS through a small pool of reused aiosmtplib connections to the sink, removing the
file once the sink said 250. It prints its port as one JSON line and runs until SIGTERM.

Whatever the gateway spends beyond this relay's CPU per message is the price of what the floor
leaves out; what this relay spends is the price of aiosmtpd, asyncio, TLS in and out and two
fsyncs in CPython, which no amount of work in the gateway can take away. Loopback only.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import ssl
import sys
from pathlib import Path

import aiosmtplib
from aiosmtpd.smtp import SMTP, Envelope, Session

SENDER = "duty.officer@bromley.gcsx.gov.uk"
RECIPIENT = "lead@nhs.net"
FORWARDERS = 8  # reused outbound connections, as the gateway's delivery concurrency allows


class FloorHandler:
    """Store durably, answer 250, queue for forwarding."""

    def __init__(self, spool: Path, queue: asyncio.Queue[Path]) -> None:
        self.spool = spool
        self.queue = queue
        self.counter = 0
        self.folder_fd = os.open(spool, os.O_RDONLY | os.O_DIRECTORY)

    def _store(self, name: str, content: bytes) -> Path:
        path = self.spool / name
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, content)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.fsync(self.folder_fd)
        return path

    async def handle_DATA(  # noqa: N802 (aiosmtpd hook name)
        self, _server: SMTP, _session: Session, envelope: Envelope
    ) -> str:
        self.counter += 1
        content = envelope.original_content or b""
        path = await asyncio.to_thread(self._store, f"{os.getpid()}.{self.counter}", content)
        await self.queue.put(path)
        return "250 2.0.0 Ok: queued"


async def forward(queue: asyncio.Queue[Path], port: int, context: ssl.SSLContext) -> None:
    """Send queued files to the sink over one reused verified-TLS connection."""
    client: aiosmtplib.SMTP | None = None
    while True:
        path = await queue.get()
        try:
            content = await asyncio.to_thread(path.read_bytes)
            if client is None or not client.is_connected:
                client = aiosmtplib.SMTP(
                    hostname="127.0.0.1",
                    port=port,
                    tls_context=context,  # verified: the certificate names 127.0.0.1 too
                    start_tls=True,
                )
                await client.connect()
            await client.sendmail(SENDER, [RECIPIENT], content)
        except Exception as exc:  # noqa: BLE001 (a yardstick goes on; the error is shown)
            print(f"floor: forward failed: {exc!r}", file=sys.stderr, flush=True)
            client = None
            await asyncio.sleep(0.1)
            queue.put_nowait(path)  # try again
            continue
        await asyncio.to_thread(path.unlink)


async def serve(args: argparse.Namespace) -> None:
    inbound = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    inbound.load_cert_chain(args.cert, args.key)
    outbound = ssl.create_default_context(cafile=args.ca)
    queue: asyncio.Queue[Path] = asyncio.Queue()
    handler = FloorHandler(Path(args.spool), queue)
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: SMTP(
            handler,
            tls_context=inbound,
            require_starttls=True,
            hostname="localhost",
            ident="bench floor relay",
        ),
        "127.0.0.1",
        0,
        backlog=512,
    )
    print(json.dumps({"port": server.sockets[0].getsockname()[1]}), flush=True)
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    tasks = [loop.create_task(forward(queue, args.sink_port, outbound)) for _ in range(FORWARDERS)]
    await stop.wait()
    server.close()
    for task in tasks:
        task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await asyncio.gather(*tasks)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    for name in ("--cert", "--key", "--ca", "--spool"):
        parser.add_argument(name, required=True)
    parser.add_argument("--sink-port", type=int, required=True)
    args = parser.parse_args()
    asyncio.run(serve(args))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
