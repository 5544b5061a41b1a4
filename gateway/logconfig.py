"""Operational logs: structlog JSON on stdout, one event per line, no personal data.

Log events name what happened in the past tense (`message_accepted`, `delivery_deferred`) and
carry only references, domains, pseudonyms, counts, sizes and reason codes. The last processor
is a safety net that drops any key known to hold personal data, should a caller slip.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import MutableMapping
from typing import Any, TextIO

import structlog

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING}
_LEVELS["error"] = logging.ERROR

# Keys that must never reach a log line, whatever a caller passes.
_FORBIDDEN_KEYS = frozenset(
    {"address", "sender", "recipient", "recipients_addresses", "subject", "body", "local_part"}
)


def _drop_personal_data(
    _logger: Any, _method: str, event_dict: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    for key in _FORBIDDEN_KEYS & event_dict.keys():
        event_dict[key] = "[removed]"
    return event_dict


def configure(level: str = "info", stream: TextIO | None = None) -> None:
    """Send JSON log lines to stdout (or `stream`) at `level`; quiet aiosmtpd's logger."""
    # aiosmtpd's `mail.log` writes every sender and recipient at INFO: never let it.
    # Its warnings would reach stderr as plain text through logging's last-resort handler;
    # the gateway logs every refusal itself, as JSON.
    mail_log = logging.getLogger("mail.log")
    mail_log.setLevel(logging.WARNING)
    mail_log.propagate = False
    mail_log.addHandler(logging.NullHandler())
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.ExceptionRenderer(
                structlog.tracebacks.ExceptionDictTransformer(show_locals=False)
            ),
            _drop_personal_data,
            structlog.processors.JSONRenderer(),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS.get(level, logging.INFO)),
        logger_factory=structlog.PrintLoggerFactory(file=stream or sys.stdout),
        cache_logger_on_first_use=False,
    )


def get_logger(name: str) -> Any:
    """A structlog logger bound with the component name."""
    return structlog.get_logger(component=name)
