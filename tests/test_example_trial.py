"""The testing kit as a user's trial suite would use it (docs/testing.md).

An application that sends mail through txstarttls is tested against
``TestMailServer`` in memory: real TLS from a CA made for the test, scripted
failures, and every message and transcript to inspect. No sockets, no
reactor: SynchronousTestCase and a Clock make it deterministic.
"""

from __future__ import annotations

from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from txstarttls import (
    ClientTLS,
    Credentials,
    Envelope,
    ESMTPClient,
    RecipientsRefused,
    SendResult,
    TLSPolicy,
    Upstream,
    prepare,
    prepare_tls,
    run_session,
)
from txstarttls.testing import TestMailServer, connect_in_memory


def notify_admins(
    client: ESMTPClient, upstream: Upstream, tls: ClientTLS | None, text: str
) -> Deferred[SendResult]:
    """The application code under test: one alert to the on-call addresses."""
    message = f"Subject: alert\r\n\r\n{text}\r\n".encode()
    envelope = Envelope("app@example.net", ("oncall@example.net", "boss@example.net"))
    return ensureDeferred(
        run_session(client, upstream, tls, envelope, prepare(message))
    )


class NotifierTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.server = TestMailServer(users={"app": "s3cret"})
        self.upstream = Upstream(
            host="mx.test.example",
            tls=TLSPolicy(),
            credentials=Credentials("app", password="s3cret"),
            ehlo_name="app.example.net",
        )
        self.tls = prepare_tls(self.upstream, trust_root=self.server.trust_root())

    def send(self, text: str) -> Deferred[SendResult]:
        client = ESMTPClient(Clock())
        connection = connect_in_memory(client, self.server.factory.buildProtocol(None))
        sent = notify_admins(client, self.upstream, self.tls, text)
        connection.pump()
        return sent

    def test_alert_is_delivered_over_tls_with_auth(self) -> None:
        result = self.successResultOf(self.send("disk full"))
        self.assertEqual(len(result.delivered), 2)
        (message,) = self.server.messages
        self.assertTrue(message.tls)
        self.assertEqual(message.authenticated_as, "app")
        self.assertIn(b"disk full", message.data)

    def test_one_refused_recipient_is_reported_not_hidden(self) -> None:
        self.server.script.reply_to(
            "RCPT", "550 5.1.1 no such user", match=lambda arg: "boss@" in arg
        )
        result = self.successResultOf(self.send("disk full"))
        self.assertEqual([r.status for r in result.recipients], ["sent", "bounced"])

    def test_every_recipient_refused_is_an_error(self) -> None:
        self.server.script.reply_to("RCPT", "450 4.2.1 mailbox busy")
        failure = self.failureResultOf(self.send("disk full"), RecipientsRefused)
        self.assertTrue(failure.value.is_transient)
        self.assertEqual(self.server.messages, [])
