"""The gateway's exceptions, all rooted in one class.

    GatewayError                    anything the gateway itself reports
    ├── ConfigError                 a config or policy file is wrong (file, line, key, problem)
    │   └── PolicyError             a policy file is wrong, or a policy cannot be built
    ├── AddressError                an envelope address is refused (carries a reason code)
    ├── KeyStoreError               keys missing, unreadable or of the wrong form
    ├── SpoolError                  the spool could not store or read a message durably
    │   └── SpoolCorruptError       a spool file failed authentication or is malformed
    ├── AuditError                  the transfer log could not be written or read
    │   └── AuditIntegrityError     the transfer log does not verify (names the first bad seq)
    ├── DeliveryError               a delivery attempt failed
    │   ├── TemporaryDeliveryError  try again later (4xx, no TLS, bad certificate, network)
    │   └── PermanentDeliveryError  give up and bounce (5xx)
    └── UsageError                  the CLI was called wrongly (exit 2)

The CLI turns any of these into one line and an exit code; the SMTP layer into a reply code.
"""

from __future__ import annotations

from pathlib import Path


class GatewayError(Exception):
    """Root of every error the gateway raises on purpose."""


class ConfigError(GatewayError):
    """A config file is wrong; the message names the file, line and problem."""

    def __init__(
        self,
        problem: str,
        *,
        file: Path | str | None = None,
        line: int | None = None,
        key: str | None = None,
    ) -> None:
        self.problem = problem
        self.file = Path(file) if file is not None else None
        self.line = line
        self.key = key
        super().__init__(self.describe())

    def describe(self) -> str:
        """Render `file:line: key: problem`, leaving out what is unknown."""
        where = ""
        if self.file is not None:
            where = str(self.file)
            if self.line is not None:
                where += f":{self.line}"
            where += ": "
        what = f"{self.key}: " if self.key else ""
        return f"{where}{what}{self.problem}"


class PolicyError(ConfigError):
    """A policy file is wrong, or the policy as a whole is not acceptable."""


class AddressError(GatewayError):
    """An envelope address is refused; `reason` is a stable reason code."""

    def __init__(self, reason: str, detail: str) -> None:
        self.reason = reason
        self.detail = detail
        super().__init__(f"{reason}: {detail}")


class KeyStoreError(GatewayError):
    """Keys are missing, unreadable, or malformed."""


class SpoolError(GatewayError):
    """The spool could not durably store or read a message."""


class SpoolCorruptError(SpoolError):
    """A spool file failed authentication or is malformed."""


class AuditError(GatewayError):
    """The transfer log could not be written or read."""


class AuditIntegrityError(AuditError):
    """The transfer log does not verify; `seq` is the first bad record, if known."""

    def __init__(self, message: str, seq: int | None = None) -> None:
        self.seq = seq
        super().__init__(message)


class DeliveryError(GatewayError):
    """A delivery attempt failed; `code` is the SMTP reply code when there was one."""

    def __init__(self, message: str, *, code: int | None = None, kind: str = "error") -> None:
        self.code = code
        self.kind = kind
        super().__init__(message)


class TemporaryDeliveryError(DeliveryError):
    """A delivery failed in a way that may succeed later: defer and retry."""


class PermanentDeliveryError(DeliveryError):
    """A delivery failed for good: bounce."""


class UsageError(GatewayError):
    """The command line was wrong (exit status 2)."""
