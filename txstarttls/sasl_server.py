"""The server's side of AUTH PLAIN and LOGIN (RFC 4954, 4616), without I/O.

The relay feeds each client line of an exchange to :class:`SaslExchange`
and acts on what comes back: a challenge to send, credentials to check, or
a rejection. Checking the password (twisted.cred) and slowing down failures
stay with the protocol; nothing here logs, so no secret can leak from it.
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass, field

from txstarttls.reply import sanitise
from txstarttls.smtp_arguments import Refusal

__all__ = [
    "MECHANISMS",
    "Challenge",
    "Credentials",
    "Rejected",
    "SaslExchange",
    "shown_username",
]

MECHANISMS = ("PLAIN", "LOGIN")
"""What the relay offers, in the order EHLO lists them."""

_LOGIN_PROMPTS = (b"Username:", b"Password:")
_SHOWN_USER = 64


@dataclass(frozen=True, slots=True)
class Challenge:
    """Send ``334 text`` and wait for the client's next line."""

    text: str


@dataclass(frozen=True, slots=True)
class Credentials:
    """The exchange is complete: check these."""

    mechanism: str
    username: bytes
    password: bytes = field(repr=False)


@dataclass(frozen=True, slots=True)
class Rejected:
    """Refused without a check; still counts as a failed attempt."""

    mechanism: str
    username: bytes


class SaslExchange:
    """An AUTH in progress: which mechanism, and what LOGIN has said so far."""

    def __init__(self, mechanism: str) -> None:
        if mechanism not in MECHANISMS:
            raise ValueError(f"unsupported SASL mechanism {mechanism!r}")
        self.mechanism = mechanism
        self._username: bytes | None = None

    def start(self) -> Challenge:
        """The first challenge, for an AUTH without an initial response."""
        if self.mechanism == "PLAIN":
            return Challenge("")
        return Challenge(base64.b64encode(_LOGIN_PROMPTS[0]).decode())

    def respond(
        self, line: bytes, *, initial: bool = False
    ) -> Challenge | Credentials | Rejected:
        """Take one base64 response; Refusal ends the exchange (no attempt)."""
        if line == b"*" and not initial:
            raise Refusal(501, "5.0.0", "Authentication cancelled")
        try:
            decoded = base64.b64decode(line, validate=True)
        except (binascii.Error, ValueError):
            raise Refusal(501, "5.5.2", "Cannot decode response") from None
        if self.mechanism == "LOGIN":
            if self._username is None:
                self._username = decoded
                return Challenge(base64.b64encode(_LOGIN_PROMPTS[1]).decode())
            return Credentials("LOGIN", self._username, decoded)
        parts = decoded.split(b"\0")
        if len(parts) != 3 or not parts[1]:
            raise Refusal(501, "5.5.2", "Invalid PLAIN response")
        authzid, username, password = parts
        if authzid and authzid != username:
            # Acting as someone else (RFC 4616 authzid) is not supported.
            return Rejected("PLAIN", username)
        return Credentials("PLAIN", username, password)


def shown_username(name: bytes) -> str:
    """A client-supplied user name, made safe and short enough for a log line."""
    text = sanitise(name[: _SHOWN_USER * 4])
    return text[:_SHOWN_USER] + ("..." if len(text) > _SHOWN_USER else "")
