"""The auditor's commands: `gateway audit show|verify|search|export|verify-message`.

An auditor may work from a copy of the transfer log with no gateway config at all:
`--log FOLDER` names the log and `--pubkey FILE` the public key, and nothing secret is needed
(`--address` alone needs the pseudonym key, by design: only its holders may ask about a person).
"""

from __future__ import annotations

import argparse
import io
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TextIO

from gateway import config as config_module
from gateway.errors import GatewayError, UsageError

EXIT_OK, EXIT_FAIL = 0, 1

Loader = Callable[[argparse.Namespace], config_module.Config]


@contextmanager
def _stdout() -> Iterator[TextIO]:
    """UTF-8 text on stdout with no newline translation (CSV writes its own CRLF)."""
    out = io.TextIOWrapper(sys.stdout.buffer, encoding="utf-8", newline="", write_through=True)
    try:
        yield out
    finally:
        out.flush()
        out.detach()


def _log_folder(args: argparse.Namespace, load: Loader) -> Path:
    return Path(args.log) if args.log else load(args).audit.path


def _public_key(args: argparse.Namespace, load: Loader, name: str) -> Any:
    from gateway.keys import load_public_key  # noqa: PLC0415

    path = Path(args.pubkey) if args.pubkey else load(args).keys_path / name
    return load_public_key(path)


def show(args: argparse.Namespace, load: Loader) -> int:
    """Every audit record about one message."""
    from gateway.audit_query import Filters, export_json, export_jsonl, search  # noqa: PLC0415

    unreadable: list[str] = []
    found = list(search(_log_folder(args, load), Filters(ref=args.ref), unreadable=unreadable))
    with _stdout() as out:
        (export_json if args.json else export_jsonl)(found, out)
    _warn_unreadable(unreadable)
    if not found:
        sys.stderr.write(f"no audit records for {args.ref}\n")
        return EXIT_FAIL
    return EXIT_OK


def verify(args: argparse.Namespace, load: Loader) -> int:
    """Check the chain and the signed checkpoints; exit 1 naming the first bad seq."""
    from gateway.audit_verify import format_report  # noqa: PLC0415
    from gateway.audit_verify import verify as verify_log  # noqa: PLC0415
    from gateway.keys import PUBLIC_KEY_FILE  # noqa: PLC0415

    report = verify_log(_log_folder(args, load), _public_key(args, load, PUBLIC_KEY_FILE))
    lines = format_report(report)
    (sys.stdout if report.ok else sys.stderr).write("\n".join(lines) + "\n")
    return EXIT_OK if report.ok else EXIT_FAIL


def _filters(args: argparse.Namespace, load: Loader) -> Any:
    from gateway.audit_query import Filters, normalise_domain, parse_time  # noqa: PLC0415

    try:
        pseudonym = _pseudonym_of(args, load) if args.address else None
        return Filters(
            since=parse_time(args.since) if args.since else None,
            until=parse_time(args.until) if args.until else None,
            events=frozenset(args.event or ()),
            verdict=args.verdict,
            domain=normalise_domain(args.domain) if args.domain else None,
            client=args.client,
            marking=args.marking,
            pseudonym=pseudonym,
        )
    except ValueError as exc:
        raise UsageError(str(exc)) from exc


def _pseudonym_of(args: argparse.Namespace, load: Loader) -> str:
    from gateway.addresses import parse_address  # noqa: PLC0415
    from gateway.keys import PSEUDONYM_KEY_FILE, read_secret_key  # noqa: PLC0415
    from gateway.pseudonym import pseudonym  # noqa: PLC0415

    path = (
        Path(args.pseudonym_key)
        if args.pseudonym_key
        else load(args).keys_path / PSEUDONYM_KEY_FILE
    )
    key = read_secret_key(path)
    return pseudonym(key, parse_address(args.address, smtputf8=True).normalised)


def _records(args: argparse.Namespace, load: Loader) -> tuple[Iterator[dict[str, Any]], list[str]]:
    from gateway.audit_query import search  # noqa: PLC0415

    unreadable: list[str] = []
    return search(_log_folder(args, load), _filters(args, load), unreadable=unreadable), unreadable


def _warn_unreadable(unreadable: list[str]) -> None:
    if unreadable:
        files = ", ".join(sorted(set(unreadable)))
        sys.stderr.write(
            f"warning: {len(unreadable)} lines that are not records were skipped ({files}); "
            "`gateway audit verify` judges them\n"
        )


def search(args: argparse.Namespace, load: Loader) -> int:
    """Records matching the filters: JSON Lines (as in the log), or a JSON list."""
    from gateway.audit_query import export_json, export_jsonl  # noqa: PLC0415

    records, unreadable = _records(args, load)
    with _stdout() as out:
        (export_json if args.json else export_jsonl)(records, out)
    _warn_unreadable(unreadable)
    return EXIT_OK


def export(args: argparse.Namespace, load: Loader) -> int:
    """Records matching the filters as CSV (for spreadsheets) or JSON Lines."""
    from gateway.audit_query import export_csv, export_jsonl  # noqa: PLC0415

    records, unreadable = _records(args, load)
    with _stdout() as out:
        (export_csv if args.format == "csv" else export_jsonl)(records, out)
    _warn_unreadable(unreadable)
    return EXIT_OK


def verify_message(args: argparse.Namespace, load: Loader) -> int:
    """Check a delivered message's DKIM signature over its decision header and body."""
    from gateway.dkim import verify_message as verify_dkim  # noqa: PLC0415
    from gateway.keys import DKIM_PUBLIC_KEY_FILE  # noqa: PLC0415

    try:
        message = Path(args.file).read_bytes()
    except OSError as exc:
        raise GatewayError(f"{args.file}: cannot read: {exc.strerror or exc}") from exc
    result = verify_dkim(message, _public_key(args, load, DKIM_PUBLIC_KEY_FILE))
    if not result.valid:
        sys.stderr.write(f"invalid: {result.reason}\n")
        return EXIT_FAIL
    decision = result.decision or {}
    sys.stdout.write(
        f"valid: signed by {result.selector}._domainkey.{result.domain}\n"
        + "".join(f"{key}: {value}\n" for key, value in decision.items())
    )
    return EXIT_OK


def register(audit: Any, add: Callable[..., argparse.ArgumentParser], load: Loader) -> None:
    """Add the audit subcommands to the `gateway audit` parser."""

    def command(name: str, handler: Callable[[argparse.Namespace, Loader], int], text: str) -> Any:
        parser = add(audit, name, lambda args: handler(args, load), text)
        parser.add_argument("--log", metavar="FOLDER", help="a transfer log folder (no config)")
        return parser

    shown = command("show", show, "every record about one message")
    shown.add_argument("ref")
    shown.add_argument("--json", action="store_true")

    checked = command("verify", verify, "check the hash chain and the signed checkpoints")
    checked.add_argument("--pubkey", metavar="FILE", help="the audit-signing public key (PEM)")

    for name, handler, text in (
        ("search", search, "records matching filters"),
        ("export", export, "records for spreadsheets (csv) or tools (jsonl)"),
    ):
        parser = command(name, handler, text)
        parser.add_argument("--since", help="from this time (2026-11-25, or RFC 3339)")
        parser.add_argument("--until", help="before this time")
        parser.add_argument("--event", action="append", help="this event (repeatable)")
        parser.add_argument("--verdict", choices=["release", "hold"])
        parser.add_argument("--domain", help="sender or recipient domain")
        parser.add_argument("--client", help="the agency's client name")
        parser.add_argument("--marking", help="protective marking, e.g. OFFICIAL-SENSITIVE")
        parser.add_argument("--address", help="an address (needs the pseudonym key)")
        parser.add_argument(
            "--pseudonym-key", metavar="FILE", help="the pseudonym key file (instead of the config)"
        )
        if name == "search":
            parser.add_argument("--json", action="store_true")
        else:
            parser.add_argument("--format", choices=["csv", "jsonl"], required=True)

    message = add(
        audit,
        "verify-message",
        lambda args: verify_message(args, load),
        "check a delivered message's decision signature (DKIM)",
    )
    message.add_argument("file", metavar="FILE.eml")
    message.add_argument("--pubkey", metavar="FILE", help="the DKIM public key (PEM)")
