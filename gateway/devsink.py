"""A local receiving SMTP server with STARTTLS, for trying the gateway by hand (`make sink`).

It listens on 127.0.0.1, offers STARTTLS with the development certificate, and writes each
message it receives to stdout with its envelope. A development aid, never for production.
"""

from __future__ import annotations

import argparse
import asyncio
import ssl
import sys
from pathlib import Path
from typing import Any

from aiosmtpd.smtp import SMTP, Envelope, Session


class PrintingHandler:
    """Prints every message received."""

    async def handle_DATA(self, _server: SMTP, _session: Session, envelope: Envelope) -> str:
        """Print the envelope and content, accept the message."""
        content: Any = envelope.original_content or b""
        sys.stdout.write(
            f"--- message for {', '.join(envelope.rcpt_tos)} from {envelope.mail_from}\n"
            f"{content.decode('utf-8', 'replace')}\n--- end\n"
        )
        sys.stdout.flush()
        return "250 2.0.0 Ok: delivered to the local test receiver"


async def run(host: str, port: int, cert: Path, key: Path) -> None:
    """Serve until interrupted."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: SMTP(PrintingHandler(), tls_context=context, hostname="localhost"), host, port
    )
    sys.stdout.write(f"test receiver listening on {host}:{port} (STARTTLS)\n")
    sys.stdout.flush()
    async with server:
        await server.serve_forever()


def main() -> int:
    """`python -m gateway.devsink [--port 2526]`."""
    parser = argparse.ArgumentParser(prog="gateway.devsink")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=2526)
    parser.add_argument("--cert", default="var/tls/cert.pem")
    parser.add_argument("--key", default="var/tls/key.pem")
    args = parser.parse_args()
    try:
        asyncio.run(run(args.host, args.port, Path(args.cert), Path(args.key)))
    except KeyboardInterrupt:
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
