"""The relay's ESMTP listener: our own LineReceiver, not twisted.mail.smtp.

Legacy programs on this host hand their mail to it; it accepts a message
only once the queue has it on disk. The protocol enforces, whatever the
client does:

* bytes pipelined behind STARTTLS are discarded, never run, and TLS starts a
  new session (CVE-2011-0411, RFC 3207 section 4.2);
* AUTH exists only inside TLS, failed attempts are slowed down and limited,
  and credentials never reach a log;
* only CRLF.CRLF ends DATA, a message with a bare CR or LF or an over-long
  line is read to its real end and refused whole (SMTP smuggling);
* a client outside the allowed networks relays nothing unless authenticated;
* replies stay in order: no further command is read while the store works.

Pipelining rules (RFC 2920, after Postfix's ``smtpd_forbid_unauth_pipelining``):
a command with more bytes already received behind it gets ``554 5.5.0`` and
the connection is closed, without running the command, when

* PIPELINING is not in effect (no EHLO yet in this session, or HELO was
  used), for every command except QUIT and STARTTLS; or
* PIPELINING is in effect and the command must end its group: EHLO, HELO,
  DATA, NOOP, VRFY, and AUTH without an initial response (its next line is
  a SASL response, not a command).

STARTTLS is never a synchronisation error: what follows it is discarded.
Bytes after the final dot of DATA are allowed (RFC 2920 section 3.1).

Choices where the RFCs leave room:

* a trusted client's source route (``<@hop:user@domain>``) is accepted and
  the route ignored (RFC 5321 section 4.1.1.3); an untrusted client gets
  ``554 5.7.1`` before the path is even parsed;
* UNIX socket clients count as local (the socket's permissions admit them);
* a DATA line over 998 octets is answered ``500 5.5.2`` after the real end
  (RFC 5321 section 4.5.3.1.10 names "500 Line too long" for it); when
  several faults occur, a bare CR/LF (550) wins over a long line (500) over
  the size limit (552);
* AUTH lines, initial response included, obey the 512-octet command limit;
* a wrong password counts towards ``max_auth_failures``; malformed or
  cancelled exchanges do not, as no credential was tried;
* on shutdown a message the store is already writing is durable, so it is
  answered 250 before the 421; a message still arriving is never answered.

The session lives here; the rules for MAIL and RCPT arguments are in
:mod:`txstarttls.smtp_arguments` and the SASL exchange is in
:mod:`txstarttls.sasl_server`, both pure.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal, cast

from OpenSSL import SSL
from twisted.cred.credentials import UsernamePassword
from twisted.cred.error import UnauthorizedLogin, UnhandledCredentials
from twisted.cred.portal import Portal
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.defer import Deferred, DeferredList, maybeDeferred, succeed
from twisted.internet.interfaces import (
    IAddress,
    IDelayedCall,
    IHandshakeListener,
    IOpenSSLServerConnectionCreator,
    IPushProducer,
    IReactorTime,
    ITCPTransport,
    ITLSTransport,
    ITransport,
)
from twisted.internet.protocol import ServerFactory, connectionDone
from twisted.logger import Logger
from twisted.protocols.basic import LineReceiver
from twisted.python.failure import Failure
from zope.interface import implementer

from txstarttls.data import MAX_LINE_OCTETS, DataDecoder
from txstarttls.metrics import NullMetrics, RelayMetrics
from txstarttls.policy import (
    DEFAULT_ALLOWED_NETWORKS,
    Network,
    client_allowed,
    relay_decision,
)
from txstarttls.queue import (
    IMessageStore,
    QueueEntry,
    RecipientState,
    StoreError,
    new_queue_id,
)
from txstarttls.received import TLSDetails, received_header, transmission_type
from txstarttls.reply import sanitise
from txstarttls.sasl_server import (
    MECHANISMS,
    Challenge,
    Rejected,
    SaslExchange,
    shown_username,
)
from txstarttls.smtp_arguments import (
    Refusal,
    mail_parameters,
    mail_path,
    rcpt_parameters,
    rcpt_path,
    recipient_address,
    sender_address,
)
from txstarttls.userdb import IRelayUser
from txstarttls.write_now import write_now

__all__ = ["DEFAULT_MAX_SIZE", "ListenerSettings", "RelayServer", "RelayServerFactory"]

log = Logger()

# Postfix's message_size_limit.
DEFAULT_MAX_SIZE = 10_240_000
_MAX_HELO = 255

_CONTROL = re.compile(r"[\x00-\x1f\x7f]")

# RFC 2920 section 3.1: commands that must end a pipelined group.
_LAST_IN_GROUP = frozenset({"EHLO", "HELO", "DATA", "NOOP", "VRFY"})
# Browsers and proxies tricked into talking to us (cross-protocol attacks).
_FOREIGN_COMMANDS = frozenset({"GET", "POST", "HEAD", "PUT", "CONNECT"})
_HELP_TEXT = "Commands: EHLO HELO MAIL RCPT DATA RSET NOOP QUIT VRFY HELP STARTTLS AUTH"


@dataclass(frozen=True, slots=True)
class ListenerSettings:
    """How one listener behaves; the service builds one per endpoint."""

    hostname: str
    tls_options: IOpenSSLServerConnectionCreator | None = None
    implicit_tls: bool = False
    allowed_networks: tuple[Network, ...] = DEFAULT_ALLOWED_NETWORKS
    max_size: int = DEFAULT_MAX_SIZE
    max_recipients: int = 1000
    bare_line_endings: Literal["reject", "normalize"] = "reject"
    max_line_length: int = 512
    idle_timeout: float = 300.0
    auth_failure_delay: float = 1.0
    max_auth_failures: int = 3
    greet_pause: float = 0.0

    def __post_init__(self) -> None:
        if not self.hostname or not self.hostname.isascii():
            raise ValueError("hostname must be a non-empty ASCII host name")
        if _CONTROL.search(self.hostname) or " " in self.hostname:
            raise ValueError("hostname must not contain spaces or control characters")
        if self.bare_line_endings not in ("reject", "normalize"):
            raise ValueError("bare_line_endings must be 'reject' or 'normalize'")
        if self.max_size < 1 or self.max_recipients < 1:
            raise ValueError("max_size and max_recipients must be positive")
        if self.max_line_length < 512:
            raise ValueError("max_line_length must be at least 512 (RFC 5321)")
        if self.idle_timeout <= 0 or self.auth_failure_delay < 0:
            raise ValueError("idle_timeout must be positive, auth_failure_delay >= 0")
        if self.max_auth_failures < 1 or self.greet_pause < 0:
            raise ValueError("max_auth_failures >= 1 and greet_pause >= 0 required")


@dataclass(slots=True)
class _Transaction:
    """The envelope collected between MAIL and the end of DATA."""

    queue_id: str
    sender: str
    mail_parameters: tuple[str, ...]
    smtputf8: bool
    recipients: list[RecipientState] = field(default_factory=list)


def _peer_ip(address: IAddress) -> str | None:
    if isinstance(address, IPv4Address | IPv6Address):
        return address.host
    return None


def _label(ip: str | None) -> str:
    return "[unix]" if ip is None else f"[{ip}]"


@implementer(IHandshakeListener)
class RelayServer(LineReceiver):
    """One client session. See the module docstring for the rules it keeps."""

    def __init__(self, factory: RelayServerFactory) -> None:
        self.factory = factory
        self._settings = factory.settings
        self.MAX_LENGTH = self._settings.max_line_length - 2
        self._clock = factory.clock
        self._ip: str | None = None
        self._label = "[unknown]"
        self._trusted = False
        self._tls = False
        self._tls_details: TLSDetails | None = None
        self._helo: str | None = None
        self._esmtp = False
        self._auth_user: str | None = None
        self._auth_failures = 0
        self._sasl: SaslExchange | None = None
        self._transaction: _Transaction | None = None
        self._decoder: DataDecoder | None = None
        self._chunks: list[bytes] = []
        self._storing = False
        self._discarding = False
        self._greeting_pending = False
        self._closing = False
        self._closed = False
        self._shutdown_requested = False
        self._idle_call: IDelayedCall | None = None
        self._greeting_call: IDelayedCall | None = None
        self._auth_delay_call: IDelayedCall | None = None
        self._current: str | None = None
        self._last_command = "CONNECT"
        self._counts: dict[str, list[int]] = {}
        self._lost_waiters: list[Deferred[None]] = []
        self._handler_table: dict[str, Callable[[str], None]] = {
            "EHLO": self._ehlo,
            "HELO": self._helo_command,
            "MAIL": self._mail,
            "RCPT": self._rcpt,
            "DATA": self._data,
            "RSET": self._rset,
            "NOOP": self._noop,
            "QUIT": self._quit,
            "VRFY": self._vrfy,
            "HELP": self._help,
            "STARTTLS": self._starttls,
            "AUTH": self._auth,
        }

    # -- information for the service and for tests -------------------------------

    @property
    def tls_active(self) -> bool:
        return self._tls

    @property
    def authenticated_as(self) -> str | None:
        return self._auth_user

    # -- connection lifecycle ----------------------------------------------------

    def _transport(self) -> ITransport:
        assert self.transport is not None
        return self.transport

    def connectionMade(self) -> None:
        transport = self._transport()
        self._ip = _peer_ip(transport.getPeer())
        self._label = _label(self._ip)
        self._trusted = client_allowed(self._ip, self._settings.allowed_networks)
        self._tls = self._settings.implicit_tls
        self.factory._connected(self)
        log.info("connect from {client}", client=self._label)
        self._touch()
        if self.factory.shutting_down:
            self._reply(421, "4.3.2", "Service shutting down")
            self._close()
        elif self._settings.greet_pause > 0:
            self._greeting_pending = True
            self._greeting_call = self._clock.callLater(
                self._settings.greet_pause, self._greet
            )
        else:
            self._greet()

    def _greet(self) -> None:
        self._greeting_call = None
        self._greeting_pending = False
        # RFC 2034: the greeting carries no enhanced status code.
        self._write_lines(220, [f"{self._settings.hostname} ESMTP txstarttls"])

    def handshakeCompleted(self) -> None:
        self._tls_details = self._read_tls_details()
        details = self._tls_details
        self.factory.metrics.inbound_tls(details.version if details else "unknown")
        log.info(
            "TLS connection established from {client}: {version} with cipher {cipher}",
            client=self._label,
            version=details.version if details else "unknown",
            cipher=details.cipher if details else "unknown",
        )

    def _read_tls_details(self) -> TLSDetails | None:
        get_handle = getattr(self.transport, "getHandle", None)
        handle = get_handle() if get_handle is not None else None
        if not isinstance(handle, SSL.Connection):
            return None
        version = handle.get_protocol_version_name()
        cipher = handle.get_cipher_name()
        bits = handle.get_cipher_bits()
        return TLSDetails(version, cipher or "unknown", bits)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._closed = True
        self._closing = True
        for call in (self._idle_call, self._greeting_call, self._auth_delay_call):
            if call is not None and call.active():
                call.cancel()
        self._idle_call = self._greeting_call = self._auth_delay_call = None
        if isinstance(reason.value, SSL.Error) and self._tls_details is None:
            log.info(
                "TLS handshake failed with {client}: {error}",
                client=self._label,
                error=str(reason.value),
            )
        if self._decoder is not None:
            log.info(
                "lost connection after DATA from {client}; message discarded",
                client=self._label,
            )
            self._decoder = None
            self._chunks = []
        self.factory._disconnected(self)
        log.info(
            "disconnect from {client} {counts}",
            client=self._label,
            counts=self._format_counts(),
        )
        waiters, self._lost_waiters = self._lost_waiters, []
        for waiter in waiters:
            waiter.callback(None)

    def _close(self) -> None:
        """Stop reading anything more and hang up once the replies are out."""
        self._closing = True
        self._buffer = b""
        if self._auth_delay_call is not None and self._auth_delay_call.active():
            self._auth_delay_call.cancel()
        self._auth_delay_call = None
        self._transport().loseConnection()

    def shutdown(self) -> Deferred[None]:
        """Say 421 4.3.2 and close; fires once the connection is gone.

        A message still being received is never acknowledged. A message the
        store is already writing is durable, so it gets its 250 first.
        """
        if self._closed:
            return succeed(None)
        waiter: Deferred[None] = Deferred()
        self._lost_waiters.append(waiter)
        if self._closing:
            return waiter
        self._shutdown_requested = True
        if not self._storing:
            self._say_shutdown()
        return waiter

    def _say_shutdown(self) -> None:
        if self._decoder is not None:
            log.info(
                "shutdown during DATA from {client}; message not accepted",
                client=self._label,
            )
            self._decoder = None
            self._chunks = []
        self._sasl = None
        self._reply(421, "4.3.2", "Service shutting down")
        self._close()

    def abort(self) -> None:
        """Drop the connection now (a client that does not let us close)."""
        if not self._closed:
            self._closing = True
            cast(ITCPTransport, self._transport()).abortConnection()

    # -- timers ------------------------------------------------------------------

    def _touch(self) -> None:
        if self._closing:
            return
        if self._idle_call is not None and self._idle_call.active():
            self._idle_call.reset(self._settings.idle_timeout)
        else:
            self._idle_call = self._clock.callLater(
                self._settings.idle_timeout, self._idle_timeout
            )

    def _idle_timeout(self) -> None:
        self._idle_call = None
        if self._closing:
            return
        if self._storing:
            # Our own slowness is no reason to drop the client.
            self._touch()
            return
        log.info(
            "timeout after {command} from {client}",
            command=self._last_command,
            client=self._label,
        )
        self._reply(421, "4.4.2", "Error: timeout exceeded")
        self._close()

    # -- reading -----------------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        if self._closing:
            return
        self._touch()
        if self._greeting_pending:
            # The client talked before our greeting: not an SMTP client.
            log.warn("pregreet input from {client}", client=self._label)
            self._greeting_pending = False
            if self._greeting_call is not None and self._greeting_call.active():
                self._greeting_call.cancel()
            self._greeting_call = None
            self._reply(554, "5.5.0", "Error: SMTP protocol synchronization")
            self._close()
            return
        self._buffer += data
        self._drain()

    def _drain(self) -> None:
        """Process whatever is buffered until paused, closed or out of bytes."""
        if self._busyReceiving:
            return
        self._busyReceiving = True
        try:
            while self._buffer and not self.paused and not self._closing:
                if self.line_mode:
                    if not self._next_line():
                        break
                else:
                    data, self._buffer = self._buffer, b""
                    self.rawDataReceived(data)
        finally:
            self._busyReceiving = False

    def _next_line(self) -> bool:
        """Handle one complete line, if any; False when more bytes are needed."""
        buffer = self._buffer
        end = buffer.find(b"\r\n")
        if self._discarding:
            if end < 0:
                # Keep a CR: it may be the first half of the CRLF.
                self._buffer = b"\r" if buffer.endswith(b"\r") else b""
                return False
            self._buffer = buffer[end + 2 :]
            self._discarding = False
            self._line_too_long()
            return True
        if end < 0:
            if len(buffer.rstrip(b"\r")) > self.MAX_LENGTH:
                self._discarding = True
                self._buffer = b"\r" if buffer.endswith(b"\r") else b""
            return False
        line, self._buffer = buffer[:end], buffer[end + 2 :]
        if len(line) > self.MAX_LENGTH:
            self._line_too_long()
        else:
            self.lineReceived(line)
        return True

    def _line_too_long(self) -> None:
        self._current = "unknown"
        if self._sasl is not None:
            self._sasl = None
            self._current = "auth"
        self._reply(500, "5.5.2", "Error: line too long")

    def lineReceived(self, line: bytes) -> None:
        if self._sasl is not None:
            self._sasl_response(line)
            return
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError:
            self._current = "unknown"
            self._reply(500, "5.5.2", "Error: bad UTF-8 syntax")
            return
        if _CONTROL.search(text):
            self._current = "unknown"
            self._reply(500, "5.5.2", "Error: control characters in command")
            return
        verb, _, argument = text.strip(" ").partition(" ")
        verb = verb.upper()
        argument = argument.strip(" ")
        handler = self._handler_table.get(verb)
        if handler is None:
            self._unknown_command(verb)
            return
        self._current = verb.lower()
        self._last_command = verb
        if self._buffer and self._pipelining_violation(verb, argument):
            log.warn(
                "improper command pipelining after {command} from {client}",
                command=verb,
                client=self._label,
            )
            self._reply(554, "5.5.0", "Error: SMTP protocol synchronization")
            self._close()
            return
        try:
            handler(argument)
        except Refusal as refusal:
            self._reply(refusal.code, refusal.enhanced, refusal.text)
        except Exception:
            log.failure(
                "internal error in {command} from {client}",
                command=verb,
                client=self._label,
            )
            self._reply(421, "4.3.0", "Error: internal error, closing")
            self._close()

    def _unknown_command(self, verb: str) -> None:
        self._current = "unknown"
        if verb in _FOREIGN_COMMANDS:
            log.warn("non-SMTP command from {client}", client=self._label)
            self._reply(521, "5.7.0", "Error: not an SMTP client")
            self._close()
            return
        # The text is not logged: it may be a SASL response sent too early.
        self._reply(500, "5.5.2", "Error: command not recognized")

    def _pipelining_violation(self, verb: str, argument: str) -> bool:
        if verb in ("QUIT", "STARTTLS"):
            return False
        if not self._esmtp:
            return True
        if verb == "AUTH":
            return len(argument.split()) < 2
        return verb in _LAST_IN_GROUP

    # -- writing -----------------------------------------------------------------

    def _reply(self, code: int, enhanced: str, text: str) -> None:
        self._write_lines(code, [f"{enhanced} {text}"])

    def _write_lines(self, code: int, lines: list[str]) -> None:
        if self._closing or self._closed:
            return
        self._count_reply(code)
        last = len(lines) - 1
        wire = "".join(
            f"{code}{' ' if index == last else '-'}{line}\r\n"
            for index, line in enumerate(lines)
        )
        write_now(self._transport(), wire.encode("utf-8"))

    def _count_reply(self, code: int) -> None:
        name = self._current
        if name is None or 300 <= code < 400:
            return
        self._current = None
        counts = self._counts.setdefault(name, [0, 0])
        counts[1] += 1
        if code < 400:
            counts[0] += 1

    def _format_counts(self) -> str:
        parts = []
        ok = total = 0
        for name, (good, all_) in self._counts.items():
            parts.append(f"{name}={good}" if good == all_ else f"{name}={good}/{all_}")
            ok += good
            total += all_
        parts.append(f"commands={ok}" if ok == total else f"commands={ok}/{total}")
        return " ".join(parts)

    # -- pausing while the store or the password checker works -------------------

    def _pause(self) -> None:
        self.paused = True
        transport = self.transport
        if transport is not None and IPushProducer.providedBy(transport):
            cast(IPushProducer, transport).pauseProducing()

    def _resume(self) -> None:
        if self._closing:
            return
        self.paused = False
        transport = self.transport
        if transport is not None and IPushProducer.providedBy(transport):
            cast(IPushProducer, transport).resumeProducing()
        self._touch()
        self._drain()

    # -- session state -----------------------------------------------------------

    def _reset_transaction(self) -> None:
        self._transaction = None
        self._decoder = None
        self._chunks = []

    def _reset_session(self) -> None:
        """After STARTTLS: nothing learnt in plaintext survives (RFC 3207 4.2)."""
        self._reset_transaction()
        self._helo = None
        self._esmtp = False
        self._auth_user = None
        self._sasl = None

    @property
    def _auth_offered(self) -> bool:
        return self.factory.portal is not None and self._tls

    @property
    def _starttls_offered(self) -> bool:
        return self._settings.tls_options is not None and not self._tls

    # -- commands ----------------------------------------------------------------

    def _ehlo(self, argument: str) -> None:
        self._greeting_argument(argument, "EHLO")
        self._esmtp = True
        settings = self._settings
        lines = [
            settings.hostname,
            "PIPELINING",
            f"SIZE {settings.max_size}",
        ]
        if self._starttls_offered:
            lines.append("STARTTLS")
        if self._auth_offered:
            lines.append("AUTH " + " ".join(MECHANISMS))
        lines += ["ENHANCEDSTATUSCODES", "8BITMIME", "DSN", "SMTPUTF8"]
        # RFC 2034: EHLO replies carry no enhanced status codes.
        self._write_lines(250, lines)

    def _helo_command(self, argument: str) -> None:
        self._greeting_argument(argument, "HELO")
        self._esmtp = False
        self._write_lines(250, [self._settings.hostname])

    def _greeting_argument(self, argument: str, verb: str) -> None:
        if not argument or len(argument) > _MAX_HELO:
            raise Refusal(501, "5.5.4", f"Syntax: {verb} hostname")
        # RFC 5321 section 4.1.4: EHLO and HELO also reset the transaction.
        self._reset_transaction()
        self._helo = argument

    def _mail(self, argument: str) -> None:
        if self._helo is None:
            raise Refusal(503, "5.5.1", "Error: send HELO/EHLO first")
        if self._transaction is not None:
            raise Refusal(503, "5.5.1", "Error: nested MAIL command")
        path, rest = mail_path(argument)
        parameters, smtputf8 = mail_parameters(
            rest,
            esmtp=self._esmtp,
            max_size=self._settings.max_size,
            auth_offered=self._auth_offered,
        )
        sender = sender_address(path, smtputf8=smtputf8)
        queue_id = self.factory.new_queue_id()
        self._transaction = _Transaction(queue_id, sender, parameters, smtputf8)
        if self._auth_user is not None:
            log.info(
                "{queue_id}: client={client}, sasl_username={user}",
                queue_id=queue_id,
                client=self._label,
                user=self._auth_user,
            )
        else:
            log.info(
                "{queue_id}: client={client}", queue_id=queue_id, client=self._label
            )
        self._reply(250, "2.1.0", "Ok")

    def _rcpt(self, argument: str) -> None:
        transaction = self._transaction
        if transaction is None:
            raise Refusal(503, "5.5.1", "Error: need MAIL command")
        path, rest = rcpt_path(argument)
        decision = relay_decision(
            client_trusted=self._trusted,
            authenticated=self._auth_user is not None,
            recipient=path,
        )
        if not decision.allowed:
            log.info(
                "{queue_id}: reject RCPT from {client}: {reason}",
                queue_id=transaction.queue_id,
                client=self._label,
                reason=decision.reason,
            )
            raise Refusal(554, "5.7.1", "Relay access denied")
        if len(transaction.recipients) >= self._settings.max_recipients:
            raise Refusal(452, "4.5.3", "Too many recipients")
        recipient = recipient_address(path, smtputf8=transaction.smtputf8)
        notify, orcpt = rcpt_parameters(
            rest, esmtp=self._esmtp, smtputf8=transaction.smtputf8
        )
        if all(r.address != recipient for r in transaction.recipients):
            transaction.recipients.append(
                RecipientState(recipient, notify=notify, orcpt=orcpt)
            )
        self._reply(250, "2.1.5", "Ok")

    def _data(self, argument: str) -> None:
        if argument:
            raise Refusal(501, "5.5.4", "Syntax: DATA (no parameters)")
        transaction = self._transaction
        if transaction is None:
            raise Refusal(503, "5.5.1", "Error: need MAIL command")
        if not transaction.recipients:
            # RFC 2920 section 3.1: DATA after all RCPTs failed.
            raise Refusal(554, "5.5.1", "Error: no valid recipients")
        self._decoder = DataDecoder(
            bare_line_endings=self._settings.bare_line_endings,
            max_line_octets=MAX_LINE_OCTETS,
            max_size=self._settings.max_size,
        )
        self._chunks = []
        self._write_lines(354, ["End data with <CR><LF>.<CR><LF>"])
        self.line_mode = 0

    def rawDataReceived(self, data: bytes) -> None:
        decoder = self._decoder
        if decoder is None:
            # Shut down mid-DATA: nothing more is read.
            return
        content = decoder.feed(data)
        refused = (
            decoder.line_too_long
            or decoder.size_exceeded
            or (
                decoder.bare_line_ending_seen
                and self._settings.bare_line_endings == "reject"
            )
        )
        if refused:
            # It will be refused whole; keep no more of it in memory.
            self._chunks = []
        elif content:
            self._chunks.append(content)
        if decoder.done:
            # Bytes after the terminator are the next commands (RFC 2920).
            self._buffer = decoder.remainder + self._buffer
            self.line_mode = 1
            self._end_of_data(decoder)

    def _end_of_data(self, decoder: DataDecoder) -> None:
        transaction = self._transaction
        self._decoder = None
        chunks, self._chunks = self._chunks, []
        assert transaction is not None
        if decoder.bare_line_ending_seen and self._settings.bare_line_endings == (
            "reject"
        ):
            # SMTP smuggling (SECURITY-CASES 20): refuse the message whole.
            log.warn(
                "{queue_id}: bare CR or LF in DATA from {client}; message refused",
                queue_id=transaction.queue_id,
                client=self._label,
            )
            self._reset_transaction()
            self._reply(550, "5.5.2", "Message contains bare CR or LF")
            return
        if decoder.line_too_long:
            # RFC 5321 section 4.5.3.1.10 gives "500 Line too long" for this.
            self._reset_transaction()
            self._reply(
                500, "5.5.2", f"Message line too long (over {MAX_LINE_OCTETS} octets)"
            )
            return
        if decoder.size_exceeded:
            self._reset_transaction()
            self._reply(552, "5.3.4", "Message too big for system")
            return
        self._store(transaction, chunks)

    def _store(self, transaction: _Transaction, chunks: list[bytes]) -> None:
        recipients = tuple(transaction.recipients)
        now = self._clock.seconds()
        header = received_header(
            helo=self._helo or "unknown",
            client_address=self._ip,
            hostname=self._settings.hostname,
            protocol=transmission_type(
                esmtp=self._esmtp,
                tls=self._tls,
                authenticated=self._auth_user is not None,
            ),
            queue_id=transaction.queue_id,
            timestamp=now,
            recipients=tuple(r.address for r in recipients),
            tls=self._tls_details if self._tls else None,
        )
        content = header + b"".join(chunks)
        entry = QueueEntry(
            queue_id=transaction.queue_id,
            sender=transaction.sender,
            recipients=recipients,
            arrival_time=now,
            size=len(content),
            mail_parameters=transaction.mail_parameters,
            client_address=self._ip,
            client_helo=self._helo,
            authenticated_as=self._auth_user,
        )
        self._storing = True
        self._pause()
        stored: Deferred[None] = maybeDeferred(self.factory.store.add, entry, content)
        stored.addCallbacks(
            lambda _: self._stored(entry),
            lambda failure: self._not_stored(entry, failure),
        )

    def _stored(self, entry: QueueEntry) -> None:
        self.factory.metrics.message_received(entry.size)
        log.info(
            "{queue_id}: from=<{sender}>, size={size}, nrcpt={nrcpt} (queue active)",
            queue_id=entry.queue_id,
            sender=entry.sender,
            size=entry.size,
            nrcpt=len(entry.recipients),
        )
        if self._closed:
            log.info(
                "{queue_id}: queued, but {client} left before the reply",
                queue_id=entry.queue_id,
                client=self._label,
            )
        self._after_store(250, "2.0.0", f"Ok: queued as {entry.queue_id}")
        if self.factory.on_queued is not None:
            self.factory.on_queued(entry.queue_id)

    def _not_stored(self, entry: QueueEntry, failure: Failure) -> None:
        if isinstance(failure.value, StoreError):
            log.error(
                "{queue_id}: cannot queue message from {client}: {error}",
                queue_id=entry.queue_id,
                client=self._label,
                error=str(failure.value),
            )
            self._after_store(452, "4.3.1", "Insufficient system storage")
        else:
            log.failure("{queue_id}: queue failure", failure, queue_id=entry.queue_id)
            self._after_store(451, "4.3.0", "Error: queue file write error")

    def _after_store(self, code: int, enhanced: str, text: str) -> None:
        self._storing = False
        self._reset_transaction()
        self._reply(code, enhanced, text)
        if self._shutdown_requested and not self._closing:
            self._say_shutdown()
            return
        self._resume()

    def _rset(self, argument: str) -> None:
        self._reset_transaction()
        self._reply(250, "2.0.0", "Ok")

    def _noop(self, argument: str) -> None:
        self._reply(250, "2.0.0", "Ok")

    def _quit(self, argument: str) -> None:
        self._reply(221, "2.0.0", "Bye")
        self._close()

    def _vrfy(self, argument: str) -> None:
        if not argument:
            raise Refusal(501, "5.5.4", "Syntax: VRFY address")
        self._reply(
            252,
            "2.5.0",
            "Cannot VRFY user, but will accept message and attempt delivery",
        )

    def _help(self, argument: str) -> None:
        self._reply(214, "2.0.0", _HELP_TEXT)

    def _starttls(self, argument: str) -> None:
        if self._tls:
            raise Refusal(503, "5.5.1", "Error: TLS already active")
        options = self._settings.tls_options
        transport = self.transport
        if options is None or not ITLSTransport.providedBy(transport):
            raise Refusal(454, "4.7.0", "TLS not available")
        if argument:
            raise Refusal(501, "5.5.4", "Syntax: STARTTLS (no parameters)")
        self._reply(220, "2.0.0", "Ready to start TLS")
        # CVE-2011-0411: whatever the client sent behind STARTTLS was sent
        # in plaintext and may be an attacker's; it never runs.
        discarded = len(self._buffer)
        self._buffer = b""
        if discarded:
            log.warn(
                "discarded {octets} octets pipelined after STARTTLS from {client}",
                octets=discarded,
                client=self._label,
            )
        self._reset_session()
        self._tls = True
        transport.startTLS(options)

    # -- AUTH (RFC 4954) ---------------------------------------------------------

    def _auth(self, argument: str) -> None:
        if self.factory.portal is None:
            raise Refusal(503, "5.5.1", "Error: authentication not enabled")
        if not self._tls:
            # SECURITY-CASES 19: the argument is neither looked at nor logged.
            raise Refusal(530, "5.7.0", "Must issue a STARTTLS command first")
        if not self._esmtp:
            raise Refusal(503, "5.5.1", "Error: send EHLO first")
        if self._auth_user is not None:
            raise Refusal(503, "5.5.1", "Error: already authenticated")
        if self._transaction is not None:
            raise Refusal(503, "5.5.1", "Error: MAIL transaction in progress")
        words = argument.split()
        if not words or len(words) > 2:
            raise Refusal(501, "5.5.4", "Syntax: AUTH mechanism [initial-response]")
        mechanism = words[0].upper()
        if mechanism not in MECHANISMS:
            raise Refusal(504, "5.5.4", "Unsupported authentication mechanism")
        self._sasl = SaslExchange(mechanism)
        if len(words) == 2:
            # RFC 4954 section 4: "=" is an empty initial response.
            initial = b"" if words[1] == "=" else words[1].encode("ascii")
            self._sasl_response(initial, initial=True)
        else:
            self._write_lines(334, [self._sasl.start().text])

    def _sasl_response(self, line: bytes, *, initial: bool = False) -> None:
        exchange = self._sasl
        assert exchange is not None
        try:
            outcome = exchange.respond(line, initial=initial)
        except Refusal as refusal:
            self._sasl = None
            self._reply(refusal.code, refusal.enhanced, refusal.text)
            return
        if isinstance(outcome, Challenge):
            self._write_lines(334, [outcome.text])
            return
        self._sasl = None
        if isinstance(outcome, Rejected):
            self._auth_failed(outcome.mechanism, outcome.username)
            return
        self._check_credentials(outcome.mechanism, outcome.username, outcome.password)

    def _check_credentials(
        self, mechanism: str, username: bytes, password: bytes
    ) -> None:
        portal = self.factory.portal
        assert portal is not None
        self._pause()
        checked = maybeDeferred(
            portal.login, UsernamePassword(username, password), None, IRelayUser
        )
        checked.addCallbacks(
            lambda result: self._auth_succeeded(mechanism, result[1]),
            lambda failure: self._auth_error(mechanism, username, failure),
        )

    def _auth_succeeded(self, mechanism: str, avatar: object) -> None:
        if self._closing:
            return
        name = avatar.decode("utf-8") if isinstance(avatar, bytes) else str(avatar)
        self._auth_user = name
        log.info(
            "{client}: sasl_method={mechanism}, sasl_username={user}",
            client=self._label,
            mechanism=mechanism,
            user=sanitise(name.encode("utf-8")),
        )
        self._reply(235, "2.7.0", "Authentication successful")
        self._resume()

    def _auth_error(self, mechanism: str, username: bytes, failure: Failure) -> None:
        if self._closing:
            return
        if isinstance(failure.value, UnauthorizedLogin | UnhandledCredentials):
            self._auth_failed(mechanism, username)
            return
        log.error(
            "{client}: SASL {mechanism} check failed: {error}",
            client=self._label,
            mechanism=mechanism,
            error=failure.getErrorMessage(),
        )
        self._reply(454, "4.7.0", "Temporary authentication failure")
        self._resume()

    def _auth_failed(self, mechanism: str, username: bytes) -> None:
        """Count, log (user name only) and answer after a delay."""
        self._auth_failures += 1
        self.factory.metrics.auth_failed()
        log.warn(
            "{client}: SASL {mechanism} authentication failed, sasl_username={user}",
            client=self._label,
            mechanism=mechanism,
            user=shown_username(username),
        )
        self._pause()
        self._auth_delay_call = self._clock.callLater(
            self._settings.auth_failure_delay, self._auth_failure_reply
        )

    def _auth_failure_reply(self) -> None:
        self._auth_delay_call = None
        if self._closing:
            return
        if self._auth_failures >= self._settings.max_auth_failures:
            self._reply(421, "4.7.0", "Error: too many failed authentication attempts")
            self._close()
            return
        self._reply(535, "5.7.8", "Authentication credentials invalid")
        self._resume()


class RelayServerFactory(ServerFactory):
    """Builds RelayServer sessions and shuts them all down on request."""

    protocol = RelayServer

    def __init__(
        self,
        settings: ListenerSettings,
        store: IMessageStore,
        clock: IReactorTime,
        *,
        portal: Portal | None = None,
    ) -> None:
        self.settings = settings
        self.store = store
        self.clock = clock
        self.portal = portal
        self.metrics: RelayMetrics = NullMetrics()
        self.on_queued: Callable[[str], None] | None = None
        """Told each new queue id once it is durable (the runner starts it)."""
        self._connections: set[RelayServer] = set()
        self._shutting_down = False

    @property
    def shutting_down(self) -> bool:
        return self._shutting_down

    @property
    def connections(self) -> frozenset[RelayServer]:
        return frozenset(self._connections)

    def new_queue_id(self) -> str:
        return new_queue_id()

    def buildProtocol(self, addr: IAddress | None) -> RelayServer:
        return RelayServer(self)

    def _connected(self, protocol: RelayServer) -> None:
        self._connections.add(protocol)

    def _disconnected(self, protocol: RelayServer) -> None:
        self._connections.discard(protocol)

    def shutdown(self, *, grace: float = 30.0) -> Deferred[None]:
        """Send every client 421 4.3.2 and close; fires when all are gone.

        New connections are greeted with 421 from now on. A client still
        connected ``grace`` seconds later (one that never lets a close
        finish) is dropped, unless its message is still being stored.
        """
        self._shutting_down = True
        waiting = [connection.shutdown() for connection in list(self._connections)]
        done: Deferred[None] = DeferredList(waiting).addCallback(lambda _: None)
        if waiting:
            timer = self.clock.callLater(grace, self._abort_stragglers)
            done.addBoth(_cancel_then_pass(timer))
        return done

    def _abort_stragglers(self) -> None:
        for connection in list(self._connections):
            if not connection._storing:
                connection.abort()


def _cancel_then_pass(call: IDelayedCall) -> Callable[[object], object]:
    def cancel(result: object) -> object:
        if call.active():
            call.cancel()
        return result

    return cancel
