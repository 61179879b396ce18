"""One SMTP session, top to bottom, and ``send()`` for one-shot use.

The order is RFC 5321 with RFC 3207 and 4954 folded in, readable against the
RFCs line by line: greeting, EHLO, STARTTLS, handshake verified, EHLO again,
AUTH, MAIL, RCPT..., DATA, body, QUIT. Every decision that protects the user
(never HELO when TLS is required, never AUTH in plaintext, never a body when no
recipient was accepted) is made here, in plain sight.
"""

from __future__ import annotations

import functools
import inspect
import socket
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import cast

from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.internet.interfaces import IDelayedCall
from twisted.logger import Logger

from txstarttls.address import (
    needs_smtputf8,
    validate_address,
    validate_hostname_argument,
    validate_parameter,
)
from txstarttls.client import ESMTPClient
from txstarttls.dsn import DSNRequest
from txstarttls.errors import (
    AuthenticationFailed,
    ExtensionRequired,
    InvalidArgument,
    LocalError,
    MessageTooLarge,
    PermanentReplyError,
    Phase,
    RecipientsRefused,
    SMTPError,
    Timeout,
    TLSRequired,
    TransientReplyError,
)
from txstarttls.message import PreparedMessage
from txstarttls.reply import Reply
from txstarttls.sasl import Credentials, choose_mechanism
from txstarttls.tls import ClientTLS, TLSInfo, TLSMode
from txstarttls.upstream import Upstream

_log = Logger()

EMPTY_BODY = PreparedMessage.from_bytes(b"")


@dataclass(frozen=True, slots=True)
class RecipientResult:
    """What happened to one recipient."""

    recipient: str
    reply: Reply
    """The reply to the final dot when delivered, else the reply to RCPT."""
    delivered: bool
    trusted: bool = True
    """False when the reply came before verified TLS: it proves nothing."""

    @property
    def is_permanent(self) -> bool:
        """Refused for good: a trusted 5xx."""
        return not self.delivered and self.trusted and self.reply.code >= 500

    @property
    def status(self) -> str:
        """Postfix's word for it: sent, deferred or bounced."""
        if self.delivered:
            return "sent"
        return "bounced" if self.is_permanent else "deferred"

    @property
    def dsn(self) -> str:
        """The enhanced status code, or one derived from the reply class."""
        return self.reply.enhanced or f"{self.reply.code // 100}.0.0"


@dataclass(frozen=True, slots=True)
class SendResult:
    """The outcome of a message that at least one recipient accepted."""

    recipients: tuple[RecipientResult, ...]
    reply: Reply
    tls: TLSInfo | None
    relay: str
    """The peer as Postfix logs it: ``name[address]:port``."""
    setup_seconds: float = 0.0
    """Connecting, TLS and AUTH for this message; 0 on a reused session."""

    @property
    def delivered(self) -> tuple[RecipientResult, ...]:
        return tuple(r for r in self.recipients if r.delivered)

    @property
    def refused(self) -> tuple[RecipientResult, ...]:
        return tuple(r for r in self.recipients if not r.delivered)


@dataclass(frozen=True, slots=True)
class Envelope:
    """The sender, the recipients and ESMTP parameters for MAIL."""

    sender: str
    recipients: tuple[str, ...]
    mail_parameters: tuple[str, ...] = ()
    dsn: DSNRequest | None = None
    """Sent on only when the server offers DSN (RFC 3461)."""
    needs_smtputf8: bool = field(init=False, repr=False, compare=False)
    """Does any address need SMTPUTF8? Worked out once, not per message sent."""

    def __post_init__(self) -> None:
        validate_address(self.sender, allow_null=True)
        if not self.recipients:
            raise InvalidArgument("at least one recipient is needed")
        for recipient in self.recipients:
            validate_address(recipient)
        for parameter in self.mail_parameters:
            keyword, equals, value = parameter.partition("=")
            validate_parameter(keyword, value if equals else None)
        object.__setattr__(
            self,
            "needs_smtputf8",
            any(needs_smtputf8(a) for a in (self.sender, *self.recipients)),
        )


def reply_error(reply: Reply, phase: Phase, *, trusted: bool) -> SMTPError:
    """The typed error for a negative reply.

    An untrusted reply (received before verified TLS while TLS was expected)
    could come from anyone on the path, so it is never a permanent verdict.
    """
    message = f"{phase.value} refused: {reply}"
    if reply.code >= 500 and trusted:
        return PermanentReplyError(
            message,
            code=reply.code,
            enhanced=reply.enhanced,
            text=reply.text,
            phase=phase,
        )
    return TransientReplyError(
        message, code=reply.code, enhanced=reply.enhanced, text=reply.text, phase=phase
    )


BDAT_CHUNK = 1024 * 1024
"""Octets per BDAT command: few round trips, and memory stays bounded."""


class Session:
    """Drives one connected ESMTPClient: open once, then one or more messages."""

    def __init__(
        self, client: ESMTPClient, upstream: Upstream, tls: ClientTLS | None
    ) -> None:
        self.client = client
        self.upstream = upstream
        self.policy = upstream.tls
        self.tls = tls
        self.ehlo_name = upstream.ehlo_name or default_ehlo_name()
        self.plaintext_auth_ok = upstream.allow_plaintext_auth and _is_local_peer(
            client
        )
        client.allow_plaintext_auth = self.plaintext_auth_ok
        self.relay = _describe_peer(client, upstream)
        self.messages_sent = 0
        self._needs_reset = False

    @property
    def trusted(self) -> bool:
        """Are replies authenticated (verified TLS), or was TLS never expected?"""
        return self.client.is_tls_verified or self.policy.mode is TLSMode.NONE

    def check(self, reply: Reply, phase: Phase, *, expect: int = 2) -> Reply:
        if reply.code // 100 != expect:
            raise reply_error(reply, phase, trusted=self.trusted)
        return reply

    async def open(self) -> None:
        """Greeting, EHLO, STARTTLS, EHLO again, AUTH: ready for MAIL."""
        try:
            await self._open()
        except SMTPError as error:
            error.relay = error.relay or self.relay
            raise

    async def _open(self) -> None:
        self.check(await self.client.greeting(), Phase.GREETING)
        ehlo = await self.client.ehlo(self.ehlo_name)
        mode = self.policy.mode
        if ehlo.code != 250:
            wants_auth = self.upstream.credentials is not None
            if mode is TLSMode.REQUIRED or (
                mode is TLSMode.OPPORTUNISTIC
                and wants_auth
                and not self.plaintext_auth_ok
            ):
                # RFC 3207 needs ESMTP; HELO would mean silently giving up TLS.
                raise TLSRequired(
                    f"server refused EHLO ({ehlo}), so STARTTLS is impossible",
                    code=ehlo.code,
                    enhanced=ehlo.enhanced,
                    text=ehlo.text,
                    phase=Phase.EHLO,
                )
            if ehlo.code < 500:
                raise reply_error(ehlo, Phase.EHLO, trusted=self.trusted)
            self.check(await self.client.helo(self.ehlo_name), Phase.HELO)
        if mode in (TLSMode.REQUIRED, TLSMode.OPPORTUNISTIC):
            await self._starttls()
        if self.upstream.credentials is not None:
            await self._authenticate(self.upstream.credentials)

    async def _starttls(self) -> None:
        if not self.client.capabilities.starttls:
            if self.policy.mode is TLSMode.REQUIRED:
                raise TLSRequired(
                    "server does not offer STARTTLS and TLS is required",
                    phase=Phase.EHLO,
                )
            if self.upstream.credentials is not None and not self.plaintext_auth_ok:
                raise TLSRequired(
                    "server does not offer STARTTLS; refusing to send "
                    "credentials in plaintext",
                    phase=Phase.EHLO,
                )
            return
        assert self.tls is not None
        reply = await self.client.starttls(self.tls)
        if reply.code != 220:
            # Whatever the mode: no plaintext continuation after a refusal.
            raise TLSRequired(
                f"server refused STARTTLS: {reply}",
                code=reply.code,
                enhanced=reply.enhanced,
                text=reply.text,
                phase=Phase.STARTTLS,
            )
        self.check(await self.client.ehlo(self.ehlo_name), Phase.EHLO)

    async def _authenticate(self, credentials: Credentials) -> None:
        if not self.client.is_tls_verified and not self.plaintext_auth_ok:
            raise TLSRequired(
                "refusing to send credentials without verified TLS", phase=Phase.AUTH
            )
        token: str | None = None
        if credentials.token is not None:
            produced = credentials.token()
            token = await produced if inspect.isawaitable(produced) else produced
        mechanism = choose_mechanism(
            self.client.capabilities.auth_mechanisms,
            credentials,
            token=token,
            host=self.tls.hostname if self.tls else (self.upstream.host or ""),
            port=self.upstream.effective_port,
        )
        reply = await self.client.auth(mechanism)
        if reply.code == 235:
            return
        if reply.code >= 500 and self.trusted:
            raise AuthenticationFailed(
                f"authentication as {credentials.username!r} failed with "
                f"{mechanism.name}: {reply}; check the user name and password",
                code=reply.code,
                enhanced=reply.enhanced,
                text=reply.text,
                phase=Phase.AUTH,
            )
        raise reply_error(reply, Phase.AUTH, trusted=self.trusted)

    def mail_parameters(
        self, envelope: Envelope, message: PreparedMessage
    ) -> list[str]:
        capabilities = self.client.capabilities
        parameters = list(envelope.mail_parameters)
        if capabilities.has("SIZE"):
            limit = capabilities.size
            if limit is not None and message.size > limit:
                raise MessageTooLarge(
                    f"message of {message.size} octets exceeds the server's "
                    f"limit of {limit}"
                )
            parameters.append(f"SIZE={message.size}")
        if message.eight_bit:
            if not capabilities.eightbitmime:
                raise ExtensionRequired(
                    "message has 8-bit data and the server does not offer 8BITMIME"
                )
            parameters.append("BODY=8BITMIME")
        if envelope.needs_smtputf8:
            if not capabilities.smtputf8:
                raise ExtensionRequired(
                    "an address needs SMTPUTF8, which the server does not offer"
                )
            parameters.append("SMTPUTF8")
        if envelope.dsn is not None and capabilities.dsn:
            parameters += envelope.dsn.mail_parameters()
        return parameters

    def rcpt_parameters(self, envelope: Envelope, recipient: str) -> list[str]:
        if envelope.dsn is not None and self.client.capabilities.dsn:
            return envelope.dsn.rcpt_parameters(recipient)
        return []

    async def transaction(
        self, envelope: Envelope, message: PreparedMessage
    ) -> tuple[tuple[RecipientResult, ...], Reply]:
        """MAIL, RCPT..., DATA, body: per-recipient results and the final reply.

        With PIPELINING, MAIL, every RCPT and DATA go out together and their
        replies are paired in order.
        """
        client = self.client
        parameters = self.mail_parameters(envelope, message)
        chunking = self.upstream.chunking and client.capabilities.chunking
        if client.capabilities.pipelining:
            # Every reply is in before any is judged: after a connection lost
            # half way (a 421, say) the server's own reply to MAIL is the
            # error reported.
            outcomes = await client.envelope(
                envelope.sender,
                parameters,
                [(r, self.rcpt_parameters(envelope, r)) for r in envelope.recipients],
                data=not chunking,
            )
            errors = [o for o in outcomes if not isinstance(o, Reply)]
            if errors:
                first = outcomes[0]
                if isinstance(first, Reply) and not first.is_success:
                    raise reply_error(first, Phase.MAIL, trusted=self.trusted)
                raise errors[0]
            replies = cast(list[Reply], outcomes)
            mail, rcpt_replies = replies[0], replies[1 : len(envelope.recipients) + 1]
            data = None if chunking else replies[-1]
        else:
            mail = await client.mail(envelope.sender, parameters)
            if not mail.is_success:
                raise reply_error(mail, Phase.MAIL, trusted=self.trusted)
            rcpt_replies = []
            for recipient in envelope.recipients:
                rcpt_replies.append(
                    await client.rcpt(
                        recipient, self.rcpt_parameters(envelope, recipient)
                    )
                )
            data = None
        accepted = [r.is_success for r in rcpt_replies]
        if not mail.is_success:
            await self._end_unwanted_data(data)
            raise reply_error(mail, Phase.MAIL, trusted=self.trusted)
        if not any(accepted):
            await self._end_unwanted_data(data)
            refused = tuple(
                RecipientResult(recipient, reply, delivered=False, trusted=self.trusted)
                for recipient, reply in zip(
                    envelope.recipients, rcpt_replies, strict=True
                )
            )
            transient = not any(r.is_permanent for r in refused)
            raise RecipientsRefused(
                "no recipient was accepted: "
                + "; ".join(f"<{r.recipient}>: {r.reply}" for r in refused),
                recipients=refused,
                transient=transient,
            )
        if chunking:
            final = await self._send_chunks(message)
        else:
            if data is None:
                data = await client.data()
            if data.code != 354:
                raise reply_error(data, Phase.DATA, trusted=self.trusted)
            final = await client.send_body(message)
        self.check(final, Phase.END_OF_DATA)
        results = tuple(
            RecipientResult(
                recipient, final if ok else reply, delivered=ok, trusted=self.trusted
            )
            for recipient, reply, ok in zip(
                envelope.recipients, rcpt_replies, accepted, strict=True
            )
        )
        return results, final

    async def _send_chunks(self, message: PreparedMessage) -> Reply:
        """The body as BDAT chunks of about BDAT_CHUNK octets; the last reply.

        A failed chunk ends the transaction (RFC 3030 section 3): nothing
        more is sent, and the session resets before its next message. A body
        that cannot be read to its end never gets its LAST chunk: the
        connection is dropped instead.
        """
        gathered: list[bytes] = []
        size = 0
        pieces = message.bdat_chunks()
        while (piece := self._next_piece(pieces)) is not None:
            gathered.append(piece)
            size += len(piece)
            if size >= BDAT_CHUNK:
                reply = await self.client.bdat(b"".join(gathered), last=False)
                self.check(reply, Phase.DATA)
                gathered, size = [], 0
        return await self.client.bdat(b"".join(gathered), last=True)

    def _next_piece(self, pieces: Iterator[bytes]) -> bytes | None:
        try:
            return next(pieces, None)
        except (SMTPError, OSError) as error:
            failure = (
                error
                if isinstance(error, SMTPError)
                else LocalError(f"cannot read the message: {error}")
            )
            self.client.abort(failure)
            raise failure from None

    async def _end_unwanted_data(self, data: Reply | None) -> None:
        """RFC 2920 3.1: a 354 that should not have come gets an empty body."""
        if data is not None and data.code == 354:
            await self.client.send_body(EMPTY_BODY)

    async def send(self, envelope: Envelope, message: PreparedMessage) -> SendResult:
        """One transaction on the open session; RSET first if the last one failed."""
        if self._needs_reset:
            self.check(await self.client.rset(), Phase.RSET)
            self._needs_reset = False
        try:
            results, final = await self.transaction(envelope, message)
        except SMTPError as error:
            self._needs_reset = True
            error.relay = error.relay or self.relay
            raise
        self.messages_sent += 1
        return SendResult(
            recipients=results, reply=final, tls=self.client.tls, relay=self.relay
        )

    @property
    def usable(self) -> bool:
        """Still connected with no failure: another message may follow."""
        return self.client.failure is None and self.client.transport is not None

    def close(self) -> None:
        """QUIT when the connection is still usable, then hang up.

        The 221 is not waited for: the outcome is already known, and a slow
        peer must not hold it back.
        """
        client = self.client
        if client.failure is None and client.transport is not None:
            client.quit().addErrback(lambda _: None)
            client.transport.loseConnection()


@functools.cache
def local_hostname() -> str:
    """This host's name; getfqdn() may ask DNS, so once per process."""
    return socket.getfqdn()


def default_ehlo_name() -> str:
    name = local_hostname()
    try:
        return validate_hostname_argument(name)
    except InvalidArgument:
        return "localhost"


def _describe_peer(client: ESMTPClient, upstream: Upstream) -> str:
    peer = client.transport.getPeer() if client.transport is not None else None
    name = upstream.host or upstream.verify_name or "unknown"
    if isinstance(peer, IPv4Address | IPv6Address):
        return f"{name}[{peer.host}]:{peer.port}"
    if isinstance(peer, UNIXAddress) and peer.name:
        path = (
            peer.name.decode(errors="replace")
            if isinstance(peer.name, bytes)
            else peer.name
        )
        return f"{name}[{path}]"
    return name


def _is_local_peer(client: ESMTPClient) -> bool:
    peer = client.transport.getPeer() if client.transport is not None else None
    if isinstance(peer, UNIXAddress):
        return True
    if isinstance(peer, IPv4Address):
        return peer.host.startswith("127.")
    if isinstance(peer, IPv6Address):
        return peer.host == "::1"
    return False


def start_deadline(client: ESMTPClient, seconds: float | None) -> IDelayedCall | None:
    """Abort the client if the work at hand takes longer than ``seconds``."""
    if seconds is None:
        return None
    return client.clock.callLater(
        seconds, client.abort, Timeout(f"gave up after {seconds:g} s overall")
    )


def cancel_deadline(deadline: IDelayedCall | None) -> None:
    if deadline is not None and deadline.active():
        deadline.cancel()


async def run_session(
    client: ESMTPClient,
    upstream: Upstream,
    tls: ClientTLS | None,
    envelope: Envelope,
    message: PreparedMessage,
) -> SendResult:
    """Deliver one message over a connected client, then hang up.

    Raises a typed SMTPError on failure; logs one line per recipient.
    """
    session = Session(client, upstream, tls)
    deadline = start_deadline(client, upstream.timeouts.overall)
    try:
        await session.open()
        return await session.send(envelope, message)
    finally:
        cancel_deadline(deadline)
        session.close()
