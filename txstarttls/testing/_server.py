"""A strict, scriptable ESMTP server that plays the upstream in tests.

It is our own ``LineReceiver`` rather than ``twisted.mail.smtp.ESMTP``
because that server runs commands pipelined behind STARTTLS and is too
lenient to catch a client's mistakes. This one answers every command with an
enhanced status code (RFC 2034: except the greeting and replies to
EHLO/HELO; 334 and 354 carry none either), resets the session after TLS
(RFC 3207), and records exactly what it received (:mod:`._records`).
Misbehaviour is scripted per command (:mod:`._script`).

The same factory serves a real loopback port (:func:`start_test_server`) or
an in-memory connection (``factory.buildProtocol(address)`` with
:func:`txstarttls.testing.connect_in_memory`).
"""

from __future__ import annotations

import base64
import binascii
import itertools
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TypedDict

from OpenSSL import SSL
from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import (
    IAddress,
    IHandshakeListener,
    IOpenSSLServerConnectionCreator,
)
from twisted.internet.protocol import Factory, connectionDone
from twisted.logger import Logger
from twisted.protocols.basic import LineReceiver
from twisted.python.failure import Failure
from zope.interface import implementer

from txstarttls.testing._records import (
    REDACTED,
    Direction,
    ReceivedMessage,
    SessionLog,
)
from txstarttls.testing._sasl import SaslDialogue, start_dialogue
from txstarttls.testing._script import ScriptRule, ServerScript, reply_bytes

__all__ = [
    "ScriptedSMTPServer",
    "ScriptedSMTPServerFactory",
    "ServerKnobs",
    "SessionKnobs",
]

log = Logger()

DEFAULT_HOSTNAME = "mx.test.example"
DEFAULT_MAX_SIZE = 10 * 1024 * 1024

# RFC 4954 allows 12288 octets for an AUTH line; commands stay well under it.
_COMMAND_LINE_LIMIT = 16384
# RFC 5321 caps text lines at 1000 octets, but a test upstream should record
# a broken client's long lines, not drop the connection over them.
_DATA_LINE_LIMIT = 1024 * 1024

_NOT_IMPLEMENTED = frozenset({"EXPN", "HELP", "TURN", "ETRN", "ATRN"})


@dataclass(frozen=True, slots=True)
class _Settings:
    hostname: str
    tls_options: IOpenSSLServerConnectionCreator | None
    implicit_tls: bool
    max_size: int
    users: Mapping[str, str]
    tokens: Mapping[str, str]
    require_auth: bool
    require_tls_for_auth: bool

    @property
    def mechanisms(self) -> tuple[str, ...]:
        mechanisms: list[str] = []
        if self.users:
            mechanisms += ["PLAIN", "LOGIN"]
        if self.tokens:
            mechanisms += ["XOAUTH2", "OAUTHBEARER"]
        return tuple(mechanisms)


class SessionKnobs(TypedDict, total=False):
    """Server settings other than the TLS options."""

    hostname: str
    implicit_tls: bool
    max_size: int
    users: Mapping[str, str]
    tokens: Mapping[str, str]
    require_auth: bool
    require_tls_for_auth: bool
    script: ServerScript


class ServerKnobs(SessionKnobs, total=False):
    """Every keyword :class:`ScriptedSMTPServerFactory` accepts."""

    tls_options: IOpenSSLServerConnectionCreator | None


@dataclass(slots=True)
class _Transaction:
    """The envelope and content of the mail transaction in progress."""

    sender: str | None = None
    smtputf8: bool = False
    mail_options: tuple[str, ...] = ()
    recipients: list[str] = field(default_factory=list)
    recipient_options: list[tuple[str, ...]] = field(default_factory=list)
    in_data: bool = False
    data: list[bytes] = field(default_factory=list)
    data_size: int = 0
    too_big: bool = False
    chunk_left: int = 0
    """Octets of the BDAT chunk still to read (RFC 3030)."""
    last_chunk: bool = False
    bdat_argument: str = ""


class _Reject(Exception):
    """A command is refused with ``reply``; raised by the parsers."""

    def __init__(self, reply: str) -> None:
        super().__init__(reply)
        self.reply = reply


# -- envelope parsing ---------------------------------------------------------


def _split_path(text: str, prefix: str) -> tuple[str, list[str]]:
    """Split ``FROM:<addr> PARAMS`` into the address and its parameters."""
    if not text[: len(prefix)].upper() == prefix:
        raise _Reject(f"501 5.5.4 Syntax: {prefix}<address>")
    rest = text[len(prefix) :]
    if not rest.startswith("<"):
        raise _Reject(f"501 5.5.4 Syntax: {prefix}<address>")
    quoted = False
    end = -1
    for index, char in enumerate(rest):
        if char == '"':
            quoted = not quoted
        elif char == ">" and not quoted:
            end = index
            break
    if end < 0:
        raise _Reject(f"501 5.5.4 Syntax: {prefix}<address>")
    address, params = rest[1:end], rest[end + 1 :]
    if params and not params.startswith(" "):
        raise _Reject(f"501 5.5.4 Syntax: {prefix}<address>")
    if any(char in address for char in "\r\n\0"):
        raise _Reject("501 5.1.7 Bad address syntax")
    if ":" in address and address.startswith("@"):
        # RFC 5321 4.1.2: a source route is accepted and ignored.
        address = address.split(":", 1)[1]
    return address, params.split()


# -- the protocol -------------------------------------------------------------


@implementer(IHandshakeListener)
class ScriptedSMTPServer(LineReceiver):
    """One ESMTP session, driven by its factory's settings and script."""

    MAX_LENGTH = _COMMAND_LINE_LIMIT

    factory: ScriptedSMTPServerFactory

    def __init__(self, factory: ScriptedSMTPServerFactory, session: SessionLog) -> None:
        self.factory = factory
        self._settings = factory.settings
        self._script = factory.script
        self.session = session
        self.tls_active = False
        self.helo: str | None = None
        self.esmtp = False
        self.authenticated_as: str | None = None
        self._auth: SaslDialogue | None = None
        self._reset_transaction()

    # -- connection events ----------------------------------------------------

    def connectionMade(self) -> None:
        self.factory._open_session(self)
        if self._settings.implicit_tls and self._tls_connection() is None:
            self._start_tls()
        elif self._tls_connection() is not None:
            # An ssl: endpoint wrapped us in TLS already.
            self.tls_active = self.session.tls = True
        log.info(
            "test SMTP session {session} from {peer} (tls={tls})",
            session=self.session.number,
            peer=self.session.peer,
            tls=self.tls_active,
        )
        rule = self._script.take("CONNECT", "")
        if rule is not None:
            self._apply(rule)
        else:
            self._send(f"220 {self._settings.hostname} ESMTP txstarttls-test")

    def handshakeCompleted(self) -> None:
        connection = self._tls_connection()
        log.info(
            "test SMTP session {session}: TLS established ({version})",
            session=self.session.number,
            version=connection.get_protocol_version_name() if connection else None,
        )

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._auth = None
        log.info(
            "test SMTP session {session} closed: {reason}",
            session=self.session.number,
            reason=reason.getErrorMessage(),
        )
        self.factory._close_session(self)

    def lineLengthExceeded(self, line: bytes) -> None:
        if self._txn.in_data:
            self._send("552 5.3.4 Message line too long")
        else:
            self._send("500 5.5.2 Line too long")
        self._lose()

    # -- input ----------------------------------------------------------------

    def lineReceived(self, line: bytes) -> None:
        if self._txn.in_data:
            self._record("C", line + b"\r\n")
            self._data_line(line)
        elif self._auth is not None:
            self._record("C", REDACTED + b"\r\n")
            self._auth_response(line)
        else:
            self._command(line)

    def _command(self, line: bytes) -> None:
        verb_bytes, _, argument_bytes = line.partition(b" ")
        verb = verb_bytes.decode("ascii", "replace").upper()
        shown = line
        if verb == "AUTH" and b" " in argument_bytes.strip():
            mechanism = argument_bytes.strip().split(b" ", 1)[0]
            shown = verb_bytes + b" " + mechanism + b" " + REDACTED
        self._record("C", shown + b"\r\n")
        log.debug(
            "test SMTP session {session} C: {line}",
            session=self.session.number,
            line=shown.decode("utf-8", "replace"),
        )
        try:
            argument = argument_bytes.decode("utf-8").strip()
        except UnicodeDecodeError:
            self._send("500 5.5.2 Syntax error: invalid UTF-8")
            return
        # A BDAT rule is applied once its chunk has been read.
        rule = None if verb == "BDAT" else self._script.take(verb, argument)
        if rule is not None:
            self._apply(rule)
            return
        handler = self._handlers.get(verb)
        try:
            if handler is not None:
                handler(self, argument)
            elif verb in _NOT_IMPLEMENTED:
                self._send("502 5.5.1 Command not implemented")
            else:
                self._send("500 5.5.2 Error: command not recognized")
        except _Reject as rejected:
            self._send(rejected.reply)

    # -- commands -------------------------------------------------------------

    def _smtp_ehlo(self, argument: str) -> None:
        if not argument:
            self._send("501 Syntax: EHLO hostname")
            return
        self.helo, self.esmtp = argument, True
        self._reset_transaction()
        *head, last = [self._settings.hostname, *self._extensions()]
        self._send("".join(f"250-{line}\n" for line in head) + f"250 {last}")

    def _smtp_helo(self, argument: str) -> None:
        if not argument:
            self._send("501 Syntax: HELO hostname")
            return
        self.helo, self.esmtp = argument, False
        self._reset_transaction()
        self._send(f"250 {self._settings.hostname}")

    def _smtp_starttls(self, argument: str) -> None:
        if argument:
            self._send("501 5.5.4 Syntax: STARTTLS takes no parameters")
        elif self._settings.tls_options is None:
            self._send("502 5.5.1 Command not implemented")
        elif self.tls_active:
            self._send("503 5.5.1 Error: TLS already active")
        elif self.helo is None:
            self._send("503 5.5.1 Error: send EHLO first")
        else:
            self._send("220 2.0.0 Ready to start TLS")
            self._start_tls()

    def _smtp_auth(self, argument: str) -> None:
        settings = self._settings
        if not settings.mechanisms:
            raise _Reject("502 5.5.1 Command not implemented")
        if self.helo is None or not self.esmtp:
            raise _Reject("503 5.5.1 Error: send EHLO first")
        if self.authenticated_as is not None:
            raise _Reject("503 5.5.1 Error: already authenticated")
        if self._txn.sender is not None:
            raise _Reject("503 5.5.1 Error: AUTH not permitted during a transaction")
        if settings.require_tls_for_auth and not self.tls_active:
            raise _Reject(
                "538 5.7.11 Encryption required for requested authentication mechanism"
            )
        mechanism, _, initial_text = argument.partition(" ")
        mechanism = mechanism.upper()
        if mechanism not in settings.mechanisms:
            raise _Reject("504 5.5.4 Unrecognized authentication type")
        initial: bytes | None = None
        if initial_text:
            if initial_text == "*":
                raise _Reject("501 5.0.0 Authentication cancelled")
            initial = self._decode_sasl(initial_text.encode("ascii", "replace"))
            if initial is None:
                return
        self._auth_mechanism = mechanism
        self._auth = start_dialogue(
            mechanism, initial, users=settings.users, tokens=settings.tokens
        )
        self._auth_step(lambda exchange: next(exchange))

    def _smtp_mail(self, argument: str) -> None:
        if self.helo is None:
            raise _Reject("503 5.5.1 Error: send HELO/EHLO first")
        if self._txn.sender is not None:
            raise _Reject("503 5.5.1 Error: nested MAIL command")
        if self._settings.require_auth and self.authenticated_as is None:
            raise _Reject("530 5.7.0 Authentication required")
        address, params = _split_path(argument, "FROM:")
        smtputf8 = False
        for param in params:
            self._check_esmtp(param)
            key, _, value = param.partition("=")
            key = key.upper()
            if key == "SIZE":
                if not value.isdigit():
                    raise _Reject("501 5.5.4 Bad SIZE parameter")
                if int(value) > self._settings.max_size:
                    raise _Reject(
                        "552 5.3.4 Message size exceeds fixed maximum message size"
                    )
            elif key == "BODY":
                if value.upper() not in ("7BIT", "8BITMIME"):
                    raise _Reject("501 5.5.4 Bad BODY parameter")
            elif key == "SMTPUTF8":
                smtputf8 = True
            elif key == "RET":
                if value.upper() not in ("FULL", "HDRS"):
                    raise _Reject("501 5.5.4 Bad RET parameter")
            elif key not in ("ENVID", "AUTH"):
                raise _Reject(f"555 5.5.4 Unsupported option: {key}")
        if not address.isascii() and not smtputf8:
            raise _Reject("553 5.6.7 Non-ASCII address requires SMTPUTF8")
        self._txn.sender, self._txn.smtputf8 = address, smtputf8
        self._txn.mail_options = tuple(params)
        self._send("250 2.1.0 Ok")

    def _smtp_rcpt(self, argument: str) -> None:
        if self._txn.sender is None:
            raise _Reject("503 5.5.1 Error: need MAIL command")
        address, params = _split_path(argument, "TO:")
        if not address:
            raise _Reject("501 5.1.3 Bad recipient address syntax")
        for param in params:
            self._check_esmtp(param)
            key = param.partition("=")[0].upper()
            if key not in ("NOTIFY", "ORCPT"):
                raise _Reject(f"555 5.5.4 Unsupported option: {key}")
        if not address.isascii() and not self._txn.smtputf8:
            raise _Reject("553 5.6.7 Non-ASCII address requires SMTPUTF8")
        self._txn.recipients.append(address)
        self._txn.recipient_options.append(tuple(params))
        self._send("250 2.1.5 Ok")

    def _smtp_data(self, argument: str) -> None:
        if argument:
            raise _Reject("501 5.5.4 Syntax: DATA takes no parameters")
        if self._txn.sender is None:
            raise _Reject("503 5.5.1 Error: need MAIL command")
        if not self._txn.recipients:
            raise _Reject("554 5.5.1 Error: no valid recipients")
        self._txn.in_data = True
        self.MAX_LENGTH = _DATA_LINE_LIMIT
        self._send("354 End data with <CR><LF>.<CR><LF>")

    def _smtp_bdat(self, argument: str) -> None:
        # The chunk follows the command whatever the reply: read it first.
        size, _, last = argument.partition(" ")
        if not size.isdigit() or last.upper() not in ("", "LAST"):
            raise _Reject("501 5.5.4 Syntax: BDAT size [LAST]")
        self._txn.chunk_left = int(size)
        self._txn.last_chunk = bool(last)
        self._txn.bdat_argument = argument
        if self._txn.chunk_left:
            self.setRawMode()  # type: ignore[no-untyped-call]
        else:
            self._end_chunk()

    def _smtp_rset(self, argument: str) -> None:
        if argument:
            raise _Reject("501 5.5.4 Syntax: RSET takes no parameters")
        self._reset_transaction()
        self._send("250 2.0.0 Ok")

    def _smtp_noop(self, argument: str) -> None:
        self._send("250 2.0.0 Ok")

    def _smtp_vrfy(self, argument: str) -> None:
        if not argument:
            raise _Reject("501 5.5.4 Syntax: VRFY address")
        self._send("252 2.0.0 Cannot VRFY user, but will accept message")

    def _smtp_quit(self, argument: str) -> None:
        self._send("221 2.0.0 Bye")
        self._lose()

    _handlers: dict[str, Callable[[ScriptedSMTPServer, str], None]] = {
        "EHLO": _smtp_ehlo,
        "HELO": _smtp_helo,
        "STARTTLS": _smtp_starttls,
        "AUTH": _smtp_auth,
        "MAIL": _smtp_mail,
        "RCPT": _smtp_rcpt,
        "DATA": _smtp_data,
        "BDAT": _smtp_bdat,
        "RSET": _smtp_rset,
        "NOOP": _smtp_noop,
        "VRFY": _smtp_vrfy,
        "QUIT": _smtp_quit,
    }

    # -- AUTH dialogue --------------------------------------------------------

    def _decode_sasl(self, text: bytes) -> bytes | None:
        if text == b"=":
            return b""
        try:
            return base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError):
            self._end_auth("501 5.5.2 Cannot decode response")
            return None

    def _auth_response(self, line: bytes) -> None:
        if line == b"*":
            self._end_auth("501 5.0.0 Authentication cancelled")
            return
        response = self._decode_sasl(line)
        if response is not None:
            self._auth_step(lambda exchange: exchange.send(response))

    def _auth_step(self, advance: Callable[[SaslDialogue], bytes]) -> None:
        exchange = self._auth
        if exchange is None:
            return
        try:
            challenge = advance(exchange)
        except StopIteration as done:
            user: str | None = done.value
            if user is None:
                log.info(
                    "test SMTP session {session}: AUTH {mechanism} failed",
                    session=self.session.number,
                    mechanism=self._auth_mechanism,
                )
                self._end_auth("535 5.7.8 Authentication credentials invalid")
            else:
                log.info(
                    "test SMTP session {session}: AUTH {mechanism} succeeded",
                    session=self.session.number,
                    mechanism=self._auth_mechanism,
                )
                self.authenticated_as = user
                self._end_auth("235 2.7.0 Authentication successful")
            return
        self._send("334 " + base64.b64encode(challenge).decode("ascii"))

    def _end_auth(self, reply: str) -> None:
        self._auth = None
        self._send(reply)

    def rawDataReceived(self, data: bytes) -> None:
        take = data[: self._txn.chunk_left]
        self._record("C", take)
        self._txn.chunk_left -= len(take)
        self._txn.data_size += len(take)
        if self._txn.data_size > self._settings.max_size:
            self._txn.too_big = True
            self._txn.data.clear()
        elif take:
            self._txn.data.append(take)
        if self._txn.chunk_left:
            return
        rest = data[len(take) :]
        self._end_chunk()
        self.setLineMode(rest)  # type: ignore[no-untyped-call]

    def _end_chunk(self) -> None:
        rule = self._script.take("BDAT", self._txn.bdat_argument)
        if rule is not None:
            # A failed chunk fails the transaction (RFC 3030 section 3).
            self._reset_transaction()
            self._apply(rule)
        elif "CHUNKING" not in self._extensions():
            self._reset_transaction()
            self._send("502 5.5.1 BDAT without CHUNKING")
        elif self._txn.sender is None or not self._txn.recipients:
            self._reset_transaction()
            self._send("503 5.5.1 Error: need MAIL and RCPT before BDAT")
        elif self._txn.last_chunk:
            self._end_data()
        else:
            self._send(f"250 2.0.0 {self._txn.data_size} octets received")

    # -- DATA -----------------------------------------------------------------

    def _data_line(self, line: bytes) -> None:
        if line == b".":
            self._end_data()
            return
        if line.startswith(b"."):
            line = line[1:]
        self._txn.data_size += len(line) + 2
        if self._txn.data_size > self._settings.max_size:
            # Keep reading to the final dot, but stop keeping the content.
            self._txn.too_big = True
            self._txn.data.clear()
        else:
            self._txn.data.append(line + b"\r\n")

    def _end_data(self) -> None:
        self._txn.in_data = False
        self.MAX_LENGTH = _COMMAND_LINE_LIMIT
        content = b"".join(self._txn.data)
        rule = self._script.take("DATA_END", content.decode("utf-8", "replace"))
        if rule is not None:
            self._reset_transaction()
            self._apply(rule)
            return
        if self._txn.too_big:
            self._reset_transaction()
            self._send("552 5.3.4 Message size exceeds fixed maximum message size")
            return
        assert self._txn.sender is not None
        connection = self._tls_connection()
        message = ReceivedMessage(
            sender=self._txn.sender,
            recipients=tuple(self._txn.recipients),
            data=content,
            tls=self.tls_active,
            tls_version=(
                connection.get_protocol_version_name() if connection else None
            ),
            authenticated_as=self.authenticated_as,
            helo=self.helo,
            queue_id=self.factory._next_queue_id(),
            mail_options=self._txn.mail_options,
            recipient_options=tuple(self._txn.recipient_options),
            session=self.session.number,
        )
        self._reset_transaction()
        log.info(
            "test SMTP session {session}: queued {queue_id} from <{sender}> "
            "for {count} recipient(s)",
            session=self.session.number,
            queue_id=message.queue_id,
            sender=message.sender,
            count=len(message.recipients),
        )
        self._send(f"250 2.0.0 Ok: queued as {message.queue_id}")
        self.factory._message_received(message)

    # -- helpers --------------------------------------------------------------

    def _extensions(self) -> list[str]:
        override = (
            self._script.post_tls_extensions
            if self.tls_active
            else self._script.pre_tls_extensions
        )
        if override is not None:
            return list(override)
        settings = self._settings
        extensions = ["PIPELINING", f"SIZE {settings.max_size}"]
        if settings.tls_options is not None and not self.tls_active:
            extensions.append("STARTTLS")
        if settings.mechanisms and (
            self.tls_active or not settings.require_tls_for_auth
        ):
            extensions.append("AUTH " + " ".join(settings.mechanisms))
        extensions += ["8BITMIME", "SMTPUTF8", "ENHANCEDSTATUSCODES", "DSN"]
        return extensions

    def _check_esmtp(self, param: str) -> None:
        if not self.esmtp:
            raise _Reject("555 5.5.4 ESMTP parameters need EHLO")
        if any(ord(char) < 0x21 or ord(char) == 0x7F for char in param):
            raise _Reject("501 5.5.4 Bad parameter syntax")

    def _reset_transaction(self) -> None:
        self._txn = _Transaction()

    def _start_tls(self) -> None:
        options = self._settings.tls_options
        if options is None:
            log.error(
                "test SMTP session {session}: script asked for TLS but the "
                "server has no TLS options; aborting",
                session=self.session.number,
            )
            self._abort()
            return
        # CVE-2011-0411: whatever the client pipelined behind STARTTLS was
        # sent in clear text and must not be run inside the TLS session.
        discarded = self.clearLineBuffer()  # type: ignore[no-untyped-call]
        if discarded:
            log.warn(
                "test SMTP session {session}: discarded {count} bytes pipelined "
                "after STARTTLS",
                session=self.session.number,
                count=len(discarded),
            )
            self.session.discarded_after_starttls += discarded
        assert self.transport is not None
        self.transport.startTLS(options)  # type: ignore[attr-defined]
        self.tls_active = self.session.tls = True
        # RFC 3207 4.2: forget everything learnt from the client before TLS.
        self.helo, self.esmtp, self.authenticated_as = None, False, None
        self._auth = None
        self._reset_transaction()

    def _apply(self, rule: ScriptRule) -> None:
        if rule.data:
            self._send_raw(rule.data)
        if rule.start_tls:
            self._start_tls()
        if rule.abort:
            self._abort()
        elif rule.close:
            self._lose()

    def _send(self, reply: str) -> None:
        self._send_raw(reply_bytes(reply))

    def _send_raw(self, data: bytes) -> None:
        self._record("S", data)
        assert self.transport is not None
        self.transport.write(data)

    def _record(self, direction: Direction, data: bytes) -> None:
        self.session.transcript.append((direction, data))

    def _lose(self) -> None:
        assert self.transport is not None
        self.transport.loseConnection()

    def _abort(self) -> None:
        assert self.transport is not None
        self.transport.abortConnection()  # type: ignore[attr-defined]

    def _tls_connection(self) -> SSL.Connection | None:
        get_handle = getattr(self.transport, "getHandle", None)
        if get_handle is None:
            return None
        handle = get_handle()
        return handle if isinstance(handle, SSL.Connection) else None


class ScriptedSMTPServerFactory(Factory[ScriptedSMTPServer]):
    """Builds :class:`ScriptedSMTPServer` sessions and keeps what they saw.

    ``tls_options`` enables STARTTLS (``CertificateOptions`` or any
    ``IOpenSSLServerConnectionCreator``). ``implicit_tls`` starts TLS as soon
    as a client connects, port-465 style, on any transport; a listener on an
    ``ssl:`` endpoint works too, with ``implicit_tls`` left False.
    ``require_tls_for_auth`` hides and refuses AUTH before TLS.
    """

    noisy = False

    def __init__(
        self,
        *,
        hostname: str = DEFAULT_HOSTNAME,
        tls_options: IOpenSSLServerConnectionCreator | None = None,
        implicit_tls: bool = False,
        max_size: int = DEFAULT_MAX_SIZE,
        users: Mapping[str, str] | None = None,
        tokens: Mapping[str, str] | None = None,
        require_auth: bool = False,
        require_tls_for_auth: bool = True,
        script: ServerScript | None = None,
    ) -> None:
        if implicit_tls and tls_options is None:
            raise ValueError("implicit_tls needs tls_options")
        self.settings = _Settings(
            hostname=hostname,
            tls_options=tls_options,
            implicit_tls=implicit_tls,
            max_size=max_size,
            users=dict(users or {}),
            tokens=dict(tokens or {}),
            require_auth=require_auth,
            require_tls_for_auth=require_tls_for_auth,
        )
        self.script = script if script is not None else ServerScript()
        self.messages: list[ReceivedMessage] = []
        self.sessions: list[SessionLog] = []
        self.live: set[ScriptedSMTPServer] = set()
        self._queue_ids = itertools.count(1)
        self._session_numbers = itertools.count(1)
        self._message_waiters: list[tuple[int, Deferred[list[ReceivedMessage]]]] = []

    def buildProtocol(self, addr: IAddress | None) -> ScriptedSMTPServer:
        host = getattr(addr, "host", None)
        peer = f"{host}:{getattr(addr, 'port', 0)}" if host else "unknown"
        session = SessionLog(number=next(self._session_numbers), peer=peer)
        return ScriptedSMTPServer(self, session)

    def wait_for_messages(self, count: int) -> Deferred[list[ReceivedMessage]]:
        """Fire with the first ``count`` messages once that many arrived."""
        if len(self.messages) >= count:
            return defer.succeed(self.messages[:count])
        waiter: Deferred[list[ReceivedMessage]] = Deferred()
        self._message_waiters.append((count, waiter))
        return waiter

    def transcripts(self) -> list[list[tuple[Direction, bytes]]]:
        """Each connection's transcript, in connection order."""
        return [session.transcript for session in self.sessions]

    def _open_session(self, protocol: ScriptedSMTPServer) -> None:
        self.sessions.append(protocol.session)
        self.live.add(protocol)

    def _close_session(self, protocol: ScriptedSMTPServer) -> None:
        self.live.discard(protocol)
        protocol.session._close()

    def _next_queue_id(self) -> str:
        return f"TX{next(self._queue_ids):08X}"

    def _message_received(self, message: ReceivedMessage) -> None:
        self.messages.append(message)
        ready = [(n, d) for n, d in self._message_waiters if len(self.messages) >= n]
        self._message_waiters = [
            (n, d) for n, d in self._message_waiters if len(self.messages) < n
        ]
        for count, waiter in ready:
            waiter.callback(self.messages[:count])
