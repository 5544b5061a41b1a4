import hashlib
import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway import headers
from gateway.smtp_data import MAX_LINE, DataError, DataReader

PREFIX = b"Received: from test ([192.0.2.1])\r\n\tby gw id SG-TEST;\r\n\tdate\r\n"
END = b".\r\n"
BIG = 10_000_000


def _reader(**kwargs):
    """A DataReader with the test prefix and a generous size limit unless told otherwise."""
    kwargs.setdefault("max_size", BIG)
    return DataReader(prefix=PREFIX, **kwargs)


def _stuff(line: bytes) -> bytes:
    """Dot-stuff one line as an SMTP client does."""
    return b"." + line if line.startswith(b".") else line


def _feed(reader: DataReader, wire_lines: list[bytes]) -> bytes:
    """Feed raw wire lines (already stuffed, with their endings) and join what comes out."""
    return b"".join(reader.feed(line) for line in wire_lines)


def _send(reader: DataReader, lines: list[bytes]) -> bytes:
    """Send message lines (no endings) stuffed with CRLF, then the end of data."""
    return _feed(reader, [_stuff(line) + b"\r\n" for line in lines] + [END])


def _sha(data: bytes) -> str:
    """The reader's digest form of `data`."""
    return "sha256:" + hashlib.sha256(data).hexdigest()


MESSAGE = [
    b"From: a@bromley.gov.uk",
    b"X-Safeguarding-Decision: SG-FORGED; verdict=released;",
    b"\tpolicy=0000000000000000",
    b"Subject: OFFICIAL-SENSITIVE [PERSONAL] case 12",
    b"tls-required: No",
    b"To: b@nhs.net",
    b"",
    b"..leading dot in body",
    b"X-Safeguarding-Decision: body text is not a header",
    b"last line",
]


def test_output_is_prefix_cleaned_header_and_body():
    """The spooled bytes are the prefix, the cleaned header section, then the body unchanged."""
    reader = _reader()
    actual = _send(reader, MESSAGE)
    expected = (
        PREFIX
        + b"From: a@bromley.gov.uk\r\n"
        + b"Subject: OFFICIAL-SENSITIVE [PERSONAL] case 12\r\n"
        + b"To: b@nhs.net\r\n"
        + b"\r\n"
        + b"..leading dot in body\r\n"
        + b"X-Safeguarding-Decision: body text is not a header\r\n"
        + b"last line\r\n"
    )
    assert expected == actual


def test_forbidden_fields_are_counted_and_marking_read():
    """Both forbidden fields (folded, any case) are counted, and the Subject marking is read."""
    reader = _reader()
    _send(reader, MESSAGE)
    expected = (True, None, 2, "OFFICIAL-SENSITIVE [PERSONAL]")
    assert expected == (reader.finished, reader.error, reader.removed_fields, reader.marking)


def test_digest_and_size_are_of_the_message_as_received():
    """Digest and size cover the unstuffed message before any header change."""
    reader = _reader()
    _send(reader, MESSAGE)
    original = b"".join(line + b"\r\n" for line in MESSAGE)
    expected = (_sha(original), len(original))
    assert expected == (reader.digest, reader.size)


def test_dot_unstuffing():
    """A leading dot is removed once: `..` becomes `.`, `...x` becomes `..x`."""
    reader = _reader()
    actual = _feed(reader, [b"\r\n", b"..\r\n", b"...x\r\n", b".y\r\n", END])
    expected = PREFIX + b"\r\n" + b".\r\n" + b"..x\r\n" + b"y\r\n"
    assert expected == actual


def test_size_counts_unstuffed_bytes():
    """The size counts each stuffed line without its extra dot."""
    reader = _reader()
    _feed(reader, [b"..ab\r\n", END])
    expected = 5
    assert expected == reader.size


def test_empty_message():
    """End of data at once gives just the prefix, size 0 and the digest of nothing."""
    reader = _reader()
    actual = reader.feed(END)
    expected = (PREFIX, True, None, 0, _sha(b""))
    assert expected == (actual, reader.finished, reader.error, reader.size, reader.digest)


def test_message_without_body_is_released_at_end():
    """A message with no blank line is all header section, released at the end of data."""
    reader = _reader()
    output = [reader.feed(b"Subject: OFFICIAL hello\r\n"), reader.feed(b"TLS-Required: No\r\n")]
    output.append(reader.feed(END))
    expected = ([b"", b"", PREFIX + b"Subject: OFFICIAL hello\r\n"], "OFFICIAL", 1)
    assert expected == (output, reader.marking, reader.removed_fields)


def test_body_lines_are_released_as_they_come():
    """Once the header section is out, each body line is handed out when fed."""
    reader = _reader()
    first = reader.feed(b"A: 1\r\n")
    second = reader.feed(b"\r\n")
    third = reader.feed(b"body\r\n")
    expected = (b"", PREFIX + b"A: 1\r\n\r\n", b"body\r\n")
    assert expected == (first, second, third)


@pytest.mark.parametrize(
    "line",
    [
        b"bare LF\n",
        b"bare CR\r",
        b"CR in\rthe middle\r\n",
        b"LF in\nthe middle\r\n",
        b"NUL\0here\r\n",
        b"\0\r\n",
        b"CR before CRLF\r\r\n",
        b".\n",
        b"\n",
    ],
)
def test_smuggling_is_refused(line):
    """A bare CR, bare LF or NUL is SMUGGLING and nothing more is handed out."""
    reader = _reader()
    output = _feed(reader, [b"\r\n", line, b"more body\r\n"])
    expected = (PREFIX + b"\r\n", DataError.SMUGGLING, False)
    assert expected == (output, reader.error, reader.finished)


def test_smuggling_in_header_releases_nothing():
    """A smuggling line inside the header section means the header is never handed out."""
    reader = _reader()
    output = _feed(reader, [b"A: 1\r\n", b"B: 2\n", b"\r\n", b"body\r\n", END])
    expected = (b"", DataError.SMUGGLING, True)
    assert expected == (output, reader.error, reader.finished)


def test_dot_lf_is_not_end_of_data():
    """`.` followed by a bare LF does not end the data; only CRLF . CRLF does."""
    reader = _reader()
    _feed(reader, [b"\r\n", b".\n", END])
    before = reader.finished
    _feed(reader, [b"\r\n", END])
    expected = (False, True, DataError.SMUGGLING)
    assert expected == (before, reader.finished, reader.error)


def test_line_of_1000_octets_is_accepted():
    """A line of exactly 1000 octets with its CRLF is within the RFC 5321 limit."""
    reader = _reader()
    line = b"x" * (MAX_LINE - 2) + b"\r\n"
    output = _feed(reader, [b"\r\n", line, END])
    expected = (None, PREFIX + b"\r\n" + line)
    assert expected == (reader.error, output)


def test_line_over_1000_octets_is_refused():
    """A line of 1001 octets is LINE_TOO_LONG and nothing more is handed out."""
    reader = _reader()
    output = _feed(reader, [b"\r\n", b"x" * (MAX_LINE - 1) + b"\r\n", b"ok\r\n", END])
    expected = (PREFIX + b"\r\n", DataError.LINE_TOO_LONG, True)
    assert expected == (output, reader.error, reader.finished)


def test_dot_stuffed_line_at_limit_is_accepted():
    """A 998-octet text line starting with a dot is legal though it is 1001 octets stuffed."""
    reader = _reader()
    text = b"." + b"x" * (MAX_LINE - 3)
    output = _feed(reader, [b"\r\n", _stuff(text) + b"\r\n", END])
    expected = (None, PREFIX + b"\r\n" + text + b"\r\n")
    assert expected == (reader.error, output)


def test_overlong_fragment_is_refused():
    """A fragment flagged overlong is LINE_TOO_LONG; the reader still ends on CRLF . CRLF."""
    reader = _reader()
    output = reader.feed(b"\r\n") + reader.feed(b"x" * 10, overlong=True)
    output += _feed(reader, [b"after\r\n", END])
    expected = (PREFIX + b"\r\n", DataError.LINE_TOO_LONG, True)
    assert expected == (output, reader.error, reader.finished)


def test_message_at_max_size_is_accepted():
    """A message of exactly max_size bytes is accepted."""
    reader = _reader(max_size=14)
    _feed(reader, [b"Subject: a\r\n", b"\r\n", END])
    expected = (None, 14)
    assert expected == (reader.error, reader.size)


def test_message_over_max_size_is_refused():
    """Going past max_size is TOO_BIG; the line that crosses and all later ones give nothing."""
    reader = _reader(max_size=20)
    outputs = [
        reader.feed(line) for line in [b"Subject: a\r\n", b"\r\n", b"123456789\r\n", b"x\r\n", END]
    ]
    expected = ([b"", PREFIX + b"Subject: a\r\n\r\n", b"", b"", b""], DataError.TOO_BIG, True)
    assert expected == (outputs, reader.error, reader.finished)


def test_header_at_max_header_size_is_accepted():
    """A header section of exactly max_header_size bytes is released."""
    reader = _reader(max_header_size=30)
    output = _feed(reader, [b"A: 0123456789\r\n", b"B: 0123456789\r\n", b"\r\n", END])
    expected = (PREFIX + b"A: 0123456789\r\nB: 0123456789\r\n\r\n", None)
    assert expected == (output, reader.error)


def test_header_over_max_header_size_is_refused():
    """A header section over max_header_size is HEADER_TOO_LARGE and is never released."""
    reader = _reader(max_header_size=29)
    output = _feed(reader, [b"A: 0123456789\r\n", b"B: 0123456789\r\n", b"\r\n", b"body\r\n", END])
    expected = (b"", DataError.HEADER_TOO_LARGE, True)
    assert expected == (output, reader.error, reader.finished)


def test_header_with_too_many_lines_is_refused():
    """More header lines than max_header_fields is HEADER_TOO_LARGE."""
    reader = _reader(max_header_fields=3)
    output = _feed(reader, [b"A: 1\r\n", b" 2\r\n", b"B: 3\r\n", b"C: 4\r\n", b"\r\n", END])
    expected = (b"", DataError.HEADER_TOO_LARGE)
    assert expected == (output, reader.error)


def test_first_error_is_kept():
    """A later problem does not replace the first one."""
    reader = _reader(max_size=100)
    _feed(reader, [b"\r\n", b"bare\n", b"x" * 2000 + b"\r\n", b"y" * 90 + b"\r\n", END])
    expected = (DataError.SMUGGLING, True)
    assert expected == (reader.error, reader.finished)


def test_nothing_after_end_of_data():
    """Lines fed after the end of data are ignored."""
    reader = _reader()
    _feed(reader, [b"\r\n", END])
    expected = (b"", None)
    assert expected == (reader.feed(b"late\r\n"), reader.error)


# --- properties ----------------------------------------------------------------------------------

clean_lines = st.lists(
    st.binary(max_size=300).map(lambda b: b.translate(None, b"\r\n\0")),
    max_size=40,
)


@given(clean_lines)
def test_clean_message_round_trips(lines):
    """Any CR/LF/NUL-free lines, stuffed and sent, give the digest and body of the original."""
    reader = _reader()
    output = _send(reader, lines)
    original = b"".join(line + b"\r\n" for line in lines)
    if b"" in lines:
        blank = lines.index(b"")
        section = b"".join(line + b"\r\n" for line in lines[:blank])
        body = b"\r\n" + b"".join(line + b"\r\n" for line in lines[blank + 1 :])
    else:
        section, body = original, b""
    expected = (
        True,
        None,
        _sha(original),
        len(original),
        PREFIX + headers.remove_fields(section)[0] + body,
    )
    assert expected == (reader.finished, reader.error, reader.digest, reader.size, output)


@given(
    clean_lines,
    st.binary(max_size=50).map(lambda b: b.translate(None, b"\r\n\0")),
    st.binary(max_size=50).map(lambda b: b.translate(None, b"\r\n")),
    st.sampled_from([b"\n", b"\r", b"\0"]),
)
def test_bare_cr_lf_or_nul_is_smuggling(lines, head, tail, bad):
    """Any line holding a bare LF, bare CR or NUL makes the message SMUGGLING."""
    reader = _reader()
    _feed(reader, [_stuff(line) + b"\r\n" for line in lines])
    reader.feed(head + bad + tail + b"\r\n")
    reader.feed(END)
    expected = (DataError.SMUGGLING, True)
    assert expected == (reader.error, reader.finished)


@given(clean_lines, st.binary(max_size=50).map(lambda b: b.translate(None, b"\r\n\0")))
def test_line_ending_in_bare_lf_is_smuggling(lines, text):
    """A line that ends in LF without CR is SMUGGLING."""
    reader = _reader()
    _feed(reader, [_stuff(line) + b"\r\n" for line in lines])
    reader.feed(text + b"\n")
    reader.feed(END)
    still_open = not reader.finished
    _feed(reader, [b"\r\n", END])
    expected = (DataError.SMUGGLING, True, True)
    assert expected == (reader.error, reader.finished, still_open)


@given(
    st.lists(st.binary(max_size=1100).map(lambda b: b + b"\n"), max_size=30),
    st.integers(min_value=0, max_value=5000),
)
def test_reader_never_raises(lines, max_size):
    """Arbitrary lines never make the reader raise, and CRLF . CRLF always ends it."""
    reader = DataReader(max_size=max_size, max_header_size=2000, max_header_fields=10)
    _feed(reader, [*lines, b"\r\n", END])
    expected = (True, True)
    assert expected == (
        reader.finished,
        reader.error is None or isinstance(reader.error, DataError),
    )


def test_dot_line_after_a_bare_lf_does_not_end_the_data():
    """Only CRLF . CRLF ends DATA: after a bare LF a dot line is just more (refused) data."""
    reader = DataReader(max_size=10_000)
    for line in (b"Subject: x\r\n", b"\r\n", b"hello\n", b".\r\n", b"MAIL FROM:<a@b.c>\r\n"):
        reader.feed(line)
    assert (reader.finished, reader.error) == (False, DataError.SMUGGLING)
    reader.feed(b".\r\n")
    assert reader.finished


# --- blocks: feed_block against feed, line by line ---------------------------------------------


def _by_lines(stream: bytes, **kwargs) -> tuple:
    """The oracle: split the stream at line feeds and feed each line until the end of data."""
    reader = _reader(**kwargs)
    output = []
    position = 0
    while position < len(stream) and not reader.finished:
        end = stream.find(b"\n", position) + 1 or len(stream)
        output.append(reader.feed(stream[position:end]))
        position = end
    return _outcome(reader, b"".join(output))


def _by_blocks(stream: bytes, cuts: list[int], **kwargs) -> tuple:
    reader = _reader(**kwargs)
    edges = [0, *sorted({cut % (len(stream) + 1) for cut in cuts}), len(stream)]
    output = b"".join(reader.feed_block(stream[a:b]) for a, b in itertools.pairwise(edges))
    return _outcome(reader, output)


def _outcome(reader: DataReader, output: bytes) -> tuple:
    """What a session acts on: the end, the error, and (when accepted) what it spools."""
    if reader.error is not None:
        return (reader.finished, reader.error)
    return (reader.finished, None, reader.size, reader.digest, reader.marking, output)


_clean_line = st.binary(max_size=80).map(lambda b: b.translate(None, b"\r\n\0") + b"\r\n")
_dotted = [b".\r\n", b"..\r\n", b".x\r\n", b"..y\r\n"]
wire_lines = st.lists(
    st.one_of(
        st.sampled_from([b"\r\n", b"Subject: OFFICIAL\r\n", *_dotted]),
        _clean_line,
        _clean_line,
        st.sampled_from([b"\n", b"\r", b"\0", b"a\rb\r\n", b"a\n.\r\n", b"\r\r\n"]),
        st.builds(lambda n: b"y" * n + b"\r\n", st.integers(996, 1000)),
        st.builds(lambda n: b"." + b"z" * n + b"\r\n", st.integers(996, 1000)),
    ),
    max_size=30,
)
body_lines = st.lists(
    st.one_of(st.sampled_from(_dotted), _clean_line, _clean_line),
    max_size=40,
)


@given(wire_lines, st.lists(st.integers(min_value=0, max_value=50_000), max_size=12))
def test_blocks_split_anywhere_read_as_lines_do(lines, cuts):
    """Any stream, cut into blocks anywhere, ends, fails and spools exactly as line by line."""
    stream = b"".join(lines) + b"\r\n.\r\nQUIT\r\n"
    assert _by_blocks(stream, cuts, max_size=20_000) == _by_lines(stream, max_size=20_000)


@given(
    st.lists(_clean_line, max_size=5),
    body_lines,
    st.lists(st.integers(min_value=0, max_value=50_000), max_size=12),
    st.integers(min_value=0, max_value=3000),
)
def test_bodies_in_blocks_read_as_lines_do(header, body, cuts, max_size):
    """Header, blank line, a body rich in dots, under any size limit, in any blocks."""
    stream = b"".join(header) + b"\r\n" + b"".join(body) + b"\r\n.\r\n"
    by_blocks = _by_blocks(stream, cuts, max_size=max_size)
    assert by_blocks == _by_lines(stream, max_size=max_size)
    assert by_blocks[0]


@given(clean_lines, st.lists(st.integers(min_value=0, max_value=50_000), max_size=12))
def test_clean_message_in_blocks_round_trips(lines, cuts):
    """A clean message sent in arbitrary blocks gives what line-by-line reading gives."""
    stream = b"".join(_stuff(line) + b"\r\n" for line in lines) + END
    by_blocks = _by_blocks(stream, cuts)
    assert by_blocks == _by_lines(stream)
    assert by_blocks[:2] == (True, None)


def test_a_long_line_split_across_blocks_is_refused_and_its_end_still_counts():
    """A line over the limit that arrives in pieces is refused; the CRLF . CRLF after it ends."""
    reader = _reader()
    reader.feed_block(b"Subject: a\r\n\r\n" + b"x" * (MAX_LINE + 1))
    assert reader.error is None  # with its CRLF it may still fit, as a dot-stuffed line
    reader.feed_block(b"x")
    assert reader.error is DataError.LINE_TOO_LONG  # refused before its end: never held
    reader.feed_block(b"x" * 100_000)
    assert not reader.finished
    reader.feed_block(b"x" * 10 + b"\r")
    reader.feed_block(b"\n.\r\n")
    assert reader.finished


def test_a_block_ends_at_the_end_of_data():
    """Whatever follows CRLF . CRLF in a block is not message content."""
    reader = _reader()
    output = reader.feed_block(b"A: 1\r\n\r\nbody\r\n.\r\nMAIL FROM:<x@y.z>\r\n")
    assert reader.finished
    assert output.endswith(b"\r\nbody\r\n")
