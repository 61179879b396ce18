"""txstarttls: SMTP with STARTTLS done right, for Twisted.

``send()`` delivers one message; ``ESMTPClient`` is the protocol underneath
for programs that drive the dialogue themselves.
"""

from txstarttls.client import ESMTPClient, ESMTPClientFactory, Timeouts
from txstarttls.errors import (
    AuthenticationFailed,
    AuthenticationUnavailable,
    CertificateVerificationFailed,
    ConfigurationError,
    ConnectionFailed,
    ConnectionLost,
    FingerprintMismatch,
    LocalError,
    OutcomeUnknown,
    PermanentError,
    PermanentReplyError,
    Phase,
    ProtocolViolation,
    RecipientsRefused,
    ResponseInjection,
    SMTPError,
    Timeout,
    TLSError,
    TLSHandshakeFailed,
    TLSRequired,
    TransientError,
    TransientReplyError,
)
from txstarttls.message import PreparedMessage, prepare
from txstarttls.pool import ConnectionPool, PoolLimits
from txstarttls.reply import Capabilities, Reply
from txstarttls.sasl import Credentials
from txstarttls.send import deliver, send
from txstarttls.session import (
    Envelope,
    RecipientResult,
    SendResult,
    run_session,
)
from txstarttls.tls import ClientTLS, TLSInfo, TLSMode, TLSPolicy, client_tls
from txstarttls.upstream import Upstream, prepare_tls

__version__ = "0.1.0"

__all__ = [
    "AuthenticationFailed",
    "AuthenticationUnavailable",
    "Capabilities",
    "CertificateVerificationFailed",
    "ClientTLS",
    "ConfigurationError",
    "ConnectionFailed",
    "ConnectionLost",
    "ConnectionPool",
    "Credentials",
    "ESMTPClient",
    "ESMTPClientFactory",
    "Envelope",
    "FingerprintMismatch",
    "LocalError",
    "OutcomeUnknown",
    "PermanentError",
    "PermanentReplyError",
    "Phase",
    "PoolLimits",
    "PreparedMessage",
    "ProtocolViolation",
    "RecipientResult",
    "RecipientsRefused",
    "Reply",
    "ResponseInjection",
    "SMTPError",
    "SendResult",
    "TLSError",
    "TLSHandshakeFailed",
    "TLSInfo",
    "TLSMode",
    "TLSPolicy",
    "TLSRequired",
    "Timeout",
    "Timeouts",
    "TransientError",
    "TransientReplyError",
    "Upstream",
    "__version__",
    "client_tls",
    "deliver",
    "prepare",
    "prepare_tls",
    "run_session",
    "send",
]
