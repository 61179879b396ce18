"""Scripted misbehaviour for the test server: which command gets what reply.

Failures are scripted per command through :class:`ServerScript`::

    factory.script.reply_to("RCPT", "550 5.1.1 No such user",
                            match=lambda arg: "bad@" in arg)
    factory.script.reply_to("MAIL", "421 4.3.0 go away", then_close=True)
    factory.script.reply_to("DATA_END", "451 4.3.0 try later", times=1)
    factory.script.disconnect_at("DATA_END")
    factory.script.raw_reply_to("STARTTLS", b"220 Ready\\r\\n250 AUTH PLAIN\\r\\n",
                                start_tls=True)

Pure data and rules: the protocol asks :meth:`ServerScript.take` before it
handles each command and acts on the rule it gets.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass


@dataclass(slots=True, eq=False)
class ScriptRule:
    """One scripted behaviour; ``hits`` counts how often it fired."""

    command: str
    data: bytes
    match: Callable[[str], bool] | None = None
    times: int | None = None
    start_tls: bool = False
    close: bool = False
    abort: bool = False
    hits: int = 0

    def _applies(self, command: str, argument: str) -> bool:
        if self.command != command or self.times == 0:
            return False
        return self.match is None or self.match(argument)


def command_name(command: str) -> str:
    name = command.strip().upper()
    if not name or " " in name:
        raise ValueError(f"not a command name: {command!r}")
    return name


def reply_bytes(reply: str) -> bytes:
    lines = reply.replace("\r\n", "\n").strip("\n").split("\n")
    return "".join(line + "\r\n" for line in lines).encode("utf-8")


class ServerScript:
    """Per-command overrides that make the server misbehave on purpose.

    Commands are SMTP verbs (``"MAIL"``, ``"RCPT"``, ``"STARTTLS"``, any
    unknown verb too) plus two pseudo-commands: ``"CONNECT"`` (instead of
    the greeting) and ``"DATA_END"`` (the reply to the final dot; ``match``
    then sees the message content). A rule fires instead of the normal
    handling and never changes the session state, except that after
    ``DATA_END`` the transaction is over, and ``start_tls`` starts TLS with
    the usual buffer discard and session reset. The first rule that applies
    wins; ``match`` sees the command's argument text; ``times=None`` means
    for ever. ``raw_reply_to(command, b"")`` stalls: no reply at all.
    """

    def __init__(self) -> None:
        self.rules: list[ScriptRule] = []
        self.pre_tls_extensions: tuple[str, ...] | None = None
        self.post_tls_extensions: tuple[str, ...] | None = None

    def reply_to(
        self,
        command: str,
        reply: str,
        *,
        match: Callable[[str], bool] | None = None,
        times: int | None = None,
        then_close: bool = False,
    ) -> ScriptRule:
        """Answer ``command`` with ``reply`` (lines split on newlines)."""
        return self._add(
            ScriptRule(
                command_name(command),
                reply_bytes(reply),
                match=match,
                times=times,
                close=then_close,
            )
        )

    def raw_reply_to(
        self,
        command: str,
        data: bytes,
        *,
        match: Callable[[str], bool] | None = None,
        times: int | None = None,
        start_tls: bool = False,
        close: bool = False,
    ) -> ScriptRule:
        """Answer ``command`` with ``data`` in one write, then maybe start TLS
        or close: the tool for hostile-server tests (injection, bad syntax)."""
        return self._add(
            ScriptRule(
                command_name(command),
                data,
                match=match,
                times=times,
                start_tls=start_tls,
                close=close,
            )
        )

    def disconnect_at(
        self,
        command: str,
        *,
        match: Callable[[str], bool] | None = None,
        times: int | None = None,
        abort: bool = False,
    ) -> ScriptRule:
        """Close without replying (``abort`` resets instead of closing)."""
        return self._add(
            ScriptRule(
                command_name(command),
                b"",
                match=match,
                times=times,
                close=not abort,
                abort=abort,
            )
        )

    def raw_greeting(self, data: bytes, *, close: bool = False) -> ScriptRule:
        """Send ``data`` instead of the 220 greeting."""
        return self.raw_reply_to("CONNECT", data, close=close)

    def ehlo_extensions(
        self,
        *,
        pre_tls: Sequence[str] | None = None,
        post_tls: Sequence[str] | None = None,
    ) -> None:
        """Replace what EHLO advertises before and/or after TLS.

        Only the advertisement changes: commands behave as configured, so a
        server can, say, hide STARTTLS and still accept it.
        """
        if pre_tls is not None:
            self.pre_tls_extensions = tuple(pre_tls)
        if post_tls is not None:
            self.post_tls_extensions = tuple(post_tls)

    def clear(self) -> None:
        """Forget every rule and extension override."""
        self.rules.clear()
        self.pre_tls_extensions = None
        self.post_tls_extensions = None

    def take(self, command: str, argument: str) -> ScriptRule | None:
        """The rule to apply to this command, counted as used; or None."""
        for rule in self.rules:
            if rule._applies(command, argument):
                rule.hits += 1
                if rule.times is not None:
                    rule.times -= 1
                return rule
        return None

    def _add(self, rule: ScriptRule) -> ScriptRule:
        self.rules.append(rule)
        return rule
