"""One-shot sending: connect, run one session, hang up."""

from __future__ import annotations

from collections.abc import Sequence

from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.interfaces import IReactorTime

from txstarttls.client import Timeouts, Transcript
from txstarttls.errors import ConfigurationError
from txstarttls.message import MessageInput, PreparedMessage, prepare
from txstarttls.pool import ConnectionPool
from txstarttls.sasl import Credentials
from txstarttls.session import Envelope, SendResult, run_session
from txstarttls.tls import TLSMode, TLSPolicy
from txstarttls.upstream import Upstream, connect_client, prepare_tls


async def deliver(
    reactor: IReactorTime,
    upstream: Upstream,
    envelope: Envelope,
    message: MessageInput | PreparedMessage,
    *,
    trust_root: object | None = None,
    transcript: Transcript | None = None,
) -> SendResult:
    """Connect, deliver one message, hang up; raise a typed SMTPError on failure.

    The message is encoded (and refused if invalid) before connecting.
    """
    prepared = prepare(message)
    tls = prepare_tls(upstream, trust_root)
    client = await connect_client(reactor, upstream, tls, transcript=transcript)
    return await run_session(client, upstream, tls, envelope, prepared)


def send(
    reactor: IReactorTime,
    *,
    sender: str,
    recipients: Sequence[str],
    message: MessageInput | PreparedMessage,
    host: str | None = None,
    port: int | None = None,
    endpoint: str | None = None,
    tls: str | TLSMode = TLSMode.REQUIRED,
    tls_hostname: str | None = None,
    ca_file: str | None = None,
    fingerprint: str | None = None,
    credentials: Credentials | None = None,
    ehlo_name: str | None = None,
    timeouts: Timeouts | None = None,
    allow_plaintext_auth: bool = False,
    trust_root: object | None = None,
    transcript: Transcript | None = None,
    pool: ConnectionPool | None = None,
) -> Deferred[SendResult]:
    """Send one message; fires with a SendResult or fails with an SMTPError.

    Everything is validated before a connection is opened. Works with
    ``await`` inside a coroutine run by ``ensureDeferred``. With ``pool`` the
    message goes over one of its sessions, under its upstream's settings, and
    no connection argument may be given.
    """

    async def run() -> SendResult:
        if pool is not None:
            if host is not None or endpoint is not None:
                raise ConfigurationError(
                    "give either a pool or host/endpoint settings, not both"
                )
            return await pool.deliver(Envelope(sender, tuple(recipients)), message)
        upstream = Upstream(
            host=host,
            port=port,
            endpoint=endpoint,
            tls=TLSPolicy(
                mode=TLSMode.parse(tls),
                hostname=tls_hostname,
                ca_file=ca_file,
                fingerprint=fingerprint,
            ),
            credentials=credentials,
            ehlo_name=ehlo_name,
            timeouts=timeouts or Timeouts(),
            allow_plaintext_auth=allow_plaintext_auth,
        )
        envelope = Envelope(sender, tuple(recipients))
        return await deliver(
            reactor,
            upstream,
            envelope,
            message,
            trust_root=trust_root,
            transcript=transcript,
        )

    return ensureDeferred(run())
