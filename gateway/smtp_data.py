"""The DATA phase as a pure, incremental reader: bytes in, spool bytes out.

The SMTP layer reads the client's DATA stream in blocks that may split lines anywhere and
feeds each block here (`feed_block`); `feed` takes one whole line. The reader:

- refuses SMTP smuggling: any bare CR, bare LF or NUL anywhere in DATA (the only end of data
  is CRLF . CRLF), and any line over the RFC 5321 limit of 1000 octets;
- enforces the message size limit while reading, so an oversized message is never held;
- undoes dot-stuffing and keeps a SHA-256 digest of the message exactly as received;
- holds back the header section (capped in size and field count), strips the fields only the
  gateway may set, reads the protective marking, then hands out the gateway's Received field
  and the cleaned header section, and after that each body line as it comes.

A reader that has found a problem keeps consuming lines until the end of data (so the session
stays in step with the client) but hands out nothing more; `error` then says which reply to send.

Blocks of the body take a fast path: when a run of whole lines has no NUL, no CR or LF outside
a CRLF pair and no run of 1000 octets without a line feed, each of its lines passes every check
above, so the run is unstuffed, counted and hashed as a whole. Anything else, and the header
section, goes line by line through `feed`. Both paths give the same result for any split.
"""

from __future__ import annotations

import hashlib
import re
from enum import StrEnum

from gateway import headers

MAX_LINE = 1000  # RFC 5321 section 4.5.3.1.6, CRLF included
END_OF_DATA = b".\r\n"
END_AFTER_LINE = b"\r\n.\r\n"  # the end of data after a line: what a block reader waits for
_LONG_RUN = re.compile(rb"[^\n]{%d}" % MAX_LINE)  # a line that may be too long: check it alone


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
        self._carry = b""  # the start of a line whose end has not come yet (feed_block)
        self._skipping = False  # the carried line is already too long: only its end matters

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
            if not overlong:  # a whole line: whether it ended in CRLF decides the next one
                self._after_crlf = line.endswith(b"\r\n")
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

    def feed_block(self, data: bytes) -> bytes:
        """Take the next bytes of the DATA stream, split anywhere; return bytes to spool."""
        if self.finished:
            return b""
        if self._carry:
            data = self._carry + data
        cut = data.rfind(b"\n") + 1
        out: list[bytes] = []
        position = 0
        if self._skipping and cut:
            # The end of a line already known to be too long: only its ending matters.
            first = data.find(b"\n") + 1
            self._after_crlf = data[:first].endswith(b"\r\n")
            self._skipping = False
            position = first
        while position < cut and not self.finished:
            if self._header is None:
                out.append(self._feed_lines(data, position, cut))
                break
            end = data.find(b"\n", position) + 1
            out.append(self.feed(data[position:end]))
            position = end
        rest = data[cut:] if not self.finished else b""
        if self._skipping or len(rest) > MAX_LINE + 1:
            # Longer than any line may be, dot included, and no end yet: refuse it now and
            # keep only its last octet, to know at its end whether that end was CRLF.
            if not self._skipping:
                self.fail(DataError.LINE_TOO_LONG)
                self._skipping = True
            rest = rest[-1:]
        self._carry = rest
        return b"".join(out)

    def _feed_lines(self, data: bytes, start: int, stop: int) -> bytes:
        """Whole lines of the body (or of a refused message): in one piece when clean."""
        if self._after_crlf and data.startswith(END_OF_DATA, start):
            end = start
        else:
            found = data.find(END_AFTER_LINE, start, stop)
            end = stop if found < 0 else found + 2
        run = data[start:end]
        clean = (
            b"\0" not in run
            and run.count(b"\n") == run.count(b"\r\n") == run.count(b"\r")
            and _LONG_RUN.search(run) is None
        )
        if not clean:
            return b"".join(self._feed_each(data, start, stop))
        out = b""
        if run:
            self._after_crlf = True
            if self.error is None:
                out = run.replace(b"\r\n.", b"\r\n")
                if out.startswith(b"."):
                    out = out[1:]
                self.size += len(out)
                if self.size > self.max_size:
                    self.fail(DataError.TOO_BIG)
                    out = b""
                else:
                    self._digest.update(out)
        if end < stop:
            self.finished = True
            out += self._finish()
        return out

    def _feed_each(self, data: bytes, start: int, stop: int) -> list[bytes]:
        out = []
        while start < stop and not self.finished:
            end = data.find(b"\n", start) + 1
            out.append(self.feed(data[start:end]))
            start = end
        return out

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
