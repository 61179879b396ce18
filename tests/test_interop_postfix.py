"""Our client and our relay against a real Postfix (STARTTLS + SASL AUTH).

``txstarttls send`` is run exactly as a user runs it from the README; the
relay runs as ``twistd starttls-relay`` with the private Postfix as its
smarthost. Either way the message must land in Postfix's Maildir, received
with ESMTPSA (TLS and AUTH, RFC 3848) from our authenticated user.
"""

from __future__ import annotations

import re
import signal
import smtplib
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from tests.support.postfix import PostfixInstance
from tests.support.requirements import require_binary
from tests.support.tls import TLSFiles
from tests.test_crash import wait_for_port
from tests.test_service import free_port, relay_environment, twistd

pytestmark = pytest.mark.interop


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


def password_file(postfix: PostfixInstance, tmp_path: Path) -> Path:
    path = tmp_path / "password"
    path.write_text(postfix.password + "\n")
    return path


def run_send(
    postfix: PostfixInstance, message: Path, *options: str
) -> subprocess.CompletedProcess[bytes]:
    """``txstarttls send`` to the private Postfix, as a user runs it."""
    return subprocess.run(
        [
            *(sys.executable, "-m", "txstarttls", "send"),
            *("--host", postfix.host, "--port", str(postfix.port)),
            *("--ca-file", str(postfix.ca_file)),
            *("--from", "cron@client.test.example"),
            *options,
            str(message),
        ],
        capture_output=True,
        timeout=60,
        check=False,
    )


def assert_delivered_with_tls_and_auth(
    postfix: PostfixInstance, recipient: str, token: str
) -> bytes:
    (message,) = postfix.wait_for_message(recipient=recipient, timeout=30)
    assert token.encode() in message
    assert b"with ESMTPSA" in message, message.decode(errors="replace")
    assert f"(Authenticated sender: {postfix.username}@".encode() in message
    return message


def test_txstarttls_send_delivers_to_postfix_over_verified_starttls_with_auth(
    postfix: PostfixInstance, tmp_path: Path
) -> None:
    recipient = postfix.address(unique("send"))
    token = unique("token")
    message = tmp_path / "message.eml"
    message.write_bytes(
        f"Subject: {token}\r\n\r\n.leading dot\r\nbody {token}\r\n".encode()
    )
    completed = run_send(
        postfix,
        message,
        *("--tls-hostname", postfix.tls_hostname, "--to", recipient, "-v"),
        *("--username", postfix.username),
        *("--password-file", str(password_file(postfix, tmp_path))),
    )
    output = completed.stdout.decode() + completed.stderr.decode()
    assert completed.returncode == 0, output + postfix.maillog_tail()
    assert f"to=<{recipient}>" in output
    assert "tls=TLSv1." in output and "status=sent (250 2.0.0" in output
    assert postfix.password not in output
    delivered = assert_delivered_with_tls_and_auth(postfix, recipient, token)
    # Dot-stuffing undone by Postfix: the line arrives as it was written.
    assert b"\n.leading dot" in delivered.replace(b"\r\n", b"\n")


def test_txstarttls_send_with_chunking_delivers_to_postfix_with_bdat(
    postfix: PostfixInstance, tmp_path: Path
) -> None:
    """Postfix's smtpd offers CHUNKING: the body goes as BDAT, unstuffed."""
    recipient = postfix.address(unique("bdat"))
    token = unique("token")
    message = tmp_path / "message.eml"
    message.write_bytes(
        f"Subject: {token}\r\n\r\n.leading dot\r\n..two dots\r\n".encode()
    )
    completed = run_send(
        postfix,
        message,
        *("--tls-hostname", postfix.tls_hostname, "--to", recipient, "-v"),
        *("--username", postfix.username),
        *("--password-file", str(password_file(postfix, tmp_path))),
        "--chunking",
    )
    output = completed.stdout.decode() + completed.stderr.decode()
    assert completed.returncode == 0, output + postfix.maillog_tail()
    assert re.search(r"^-> BDAT \d+ LAST$", output, re.M), output
    assert not re.search(r"^-> DATA$", output, re.M)
    delivered = assert_delivered_with_tls_and_auth(postfix, recipient, token)
    body = delivered.replace(b"\r\n", b"\n")
    assert b"\n.leading dot\n..two dots\n" in body


def test_wrong_password_is_a_permanent_authentication_failure(
    postfix: PostfixInstance, tmp_path: Path
) -> None:
    wrong = tmp_path / "wrong"
    wrong.write_text("not the password\n")
    message = tmp_path / "message.eml"
    message.write_bytes(b"Subject: x\r\n\r\nx\r\n")
    completed = run_send(
        postfix,
        message,
        *("--tls-hostname", postfix.tls_hostname),
        *("--to", postfix.address(unique("wrong"))),
        *("--username", postfix.username, "--password-file", str(wrong)),
    )
    assert completed.returncode == 69, completed.stderr.decode()
    assert b"535" in completed.stderr


def test_certificate_for_another_name_is_refused_before_ehlo(
    postfix: PostfixInstance, tmp_path: Path
) -> None:
    message = tmp_path / "message.eml"
    message.write_bytes(b"Subject: x\r\n\r\nx\r\n")
    completed = run_send(
        postfix,
        message,
        *("--tls-hostname", "smtp.wrong.example"),
        *("--to", postfix.address(unique("name")), "-v"),
    )
    assert completed.returncode == 75, completed.stderr.decode()
    transcript = completed.stderr.decode()
    assert "server certificate is not valid for smtp.wrong.example" in transcript
    assert transcript.count("-> EHLO") == 1


def test_relay_delivers_through_postfix_as_smarthost(
    postfix: PostfixInstance, tmp_path: Path, tls_files: TLSFiles
) -> None:
    port = free_port()
    log = tmp_path / "relay.log"
    relay = subprocess.Popen(
        twistd(
            "--queue",
            str(tmp_path / "queue"),
            "--listen",
            f"tcp:{port}:interface=127.0.0.1",
            "--smarthost",
            f"{postfix.host}:{postfix.port}",
            "--tls-hostname",
            postfix.tls_hostname,
            "--ca-file",
            str(postfix.ca_file),
            "--username",
            postfix.username,
            "--password-file",
            str(password_file(postfix, tmp_path)),
            "--hostname",
            "relay.client.test.example",
        ),
        env=relay_environment(),
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
    )
    try:
        wait_for_port(port, relay, log)
        recipient = postfix.address(unique("relay"))
        token = unique("token")
        with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
            client.sendmail(
                "cron@client.test.example",
                [recipient],
                f"Subject: {token}\r\n\r\nvia the relay {token}\r\n".encode(),
            )
        delivered = assert_delivered_with_tls_and_auth(postfix, recipient, token)
        assert b"by relay.client.test.example (txstarttls)" in delivered
        text = log.read_text()
        assert f"to=<{recipient}>" in text and "status=sent (250 2.0.0" in text
    finally:
        relay.terminate()
        relay.wait(timeout=30)


def test_relay_end_to_end_swaks_sendmail_mailq_and_sigterm(
    postfix: PostfixInstance, tmp_path: Path
) -> None:
    """The operator's day: sendmail while the relay is down, mailq, start,
    swaks into the relay, delivery to the Postfix smarthost, SIGTERM."""
    swaks = require_binary("swaks")
    queue = tmp_path / "queue"
    queue.mkdir()
    (queue / "messages").mkdir()
    (queue / "incoming").mkdir()
    early = postfix.address(unique("early"))
    early_token = unique("sendmail")
    dropped = subprocess.run(
        [
            *(sys.executable, "-c", "from txstarttls.sendmail import main; main()"),
            *("--queue", str(queue), "-t", "-i", "-f", "cron@client.test.example"),
        ],
        input=f"To: {early}\nSubject: {early_token}\n\n{early_token}\n".encode(),
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert dropped.returncode == 0, dropped.stderr.decode()
    listed = subprocess.run(
        [sys.executable, "-m", "txstarttls", "mailq", "--queue", str(queue)],
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert listed.returncode == 0, listed.stderr.decode()
    assert early in listed.stdout.decode()
    assert "1 Request" in listed.stdout.decode()

    port = free_port()
    log = tmp_path / "relay.log"
    relay = subprocess.Popen(
        twistd(
            *("--queue", str(queue), "--listen", f"tcp:{port}:interface=127.0.0.1"),
            *("--smarthost", f"{postfix.host}:{postfix.port}"),
            *(
                "--tls-hostname",
                postfix.tls_hostname,
                "--ca-file",
                str(postfix.ca_file),
            ),
            *("--username", postfix.username),
            *("--password-file", str(password_file(postfix, tmp_path))),
        ),
        env={**relay_environment(), "PYTHONUNBUFFERED": "1"},
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
    )
    try:
        wait_for_port(port, relay, log)
        recipient = postfix.address(unique("swaks"))
        token = unique("swaks")
        sent = subprocess.run(
            [
                *(swaks, "--server", "127.0.0.1", "--port", str(port)),
                *("--ehlo", "legacy.example", "--from", "cron@client.test.example"),
                *("--to", recipient, "--header", f"Subject: {token}", "--body", token),
            ],
            capture_output=True,
            timeout=60,
            check=False,
        )
        assert sent.returncode == 0, sent.stdout.decode()
        assert_delivered_with_tls_and_auth(postfix, recipient, token)
        assert_delivered_with_tls_and_auth(postfix, early, early_token)
        emptied = subprocess.run(
            [sys.executable, "-m", "txstarttls", "mailq", "--queue", str(queue)],
            capture_output=True,
            timeout=60,
            check=False,
        )
        assert "Mail queue is empty" in emptied.stdout.decode(), emptied.stdout
    finally:
        relay.send_signal(signal.SIGTERM)
        code = relay.wait(timeout=30)
    assert code in (0, -signal.SIGTERM), log.read_text()
    text = log.read_text()
    assert "Server Shut Down." in text and "Traceback" not in text
