"""The Postfix harness works with real, independent SMTP clients.

Before our own client is judged against the private Postfix, swaks, msmtp
and Python's smtplib prove the harness itself: STARTTLS with a certificate
that verifies against the test CA, AUTH only after STARTTLS, and delivery
into a Maildir the tests can read.
"""

from __future__ import annotations

import smtplib
import socket
import ssl
import subprocess
import uuid
from pathlib import Path

import pytest

from tests.support.postfix import PostfixInstance
from tests.support.requirements import require_binary
from tests.support.tls import TLSFiles

pytestmark = pytest.mark.interop

SENDER = "sender@client.test.example"
CLIENT_NAME = "client.test.example"
TIMEOUT = 30


def _unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


def _assert_delivered(postfix: PostfixInstance, recipient: str, token: str) -> None:
    """The message reached the Maildir, over TLS, from the authenticated user."""
    (message,) = postfix.wait_for_message(recipient=recipient, timeout=20)
    assert token.encode() in message
    # Postfix's Received header: ESMTPSA means TLS and AUTH (RFC 3848).
    assert b"with ESMTPSA" in message, message.decode(errors="replace")
    assert f"(Authenticated sender: {postfix.username}@".encode() in message


def _run(argv: list[str], postfix: PostfixInstance, stdin: bytes = b"") -> None:
    result = subprocess.run(
        argv, input=stdin, capture_output=True, timeout=TIMEOUT, check=False
    )
    assert result.returncode == 0, (
        f"{argv[0]} exited {result.returncode}\n"
        f"--- stdout ---\n{result.stdout.decode(errors='replace')}\n"
        f"--- stderr ---\n{result.stderr.decode(errors='replace')}\n"
        f"--- maillog tail ---\n{postfix.maillog_tail()}"
    )


class _LoopbackSMTP(smtplib.SMTP):
    """smtplib that verifies the TLS name it is given but dials 127.0.0.1.

    smtplib uses the host it connects to as the TLS server name; the test
    certificate's name, mx.test.example, does not resolve, and must not.
    """

    def _get_socket(self, host: str, port: int, timeout: float) -> socket.socket:
        return socket.create_connection(("127.0.0.1", port), timeout)


def test_swaks_starttls_auth_plain(postfix: PostfixInstance) -> None:
    """swaks: STARTTLS verified against the test CA, AUTH PLAIN, delivered.

    swaks 20201014 checks the chain only, not the host name.
    """
    swaks = require_binary("swaks")
    recipient, token = postfix.address(_unique("swaks")), _unique("token")
    _run(
        [
            swaks,
            *("--server", postfix.host, "--port", str(postfix.port)),
            *("--ehlo", CLIENT_NAME, "--from", SENDER, "--to", recipient),
            "--tls",
            "--tls-verify",
            *("--tls-ca-path", str(postfix.ca_file)),
            *("--auth", "PLAIN"),
            *("--auth-user", postfix.username, "--auth-password", postfix.password),
            *("--header", f"Subject: {token}", "--body", token),
            *("--timeout", str(TIMEOUT)),
        ],
        postfix,
    )
    _assert_delivered(postfix, recipient, token)


def test_msmtp_starttls_auth_plain(postfix: PostfixInstance, tmp_path: Path) -> None:
    """msmtp: STARTTLS verified for mx.test.example, AUTH PLAIN, delivered."""
    msmtp = require_binary("msmtp")
    recipient, token = postfix.address(_unique("msmtp")), _unique("token")
    config = tmp_path / "msmtprc"
    config.write_text(
        "account test\n"
        f"host {postfix.host}\n"
        f"port {postfix.port}\n"
        f"domain {CLIENT_NAME}\n"
        f"from {SENDER}\n"
        "tls on\n"
        "tls_starttls on\n"
        f"tls_trust_file {postfix.ca_file}\n"
        f"tls_host_override {postfix.tls_hostname}\n"
        "auth plain\n"
        f"user {postfix.username}\n"
        f"password {postfix.password}\n"
        f"timeout {TIMEOUT}\n"
    )
    config.chmod(0o600)  # msmtp refuses a password file others can read
    message = (
        f"From: {SENDER}\r\nTo: {recipient}\r\nSubject: {token}\r\n\r\n{token}\r\n"
    )
    _run(
        [msmtp, "-C", str(config), "-a", "test", recipient],
        postfix,
        stdin=message.encode(),
    )
    _assert_delivered(postfix, recipient, token)


@pytest.mark.parametrize("mechanism", ["PLAIN", "LOGIN"])
def test_smtplib_starttls_auth(
    postfix: PostfixInstance, tls_files: TLSFiles, mechanism: str
) -> None:
    """smtplib: host name and chain verified, AUTH PLAIN and LOGIN, delivered."""
    recipient, token = postfix.address(_unique("smtplib")), _unique("token")
    context = ssl.create_default_context(cafile=str(tls_files.ca_file))
    with _LoopbackSMTP(
        postfix.tls_hostname, postfix.port, CLIENT_NAME, timeout=TIMEOUT
    ) as smtp:
        smtp.starttls(context=context)
        smtp.ehlo()
        smtp.user, smtp.password = postfix.username, postfix.password
        authobject = smtp.auth_plain if mechanism == "PLAIN" else smtp.auth_login
        smtp.auth(mechanism, authobject)
        smtp.sendmail(
            SENDER, [recipient], f"Subject: {token}\r\n\r\n{token}\r\n".encode()
        )
    _assert_delivered(postfix, recipient, token)


def test_auth_not_offered_before_starttls(postfix: PostfixInstance) -> None:
    """Credentials never cross in clear: AUTH only appears after STARTTLS."""
    with smtplib.SMTP(postfix.host, postfix.port, CLIENT_NAME, timeout=TIMEOUT) as s:
        s.ehlo()
        assert s.has_extn("starttls")
        assert not s.has_extn("auth"), s.esmtp_features


def test_unauthenticated_mail_is_refused(
    postfix: PostfixInstance, tls_files: TLSFiles
) -> None:
    """Delivery proves AUTH worked only if mail without AUTH is refused."""
    context = ssl.create_default_context(cafile=str(tls_files.ca_file))
    with _LoopbackSMTP(
        postfix.tls_hostname, postfix.port, CLIENT_NAME, timeout=TIMEOUT
    ) as smtp:
        smtp.starttls(context=context)
        smtp.ehlo()
        smtp.mail(SENDER)
        code, _ = smtp.rcpt(postfix.address(_unique("noauth")))
    assert code == 554


def test_certificate_is_checked_for_the_wrong_name(
    postfix: PostfixInstance, tls_files: TLSFiles
) -> None:
    """The harness's certificate fails for another name, so checks are real."""
    context = ssl.create_default_context(cafile=str(tls_files.ca_file))
    with (
        _LoopbackSMTP("other.example", postfix.port, CLIENT_NAME, timeout=TIMEOUT) as s,
        pytest.raises(ssl.SSLCertVerificationError),
    ):
        s.starttls(context=context)
