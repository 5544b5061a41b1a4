"""The DATA phase as a pure, incremental reader: lines in, spool bytes out.

The SMTP layer reads the client's DATA stream line by line (split on LF) and feeds each line
here. The reader:

- refuses SMTP smuggling: any bare CR, bare LF or NUL anywhere in DATA (the only end of data
  is CRLF . CRLF), and any line over the RFC 5321 limit of 1000 octets;
- enforces the message size limit while reading, so an oversized message is never held;
- undoes dot-stuffing and keeps a SHA-256 digest of the message exactly as received;
- holds back the header section (capped in size and field count), strips the fields only the
  gateway may set, reads the protective marking, then hands out the gateway's Received field
  and the cleaned header section, and after that each body line as it comes.

A reader that has found a problem keeps consuming lines until the end of data (so the session
stays in step with the client) but hands out nothing more; `error` then says which reply to send.
"""

from __future__ import annotations

import hashlib
from enum import StrEnum

from gateway import headers

MAX_LINE = 1000  # RFC 5321 section 4.5.3.1.6, CRLF included
END_OF_DATA = b".\r\n"


class DataError(StrEnum):
    """Why a DATA stream was refused."""

    SMUGGLING = "smuggling_suspected"
    LINE_TOO_LONG = "line_too_long"
    TOO_BIG = "message_too_big"
    HEADER_TOO_LARGE = "header_too_large"


class DataReader:
    """Incremental reader of one DATA stream."""

    def __init__(
        self,
        *,
        max_size: int,
        max_header_size: int = 102_400,
        max_header_fields: int = 1000,
        prefix: bytes = b"",
    ) -> None:
        self.max_size = max_size
        self.max_header_size = max_header_size
        self.max_header_fields = max_header_fields
        self.prefix = prefix
        self.error: DataError | None = None
        self.finished = False
        self.size = 0  # bytes of the message as received (after dot-unstuffing)
        self.marking: str | None = None
        self.purpose_header: bytes | None = None  # raw X-Sharing-Purpose, capped; never logged
        self.removed_fields = 0
        self._digest = hashlib.sha256()
        self._header: list[bytes] | None = []  # None once the header section is out
        self._header_size = 0
        self._after_crlf = True  # the DATA command's own CRLF precedes the first line

    @property
    def digest(self) -> str:
        """`sha256:` and the hex digest of the message as received."""
        return "sha256:" + self._digest.hexdigest()

    def fail(self, error: DataError) -> None:
        """Record the first problem; later ones do not replace it."""
        if self.error is None:
            self.error = error
        self._header = None

    def feed(self, line: bytes, *, overlong: bool = False) -> bytes:
        """Take one raw line (ending in LF, or a fragment if `overlong`); return bytes to spool."""
        if self.finished:
            return b""
        # The limit counts the line as written, so a stuffed dot is not part of it.
        if overlong or len(line) > MAX_LINE + line.startswith(b"."):
            self.fail(DataError.LINE_TOO_LONG)
            return b""
        if line == END_OF_DATA and self._after_crlf:
            # Only CRLF . CRLF ends the data: a dot line after a bare LF does not, so a smuggled
            # "end" never puts the session out of step with what the client meant.
            self.finished = True
            return self._finish()
        self._after_crlf = line.endswith(b"\r\n")
        if not self._after_crlf or b"\r" in line[:-2] or b"\n" in line[:-2] or b"\0" in line:
            self.fail(DataError.SMUGGLING)
            return b""
        if line.startswith(b"."):
            line = line[1:]
        self.size += len(line)
        if self.size > self.max_size:
            self.fail(DataError.TOO_BIG)
        if self.error is not None:
            return b""
        self._digest.update(line)
        if self._header is None:
            return line
        if line == b"\r\n":
            return self._release_header(body_start=line)
        self._header.append(line)
        self._header_size += len(line)
        if self._header_size > self.max_header_size or len(self._header) > self.max_header_fields:
            # Continuation lines count towards the field cap too: a cheap, safe bound.
            self.fail(DataError.HEADER_TOO_LARGE)
        return b""

    def _release_header(self, body_start: bytes) -> bytes:
        section = b"".join(self._header or [])
        self._header = None
        cleaned, self.removed_fields = headers.remove_fields(section)
        self.marking = headers.protective_marking(headers.field_value(section, b"subject"))
        purpose = headers.field_value(section, b"x-sharing-purpose")
        self.purpose_header = purpose[:100] if purpose is not None else None
        return self.prefix + cleaned + body_start

    def _finish(self) -> bytes:
        if self.error is not None:
            return b""
        if self._header is not None:
            # A message with no body: everything was header section.
            return self._release_header(body_start=b"")
        return b""
