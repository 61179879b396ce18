"""Real clients send into the relay listener on loopback ports.

swaks and msmtp (Debian packages), Python's smtplib and our own
``txstarttls.send`` deliver into a listener backed by the real filesystem
queue, with and without STARTTLS, implicit TLS and AUTH. External programs
run in a thread so the reactor keeps serving them.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import smtplib
import ssl
import subprocess
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any, TypeVar, cast

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.address import IPv4Address
from twisted.internet.interfaces import (
    IListeningPort,
    IReactorFromThreads,
    IReactorSSL,
    IReactorTCP,
    IReactorThreads,
    IReactorTime,
)
from twisted.internet.threads import deferToThread

from tests.support.requirements import require_binary
from txstarttls import Credentials, send
from txstarttls.errors import RecipientsRefused, SMTPError
from txstarttls.queue import FilesystemStore, IMessageStore, QueueEntry
from txstarttls.server import ListenerSettings, RelayServerFactory
from txstarttls.testing import CertificateAuthority, server_tls_options
from txstarttls.userdb import UsersFileChecker, hash_password, make_portal

pytestmark = [
    pytest.mark.interop,
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
]

HOSTNAME = "mx.test.example"
USER = "alice"
PASSWORD = "correct horse battery"
UNTRUSTED = ("127.0.0.2/32",)
T = TypeVar("T")


@dataclasses.dataclass
class Relay:
    """Three listeners sharing one queue.

    ``trusted``: loopback clients relay, STARTTLS and AUTH offered.
    ``untrusted``: 127.0.0.1 is outside the allowed networks: AUTH needed.
    ``implicit``: TLS from the first byte (an ``ssl:`` listener), AUTH needed.
    """

    store: FilesystemStore
    ca_file: Path
    directory: Path
    ports: dict[str, int]
    factories: list[RelayServerFactory]

    def messages(self) -> list[tuple[QueueEntry, bytes]]:
        return [
            (self.store.get(queue_id), self.store.read_content(queue_id))
            for queue_id in self.store.queue_ids()
        ]

    def only_message(self) -> tuple[QueueEntry, bytes]:
        messages = self.messages()
        assert len(messages) == 1, messages
        return messages[0]


def received_and_body(content: bytes) -> tuple[str, bytes]:
    lines = content.split(b"\r\n")
    index = 1
    while lines[index].startswith(b"\t"):
        index += 1
    header = b"\r\n".join(lines[:index]).decode("ascii")
    return header, b"\r\n".join(lines[index:])


@pytest.fixture(scope="module")
def ca() -> CertificateAuthority:
    return CertificateAuthority()


@pytest_twisted.async_yield_fixture
async def relay(ca: CertificateAuthority, tmp_path: Path) -> AsyncIterator[Relay]:
    issued = ca.issue(HOSTNAME, "localhost", "127.0.0.1")
    ca_file = ca.write(tmp_path)
    users = tmp_path / "users"
    users.write_text(f"# test users\n{USER}:{hash_password(PASSWORD)}\n")
    portal = make_portal(UsersFileChecker(users, cast(IReactorThreads, reactor)))
    store = FilesystemStore(tmp_path / "queue", cast(IReactorFromThreads, reactor))
    base = ListenerSettings(hostname=HOSTNAME, tls_options=server_tls_options(issued))
    untrusted = dataclasses.replace(
        base,
        allowed_networks=tuple(ipaddress.ip_network(n) for n in UNTRUSTED),
    )
    implicit = dataclasses.replace(untrusted, implicit_tls=True, tls_options=None)
    clock = cast(IReactorTime, reactor)
    factories = {
        name: RelayServerFactory(
            settings, cast(IMessageStore, store), clock, portal=portal
        )
        for name, settings in (
            ("trusted", base),
            ("untrusted", untrusted),
            ("implicit", implicit),
        )
    }
    tcp = cast(IReactorTCP, reactor)
    listening: dict[str, IListeningPort] = {
        "trusted": tcp.listenTCP(0, factories["trusted"], interface="127.0.0.1"),
        "untrusted": tcp.listenTCP(0, factories["untrusted"], interface="127.0.0.1"),
        "implicit": cast(IReactorSSL, reactor).listenSSL(
            0,
            factories["implicit"],
            server_tls_options(issued),
            interface="127.0.0.1",
        ),
    }
    ports = {
        name: cast(IPv4Address, port.getHost()).port for name, port in listening.items()
    }
    yield Relay(store, ca_file, tmp_path, ports, list(factories.values()))
    for port in listening.values():
        stopped = port.stopListening()
        if stopped is not None:
            await stopped
    for factory in factories.values():
        await factory.shutdown(grace=5)
    await store.close()


async def in_thread(function: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    result: T = await deferToThread(function, *args, **kwargs)
    return result


async def run(
    argv: list[str], stdin: bytes = b""
) -> subprocess.CompletedProcess[bytes]:
    """Run a program without blocking the reactor (it talks to our listener)."""
    return await in_thread(
        subprocess.run, argv, input=stdin, capture_output=True, timeout=60
    )


def transcript(result: subprocess.CompletedProcess[bytes]) -> str:
    return (result.stdout + result.stderr).decode("utf-8", "replace")


# -- swaks ---------------------------------------------------------------------------


def swaks_args(relay: Relay, listener: str, *extra: str) -> list[str]:
    return [
        require_binary("swaks"),
        "--server",
        "127.0.0.1",
        "--port",
        str(relay.ports[listener]),
        "--helo",
        "swaks.test.example",
        "--from",
        "cron@legacy.example",
        "--to",
        "b@example.net",
        "--header",
        "Subject: swaks test",
        "--body",
        "swaks body line\n.leading dot line",
        *extra,
    ]


def swaks_tls(relay: Relay) -> list[str]:
    return [
        "--tls",
        "--tls-verify",
        "--tls-ca-path",
        str(relay.ca_file),
        "--tls-sni",
        HOSTNAME,
    ]


@pytest_twisted.ensureDeferred
async def test_swaks_plaintext_from_trusted_client(relay: Relay) -> None:
    result = await run(swaks_args(relay, "trusted"))
    assert result.returncode == 0, transcript(result)
    entry, content = relay.only_message()
    header, body = received_and_body(content)
    assert entry.sender == "cron@legacy.example"
    assert [r.address for r in entry.recipients] == ["b@example.net"]
    assert "from swaks.test.example ([127.0.0.1])" in header
    assert "with ESMTP\r\n" in header
    assert b"Subject: swaks test\r\n" in body
    assert b"\r\n\r\nswaks body line\r\n.leading dot line\r\n" in body


@pytest_twisted.ensureDeferred
async def test_swaks_starttls_verified(relay: Relay) -> None:
    result = await run(swaks_args(relay, "trusted", *swaks_tls(relay)))
    assert result.returncode == 0, transcript(result)
    assert " -> STARTTLS" in transcript(result)
    _, content = relay.only_message()
    header, _ = received_and_body(content)
    assert "with ESMTPS (using TLSv1.3 with cipher " in header


@pytest_twisted.ensureDeferred
@pytest.mark.parametrize("mechanism", ["PLAIN", "LOGIN"])
async def test_swaks_starttls_and_auth_from_untrusted_client(
    relay: Relay, mechanism: str
) -> None:
    result = await run(
        swaks_args(
            relay,
            "untrusted",
            *swaks_tls(relay),
            "--auth",
            mechanism,
            "--auth-user",
            USER,
            "--auth-password",
            PASSWORD,
        )
    )
    assert result.returncode == 0, transcript(result)
    entry, content = relay.only_message()
    assert entry.authenticated_as == USER
    assert "with ESMTPSA" in received_and_body(content)[0]


@pytest_twisted.ensureDeferred
async def test_swaks_auth_without_tls_sends_no_credentials(relay: Relay) -> None:
    result = await run(
        swaks_args(
            relay,
            "untrusted",
            "--auth",
            "PLAIN",
            "--auth-user",
            USER,
            "--auth-password",
            PASSWORD,
        )
    )
    assert result.returncode != 0
    text = transcript(result)
    assert " -> AUTH" not in text
    assert "250-AUTH" not in text
    assert relay.messages() == []


@pytest_twisted.ensureDeferred
async def test_swaks_wrong_password_is_535(relay: Relay) -> None:
    result = await run(
        swaks_args(
            relay,
            "untrusted",
            *swaks_tls(relay),
            "--auth",
            "PLAIN",
            "--auth-user",
            USER,
            "--auth-password",
            "guess",
        )
    )
    assert result.returncode != 0
    assert "535 5.7.8 Authentication credentials invalid" in transcript(result)
    assert relay.messages() == []


@pytest_twisted.ensureDeferred
async def test_swaks_untrusted_without_auth_is_denied(relay: Relay) -> None:
    result = await run(swaks_args(relay, "untrusted", *swaks_tls(relay)))
    assert result.returncode != 0
    assert "554 5.7.1 Relay access denied" in transcript(result)
    assert relay.messages() == []


@pytest_twisted.ensureDeferred
async def test_swaks_tls_on_connect(relay: Relay) -> None:
    result = await run(
        swaks_args(
            relay,
            "implicit",
            "--tls-on-connect",
            "--tls-verify",
            "--tls-ca-path",
            str(relay.ca_file),
            "--auth",
            "PLAIN",
            "--auth-user",
            USER,
            "--auth-password",
            PASSWORD,
        )
    )
    assert result.returncode == 0, transcript(result)
    entry, content = relay.only_message()
    assert entry.authenticated_as == USER
    assert "with ESMTPSA (using TLSv1." in received_and_body(content)[0]


@pytest_twisted.ensureDeferred
async def test_swaks_pipelining(relay: Relay) -> None:
    result = await run(swaks_args(relay, "trusted", "--pipeline"))
    assert result.returncode == 0, transcript(result)
    assert len(relay.messages()) == 1


# -- msmtp ---------------------------------------------------------------------------

MSMTP_MESSAGE = (
    b"From: cron@legacy.example\r\nTo: b@example.net\r\nSubject: msmtp test\r\n"
    b"\r\nmsmtp body\r\n.dot line\r\n"
)


def msmtprc(relay: Relay, listener: str, **options: str) -> Path:
    settings = {
        "host": "127.0.0.1",
        "port": str(relay.ports[listener]),
        "domain": "msmtp.test.example",
        "from": "cron@legacy.example",
        "tls_trust_file": str(relay.ca_file),
        "tls_host_override": HOSTNAME,
        **options,
    }
    path = relay.directory / f"msmtprc-{listener}"
    lines = ["account default"] + [f"{key} {value}" for key, value in settings.items()]
    path.write_text("\n".join(lines) + "\n")
    path.chmod(0o600)
    return path


async def run_msmtp(rc: Path) -> subprocess.CompletedProcess[bytes]:
    argv = [require_binary("msmtp"), "-C", str(rc), "--", "b@example.net"]
    return await run(argv, MSMTP_MESSAGE)


@pytest_twisted.ensureDeferred
async def test_msmtp_starttls_and_auth_plain(relay: Relay) -> None:
    rc = msmtprc(
        relay,
        "untrusted",
        tls="on",
        tls_starttls="on",
        auth="plain",
        user=USER,
        password=PASSWORD,
    )
    result = await run_msmtp(rc)
    assert result.returncode == 0, transcript(result)
    entry, content = relay.only_message()
    header, body = received_and_body(content)
    assert entry.authenticated_as == USER
    assert "from msmtp.test.example ([127.0.0.1])" in header
    assert "with ESMTPSA (using TLSv1." in header
    assert body.endswith(MSMTP_MESSAGE)


@pytest_twisted.ensureDeferred
async def test_msmtp_implicit_tls(relay: Relay) -> None:
    rc = msmtprc(
        relay,
        "implicit",
        tls="on",
        tls_starttls="off",
        auth="login",
        user=USER,
        password=PASSWORD,
    )
    result = await run_msmtp(rc)
    assert result.returncode == 0, transcript(result)
    assert received_and_body(relay.only_message()[1])[1].endswith(MSMTP_MESSAGE)


@pytest_twisted.ensureDeferred
async def test_msmtp_plaintext_trusted(relay: Relay) -> None:
    rc = msmtprc(relay, "trusted", tls="off", auth="off")
    result = await run_msmtp(rc)
    assert result.returncode == 0, transcript(result)
    entry, content = relay.only_message()
    assert entry.authenticated_as is None
    assert received_and_body(content)[1].endswith(MSMTP_MESSAGE)


@pytest_twisted.ensureDeferred
async def test_msmtp_refuses_to_auth_when_tls_is_off(relay: Relay) -> None:
    rc = msmtprc(
        relay, "untrusted", tls="off", auth="plain", user=USER, password=PASSWORD
    )
    result = await run_msmtp(rc)
    assert result.returncode != 0
    assert relay.messages() == []


# -- smtplib -------------------------------------------------------------------------

SMTPLIB_MESSAGE = b"Subject: smtplib\r\n\r\nsmtplib body\r\n..two dots\r\n"


def client_context(relay: Relay) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(relay.ca_file))
    return context


def smtplib_starttls_auth(relay: Relay) -> dict[str, tuple[int, bytes]]:
    with smtplib.SMTP("127.0.0.1", relay.ports["untrusted"], timeout=30) as client:
        client.ehlo("smtplib.test.example")
        assert not client.has_extn("auth")
        client.starttls(context=client_context(relay))
        client.ehlo("smtplib.test.example")
        client.login(USER, PASSWORD)
        return client.sendmail("a@test.example", ["b@example.net"], SMTPLIB_MESSAGE)


def smtplib_plain(relay: Relay, listener: str) -> dict[str, tuple[int, bytes]]:
    with smtplib.SMTP("127.0.0.1", relay.ports[listener], timeout=30) as client:
        return client.sendmail(
            "a@test.example", ["b@example.net", "c@example.net"], SMTPLIB_MESSAGE
        )


def smtplib_ssl(relay: Relay) -> dict[str, tuple[int, bytes]]:
    with smtplib.SMTP_SSL(
        "localhost",
        relay.ports["implicit"],
        context=client_context(relay),
        timeout=30,
    ) as client:
        client.login(USER, PASSWORD)
        return client.sendmail("a@test.example", ["b@example.net"], SMTPLIB_MESSAGE)


@pytest_twisted.ensureDeferred
async def test_smtplib_starttls_and_login(relay: Relay) -> None:
    assert await in_thread(smtplib_starttls_auth, relay) == {}
    entry, content = relay.only_message()
    assert entry.authenticated_as == USER
    assert (
        received_and_body(content)[1]
        == b"Subject: smtplib\r\n\r\nsmtplib body\r\n..two dots\r\n"
    )


@pytest_twisted.ensureDeferred
async def test_smtplib_plaintext_trusted_two_recipients(relay: Relay) -> None:
    assert await in_thread(smtplib_plain, relay, "trusted") == {}
    entry, content = relay.only_message()
    assert [r.address for r in entry.recipients] == ["b@example.net", "c@example.net"]
    assert received_and_body(content)[1] == SMTPLIB_MESSAGE


@pytest_twisted.ensureDeferred
async def test_smtplib_implicit_tls(relay: Relay) -> None:
    assert await in_thread(smtplib_ssl, relay) == {}
    assert received_and_body(relay.only_message()[1])[1] == SMTPLIB_MESSAGE


@pytest_twisted.ensureDeferred
async def test_smtplib_untrusted_without_auth_is_refused(relay: Relay) -> None:
    with pytest.raises(smtplib.SMTPRecipientsRefused) as raised:
        await in_thread(smtplib_plain, relay, "untrusted")
    codes = {code for code, _ in raised.value.recipients.values()}
    assert codes == {554}
    assert relay.messages() == []


# -- our own client ------------------------------------------------------------------

OUR_MESSAGE = b"Subject: txstarttls\r\n\r\nfrom our own client\r\n.\r\n"


@pytest_twisted.ensureDeferred
async def test_txstarttls_send_with_tls_and_auth(relay: Relay) -> None:
    result = await send(
        cast(IReactorTime, reactor),
        sender="a@test.example",
        recipients=["b@example.net"],
        message=OUR_MESSAGE,
        host="127.0.0.1",
        port=relay.ports["untrusted"],
        tls="required",
        tls_hostname=HOSTNAME,
        ca_file=str(relay.ca_file),
        credentials=Credentials(USER, PASSWORD),
    )
    assert result is not None
    entry, content = relay.only_message()
    assert entry.authenticated_as == USER
    assert received_and_body(content)[1] == OUR_MESSAGE


@pytest_twisted.ensureDeferred
async def test_txstarttls_send_untrusted_without_auth_is_refused(relay: Relay) -> None:
    with pytest.raises(SMTPError) as raised:
        await send(
            cast(IReactorTime, reactor),
            sender="a@test.example",
            recipients=["x@external.example"],
            message=OUR_MESSAGE,
            host="127.0.0.1",
            port=relay.ports["untrusted"],
            tls="required",
            tls_hostname=HOSTNAME,
            ca_file=str(relay.ca_file),
        )
    assert isinstance(raised.value, RecipientsRefused)
    assert raised.value.is_permanent
    assert "554" in str(raised.value.recipients)
    assert relay.messages() == []
