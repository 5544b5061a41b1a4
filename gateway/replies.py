"""Every SMTP reply the gateway sends, as a named constant (SPEC section 4).

Replies never echo exception text or client input back, except the decision reference and the
reason codes with the domains they concern.
"""

from __future__ import annotations

# Connection level
NOT_A_CLIENT = "554 5.7.1 Access denied: this host is not a configured client"
SHUTTING_DOWN = "421 4.3.2 Service shutting down, try again later"
TOO_MANY_CONNECTIONS = "421 4.7.0 Too many connections, try again later"
TIMEOUT = "421 4.4.2 Timeout, closing connection"
TOO_SLOW = "421 4.4.2 Data arriving too slowly, closing connection"
TOO_MANY_ERRORS = "421 4.7.0 Too many errors, closing connection"

# TLS and authentication
TLS_REQUIRED = "530 5.7.0 Must issue a STARTTLS command first"
AUTH_REQUIRED = "530 5.7.0 Authentication required"
ALREADY_TLS = "503 5.5.1 TLS already active"
AUTH_FAILED = "535 5.7.8 Authentication credentials invalid"
AUTH_BAD_BASE64 = "501 5.5.2 Cannot decode the AUTH data"

# Envelope
UNKNOWN_COMMAND = "500 5.5.2 Error: command not recognised"
SYNTAX_MAIL = "501 5.5.4 Syntax: MAIL FROM:<address> [parameters]"
SYNTAX_RCPT = "501 5.5.4 Syntax: RCPT TO:<address> [parameters]"
NESTED_MAIL = "503 5.5.1 Error: nested MAIL command"
NEED_MAIL = "503 5.5.1 Error: need MAIL command"
NEED_RCPT = "503 5.5.1 Error: need RCPT command"
SENDER_OK = "250 2.1.0 Sender OK"
RECIPIENT_OK = "250 2.1.5 Recipient OK"
TOO_MANY_RECIPIENTS = "452 4.5.3 Too many recipients"
PARAMETER_NOT_SUPPORTED = "555 5.5.4 Parameter not recognised or not implemented"
SIZE_EXCEEDED = "552 5.3.4 Message size exceeds fixed maximum message size"
SMTPUTF8_NOT_DECLARED = "553 5.6.7 Non-ASCII address needs the SMTPUTF8 parameter"
BODY_NOT_SUPPORTED = "501 5.5.4 BODY must be 7BIT or 8BITMIME"
LOW_ON_SPACE = "452 4.3.1 Insufficient system storage, try again later"


def bad_address(reason: str) -> str:
    """553 5.1.3 with the stable reason code (never the address itself)."""
    return f"553 5.1.3 Address refused ({reason})"


def sender_not_allowed() -> str:
    """553 5.7.1: the sender's domain is not one this client may send for."""
    return "553 5.7.1 Sender not allowed for this client (sender_not_allowed)"


def recipient_refused(reason: str, domain: str) -> str:
    """550 5.7.1 for a recipient refused by policy (`on_insecure = "reject"`)."""
    return f"550 5.7.1 Recipient domain not secure ({reason}: {domain})"


# DATA
START_DATA = "354 End data with <CR><LF>.<CR><LF>"
SMUGGLING = "550 5.6.0 Bare CR, bare LF or NUL in message data (smuggling_suspected)"
LINE_TOO_LONG = "500 5.5.2 Line too long (RFC 5321 section 4.5.3.1.6)"
HEADER_TOO_LARGE = "552 5.3.4 Message header section too large"
SPOOL_FAILED = "452 4.3.1 Insufficient system storage, message not accepted"
INTERNAL_ERROR = "451 4.3.0 Internal error, try again later"


def queued(ref: str) -> str:
    """250 for a released message."""
    return f"250 2.0.0 Ok: queued as {ref}"


def held(ref: str, detail: str) -> str:
    """250 for a held message, with the reason codes and the domains they concern."""
    return f"250 2.0.0 Ok: held as {ref} ({detail})"
