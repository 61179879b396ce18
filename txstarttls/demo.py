"""``txstarttls demo``: the whole relay, end to end, in one command.

It starts the relay exactly as ``twistd starttls-relay`` would (a durable
queue in a temporary directory, a listener on 127.0.0.1, the built-in local
upstream with STARTTLS from a throwaway CA and AUTH), hands it one message the
way a legacy program does (plaintext SMTP to loopback), waits for the
delivery and prints its Postfix-style log line.
"""

from __future__ import annotations

import tempfile
from typing import TextIO

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import ILogObserver, LogEvent, formatEvent, globalLogPublisher
from zope.interface import provider

from txstarttls.client import Transcript
from txstarttls.config import build_config
from txstarttls.send import deliver
from txstarttls.service import ListenerService, build_relay_service
from txstarttls.session import Envelope
from txstarttls.tls import TLSMode, TLSPolicy
from txstarttls.upstream import Upstream

DEMO_MESSAGE = (
    b"From: Legacy Cron <cron@legacy.example>\r\n"
    b"To: Admin <admin@example.net>\r\n"
    b"Subject: txstarttls demo\r\n"
    b"\r\n"
    b"Queued durably, then relayed over verified STARTTLS with AUTH.\r\n"
    b".A line starting with a dot survives dot-stuffing.\r\n"
)


class _DeliveryWatcher:
    """Collects the runner's per-recipient log lines as they happen."""

    def __init__(self, expected: int) -> None:
        self.lines: list[str] = []
        self.expected = expected
        self.done: Deferred[None] = Deferred()

        @provider(ILogObserver)
        def observe(event: LogEvent) -> None:
            if event.get("log_namespace") != "txstarttls.delivery":
                return
            if "status" not in event:
                return
            self.lines.append(formatEvent(event))
            if len(self.lines) >= self.expected and not self.done.called:
                self.done.callback(None)

        self.observer = observe


async def run_demo(
    reactor: IReactorTime,
    sender: str,
    recipients: list[str],
    stdout: TextIO,
    transcript: Transcript | None,
) -> int:
    """Run the relay, send one message into it, report the delivery."""
    with tempfile.TemporaryDirectory(prefix="txstarttls-demo-") as queue:
        config = build_config({"queue": queue, "listen": ["tcp:0:interface=127.0.0.1"]})
        relay = build_relay_service(reactor, config)  # type: ignore[arg-type]
        watcher = _DeliveryWatcher(len(recipients))
        globalLogPublisher.addObserver(watcher.observer)
        relay.startService()  # type: ignore[no-untyped-call]
        try:
            listener = next(s for s in relay if isinstance(s, ListenerService))
            assert listener.listening is not None
            await listener.listening
            assert listener.port is not None
            port = listener.port.getHost().port  # type: ignore[attr-defined]
            stdout.write(
                f"relay listening on 127.0.0.1:{port}, queue in {queue}\n"
                "smarthost: the built-in local upstream (STARTTLS with a "
                "throwaway CA, AUTH PLAIN)\n\n"
                "a legacy program hands the relay one message:\n"
            )
            result = await deliver(
                reactor,
                Upstream(
                    host="127.0.0.1",
                    port=port,
                    tls=TLSPolicy(mode=TLSMode.NONE),
                    ehlo_name="legacy.example",
                ),
                Envelope(sender, tuple(recipients)),
                DEMO_MESSAGE,
                transcript=transcript,
            )
            stdout.write(f"\nthe relay answered: {result.reply}\n")
            timeout = reactor.callLater(30, watcher.done.cancel)
            await watcher.done
            if timeout.active():
                timeout.cancel()
            stdout.write("\nthe relay delivered it (its log line):\n")
            for line in watcher.lines:
                stdout.write(line + "\n")
        finally:
            globalLogPublisher.removeObserver(watcher.observer)
            await relay.stopService()  # type: ignore[no-untyped-call]
    return 0 if all("status=sent" in line for line in watcher.lines) else 75
