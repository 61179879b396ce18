"""SECURITY-CASES 1-16: a hostile upstream against the client.

Every session runs in memory with real TLS (``connect_in_memory``) against a
scripted server, and every case runs twice: the hostile bytes arrive as one
segment and split into one-byte reads. "No leak" means the server never
received AUTH, credentials, MAIL, RCPT, DATA or the body, and the client never
even tried to send them (see ``tests/support/hostile.py``).
"""

from __future__ import annotations

import re
from collections.abc import Iterator

import pytest
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock

from tests.support.hostile import (
    HOST,
    PASSWORD,
    RECIPIENT,
    SEGMENT_IDS,
    SEGMENTS,
    SENDER,
    USERNAME,
    HostileRun,
    certificates,
    credentials,
    failure_of,
    nth_time,
    start,
    unhandled_deferred_errors,
)
from txstarttls.client import ESMTPClient, Timeouts
from txstarttls.data import DataEncoder, encode_body
from txstarttls.errors import (
    AuthenticationUnavailable,
    CertificateVerificationFailed,
    ConnectionLost,
    ExtensionRequired,
    FingerprintMismatch,
    InvalidAddress,
    InvalidArgument,
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
    TransientReplyError,
)
from txstarttls.sasl import Plain
from txstarttls.send import send
from txstarttls.session import Envelope, RecipientResult
from txstarttls.testing import ScriptedSMTPServerFactory, connect_in_memory
from txstarttls.tls import TLSMode, TLSPolicy, client_tls

segments = pytest.mark.parametrize("split", SEGMENTS, ids=SEGMENT_IDS)

READY = b"220 2.0.0 Ready to start TLS\r\n"
STRIPPED_EHLO = b"250-smtp.example.net\r\n250-PIPELINING\r\n250 AUTH PLAIN LOGIN\r\n"

# A fatal TLS alert (handshake_failure), and bytes that are no TLS record.
TLS_ALERT = b"\x15\x03\x03\x00\x02\x02\x28"
GARBAGE = b"\x00\xff\xfe garbage \x17\x03\x03\x00\x05hello"


@pytest.fixture(autouse=True)
def no_unhandled_deferred_errors() -> Iterator[None]:
    """A failed Deferred nobody handled is a bug in the code under test."""
    with unhandled_deferred_errors() as events:
        yield
    assert events == [], "a Deferred failed with nobody handling the error"


def assert_transient(error: SMTPError) -> None:
    """Deferred for a later try, never bounced."""
    assert error.is_transient
    assert not error.is_permanent
    assert not isinstance(error, PermanentError)


def ehlo_count(run: HostileRun) -> int:
    return run.server_commands().count("EHLO")


# --- 1. STARTTLS stripping ---------------------------------------------------


class TestStrippingAttack:
    """SECURITY-CASES 1: the EHLO reply lists AUTH but no STARTTLS."""

    @segments
    def test_starttls_stripping_aborts_without_leak(self, split: int | None) -> None:
        run = start(
            split=split,
            creds=credentials(),
            configure=lambda f: f.script.raw_reply_to("EHLO", STRIPPED_EHLO),
        ).pump()
        error = run.failure()
        assert isinstance(error, TLSRequired)
        assert error.phase is Phase.EHLO
        assert "TLS" in str(error)
        assert_transient(error)
        run.assert_no_leak()
        run.assert_plaintext_wire_clean()
        assert run.client_verbs() == ["EHLO", "QUIT"]
        assert run.client.tls is None

    @segments
    @pytest.mark.parametrize(
        "reply",
        [
            # A proxy that overwrites the keyword, as seen in the wild.
            b"250-smtp.example.net\r\n250-XXXXXXXA\r\n250 AUTH PLAIN LOGIN\r\n",
            # The legacy AUTH= form and nothing else.
            b"250-smtp.example.net\r\n250 AUTH=PLAIN LOGIN\r\n",
            # STARTTLS only as text of the domain line, not as a keyword.
            b"250-smtp.example.net STARTTLS\r\n250 AUTH PLAIN\r\n",
            b"250 smtp.example.net\r\n",
        ],
        ids=["overwritten", "legacy-auth", "in-greeting-text", "bare"],
    )
    def test_stripping_variants_abort_without_leak(
        self, split: int | None, reply: bytes
    ) -> None:
        run = start(
            split=split,
            creds=credentials(),
            configure=lambda f: f.script.raw_reply_to("EHLO", reply),
        ).pump()
        assert isinstance(run.failure(), TLSRequired)
        run.assert_no_leak()
        assert "STARTTLS" not in run.server_commands()

    @segments
    def test_stripping_without_credentials_still_aborts(
        self, split: int | None
    ) -> None:
        run = start(
            split=split,
            configure=lambda f: f.script.raw_reply_to("EHLO", STRIPPED_EHLO),
        ).pump()
        error = run.failure()
        assert isinstance(error, TLSRequired)
        assert_transient(error)
        run.assert_no_leak()


# --- 2. STARTTLS refused -----------------------------------------------------


REFUSALS = {
    "502": b"502 5.5.1 Command not implemented\r\n",
    "454": b"454 4.7.0 TLS not available due to temporary reason\r\n",
    "354": b"354 go ahead\r\n",
    "421": b"421 4.3.2 Service shutting down\r\n",
    "250": b"250 2.0.0 Ok\r\n",
}

MALFORMED_REFUSALS = {
    "220-wait-454": b"220-wait\r\n454 no\r\n",
    "220-220-454": b"220-wait\r\n220-still waiting\r\n454 no\r\n",
    "454-220": b"454-no\r\n220 ok\r\n",
    "220-no-final": b"220-wait\r\n",
}


class TestStarttlsRefused:
    """SECURITY-CASES 2: only a well-formed final 220 starts TLS."""

    @staticmethod
    def assert_no_plaintext_continuation(run: HostileRun) -> None:
        run.assert_no_leak()
        run.assert_plaintext_wire_clean()
        assert set(run.commands_after("STARTTLS")) <= {"QUIT"}
        assert not run.connection.client_transport.tls_active
        assert run.client.tls is None

    @segments
    @pytest.mark.parametrize("reply", list(REFUSALS.values()), ids=list(REFUSALS))
    def test_starttls_refusal_aborts_without_plaintext_continuation(
        self, split: int | None, reply: bytes
    ) -> None:
        run = start(
            split=split,
            creds=credentials(),
            configure=lambda f: f.script.raw_reply_to("STARTTLS", reply),
        ).pump()
        error = run.failure()
        assert isinstance(error, TLSRequired)
        assert error.code == int(reply[:3])
        assert error.phase is Phase.STARTTLS
        assert_transient(error)
        self.assert_no_plaintext_continuation(run)

    @segments
    @pytest.mark.parametrize(
        "reply", list(MALFORMED_REFUSALS.values()), ids=list(MALFORMED_REFUSALS)
    )
    def test_malformed_220_never_starts_tls(
        self, split: int | None, reply: bytes
    ) -> None:
        run = start(
            split=split,
            creds=credentials(),
            configure=lambda f: f.script.raw_reply_to("STARTTLS", reply),
        ).pump()
        if not run.outcome.called:
            # An unfinished multiline 220: nothing starts, the timer ends it.
            run.clock.advance(Timeouts().command)
            run.pump()
        error = run.failure()
        assert isinstance(error, ProtocolViolation | Timeout)
        assert_transient(error)
        self.assert_no_plaintext_continuation(run)

    @segments
    @pytest.mark.parametrize("code", [b"454", b"421"])
    def test_temporary_refusal_is_transient(
        self, split: int | None, code: bytes
    ) -> None:
        run = start(
            split=split,
            configure=lambda f: f.script.raw_reply_to(
                "STARTTLS", code + b" 4.7.0 not now\r\n"
            ),
        ).pump()
        error = run.failure()
        assert error.code == int(code)
        assert_transient(error)

    @segments
    def test_opportunistic_mode_does_not_continue_after_a_refusal(
        self, split: int | None
    ) -> None:
        # STARTTLS was offered; a refusal is not "not offered".
        run = start(
            mode=TLSMode.OPPORTUNISTIC,
            split=split,
            configure=lambda f: f.script.raw_reply_to("STARTTLS", REFUSALS["454"]),
        ).pump()
        assert isinstance(run.failure(), TLSRequired)
        run.assert_no_leak()

    @segments
    def test_multiline_final_220_starts_tls(self, split: int | None) -> None:
        """The positive control: a well-formed multiline 220 is accepted."""
        run = start(
            split=split,
            creds=credentials(),
            configure=lambda f: f.script.raw_reply_to(
                "STARTTLS", b"220-Ready\r\n220 go ahead\r\n", start_tls=True
            ),
        ).pump()
        result = run.result()
        assert result.tls is not None and result.tls.verified_name == HOST
        assert run.factory.messages[0].authenticated_as == USERNAME


# --- 3. ESMTP hidden ---------------------------------------------------------


class TestEsmtpHidden:
    """SECURITY-CASES 3: a refused EHLO never leads to HELO when TLS is needed."""

    @segments
    @pytest.mark.parametrize(
        "reply",
        [
            b"502 5.5.1 Command not implemented\r\n",
            b"500 5.5.2 Syntax error, command unrecognized\r\n",
            b"554 5.7.1 no ESMTP for you\r\n",
            b"421 4.3.2 Service not available\r\n",
        ],
        ids=["502", "500", "554", "421"],
    )
    def test_required_mode_never_falls_back_to_helo(
        self, split: int | None, reply: bytes
    ) -> None:
        run = start(
            split=split,
            creds=credentials(),
            configure=lambda f: f.script.raw_reply_to("EHLO", reply),
        ).pump()
        error = run.failure()
        assert isinstance(error, TLSRequired)
        assert error.code == int(reply[:3])
        assert error.phase is Phase.EHLO
        assert_transient(error)
        assert "HELO" not in run.client_verbs()
        assert "HELO" not in run.server_commands()
        run.assert_no_leak()

    @segments
    def test_opportunistic_with_credentials_never_falls_back_to_helo(
        self, split: int | None
    ) -> None:
        run = start(
            mode=TLSMode.OPPORTUNISTIC,
            split=split,
            creds=credentials(),
            configure=lambda f: f.script.raw_reply_to(
                "EHLO", b"502 5.5.1 Command not implemented\r\n"
            ),
        ).pump()
        assert isinstance(run.failure(), TLSRequired)
        assert "HELO" not in run.server_commands()
        run.assert_no_leak()

    @segments
    def test_opportunistic_without_credentials_may_use_helo(
        self, split: int | None
    ) -> None:
        """The control: HELO is used where the policy allows plaintext."""
        run = start(
            mode=TLSMode.OPPORTUNISTIC,
            split=split,
            configure=lambda f: f.script.raw_reply_to(
                "EHLO", b"502 5.5.1 Command not implemented\r\n"
            ),
        ).pump()
        result = run.result()
        assert result.tls is None
        assert run.server_commands()[:2] == ["EHLO", "HELO"]
        assert len(run.factory.messages) == 1


# --- 4. No AUTH before TLS ---------------------------------------------------


class TestAuthBeforeTLS:
    """SECURITY-CASES 4: credentials never go out without verified TLS."""

    @segments
    def test_opportunistic_with_credentials_aborts_when_starttls_refused(
        self, split: int | None
    ) -> None:
        def configure(factory: ScriptedSMTPServerFactory) -> None:
            factory.script.ehlo_extensions(pre_tls=["AUTH PLAIN LOGIN", "STARTTLS"])
            factory.script.raw_reply_to("STARTTLS", REFUSALS["502"])

        run = start(
            mode=TLSMode.OPPORTUNISTIC,
            split=split,
            creds=credentials(),
            require_tls_for_auth=False,
            configure=configure,
        ).pump()
        error = run.failure()
        assert isinstance(error, TLSRequired)
        assert_transient(error)
        run.assert_no_leak()
        run.assert_plaintext_wire_clean()

    @segments
    @pytest.mark.parametrize(
        "extensions",
        [["AUTH PLAIN LOGIN"], ["AUTH=PLAIN"], ["AUTH=LOGIN PLAIN", "AUTH PLAIN"]],
        ids=["auth", "legacy-auth", "both-forms"],
    )
    def test_opportunistic_with_credentials_and_no_starttls_offered(
        self, split: int | None, extensions: list[str]
    ) -> None:
        run = start(
            mode=TLSMode.OPPORTUNISTIC,
            split=split,
            creds=credentials(),
            require_tls_for_auth=False,
            configure=lambda f: f.script.ehlo_extensions(pre_tls=extensions),
        ).pump()
        error = run.failure()
        assert isinstance(error, TLSRequired)
        assert "credentials" in str(error)
        run.assert_no_leak()

    @segments
    def test_none_mode_with_credentials_refuses_auth(self, split: int | None) -> None:
        run = start(
            mode=TLSMode.NONE,
            split=split,
            creds=credentials(),
            require_tls_for_auth=False,
        ).pump()
        error = run.failure()
        assert isinstance(error, TLSRequired)
        assert error.phase is Phase.AUTH
        run.assert_no_leak()

    @segments
    def test_plaintext_auth_opt_in_is_ignored_for_a_remote_peer(
        self, split: int | None
    ) -> None:
        # Only an in-memory label: no packet goes anywhere.
        remote = IPv4Address("TCP", "192.0.2.25", 587)
        run = start(
            mode=TLSMode.NONE,
            split=split,
            creds=credentials(),
            allow_plaintext_auth=True,
            require_tls_for_auth=False,
            server_address=remote,
        ).pump()
        assert isinstance(run.failure(), TLSRequired)
        run.assert_no_leak()

    @segments
    def test_plaintext_auth_opt_in_works_for_loopback(self, split: int | None) -> None:
        """The control for the test above."""
        run = start(
            mode=TLSMode.NONE,
            split=split,
            creds=credentials(),
            allow_plaintext_auth=True,
            require_tls_for_auth=False,
        ).pump()
        run.result()
        assert "AUTH" in run.server_commands()
        assert run.factory.messages[0].authenticated_as == USERNAME

    @segments
    def test_client_refuses_auth_before_tls_whatever_the_caller_does(
        self, split: int | None
    ) -> None:
        factory = ScriptedSMTPServerFactory(
            users={USERNAME: PASSWORD}, require_tls_for_auth=False
        )
        client = ESMTPClient(Clock())
        connection = connect_in_memory(client, factory.buildProtocol(None))
        connection.server_to_client.split = split
        connection.pump()
        client.ehlo("client.example")
        connection.pump()
        assert "PLAIN" in client.capabilities.auth_mechanisms
        error = failure_of(client.auth(Plain(USERNAME, PASSWORD)))
        connection.pump()
        assert isinstance(error, TLSRequired)
        wire = connection.client_to_server.delivered
        assert wire == b"EHLO client.example\r\n"


# --- 5. Handshake failure after 220 ------------------------------------------


class TestHandshakeFailureAfter220:
    """SECURITY-CASES 5: after the 220, TLS or nothing."""

    @staticmethod
    def after_220(split: int | None) -> HostileRun:
        """The server says 220 and never starts TLS; the client does."""
        run = start(
            split=split,
            creds=credentials(),
            configure=lambda f: f.script.raw_reply_to("STARTTLS", READY),
        )
        run.pump_until(lambda: run.connection.client_transport.tls_active)
        return run

    @staticmethod
    def assert_aborted(run: HostileRun) -> TLSHandshakeFailed:
        error = run.failure()
        assert isinstance(error, TLSHandshakeFailed)
        assert not isinstance(error, CertificateVerificationFailed)
        assert error.phase is Phase.TLS_HANDSHAKE
        assert_transient(error)
        assert run.client.tls is None
        assert run.client_verbs() == ["EHLO", "STARTTLS"]
        run.assert_no_leak()
        return error

    @segments
    @pytest.mark.parametrize(
        "hostile",
        [
            TLS_ALERT,
            GARBAGE,
            b"250 ok\r\n",
            b"250-smtp.example.net\r\n250 AUTH PLAIN LOGIN\r\n",
            b"220 2.0.0 Ready to start TLS\r\n",
        ],
        ids=["alert", "garbage", "plaintext-250", "plaintext-ehlo", "second-220"],
    )
    def test_handshake_failure_aborts_without_plaintext_continuation(
        self, split: int | None, hostile: bytes
    ) -> None:
        run = self.after_220(split)
        run.inject(hostile)
        run.pump()
        self.assert_aborted(run)

    @segments
    def test_close_after_220_aborts(self, split: int | None) -> None:
        run = start(
            split=split,
            creds=credentials(),
            configure=lambda f: f.script.raw_reply_to("STARTTLS", READY, close=True),
        ).pump()
        self.assert_aborted(run)

    @segments
    def test_reset_after_220_aborts(self, split: int | None) -> None:
        run = self.after_220(split)
        assert run.server.transport is not None
        run.server.transport.abortConnection()  # type: ignore[attr-defined]
        run.pump()
        self.assert_aborted(run)

    @segments
    def test_silence_after_220_times_out(self, split: int | None) -> None:
        run = self.after_220(split)
        # The ClientHello is never delivered: the server stays silent.
        run.clock.advance(Timeouts().tls_handshake)
        run.pump()
        error = run.failure()
        assert isinstance(error, Timeout)
        assert error.phase is Phase.TLS_HANDSHAKE
        run.assert_no_leak()


# --- 6 and 7. Response injection after the 220 -------------------------------


def _post_tls_without_auth(factory: ScriptedSMTPServerFactory) -> None:
    factory.script.ehlo_extensions(post_tls=["PIPELINING", "8BITMIME"])


class TestResponseInjection:
    """SECURITY-CASES 6: replies injected behind the 220 are never parsed."""

    INJECTED = b"220 Ready to start TLS\r\n250-mx\r\n250 AUTH PLAIN LOGIN\r\n"

    @staticmethod
    def assert_injection_refused(run: HostileRun, split: int | None) -> None:
        error = run.failure()
        if split is None:
            # The bytes sat in the buffer behind the 220: detected as such.
            assert isinstance(error, ResponseInjection)
            assert error.phase is Phase.STARTTLS
        else:
            # The 220 ended a read; the rest reached the TLS layer as junk.
            assert isinstance(error, ResponseInjection | TLSHandshakeFailed)
        assert_transient(error)
        assert run.client.tls is None
        server_replies = [line for who, line in run.transcript if who == "S"]
        assert b"250 AUTH PLAIN LOGIN" not in server_replies
        assert b"250-mx" not in server_replies
        assert run.client_verbs() == ["EHLO", "STARTTLS"]
        run.assert_no_leak()

    @segments
    def test_injected_ehlo_reply_after_220_aborts(self, split: int | None) -> None:
        def configure(factory: ScriptedSMTPServerFactory) -> None:
            _post_tls_without_auth(factory)
            factory.script.raw_reply_to("STARTTLS", self.INJECTED, start_tls=True)

        run = start(split=split, creds=credentials(), configure=configure).pump()
        self.assert_injection_refused(run, split)

    @segments
    @pytest.mark.parametrize(
        "hostile",
        [
            b"220 Ready\r\n250-mx",
            b"220 Ready\r\n\r\n",
            b"220 Ready\r\n250 AUTH=PLAIN LOGIN\r\n",
            b"220 Ready\r\n\x16\x03\x01\x00\x05hello",
            b"220-Ready\r\n220 go\r\n250 AUTH PLAIN\r\n",
        ],
        ids=["partial-line", "empty-line", "legacy-auth", "tls-lookalike", "multi"],
    )
    def test_injection_variants_after_220_abort(
        self, split: int | None, hostile: bytes
    ) -> None:
        def configure(factory: ScriptedSMTPServerFactory) -> None:
            _post_tls_without_auth(factory)
            factory.script.raw_reply_to("STARTTLS", hostile, start_tls=True)

        run = start(split=split, creds=credentials(), configure=configure).pump()
        self.assert_injection_refused(run, split)

    @segments
    def test_injection_in_a_later_segment_before_the_server_hello(
        self, split: int | None
    ) -> None:
        def configure(factory: ScriptedSMTPServerFactory) -> None:
            _post_tls_without_auth(factory)
            factory.script.raw_reply_to("STARTTLS", READY, start_tls=True)

        run = start(split=split, creds=credentials(), configure=configure)
        run.pump_until(lambda: run.connection.client_transport.tls_active)
        run.inject(b"250-mx\r\n250 AUTH PLAIN LOGIN\r\n")
        run.pump()
        error = run.failure()
        assert isinstance(error, TLSHandshakeFailed)
        self.assert_injection_refused(run, split=1)

    @segments
    def test_injection_into_the_tls_stream_aborts(self, split: int | None) -> None:
        run = start(split=split, creds=credentials(), configure=_post_tls_without_auth)
        run.pump_until(lambda: run.client.is_tls_verified)
        run.inject(b"250-mx\r\n250 AUTH PLAIN LOGIN\r\n")
        run.pump()
        error = run.failure()
        assert isinstance(error, ConnectionLost | TLSError | ProtocolViolation)
        assert_transient(error)
        run.assert_no_leak()

    @segments
    def test_injected_220_ahead_of_starttls_fails(self, split: int | None) -> None:
        """A 220 smuggled behind the EHLO reply, waiting for our STARTTLS."""
        run = start(
            split=split,
            creds=credentials(),
            configure=lambda f: f.script.raw_reply_to(
                "EHLO",
                b"250-smtp.example.net\r\n250 STARTTLS\r\n220 Ready\r\n",
                match=nth_time(1),
            ),
        ).pump()
        error = run.failure()
        assert isinstance(error, TLSError | ProtocolViolation)
        assert run.client.tls is None
        run.assert_no_leak()

    @segments
    def test_auth_list_comes_only_from_the_post_tls_ehlo(
        self, split: int | None
    ) -> None:
        """The control: without injection the genuine reply (no AUTH) wins."""
        run = start(
            split=split, creds=credentials(), configure=_post_tls_without_auth
        ).pump()
        error = run.failure()
        assert isinstance(error, AuthenticationUnavailable)
        assert run.client.tls is not None
        run.assert_no_leak()


class TestInjectedRepliesForLaterCommands:
    """SECURITY-CASES 7: injected replies for AUTH, MAIL, RCPT and DATA."""

    @segments
    @pytest.mark.parametrize(
        "hostile",
        [
            b"220 Ready\r\n250 ok\r\n235 2.7.0 ok\r\n250 ok\r\n354 go\r\n",
            b"220 Ready\r\n250 ok\r\n250 ok\r\n250 ok\r\n354 go\r\n250 queued\r\n",
        ],
        ids=["example", "whole-transaction"],
    )
    def test_injected_replies_for_later_commands_abort(
        self, split: int | None, hostile: bytes
    ) -> None:
        def configure(factory: ScriptedSMTPServerFactory) -> None:
            factory.script.raw_reply_to("STARTTLS", hostile, start_tls=True)

        run = start(split=split, creds=credentials(), configure=configure).pump()
        TestResponseInjection.assert_injection_refused(run, split)
        assert [line for who, line in run.transcript if who == "S"][-1] == (
            b"220 Ready"
        )


# --- 8. Pre-TLS knowledge forgotten ------------------------------------------


PRE_TLS = ["PIPELINING", "SIZE 1000", "SMTPUTF8", "AUTH PLAIN", "STARTTLS"]


class TestPreTLSKnowledgeForgotten:
    """SECURITY-CASES 8: only the post-TLS EHLO counts."""

    @segments
    def test_auth_from_before_tls_is_forgotten(self, split: int | None) -> None:
        run = start(
            split=split,
            creds=credentials(),
            configure=lambda f: f.script.ehlo_extensions(
                pre_tls=PRE_TLS, post_tls=["AUTH SCRAM-SHA-256", "STARTTLS"]
            ),
        ).pump()
        error = run.failure()
        assert isinstance(error, AuthenticationUnavailable)
        assert "SCRAM-SHA-256" in str(error)
        assert run.client.tls is not None
        # EHLO again first, and never a second STARTTLS.
        assert run.client_verbs()[:3] == ["EHLO", "STARTTLS", "EHLO"]
        assert run.client_verbs().count("STARTTLS") == 1
        assert run.server_commands().count("STARTTLS") == 1
        assert "AUTH" not in run.server_commands()
        assert run.factory.messages == []

    @segments
    def test_size_and_pipelining_from_before_tls_are_forgotten(
        self, split: int | None
    ) -> None:
        message = b"Subject: big\r\n\r\n" + (b"x" * 78 + b"\r\n") * 25
        assert len(message) > 2000
        run = start(
            split=split,
            message=message,
            configure=lambda f: f.script.ehlo_extensions(
                pre_tls=PRE_TLS, post_tls=["8BITMIME", "STARTTLS"]
            ),
        ).pump()
        run.result()
        [received] = run.factory.messages
        assert received.data == message
        assert received.mail_options == ()  # no SIZE=, no SMTPUTF8
        assert run.server_commands().count("STARTTLS") == 1
        # Not pipelined: each command waited for its reply.
        for index, (who, line) in enumerate(run.transcript):
            if who == "C" and line.startswith((b"MAIL", b"RCPT")):
                assert run.transcript[index + 1][0] == "S", line

    @segments
    def test_smtputf8_from_before_tls_is_forgotten(self, split: int | None) -> None:
        run = start(
            split=split,
            recipients=("rené@example.net",),
            configure=lambda f: f.script.ehlo_extensions(
                pre_tls=PRE_TLS, post_tls=["8BITMIME", "STARTTLS"]
            ),
        ).pump()
        assert isinstance(run.failure(), ExtensionRequired)
        assert "MAIL" not in run.server_commands()

    @segments
    def test_client_never_sends_starttls_twice(self, split: int | None) -> None:
        run = start(split=split, configure=_post_tls_without_auth)
        run.pump_until(lambda: run.client.is_tls_verified)
        tls = client_tls(TLSPolicy(), HOST, trust_root=certificates().trust_root)
        error = failure_of(run.client.starttls(tls))
        assert isinstance(error, ProtocolViolation)
        run.pump()
        run.result()
        assert run.server_commands().count("STARTTLS") == 1


# --- 9. Certificate matrix ---------------------------------------------------


def _no_ehlo_after_starttls(run: HostileRun) -> None:
    assert run.commands_after("STARTTLS") == []
    assert run.client_verbs() == ["EHLO", "STARTTLS"]
    assert ehlo_count(run) == 1


class TestCertificateMatrix:
    """SECURITY-CASES 9: configured host smtp.example.net."""

    @segments
    @pytest.mark.parametrize(
        "kind", ["self_signed", "unknown_root", "other_name", "expired"]
    )
    def test_bad_certificate_fails_verification_before_ehlo(
        self, split: int | None, kind: str
    ) -> None:
        run = start(
            split=split,
            creds=credentials(),
            certificate=getattr(certificates(), kind),
        ).pump()
        error = run.failure()
        assert type(error) is CertificateVerificationFailed
        assert error.phase is Phase.TLS_HANDSHAKE
        assert_transient(error)
        assert run.client.tls is None
        _no_ehlo_after_starttls(run)
        run.assert_no_leak()

    @segments
    @pytest.mark.parametrize(
        ("host", "kind"),
        [
            ("a.b.example.net", "wildcard"),
            ("example.net", "wildcard"),
            ("127.0.0.1", "good"),
            (HOST, "ip_address"),
        ],
        ids=["wildcard-too-deep", "wildcard-bare-domain", "ip-vs-dns", "dns-vs-ip"],
    )
    def test_name_mismatch_variants_fail(
        self, split: int | None, host: str, kind: str
    ) -> None:
        run = start(
            split=split,
            host=host,
            creds=credentials(),
            certificate=getattr(certificates(), kind),
        ).pump()
        assert type(run.failure()) is CertificateVerificationFailed
        _no_ehlo_after_starttls(run)
        run.assert_no_leak()

    @segments
    @pytest.mark.parametrize(
        ("host", "kind"),
        [(HOST, "good"), (HOST, "wildcard"), ("127.0.0.1", "ip_address")],
        ids=["exact", "wildcard", "ip-san"],
    )
    def test_valid_certificate_is_accepted(
        self, split: int | None, host: str, kind: str
    ) -> None:
        run = start(
            split=split,
            host=host,
            creds=credentials(),
            certificate=getattr(certificates(), kind),
        ).pump()
        result = run.result()
        assert result.tls is not None
        assert result.tls.verified_name == host
        assert result.tls.peer_fingerprint == getattr(certificates(), kind).fingerprint
        assert run.factory.messages[0].authenticated_as == USERNAME

    @segments
    def test_pinned_self_signed_certificate_is_accepted(
        self, split: int | None
    ) -> None:
        pinned = certificates().self_signed
        run = start(
            split=split,
            creds=credentials(),
            certificate=pinned,
            fingerprint=pinned.fingerprint,
        ).pump()
        result = run.result()
        assert result.tls is not None
        assert result.tls.peer_fingerprint == pinned.fingerprint
        assert result.tls.verified_name is None

    @segments
    @pytest.mark.parametrize("kind", ["other_self_signed", "good"])
    def test_other_certificate_than_the_pinned_one_fails(
        self, split: int | None, kind: str
    ) -> None:
        run = start(
            split=split,
            creds=credentials(),
            certificate=getattr(certificates(), kind),
            fingerprint=certificates().self_signed.fingerprint,
        ).pump()
        error = run.failure()
        assert isinstance(error, FingerprintMismatch)
        assert error.phase is Phase.TLS_HANDSHAKE
        assert_transient(error)
        _no_ehlo_after_starttls(run)
        run.assert_no_leak()


# --- 10 and 11. Reply grammar ------------------------------------------------


class TestMixedCodeMultiline:
    """SECURITY-CASES 10: a multiline reply whose codes differ is an error."""

    @segments
    @pytest.mark.parametrize(
        "greeting",
        [b"554-no\r\n220 ok\r\n", b"220-ok\r\n554 no\r\n", b"220-ok\r\n221 ok\r\n"],
        ids=["554-220", "220-554", "220-221"],
    )
    def test_mixed_code_greeting_is_a_protocol_violation(
        self, split: int | None, greeting: bytes
    ) -> None:
        run = start(
            split=split,
            creds=credentials(),
            configure=lambda f: f.script.raw_greeting(greeting),
        ).pump()
        error = run.failure()
        assert isinstance(error, ProtocolViolation)
        assert error.phase is Phase.GREETING
        assert_transient(error)
        assert run.client_lines() == []
        assert run.wire_to_server == b""

    @segments
    def test_mixed_code_ehlo_reply_is_a_protocol_violation(
        self, split: int | None
    ) -> None:
        run = start(
            split=split,
            configure=lambda f: f.script.raw_reply_to(
                "EHLO", b"250-smtp.example.net\r\n250-PIPELINING\r\n550 STARTTLS\r\n"
            ),
        ).pump()
        assert isinstance(run.failure(), ProtocolViolation)
        assert run.client_verbs() == ["EHLO"]


BAD_GRAMMAR = [
    b"2500 ok\r\n",
    b" 250 ok\r\n",
    b"+25 x\r\n",
    b"2_0 x\r\n",
    b"250ok\r\n",
    b"25 ok\r\n",
    b"250\tok\r\n",
    b"650 x\r\n",
    b"190 x\r\n",
    b"\r\n",
    b"250-first\r\n\r\n",
]


class TestReplyCodeGrammar:
    """SECURITY-CASES 11: the reply-code grammar is enforced exactly."""

    @segments
    @pytest.mark.parametrize("reply", BAD_GRAMMAR)
    def test_grammar_error_in_greeting(self, split: int | None, reply: bytes) -> None:
        run = start(
            split=split,
            configure=lambda f: f.script.raw_greeting(reply),
        ).pump()
        error = run.failure()
        assert isinstance(error, ProtocolViolation)
        assert run.wire_to_server == b""

    @segments
    @pytest.mark.parametrize("reply", BAD_GRAMMAR)
    def test_grammar_error_in_ehlo_reply(self, split: int | None, reply: bytes) -> None:
        run = start(
            split=split,
            configure=lambda f: f.script.raw_reply_to("EHLO", reply),
        ).pump()
        assert isinstance(run.failure(), ProtocolViolation)
        assert run.client_verbs() == ["EHLO"]

    @segments
    @pytest.mark.parametrize("reply", BAD_GRAMMAR[:4])
    def test_grammar_error_after_tls_sends_no_body(
        self, split: int | None, reply: bytes
    ) -> None:
        run = start(
            split=split,
            configure=lambda f: f.script.raw_reply_to("MAIL", reply),
        ).pump()
        assert isinstance(run.failure(), ProtocolViolation)
        assert b"<message body>" not in run.client_lines()
        assert run.factory.messages == []

    @segments
    def test_reply_without_text_is_valid(self, split: int | None) -> None:
        def configure(factory: ScriptedSMTPServerFactory) -> None:
            factory.script.raw_greeting(b"220\r\n")
            factory.script.raw_reply_to("STARTTLS", b"220\r\n", start_tls=True)
            factory.script.raw_reply_to("DATA_END", b"250\r\n")

        run = start(split=split, configure=configure).pump()
        result = run.result()
        assert result.tls is not None
        assert result.reply.code == 250 and result.reply.lines == ("",)
        assert result.delivered[0].recipient == RECIPIENT

    @segments
    def test_ehlo_reply_without_text_is_a_valid_250(self, split: int | None) -> None:
        run = start(
            mode=TLSMode.NONE,
            split=split,
            configure=lambda f: f.script.raw_reply_to("EHLO", b"250\r\n"),
        ).pump()
        # Accepted as a 250 with no extensions: MAIL went out, unpipelined.
        assert run.client_verbs()[:2] == ["EHLO", "MAIL"]
        assert not isinstance(run.failure(), ProtocolViolation)


# --- 12. 421 at any point ----------------------------------------------------


BYE = b"421 4.3.2 Service shutting down, closing transmission channel\r\n"


def _without_pipelining(factory: ScriptedSMTPServerFactory) -> None:
    factory.script.ehlo_extensions(post_tls=["8BITMIME", "AUTH PLAIN LOGIN"])


class TestServerClosing421:
    """SECURITY-CASES 12: a 421 anywhere defers the message, never bounces it."""

    @staticmethod
    def assert_deferred(run: HostileRun) -> SMTPError:
        error = run.failure()
        assert_transient(error)
        assert run.factory.messages == []
        assert not isinstance(error, RecipientsRefused) or error.is_transient
        return error

    @segments
    @pytest.mark.parametrize(
        ("command", "match_nth", "phase", "error_type"),
        [
            ("CONNECT", None, Phase.GREETING, TransientReplyError),
            ("EHLO", 1, Phase.EHLO, TLSRequired),
            ("STARTTLS", None, Phase.STARTTLS, TLSRequired),
            ("EHLO", 2, Phase.EHLO, TransientReplyError),
            ("AUTH", None, Phase.AUTH, TransientReplyError),
            ("MAIL", None, Phase.MAIL, TransientReplyError),
            ("DATA_END", None, Phase.END_OF_DATA, TransientReplyError),
        ],
        ids=["greeting", "ehlo", "starttls", "ehlo-after-tls", "auth", "mail", "dot"],
    )
    def test_421_is_transient(
        self,
        split: int | None,
        command: str,
        match_nth: int | None,
        phase: Phase,
        error_type: type[SMTPError],
    ) -> None:
        run = start(
            split=split,
            creds=credentials(),
            configure=lambda f: f.script.raw_reply_to(
                command,
                BYE,
                close=True,
                match=nth_time(match_nth) if match_nth else None,
            ),
        ).pump()
        error = self.assert_deferred(run)
        assert isinstance(error, error_type)
        assert error.code == 421
        assert error.phase is phase
        if command != "DATA_END":
            assert b"<message body>" not in run.client_lines()

    @segments
    @pytest.mark.parametrize("command", ["MAIL", "RCPT", "DATA"])
    @pytest.mark.parametrize("pipelining", [True, False], ids=["pipelined", "serial"])
    def test_421_in_the_transaction_is_transient(
        self, split: int | None, command: str, pipelining: bool
    ) -> None:
        def configure(factory: ScriptedSMTPServerFactory) -> None:
            if not pipelining:
                _without_pipelining(factory)
            factory.script.raw_reply_to(command, BYE, close=True)

        run = start(
            split=split,
            creds=credentials(),
            recipients=(RECIPIENT, "second@example.net"),
            configure=configure,
        ).pump()
        error = self.assert_deferred(run)
        assert b"<message body>" not in run.client_lines()
        if command == "RCPT":
            # The second RCPT finds the connection gone.
            assert isinstance(error, ConnectionLost)
        else:
            assert isinstance(error, TransientReplyError)
            assert error.code == 421
            assert error.phase is Phase[command]

    @segments
    @pytest.mark.parametrize("pipelining", [True, False], ids=["pipelined", "serial"])
    def test_421_to_the_only_rcpt_is_transient(
        self, split: int | None, pipelining: bool
    ) -> None:
        def configure(factory: ScriptedSMTPServerFactory) -> None:
            if not pipelining:
                _without_pipelining(factory)
            factory.script.raw_reply_to("RCPT", BYE, close=True)

        run = start(split=split, configure=configure).pump()
        error = self.assert_deferred(run)
        if pipelining:
            # DATA went out behind the RCPT and found the connection gone.
            assert isinstance(error, ConnectionLost)
            assert error.phase is Phase.DATA
        else:
            assert isinstance(error, RecipientsRefused)
            [refused] = error.recipients
            assert isinstance(refused, RecipientResult)
            assert refused.reply.code == 421
            assert refused.status == "deferred"
            assert "DATA" not in run.server_commands()

    @segments
    def test_unprompted_421_while_the_client_is_idle(self, split: int | None) -> None:
        """The server closes while the client waits for its OAuth token."""
        token: Deferred[str] = Deferred()
        run = start(
            split=split,
            creds=credentials(
                password=None, token=lambda: token, username="bob@example.net"
            ),
            tokens={"bob@example.net": "token-1"},
        )
        run.pump()
        assert run.client.is_tls_verified and not run.outcome.called
        assert run.server.transport is not None
        run.server.transport.write(BYE)
        run.pump()
        assert isinstance(run.client.failure, TransientReplyError)
        token.callback("token-1")
        error = self.assert_deferred(run)
        assert isinstance(error, TransientReplyError)
        assert error.code == 421
        run.assert_no_leak()

    @segments
    def test_unprompted_421_before_anything_else_is_sent(
        self, split: int | None
    ) -> None:
        """A 421 straight after the greeting answers EHLO, as RFC 5321 allows."""
        run = start(
            split=split,
            configure=lambda f: f.script.raw_greeting(
                b"220 smtp.example.net ESMTP\r\n" + BYE, close=True
            ),
        ).pump()
        error = self.assert_deferred(run)
        assert error.code == 421
        run.assert_no_leak()


# --- 13. Outcome of the final dot --------------------------------------------


class TestEndOfDataOutcome:
    """SECURITY-CASES 13: only a 2xx to the final dot means delivered."""

    @segments
    @pytest.mark.parametrize("abort", [False, True], ids=["close", "reset"])
    def test_close_after_the_dot_is_outcome_unknown(
        self, split: int | None, abort: bool
    ) -> None:
        run = start(
            split=split,
            configure=lambda f: f.script.disconnect_at("DATA_END", abort=abort),
        ).pump()
        error = run.failure()
        assert isinstance(error, OutcomeUnknown)
        assert error.phase is Phase.END_OF_DATA
        assert_transient(error)
        assert "may or may not" in str(error)

    @segments
    def test_silence_after_the_dot_is_outcome_unknown(self, split: int | None) -> None:
        run = start(
            split=split,
            configure=lambda f: f.script.raw_reply_to("DATA_END", b""),
        ).pump()
        assert not run.outcome.called
        run.clock.advance(Timeouts().end_of_data)
        run.pump()
        error = run.failure()
        assert isinstance(error, OutcomeUnknown)
        assert_transient(error)

    @segments
    @pytest.mark.parametrize(
        ("reply", "permanent"),
        [
            (b"451 4.3.0 Try again later\r\n", False),
            (b"452 4.3.1 Insufficient storage\r\n", False),
            (b"554 5.7.1 Rejected\r\n", True),
            (b"552 5.3.4 Too big\r\n", True),
            (b"354 more please\r\n", False),
            (b"334 what\r\n", False),
        ],
        ids=["451", "452", "554", "552", "354", "334"],
    )
    def test_non_2xx_after_the_dot_is_not_delivered(
        self, split: int | None, reply: bytes, permanent: bool
    ) -> None:
        run = start(
            split=split,
            configure=lambda f: f.script.raw_reply_to("DATA_END", reply),
        ).pump()
        error = run.failure()
        assert error.code == int(reply[:3])
        assert error.phase is Phase.END_OF_DATA
        assert error.is_permanent is permanent
        expected = PermanentReplyError if permanent else TransientReplyError
        assert isinstance(error, expected)

    @segments
    def test_2xx_after_the_dot_is_delivered(self, split: int | None) -> None:
        run = start(
            split=split,
            configure=lambda f: f.script.raw_reply_to("DATA_END", b"250 ok\r\n"),
        ).pump()
        result = run.result()
        assert [r.delivered for r in result.recipients] == [True]
        assert result.reply.code == 250


# --- 14. Command injection through arguments ---------------------------------


INJECTIONS = {
    "sender": ("sender", "a@x.example\r\nRCPT TO:<evil@y.example>"),
    "recipient": ("recipient", "b@y.example>\nDATA"),
    "sender-lf": ("sender", "a@x.example\nRSET"),
    "sender-cr": ("sender", "a@x.example\rRSET"),
    "recipient-nul": ("recipient", "b@y.example\0"),
    "recipient-crlf": ("recipient", "b@y.example\r\nDATA"),
}


class TestCommandInjection:
    """SECURITY-CASES 14: refused locally, before any byte is sent."""

    @pytest.mark.parametrize(
        ("field", "value"), list(INJECTIONS.values()), ids=list(INJECTIONS)
    )
    def test_injection_through_the_envelope_is_refused_before_connecting(
        self, field: str, value: str
    ) -> None:
        reactor = MemoryReactorClock()
        sender = value if field == "sender" else SENDER
        recipient = value if field == "recipient" else RECIPIENT
        d = send(
            reactor,
            sender=sender,
            recipients=[recipient],
            message=b"Subject: x\r\n\r\nx\r\n",
            endpoint="tcp:host=127.0.0.1:port=2525",
            tls="none",
        )
        error = failure_of(d)
        assert isinstance(error, InvalidAddress)
        assert error.phase is Phase.LOCAL
        assert error.is_permanent
        assert reactor.tcpClients == [] and reactor.sslClients == []

    def test_valid_envelope_does_connect(self) -> None:
        """The control: the same call with clean arguments opens a connection."""
        reactor = MemoryReactorClock()
        d = send(
            reactor,
            sender=SENDER,
            recipients=[RECIPIENT],
            message=b"Subject: x\r\n\r\nx\r\n",
            endpoint="tcp:host=127.0.0.1:port=2525",
            tls="none",
        )
        assert not d.called
        assert [(c[0], c[1]) for c in reactor.tcpClients] == [("127.0.0.1", 2525)]

    @pytest.mark.parametrize(
        "username",
        [
            "u\r\nMAIL FROM:<m@z.example>",
            "u\nMAIL FROM:<m@z.example>",
            "u\0admin",
            "u\x01auth=Bearer x",
            "u\u2028MAIL FROM:<m@z.example>",
        ],
        ids=["crlf", "lf", "nul", "ctrl-a", "line-separator"],
    )
    def test_injection_through_the_user_name_is_refused(self, username: str) -> None:
        with pytest.raises(InvalidArgument):
            credentials(username=username)
        with pytest.raises(InvalidArgument):
            credentials(username=username, password=None, token=lambda: "t")

    def test_injection_through_the_ehlo_name_is_refused_before_connecting(
        self,
    ) -> None:
        reactor = MemoryReactorClock()
        d = send(
            reactor,
            sender=SENDER,
            recipients=[RECIPIENT],
            message=b"x\r\n",
            endpoint="tcp:host=127.0.0.1:port=2525",
            tls="none",
            ehlo_name="client.example\r\nMAIL FROM:<m@z.example>",
        )
        assert isinstance(failure_of(d), InvalidArgument)
        assert reactor.tcpClients == []

    @pytest.mark.parametrize(
        "parameter",
        ["BODY=8BITMIME\r\nRCPT TO:<evil@y.example>", "ENVID=x\ny", "X\r\nDATA"],
    )
    def test_injection_through_mail_parameters_is_refused_up_front(
        self, parameter: str
    ) -> None:
        with pytest.raises(InvalidArgument):
            Envelope(SENDER, (RECIPIENT,), mail_parameters=(parameter,))

    @segments
    @pytest.mark.parametrize(
        ("field", "value"), list(INJECTIONS.values()), ids=list(INJECTIONS)
    )
    def test_client_writes_nothing_for_an_injected_argument(
        self, split: int | None, field: str, value: str
    ) -> None:
        factory = ScriptedSMTPServerFactory()
        client = ESMTPClient(Clock())
        connection = connect_in_memory(client, factory.buildProtocol(None))
        connection.server_to_client.split = split
        connection.pump()
        client.ehlo("client.example")
        connection.pump()
        before = connection.client_to_server.delivered
        with pytest.raises(InvalidAddress):
            if field == "sender":
                client.mail(value)
            else:
                client.rcpt(value)
        connection.pump()
        assert connection.client_to_server.delivered == before
        assert client.failure is None


# --- 15 and 16. What goes on the wire after 354 ------------------------------


def _expected_content(body: bytes) -> bytes:
    """What the receiver must get: CRLF everywhere, one final CRLF."""
    content = re.sub(rb"\r\n|\r|\n", b"\r\n", body)
    return content if content.endswith(b"\r\n") or not content else content + b"\r\n"


def _boundary_body() -> bytes:
    """A "." line that starts exactly on a TLS record boundary (16 KiB)."""
    filler = (b"x" * 78 + b"\r\n") * 204 + b"y" * 62 + b"\r\n"
    return filler + b".starts a record\r\n.\r\nMAIL FROM:<e@x.example>\r\nend"


DOT_BODIES = {
    "first-line-dot": b".\r\nsecond line\r\n",
    "only-a-dot": b".",
    "dot-line-then-commands": b"a\r\n.\r\nMAIL FROM:<e@x.example>\r\n",
    "dots-everywhere": b"..\r\n.x\r\n...\r\n. \r\n",
    "chunk-boundary": _boundary_body(),
    "no-final-crlf": b"Subject: x\r\n\r\nno final newline",
    "ends-with-dot-line": b"Subject: x\r\n\r\nlast\r\n.",
}

BARE_BODIES = {
    "lf-dot-lf": b"a\n.\nMAIL FROM:<e@x.example>\nRCPT TO:<v@y.example>\nDATA\n",
    "cr-dot-cr": b"a\r.\rMAIL FROM:<e@x.example>\r",
    "crlf-dot-cr": b"a\r\n.\rMAIL FROM:<e@x.example>\r\n",
    "lf-dot-crlf": b"a\n.\r\nMAIL FROM:<e@x.example>\r\n",
    "crlf-dot-lf": b"a\r\n.\nMAIL FROM:<e@x.example>\r\n",
    "lone-cr": b"Subject: x\r\n\r\nlone\rcarriage return\r\n",
    "lone-lf": b"Subject: x\r\n\r\nlone\nline feed\r\n",
    "cr-cr-lf": b"a\r\r\nb\n\rc\r",
}

modes = pytest.mark.parametrize(
    "mode", [TLSMode.REQUIRED, TLSMode.NONE], ids=["tls", "plaintext"]
)


def _data_wire(run: HostileRun) -> bytes:
    """The plaintext bytes the client wrote after DATA, terminator included."""
    wire = run.wire_to_server
    start = wire.index(b"\r\nDATA\r\n") + len(b"\r\nDATA\r\n")
    return wire[start : wire.index(b"\r\n.\r\n", start - 2) + 5]


def _assert_one_message(run: HostileRun, body: bytes) -> None:
    [received] = run.factory.messages
    assert received.data == _expected_content(body)
    assert run.server_commands().count("MAIL") == 1
    assert run.server_commands().count("DATA") == 1
    assert run.result().delivered[0].recipient == RECIPIENT


def _assert_data_lines_clean(run: HostileRun) -> None:
    """Every line the server read inside DATA ends in CRLF and has no other."""
    lines = run.server_lines()
    start = lines.index(b"DATA\r\n") + 1
    end = lines.index(b".\r\n", start)
    for line in lines[start : end + 1]:
        assert line.endswith(b"\r\n")
        assert b"\r" not in line[:-2] and b"\n" not in line[:-2], line


class TestDotStuffing:
    """SECURITY-CASES 15: every leading dot doubled, exactly one terminator."""

    @segments
    @modes
    @pytest.mark.parametrize("body", list(DOT_BODIES.values()), ids=list(DOT_BODIES))
    def test_dot_stuffing_end_to_end(
        self, split: int | None, mode: TLSMode, body: bytes
    ) -> None:
        run = start(mode=mode, split=split, message=body).pump()
        _assert_one_message(run, body)
        _assert_data_lines_clean(run)
        if mode is TLSMode.NONE:
            wire = _data_wire(run)
            assert wire == encode_body(body)
            assert wire.endswith(b"\r\n.\r\n") and wire.count(b"\r\n.\r\n") == 1
            lines = wire[:-5].split(b"\r\n")
            assert all(
                not line.startswith(b".") or line.startswith(b"..") for line in lines
            )

    def test_a_dot_line_on_a_tls_record_boundary_is_stuffed(self) -> None:
        """TLS records carry 16 KiB: the "." line begins the second one."""
        encoded = encode_body(DOT_BODIES["chunk-boundary"])
        assert encoded[16382:16386] == b"\r\n.."

    @pytest.mark.parametrize("body", list(DOT_BODIES.values()), ids=list(DOT_BODIES))
    def test_dot_stuffing_at_every_chunk_boundary(self, body: bytes) -> None:
        """The streaming encoder gives the same bytes however the body is cut."""
        expected = encode_body(body)
        for cut in range(len(body) + 1) if len(body) < 200 else (16384, 16385, 16386):
            encoder = DataEncoder()
            wire = encoder.encode(body[:cut]) + encoder.encode(body[cut:])
            assert wire + encoder.finish() == expected, cut


class TestBareLineEndings:
    """SECURITY-CASES 16: normalise to CRLF, then stuff; one message only."""

    @segments
    @modes
    @pytest.mark.parametrize("body", list(BARE_BODIES.values()), ids=list(BARE_BODIES))
    def test_no_stray_cr_or_lf_on_the_wire(
        self, split: int | None, mode: TLSMode, body: bytes
    ) -> None:
        run = start(mode=mode, split=split, message=body).pump()
        _assert_one_message(run, body)
        _assert_data_lines_clean(run)
        if mode is TLSMode.NONE:
            wire = _data_wire(run)
            assert re.search(rb"\r(?!\n)|(?<!\r)\n", wire) is None
            assert wire.count(b"\r\n.\r\n") == 1 and wire.endswith(b"\r\n.\r\n")
            # Nothing after the terminator but QUIT.
            after = run.wire_to_server.split(wire, 1)[1]
            assert after in (b"", b"QUIT\r\n")
