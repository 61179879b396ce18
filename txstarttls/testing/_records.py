"""What the test server saw: each accepted message, and each session's log.

Tests assert on these records, so they keep exactly what arrived: message
content byte for byte after dot-unstuffing, and a transcript of both sides
with every AUTH payload redacted.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from twisted.internet import defer
from twisted.internet.defer import Deferred

Direction = Literal["C", "S"]
"""Who sent a transcript entry: the client or the server."""

REDACTED = b"[redacted]"
"""What a transcript shows instead of an AUTH payload."""


@dataclass(frozen=True, slots=True)
class ReceivedMessage:
    """One message the server accepted, with the session facts around it.

    ``data`` is the content after dot-unstuffing, every line ending in CRLF:
    byte for byte what the client meant to send. A bare CR or LF is kept as
    received (and never ends DATA), so smuggling tests can see it.
    """

    sender: str
    recipients: tuple[str, ...]
    data: bytes
    tls: bool
    tls_version: str | None
    authenticated_as: str | None
    helo: str | None
    queue_id: str
    mail_options: tuple[str, ...] = ()
    recipient_options: tuple[tuple[str, ...], ...] = ()
    session: int = 0


@dataclass(slots=True, eq=False)
class SessionLog:
    """What happened on one connection: grows while the connection lives.

    AUTH payloads appear as ``[redacted]`` in the transcript.
    ``discarded_after_starttls`` holds bytes the client pipelined behind
    STARTTLS, which the server threw away (CVE-2011-0411).
    """

    number: int
    peer: str
    transcript: list[tuple[Direction, bytes]] = field(default_factory=list)
    tls: bool = False
    discarded_after_starttls: bytes = b""
    closed: bool = False
    _waiters: list[Deferred[SessionLog]] = field(
        default_factory=list, init=False, repr=False
    )

    def client_bytes(self) -> bytes:
        """Everything the client sent, joined (AUTH redacted)."""
        return b"".join(data for who, data in self.transcript if who == "C")

    def server_bytes(self) -> bytes:
        """Everything the server sent, joined."""
        return b"".join(data for who, data in self.transcript if who == "S")

    def text(self) -> str:
        """The transcript as ``C: ...``/``S: ...`` lines, for failure messages."""
        lines: list[str] = []
        for who, data in self.transcript:
            for line in data.decode("utf-8", "replace").splitlines():
                lines.append(f"{who}: {line}")
        return "\n".join(lines)

    def when_closed(self) -> Deferred[SessionLog]:
        """A Deferred that fires with this log once the connection is gone."""
        if self.closed:
            return defer.succeed(self)
        waiter: Deferred[SessionLog] = Deferred()
        self._waiters.append(waiter)
        return waiter

    def _close(self) -> None:
        self.closed = True
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            waiter.callback(self)
