"""A public test kit for suites that exercise txstarttls or mail code around it."""

from txstarttls.testing._ca import CertificateAuthority, IssuedCertificate, self_signed
from txstarttls.testing._mailserver import (
    RunningServer,
    TestMailServer,
    listen_test_server,
    server_tls_options,
    start_test_server,
)
from txstarttls.testing._memory import (
    MemoryConnection,
    MemoryTransport,
    Pipe,
    connect_in_memory,
)
from txstarttls.testing._records import ReceivedMessage, SessionLog
from txstarttls.testing._script import ScriptRule, ServerScript
from txstarttls.testing._server import (
    ScriptedSMTPServer,
    ScriptedSMTPServerFactory,
    ServerKnobs,
    SessionKnobs,
)

__all__ = [
    "CertificateAuthority",
    "IssuedCertificate",
    "MemoryConnection",
    "MemoryTransport",
    "Pipe",
    "ReceivedMessage",
    "RunningServer",
    "ScriptRule",
    "ScriptedSMTPServer",
    "ScriptedSMTPServerFactory",
    "ServerKnobs",
    "ServerScript",
    "SessionKnobs",
    "SessionLog",
    "TestMailServer",
    "connect_in_memory",
    "listen_test_server",
    "self_signed",
    "server_tls_options",
    "start_test_server",
]
