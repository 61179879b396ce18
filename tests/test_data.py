"""Tests for txstarttls.data: dot-stuffing, line ends and the end of DATA."""

from __future__ import annotations

import itertools
import re
from typing import Literal

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from txstarttls.data import MAX_LINE_OCTETS, DataDecoder, DataEncoder, encode_body
from txstarttls.errors import LineTooLong
from txstarttls.message import unstuff

Mode = Literal["reject", "normalize"]

# --- helpers: independent reference models --------------------------------------------

_ANY_LINE_END = re.compile(rb"\r\n|\r|\n")
_BARE = re.compile(rb"\r(?!\n)|(?<!\r)\n")


def normalised(body: bytes) -> bytes:
    """The body with every line end as CRLF and a final CRLF if missing."""
    body = _ANY_LINE_END.sub(b"\r\n", body)
    if body and not body.endswith(b"\r\n"):
        body += b"\r\n"
    return body


def chunked(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    bounds = [0, *points, len(data)]
    return [data[a:b] for a, b in itertools.pairwise(bounds)]


def encode_chunks(chunks: list[bytes], *, max_line_octets: int = 998) -> bytes:
    encoder = DataEncoder(max_line_octets=max_line_octets)
    return b"".join(encoder.encode(c) for c in chunks) + encoder.finish()


def decode_chunks(
    chunks: list[bytes], mode: Mode = "reject", **kwargs: int
) -> tuple[DataDecoder, bytes]:
    decoder = DataDecoder(bare_line_endings=mode, **kwargs)
    content = []
    for chunk in chunks:
        content.append(decoder.feed(chunk))
        if decoder.done:
            break
    return decoder, b"".join(content)


def decode_bytewise(data: bytes, mode: Mode = "reject") -> tuple[DataDecoder, bytes]:
    return decode_chunks([data[i : i + 1] for i in range(len(data))], mode)


def assert_no_bare_line_ending(wire: bytes) -> None:
    crlf = wire.count(b"\r\n")
    assert wire.count(b"\r") == crlf
    assert wire.count(b"\n") == crlf


def assert_single_terminator_at_end(wire: bytes) -> None:
    # The CRLF of the DATA command precedes the first byte.
    stream = b"\r\n" + wire
    assert stream.find(b"\r\n.\r\n") == len(stream) - 5


# --- encoder: SECURITY-CASES 15 (dot-stuffing) ----------------------------------------


@pytest.mark.parametrize(
    ("body", "wire"),
    [
        (b".\r\n", b"..\r\n.\r\n"),
        (b".", b"..\r\n.\r\n"),
        (b".hidden\r\nx\r\n", b"..hidden\r\nx\r\n.\r\n"),
        (
            b"a\r\n.\r\nMAIL FROM:<e@x.example>\r\n",
            b"a\r\n..\r\nMAIL FROM:<e@x.example>\r\n.\r\n",
        ),
        (b"a\r\n..\r\n", b"a\r\n...\r\n.\r\n"),
        (b"a.\r\nb. .c\r\n", b"a.\r\nb. .c\r\n.\r\n"),
        (b"\r\n.\r\n", b"\r\n..\r\n.\r\n"),
    ],
)
def test_smuggling_dot_lines_are_stuffed(body: bytes, wire: bytes) -> None:
    assert encode_body(body) == wire
    assert_single_terminator_at_end(wire)


def test_smuggling_dot_line_at_chunk_boundary_is_stuffed() -> None:
    encoder = DataEncoder()
    assert encoder.encode(b"a\r\n") == b"a\r\n"
    assert encoder.encode(b".\r\nMAIL FROM:<e@x.example>\r\n") == (
        b"..\r\nMAIL FROM:<e@x.example>\r\n"
    )
    assert encoder.finish() == b".\r\n"


def test_smuggling_dot_after_crlf_split_across_chunks_is_stuffed() -> None:
    encoder = DataEncoder()
    wire = encoder.encode(b"a\r") + encoder.encode(b"\n.\r") + encoder.encode(b"\n")
    assert wire + encoder.finish() == b"a\r\n..\r\n.\r\n"


def test_smuggling_dot_after_bare_cr_at_chunk_end_is_stuffed() -> None:
    encoder = DataEncoder()
    wire = encoder.encode(b"a\r") + encoder.encode(b".\r") + encoder.finish()
    assert wire == b"a\r\n..\r\n.\r\n"


def test_smuggling_dot_in_one_byte_chunks_is_stuffed() -> None:
    body = b"a\r\n.\r\nMAIL FROM:<e@x.example>\r\n"
    wire = encode_chunks([body[i : i + 1] for i in range(len(body))])
    assert wire == b"a\r\n..\r\nMAIL FROM:<e@x.example>\r\n.\r\n"


@pytest.mark.parametrize(
    ("body", "wire"),
    [
        (b"a", b"a\r\n.\r\n"),
        (b"a\r\nb", b"a\r\nb\r\n.\r\n"),
        (b"a\r\n", b"a\r\n.\r\n"),
        (b"", b".\r\n"),
    ],
)
def test_body_gets_exactly_one_final_line_end_and_terminator(
    body: bytes, wire: bytes
) -> None:
    assert encode_body(body) == wire


def test_empty_chunks_change_nothing() -> None:
    encoder = DataEncoder()
    assert encoder.encode(b"") == b""
    assert encoder.encode(b".") == b".."
    assert encoder.encode(b"") == b""
    assert encoder.finish() == b"\r\n.\r\n"


# --- encoder: SECURITY-CASES 16 (no stray CR or LF) -----------------------------------


@pytest.mark.parametrize(
    ("body", "wire"),
    [
        (b"a\n.\nb", b"a\r\n..\r\nb\r\n.\r\n"),
        (b"a\r.\rb", b"a\r\n..\r\nb\r\n.\r\n"),
        (b"a\r\n.\rb", b"a\r\n..\r\nb\r\n.\r\n"),
        (b"a\n.\r\nb", b"a\r\n..\r\nb\r\n.\r\n"),
        (b"a\r\n.\nb", b"a\r\n..\r\nb\r\n.\r\n"),
        (b"a\rb", b"a\r\nb\r\n.\r\n"),
        (b"a\nb", b"a\r\nb\r\n.\r\n"),
        (b"\r", b"\r\n.\r\n"),
        (b"\n", b"\r\n.\r\n"),
        (b"\r\r\n", b"\r\n\r\n.\r\n"),
        (b"\n\r", b"\r\n\r\n.\r\n"),
        (b"a\r", b"a\r\n.\r\n"),
        (b"\n.\n", b"\r\n..\r\n.\r\n"),
        (b"\r.\r", b"\r\n..\r\n.\r\n"),
        (b"\r\n.\r", b"\r\n..\r\n.\r\n"),
    ],
)
def test_smuggling_bare_line_endings_are_normalised_then_stuffed(
    body: bytes, wire: bytes
) -> None:
    assert encode_body(body) == wire
    assert_no_bare_line_ending(wire)
    assert_single_terminator_at_end(wire)


def test_trailing_cr_is_held_back_until_the_next_chunk() -> None:
    encoder = DataEncoder()
    assert encoder.encode(b"a\r") == b"a"
    assert encoder.encode(b"\n") == b"\r\n"
    assert encoder.encode(b"b\r") == b"b"
    assert encoder.encode(b"c") == b"\r\nc"
    assert encoder.encode(b"\r") == b""
    assert encoder.finish() == b"\r\n.\r\n"


def test_crlf_split_across_chunks_stays_one_line_end() -> None:
    assert encode_chunks([b"a\r", b"\nb"]) == b"a\r\nb\r\n.\r\n"
    assert encode_chunks([b"a\r", b"", b"\nb"]) == b"a\r\nb\r\n.\r\n"


# --- encoder: line length (RFC 5321 section 4.5.3.1.6) --------------------------------


def test_line_of_998_octets_is_accepted() -> None:
    assert MAX_LINE_OCTETS == 998
    line = b"x" * 998
    assert encode_body(line) == line + b"\r\n.\r\n"
    assert encode_body(line + b"\r\n" + line + b"\n") == (
        line + b"\r\n" + line + b"\r\n.\r\n"
    )


def test_line_length_is_measured_before_dot_stuffing() -> None:
    line = b"." + b"x" * 997
    assert encode_body(line) == b"." + line + b"\r\n.\r\n"


def test_line_of_999_octets_is_refused_with_line_number_and_length() -> None:
    with pytest.raises(LineTooLong, match=r"Line 3 of the message is 999 octets"):
        encode_body(b"a\r\nb\n" + b"x" * 999 + b"\r\nc\r\n")


def test_long_line_is_refused_from_encode_before_its_end_arrives() -> None:
    encoder = DataEncoder()
    encoder.encode(b"a\r\n")
    encoder.encode(b"x" * 500)
    with pytest.raises(LineTooLong, match=r"Line 2 .* at least 1000 octets"):
        encoder.encode(b"x" * 500)


def test_long_line_in_one_chunk_without_line_end_is_refused_at_once() -> None:
    with pytest.raises(LineTooLong, match=r"Line 1 .* at least 17000"):
        DataEncoder().encode(b"x" * 17000)


def test_long_line_ended_by_held_cr_reports_exact_length() -> None:
    with pytest.raises(LineTooLong, match="is 999 octets"):
        DataEncoder().encode(b"x" * 999 + b"\r")


def test_line_numbers_count_across_chunks_and_held_cr() -> None:
    encoder = DataEncoder(max_line_octets=3)
    encoder.encode(b"a\r")
    encoder.encode(b"\nb\r")
    encoder.encode(b"c\n")
    with pytest.raises(LineTooLong, match=r"Line 4 .* 4 octets"):
        encoder.encode(b"abcd\n")


def test_encoder_is_unusable_after_line_too_long() -> None:
    encoder = DataEncoder(max_line_octets=3)
    with pytest.raises(LineTooLong):
        encoder.encode(b"abcd")
    with pytest.raises(RuntimeError):
        encoder.encode(b"a")
    with pytest.raises(RuntimeError):
        encoder.finish()


def test_encode_after_finish_raises() -> None:
    encoder = DataEncoder()
    encoder.finish()
    with pytest.raises(RuntimeError):
        encoder.encode(b"more")
    with pytest.raises(RuntimeError):
        encoder.finish()


def test_saw_8bit_and_octets_in() -> None:
    encoder = DataEncoder()
    assert not encoder.saw_8bit
    encoder.encode(b"abc\r")
    assert not encoder.saw_8bit
    assert encoder.octets_in == 4
    encoder.encode("\nü".encode())
    assert encoder.saw_8bit
    assert encoder.octets_in == 7
    encoder.encode(b"plain")
    assert encoder.saw_8bit


# --- encoder properties ---------------------------------------------------------------

_PIECES = st.sampled_from(
    [
        *(b"\r", b"\n", b".", b"..", b"\r\n", b"\r\n.\r\n", b"\n.\n", b"\r.\r"),
        *(b"a", b"MAIL FROM:<e@x.example>", b"\x80\xff", b" ", b"\x00"),
    ]
)
_BODIES = st.one_of(
    st.binary(max_size=200),
    st.lists(_PIECES, max_size=40).map(b"".join),
)
_CUTS = st.lists(st.integers(0, 10_000), max_size=30)
_CRLF_BODIES = st.lists(
    st.sampled_from([b"", b".", b"..", b"a", b"x" * 997, b"x" * 998, b"x" * 999]),
    max_size=8,
).map(b"\r\n".join)


@given(_CRLF_BODIES)
@settings(max_examples=300)
def test_whole_body_shortcut_matches_the_streaming_encoder(body: bytes) -> None:
    """encode_body takes a shortcut for CRLF-only bodies: same bytes, same
    refusal of a line over 998 octets, as the encoder fed the same body."""
    encoder = DataEncoder()
    try:
        expected: bytes | type[LineTooLong] = encoder.encode(body) + encoder.finish()
    except LineTooLong:
        expected = LineTooLong
    try:
        got: bytes | type[LineTooLong] = encode_body(body)
    except LineTooLong:
        got = LineTooLong
    assert got == expected


@given(_BODIES, _CUTS)
@settings(max_examples=500)
def test_encoder_any_body_any_chunking(body: bytes, cuts: list[int]) -> None:
    wire = encode_chunks(chunked(body, cuts))
    # (a) chunking never changes the result
    assert wire == encode_body(body)
    # (b) no bare CR or LF reaches the wire
    assert_no_bare_line_ending(wire)
    # (c) exactly one end of data, at the very end
    assert_single_terminator_at_end(wire)
    # (d) the server-side decoder gets the normalised body back, in one message
    decoder, content = decode_chunks(chunked(wire, cuts), "normalize")
    assert decoder.done
    assert content == normalised(body)
    assert decoder.remainder == b""
    assert not decoder.bare_line_ending_seen
    assert not decoder.line_too_long


@given(_BODIES, _CUTS, st.integers(1, 12))
@settings(max_examples=300)
def test_encoder_line_limit_is_independent_of_chunking(
    body: bytes, cuts: list[int], limit: int
) -> None:
    lines = normalised(body).split(b"\r\n")
    too_long = max(map(len, lines)) > limit
    try:
        wire = encode_chunks(chunked(body, cuts), max_line_octets=limit)
    except LineTooLong:
        assert too_long
    else:
        assert not too_long
        decoder, _ = decode_chunks([wire], max_line_octets=limit)
        assert not decoder.line_too_long


# --- decoder: SECURITY-CASES 20 (SMTP smuggling) --------------------------------------

SMUGGLE_HEAD = b"Subject: t\r\n\r\nbody"
SMUGGLE_TAIL = (
    b"MAIL FROM:<spoof@bank.example>\r\n"
    b"RCPT TO:<victim@local.example>\r\n"
    b"DATA\r\n"
    b"Subject: smuggled\r\n"
    b"\r\n"
    b"x\r\n"
    b".\r\n"
)
FAKE_ENDS = [b"\n.\n", b"\r.\r", b"\n.\r\n", b"\r\n.\n"]


@pytest.mark.parametrize("fake_end", FAKE_ENDS)
@pytest.mark.parametrize("mode", ["reject", "normalize"])
def test_smuggling_fake_end_of_data_does_not_end_data(
    fake_end: bytes, mode: Mode
) -> None:
    data = SMUGGLE_HEAD + fake_end + SMUGGLE_TAIL + b"QUIT\r\n"
    decoder = DataDecoder(bare_line_endings=mode)
    content = []
    for i in range(len(data)):
        content.append(decoder.feed(data[i : i + 1]))
        if decoder.done:
            break
    # Done exactly at the real terminator, not one byte earlier.
    assert i == len(SMUGGLE_HEAD + fake_end + SMUGGLE_TAIL) - 1
    assert decoder.bare_line_ending_seen
    body = b"".join(content)
    assert b"MAIL FROM:<spoof@bank.example>\r\n" in body
    assert b"Subject: smuggled\r\n" in body
    assert body.endswith(b"x\r\n")
    if mode == "normalize":
        assert_no_bare_line_ending(body)


@pytest.mark.parametrize("fake_end", FAKE_ENDS)
def test_smuggling_gives_one_message_and_pipelined_remainder(fake_end: bytes) -> None:
    data = SMUGGLE_HEAD + fake_end + SMUGGLE_TAIL + b"QUIT\r\n"
    decoder = DataDecoder()
    content = decoder.feed(data)
    assert decoder.done
    assert decoder.bare_line_ending_seen
    assert decoder.remainder == b"QUIT\r\n"
    assert content.startswith(SMUGGLE_HEAD)
    assert content.endswith(b"Subject: smuggled\r\n\r\nx\r\n")
    with pytest.raises(RuntimeError):
        decoder.feed(b"more")


@pytest.mark.parametrize(
    "data",
    [
        b"a\n.\nb",
        b"a\r.\rb",
        b"a\n.\r\nb",
        b"a\r\n.\nb",
        b"a\r\n.\rb",
        b"a\r\n. \r\nb",
        b"a\r\n.x\r\nb",
        b"a.\r\nb",
        b"a\r\n\n.\r\n",
        b"a\r\n\r.\r\n",
    ],
)
def test_smuggling_near_miss_terminators_do_not_end_data(data: bytes) -> None:
    for decoder, _ in (decode_chunks([data]), decode_bytewise(data)):
        assert not decoder.done


def test_smuggling_bare_lf_dot_does_not_end_data() -> None:
    decoder = DataDecoder()
    decoder.feed(b"hello\n.\n")
    assert not decoder.done
    assert decoder.bare_line_ending_seen


def test_reject_mode_returns_content_as_sent() -> None:
    decoder, content = decode_bytewise(b"a\nb\rc\r\n.\r\n")
    assert content == b"a\nb\rc\r\n"
    assert decoder.bare_line_ending_seen


def test_normalize_mode_returns_crlf_content() -> None:
    decoder, content = decode_bytewise(b"a\nb\rc\r\r\n.\r\n", "normalize")
    assert content == b"a\r\nb\r\nc\r\n\r\n"
    assert decoder.bare_line_ending_seen


def test_clean_data_sets_no_flags() -> None:
    decoder, content = decode_bytewise(b"a\r\nb\r\n.\r\n")
    assert content == b"a\r\nb\r\n"
    assert decoder.done
    assert not decoder.bare_line_ending_seen
    assert not decoder.line_too_long
    assert not decoder.size_exceeded


# --- decoder: end of data and un-stuffing ---------------------------------------------


@pytest.mark.parametrize(
    ("data", "content", "remainder"),
    [
        (b".\r\n", b"", b""),
        (b".\r\nQUIT\r\n", b"", b"QUIT\r\n"),
        (b"\r\n.\r\n", b"\r\n", b""),
        (b"x\r\n.\r\nQUIT\r\n", b"x\r\n", b"QUIT\r\n"),
        (b"..\r\n.\r\n", b".\r\n", b""),
        (b"..x\r\n...\r\n.\r\n", b".x\r\n..\r\n", b""),
        (b"a\r\n.b\r\n.\r\n", b"a\r\nb\r\n", b""),
        (b"a.\r\n.\r\n", b"a.\r\n", b""),
        (b"x\r\n.\r\n.\r\n", b"x\r\n", b".\r\n"),
        (
            b"x\r\n.\r\nMAIL FROM:<a@b.example>\r\nRCPT",
            b"x\r\n",
            b"MAIL FROM:<a@b.example>\r\nRCPT",
        ),
    ],
)
def test_decoder_end_and_unstuffing(
    data: bytes, content: bytes, remainder: bytes
) -> None:
    for decoder, got in (decode_chunks([data]), decode_bytewise(data)):
        assert decoder.done
        assert got == content
        if decoder.remainder or remainder:
            # bytewise feeding stops at the terminator
            assert remainder.startswith(decoder.remainder)
    decoder, _ = decode_chunks([data])
    assert decoder.remainder == remainder


def test_terminator_split_one_byte_per_chunk_after_held_dot() -> None:
    decoder = DataDecoder()
    assert decoder.feed(b"a\r") == b"a"
    assert decoder.feed(b"\n") == b"\r\n"
    assert decoder.feed(b".") == b""
    assert decoder.feed(b"\r") == b""
    assert not decoder.done
    assert decoder.feed(b"\n") == b""
    assert decoder.done


def test_held_dot_is_unstuffed_when_the_line_goes_on() -> None:
    decoder = DataDecoder()
    assert decoder.feed(b"a\r\n.") == b"a\r\n"
    assert decoder.feed(b".b") == b".b"
    assert decoder.feed(b"\r\n.\r\n") == b"\r\n"
    assert decoder.done


def test_normalize_mode_unstuffs_after_a_bare_line_end() -> None:
    _, content = decode_chunks([b"a\n", b".", b".", b"\r\n.\r\n"], "normalize")
    assert content == b"a\r\n.\r\n"


# --- decoder: SECURITY-CASES 21 (overlong lines) --------------------------------------


def test_overlong_line_does_not_end_data_and_commands_stay_content() -> None:
    commands = b"QUIT\r\nRSET\r\nMAIL FROM:<a@b.example>\r\n"
    data = b"A" * 17_000 + b"\r\n" + commands + b".\r\nNOOP\r\n"
    for decoder, content in (decode_chunks([data]), decode_bytewise(data)):
        assert decoder.done
        assert decoder.line_too_long
        assert content == b"A" * 17_000 + b"\r\n" + commands
    decoder, _ = decode_chunks([data])
    assert decoder.remainder == b"NOOP\r\n"


def test_overlong_line_with_fake_terminator_inside_stays_in_data() -> None:
    data = b"A" * 17_000 + b"\n.\n" + b"A" * 17_000 + b"\r\nQUIT\r\n.\r\n"
    for decoder, content in (decode_chunks([data]), decode_bytewise(data)):
        assert decoder.done
        assert decoder.line_too_long
        assert content.endswith(b"QUIT\r\n")


def test_decoder_line_limit() -> None:
    decoder, _ = decode_bytewise(b"x" * 998 + b"\r\n..y\r\n.\r\n")
    assert not decoder.line_too_long
    decoder, _ = decode_bytewise(b"." + b"x" * 998 + b"\r\n.\r\n")
    assert not decoder.line_too_long  # the stuffed dot is not counted
    decoder, _ = decode_bytewise(b"x" * 999 + b"\r\n.\r\n")
    assert decoder.line_too_long
    decoder, _ = decode_chunks([b"a\r\n" + b"x" * 500, b"x" * 499 + b"\r\n.\r\n"])
    assert decoder.line_too_long


# --- decoder: size limit --------------------------------------------------------------


def test_size_limit_stops_content_but_still_finds_the_end() -> None:
    decoder = DataDecoder(max_size=10)
    assert decoder.feed(b"12345\r\n") == b"12345\r\n"
    assert not decoder.size_exceeded
    assert decoder.feed(b"67890\r\n") == b""
    assert decoder.size_exceeded
    assert decoder.feed(b"more\r\n.\r\nQUIT\r\n") == b""
    assert decoder.done
    assert decoder.size_exceeded
    assert decoder.remainder == b"QUIT\r\n"


def test_size_limit_exactly_reached_is_fine() -> None:
    decoder, content = decode_chunks([b"12345678\r\n.\r\n"], max_size=10)
    assert content == b"12345678\r\n"
    assert not decoder.size_exceeded


def test_decoder_refuses_unknown_policy() -> None:
    with pytest.raises(ValueError, match="bare_line_endings"):
        DataDecoder(bare_line_endings="ignore")  # type: ignore[arg-type]


# --- decoder properties: any chunking -------------------------------------------------

_STREAM_PIECES = st.sampled_from(
    [
        *(b"\r", b"\n", b".", b"..", b"\r\n", b"\r\n.\r\n", b".\r\n", b"\n.\n"),
        *(b"\r.\r", b"\n.\r\n", b"\r\n.\n", b"a", b"QUIT", b" "),
    ]
)
_STREAMS = st.lists(_STREAM_PIECES, max_size=40).map(b"".join)


def reference_decode(
    data: bytes, mode: Mode, limit: int
) -> tuple[bytes, bytes, bool, bool] | None:
    """A line-by-line model: (content, remainder, bare, too long), or None."""
    end = (b"\r\n" + data).find(b"\r\n.\r\n")
    if end < 0:
        return None
    raw, remainder = data[:end], data[end + 3 :]
    bare = _BARE.search(raw) is not None
    if mode == "normalize":
        raw = _ANY_LINE_END.sub(b"\r\n", raw)
    lines = [line[1:] if line.startswith(b".") else line for line in raw.split(b"\r\n")]
    too_long = max(map(len, lines)) > limit
    return b"\r\n".join(lines), remainder, bare, too_long


@given(
    _STREAMS,
    _CUTS,
    st.sampled_from(["reject", "normalize"]),
    st.integers(1, 12),
)
@settings(max_examples=500)
def test_decoder_any_chunking_matches_line_model(
    stream: bytes, cuts: list[int], mode: Mode, limit: int
) -> None:
    data = stream + b"\r\n.\r\nQUIT\r\n"
    expected = reference_decode(data, mode, limit)
    assert expected is not None
    content, remainder, bare, too_long = expected
    chunks = chunked(data, cuts)
    decoder = DataDecoder(bare_line_endings=mode, max_line_octets=limit)
    got = []
    fed = 0
    for chunk in chunks:
        got.append(decoder.feed(chunk))
        fed += 1
        if decoder.done:
            break
    assert decoder.done
    assert b"".join(got) == content
    assert decoder.remainder + b"".join(chunks[fed:]) == remainder
    assert decoder.bare_line_ending_seen == bare
    assert decoder.line_too_long == too_long


@given(_STREAMS, _CUTS)
@settings(max_examples=300)
def test_decoder_never_ends_without_a_real_terminator(
    stream: bytes, cuts: list[int]
) -> None:
    decoder, _ = decode_chunks(chunked(stream, cuts))
    assert decoder.done == (b"\r\n.\r\n" in b"\r\n" + stream)


@given(_STREAMS, _CUTS, st.integers(0, 50))
@settings(max_examples=200)
def test_decoder_size_limit_under_any_chunking(
    stream: bytes, cuts: list[int], max_size: int
) -> None:
    data = stream + b"\r\n.\r\n"
    expected = reference_decode(data, "reject", MAX_LINE_OCTETS)
    assert expected is not None
    decoder, content = decode_chunks(chunked(data, cuts), max_size=max_size)
    assert decoder.done
    assert decoder.size_exceeded == (len(expected[0]) > max_size)
    assert expected[0].startswith(content)
    assert len(content) <= max_size or not decoder.size_exceeded


# --- BDAT: the same lines, not dot-stuffed ---------------------------------------


@given(_BODIES, _CUTS)
def test_bdat_form_is_the_data_form_unstuffed_without_terminator(
    body: bytes, cuts: list[int]
) -> None:
    encoder = DataEncoder(stuff=False)
    canonical = b"".join(encoder.encode(part) for part in chunked(body, cuts))
    canonical += encoder.finish()
    assert unstuff(encode_body(body)) == canonical
    assert canonical == b"" or canonical.endswith(b"\r\n")
    assert b"\r" not in canonical.replace(b"\r\n", b"")
    assert b"\n" not in canonical.replace(b"\r\n", b"")
