"""Connection reuse and pooling over real loopback TLS sessions."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
import pytest_twisted
from twisted.internet import reactor, task
from twisted.internet.defer import DeferredList, ensureDeferred

from txstarttls.errors import ConfigurationError, OutcomeUnknown, RecipientsRefused
from txstarttls.pool import ConnectionPool, PoolLimits, open_session
from txstarttls.sasl import Credentials
from txstarttls.send import send
from txstarttls.session import Envelope, SendResult
from txstarttls.testing import RunningServer, TestMailServer
from txstarttls.tls import TLSPolicy
from txstarttls.upstream import Upstream, prepare_tls

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

MESSAGE = b"Subject: pooled\r\n\r\nhello\r\n"


@pytest_twisted.async_yield_fixture
async def server() -> AsyncIterator[tuple[TestMailServer, RunningServer]]:
    mail_server = TestMailServer(users={"u": "p"})
    running = await mail_server.start(reactor)
    yield mail_server, running
    await running.stop()


def make_pool(
    mail_server: TestMailServer,
    running: RunningServer,
    tmp_path: object,
    **limits: float,
) -> ConnectionPool:
    ca_file = mail_server.ca_file(f"{tmp_path}/ca.pem")
    upstream = Upstream(
        host="127.0.0.1",
        port=running.port,
        tls=TLSPolicy(hostname="mx.test.example", ca_file=str(ca_file)),
        credentials=Credentials("u", password="p"),
        ehlo_name="client.example",
    )
    return ConnectionPool(reactor, upstream, PoolLimits(**limits))  # type: ignore[arg-type]


def envelope(n: int) -> Envelope:
    return Envelope("s@x.example", (f"r{n}@y.example",))


async def sleep(seconds: float) -> None:
    await task.deferLater(reactor, seconds)


@pytest_twisted.ensureDeferred
async def test_one_session_carries_many_messages(
    server: tuple[TestMailServer, RunningServer], tmp_path: object
) -> None:
    mail_server, running = server
    pool = make_pool(mail_server, running, tmp_path, max_connections=1)
    for n in range(10):
        result = await pool.deliver(envelope(n), MESSAGE)
        assert result.delivered
    assert len(mail_server.factory.sessions) == 1
    assert len(mail_server.messages) == 10
    assert all(m.tls and m.authenticated_as == "u" for m in mail_server.messages)
    await pool.close()


@pytest_twisted.ensureDeferred
async def test_concurrency_is_capped(
    server: tuple[TestMailServer, RunningServer], tmp_path: object
) -> None:
    mail_server, running = server
    pool = make_pool(mail_server, running, tmp_path, max_connections=3)
    peak = 0

    async def one(n: int) -> SendResult:
        nonlocal peak
        result = await pool.deliver(envelope(n), MESSAGE)
        peak = max(peak, len(mail_server.factory.live))
        return result

    results = await DeferredList(
        [ensureDeferred(one(n)) for n in range(30)], consumeErrors=True
    )
    assert all(ok for ok, _ in results)
    assert len(mail_server.messages) == 30
    assert len(mail_server.factory.sessions) <= 3
    assert pool.open_connections <= 3
    assert peak <= 3
    await pool.close()


@pytest_twisted.ensureDeferred
async def test_message_quota_per_connection(
    server: tuple[TestMailServer, RunningServer], tmp_path: object
) -> None:
    mail_server, running = server
    pool = make_pool(
        mail_server, running, tmp_path, max_connections=1, max_messages_per_connection=4
    )
    for n in range(9):
        await pool.deliver(envelope(n), MESSAGE)
    assert len(mail_server.factory.sessions) == 3
    await pool.close()


@pytest_twisted.ensureDeferred
async def test_idle_session_is_closed_and_not_reused(
    server: tuple[TestMailServer, RunningServer], tmp_path: object
) -> None:
    mail_server, running = server
    pool = make_pool(mail_server, running, tmp_path, idle_timeout=0.05)
    await pool.deliver(envelope(1), MESSAGE)
    await sleep(0.3)
    assert pool.open_connections == 0
    assert len(mail_server.factory.live) == 0
    await pool.deliver(envelope(2), MESSAGE)
    assert len(mail_server.factory.sessions) == 2
    await pool.close()


@pytest_twisted.ensureDeferred
async def test_failed_transaction_is_reset_before_the_next_message(
    server: tuple[TestMailServer, RunningServer], tmp_path: object
) -> None:
    mail_server, running = server
    mail_server.script.reply_to("RCPT", "550 5.1.1 no such user", times=1)
    pool = make_pool(mail_server, running, tmp_path, max_connections=1)
    with pytest.raises(RecipientsRefused):
        await pool.deliver(envelope(1), MESSAGE)
    result = await pool.deliver(envelope(2), MESSAGE)
    assert result.delivered
    (session,) = mail_server.factory.sessions
    commands = [line for direction, line in session.transcript if direction == "C"]
    assert b"RSET\r\n" in commands
    assert commands.index(b"RSET\r\n") < commands.index(b"RCPT TO:<r2@y.example>\r\n")
    await pool.close()


@pytest_twisted.ensureDeferred
async def test_upstream_closing_an_idle_session_is_retried_on_a_fresh_one(
    server: tuple[TestMailServer, RunningServer], tmp_path: object
) -> None:
    mail_server, running = server
    pool = make_pool(mail_server, running, tmp_path, max_connections=1)
    await pool.deliver(envelope(1), MESSAGE)
    # The next MAIL on the reused session meets a closed connection.
    mail_server.script.disconnect_at("MAIL", times=1)
    result = await pool.deliver(envelope(2), MESSAGE)
    assert result.delivered
    assert len(mail_server.factory.sessions) == 2
    assert [m.recipients for m in mail_server.messages] == [
        ("r1@y.example",),
        ("r2@y.example",),
    ]
    await pool.close()


@pytest_twisted.ensureDeferred
async def test_loss_after_the_final_dot_is_never_retried(
    server: tuple[TestMailServer, RunningServer], tmp_path: object
) -> None:
    mail_server, running = server
    pool = make_pool(mail_server, running, tmp_path, max_connections=1)
    await pool.deliver(envelope(1), MESSAGE)
    mail_server.script.disconnect_at("DATA_END", times=1)
    with pytest.raises(OutcomeUnknown):
        await pool.deliver(envelope(2), MESSAGE)
    assert len(mail_server.factory.sessions) == 1
    await pool.close()


@pytest_twisted.ensureDeferred
async def test_sessions_disable_nagle_so_ehlo_after_tls_is_not_delayed(
    server: tuple[TestMailServer, RunningServer], tmp_path: object
) -> None:
    mail_server, running = server
    pool = make_pool(mail_server, running, tmp_path, max_connections=1)
    upstream = pool.upstream
    session = await open_session(reactor, upstream, prepare_tls(upstream, None))
    try:
        transport = session.client.transport
        assert transport is not None
        assert transport.getTcpNoDelay()  # type: ignore[attr-defined]
    finally:
        session.close()


@pytest_twisted.ensureDeferred
async def test_send_can_use_a_pool(
    server: tuple[TestMailServer, RunningServer], tmp_path: object
) -> None:
    mail_server, running = server
    pool = make_pool(mail_server, running, tmp_path, max_connections=1)
    for n in range(3):
        result = await send(
            reactor,
            sender="s@x.example",
            recipients=[f"r{n}@y.example"],
            message=MESSAGE,
            pool=pool,
        )
        assert result.delivered
    assert len(mail_server.factory.sessions) == 1
    with pytest.raises(ConfigurationError):
        await send(
            reactor,
            sender="s@x.example",
            recipients=["r@y.example"],
            message=MESSAGE,
            pool=pool,
            host="127.0.0.1",
        )
    await pool.close()
