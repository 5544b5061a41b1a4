"""The auditor's commands end to end: a real daemon's log, checked and read by the CLI."""

from __future__ import annotations

import asyncio
import csv
import io
import json
import re
import shutil
import subprocess
import sys

import pytest

from gateway import tls
from gateway.audit import read_records
from tests.harness import GatewayProcess, eventually, make_setup, smtp_send
from tests.receiver import start_receiver, stop_receiver

SENDER = "duty.officer@bromley.gcsx.gov.uk"
REF = re.compile(r"SG-[0-9A-HJKMNP-TV-Z]{26}")


def gateway(*args: str) -> subprocess.CompletedProcess[str]:
    """Run the gateway command."""
    return subprocess.run(
        [sys.executable, "-m", "gateway.cli", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.fixture(scope="module")
def audited(tmp_path_factory, ca):
    """A stopped gateway whose log holds a released, a held and a delivered message."""
    root = tmp_path_factory.mktemp("audited")

    async def run():
        leaf = ca.issue_cert("localhost", "127.0.0.1")
        (root / "rx").mkdir()
        leaf.cert_chain_pems[0].write_to_path(str(root / "rx" / "cert.pem"))
        leaf.private_key_pem.write_to_path(str(root / "rx" / "key.pem"))
        context = tls.server_context(root / "rx" / "cert.pem", root / "rx" / "key.pem")
        server, port, handler = await start_receiver(tls_context=context)
        setup = make_setup(root / "gw", ca, receiver_port=port)
        process = GatewayProcess(setup)
        smtp_port = await asyncio.to_thread(process.start)
        try:
            sent = await asyncio.to_thread(
                smtp_send,
                smtp_port,
                setup.client_context,
                SENDER,
                ["lead@nhs.net"],
                b"Subject: OFFICIAL test\r\n\r\nbody\r\n",
            )
            held = await asyncio.to_thread(
                smtp_send, smtp_port, setup.client_context, SENDER, ["x@gmail.com"], b"\r\nbody\r\n"
            )
            await eventually(lambda: any(m.rcpt_tos == ("lead@nhs.net",) for m in handler.messages))
        finally:
            assert await asyncio.to_thread(process.terminate) == 0
            await stop_receiver(server, handler)
        delivered = next(m for m in handler.messages if m.rcpt_tos == ("lead@nhs.net",))
        return (
            setup,
            REF.search(sent.text("data")).group(),
            REF.search(held.text("data")).group(),
            delivered,
        )

    return asyncio.run(run())


def test_verify_passes_with_only_the_public_key(audited, tmp_path):
    """An auditor's copy of the log and the public key alone verify: no config, no secret."""
    setup, _released, _held, _ = audited
    copy = tmp_path / "log"
    shutil.copytree(setup.config.audit_path, copy)
    pubkey = tmp_path / "audit.pub"
    shutil.copy(setup.root / "keys" / "audit-signing.pub", pubkey)
    result = gateway("audit", "verify", "--log", str(copy), "--pubkey", str(pubkey))
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[0].startswith("ok")


def test_verify_names_the_first_edited_record(audited, tmp_path):
    """An edited record in a sealed log fails verify, naming its seq; exit 1."""
    setup, released, _held, _ = audited
    copy = tmp_path / "log"
    shutil.copytree(setup.config.audit_path, copy)
    target = next(p for p in sorted(copy.glob("transfer-*.jsonl")))
    lines = target.read_bytes().split(b"\n")
    number = next(i for i, line in enumerate(lines) if released.encode() in line)
    seq = json.loads(lines[number])["seq"]
    lines[number] = lines[number].replace(b'"size":', b'"size":1')
    target.write_bytes(b"\n".join(lines))
    result = gateway(
        "audit",
        "verify",
        "--log",
        str(copy),
        "--pubkey",
        str(setup.root / "keys" / "audit-signing.pub"),
    )
    assert result.returncode == 1
    assert f"seq {seq}" in result.stderr


def test_search_by_address_needs_the_key_and_finds_only_that_address(audited):
    """--address turns an address into its pseudonym and finds its records only."""
    setup, released, held, _ = audited
    result = gateway(
        "audit", "search", "--address", "lead@nhs.net", "--config", str(setup.config_path)
    )
    assert result.returncode == 0, result.stderr
    refs = {json.loads(line).get("ref") for line in result.stdout.splitlines()}
    assert refs == {released}
    assert held not in result.stdout


def test_search_filters_by_event_and_verdict(audited):
    """Filters combine: accepted records with verdict hold are the held message only."""
    setup, _released, held, _ = audited
    result = gateway(
        "audit",
        "search",
        "--event",
        "accepted",
        "--verdict",
        "hold",
        "--json",
        "--config",
        str(setup.config_path),
    )
    assert result.returncode == 0, result.stderr
    assert [r["ref"] for r in json.loads(result.stdout)] == [held]


def test_export_csv_opens_as_a_table(audited):
    """CSV export: a header row and one row per record, readable by the csv module."""
    setup, _released, _held, _ = audited
    result = gateway("audit", "export", "--format", "csv", "--config", str(setup.config_path))
    assert result.returncode == 0, result.stderr
    rows = list(csv.reader(io.StringIO(result.stdout, newline="")))
    assert rows[0][:4] == ["seq", "ts", "event", "ref"]
    assert len(rows) - 1 == len(list(read_records(setup.config.audit_path)))
    assert "lead" not in result.stdout


def test_bad_time_filter_is_a_usage_error(audited):
    """A time that is not a time is one line and exit 2."""
    setup, *_ = audited
    result = gateway("audit", "search", "--since", "yesterday", "--config", str(setup.config_path))
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1


def test_verify_message_proves_a_delivered_message_and_refuses_a_changed_one(audited, tmp_path):
    """verify-message: valid for the delivered bytes, invalid once one body byte changes."""
    setup, released, _held, delivered = audited
    good = tmp_path / "good.eml"
    good.write_bytes(delivered.content)
    result = gateway("audit", "verify-message", str(good), "--config", str(setup.config_path))
    assert result.returncode == 0, result.stderr
    assert f"ref: {released}" in result.stdout
    bad = tmp_path / "bad.eml"
    bad.write_bytes(delivered.content.replace(b"\r\nbody\r\n", b"\r\nb0dy\r\n"))
    changed = gateway("audit", "verify-message", str(bad), "--config", str(setup.config_path))
    assert changed.returncode == 1
    assert changed.stderr.startswith("invalid: ")
