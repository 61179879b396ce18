"""Messages from bytes, paths, files and chunks; streamed with back-pressure."""

from __future__ import annotations

import io
import shutil
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.interfaces import IPushProducer
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from txstarttls.client import ESMTPClient, Timeouts
from txstarttls.data import encode_body
from txstarttls.errors import LineTooLong, OutcomeUnknown, Phase, Timeout
from txstarttls.message import CHUNK_SIZE, FileMessage, PreparedMessage, prepare
from txstarttls.sasl import Credentials
from txstarttls.send import send
from txstarttls.testing import RunningServer, TestMailServer

BODY = b"Subject: x\r\n\r\n.first\nsecond\r.third\r\n" + b"line\r\n" * 50_000


def test_every_input_kind_prepares_the_same_wire_bytes(tmp_path: Path) -> None:
    path = tmp_path / "m.eml"
    path.write_bytes(BODY)
    chunks = [BODY[i : i + 777] for i in range(0, len(BODY), 777)]
    expected = encode_body(BODY)
    for message in (
        prepare(BODY),
        prepare(path),
        prepare(str(path)),
        prepare(io.BytesIO(BODY)),
        prepare(iter(chunks)),
    ):
        assert message.size == len(expected)
        assert not message.eight_bit
        assert b"".join(message.chunks()) == expected


def test_file_messages_stream_in_bounded_chunks(tmp_path: Path) -> None:
    path = tmp_path / "m.eml"
    path.write_bytes(BODY)
    message = FileMessage(path)
    assert message.in_memory is None
    assert max(len(chunk) for chunk in message.chunks()) <= 2 * CHUNK_SIZE


def test_eight_bit_is_detected_in_files(tmp_path: Path) -> None:
    path = tmp_path / "m.eml"
    path.write_bytes("Subject: é\r\n\r\nü\r\n".encode())
    assert prepare(path).eight_bit


def test_overlong_line_in_a_file_is_refused_before_connecting(tmp_path: Path) -> None:
    path = tmp_path / "m.eml"
    path.write_bytes(b"Subject: x\r\n\r\n" + b"x" * 5000 + b"\r\n")
    with pytest.raises(LineTooLong):
        prepare(path)


def test_spool_file_is_removed() -> None:
    message = prepare(io.BytesIO(b"hi\r\n"))
    assert isinstance(message, FileMessage)
    spool = message.path
    assert spool.exists()
    del message
    assert not spool.exists()


class PausingTransport(StringTransport):
    """Pauses its producer after every write, as a full socket buffer would."""

    def write(self, data: bytes) -> None:
        super().write(data)
        if self.producer is not None and self.streaming:
            producer = self.producer
            assert IPushProducer.providedBy(producer)
            producer.pauseProducing()


class StreamingTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.transport = PausingTransport()
        self.client = ESMTPClient(self.clock, timeouts=Timeouts(data_block=10))
        self.client.makeConnection(self.transport)
        self.client.dataReceived(b"220 ready\r\n")
        self.transport.clear()

    def directory(self) -> Path:
        path = Path(tempfile.mkdtemp(prefix="txstarttls-test-"))
        self.addCleanup(shutil.rmtree, path)
        return path

    def message(self, directory: Path, body: bytes) -> PreparedMessage:
        path = directory / "m.eml"
        path.write_bytes(body)
        return prepare(path)

    def test_body_is_written_only_as_fast_as_the_transport_takes_it(self) -> None:
        message = self.message(self.directory(), BODY)
        d = self.client.send_body(message)
        first = len(self.transport.value())
        assert 0 < first <= 2 * CHUNK_SIZE
        writes = 1
        while self.transport.producer is not None:
            self.transport.producer.resumeProducing()
            writes += 1
        assert writes > 2
        assert self.transport.value() == encode_body(BODY)
        self.assertNoResult(d)
        self.client.dataReceived(b"250 2.0.0 queued\r\n")
        self.assertEqual(self.successResultOf(d).code, 250)

    def test_stalled_transport_times_out_per_data_block_not_outcome_unknown(
        self,
    ) -> None:
        message = self.message(self.directory(), BODY)
        d = self.client.send_body(message)
        self.clock.advance(11)
        failure = self.failureResultOf(d, Timeout)
        self.assertEqual(failure.value.phase, Phase.DATA)
        self.assertNotIsInstance(failure.value, OutcomeUnknown)
        assert not self.transport.value().endswith(b"\r\n.\r\n")

    def test_loss_after_the_terminator_is_outcome_unknown(self) -> None:
        message = self.message(self.directory(), b"short\r\n" * 3)
        d = self.client.send_body(message)
        while self.transport.producer is not None:
            self.transport.producer.resumeProducing()
        self.client.connectionLost(Failure(Exception("reset")))
        self.failureResultOf(d, OutcomeUnknown)

    def test_file_that_grows_an_overlong_line_is_never_terminated(self) -> None:
        directory = self.directory()
        message = self.message(directory, b"fine\r\n")
        (directory / "m.eml").write_bytes(b"x" * 5000)
        d = self.client.send_body(message)
        self.failureResultOf(d, LineTooLong)
        assert b".\r\n" not in self.transport.value()


@pytest_twisted.async_yield_fixture
async def server() -> AsyncIterator[tuple[TestMailServer, RunningServer]]:
    mail_server = TestMailServer(users={"u": "p"})
    running = await mail_server.start(reactor)
    yield mail_server, running
    await running.stop()


def chunks_of(data: bytes, size: int) -> Iterator[bytes]:
    for start in range(0, len(data), size):
        yield data[start : start + size]


@pytest_twisted.ensureDeferred
async def test_streamed_file_arrives_intact_over_tls(
    server: tuple[TestMailServer, RunningServer], tmp_path: Path
) -> None:
    mail_server, running = server
    body = b"Subject: big\r\n\r\n" + b"".join(
        b".%06d line of a large message\r\n" % n for n in range(150_000)
    )
    path = tmp_path / "big.eml"
    path.write_bytes(body)
    result = await send(
        reactor,
        sender="s@x.example",
        recipients=["r@y.example"],
        message=path,
        host="127.0.0.1",
        port=running.port,
        tls_hostname="mx.test.example",
        ca_file=str(mail_server.ca_file(tmp_path / "ca.pem")),
        credentials=Credentials("u", password="p"),
    )
    assert result.delivered
    assert mail_server.messages[0].data == body
    assert mail_server.messages[0].mail_options == (f"SIZE={prepare(path).size}",)
