"""Throwaway certificate authorities for tests: nothing is ever committed.

A test session makes a CA and issues what it needs from it: a good server
certificate, one for the wrong name, an expired one, one from another CA, a
self-signed one. Keys are small EC keys so making them costs microseconds.
"""

from __future__ import annotations

import datetime
import hashlib
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

_ONE_DAY = datetime.timedelta(days=1)


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _alt_names(names: tuple[str, ...]) -> x509.SubjectAlternativeName:
    general: list[x509.GeneralName] = []
    for name in names:
        try:
            general.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            general.append(x509.DNSName(name))
    return x509.SubjectAlternativeName(general)


@dataclass(frozen=True, slots=True)
class IssuedCertificate:
    """A certificate with its key, as PEM, plus the SHA-256 of its DER form."""

    certificate_pem: bytes
    key_pem: bytes
    fingerprint: str

    @property
    def pem(self) -> bytes:
        """Key and certificate in one PEM blob, as Twisted's loaders like it."""
        return self.key_pem + self.certificate_pem

    def write(self, directory: Path, stem: str) -> tuple[Path, Path]:
        """Write ``stem.crt`` and ``stem.key``; return their paths."""
        cert_path = directory / f"{stem}.crt"
        key_path = directory / f"{stem}.key"
        cert_path.write_bytes(self.certificate_pem)
        key_path.write_bytes(self.key_pem)
        key_path.chmod(0o600)
        return cert_path, key_path


def _issued(
    certificate: x509.Certificate, key: ec.EllipticCurvePrivateKey
) -> IssuedCertificate:
    der = certificate.public_bytes(serialization.Encoding.DER)
    return IssuedCertificate(
        certificate_pem=certificate.public_bytes(serialization.Encoding.PEM),
        key_pem=key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
        fingerprint=hashlib.sha256(der).hexdigest(),
    )


class CertificateAuthority:
    """A private CA that issues server certificates for tests."""

    def __init__(self, common_name: str = "txstarttls test CA") -> None:
        self._key = ec.generate_private_key(ec.SECP256R1())
        now = _now()
        self._certificate = (
            x509.CertificateBuilder()
            .subject_name(_name(common_name))
            .issuer_name(_name(common_name))
            .public_key(self._key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - _ONE_DAY)
            .not_valid_after(now + 30 * _ONE_DAY)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(self._key.public_key()),
                critical=False,
            )
            .sign(self._key, hashes.SHA256())
        )

    @property
    def certificate_pem(self) -> bytes:
        """The CA certificate: what a client trusts."""
        return self._certificate.public_bytes(serialization.Encoding.PEM)

    def write(self, directory: Path, stem: str = "ca") -> Path:
        """Write the CA certificate as ``stem.crt`` and return its path."""
        path = directory / f"{stem}.crt"
        path.write_bytes(self.certificate_pem)
        return path

    def issue(
        self,
        *names: str,
        not_before: datetime.datetime | None = None,
        not_after: datetime.datetime | None = None,
    ) -> IssuedCertificate:
        """Issue a server certificate whose SANs are ``names``.

        ``not_before`` and ``not_after`` make expired or not-yet-valid ones.
        """
        if not names:
            raise ValueError("a server certificate needs at least one name")
        key = ec.generate_private_key(ec.SECP256R1())
        now = _now()
        certificate = (
            x509.CertificateBuilder()
            .subject_name(_name(names[0]))
            .issuer_name(self._certificate.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(not_before or now - _ONE_DAY)
            .not_valid_after(not_after or now + 30 * _ONE_DAY)
            .add_extension(_alt_names(names), critical=False)
            .add_extension(
                x509.BasicConstraints(ca=False, path_length=None), critical=True
            )
            .add_extension(
                x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False
            )
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(
                    self._key.public_key()
                ),
                critical=False,
            )
            .sign(self._key, hashes.SHA256())
        )
        return _issued(certificate, key)

    def issue_expired(self, *names: str) -> IssuedCertificate:
        """A certificate for ``names`` that expired yesterday."""
        now = _now()
        return self.issue(
            *names, not_before=now - 10 * _ONE_DAY, not_after=now - _ONE_DAY
        )


def self_signed(*names: str) -> IssuedCertificate:
    """A self-signed server certificate for ``names``: trusted by nobody."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = _now()
    certificate = (
        x509.CertificateBuilder()
        .subject_name(_name(names[0]))
        .issuer_name(_name(names[0]))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _ONE_DAY)
        .not_valid_after(now + 30 * _ONE_DAY)
        .add_extension(_alt_names(names), critical=False)
        .sign(key, hashes.SHA256())
    )
    return _issued(certificate, key)
