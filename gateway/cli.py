"""The `gateway` command (SPEC section 7).

Exit codes: 0 success, 1 failure or integrity problem, 2 usage. Every error is one line on
stderr naming what to fix; never a traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from gateway import __version__
from gateway import config as config_module
from gateway.errors import GatewayError, UsageError

EXIT_OK, EXIT_FAIL, EXIT_USAGE = 0, 1, 2

Handler = Callable[[argparse.Namespace], int]


class _Parser(argparse.ArgumentParser):
    """argparse that reports usage errors as UsageError instead of exiting itself."""

    def error(self, message: str) -> Any:
        raise UsageError(f"{self.prog}: {message}")


def _load_config(args: argparse.Namespace) -> config_module.Config:
    path = Path(args.config) if args.config else config_module.default_path()
    return config_module.load_or_explain(path)


def _print_json(value: Any) -> None:
    sys.stdout.write(json.dumps(value, indent=2, ensure_ascii=False) + "\n")


# -- serve, keys -----------------------------------------------------------------------------


def cmd_serve(args: argparse.Namespace) -> int:
    """Run the daemon."""
    from gateway import daemon, logconfig  # noqa: PLC0415  (keep CLI start-up light)

    config = _load_config(args)
    logconfig.configure(config.log_level)
    daemon.serve(config)
    return EXIT_OK


def cmd_keys_init(args: argparse.Namespace) -> int:
    """Create the spool, pseudonym and audit-signing keys; print the public key."""
    from gateway.keys import init_keys, public_key_pem  # noqa: PLC0415

    config = _load_config(args)
    keys = init_keys(config.keys_path)
    sys.stdout.write(f"keys created in {config.keys_path} (key id {keys.key_id})\n")
    sys.stdout.write(public_key_pem(keys))
    return EXIT_OK


# -- passwd ----------------------------------------------------------------------------------


def cmd_passwd(args: argparse.Namespace) -> int:  # noqa: ARG001  (every handler takes args)
    """Read one line (less its LF or CRLF), or ask twice on a terminal; print its hash."""
    import getpass  # noqa: PLC0415

    from gateway.passwords import hash_password  # noqa: PLC0415

    if sys.stdin.isatty():
        password = getpass.getpass("Password: ")
        if getpass.getpass("Password again: ") != password:
            raise GatewayError("the two passwords differ; run gateway passwd again")
    else:
        line = sys.stdin.buffer.readline()
        newline = b"\r\n" if line.endswith(b"\r\n") else b"\n"
        try:
            password = line.removesuffix(newline).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise GatewayError("the password on stdin is not UTF-8 text") from exc
    if not password:
        raise GatewayError("empty password: give one line on stdin, or type one when asked")
    try:
        encoded = hash_password(password)
    except ValueError as exc:
        raise GatewayError(str(exc)) from exc
    sys.stdout.write(encoded + "\n")
    return EXIT_OK


# -- policy ----------------------------------------------------------------------------------


def cmd_policy_check(args: argparse.Namespace) -> int:
    """Validate config and policy; warnings to stderr."""
    from gateway.policy import load_policy  # noqa: PLC0415

    config = _load_config(args)
    policy = load_policy(config.policy_path)
    for warning in policy.warnings(datetime.now(UTC).date()):
        sys.stderr.write(f"warning: {warning}\n")
    sys.stdout.write(
        f"ok: config {config.file}; policy {config.policy_path} "
        f"(version {policy.short_version}, {len(policy.entries)} secure domain entries, "
        f"on_insecure = {policy.on_insecure})\n"
    )
    return EXIT_OK


def cmd_policy_explain(args: argparse.Namespace) -> int:
    """Say for each address whether its domain is secure, and by which rule or reason."""
    from gateway.policy import explain, load_policy  # noqa: PLC0415

    config = _load_config(args)
    policy = load_policy(config.policy_path)
    today = datetime.now(UTC).date()
    results = [explain(policy, address, today) for address in args.addresses]
    if args.json:
        _print_json([dataclasses.asdict(r) for r in results])
    else:
        for r in results:
            verdict = "secure" if r.secure else "NOT secure"
            because = f"rule {r.rule}" if r.secure else f"reason {r.reason}"
            extra = f", rule {r.rule}" if not r.secure and r.rule else ""
            sys.stdout.write(
                f"{r.address}: {verdict} (domain {r.domain or '-'}; {because}{extra})\n"
            )
    return EXIT_OK if all(r.secure for r in results) else EXIT_FAIL


# -- queue -----------------------------------------------------------------------------------


def _spool(config: config_module.Config) -> Any:
    from gateway.keys import load_keys  # noqa: PLC0415
    from gateway.spool import Spool  # noqa: PLC0415

    if not config.spool_path.is_dir():
        raise GatewayError(f"{config.spool_path}: spool folder not found")
    return Spool(config.spool_path, load_keys(config.keys_path).spool_key)


def _summary(entry: Any) -> dict[str, Any]:
    return {
        "ref": entry.ref,
        "state": str(entry.state),
        "received": entry.received.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "sender_domain": entry.sender_domain,
        "recipient_domains": sorted({r.domain for r in entry.pending()}),
        "reasons": list(entry.reasons),
    }


def cmd_queue_list(args: argparse.Namespace) -> int:
    """List the spool's messages, without content."""
    from gateway.queue_entry import State  # noqa: PLC0415

    spool = _spool(_load_config(args))
    state = State(args.state) if args.state else None
    rows = sorted((_summary(e) for e in spool.entries(state)), key=lambda r: r["ref"])
    if args.json:
        _print_json(rows)
        return EXIT_OK
    if not rows:
        sys.stdout.write("queue is empty\n")
    for row in rows:
        reasons = ",".join(row["reasons"]) or "-"
        sys.stdout.write(
            f"{row['ref']}  {row['state']:<8}  {row['received']}  {row['sender_domain']} -> "
            f"{','.join(row['recipient_domains'])}  {reasons}\n"
        )
    return EXIT_OK


def cmd_queue_show(args: argparse.Namespace) -> int:
    """Show one message's envelope (pseudonyms and domains), decision and state."""
    entry = _spool(_load_config(args)).load(args.ref)
    shown = _summary(entry) | {
        "client": entry.client,
        "sender": {"domain": entry.sender_domain, "pseudonym": entry.sender_pseudonym},
        "recipients": [
            {"domain": r.domain, "pseudonym": r.pseudonym, "status": r.status}
            for r in entry.recipients
        ],
        "verdict": entry.verdict,
        "policy": entry.policy,
        "decided_at": entry.decided_at.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "size": entry.size,
        "digest": entry.digest,
        "attempts": entry.attempts,
        "next_attempt": entry.next_attempt.strftime("%Y-%m-%dT%H:%M:%SZ")
        if entry.next_attempt
        else None,
        "last_error": entry.last_error,
    }
    if args.json:
        _print_json(shown)
    else:
        for key, value in shown.items():
            text = value if isinstance(value, str) else json.dumps(value)
            sys.stdout.write(f"{key}: {text}\n")
    return EXIT_OK


# -- audit -----------------------------------------------------------------------------------


def cmd_audit_show(args: argparse.Namespace) -> int:
    """Every audit record about one message."""
    from gateway.audit import records_for  # noqa: PLC0415

    found = records_for(_load_config(args).audit_path, args.ref)
    if args.json:
        _print_json(found)
    else:
        for record in found:
            sys.stdout.write(json.dumps(record, ensure_ascii=False) + "\n")
    if not found:
        sys.stderr.write(f"no audit records for {args.ref}\n")
        return EXIT_FAIL
    return EXIT_OK


# -- reload ----------------------------------------------------------------------------------


def cmd_reload(args: argparse.Namespace) -> int:
    """Ask the running daemon to load its client list and policy again (as SIGHUP does)."""
    from gateway.control import request  # noqa: PLC0415

    config = _load_config(args)
    result = request(config.control_socket, "reload")
    sys.stdout.write(
        f"reloaded: policy {str(result['policy'])[:16]}, {result['clients']} clients\n"
    )
    return EXIT_OK


# -- parser ----------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    """The argument parser for every subcommand."""
    common = _Parser(add_help=False)
    common.add_argument(
        "--config", help="config file (default $GATEWAY_CONFIG or /etc/gateway/gateway.toml)"
    )
    parser = _Parser(prog="gateway", description="Secure transfer gateway for safeguarding mail.")
    parser.add_argument("--version", action="version", version=f"gateway {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    def add(group: Any, name: str, handler: Handler, helptext: str) -> argparse.ArgumentParser:
        command: argparse.ArgumentParser = group.add_parser(name, parents=[common], help=helptext)
        command.set_defaults(handler=handler)
        return command

    add(sub, "serve", cmd_serve, "run the daemon")
    add(sub, "reload", cmd_reload, "reload client list and policy in the running daemon")
    keys = sub.add_parser("keys", help="key management").add_subparsers(
        dest="action", required=True, parser_class=_Parser
    )
    add(keys, "init", cmd_keys_init, "create keys and print the public key")
    add(sub, "passwd", cmd_passwd, "read a password on stdin, print an auth_password_hash")

    policy = sub.add_parser("policy", help="the secure-domain policy").add_subparsers(
        dest="action", required=True, parser_class=_Parser
    )
    add(policy, "check", cmd_policy_check, "validate config and policy")
    explain = add(policy, "explain", cmd_policy_explain, "is an address's domain secure, and why")
    explain.add_argument("addresses", nargs="+", metavar="ADDRESS")
    explain.add_argument("--json", action="store_true")

    queue = sub.add_parser("queue", help="the spool").add_subparsers(
        dest="action", required=True, parser_class=_Parser
    )
    listing = add(queue, "list", cmd_queue_list, "list messages (no content)")
    listing.add_argument("--state", choices=["held", "deferred", "active"])
    listing.add_argument("--json", action="store_true")
    show = add(queue, "show", cmd_queue_show, "one message's envelope and decision")
    show.add_argument("ref")
    show.add_argument("--json", action="store_true")

    audit = sub.add_parser("audit", help="the transfer log").add_subparsers(
        dest="action", required=True, parser_class=_Parser
    )
    audit_show = add(audit, "show", cmd_audit_show, "every record about one message")
    audit_show.add_argument("ref")
    audit_show.add_argument("--json", action="store_true")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: run one subcommand, turning errors into one line and an exit code."""
    try:
        args = build_parser().parse_args(argv)
        handler: Handler = args.handler
        return handler(args)
    except UsageError as exc:
        sys.stderr.write(f"{exc}\n")
        return EXIT_USAGE
    except GatewayError as exc:
        sys.stderr.write(f"gateway: {exc}\n")
        return EXIT_FAIL
    except KeyboardInterrupt:
        return EXIT_FAIL


if __name__ == "__main__":
    sys.exit(main())
