"""`txstarttls-sendmail` as cron, PHP and mail(1) call it.

Option parsing and message building are plain functions; the command runs
in-process (``run`` with its streams) and as the installed console script,
and what it drops in ``incoming/`` is adopted by a real FilesystemStore.
"""

from __future__ import annotations

import errno
import io
import os
import shutil
import subprocess
import sys
from email import message_from_bytes
from email.header import decode_header
from pathlib import Path
from typing import Any, cast

import pytest
import pytest_twisted
from twisted.internet import reactor as global_reactor
from twisted.internet.interfaces import IReactorFromThreads

from txstarttls import sendmail
from txstarttls.operator import FLUSH_REQUEST, list_queue
from txstarttls.queue import FilesystemStore, StoreError
from txstarttls.sendmail import (
    UsageError,
    build_message,
    default_sender,
    parse_arguments,
    read_message,
    run,
    split_address_list,
)

reactor = cast(IReactorFromThreads, global_reactor)
MESSAGE = b"Subject: report\nTo: ops@example.com\n\nline one\nline two\n"


@pytest.fixture
def queue_dir(tmp_path: Path) -> Path:
    directory = tmp_path / "queue"
    directory.mkdir()
    return directory


def send(
    queue_dir: Path, *args: str, stdin: bytes = MESSAGE, **environ: str
) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    status = run(
        ["--queue", str(queue_dir), *args], io.BytesIO(stdin), out, err, environ
    )
    return status, out.getvalue(), err.getvalue()


def only_message(queue_dir: Path) -> tuple[Any, bytes]:
    messages, problems = list_queue(queue_dir)
    assert problems == [] and len(messages) == 1
    entry = messages[0].entry
    content = (queue_dir / "incoming" / f"{entry.queue_id}.eml").read_bytes()
    return entry, content


# -- options ---------------------------------------------------------------------


def test_common_option_spellings() -> None:
    options = parse_arguments(
        [
            *("-ti", "-fcron@example.org", "-F", "Cron Daemon", "-odi", "-oem"),
            *("-bm", "-v", "-N", "failure,delay", "-R", "hdrs", "-V", "id-1"),
            "a@example.com",
        ]
    )
    assert options.extract_recipients and options.ignore_dots and options.verbose
    assert options.sender == "cron@example.org"
    assert options.full_name == "Cron Daemon"
    assert (options.notify, options.ret, options.envid) == (
        "FAILURE,DELAY",
        "HDRS",
        "id-1",
    )
    assert options.recipients == ["a@example.com"]
    assert parse_arguments(["-oi"]).ignore_dots
    assert parse_arguments(["-r", "x@example.com"]).sender == "x@example.com"
    assert parse_arguments(["a@x.org", "-f", "s@x.org"]).sender == "s@x.org"
    assert parse_arguments(["--", "-i"]).recipients == ["-i"]
    assert parse_arguments(["--queue=/q"]).queue == "/q"
    assert parse_arguments(["-bp"]).mode == "mailq"
    assert parse_arguments(["-q"]).mode == "flush"
    assert parse_arguments([], program="/usr/bin/mailq").mode == "mailq"


@pytest.mark.parametrize(
    "argv",
    [["-Z"], ["-bs"], ["-bv"], ["-f"], ["--queue"], ["--frobnicate"], ["-N", "often"]],
)
def test_unsupported_options_are_usage_errors(argv: list[str]) -> None:
    with pytest.raises(UsageError):
        parse_arguments(argv)


def test_usage_errors_exit_64_in_one_line(queue_dir: Path) -> None:
    status, _, err = send(queue_dir, "-bs")
    assert status == 64
    assert (
        err
        == "txstarttls-sendmail: -bs is not supported (only -bm and -bp) (see --help)\n"
    )
    status, _, err = send(queue_dir)
    assert status == 64
    assert "no recipients given" in err
    assert not (queue_dir / "incoming").exists()


# -- reading and building the message ----------------------------------------------


def test_a_lone_dot_ends_the_input_unless_i() -> None:
    data = b"Subject: x\n\nbefore\n.\nafter\n"
    assert (
        read_message(io.BytesIO(data), ignore_dots=False) == b"Subject: x\n\nbefore\n"
    )
    assert read_message(io.BytesIO(data), ignore_dots=True) == data
    crlf = b"a\r\n.\r\nb\r\n"
    assert read_message(io.BytesIO(crlf), ignore_dots=False) == b"a\r\n"
    assert read_message(io.BytesIO(b"..\n.x\n"), ignore_dots=False) == b"..\n.x\n"


def build(raw: bytes, **changes: Any) -> Any:
    arguments = {
        "queue_id": "0123456789ABCDEF01",
        "sender": "cron@example.org",
        "full_name": None,
        "arrival": 1_790_000_000.0,
        "hostname": "host.example",
        "uid": 1000,
    }
    return build_message(raw, **{**arguments, **changes})


def test_bare_lf_becomes_crlf_and_missing_fields_are_added() -> None:
    built = build(b"Subject: hi\nTo: a@example.com\n\nbody\rmore\nlast line")
    content = built.content
    assert b"\n" not in content.replace(b"\r\n", b"")
    assert b"\r" not in content.replace(b"\r\n", b"")
    assert content.endswith(b"\r\nbody\r\nmore\r\nlast line\r\n")
    assert content.startswith(
        b"Received: by host.example (txstarttls-sendmail, from userid 1000)\r\n"
        b"\tid 0123456789ABCDEF01; "
    )
    parsed = message_from_bytes(content)
    assert parsed["From"] == "cron@example.org"
    assert parsed["Date"] and parsed["Message-ID"].endswith("@host.example>")
    assert parsed["Subject"] == "hi"


def test_existing_fields_are_kept() -> None:
    raw = (
        b"From: Boss <boss@example.org>\r\nDate: Mon, 1 Jan 2024 00:00:00 +0000\r\n"
        b"Message-ID: <given@example.org>\r\n\r\nbody\r\n"
    )
    built = build(raw, full_name="Ignored")
    header = built.content.split(b"\r\n\r\n")[0]
    assert header.count(b"From:") == 1 and b"Ignored" not in header
    assert header.count(b"Date:") == 1 and header.count(b"Message-ID:") == 1


def test_t_takes_to_cc_bcc_and_removes_bcc() -> None:
    raw = (
        b"To: A <a@example.com>, b@example.com\n"
        b"Cc: c@example.com,\n d@example.com\n"
        b"Bcc: hidden@example.com\n"
        b"Subject: x\n\nBcc: in the body stays\n"
    )
    built = build(raw)
    assert built.header_recipients == (
        "a@example.com",
        "b@example.com",
        "c@example.com",
        "d@example.com",
        "hidden@example.com",
    )
    header, body = built.content.split(b"\r\n\r\n", 1)
    assert b"hidden" not in header and b"Bcc" not in header
    assert b"Cc: c@example.com,\r\n d@example.com\r\n" in header + b"\r\n"
    assert body == b"Bcc: in the body stays\r\n"


def test_resent_headers_win_when_present() -> None:
    raw = (
        b"To: old@example.com\nResent-To: new@example.com\n"
        b"Resent-Bcc: b@example.com\n\nx\n"
    )
    built = build(raw)
    assert built.header_recipients == ("new@example.com", "b@example.com")
    assert b"Resent-Bcc" not in built.content


def test_a_message_without_headers_gets_them_and_a_blank_line() -> None:
    built = build(b"just a body line\nand another\n")
    header, body = built.content.split(b"\r\n\r\n", 1)
    assert b"\r\nFrom: cron@example.org" in header
    assert body == b"just a body line\r\nand another\r\n"
    mbox = build(b"From cron Mon Jan  1 00:00:00 2024\nSubject: s\n\nb\n")
    assert b"From cron" not in mbox.content


@pytest.mark.parametrize(
    ("value", "addresses"),
    [
        ("a@x.org, B <b@x.org>", ["a@x.org", "b@x.org"]),
        ('"Last, First" <c@x.org>', ["c@x.org"]),
        ("a@x.org (a comment, with a comma)", ["a@x.org"]),
        ("undisclosed-recipients:;", []),
        ("Team: d@x.org, e@x.org;, f@x.org", ["d@x.org", "e@x.org", "f@x.org"]),
        ("g@[IPv6:2001:db8::1]", ["g@[IPv6:2001:db8::1]"]),
        ("a@x.org, bob@", ["a@x.org", "bob@"]),
    ],
)
def test_address_lists_are_split_without_losing_anything(
    value: str, addresses: list[str]
) -> None:
    assert split_address_list(value) == addresses


def test_full_name_is_quoted_or_encoded() -> None:
    quoted = build(b"\n", full_name="Cron, Daemon")
    assert b'From: "Cron, Daemon" <cron@example.org>\r\n' in quoted.content
    encoded = build(b"\n", full_name="Jörg Üß")
    field = message_from_bytes(encoded.content)["From"]
    assert field.isascii() and field.endswith(" <cron@example.org>")
    decoded = decode_header(field.removesuffix(" <cron@example.org>"))
    assert decoded[0][0].decode(decoded[0][1]) == "Jörg Üß"


# -- the command ----------------------------------------------------------------------


def test_queues_into_incoming_with_the_envelope(queue_dir: Path) -> None:
    status, out, err = send(
        queue_dir, "-f", "<cron@example.org>", "-N", "never", "-V", "job 7", "a@x.org"
    )
    assert (status, out, err) == (0, "", "")
    entry, content = only_message(queue_dir)
    assert entry.sender == "cron@example.org"
    assert [(r.address, r.notify) for r in entry.recipients] == [("a@x.org", "NEVER")]
    assert entry.mail_parameters == ("ENVID=job+207",)
    assert entry.size == len(content)
    assert b"\r\nline one\r\nline two\r\n" in content


def test_default_sender_and_null_sender(queue_dir: Path, tmp_path: Path) -> None:
    assert default_sender().endswith("@localhost")
    send(queue_dir, "a@x.org")
    entry, _ = only_message(queue_dir)
    assert entry.sender == default_sender()
    other = tmp_path / "other"
    other.mkdir()
    assert send(other, "-f", "<>", "a@x.org")[0] == 0
    assert only_message(other)[0].sender == ""


def test_queue_from_the_environment(queue_dir: Path) -> None:
    out, err = io.StringIO(), io.StringIO()
    environ = {"TXSTARTTLS_QUEUE": str(queue_dir)}
    status = run(["-v", "a@x.org"], io.BytesIO(MESSAGE), out, err, environ)
    assert status == 0
    entry, _ = only_message(queue_dir)
    assert out.getvalue() == f"txstarttls-sendmail: queued as {entry.queue_id}\n"


def test_recipients_from_t_and_arguments_are_merged(queue_dir: Path) -> None:
    raw = b"To: ops@example.com\nBcc: audit@example.com\n\nbody\n"
    assert send(queue_dir, "-t", "ops@example.com", "x@example.com", stdin=raw)[0] == 0
    entry, content = only_message(queue_dir)
    assert [r.address for r in entry.recipients] == [
        "ops@example.com",
        "x@example.com",
        "audit@example.com",
    ]
    assert b"audit" not in content


@pytest.mark.parametrize(
    "args",
    [
        ["-F", "Evil\r\nBcc: victim@example.com", "a@x.org"],
        ["-F", "Evil\nX-Injected: yes", "a@x.org"],
        ["-F", "Evil\x00", "a@x.org"],
        ["a@x.org\r\nRCPT TO:<victim@example.com>"],
        ["-f", "s@x.org\r\nRCPT TO:<victim@example.com>", "a@x.org"],
        ["not-an-address"],
        ["root"],
        ["a@x.org, bob@"],
        ["a@x.org", "<b@x.org>>"],
        ["Name <a@x.org"],
    ],
)
def test_injection_and_bad_addresses_are_refused_with_65(
    queue_dir: Path, args: list[str]
) -> None:
    status, _, err = send(queue_dir, *args)
    assert status == 65
    assert err.count("\n") == 1 and err.startswith("txstarttls-sendmail: ")
    assert "\r" not in err
    assert list_queue(queue_dir) == ([], [])


def test_t_without_any_recipient_or_with_a_bad_one_is_65(queue_dir: Path) -> None:
    assert send(queue_dir, "-t", stdin=b"Subject: none\n\nx\n")[0] == 65
    bad = b"To: a@x.org\nCc: broken@@x\n\nx\n"
    status, _, err = send(queue_dir, "-t", stdin=bad)
    assert status == 65 and "recipient header" in err


def test_missing_queue_directory_is_73(tmp_path: Path) -> None:
    status, _, err = send(tmp_path / "nope", "a@x.org")
    assert status == 73
    assert "does not exist" in err
    assert not (tmp_path / "nope").exists()


@pytest.mark.parametrize(
    ("code", "status"), [(errno.ENOSPC, 75), (errno.EIO, 75), (errno.EACCES, 73)]
)
def test_disk_errors(
    queue_dir: Path, monkeypatch: pytest.MonkeyPatch, code: int, status: int
) -> None:
    def failing(*args: object, **kwargs: object) -> None:
        raise StoreError(
            f"queue write failed: {errno.errorcode[code]}", errno_code=code
        )

    monkeypatch.setattr(sendmail, "deliver_to_incoming", failing)
    result, _, err = send(queue_dir, "a@x.org")
    assert result == status
    assert errno.errorcode[code] in err


def test_bp_lists_and_q_flushes(queue_dir: Path) -> None:
    send(queue_dir, "a@x.org")
    status, out, _ = send(queue_dir, "-bp")
    assert status == 0 and "a@x.org [pending]" in out
    status, out, _ = send(queue_dir, "-q")
    assert status == 0 and "no relay is running" in out
    assert (queue_dir / FLUSH_REQUEST).exists()


# -- as a process, picked up by the relay's store ------------------------------------


def console_script() -> list[str]:
    installed = shutil.which("txstarttls-sendmail")
    if installed is None:
        return [sys.executable, "-c", "from txstarttls.sendmail import main; main()"]
    return [installed]


@pytest.mark.parametrize(
    "command",
    [
        pytest.param(console_script(), id="console-script"),
        pytest.param(
            [sys.executable, "-c", "from txstarttls.sendmail import main; main()"],
            id="python-c",
        ),
    ],
)
@pytest_twisted.ensureDeferred
async def test_a_drop_is_adopted_by_the_relays_store(
    queue_dir: Path, command: list[str]
) -> None:
    message = b"From: cron@example.org\nTo: ops@example.com\nSubject: nightly\n\nok\n"
    result = subprocess.run(
        [*command, "-t", "-i", "-f", "cron@example.org"],
        input=message + b".\nstill the body\n",
        capture_output=True,
        env={**os.environ, "TXSTARTTLS_QUEUE": str(queue_dir)},
        check=False,
        timeout=60,
    )
    assert (result.returncode, result.stderr) == (0, b"")
    store = FilesystemStore(queue_dir, reactor, durable=False)
    try:
        adopted = await store.adopt_incoming()
        assert len(adopted) == 1
        entry = store.get(adopted[0])
        assert entry.sender == "cron@example.org"
        assert [r.address for r in entry.recipients] == ["ops@example.com"]
        content = store.read_content(adopted[0])
        assert content.endswith(b"\r\n\r\nok\r\n.\r\nstill the body\r\n")
        assert os.listdir(queue_dir / "incoming") == []
    finally:
        await store.close()


def test_a_lone_dot_line_ends_the_message_of_a_process(queue_dir: Path) -> None:
    result = subprocess.run(
        [*console_script(), "--queue", str(queue_dir), "a@x.org"],
        input=b"Subject: s\n\nkept\n.\ndropped\n",
        capture_output=True,
        check=False,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    _, content = only_message(queue_dir)
    assert content.endswith(b"\r\n\r\nkept\r\n")


def test_a_bad_address_from_a_process_exits_65(queue_dir: Path) -> None:
    result = subprocess.run(
        [*console_script(), "--queue", str(queue_dir), "-F", "x\ny", "a@x.org"],
        input=MESSAGE,
        capture_output=True,
        check=False,
        timeout=60,
    )
    assert result.returncode == 65
    assert result.stderr.count(b"\n") == 1
