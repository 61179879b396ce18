"""The client protocol at the byte level, over a StringTransport and a Clock."""

from __future__ import annotations

import pytest
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from txstarttls.client import ESMTPClient, Timeouts
from txstarttls.errors import (
    ConnectionLost,
    ExtensionRequired,
    InvalidAddress,
    InvalidArgument,
    OutcomeUnknown,
    Phase,
    ProtocolViolation,
    ResponseInjection,
    Timeout,
    TLSRequired,
    TransientReplyError,
)
from txstarttls.reply import Reply
from txstarttls.sasl import Plain
from txstarttls.tls import TLSPolicy, client_tls


class TLSRecordingTransport(StringTransport):
    """A StringTransport that records startTLS instead of doing it."""

    def __init__(self) -> None:
        super().__init__()
        self.tls_started: list[object] = []
        self.aborted = False

    def startTLS(self, options: object) -> None:
        self.tls_started.append(options)

    def abortConnection(self) -> None:
        self.aborted = True
        super().loseConnection()


class ClientTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.transport = TLSRecordingTransport()
        self.client = ESMTPClient(self.clock, timeouts=Timeouts(command=30, mail=40))
        self.client.makeConnection(self.transport)

    def receive(self, data: bytes) -> None:
        self.client.dataReceived(data)

    def sent(self) -> bytes:
        value: bytes = self.transport.value()
        self.transport.clear()
        return value

    def greet(self) -> Reply:
        d = self.client.greeting()
        self.receive(b"220 mx.test.example ESMTP\r\n")
        return self.successResultOf(d)

    def test_greeting_fires_with_parsed_reply(self) -> None:
        reply = self.greet()
        self.assertEqual(reply.code, 220)
        self.assertEqual(reply.lines, ("mx.test.example ESMTP",))

    def test_ehlo_sets_capabilities(self) -> None:
        self.greet()
        d = self.client.ehlo("client.example")
        self.assertEqual(self.sent(), b"EHLO client.example\r\n")
        self.receive(b"250-mx.test.example\r\n250-PIPELINING\r\n250 STARTTLS\r\n")
        self.assertEqual(self.successResultOf(d).code, 250)
        self.assertTrue(self.client.capabilities.pipelining)
        self.assertTrue(self.client.capabilities.starttls)

    def test_replies_pair_first_in_first_out(self) -> None:
        self.greet()
        first = self.client.mail("a@x.example")
        second = self.client.rcpt("b@y.example")
        third = self.client.data()
        self.assertEqual(
            self.sent(),
            b"MAIL FROM:<a@x.example>\r\nRCPT TO:<b@y.example>\r\nDATA\r\n",
        )
        self.receive(b"250 2.1.0 ok\r\n550 5.1.1 no\r\n354 go\r\n")
        self.assertEqual(self.successResultOf(first).code, 250)
        self.assertEqual(self.successResultOf(second).code, 550)
        self.assertEqual(self.successResultOf(third).code, 354)

    def test_envelope_goes_out_in_one_write_with_outcomes_in_order(self) -> None:
        self.greet()
        d = self.client.envelope(
            "a@x.example",
            ["SIZE=10"],
            [("b@y.example", []), ("c@y.example", ["NOTIFY=NEVER"])],
            data=True,
        )
        self.assertEqual(
            self.sent(),
            b"MAIL FROM:<a@x.example> SIZE=10\r\nRCPT TO:<b@y.example>\r\n"
            b"RCPT TO:<c@y.example> NOTIFY=NEVER\r\nDATA\r\n",
        )
        self.receive(b"250 2.1.0 ok\r\n550 5.1.1 no\r\n")
        self.assertNoResult(d)
        self.receive(b"250 2.1.5 ok\r\n354 go\r\n")
        codes = [r.code for r in self.successResultOf(d) if isinstance(r, Reply)]
        self.assertEqual(codes, [250, 550, 250, 354])

    def test_envelope_validates_every_argument_before_sending_anything(self) -> None:
        self.greet()
        d = self.client.envelope(
            "a@x.example", [], [("b@y.example", []), ("c@y\r\nQUIT", [])], data=True
        )
        self.failureResultOf(d, InvalidAddress)
        self.assertEqual(self.sent(), b"")

    def test_envelope_never_sends_a_line_break_that_slipped_past_validation(
        self,
    ) -> None:
        """Command injection's last guard: should a path ever come back from
        validation with CR or LF in it, nothing of the batch is sent."""
        self.greet()
        self.client._path = lambda address, *, null: b"<a@x.example>\r\nRSET"  # type: ignore[method-assign]
        d = self.client.envelope("a@x.example", [], [("b@y.example", [])], data=True)
        self.failureResultOf(d, InvalidArgument)
        self.assertEqual(self.sent(), b"")
        bad = self.client.mail("a@x.example")
        self.failureResultOf(bad, InvalidArgument)
        self.assertEqual(self.sent(), b"")

    def test_envelope_outcomes_when_the_connection_is_lost_half_way(self) -> None:
        self.greet()
        d = self.client.envelope("a@x.example", [], [("b@y.example", [])], data=True)
        self.receive(b"250 2.1.0 ok\r\n")
        self.client.connectionLost(Failure(Exception("gone")))
        mail, rcpt, data = self.successResultOf(d)
        self.assertIsInstance(mail, Reply)
        self.assertIsInstance(rcpt, ConnectionLost)
        self.assertIsInstance(data, ConnectionLost)
        self.assertEqual(rcpt.phase, Phase.RCPT)  # type: ignore[union-attr]

    def test_envelope_times_out_on_the_oldest_command(self) -> None:
        self.greet()
        d = self.client.envelope("a@x.example", [], [("b@y.example", [])], data=False)
        self.clock.advance(41)
        mail, rcpt = self.successResultOf(d)
        self.assertIsInstance(mail, Timeout)
        self.assertEqual(mail.phase, Phase.MAIL)  # type: ignore[union-attr]
        self.assertIsInstance(rcpt, Timeout)
        self.assertTrue(self.transport.aborted)

    def _client_with(self, timeouts: Timeouts) -> None:
        self.transport = TLSRecordingTransport()
        self.client = ESMTPClient(self.clock, timeouts=timeouts)
        self.client.makeConnection(self.transport)
        self.greet()

    def test_a_pipelined_command_with_a_shorter_timeout_is_never_timed_out_late(
        self,
    ) -> None:
        """DATA's own 10 s count from when it was sent, even while MAIL (40 s)
        is still the command the timer serves."""
        self._client_with(Timeouts(mail=40, rcpt=40, data=10))
        d = self.client.envelope("a@x.example", [], [("b@y.example", [])], data=True)
        self.clock.advance(5)
        self.receive(b"250 2.1.0 ok\r\n")
        self.clock.advance(7)
        self.assertNoResult(d)
        self.receive(b"250 2.1.5 ok\r\n")
        self.clock.advance(0)
        _, _, data = self.successResultOf(d)
        self.assertIsInstance(data, Timeout)
        self.assertEqual(data.phase, Phase.DATA)  # type: ignore[union-attr]

    def test_a_timer_due_early_still_times_out_the_oldest_at_its_deadline(self) -> None:
        """The timer set for DATA (10 s) comes due while only the final dot
        (60 s) waits: it must wait on, then time that out at its own 60 s."""
        self._client_with(Timeouts(mail=40, rcpt=40, data=10, end_of_data=60))
        d = self.client.envelope("a@x.example", [], [("b@y.example", [])], data=True)
        self.clock.advance(1)
        self.receive(b"250 ok\r\n250 ok\r\n354 go\r\n")
        self.successResultOf(d)
        body = self.client.send_body(b"hi\r\n.\r\n")
        self.clock.advance(59.9)
        self.assertNoResult(body)
        self.assertFalse(self.transport.aborted)
        self.clock.advance(0.2)
        failure = self.failureResultOf(body, OutcomeUnknown)
        self.assertIn("no end-of-data reply within 60 s", str(failure.value))
        self.assertTrue(self.transport.aborted)

    def test_unprompted_reply_is_a_protocol_violation(self) -> None:
        self.greet()
        self.receive(b"250 surprise\r\n")
        self.assertTrue(self.transport.aborted)
        self.assertIsInstance(self.client.failure, ProtocolViolation)

    def test_unprompted_421_is_transient_server_closing(self) -> None:
        self.greet()
        self.receive(b"421 4.3.2 shutting down\r\n")
        failure = self.client.failure
        self.assertIsInstance(failure, TransientReplyError)
        assert failure is not None
        self.assertEqual(failure.code, 421)
        self.assertTrue(failure.is_transient)

    def test_multiline_with_mixed_codes_is_not_last_line_wins(self) -> None:
        d = self.client.greeting()
        self.receive(b"554-no\r\n220 ok\r\n")
        self.failureResultOf(d, ProtocolViolation)

    def test_reply_grammar_errors_abort(self) -> None:
        for bad in (b"2500 ok", b" 250 ok", b"+25 x", b"2_0 x"):
            with self.subTest(bad=bad):
                self.setUp()
                d = self.client.greeting()
                self.receive(bad + b"\r\n")
                self.failureResultOf(d, ProtocolViolation)

    def test_reply_without_text_is_valid(self) -> None:
        d = self.client.greeting()
        self.receive(b"220\r\n")
        self.assertEqual(self.successResultOf(d).code, 220)

    def test_pending_commands_fail_when_connection_lost(self) -> None:
        self.greet()
        d = self.client.mail("a@x.example")
        self.client.connectionLost(Failure(Exception("gone")))
        failure = self.failureResultOf(d, ConnectionLost)
        self.assertEqual(failure.value.phase, Phase.MAIL)

    def test_loss_after_final_dot_is_outcome_unknown(self) -> None:
        self.greet()
        d = self.client.send_body(b"hi\r\n.\r\n")
        self.client.connectionLost(Failure(Exception("reset")))
        failure = self.failureResultOf(d, OutcomeUnknown)
        self.assertTrue(failure.value.is_transient)

    def test_timeout_aborts_and_fails_with_phase(self) -> None:
        self.greet()
        d = self.client.mail("a@x.example")
        self.clock.advance(39)
        self.assertNoResult(d)
        self.clock.advance(2)
        failure = self.failureResultOf(d, Timeout)
        self.assertEqual(failure.value.phase, Phase.MAIL)
        self.assertTrue(self.transport.aborted)

    def test_greeting_timeout(self) -> None:
        d = self.client.greeting()
        self.clock.advance(Timeouts().greeting + 1)
        self.failureResultOf(d, Timeout)

    def test_timeout_at_end_of_data_is_outcome_unknown(self) -> None:
        self.greet()
        d = self.client.send_body(b".\r\n")
        self.clock.advance(Timeouts().end_of_data + 1)
        self.failureResultOf(d, OutcomeUnknown)

    def test_quit_counts_connection_close_as_done(self) -> None:
        self.greet()
        d = self.client.quit()
        self.client.connectionLost(Failure(Exception("closed")))
        self.assertEqual(self.successResultOf(d).code, 221)

    def test_command_injection_through_sender_is_refused_before_sending(self) -> None:
        self.greet()
        with pytest.raises(InvalidAddress):
            self.client.mail("a@x.example\r\nRCPT TO:<evil@y.example>")
        with pytest.raises(InvalidAddress):
            self.client.rcpt("b@y.example>\nDATA")
        self.assertEqual(self.sent(), b"")

    def test_command_injection_through_ehlo_name_is_refused(self) -> None:
        self.greet()
        with pytest.raises(InvalidArgument):
            self.client.ehlo("x\r\nMAIL FROM:<m@z.example>")
        self.assertEqual(self.sent(), b"")

    def test_parameter_injection_is_refused(self) -> None:
        self.greet()
        with pytest.raises(InvalidArgument):
            self.client.mail("a@x.example", ["SIZE=1\r\nRCPT"])
        self.assertEqual(self.sent(), b"")

    def test_non_ascii_address_needs_smtputf8(self) -> None:
        self.greet()
        with pytest.raises(ExtensionRequired):
            self.client.mail("jöran@x.example")
        self.assertEqual(self.sent(), b"")

    def test_auth_refused_locally_without_tls(self) -> None:
        self.greet()
        d = self.client.auth(Plain("user", "secret"))
        self.failureResultOf(d, TLSRequired)
        self.assertEqual(self.sent(), b"")

    def test_auth_transcript_is_redacted(self) -> None:
        lines: list[tuple[str, bytes]] = []
        client = ESMTPClient(
            self.clock, allow_plaintext_auth=True, transcript=lambda *a: lines.append(a)
        )
        transport = TLSRecordingTransport()
        client.makeConnection(transport)
        client.dataReceived(b"220 hi\r\n")
        d = client.auth(Plain("user", "secret"))
        client.dataReceived(b"235 2.7.0 ok\r\n")
        self.assertEqual(self.successResultOf(d).code, 235)
        self.assertIn(b"AUTH PLAIN ", transport.value())
        shown = b"".join(line for _, line in lines)
        self.assertNotIn(b"secret", shown)
        self.assertNotIn(transport.value().split()[2], shown)

    def test_starttls_220_starts_tls_and_waits_for_handshake(self) -> None:
        self.greet()
        tls = client_tls(TLSPolicy(fingerprint="00" * 32), "mx.test.example")
        d = self.client.starttls(tls)
        self.assertEqual(self.sent(), b"STARTTLS\r\n")
        self.receive(b"220 2.0.0 go ahead\r\n")
        self.assertEqual(self.transport.tls_started, [tls.creator])
        self.assertNoResult(d)
        # Nothing may be sent before the handshake is verified.
        self.failureResultOf(self.client.ehlo("client.example"), ProtocolViolation)
        self.assertEqual(self.sent(), b"")

    def test_starttls_refusal_fires_with_reply_and_starts_nothing(self) -> None:
        self.greet()
        tls = client_tls(TLSPolicy(fingerprint="00" * 32), "mx.test.example")
        d = self.client.starttls(tls)
        self.receive(b"454 4.7.0 TLS not available\r\n")
        self.assertEqual(self.successResultOf(d).code, 454)
        self.assertEqual(self.transport.tls_started, [])

    def test_response_injection_after_220_aborts(self) -> None:
        self.greet()
        tls = client_tls(TLSPolicy(fingerprint="00" * 32), "mx.test.example")
        d = self.client.starttls(tls)
        self.receive(b"220 Ready to start TLS\r\n250-mx\r\n250 AUTH PLAIN LOGIN\r\n")
        self.failureResultOf(d, ResponseInjection)
        self.assertEqual(self.transport.tls_started, [])
        self.assertTrue(self.transport.aborted)

    def test_response_injection_of_partial_line_after_220_aborts(self) -> None:
        self.greet()
        tls = client_tls(TLSPolicy(fingerprint="00" * 32), "mx.test.example")
        d = self.client.starttls(tls)
        self.receive(b"220 Ready\r\n25")
        self.failureResultOf(d, ResponseInjection)
        self.assertEqual(self.transport.tls_started, [])

    def test_starttls_is_never_sent_twice(self) -> None:
        self.greet()
        tls = client_tls(TLSPolicy(fingerprint="00" * 32), "mx.test.example")
        self.client.starttls(tls)
        self.sent()
        self.failureResultOf(self.client.starttls(tls), ProtocolViolation)
        self.assertEqual(self.sent(), b"")

    def test_send_body_requires_encoded_data(self) -> None:
        self.greet()
        self.failureResultOf(self.client.send_body(b"raw body"), InvalidArgument)
