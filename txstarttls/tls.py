"""TLS policy for the client: what to require, what to trust, what to check.

The host name that is verified is always the one the user configured (or an
explicit ``tls_hostname``), never one learned from the greeting, EHLO or DNS:
those come from the very peer we are trying to authenticate (RFC 7817 3.1).
"""

from __future__ import annotations

import enum
import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from OpenSSL import SSL
from OpenSSL.crypto import X509
from service_identity import VerificationError
from service_identity.pyopenssl import verify_hostname, verify_ip_address
from twisted.internet import ssl
from twisted.internet._sslverify import IOpenSSLTrustRoot
from twisted.internet.abstract import isIPAddress, isIPv6Address
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator
from twisted.protocols.tls import TLSMemoryBIOProtocol
from zope.interface import implementer

from txstarttls.errors import (
    CertificateVerificationFailed,
    ConfigurationError,
    FingerprintMismatch,
    Phase,
)


class TLSMode(enum.Enum):
    """How the client gets TLS."""

    REQUIRED = "required"
    """STARTTLS is mandatory and verified; the default."""
    OPPORTUNISTIC = "opportunistic"
    """STARTTLS when offered, verified when used; plaintext when not offered."""
    IMPLICIT = "implicit"
    """TLS from the first byte (port 465, RFC 8314)."""
    NONE = "none"
    """Plaintext; for loopback test setups only."""

    @classmethod
    def parse(cls, value: str | TLSMode) -> TLSMode:
        if isinstance(value, TLSMode):
            return value
        try:
            return cls(value.lower())
        except ValueError:
            choices = ", ".join(mode.value for mode in cls)
            raise ConfigurationError(
                f"unknown TLS mode {value!r}: use one of {choices}"
            ) from None


_HEX_FINGERPRINT = re.compile(r"[0-9a-f]{64}")


def parse_fingerprint(text: str) -> str:
    """Normalise a SHA-256 certificate fingerprint to 64 lower-case hex digits.

    Colons, spaces and case are ignored, as msmtp and openssl print them.
    """
    digits = text.replace(":", "").replace(" ", "").strip().lower()
    if not _HEX_FINGERPRINT.fullmatch(digits):
        raise ConfigurationError(
            "fingerprint must be the SHA-256 of the server certificate: "
            f"64 hex digits (colons allowed), got {len(digits)} characters"
        )
    return digits


@dataclass(frozen=True, slots=True)
class TLSPolicy:
    """Everything the client needs to decide whether a TLS session is good.

    With a ``fingerprint`` the pin replaces chain and name checks (as in
    msmtp's ``tls_fingerprint``), which is what makes self-signed upstreams
    usable; without one, the chain is verified against ``ca_file`` (or the
    system roots) and the name against ``hostname`` (or the configured host).
    """

    mode: TLSMode = TLSMode.REQUIRED
    hostname: str | None = None
    ca_file: str | None = None
    fingerprint: str | None = None

    def __post_init__(self) -> None:
        if self.fingerprint is not None:
            object.__setattr__(self, "fingerprint", parse_fingerprint(self.fingerprint))

    @property
    def uses_tls(self) -> bool:
        return self.mode is not TLSMode.NONE


@dataclass(frozen=True, slots=True)
class TLSInfo:
    """What was negotiated, for results and logs."""

    version: str
    cipher: str
    peer_fingerprint: str
    verified_name: str | None
    """The name checked against the certificate; None when pinned."""


def load_trust_root(ca_file: str) -> IOpenSSLTrustRoot:
    """Read a PEM bundle of CA certificates into a trust root."""
    try:
        data = Path(ca_file).read_bytes()
    except OSError as error:
        raise ConfigurationError(
            f"cannot read CA file {ca_file}: {error.strerror}"
        ) from None
    try:
        certificates = x509.load_pem_x509_certificates(data)
    except ValueError:
        raise ConfigurationError(
            f"CA file {ca_file} holds no PEM certificate"
        ) from None
    roots = [
        ssl.Certificate(X509.from_cryptography(cert))  # type: ignore[no-untyped-call]
        for cert in certificates
    ]
    trust_root: IOpenSSLTrustRoot = ssl.trustRootFromCertificates(roots)  # type: ignore[no-untyped-call]
    return trust_root


def _is_ip_address(name: str) -> bool:
    return bool(isIPAddress(name) or isIPv6Address(name))


@implementer(IOpenSSLClientConnectionCreator)
class _HardenedCreator:
    """Wraps a connection creator: no renegotiation; SNI when pinned."""

    def __init__(
        self, inner: IOpenSSLClientConnectionCreator, server_name: str | None
    ) -> None:
        self._inner = inner
        self._server_name = server_name

    def clientConnectionForTLS(
        self, tlsProtocol: TLSMemoryBIOProtocol
    ) -> SSL.Connection:
        connection: SSL.Connection = self._inner.clientConnectionForTLS(tlsProtocol)
        connection.set_options(SSL.OP_NO_RENEGOTIATION)
        if self._server_name is not None:
            connection.set_tlsext_host_name(self._server_name.encode("idna"))
        return connection


@dataclass(frozen=True, slots=True)
class ClientTLS:
    """A connection creator paired with the check run before any byte is sent."""

    creator: IOpenSSLClientConnectionCreator
    policy: TLSPolicy
    hostname: str

    def verify(self, connection: SSL.Connection) -> TLSInfo:
        """Check the finished handshake; raise CertificateVerificationFailed.

        The creator already verified chain and name during the handshake; this
        is the second, explicit check the client runs before it sends EHLO.
        """
        certificate = connection.get_peer_certificate()
        if certificate is None:
            raise CertificateVerificationFailed(
                "the server presented no certificate", phase=Phase.TLS_HANDSHAKE
            )
        fingerprint = certificate_fingerprint(certificate)
        verified_name: str | None = None
        if self.policy.fingerprint is not None:
            if fingerprint != self.policy.fingerprint:
                raise FingerprintMismatch(
                    f"server certificate SHA-256 {fingerprint} is not the pinned "
                    f"{self.policy.fingerprint}; check --fingerprint",
                    phase=Phase.TLS_HANDSHAKE,
                )
        else:
            try:
                if _is_ip_address(self.hostname):
                    verify_ip_address(connection, self.hostname)
                else:
                    verify_hostname(connection, self.hostname)
            except VerificationError:
                raise CertificateVerificationFailed(
                    f"server certificate is not valid for {self.hostname}",
                    phase=Phase.TLS_HANDSHAKE,
                ) from None
            verified_name = self.hostname
        return TLSInfo(
            version=connection.get_protocol_version_name(),
            cipher=connection.get_cipher_name() or "unknown",
            peer_fingerprint=fingerprint,
            verified_name=verified_name,
        )


def certificate_fingerprint(certificate: X509) -> str:
    """SHA-256 of the certificate's DER encoding, as lower-case hex."""
    der = certificate.to_cryptography().public_bytes(serialization.Encoding.DER)
    return hashlib.sha256(der).hexdigest()


def client_tls(
    policy: TLSPolicy,
    host: str,
    *,
    trust_root: IOpenSSLTrustRoot | None = None,
) -> ClientTLS:
    """Build the client side of TLS for talking to ``host`` under ``policy``.

    ``trust_root`` overrides ``policy.ca_file`` for embedders that already hold
    one (and for tests).
    """
    hostname = policy.hostname or host
    minimum = {"raiseMinimumTo": ssl.TLSVersion.TLSv1_2}
    if policy.fingerprint is not None:
        pinned = ssl.CertificateOptions(verify=False, **minimum)
        server_name = None if _is_ip_address(hostname) else hostname
        creator = _HardenedCreator(pinned, server_name)
    else:
        if trust_root is None:
            trust_root = (
                load_trust_root(policy.ca_file)
                if policy.ca_file is not None
                else ssl.platformTrust()  # type: ignore[no-untyped-call]
            )
        verifying = ssl.optionsForClientTLS(
            hostname, trustRoot=trust_root, extraCertificateOptions=minimum
        )
        creator = _HardenedCreator(verifying, None)
    return ClientTLS(creator=creator, policy=policy, hostname=hostname)
