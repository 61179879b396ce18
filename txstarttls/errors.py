"""One exception tree for everything that can go wrong in an SMTP exchange.

Every error is either transient (try again later: 4xx, timeouts, lost
connections, TLS trouble) or permanent (5xx, or our own refusal to send
something invalid), and carries the SMTP code, the enhanced status code, the
peer's sanitised text and the phase of the dialogue it happened in, so a
caller can decide between deferring and bouncing without parsing messages.
"""

from __future__ import annotations

import enum


class Phase(enum.Enum):
    """Where in the dialogue something happened."""

    CONNECT = "connect"
    GREETING = "greeting"
    EHLO = "ehlo"
    HELO = "helo"
    STARTTLS = "starttls"
    TLS_HANDSHAKE = "tls-handshake"
    AUTH = "auth"
    MAIL = "mail"
    RCPT = "rcpt"
    DATA = "data"
    END_OF_DATA = "end-of-data"
    RSET = "rset"
    NOOP = "noop"
    QUIT = "quit"
    LOCAL = "local"

    # Members are singletons compared by identity, so identity hashing is
    # exact; Enum's own __hash__ is Python code run for every command sent.
    __hash__ = object.__hash__


class SMTPError(Exception):
    """Base of every txstarttls error.

    The message is one line meant for a human; the attributes are meant for
    code. ``text`` is the peer's reply text, already sanitised.
    """

    is_transient: bool = True

    def __init__(
        self,
        message: str,
        *,
        code: int | None = None,
        enhanced: str | None = None,
        text: str = "",
        phase: Phase | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.code = code
        self.enhanced = enhanced
        self.text = text
        self.phase = phase
        self.relay: str | None = None
        """The peer (``name[address]:port``) once a connection existed."""

    @property
    def is_permanent(self) -> bool:
        return not self.is_transient

    def __str__(self) -> str:
        return self.message


class TransientError(SMTPError):
    """Trying again later may succeed."""

    is_transient = True


class PermanentError(SMTPError):
    """Trying again will fail the same way."""

    is_transient = False


# --- the peer's doing -------------------------------------------------------


class TransientReplyError(TransientError):
    """The server answered a command with a 4xx reply."""


class PermanentReplyError(PermanentError):
    """The server answered a command with a 5xx reply."""


class ProtocolViolation(TransientError):
    """The peer broke the SMTP grammar or sequencing (its bug, not ours)."""


class ResponseInjection(ProtocolViolation):
    """Reply bytes arrived behind the 220 to STARTTLS (RFC 3207 section 4.2)."""


class ConnectionFailed(TransientError):
    """No connection could be made."""


class ConnectionLost(TransientError):
    """The connection closed before the dialogue finished."""


class OutcomeUnknown(ConnectionLost):
    """The connection closed after the final dot and before its reply.

    The message may or may not have been delivered; retrying may duplicate it.
    """


class Timeout(TransientError):
    """The peer took longer than the phase allows."""


# --- TLS --------------------------------------------------------------------


class TLSError(TransientError):
    """Base of TLS failures; all transient, since configuration may change."""


class TLSRequired(TLSError):
    """TLS is required (or credentials are configured) and cannot be had."""


class TLSHandshakeFailed(TLSError):
    """The TLS handshake did not complete."""


class CertificateVerificationFailed(TLSHandshakeFailed):
    """The server certificate or its host name did not verify."""


class FingerprintMismatch(CertificateVerificationFailed):
    """The server certificate is not the pinned one."""


# --- AUTH -------------------------------------------------------------------


class AuthenticationFailed(PermanentError):
    """The server refused our credentials (535 and other 5xx to AUTH)."""


class AuthenticationUnavailable(PermanentError):
    """Credentials are configured but no usable mechanism is offered."""


# --- recipients -------------------------------------------------------------


class RecipientsRefused(SMTPError):
    """No recipient was accepted; the results say why for each one.

    Transient only when every refusal was transient.
    """

    def __init__(
        self, message: str, *, recipients: tuple[object, ...], transient: bool
    ) -> None:
        super().__init__(message, phase=Phase.RCPT)
        self.recipients = recipients
        self.is_transient = transient


# --- our own refusals (nothing was sent) -------------------------------------


class LocalError(PermanentError):
    """We refused to send something invalid; no byte of it went out."""

    def __init__(self, message: str) -> None:
        super().__init__(message, phase=Phase.LOCAL)


class InvalidAddress(LocalError):
    """An envelope address is malformed, too long or carries control bytes."""


class InvalidArgument(LocalError):
    """A command argument (EHLO name, user name, parameter) is unsafe."""


class LineTooLong(LocalError):
    """A message line exceeds 998 octets plus CRLF (RFC 5321 section 4.5.3.1.6)."""


class MessageTooLarge(LocalError):
    """The message exceeds the SIZE the server advertised."""


class ExtensionRequired(LocalError):
    """The message needs an extension (SMTPUTF8, 8BITMIME) the server lacks."""


class ConfigurationError(PermanentError):
    """The settings are wrong (an unreadable CA file, a bad fingerprint)."""

    def __init__(self, message: str) -> None:
        super().__init__(message, phase=Phase.LOCAL)
