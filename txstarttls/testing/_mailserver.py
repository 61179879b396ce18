"""Running the test server for real: on a port, and with its own CA.

:func:`start_test_server` and :func:`listen_test_server` put a
:class:`ScriptedSMTPServerFactory` on an endpoint; :class:`TestMailServer`
adds a throwaway certificate authority, so a demo or a test gets a
STARTTLS-capable upstream, and the trust to reach it, in one call.
"""

from __future__ import annotations

import ssl
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Unpack

from cryptography import x509
from cryptography.hazmat.primitives.serialization import load_pem_private_key
from twisted.internet import defer
from twisted.internet._sslverify import IOpenSSLTrustRoot
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import (
    IListeningPort,
    IOpenSSLClientConnectionCreator,
    IReactorCore,
)
from twisted.internet.ssl import (
    Certificate,
    CertificateOptions,
    optionsForClientTLS,
    trustRootFromCertificates,
)

from txstarttls.testing._ca import CertificateAuthority, IssuedCertificate
from txstarttls.testing._records import ReceivedMessage
from txstarttls.testing._script import ServerScript
from txstarttls.testing._server import (
    DEFAULT_HOSTNAME,
    ScriptedSMTPServerFactory,
    ServerKnobs,
    SessionKnobs,
)

__all__ = [
    "RunningServer",
    "TestMailServer",
    "listen_test_server",
    "server_tls_options",
    "start_test_server",
]

DEFAULT_ENDPOINT = "tcp:0:interface=127.0.0.1"


@dataclass(frozen=True, slots=True)
class RunningServer:
    """A factory listening on a port; ``stop()`` also drops open sessions."""

    host: str
    port: int
    factory: ScriptedSMTPServerFactory
    listening_port: IListeningPort

    def stop(self) -> Deferred[None]:
        """Stop listening and abort live sessions; fires when all are gone."""
        stopped: list[Deferred[object]] = [
            defer.maybeDeferred(self.listening_port.stopListening)
        ]
        for protocol in list(self.factory.live):
            closed = protocol.session.when_closed()
            protocol._abort()
            stopped.append(closed.addCallback(lambda _: None))
        done = defer.gatherResults(stopped, consumeErrors=True)
        return done.addCallback(lambda _: None)


def listen_test_server(
    reactor: IReactorCore,
    factory: ScriptedSMTPServerFactory,
    endpoint_description: str = DEFAULT_ENDPOINT,
) -> Deferred[RunningServer]:
    """Listen with an existing factory on ``endpoint_description``."""
    endpoint = serverFromString(reactor, endpoint_description)  # type: ignore[no-untyped-call]

    def started(port: IListeningPort) -> RunningServer:
        address = port.getHost()
        return RunningServer(
            host=getattr(address, "host", ""),
            port=getattr(address, "port", 0),
            factory=factory,
            listening_port=port,
        )

    listening: Deferred[IListeningPort] = endpoint.listen(factory)
    return listening.addCallback(started)


def start_test_server(
    reactor: IReactorCore,
    endpoint_description: str = DEFAULT_ENDPOINT,
    **knobs: Unpack[ServerKnobs],
) -> Deferred[RunningServer]:
    """Listen on ``endpoint_description`` (default: a free loopback port)."""
    factory = ScriptedSMTPServerFactory(**knobs)
    return listen_test_server(reactor, factory, endpoint_description)


def server_tls_options(certificate: IssuedCertificate) -> CertificateOptions:
    """Server-side TLS options for an issued certificate.

    Built from ``cryptography`` objects: ``PrivateCertificate.options()``
    hands pyOpenSSL deprecated X509/PKey objects and warns on every context.
    """
    # Twisted's annotations still say PKey/X509; pyOpenSSL takes these.
    return CertificateOptions(
        privateKey=load_pem_private_key(  # type: ignore[arg-type]
            certificate.key_pem, password=None
        ),
        certificate=x509.load_pem_x509_certificate(  # type: ignore[arg-type]
            certificate.certificate_pem
        ),
    )


class TestMailServer:
    """A test upstream with its own throwaway CA: a demo in one call.

    ``TestMailServer(users={"me": "pw"}).start(reactor)`` listens on a free
    loopback port with STARTTLS using a certificate for ``mx.test.example``,
    ``localhost``, ``127.0.0.1`` and ``::1``; clients trust :attr:`ca_pem`.
    """

    __test__ = False  # not a pytest test class, despite the name

    def __init__(
        self,
        *,
        names: Sequence[str] = (DEFAULT_HOSTNAME, "localhost", "127.0.0.1", "::1"),
        **knobs: Unpack[SessionKnobs],
    ) -> None:
        self.ca = CertificateAuthority()
        self.certificate: IssuedCertificate = self.ca.issue(*names)
        self.hostname = names[0]
        knobs.setdefault("hostname", self.hostname)
        self.factory = ScriptedSMTPServerFactory(
            tls_options=server_tls_options(self.certificate), **knobs
        )

    @property
    def ca_pem(self) -> bytes:
        """The CA certificate clients must trust."""
        return self.ca.certificate_pem

    @property
    def script(self) -> ServerScript:
        return self.factory.script

    @property
    def messages(self) -> list[ReceivedMessage]:
        return self.factory.messages

    def ca_file(self, path: Path | str) -> Path:
        """Write the CA certificate to ``path`` (for CLI clients) and return it."""
        target = Path(path)
        target.write_bytes(self.ca_pem)
        return target

    def client_tls_options(
        self, hostname: str | None = None
    ) -> IOpenSSLClientConnectionCreator:
        """Twisted client options that trust this server's CA."""
        trust = Certificate.loadPEM(self.ca_pem)
        options: IOpenSSLClientConnectionCreator = optionsForClientTLS(
            hostname or self.hostname, trustRoot=trust
        )
        return options

    def trust_root(self) -> IOpenSSLTrustRoot:
        """A trust root of just this CA, for ``txstarttls.prepare_tls`` and friends."""
        root: IOpenSSLTrustRoot = trustRootFromCertificates(  # type: ignore[no-untyped-call]
            [Certificate.loadPEM(self.ca_pem)]
        )
        return root

    def ssl_context(self) -> ssl.SSLContext:
        """A standard-library context trusting this CA (for smtplib)."""
        return ssl.create_default_context(cadata=self.ca_pem.decode("ascii"))

    def start(
        self,
        reactor: IReactorCore,
        endpoint_description: str = DEFAULT_ENDPOINT,
    ) -> Deferred[RunningServer]:
        """Listen with this server's factory; see :func:`start_test_server`."""
        return listen_test_server(reactor, self.factory, endpoint_description)
