"""A smarthost for the queue runner that talks SMTP in memory, on a Clock.

Each delivery builds a real ``ESMTPClient`` on the runner's ``task.Clock``,
joins it with ``connect_in_memory`` to a fresh session of one
``ScriptedSMTPServerFactory`` (real TLS with a certificate for
``smtp.example.net``, AUTH PLAIN/LOGIN), runs ``Session.open()`` and
``Session.send()`` as ``run_session`` does, and pumps the connection. No
socket, no reactor: the runner, the client and the scripted upstream all move
only when the test advances the Clock, so a fault matrix runs in
milliseconds and a stalled upstream times out exactly when the test says.

One session per delivery, like the pool's first use of a connection: the
setup time is reported in ``setup_seconds`` as the pool does.
"""

from __future__ import annotations

import dataclasses

from twisted.internet import ssl
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.task import Clock

from txstarttls.client import ESMTPClient, Timeouts
from txstarttls.message import PreparedMessage
from txstarttls.sasl import Credentials
from txstarttls.session import (
    Envelope,
    SendResult,
    Session,
    cancel_deadline,
    start_deadline,
)
from txstarttls.testing import (
    CertificateAuthority,
    IssuedCertificate,
    MemoryConnection,
    ScriptedSMTPServerFactory,
    connect_in_memory,
    server_tls_options,
)
from txstarttls.tls import TLSPolicy
from txstarttls.upstream import Upstream, prepare_tls

SMARTHOST_NAME = "smtp.example.net"
SMARTHOST_ADDRESS = IPv4Address("TCP", "127.0.0.1", 587)
RELAY = f"{SMARTHOST_NAME}[127.0.0.1]:587"
"""How the runner's log names this smarthost."""
USERNAME = "relay"
PASSWORD = "correct horse battery"

CA = CertificateAuthority("memory smarthost test CA")
GOOD_CERTIFICATE = CA.issue(SMARTHOST_NAME)
WRONG_NAME_CERTIFICATE = CA.issue("other.example")
OTHER_CA_CERTIFICATE = CertificateAuthority("someone else's CA").issue(SMARTHOST_NAME)
TRUST_ROOT = ssl.trustRootFromCertificates(
    [ssl.Certificate.loadPEM(CA.certificate_pem)]
)


class MemorySmarthost:
    """The runner's ``Smarthost``: one scripted, in-memory session per delivery.

    ``factory`` is the upstream: script failures on ``factory.script``, read
    what arrived in ``factory.messages`` and each connection in
    ``factory.sessions``. ``connections`` keeps every in-memory connection.
    """

    def __init__(
        self,
        clock: Clock,
        *,
        certificate: IssuedCertificate = GOOD_CERTIFICATE,
        timeouts: Timeouts | None = None,
        password: str = PASSWORD,
    ) -> None:
        self.clock = clock
        self.factory = ScriptedSMTPServerFactory(
            hostname=SMARTHOST_NAME,
            tls_options=server_tls_options(certificate),
            users={USERNAME: PASSWORD},
        )
        self.upstream = Upstream(
            host=SMARTHOST_NAME,
            port=SMARTHOST_ADDRESS.port,
            tls=TLSPolicy(),
            credentials=Credentials(USERNAME, password=password),
            ehlo_name="relay.test.example",
            timeouts=timeouts or Timeouts(),
        )
        self._tls = prepare_tls(self.upstream, trust_root=TRUST_ROOT)
        self.connections: list[MemoryConnection] = []
        self.in_flight = 0
        self.closed = False
        self._pumping = False
        self._pump_again = False

    def serve_certificate(self, certificate: IssuedCertificate) -> None:
        """Present ``certificate`` from the next connection on."""
        self.factory.settings = dataclasses.replace(
            self.factory.settings, tls_options=server_tls_options(certificate)
        )

    async def deliver(self, envelope: Envelope, message: PreparedMessage) -> SendResult:
        client = ESMTPClient(self.clock, timeouts=self.upstream.timeouts)
        connection = connect_in_memory(
            client,
            self.factory.buildProtocol(None),
            server_address=SMARTHOST_ADDRESS,
        )
        self.connections.append(connection)
        self.in_flight += 1
        sending: Deferred[SendResult] = ensureDeferred(
            self._session(client, envelope, message)
        )
        # Everything the two sides can say to each other without the Clock
        # moving happens now; a stall waits for the test to advance the Clock,
        # and the client's timer then ends the session.
        self.pump()
        try:
            return await sending
        finally:
            self.in_flight -= 1
            self.pump()  # QUIT and the close reach the upstream

    async def _session(
        self, client: ESMTPClient, envelope: Envelope, message: PreparedMessage
    ) -> SendResult:
        """``run_session``, with the setup time measured as the pool does."""
        started = self.clock.seconds()
        session = Session(client, self.upstream, self._tls)
        deadline = start_deadline(client, self.upstream.timeouts.overall)
        try:
            await session.open()
            setup = self.clock.seconds() - started
            result = await session.send(envelope, message)
            return dataclasses.replace(result, setup_seconds=setup)
        finally:
            cancel_deadline(deadline)
            session.close()

    def pump(self) -> None:
        """Move whatever is pending on every open connection until all are quiet.

        A delivery that ends inside a pump (its reply just arrived) asks for
        another; pumping a TLS connection from inside its own ``dataReceived``
        would tear it down under OpenSSL, so the request is only noted and
        the outer pump goes round again.
        """
        if self._pumping:
            self._pump_again = True
            return
        self._pumping = True
        try:
            self._pump_again = True
            while self._pump_again:
                self._pump_again = False
                for connection in self.connections:
                    if not connection.closed:
                        connection.pump()
        finally:
            self._pumping = False

    async def close(self) -> None:
        self.closed = True
