"""Where and how to deliver: one upstream's address, TLS and AUTH settings.

Everything a user configures is checked here, before any connection, so a
bad setting is one clear line at start and never a surprise mid-dialogue.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from twisted.internet.abstract import isIPAddress, isIPv6Address
from twisted.internet.endpoints import (
    HostnameEndpoint,
    TCP4ClientEndpoint,
    TCP6ClientEndpoint,
    clientFromString,
    connectProtocol,
    wrapClientTLS,
)
from twisted.internet.interfaces import IReactorTime, IStreamClientEndpoint

from txstarttls.address import validate_hostname_argument
from txstarttls.client import ESMTPClient, Timeouts, Transcript
from txstarttls.errors import ConfigurationError, ConnectionFailed, Phase
from txstarttls.sasl import Credentials
from txstarttls.tls import ClientTLS, TLSMode, TLSPolicy, client_tls

DEFAULT_PORTS = {TLSMode.IMPLICIT: 465}
SUBMISSION_PORT = 587


@dataclass(frozen=True, slots=True)
class Upstream:
    """Where and how to deliver: one smarthost and its TLS and AUTH settings.

    Give ``host`` (and optionally ``port``), or a Twisted client ``endpoint``
    description such as ``tcp:host=smtp.example.net:port=587`` or
    ``unix:path=/run/smtp.sock``; with an endpoint and TLS, the name to verify
    comes from ``tls.hostname`` or the endpoint's ``host=``.
    """

    host: str | None = None
    port: int | None = None
    endpoint: str | None = None
    tls: TLSPolicy = field(default_factory=TLSPolicy)
    credentials: Credentials | None = None
    ehlo_name: str | None = None
    timeouts: Timeouts = field(default_factory=Timeouts)
    allow_plaintext_auth: bool = False
    """Let AUTH go over plaintext, but only to a loopback or UNIX-socket peer."""
    chunking: bool = False
    """Send bodies with BDAT (RFC 3030) instead of DATA when the server offers
    CHUNKING: no dot-stuffing, each chunk counted."""

    def __post_init__(self) -> None:
        if (self.host is None) == (self.endpoint is None):
            raise ConfigurationError("give exactly one of host or endpoint")
        if self.port is not None and not 0 < self.port < 65536:
            raise ConfigurationError(f"port must be 1-65535, got {self.port}")
        if self.ehlo_name is not None:
            validate_hostname_argument(self.ehlo_name)

    @property
    def effective_port(self) -> int:
        return self.port or DEFAULT_PORTS.get(self.tls.mode, SUBMISSION_PORT)

    @property
    def verify_name(self) -> str | None:
        """The name the certificate must carry: configured, never learned."""
        if self.tls.hostname is not None:
            return self.tls.hostname
        if self.host is not None:
            return self.host
        assert self.endpoint is not None
        return _endpoint_host(self.endpoint)


def _endpoint_host(description: str) -> str | None:
    for part in description.split(":")[1:]:
        key, sep, value = part.partition("=")
        if sep and key == "host":
            return value
    return None


def prepare_tls(
    upstream: Upstream, trust_root: object | None = None
) -> ClientTLS | None:
    """The ClientTLS for an upstream, or None in plaintext mode.

    ``trust_root`` (an IOpenSSLTrustRoot) overrides the CA file, for embedders.
    """
    if not upstream.tls.uses_tls:
        return None
    name = upstream.verify_name
    if name is None:
        raise ConfigurationError(
            "TLS needs a host name to verify: set tls_hostname for this endpoint"
        )
    return client_tls(upstream.tls, name, trust_root=trust_root)  # type: ignore[arg-type]


def client_endpoint(
    reactor: IReactorTime, upstream: Upstream, tls: ClientTLS | None
) -> IStreamClientEndpoint:
    """The endpoint to connect to, wrapped in TLS for implicit mode."""
    host = upstream.host or ""
    port = upstream.effective_port
    timeout = upstream.timeouts.connect
    if upstream.endpoint is not None:
        endpoint: IStreamClientEndpoint = clientFromString(  # type: ignore[no-untyped-call]
            reactor, upstream.endpoint
        )
    elif isIPAddress(host):
        # A literal address needs no resolver thread and no happy eyeballs.
        endpoint = TCP4ClientEndpoint(reactor, host, port, timeout=timeout)
    elif isIPv6Address(host):
        endpoint = TCP6ClientEndpoint(  # type: ignore[no-untyped-call]
            reactor, host, port, timeout=timeout
        )
    else:
        endpoint = HostnameEndpoint(reactor, host, port, timeout=timeout)
    if upstream.tls.mode is TLSMode.IMPLICIT:
        assert tls is not None
        endpoint = wrapClientTLS(tls.creator, endpoint)
    return endpoint


async def connect_client(
    reactor: IReactorTime,
    upstream: Upstream,
    tls: ClientTLS | None,
    *,
    transcript: Transcript | None = None,
) -> ESMTPClient:
    """Open the connection; the dialogue is the session's business."""
    client = ESMTPClient(
        reactor,
        timeouts=upstream.timeouts,
        implicit_tls=tls if upstream.tls.mode is TLSMode.IMPLICIT else None,
        transcript=transcript,
    )
    try:
        await connectProtocol(  # type: ignore[no-untyped-call]
            client_endpoint(reactor, upstream, tls), client
        )
    except Exception as error:
        raise ConnectionFailed(
            f"cannot connect to {upstream.host or upstream.endpoint}: {error}",
            phase=Phase.CONNECT,
        ) from None
    return client
