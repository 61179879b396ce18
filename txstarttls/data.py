"""The DATA phase: what goes on the wire after 354, both ways.

The client side (``DataEncoder``) turns any body into lines that end in CRLF
and are dot-stuffed, whatever the chunking; the server side (``DataDecoder``)
finds the one true end of data. Getting either wrong lets a message end
early and the rest run as commands: SMTP smuggling (CVE-2023-51764..51766).
Both work on whole chunks with bytes methods, never byte by byte.
"""

from __future__ import annotations

from typing import Literal

from txstarttls.errors import LineTooLong

__all__ = ["MAX_LINE_OCTETS", "DataDecoder", "DataEncoder", "encode_body"]

# RFC 5321 section 4.5.3.1.6: 1000 octets including CRLF, the stuffed dot not
# counted.
MAX_LINE_OCTETS = 998

_CRLF = b"\r\n"
_TERMINATOR = b"\r\n.\r\n"


def _normalise(data: bytes) -> bytes:
    """Every CRLF, bare CR and bare LF becomes CRLF (RFC 5321 section 2.3.8)."""
    if b"\r" not in data:
        return data.replace(b"\n", _CRLF)
    return data.replace(_CRLF, b"\n").replace(b"\r", b"\n").replace(b"\n", _CRLF)


def _longest_line(parts: list[bytes], carried: int) -> int:
    """Length of the longest line, the first one continuing ``carried`` octets."""
    return max(carried + len(parts[0]), max(map(len, parts)))


class DataEncoder:
    """Streams a message body into DATA wire bytes, one chunk at a time.

    A CR at the end of a chunk is held back: it may be the first half of a
    CRLF split across chunks. ``finish()`` supplies the final line end and the
    terminator.
    """

    def __init__(
        self, *, max_line_octets: int = MAX_LINE_OCTETS, stuff: bool = True
    ) -> None:
        """``stuff=False`` is for BDAT (RFC 3030): CRLF lines, no dot-stuffing
        and no terminator, the octets counted by the command instead."""
        self._max_line_octets = max_line_octets
        self._stuff = stuff
        self._held_cr = False
        self._at_line_start = True
        self._line_octets = 0
        self._line_number = 1
        self._saw_8bit = False
        self._octets_in = 0
        self._closed = False

    @property
    def saw_8bit(self) -> bool:
        return self._saw_8bit

    @property
    def octets_in(self) -> int:
        return self._octets_in

    def encode(self, chunk: bytes) -> bytes:
        """Return the wire bytes for ``chunk``; LineTooLong as soon as known."""
        if self._closed:
            raise RuntimeError("DataEncoder is finished (or failed); make a new one")
        self._octets_in += len(chunk)
        if not self._saw_8bit and not chunk.isascii():
            self._saw_8bit = True
        if self._held_cr:
            chunk = b"\r" + chunk
            self._held_cr = False
        if chunk.endswith(b"\r"):
            chunk = chunk[:-1]
            self._held_cr = True
        if not chunk:
            return b""
        data = _normalise(chunk)
        self._check_lines(data)
        # Dot-stuffing (RFC 5321 section 4.5.2), including a line that began
        # in an earlier chunk's final CRLF.
        if self._stuff:
            if self._at_line_start and data.startswith(b"."):
                data = b"." + data
            data = data.replace(b"\r\n.", b"\r\n..")
        self._at_line_start = data.endswith(_CRLF)
        return data

    def _check_lines(self, data: bytes) -> None:
        limit = self._max_line_octets
        if self._line_octets + len(data) <= limit:
            newline = data.rfind(_CRLF)
            if newline < 0:
                self._line_octets += len(data)
            else:
                self._line_number += data.count(_CRLF)
                self._line_octets = len(data) - newline - 2
            return
        parts = data.split(_CRLF)
        if _longest_line(parts, self._line_octets) > limit:
            self._closed = True
            self._raise_too_long(parts)
        self._line_number += len(parts) - 1
        self._line_octets = (
            len(parts[0]) + self._line_octets if len(parts) == 1 else len(parts[-1])
        )

    def _raise_too_long(self, parts: list[bytes]) -> None:
        # Only on failure, so a loop over lines is fine here.
        lengths = [len(part) for part in parts]
        lengths[0] += self._line_octets
        index = next(i for i, n in enumerate(lengths) if n > self._max_line_octets)
        complete = index < len(parts) - 1 or self._held_cr
        size = f"{lengths[index]}" if complete else f"at least {lengths[index]}"
        raise LineTooLong(
            f"Line {self._line_number + index} of the message is {size} octets, "
            f"over the {self._max_line_octets} SMTP allows "
            "(RFC 5321 section 4.5.3.1.6); wrap it or use quoted-printable/base64"
        )

    def finish(self) -> bytes:
        """End the body: a final CRLF if it lacked one, then the terminator."""
        if self._closed:
            raise RuntimeError("DataEncoder is finished (or failed); make a new one")
        self._closed = True
        ending = b"" if self._at_line_start and not self._held_cr else _CRLF
        self._held_cr = False
        return ending + b".\r\n" if self._stuff else ending


def encode_body(body: bytes, *, max_line_octets: int = MAX_LINE_OCTETS) -> bytes:
    """The complete DATA wire bytes for ``body``, terminator included."""
    lines = body.split(_CRLF)
    if max(map(len, lines)) <= max_line_octets:
        # Nearly every message: CRLF lines already, none too long. One split
        # answers both questions, where the streaming encoder needs more passes.
        rest = b"".join(lines)
        if b"\r" not in rest and b"\n" not in rest:
            stuffed = body.replace(b"\r\n.", b"\r\n..")
            if body.startswith(b"."):
                stuffed = b"." + stuffed
            return stuffed + (b".\r\n" if not lines[-1] else b"\r\n.\r\n")
    encoder = DataEncoder(max_line_octets=max_line_octets)
    return encoder.encode(body) + encoder.finish()


class DataDecoder:
    """Reads the bytes after a 354 until the one true end: CRLF . CRLF.

    ``\\n.\\n``, ``\\r.\\r``, ``\\n.\\r\\n`` and ``\\r\\n.\\n`` never end data
    (SMTP smuggling); nothing inside DATA is ever treated as a command, however
    long its lines. In ``"reject"`` mode content comes back as sent and
    ``bare_line_ending_seen`` tells the caller to answer 550 5.5.2 and keep
    nothing; in ``"normalize"`` mode bare CR and LF become CRLF.
    """

    def __init__(
        self,
        *,
        bare_line_endings: Literal["reject", "normalize"] = "reject",
        max_line_octets: int = MAX_LINE_OCTETS,
        max_size: int | None = None,
    ) -> None:
        if bare_line_endings not in ("reject", "normalize"):
            raise ValueError("bare_line_endings must be 'reject' or 'normalize'")
        self._normalize = bare_line_endings == "normalize"
        self._max_line_octets = max_line_octets
        self._max_size = max_size
        # Unprocessed bytes: at most a held "." and/or CR that might begin the
        # terminator or a CRLF split across chunks.
        self._held = b""
        # The DATA command's own CRLF precedes the first byte of content.
        self._after_crlf = True
        self._at_line_start = True
        self._line_octets = 0
        self._size = 0
        self._done = False
        self._remainder = b""
        self._bare = False
        self._line_too_long = False
        self._size_exceeded = False

    @property
    def done(self) -> bool:
        return self._done

    @property
    def remainder(self) -> bytes:
        return self._remainder

    @property
    def bare_line_ending_seen(self) -> bool:
        return self._bare

    @property
    def line_too_long(self) -> bool:
        return self._line_too_long

    @property
    def size_exceeded(self) -> bool:
        return self._size_exceeded

    def feed(self, data: bytes) -> bytes:
        """Return the un-stuffed content found in ``data`` (possibly ``b""``)."""
        if self._done:
            raise RuntimeError("DataDecoder already saw the end of data")
        buf = self._held + data
        if self._after_crlf and buf.startswith(b".\r\n"):
            end, rest = 0, 3
        else:
            found = buf.find(_TERMINATOR)
            end, rest = (found + 2, found + 5) if found >= 0 else (-1, -1)
        if end >= 0:
            self._done = True
            self._remainder = buf[rest:]
            self._held = b""
            return self._process(buf[:end])
        end = len(buf)
        if buf.endswith(b"\r"):
            end -= 1
        if buf[end - 1 : end] == b"." and (
            buf[end - 3 : end - 1] == _CRLF
            if end >= 3
            else end == 1 and self._after_crlf
        ):
            # A "." at the start of a line might be the terminator's.
            end -= 1
        self._held = buf[end:]
        return self._process(buf[:end])

    def _process(self, region: bytes) -> bytes:
        """Check, normalise and un-stuff complete bytes; never ends with CR."""
        if not region:
            return b""
        self._after_crlf = region.endswith(_CRLF)
        crlfs = region.count(_CRLF)
        if region.count(b"\r") != crlfs or region.count(b"\n") != crlfs:
            self._bare = True
            if self._normalize:
                region = _normalise(region)
        ends_line = region.endswith(_CRLF)
        # Un-stuffing (RFC 5321 section 4.5.2): one leading "." per line.
        if self._at_line_start and region.startswith(b"."):
            region = region[1:]
        region = region.replace(b"\r\n.", _CRLF)
        self._at_line_start = ends_line
        self._check_lines(region)
        self._size += len(region)
        if self._max_size is not None and self._size > self._max_size:
            self._size_exceeded = True
        return b"" if self._size_exceeded else region

    def _check_lines(self, region: bytes) -> None:
        if self._line_octets + len(region) <= self._max_line_octets:
            newline = region.rfind(_CRLF)
            if newline < 0:
                self._line_octets += len(region)
            else:
                self._line_octets = len(region) - newline - 2
            return
        parts = region.split(_CRLF)
        if _longest_line(parts, self._line_octets) > self._max_line_octets:
            self._line_too_long = True
        self._line_octets = (
            len(parts[0]) + self._line_octets if len(parts) == 1 else len(parts[-1])
        )
