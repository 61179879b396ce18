"""TLS policy details: minimum version, no renegotiation, pins, CA files."""

from __future__ import annotations

from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from OpenSSL import SSL
from twisted.internet import ssl
from twisted.internet.interfaces import IOpenSSLServerConnectionCreator
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer

from txstarttls.client import ESMTPClient
from txstarttls.errors import ConfigurationError, TLSHandshakeFailed
from txstarttls.testing import (
    CertificateAuthority,
    ScriptedSMTPServerFactory,
    connect_in_memory,
)
from txstarttls.tls import (
    TLSMode,
    TLSPolicy,
    client_tls,
    load_trust_root,
    parse_fingerprint,
)

CA = CertificateAuthority()
CERTIFICATE = CA.issue("mx.test.example")
TRUST = ssl.trustRootFromCertificates([ssl.Certificate.loadPEM(CA.certificate_pem)])


@implementer(IOpenSSLServerConnectionCreator)
class _OldServer:
    """A server that speaks nothing newer than TLS 1.1 (OpenSSL must be told
    to allow it at all: security level 0)."""

    def __init__(self) -> None:
        context = SSL.Context(SSL.TLS_METHOD)
        context.set_min_proto_version(SSL.TLS1_1_VERSION)
        context.set_max_proto_version(SSL.TLS1_1_VERSION)
        context.set_cipher_list(b"DEFAULT:@SECLEVEL=0")
        context.use_certificate(
            x509.load_pem_x509_certificate(CERTIFICATE.certificate_pem)
        )
        context.use_privatekey(
            serialization.load_pem_private_key(CERTIFICATE.key_pem, password=None)  # type: ignore[arg-type]
        )
        self._context = context

    def serverConnectionForTLS(self, tlsProtocol: object) -> SSL.Connection:
        return SSL.Connection(self._context, None)


@pytest.mark.parametrize("pinned", [False, True])
def test_renegotiation_is_refused_on_every_client_connection(pinned: bool) -> None:
    policy = TLSPolicy(fingerprint=CERTIFICATE.fingerprint if pinned else None)
    tls = client_tls(policy, "mx.test.example", trust_root=TRUST)
    factory = TLSMemoryBIOFactory(tls.creator, True, Factory.forProtocol(Protocol))
    connection = tls.creator.clientConnectionForTLS(factory.buildProtocol(None))
    options = connection.set_options(0)
    assert options & SSL.OP_NO_RENEGOTIATION


class MinimumVersionTests(SynchronousTestCase):
    def test_a_server_that_only_speaks_tls_1_1_is_refused(self) -> None:
        """TLS 1.2 is the floor (RFC 8996); an old server fails the handshake."""
        factory = ScriptedSMTPServerFactory(tls_options=_OldServer())
        tls = client_tls(TLSPolicy(), "mx.test.example", trust_root=TRUST)
        client = ESMTPClient(Clock())
        connection = connect_in_memory(client, factory.buildProtocol(None))
        greeted = client.greeting()
        connection.pump()
        self.successResultOf(greeted)
        client.ehlo("client.example")
        connection.pump()
        started = client.starttls(tls)
        connection.pump()
        self.failureResultOf(started, TLSHandshakeFailed)
        self.assertIsNone(client.tls)


def test_fingerprint_forms() -> None:
    digits = CERTIFICATE.fingerprint
    spaced = ":".join(digits[i : i + 2] for i in range(0, 64, 2)).upper()
    assert parse_fingerprint(spaced) == digits
    with pytest.raises(ConfigurationError, match="64 hex digits"):
        parse_fingerprint("zz" * 32)
    with pytest.raises(ConfigurationError):
        TLSPolicy(fingerprint="abcd")


def test_ca_file_errors_are_configuration_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match="cannot read CA file"):
        load_trust_root(str(tmp_path / "missing.pem"))
    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate\n")
    with pytest.raises(ConfigurationError, match="holds no PEM certificate"):
        load_trust_root(str(junk))
    good = tmp_path / "ca.pem"
    good.write_bytes(CA.certificate_pem)
    assert load_trust_root(str(good)) is not None


def test_unknown_mode_is_a_configuration_error() -> None:
    with pytest.raises(ConfigurationError, match="use one of required"):
        TLSMode.parse("sometimes")
    assert TLSMode.parse("IMPLICIT") is TLSMode.IMPLICIT


class _RecordingSocket:
    def __init__(self) -> None:
        self.options: list[tuple[int, int, int]] = []

    def setsockopt(self, level: int, option: int, value: int) -> None:
        self.options.append((level, option, value))


class _Transport:
    def __init__(self) -> None:
        self.socket = _RecordingSocket()


class _Connection:
    def __init__(self) -> None:
        self.callback: object = None

    def set_info_callback(self, callback: object) -> None:
        self.callback = callback


def test_tls13_session_tickets_are_acknowledged_at_once() -> None:
    """No ~40 ms delayed-ACK stall per connection against a Nagling server."""
    import socket

    from txstarttls.client import _acknowledge_session_tickets

    connection, transport = _Connection(), _Transport()
    _acknowledge_session_tickets(connection, transport)  # type: ignore[arg-type]
    assert callable(connection.callback)
    connection.callback(connection, SSL.SSL_CB_LOOP, 1)
    assert transport.socket.options == []
    connection.callback(connection, SSL.SSL_CB_EXIT | 0x1000, 1)
    assert transport.socket.options == [(socket.IPPROTO_TCP, socket.TCP_QUICKACK, 1)]
