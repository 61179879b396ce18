"""Messages ready for DATA: checked before connecting, streamed when large.

MAIL needs the size (for SIZE=) and whether the body has 8-bit octets (for
BODY=8BITMIME) before the first byte of the body goes out, and a line that is
too long must be refused before anything is sent. So every message is encoded
once up front: bytes are kept encoded in memory, while files are scanned and
later re-encoded chunk by chunk as the transport asks for them, keeping memory
flat whatever the size.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import BinaryIO, cast

from txstarttls.data import DataEncoder, encode_body

CHUNK_SIZE = 64 * 1024

MessageInput = bytes | str | os.PathLike[str] | BinaryIO | Iterable[bytes]
"""Anything ``prepare()`` accepts: bytes, a path, a binary file, chunks."""


class PreparedMessage:
    """A message encoded for the wire: dot-stuffed, CRLF, terminated."""

    size: int
    """Octets of the encoded form, for SIZE= (RFC 1870)."""
    eight_bit: bool
    in_memory: bytes | None
    """The whole encoded body when small enough to hold, else None."""

    def __init__(self, size: int, eight_bit: bool, in_memory: bytes | None) -> None:
        self.size = size
        self.eight_bit = eight_bit
        self.in_memory = in_memory

    def chunks(self) -> Iterator[bytes]:
        """The encoded body in pieces; the last one holds the terminator."""
        assert self.in_memory is not None
        yield self.in_memory

    def bdat_chunks(self) -> Iterator[bytes]:
        """The body for BDAT (RFC 3030): CRLF lines, not dot-stuffed, no
        terminator; in pieces, possibly empty ones."""
        assert self.in_memory is not None
        yield unstuff(self.in_memory)

    @classmethod
    def from_bytes(cls, message: bytes) -> PreparedMessage:
        return cls(
            size=len(encoded := encode_body(message)),
            eight_bit=not message.isascii(),
            in_memory=encoded,
        )


class FileMessage(PreparedMessage):
    """A message in a file, re-read and encoded chunk by chunk when sent."""

    def __init__(self, path: Path) -> None:
        self.path = path
        encoder = DataEncoder()
        size = 0
        for chunk in self._encoded(encoder):
            size += len(chunk)
        super().__init__(size=size, eight_bit=encoder.saw_8bit, in_memory=None)

    def _encoded(self, encoder: DataEncoder) -> Iterator[bytes]:
        with self.path.open("rb") as source:
            while chunk := source.read(CHUNK_SIZE):
                if encoded := encoder.encode(chunk):
                    yield encoded
        yield encoder.finish()

    def chunks(self) -> Iterator[bytes]:
        return self._encoded(DataEncoder())

    def bdat_chunks(self) -> Iterator[bytes]:
        return self._encoded(DataEncoder(stuff=False))


class SpooledMessage(FileMessage):
    """A message from a stream that cannot be read twice, kept in a temp file."""

    def __init__(self, source: BinaryIO | Iterable[bytes]) -> None:
        self._spool = tempfile.NamedTemporaryFile(prefix="txstarttls-", delete=False)  # noqa: SIM115
        try:
            with self._spool as spool:
                if hasattr(source, "read"):
                    shutil.copyfileobj(cast(BinaryIO, source), spool, CHUNK_SIZE)
                else:
                    for chunk in source:
                        spool.write(chunk)
            super().__init__(Path(self._spool.name))
        except BaseException:
            self.discard()
            raise

    def discard(self) -> None:
        """Remove the spool file (also done when the object is collected)."""
        Path(self._spool.name).unlink(missing_ok=True)

    def __del__(self) -> None:
        self.discard()


def unstuff(encoded: bytes) -> bytes:
    """DATA wire bytes back to the message: the terminator off, dots unstuffed.

    Exact, since stuffing doubled every dot that began a line.
    """
    body = encoded[:-3]  # ".\r\n", the final CRLF being the last line's
    if body.startswith(b".."):
        body = body[1:]
    return body.replace(b"\r\n..", b"\r\n.")


def prepare(message: MessageInput | PreparedMessage) -> PreparedMessage:
    """Encode and check a message before any connection is made.

    Raises LineTooLong for a line over 998 octets. Bytes are held in memory;
    a path is read twice (scan, then send); a file object or an iterable of
    chunks is spooled to a temporary file first.
    """
    if isinstance(message, PreparedMessage):
        return message
    if isinstance(message, bytes | bytearray | memoryview):
        return PreparedMessage.from_bytes(bytes(message))
    if isinstance(message, str | os.PathLike):
        return FileMessage(Path(message))
    return SpooledMessage(message)
