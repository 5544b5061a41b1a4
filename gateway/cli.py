"""The `gateway` command (SPEC section 7).

Exit codes: 0 success, 1 failure or integrity problem, 2 usage. Every error is one line on
stderr naming what to fix; never a traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import sys
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from gateway import __version__, cli_audit
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
    from gateway.keys import dkim_dns_record, init_keys, public_key_pem  # noqa: PLC0415

    config = _load_config(args)
    keys = init_keys(config.keys_path)
    sys.stdout.write(f"keys in {config.keys_path}: missing ones created (key id {keys.key_id})\n")
    sys.stdout.write("audit-signing public key (give it to auditors):\n")
    sys.stdout.write(public_key_pem(keys))
    if keys.dkim_key is not None:
        dkim = config.dkim
        sys.stdout.write(
            "DKIM record to publish in DNS (proves released messages passed the gateway):\n"
            f'{dkim.selector}._domainkey.{dkim.domain}. IN TXT "{dkim_dns_record(keys)}"\n'
        )
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


def cmd_keys_dkim_record(args: argparse.Namespace) -> int:
    """Print the DKIM TXT record for the existing key (from dkim.pub: no secret needed)."""
    from gateway.keys import DKIM_PUBLIC_KEY_FILE, dkim_record_for, load_public_key  # noqa: PLC0415

    config = _load_config(args)
    record = dkim_record_for(load_public_key(config.keys_path / DKIM_PUBLIC_KEY_FILE))
    dkim = config.dkim
    sys.stdout.write(f'{dkim.selector}._domainkey.{dkim.domain}. IN TXT "{record}"\n')
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


def _queue_call(config: config_module.Config, command: str, **request: Any) -> Any:
    """Ask the running daemon; without one, do the same directly on the spool."""
    from gateway import control, offline  # noqa: PLC0415

    if control.daemon_running(config.control_socket):
        return control.request(config.control_socket, command, **request)
    return asyncio.run(offline.run(config, command, request))


def cmd_queue_list(args: argparse.Namespace) -> int:
    """List the queued messages, without content."""
    rows = _queue_call(
        _load_config(args),
        "queue.list",
        state=args.state,
        domain=args.domain,
        older_than=args.older_than,
    )
    if args.json:
        # One object per line: quick to write for 100,000 rows, still easy to read and grep.
        sys.stdout.write(
            "[\n" + ",\n".join(json.dumps(row, ensure_ascii=False) for row in rows) + "\n]\n"
            if rows
            else "[]\n"
        )
        return EXIT_OK
    if not rows:
        sys.stdout.write("queue is empty\n")
    for row in rows:
        reasons = ",".join(row["reasons"]) or "-"
        flags = "  releasable" if row.get("releasable") else ""
        flags += "  notice" if row.get("notice") else ""
        sys.stdout.write(
            f"{row['ref']}  {row['state']:<8}  {row['received']}  {row['sender_domain'] or '<>'} "
            f"-> {','.join(row['recipient_domains'])}  {reasons}{flags}\n"
        )
    return EXIT_OK


def cmd_queue_show(args: argparse.Namespace) -> int:
    """Show one message's envelope (pseudonyms and domains), decision and state."""
    shown = _queue_call(_load_config(args), "queue.show", ref=args.ref)
    if args.json:
        _print_json(shown)
    else:
        for key, value in shown.items():
            text = value if isinstance(value, str) else json.dumps(value)
            sys.stdout.write(f"{key}: {text}\n")
    return EXIT_OK


def cmd_queue_release(args: argparse.Namespace) -> int:
    """Release a held message (recorded with your Unix user name and reason)."""
    result = _queue_call(
        _load_config(args),
        "queue.release",
        ref=args.ref,
        reason=args.reason,
        drop_insecure=args.drop_insecure,
    )
    dropped = result.get("dropped_domains") or []
    extra = f"; dropped recipients in {', '.join(dropped)}" if dropped else ""
    sys.stdout.write(f"released {result['ref']}{extra}\n")
    return EXIT_OK


def cmd_queue_reject(args: argparse.Namespace) -> int:
    """Reject a held message: sender notified, content purged."""
    result = _queue_call(_load_config(args), "queue.reject", ref=args.ref, reason=args.reason)
    sys.stdout.write(f"rejected {result['ref']}; content deleted, sender notified\n")
    return EXIT_OK


# -- audit -----------------------------------------------------------------------------------


# -- shipped examples --------------------------------------------------------------------------


def _print_shipped(name: str) -> int:
    from importlib.resources import files  # noqa: PLC0415

    sys.stdout.write(files("gateway").joinpath("share", name).read_text(encoding="utf-8"))
    return EXIT_OK


def cmd_example_config(_args: argparse.Namespace) -> int:
    """Print the example production config shipped with the package."""
    return _print_shipped("gateway.toml")


def cmd_example_policy(_args: argparse.Namespace) -> int:
    """Print the default secure-domain policy shipped with the package."""
    return _print_shipped("secure-domains.toml")


# -- reload ----------------------------------------------------------------------------------


def cmd_reload(args: argparse.Namespace) -> int:
    """Ask the running daemon to load its client list and policy again (as SIGHUP does)."""
    from gateway.control import request  # noqa: PLC0415

    config = _load_config(args)
    result = request(config.control_socket, "reload")
    sys.stdout.write(
        f"reloaded: policy {str(result['policy'])[:16]}, {result['clients']} clients\n"
    )
    if result.get("released"):
        sys.stdout.write(f"released (release_when_secure): {' '.join(result['released'])}\n")
    if result.get("releasable"):
        sys.stdout.write(
            f"held and now releasable (gateway queue release): {' '.join(result['releasable'])}\n"
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
    add(sub, "example-config", cmd_example_config, "print the example production config")
    add(sub, "example-policy", cmd_example_policy, "print the default secure-domain policy")
    keys = sub.add_parser("keys", help="key management").add_subparsers(
        dest="action", required=True, parser_class=_Parser
    )
    add(keys, "init", cmd_keys_init, "create keys and print the public key")
    add(keys, "dkim-record", cmd_keys_dkim_record, "print the DKIM TXT record to publish")
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
    listing.add_argument("--domain", help="only messages from or to this domain")
    listing.add_argument(
        "--older-than", type=int, metavar="SECONDS", help="only messages received before then"
    )
    listing.add_argument("--json", action="store_true")
    show = add(queue, "show", cmd_queue_show, "one message's envelope and decision")
    show.add_argument("ref")
    show.add_argument("--json", action="store_true")
    release = add(queue, "release", cmd_queue_release, "release a held message")
    release.add_argument("ref")
    release.add_argument("--reason", required=True, help="recorded in the transfer log")
    release.add_argument(
        "--drop-insecure", action="store_true", help="drop recipients whose domain is not secure"
    )
    reject = add(queue, "reject", cmd_queue_reject, "reject a held message")
    reject.add_argument("ref")
    reject.add_argument("--reason", required=True, help="recorded in the transfer log")

    audit = sub.add_parser("audit", help="the transfer log").add_subparsers(
        dest="action", required=True, parser_class=_Parser
    )
    cli_audit.register(audit, add, _load_config)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: run one subcommand, turning errors into one line and an exit code."""
    try:
        args = build_parser().parse_args(argv)
        if args.command != "serve":
            # Commands that touch the spool log as the daemon does, but on stderr: stdout is
            # for their answer (JSON, CSV).
            from gateway import logconfig  # noqa: PLC0415

            logconfig.configure("warning", stream=sys.stderr)
        handler: Handler = args.handler
        return handler(args)
    except BrokenPipeError:
        # `gateway audit search | head`: the reader left. Not an error; no traceback.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_OK
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
