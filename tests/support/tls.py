"""The certificates a test session needs, written once as files.

Servers (Postfix, Twisted test servers) and clients (swaks, msmtp, OpenSSL)
want paths, so every certificate is written to disk next to its key.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from txstarttls.testing import CertificateAuthority, IssuedCertificate, self_signed

TLS_HOSTNAME = "mx.test.example"


@dataclass(frozen=True, slots=True)
class CertificateFiles:
    """One issued certificate and where its PEM files are."""

    cert: Path
    key: Path
    fingerprint: str
    issued: IssuedCertificate


@dataclass(frozen=True, slots=True)
class TLSFiles:
    """A CA file plus good and deliberately bad server certificates.

    ``good`` names mx.test.example, localhost and 127.0.0.1; the others fail
    verification against ``ca_file`` for exactly one reason each.
    """

    directory: Path
    ca_file: Path
    other_ca_file: Path
    good: CertificateFiles
    wildcard: CertificateFiles
    wrong_name: CertificateFiles
    expired: CertificateFiles
    other_ca: CertificateFiles
    self_signed: CertificateFiles


def _files(directory: Path, stem: str, issued: IssuedCertificate) -> CertificateFiles:
    cert, key = issued.write(directory, stem)
    return CertificateFiles(cert, key, issued.fingerprint, issued)


def write_tls_files(directory: Path, ca: CertificateAuthority) -> TLSFiles:
    """Issue the standard set of certificates from ``ca`` into ``directory``."""
    other = CertificateAuthority("txstarttls other test CA")
    return TLSFiles(
        directory=directory,
        ca_file=ca.write(directory),
        other_ca_file=other.write(directory, "other-ca"),
        good=_files(
            directory, "good", ca.issue(TLS_HOSTNAME, "localhost", "127.0.0.1")
        ),
        wildcard=_files(directory, "wildcard", ca.issue("*.test.example")),
        wrong_name=_files(directory, "wrong-name", ca.issue("other.example")),
        expired=_files(directory, "expired", ca.issue_expired(TLS_HOSTNAME)),
        other_ca=_files(directory, "other-ca-server", other.issue(TLS_HOSTNAME)),
        self_signed=_files(directory, "self-signed", self_signed(TLS_HOSTNAME)),
    )
