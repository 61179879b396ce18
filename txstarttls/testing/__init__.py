"""A public test kit for suites that exercise txstarttls or mail code around it."""

from txstarttls.testing._ca import CertificateAuthority, IssuedCertificate, self_signed

__all__ = ["CertificateAuthority", "IssuedCertificate", "self_signed"]
