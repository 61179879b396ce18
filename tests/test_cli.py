"""`txstarttls send` and `txstarttls demo` as a user runs them: a real process."""

from __future__ import annotations

import os
import re
import sys
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.utils import getProcessOutputAndValue

from txstarttls.testing import RunningServer, TestMailServer

PASSWORD = "correct horse"

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


async def run_cli(
    *args: str, stdin: Path | None = None, env: dict[str, str] | None = None
) -> tuple[int, str, str]:
    """Run `python -m txstarttls ARGS` without blocking the reactor."""
    argv = ["-m", "txstarttls", *args]
    if stdin is not None:
        # getProcessOutputAndValue gives no stdin: open the file as fd 0, exec.
        argv = [
            "-c",
            f"import os, sys; os.dup2(os.open({str(stdin)!r}, os.O_RDONLY), 0); "
            f"os.execv(sys.executable, [sys.executable, *{argv!r}])",
        ]
    out, err, code = await getProcessOutputAndValue(
        sys.executable, argv, env={**os.environ, **(env or {})}, reactor=reactor
    )
    return code, out.decode(), err.decode()


@pytest_twisted.async_yield_fixture
async def server() -> AsyncIterator[tuple[TestMailServer, RunningServer]]:
    mail_server = TestMailServer(users={"alice": PASSWORD}, tokens={"alice": "tok-123"})
    running = await mail_server.start(reactor)
    yield mail_server, running
    await running.stop()


def base_args(
    mail_server: TestMailServer, running: RunningServer, tmp_path: Path
) -> list[str]:
    ca_file = mail_server.ca_file(tmp_path / "ca.pem")
    return [
        "send",
        "--host",
        "127.0.0.1",
        "--port",
        str(running.port),
        "--tls-hostname",
        "mx.test.example",
        "--ca-file",
        str(ca_file),
        "--from",
        "cron@legacy.example",
    ]


def password_file(tmp_path: Path, text: str = PASSWORD + "\n") -> str:
    path = tmp_path / "password"
    path.write_text(text)
    return str(path)


def message_file(tmp_path: Path, content: bytes) -> Path:
    path = tmp_path / "message.eml"
    path.write_bytes(content)
    return path


MESSAGE = b"Subject: hello\r\n\r\n.dot line\r\nbody\r\n"
RESULT_LINE = re.compile(
    r"to=<(?P<to>[^>]+)>, relay=127\.0\.0\.1\[127\.0\.0\.1\]:\d+, tls=TLSv1\.[23], "
    r"dsn=(?P<dsn>\d\.\d+\.\d+), status=(?P<status>\w+) \((?P<reply>.*)\)"
)


def auth_args(tmp_path: Path) -> Sequence[str]:
    return ["--username", "alice", "--password-file", password_file(tmp_path)]


@pytest_twisted.ensureDeferred
async def test_send_delivers_and_prints_one_postfix_line_per_recipient(
    server: tuple[TestMailServer, RunningServer], tmp_path: Path
) -> None:
    mail_server, running = server
    code, out, err = await run_cli(
        *base_args(mail_server, running, tmp_path),
        *auth_args(tmp_path),
        "--to",
        "a@example.net",
        "--to",
        "b@example.net",
        str(message_file(tmp_path, MESSAGE)),
    )
    assert code == 0, err
    lines = out.splitlines()
    assert len(lines) == 2
    matches = [RESULT_LINE.fullmatch(line) for line in lines]
    assert all(matches), lines
    assert [m["to"] for m in matches if m] == ["a@example.net", "b@example.net"]
    assert all(m["status"] == "sent" and m["dsn"] == "2.0.0" for m in matches if m)
    (received,) = mail_server.messages
    # The message goes as given: no header added, dot-stuffing undone.
    assert received.data == MESSAGE
    assert received.authenticated_as == "alice"
    assert received.tls


@pytest_twisted.ensureDeferred
async def test_send_with_chunking_uses_bdat_over_a_real_tls_session(
    server: tuple[TestMailServer, RunningServer], tmp_path: Path
) -> None:
    mail_server, running = server
    mail_server.script.ehlo_extensions(
        post_tls=["PIPELINING", "AUTH PLAIN", "ENHANCEDSTATUSCODES", "CHUNKING"]
    )
    code, _, err = await run_cli(
        *base_args(mail_server, running, tmp_path),
        *auth_args(tmp_path),
        "--chunking",
        "--to",
        "a@example.net",
        str(message_file(tmp_path, MESSAGE)),
    )
    assert code == 0, err
    (received,) = mail_server.messages
    assert received.data == MESSAGE
    (session,) = mail_server.factory.sessions
    sent = [line for direction, line in session.transcript if direction == "C"]
    assert f"BDAT {len(MESSAGE)} LAST\r\n".encode() in sent
    assert b"DATA\r\n" not in sent


@pytest_twisted.ensureDeferred
async def test_send_reads_the_message_from_stdin(
    server: tuple[TestMailServer, RunningServer], tmp_path: Path
) -> None:
    mail_server, running = server
    code, _, err = await run_cli(
        *base_args(mail_server, running, tmp_path),
        *auth_args(tmp_path),
        "--to",
        "a@example.net",
        stdin=message_file(tmp_path, b"Subject: stdin\n\nbare newlines\n"),
    )
    assert code == 0, err
    assert mail_server.messages[0].data == b"Subject: stdin\r\n\r\nbare newlines\r\n"


@pytest_twisted.ensureDeferred
async def test_password_from_environment(
    server: tuple[TestMailServer, RunningServer], tmp_path: Path
) -> None:
    mail_server, running = server
    code, _, err = await run_cli(
        *base_args(mail_server, running, tmp_path),
        "--username",
        "alice",
        "--password-env",
        "SMTP_PASSWORD",
        "--to",
        "a@example.net",
        str(message_file(tmp_path, MESSAGE)),
        env={"SMTP_PASSWORD": PASSWORD},
    )
    assert code == 0, err


@pytest_twisted.ensureDeferred
async def test_only_one_trailing_newline_of_the_password_file_is_ignored(
    server: tuple[TestMailServer, RunningServer], tmp_path: Path
) -> None:
    mail_server, running = server
    code, _, err = await run_cli(
        *base_args(mail_server, running, tmp_path),
        "--username",
        "alice",
        "--password-file",
        password_file(tmp_path, PASSWORD + "\n\n"),
        "--to",
        "a@example.net",
        str(message_file(tmp_path, MESSAGE)),
    )
    # The second newline belongs to the password, which cannot hold one.
    assert code == 78, err
    assert "password" in err
    assert PASSWORD not in err
    assert mail_server.factory.sessions == []


@pytest_twisted.ensureDeferred
async def test_oauth2_token_command(
    server: tuple[TestMailServer, RunningServer], tmp_path: Path
) -> None:
    mail_server, running = server
    code, _, err = await run_cli(
        *base_args(mail_server, running, tmp_path),
        "--username",
        "alice",
        "--oauth2-token-command",
        "echo tok-123",
        "--to",
        "a@example.net",
        str(message_file(tmp_path, MESSAGE)),
    )
    assert code == 0, err
    assert mail_server.messages[0].authenticated_as == "alice"


@pytest_twisted.ensureDeferred
async def test_verbose_transcript_redacts_auth(
    server: tuple[TestMailServer, RunningServer], tmp_path: Path
) -> None:
    mail_server, running = server
    code, _, err = await run_cli(
        *base_args(mail_server, running, tmp_path),
        *auth_args(tmp_path),
        "-v",
        "--to",
        "a@example.net",
        str(message_file(tmp_path, MESSAGE)),
    )
    assert code == 0, err
    assert "-> STARTTLS" in err
    assert "-> AUTH PLAIN <redacted>" in err
    assert PASSWORD not in err
    assert "Y29ycmVjdCBob3JzZQ" not in err  # base64 of the password


@pytest_twisted.ensureDeferred
async def test_partial_refusal_prints_each_recipient_and_exits_69(
    server: tuple[TestMailServer, RunningServer], tmp_path: Path
) -> None:
    mail_server, running = server
    mail_server.script.reply_to(
        "RCPT", "550 5.1.1 No such user", match=lambda arg: "nobody@" in arg
    )
    code, out, err = await run_cli(
        *base_args(mail_server, running, tmp_path),
        *auth_args(tmp_path),
        "--to",
        "a@example.net",
        "--to",
        "nobody@example.net",
        str(message_file(tmp_path, MESSAGE)),
    )
    assert code == 69, err
    statuses = {
        m["to"]: m["status"] for m in map(RESULT_LINE.fullmatch, out.splitlines()) if m
    }
    assert statuses == {"a@example.net": "sent", "nobody@example.net": "bounced"}


@pytest_twisted.ensureDeferred
async def test_transient_failure_exits_75(
    server: tuple[TestMailServer, RunningServer], tmp_path: Path
) -> None:
    mail_server, running = server
    mail_server.script.reply_to("DATA_END", "451 4.3.0 try again later")
    code, _, err = await run_cli(
        *base_args(mail_server, running, tmp_path),
        *auth_args(tmp_path),
        "--to",
        "a@example.net",
        str(message_file(tmp_path, MESSAGE)),
    )
    assert code == 75, err
    assert "451 4.3.0 try again later" in err


@pytest_twisted.ensureDeferred
async def test_wrong_fingerprint_is_transient(
    server: tuple[TestMailServer, RunningServer], tmp_path: Path
) -> None:
    mail_server, running = server
    code, _, err = await run_cli(
        *base_args(mail_server, running, tmp_path),
        "--fingerprint",
        "AB:" * 31 + "AB",
        "--to",
        "a@example.net",
        str(message_file(tmp_path, MESSAGE)),
    )
    assert code == 75, err
    assert "pinned" in err
    assert mail_server.messages == []


@pytest_twisted.ensureDeferred
async def test_matching_fingerprint_with_colons_and_upper_case(
    server: tuple[TestMailServer, RunningServer], tmp_path: Path
) -> None:
    mail_server, running = server
    digits = mail_server.certificate.fingerprint.upper()
    pinned = ":".join(digits[i : i + 2] for i in range(0, 64, 2))
    code, _, err = await run_cli(
        *base_args(mail_server, running, tmp_path),
        *auth_args(tmp_path),
        "--fingerprint",
        pinned,
        "--to",
        "a@example.net",
        str(message_file(tmp_path, MESSAGE)),
    )
    assert code == 0, err


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--ca-file", "/nonexistent/ca.pem"], 78),
        (["--fingerprint", "abc"], 78),
        (["--from", "a@x.example\r\nRCPT TO:<evil@y.example>"], 64),
        (["--tls", "sometimes"], 64),
        (["--username", "alice"], 64),
    ],
)
@pytest_twisted.ensureDeferred
async def test_bad_settings_exit_before_connecting(
    server: tuple[TestMailServer, RunningServer],
    tmp_path: Path,
    args: list[str],
    expected: int,
) -> None:
    mail_server, running = server
    code, _, err = await run_cli(
        *base_args(mail_server, running, tmp_path),
        "--to",
        "a@example.net",
        *args,
        str(message_file(tmp_path, MESSAGE)),
    )
    assert code == expected, err
    assert len(err.strip().splitlines()) == 1, err
    assert mail_server.factory.sessions == []


@pytest_twisted.ensureDeferred
async def test_missing_recipient_is_a_usage_error(tmp_path: Path) -> None:
    code, _, err = await run_cli("send", "--from", "a@x.example", "--host", "127.0.0.1")
    assert code == 64
    assert "--to" in err


@pytest_twisted.ensureDeferred
async def test_demo_runs_the_relay_end_to_end_and_shows_the_delivery() -> None:
    code, out, err = await run_cli("demo")
    assert code == 0, err
    assert "-> MAIL FROM:<cron@legacy.example>" in out
    assert "the relay answered: 250 2.0.0 Ok: queued as " in out
    delivery = [line for line in out.splitlines() if "status=" in line]
    assert len(delivery) == 1
    assert re.fullmatch(
        r"[0-9A-F]{18}: to=<admin@example\.net>, relay=mx\.test\.example\[.*\], "
        r"delay=[\d.]+, delays=[\d.]+/[\d.]+/[\d.]+/[\d.]+, dsn=2\.0\.0, "
        r"status=sent \(250 2\.0\.0 Ok: queued as \w+\)",
        delivery[0],
    )
    assert "Traceback" not in err
