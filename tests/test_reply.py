"""Tests for txstarttls.reply: reply grammar, limits, sanitising, EHLO."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from txstarttls.errors import ProtocolViolation
from txstarttls.reply import (
    MAX_LINE_LENGTH,
    MAX_LINES,
    MAX_REPLY_SIZE,
    Capabilities,
    Reply,
    ReplyParser,
    parse_ehlo,
    parse_replies,
    sanitise,
)


def one(data: bytes) -> Reply:
    replies = parse_replies(data)
    assert len(replies) == 1
    return replies[0]


# --- grammar (RFC 5321 section 4.2, SECURITY-CASES 11) --------------------------------


@pytest.mark.parametrize(
    ("data", "code", "lines"),
    [
        (b"250 ok\r\n", 250, ("ok",)),
        (b"250\r\n", 250, ("",)),
        (b"250 \r\n", 250, ("",)),
        (b"220 mx.example ESMTP\r\n", 220, ("mx.example ESMTP",)),
        (b"354 go ahead\r\n", 354, ("go ahead",)),
        (b"421 bye\r\n", 421, ("bye",)),
        (b"559 x\r\n", 559, ("x",)),
        (b"200 x\r\n", 200, ("x",)),
        (b"250-a\r\n250-\r\n250 c\r\n", 250, ("a", "", "c")),
        (b"250-a\r\n250\r\n", 250, ("a", "")),
        (b"250  two spaces \r\n", 250, (" two spaces ",)),
    ],
)
def test_valid_reply_lines(data: bytes, code: int, lines: tuple[str, ...]) -> None:
    reply = one(data)
    assert reply.code == code
    assert reply.lines == lines


@pytest.mark.parametrize(
    ("line", "reason"),
    [
        (b"2500 ok", "not followed by space"),
        (b" 250 ok", "three-digit code"),
        (b"+25 x", "three-digit code"),
        (b"2_0 x", "three-digit code"),
        (b"25", "three-digit code"),
        (b"250x", "not followed by space"),
        (b"250\tok", "not followed by space"),
        (b"600 x", "outside 200-559"),
        (b"100 x", "outside 200-559"),
        (b"160 x", "outside 200-559"),
        (b"260 x", "outside 200-559"),
        (b"299 x", "outside 200-559"),
        (b"", "empty line"),
        (b"ok", "three-digit code"),
        ("\uff12\uff15\uff10 ok".encode(), "three-digit code"),
    ],
)
def test_reply_code_grammar_violation(line: bytes, reason: str) -> None:
    with pytest.raises(ProtocolViolation) as info:
        ReplyParser().feed(line)
    message = str(info.value)
    assert reason in message
    assert "\n" not in message
    assert info.value.phase is None


def test_mixed_code_multiline_is_a_violation_not_last_line_wins() -> None:
    parser = ReplyParser()
    assert parser.feed(b"554-no") is None
    with pytest.raises(ProtocolViolation, match="changed code from 554 to 220"):
        parser.feed(b"220 ok")


def test_mixed_code_in_continuation_lines() -> None:
    with pytest.raises(ProtocolViolation):
        parse_replies(b"250-a\r\n251-b\r\n250 c\r\n")


def test_multiline_reply_is_returned_only_when_final_line_arrives() -> None:
    parser = ReplyParser()
    assert not parser.in_progress
    assert parser.feed(b"250-mx.example") is None
    assert parser.in_progress
    assert parser.feed(b"250-PIPELINING") is None
    reply = parser.feed(b"250 8BITMIME")
    assert reply == Reply(250, ("mx.example", "PIPELINING", "8BITMIME"))
    assert not parser.in_progress


def test_parser_is_reusable_after_a_complete_reply() -> None:
    parser = ReplyParser()
    assert parser.feed(b"554-a") is None
    assert parser.feed(b"554 b") == Reply(554, ("a", "b"))
    assert parser.feed(b"220 ok") == Reply(220, ("ok",))


def test_parser_refuses_input_after_a_violation_until_reset() -> None:
    parser = ReplyParser()
    parser.feed(b"250-a")
    with pytest.raises(ProtocolViolation):
        parser.feed(b"25")
    with pytest.raises(RuntimeError, match="reset"):
        parser.feed(b"250 ok")
    parser.reset()
    assert not parser.in_progress
    assert parser.feed(b"250 ok") == Reply(250, ("ok",))


def test_reset_discards_a_partial_reply() -> None:
    parser = ReplyParser()
    parser.feed(b"554-no")
    parser.reset()
    assert not parser.in_progress
    assert parser.feed(b"220 ok") == Reply(220, ("ok",))


def test_violation_message_shows_offending_line_sanitised_and_truncated() -> None:
    line = b"\x1b[31m" + b"A" * 500
    with pytest.raises(ProtocolViolation) as info:
        ReplyParser().feed(line)
    message = str(info.value)
    assert "\x1b" not in message
    assert '"\\x1b[31mAAA' in message
    assert "\\\\" not in message
    assert "..." in message
    assert len(message) < 200


def test_parse_replies_several_and_empty() -> None:
    data = b"220 hi\r\n250-a\r\n250 b\r\n354 go\r\n"
    assert parse_replies(data) == [
        Reply(220, ("hi",)),
        Reply(250, ("a", "b")),
        Reply(354, ("go",)),
    ]
    assert parse_replies(b"") == []


@pytest.mark.parametrize("data", [b"250 ok", b"250 ok\n", b"250-a\r\n", b"\r\n"])
def test_parse_replies_refuses_incomplete_data(data: bytes) -> None:
    with pytest.raises(ProtocolViolation):
        parse_replies(data)


# --- limits ---------------------------------------------------------------------------


def test_limits_have_documented_defaults() -> None:
    assert (MAX_LINE_LENGTH, MAX_LINES, MAX_REPLY_SIZE) == (2048, 100, 32768)


def test_huge_reply_line_is_refused() -> None:
    parser = ReplyParser()
    assert parser.feed(b"250 " + b"x" * (MAX_LINE_LENGTH - 4)) is not None
    with pytest.raises(ProtocolViolation, match="exceeds 2048"):
        parser.feed(b"250 " + b"x" * (MAX_LINE_LENGTH - 3))


def test_endless_multiline_reply_is_refused_by_line_count() -> None:
    parser = ReplyParser(max_lines=5)
    for _ in range(4):
        assert parser.feed(b"250-x") is None
    assert parser.feed(b"250 x") is not None
    for _ in range(5):
        parser.feed(b"250-x")
    with pytest.raises(ProtocolViolation, match="more than 5 lines"):
        parser.feed(b"250-x")


def test_default_line_count_limit() -> None:
    lines = b"250-x\r\n" * (MAX_LINES - 1) + b"250 x\r\n"
    assert len(one(lines).lines) == MAX_LINES
    with pytest.raises(ProtocolViolation):
        parse_replies(b"250-x\r\n" + lines)


def test_a_reply_parsed_before_is_held_to_each_parsers_own_limits() -> None:
    """Repeated one-line replies are parsed once and shared; the limits are
    the parser's own and are checked every time."""
    line = b"250 2.0.0 " + b"x" * 40
    assert ReplyParser().feed(line) == Reply(250, ("2.0.0 " + "x" * 40,), "2.0.0")
    with pytest.raises(ProtocolViolation, match="exceeds 20"):
        ReplyParser(max_line_length=20).feed(line)
    with pytest.raises(ProtocolViolation, match="exceeds 30 octets"):
        ReplyParser(max_reply_size=30).feed(line)


def test_a_reply_parsed_before_still_ends_a_multiline_reply_by_the_rules() -> None:
    assert ReplyParser().feed(b"250 ok") == Reply(250, ("ok",))
    parser = ReplyParser()
    assert parser.feed(b"354-go on") is None
    with pytest.raises(ProtocolViolation, match="changed code from 354 to 250"):
        parser.feed(b"250 ok")
    parser = ReplyParser()
    assert parser.feed(b"250-first") is None
    assert parser.feed(b"250 ok") == Reply(250, ("first", "ok"))


def test_reply_total_size_is_bounded() -> None:
    parser = ReplyParser(max_reply_size=20)
    assert parser.feed(b"250-12345678") is None  # 14 octets with CRLF
    with pytest.raises(ProtocolViolation, match="exceeds 20 octets"):
        parser.feed(b"250 12345")  # 11 more


def test_default_reply_size_limit() -> None:
    line = b"250-" + b"x" * 1000
    parser = ReplyParser()
    with pytest.raises(ProtocolViolation, match="32768"):
        for _ in range(MAX_LINES):
            parser.feed(line)


# --- enhanced status codes (RFC 3463, RFC 2034) ---------------------------------------


@pytest.mark.parametrize(
    ("data", "enhanced"),
    [
        (b"250 2.1.5 Ok\r\n", "2.1.5"),
        (b"250 2.0.0\r\n", "2.0.0"),
        (b"550 5.7.1 Relay denied\r\n", "5.7.1"),
        (b"451 4.123.999 later\r\n", "4.123.999"),
        (b"250-2.1.0 first\r\n250 2.9.9 second\r\n", "2.1.0"),
        (b"250-first\r\n250 2.1.0 second\r\n", None),
        (b"250 5.0.0 x\r\n", None),
        (b"550 2.0.0 x\r\n", None),
        (b"354 3.0.0 go\r\n", None),
        (b"250 2.1.5x\r\n", None),
        (b"250 2.1.5.6 x\r\n", None),
        (b"250 2.1234.5 x\r\n", None),
        (b"250 2.1.5678 x\r\n", None),
        (b"250 2..5 x\r\n", None),
        (b"250 x 2.1.5\r\n", None),
        (b"250 2.1.5\t\r\n", None),
        ("250 \uff12.1.5 x\r\n".encode(), None),
        (b"250\r\n", None),
    ],
)
def test_enhanced_status_code(data: bytes, enhanced: str | None) -> None:
    reply = one(data)
    assert reply.enhanced == enhanced


def test_enhanced_code_is_kept_in_the_text() -> None:
    reply = one(b"250 2.0.0 Ok: queued as X\r\n")
    assert reply.lines == ("2.0.0 Ok: queued as X",)


# --- Reply value ----------------------------------------------------------------------


def test_reply_str_is_one_postfix_style_line() -> None:
    reply = one(b"250-2.0.0 Ok:\r\n250 queued as X\r\n")
    assert str(reply) == "250 2.0.0 Ok: queued as X"
    assert str(one(b"250\r\n")) == "250"
    assert reply.text == "2.0.0 Ok:\nqueued as X"


@pytest.mark.parametrize(
    ("code", "flags"),
    [
        (250, (True, False, False, False)),
        (354, (False, True, False, False)),
        (421, (False, False, True, False)),
        (554, (False, False, False, True)),
    ],
)
def test_reply_classes(code: int, flags: tuple[bool, bool, bool, bool]) -> None:
    reply = Reply(code, ("x",))
    assert (
        reply.is_success,
        reply.is_intermediate,
        reply.is_transient,
        reply.is_permanent,
    ) == flags


def test_reply_is_frozen_and_slotted() -> None:
    reply = Reply(250, ("ok",))
    with pytest.raises(AttributeError):
        reply.code = 550  # type: ignore[misc]
    assert not hasattr(reply, "__dict__")
    assert hash(reply) == hash(Reply(250, ("ok",)))


# --- sanitising -----------------------------------------------------------------------


def test_terminal_escape_in_reply_text_is_made_visible() -> None:
    reply = one(b"550 \x1b[31mred\x1b[0m\r\n")
    assert reply.lines == ("\\x1b[31mred\\x1b[0m",)


def test_nul_cr_tab_del_in_reply_text_are_escaped() -> None:
    reply = one(b"550 a\x00b\rc\td\x7fe\nf\r\n")
    assert reply.lines == ("a\\x00b\\x0dc\\x09d\\x7fe\\x0af",)


def test_log_forging_unicode_controls_are_escaped() -> None:
    # U+202E (right-to-left override) and U+2028 (line separator).
    reply = one("550 a\u202eb\u2028c\r\n".encode())
    assert reply.lines == ("a\\u202eb\\u2028c",)


def test_utf8_text_is_kept_and_invalid_utf8_replaced() -> None:
    assert one("250 café\r\n".encode()).lines == ("café",)
    assert one(b"250 caf\xe9\r\n").lines == ("caf\ufffd",)
    assert one("250 café\x1b\r\n".encode()).lines == ("café\\x1b",)


def test_sanitise_leaves_printable_text_alone() -> None:
    assert sanitise(b"plain text 123 <>") == "plain text 123 <>"
    assert sanitise(b"") == ""


@given(st.binary(max_size=200))
@settings(max_examples=200)
def test_sanitised_text_never_contains_control_characters(raw: bytes) -> None:
    assert sanitise(raw).isprintable()


# --- property: serialise -> parse round trip ------------------------------------------

_TEXT = st.text(
    alphabet=st.characters(
        min_codepoint=0x20, max_codepoint=0x7E, exclude_characters="0123456789"
    ),
    max_size=30,
)
_CODE = st.builds(
    lambda a, b, c: a * 100 + b * 10 + c,
    st.integers(2, 5),
    st.integers(0, 5),
    st.integers(0, 9),
)
_ENHANCED = st.builds(lambda s, d: f"{s}.{d}", st.integers(0, 999), st.integers(0, 999))


@st.composite
def replies(draw: st.DrawFn) -> Reply:
    code = draw(_CODE)
    lines = draw(st.lists(_TEXT, min_size=1, max_size=5))
    enhanced = None
    if code // 100 != 3 and draw(st.booleans()):
        enhanced = f"{code // 100}.{draw(_ENHANCED)}"
        lines[0] = f"{enhanced} {lines[0]}" if lines[0] else enhanced
    return Reply(code, tuple(lines), enhanced)


def serialise(reply: Reply, bare_final: bool) -> bytes:
    out = []
    for i, text in enumerate(reply.lines):
        last = i == len(reply.lines) - 1
        if last and bare_final and not text:
            out.append(b"%d\r\n" % reply.code)
        else:
            sep = b" " if last else b"-"
            out.append(b"%d%s%s\r\n" % (reply.code, sep, text.encode()))
    return b"".join(out)


def split_lines(chunks: list[bytes]) -> list[bytes]:
    """Split a chunked stream at CRLF the way a LineReceiver does."""
    buffer = b""
    lines: list[bytes] = []
    for chunk in chunks:
        *complete, buffer = (buffer + chunk).split(b"\r\n")
        lines.extend(complete)
    assert buffer == b""
    return lines


def chunked(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    bounds = [0, *points, len(data)]
    return [data[a:b] for a, b in itertools.pairwise(bounds)]


@given(
    st.lists(replies(), min_size=1, max_size=6),
    st.lists(st.integers(0, 10_000), max_size=20),
    st.booleans(),
)
@settings(max_examples=300)
def test_reply_stream_round_trips_under_any_chunking(
    generated: list[Reply], cuts: list[int], bare_final: bool
) -> None:
    data = b"".join(serialise(r, bare_final) for r in generated)
    assert parse_replies(data) == generated
    parser = ReplyParser()
    parsed = [parser.feed(line) for line in split_lines(chunked(data, cuts))]
    assert [r for r in parsed if r is not None] == generated
    assert not parser.in_progress


# --- EHLO capabilities ----------------------------------------------------------------

EHLO = (
    b"250-mx.example.net Hello client [192.0.2.1]\r\n"
    b"250-PIPELINING\r\n"
    b"250-SIZE 10240000\r\n"
    b"250-starttls\r\n"
    b"250-AUTH PLAIN LOGIN\r\n"
    b"250-AUTH=LOGIN XOAUTH2\r\n"
    b"250-ENHANCEDSTATUSCODES\r\n"
    b"250-8BITMIME\r\n"
    b"250-DSN\r\n"
    b"250-SMTPUTF8\r\n"
    b"250 CHUNKING\r\n"
)


def test_parse_ehlo_reads_every_extension() -> None:
    caps = parse_ehlo(one(EHLO))
    assert caps.domain == "mx.example.net"
    assert caps.size == 10240000
    assert caps.auth_mechanisms == {"PLAIN", "LOGIN", "XOAUTH2"}
    assert caps.starttls
    assert caps.pipelining
    assert caps.smtputf8
    assert caps.eightbitmime
    assert caps.chunking
    assert caps.dsn
    assert caps.enhanced_status_codes
    assert caps.extensions["SIZE"] == ("10240000",)


def test_parse_ehlo_lower_case_keywords_are_uppercased() -> None:
    caps = parse_ehlo(one(b"250-mx\r\n250-starttls\r\n250 auth plain login\r\n"))
    assert set(caps.extensions) == {"STARTTLS", "AUTH"}
    assert caps.has("StartTLS")
    assert caps.extensions["AUTH"] == ("plain", "login")
    assert caps.auth_mechanisms == {"PLAIN", "LOGIN"}


def test_parse_ehlo_legacy_auth_equals_form_alone() -> None:
    caps = parse_ehlo(one(b"250-mx\r\n250 AUTH=LOGIN PLAIN\r\n"))
    assert caps.auth_mechanisms == {"LOGIN", "PLAIN"}
    assert caps.has("AUTH")


def test_parse_ehlo_no_auth() -> None:
    caps = parse_ehlo(one(b"250-mx\r\n250 STARTTLS\r\n"))
    assert caps.auth_mechanisms == frozenset()
    assert not caps.has("AUTH")


@pytest.mark.parametrize(
    ("line", "size"),
    [
        (b"250 SIZE 0\r\n", None),
        (b"250 SIZE abc\r\n", None),
        (b"250 SIZE\r\n", None),
        (b"250 SIZE -5\r\n", None),
        ("250 SIZE ١٢\r\n".encode(), None),
        (b"250 SIZE 1000 extra\r\n", 1000),
        (b"250 PIPELINING\r\n", None),
    ],
)
def test_parse_ehlo_size(line: bytes, size: int | None) -> None:
    caps = parse_ehlo(one(b"250-mx\r\n" + line))
    assert caps.size == size


def test_parse_ehlo_ignores_garbage_lines() -> None:
    caps = parse_ehlo(
        one(
            b"250-mx.example\r\n"
            b"250-\r\n"
            b"250-   \r\n"
            b"250--DASH\r\n"
            b"250-_UNDERSCORE\r\n"
            b"250-K\xc3\xa9Y x\r\n"
            b"250-\x1b[31mEVIL\r\n"
            b"250-X-CUSTOM a b\r\n"
            b"250 PIPELINING\r\n"
        )
    )
    assert dict(caps.extensions) == {"X-CUSTOM": ("a", "b"), "PIPELINING": ()}


def test_parse_ehlo_single_line_reply_has_no_extensions() -> None:
    caps = parse_ehlo(one(b"250 mx.example\r\n"))
    assert caps.domain == "mx.example"
    assert dict(caps.extensions) == {}
    assert parse_ehlo(one(b"250\r\n")).domain == ""


def test_parse_ehlo_domain_is_sanitised() -> None:
    caps = parse_ehlo(one(b"250 mx\x1b[2J.example hi\r\n"))
    assert caps.domain == "mx\\x1b[2J.example"


@pytest.mark.parametrize("code", [220, 251, 502, 554])
def test_parse_ehlo_needs_250(code: int) -> None:
    with pytest.raises(ValueError, match="250"):
        parse_ehlo(Reply(code, ("x",)))


def test_capabilities_are_read_only_and_detached() -> None:
    source: dict[str, tuple[str, ...]] = {"STARTTLS": ()}
    caps = Capabilities("mx", source)
    source["AUTH"] = ("PLAIN",)
    assert not caps.has("AUTH")
    with pytest.raises(TypeError):
        caps.extensions["AUTH"] = ("PLAIN",)  # type: ignore[index]
    with pytest.raises(AttributeError):
        caps.domain = "other"  # type: ignore[misc]
    assert caps == Capabilities("mx", {"STARTTLS": ()})
    assert hash(caps) == hash(Capabilities("mx", {"STARTTLS": ()}))


def test_empty_capabilities() -> None:
    caps = Capabilities.empty()
    assert caps.domain == ""
    assert not caps.starttls
    assert not caps.has("PIPELINING")
    assert caps.size is None
    assert caps.auth_mechanisms == frozenset()
