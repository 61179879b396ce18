"""SMTP replies: bytes -> Reply, bounded, strict about the grammar.

Pure code (no Twisted, no I/O) so that it can be tested and fuzzed alone. A
hostile or broken server controls every byte parsed here, so the grammar is
enforced exactly, sizes are bounded and all text is made safe to log.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from txstarttls.errors import ProtocolViolation

__all__ = [
    "MAX_LINES",
    "MAX_LINE_LENGTH",
    "MAX_REPLY_SIZE",
    "Capabilities",
    "Reply",
    "ReplyParser",
    "parse_ehlo",
    "parse_replies",
    "sanitise",
]

MAX_LINE_LENGTH = 2048
MAX_LINES = 100
MAX_REPLY_SIZE = 32768

_SHOWN_CHARS = 80

# RFC 5321 section 4.2: Reply-code = %x32-35 %x30-35 %x30-39, then SP or "-"
# and text, or nothing at all on a final line.
_REPLY_LINE = re.compile(rb"([2-5][0-5][0-9])(?:([ -])(.*))?", re.DOTALL)
# RFC 3463 / RFC 2034: class "." subject "." detail, then SP or end of text.
_ENHANCED = re.compile(r"([245])\.([0-9]{1,3})\.([0-9]{1,3})(?= |$)")
_NOT_PRINTABLE_ASCII = re.compile(r"[^\x20-\x7e]")
_KEYWORD = re.compile(r"[A-Za-z0-9][A-Za-z0-9-]*")
# The pre-RFC 4954 form some servers still send: "AUTH=LOGIN PLAIN".
_LEGACY_AUTH = re.compile(r"AUTH=(\S*)", re.IGNORECASE)


def _escape_char(match: re.Match[str]) -> str:
    char = match.group()
    if char.isprintable():
        return char
    point = ord(char)
    if point < 0x100:
        return f"\\x{point:02x}"
    if point < 0x10000:
        return f"\\u{point:04x}"
    return f"\\U{point:08x}"


def sanitise(raw: bytes) -> str:
    """Decode peer text and escape what could forge log lines or drive a terminal.

    Control characters (CR, LF, NUL, ESC, TAB, DEL, ...) and other
    non-printable code points become visible escapes such as ``\\x1b``.
    """
    text = raw.decode("utf-8", errors="replace")
    if text.isprintable():
        return text
    return _NOT_PRINTABLE_ASCII.sub(_escape_char, text)


def _show(line: bytes) -> str:
    """A short, safe excerpt of an offending line for an exception message."""
    text = sanitise(line[: _SHOWN_CHARS * 2])
    if len(text) > _SHOWN_CHARS or len(line) > _SHOWN_CHARS * 2:
        text = text[:_SHOWN_CHARS] + "..."
    return f'"{text}"'


@dataclass(frozen=True, slots=True)
class Reply:
    """One complete SMTP reply; ``lines`` hold the sanitised text of each line."""

    code: int
    lines: tuple[str, ...]
    enhanced: str | None = None

    @property
    def text(self) -> str:
        return "\n".join(self.lines)

    @property
    def is_success(self) -> bool:
        return 200 <= self.code < 300

    @property
    def is_intermediate(self) -> bool:
        return 300 <= self.code < 400

    @property
    def is_transient(self) -> bool:
        return 400 <= self.code < 500

    @property
    def is_permanent(self) -> bool:
        return 500 <= self.code < 600

    def __str__(self) -> str:
        return (f"{self.code} " + " ".join(self.lines)).strip()


_ONE_LINE_REPLIES: dict[bytes, Reply] = {}
_ONE_LINE_CACHE_SIZE = 256
_ONE_LINE_CACHE_OCTETS = 512
"""A peer repeats the same few one-line replies ("250 2.1.0 Ok") message after
message; each distinct line is parsed once. Replies are immutable, so sharing
them is safe, and a full cache is simply emptied."""


def _one_line_reply(match: re.Match[bytes]) -> Reply:
    code = int(match.group(1))
    text = match.group(3)
    first = sanitise(text) if text else ""
    return Reply(code, (first,), _enhanced_status(code, first))


def _enhanced_status(code: int, first_line: str) -> str | None:
    match = _ENHANCED.match(first_line)
    if match is None or int(match.group(1)) != code // 100:
        return None
    return match.group()


class ReplyParser:
    """Incremental: feed one line at a time (bytes without the CRLF).

    Every line of a multiline reply must carry the same code, and each reply
    is bounded in line length, line count and total size. After a
    ProtocolViolation the parser refuses further input until ``reset()``: the
    connection it was reading is no longer trustworthy.
    """

    def __init__(
        self,
        *,
        max_line_length: int = MAX_LINE_LENGTH,
        max_lines: int = MAX_LINES,
        max_reply_size: int = MAX_REPLY_SIZE,
    ) -> None:
        self._max_line_length = max_line_length
        self._max_lines = max_lines
        self._max_reply_size = max_reply_size
        self._code: int | None = None
        self._lines: list[str] = []
        self._size = 0
        self._failed = False

    @property
    def in_progress(self) -> bool:
        return bool(self._lines)

    def reset(self) -> None:
        self._code = None
        self._lines = []
        self._size = 0
        self._failed = False

    def _fail(self, reason: str, line: bytes) -> ProtocolViolation:
        self._failed = True
        return ProtocolViolation(f"Malformed SMTP reply: {reason}: {_show(line)}")

    def feed(self, line: bytes) -> Reply | None:
        """Take one line; return the Reply it completes, or None if more follow."""
        if self._failed:
            raise RuntimeError("ReplyParser failed earlier; call reset() first")
        if len(line) > self._max_line_length:
            raise self._fail(
                f"line of {len(line)} octets exceeds {self._max_line_length}", line
            )
        one_line = self._code is None and len(line) + 2 <= self._max_reply_size
        if one_line and (known := _ONE_LINE_REPLIES.get(line)) is not None:
            return known
        match = _REPLY_LINE.fullmatch(line)
        if match is None:
            raise self._fail(_grammar_error(line), line)
        if one_line and match.group(2) != b"-":
            # A one-line reply, nearly every one: no state to keep.
            reply = _one_line_reply(match)
            if len(line) <= _ONE_LINE_CACHE_OCTETS:
                if len(_ONE_LINE_REPLIES) >= _ONE_LINE_CACHE_SIZE:
                    _ONE_LINE_REPLIES.clear()
                _ONE_LINE_REPLIES[line] = reply
            return reply
        code = int(match.group(1))
        if self._code is not None and code != self._code:
            raise self._fail(
                f"multiline reply changed code from {self._code} to {code}", line
            )
        if len(self._lines) >= self._max_lines:
            raise self._fail(f"reply has more than {self._max_lines} lines", line)
        self._size += len(line) + 2
        if self._size > self._max_reply_size:
            raise self._fail(f"reply exceeds {self._max_reply_size} octets", line)
        text = match.group(3)
        self._lines.append(sanitise(text) if text else "")
        if match.group(2) == b"-":
            self._code = code
            return None
        lines = tuple(self._lines)
        self.reset()
        return Reply(code, lines, _enhanced_status(code, lines[0]))


def _grammar_error(line: bytes) -> str:
    """Say precisely which rule of RFC 5321 section 4.2 the line breaks."""
    if not line:
        return "empty line"
    head = line[:3]
    if len(head) < 3 or not head.isdigit():
        return "line does not start with a three-digit code"
    if not (b"2" <= head[:1] <= b"5" and head[1:2] <= b"5"):
        return f"code {head.decode('ascii')} is outside 200-559"
    return "code not followed by space, hyphen or end of line"


def parse_replies(data: bytes) -> list[Reply]:
    """Parse a whole CRLF-terminated stream of replies (mainly for tests)."""
    if not data:
        return []
    if not data.endswith(b"\r\n"):
        raise ProtocolViolation("Malformed SMTP reply: data does not end in CRLF")
    parser = ReplyParser()
    replies = []
    for line in data[:-2].split(b"\r\n"):
        reply = parser.feed(line)
        if reply is not None:
            replies.append(reply)
    if parser.in_progress:
        raise ProtocolViolation("Malformed SMTP reply: multiline reply not finished")
    return replies


@dataclass(frozen=True, slots=True)
class Capabilities:
    """What the server offered in its EHLO reply.

    Kept as data rather than flags so that a fresh EHLO (after STARTTLS)
    simply replaces the whole value and nothing learnt before TLS survives.
    """

    domain: str
    extensions: Mapping[str, tuple[str, ...]] = field(hash=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "extensions", MappingProxyType(dict(self.extensions)))

    @classmethod
    def empty(cls) -> Capabilities:
        """No extensions: after HELO, or before any EHLO."""
        return cls("", {})

    def has(self, keyword: str) -> bool:
        return keyword.upper() in self.extensions

    @property
    def auth_mechanisms(self) -> frozenset[str]:
        return frozenset(m.upper() for m in self.extensions.get("AUTH", ()))

    @property
    def size(self) -> int | None:
        params = self.extensions.get("SIZE", ())
        if not params or not (params[0].isascii() and params[0].isdigit()):
            return None
        return int(params[0]) or None

    @property
    def starttls(self) -> bool:
        return "STARTTLS" in self.extensions

    @property
    def pipelining(self) -> bool:
        return "PIPELINING" in self.extensions

    @property
    def smtputf8(self) -> bool:
        return "SMTPUTF8" in self.extensions

    @property
    def eightbitmime(self) -> bool:
        return "8BITMIME" in self.extensions

    @property
    def chunking(self) -> bool:
        return "CHUNKING" in self.extensions

    @property
    def dsn(self) -> bool:
        return "DSN" in self.extensions

    @property
    def enhanced_status_codes(self) -> bool:
        return "ENHANCEDSTATUSCODES" in self.extensions


def parse_ehlo(reply: Reply) -> Capabilities:
    """Read the extensions from a 250 EHLO reply; junk lines are skipped.

    The legacy ``AUTH=LOGIN PLAIN`` form is merged into ``AUTH``, so a server
    that only sends it still counts as offering AUTH.
    """
    if reply.code != 250:
        raise ValueError(f"EHLO capabilities need a 250 reply, not {reply.code}")
    words = reply.lines[0].split() if reply.lines else []
    domain = words[0] if words else ""
    extensions: dict[str, tuple[str, ...]] = {}
    for line in reply.lines[1:]:
        words = line.split()
        if not words:
            continue
        keyword, params = words[0], words[1:]
        if _KEYWORD.fullmatch(keyword):
            keyword = keyword.upper()
        else:
            legacy = _LEGACY_AUTH.fullmatch(keyword)
            if legacy is None:
                continue
            keyword = "AUTH"
            params = [legacy.group(1), *params] if legacy.group(1) else params
        known = extensions.get(keyword)
        if known is None:
            extensions[keyword] = tuple(params)
        elif keyword == "AUTH":
            extensions[keyword] = known + tuple(p for p in params if p not in known)
    return Capabilities(domain, extensions)
