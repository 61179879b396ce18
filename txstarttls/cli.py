"""The ``txstarttls`` command: send one message, or try it against a local server.

Exit statuses follow sysexits(3), as sendmail's and msmtp's do, so scripts
can tell "try again later" (75) from "will never work" (69).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn, TextIO

from twisted.internet.defer import ensureDeferred
from twisted.internet.interfaces import IReactorTime

from txstarttls import __version__
from txstarttls.client import Timeouts, Transcript
from txstarttls.config import DEFAULT_QUEUE, reference_markdown
from txstarttls.credentials import read_password_file, token_command
from txstarttls.demo import run_demo
from txstarttls.errors import (
    ConfigurationError,
    InvalidAddress,
    InvalidArgument,
    SMTPError,
)
from txstarttls.operator import (
    DEFAULT_WAIT,
    QUEUE_ENVIRONMENT,
    REACTOR_COMMANDS,
    SYNCHRONOUS_COMMANDS,
    run_change_command,
    run_command,
)
from txstarttls.sasl import Credentials
from txstarttls.send import deliver
from txstarttls.session import Envelope, SendResult
from txstarttls.tls import TLSMode, TLSPolicy
from txstarttls.upstream import Upstream

EX_OK = 0
EX_USAGE = 64
EX_UNAVAILABLE = 69
EX_TEMPFAIL = 75
EX_CONFIG = 78


class UsageError(Exception):
    """A bad command line: exit 64."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        """One line, exit 64: the full usage is one --help away."""
        self.exit(EX_USAGE, f"{self.prog}: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="txstarttls", description=__doc__)
    parser.add_argument("--version", action="version", version=__version__)
    commands = parser.add_subparsers(dest="command", required=True)
    send = commands.add_parser(
        "send",
        help="send one message over verified STARTTLS",
        description="Send one message as given (no header is added).",
    )
    add_upstream_options(send)
    send.add_argument("--from", dest="sender", required=True, metavar="ADDR")
    send.add_argument(
        "--to", dest="recipients", action="append", required=True, metavar="ADDR"
    )
    send.add_argument(
        "message", nargs="?", help="file holding the message (default: stdin)"
    )
    send.add_argument(
        "-v", "--verbose", action="store_true", help="print the transcript"
    )
    demo = commands.add_parser(
        "demo",
        help="run the relay with its built-in local upstream and send one message",
        description=(
            "Start the relay as twistd starttls-relay would (queue in a temporary "
            "directory, listener on 127.0.0.1, the built-in local upstream with "
            "STARTTLS from a throwaway CA and AUTH), hand it one message and "
            "print the Postfix-style log line of its delivery."
        ),
    )
    demo.add_argument("--from", dest="sender", default="cron@legacy.example")
    demo.add_argument("--to", dest="recipients", action="append", metavar="ADDR")
    demo.add_argument(
        "-q", "--quiet", action="store_true", help="do not print the transcript"
    )
    add_operator_commands(commands)
    return parser


def add_operator_commands(commands: argparse._SubParsersAction[Any]) -> None:
    """mailq, show, flush, delete, requeue, passwd (logic in txstarttls.operator)."""
    queue = argparse.ArgumentParser(add_help=False)
    queue.add_argument(
        "--queue",
        metavar="DIR",
        help=f"queue directory (default: ${QUEUE_ENVIRONMENT}, else {DEFAULT_QUEUE})",
    )
    mailq = commands.add_parser(
        "mailq", parents=[queue], help="list the queued messages"
    )
    mailq.add_argument(
        "--json", action="store_true", help="one JSON object per message and line"
    )
    show = commands.add_parser(
        "show", parents=[queue], help="show one message's envelope and headers"
    )
    show.add_argument("queue_id", metavar="ID", help="queue id, as mailq shows it")
    show.add_argument("--body", action="store_true", help="include the body")
    commands.add_parser(
        "flush", parents=[queue], help="have the running relay retry everything now"
    )
    for name, summary in (
        ("delete", "remove messages from the queue"),
        ("requeue", "try messages again now, keeping each recipient's state"),
    ):
        change = commands.add_parser(name, parents=[queue], help=summary)
        change.add_argument(
            "queue_ids", nargs="*", metavar="ID", help="queue ids, as mailq shows them"
        )
        change.add_argument("--all", action="store_true", help="every message")
        change.add_argument(
            "--wait",
            type=float,
            default=DEFAULT_WAIT,
            metavar="SECONDS",
            help="how long to wait for a running relay to apply it (0: do not wait)",
        )
    passwd = commands.add_parser(
        "passwd", help="add, change or delete a user of the listener's users file"
    )
    passwd.add_argument(
        "--users", required=True, metavar="FILE", help="the relay's --users file"
    )
    passwd.add_argument("user", metavar="USER", help="the user name to set or delete")
    passwd.add_argument(
        "--stdin", action="store_true", help="read the password once from stdin"
    )
    passwd.add_argument("--delete", action="store_true", help="remove the user")
    commands.add_parser(
        "config-reference",
        help="print the relay's configuration reference (docs/configuration.md)",
    )


def add_upstream_options(parser: argparse.ArgumentParser) -> None:
    """The connection, TLS and AUTH options ``send`` shares with other commands."""
    parser.add_argument("--host", default="localhost")
    parser.add_argument("--port", type=int)
    parser.add_argument(
        "--tls",
        choices=[mode.value for mode in TLSMode],
        default=TLSMode.REQUIRED.value,
    )
    parser.add_argument("--tls-hostname", metavar="NAME")
    parser.add_argument("--ca-file", metavar="PEM")
    parser.add_argument("--fingerprint", metavar="SHA256")
    parser.add_argument("--username")
    secret = parser.add_mutually_exclusive_group()
    secret.add_argument("--password-file", metavar="FILE")
    secret.add_argument("--password-env", metavar="VAR")
    secret.add_argument("--oauth2-token-command", metavar="CMD")
    parser.add_argument("--ehlo", metavar="NAME")
    parser.add_argument(
        "--allow-plaintext-auth",
        action="store_true",
        help="allow AUTH without TLS, to a loopback or UNIX-socket peer only",
    )
    parser.add_argument(
        "--chunking",
        action="store_true",
        help="send the body with BDAT (RFC 3030) when the server offers CHUNKING",
    )
    parser.add_argument("--timeout", type=float, metavar="SECONDS")


def read_password(options: argparse.Namespace) -> str | None:
    if options.password_file:
        return read_password_file(options.password_file)
    if options.password_env:
        value = os.environ.get(options.password_env)
        if value is None:
            raise ConfigurationError(
                f"environment variable {options.password_env} is not set"
            )
        return str(value)
    return None


def build_upstream(reactor: object, options: argparse.Namespace) -> Upstream:
    credentials = None
    password = read_password(options)
    if options.oauth2_token_command and not options.username:
        raise UsageError("--oauth2-token-command needs --username")
    if options.username:
        if options.oauth2_token_command:
            command = options.oauth2_token_command
            credentials = Credentials(
                options.username, token=lambda: token_command(reactor, command)
            )
        elif password is not None:
            try:
                credentials = Credentials(options.username, password=password)
            except InvalidArgument as error:
                raise ConfigurationError(str(error)) from None
        else:
            raise UsageError(
                "--username needs --password-file, --password-env "
                "or --oauth2-token-command"
            )
    timeouts = Timeouts()
    if options.timeout is not None:
        timeouts = Timeouts(
            **{
                name: options.timeout
                for name in (
                    "connect",
                    "greeting",
                    "command",
                    "tls_handshake",
                    "mail",
                    "rcpt",
                    "data",
                    "data_block",
                    "end_of_data",
                )
            }
        )
    return Upstream(
        host=options.host,
        port=options.port,
        tls=TLSPolicy(
            mode=TLSMode.parse(options.tls),
            hostname=options.tls_hostname,
            ca_file=options.ca_file,
            fingerprint=options.fingerprint,
        ),
        credentials=credentials,
        ehlo_name=options.ehlo,
        timeouts=timeouts,
        allow_plaintext_auth=options.allow_plaintext_auth,
        chunking=options.chunking,
    )


def format_result_lines(result: SendResult) -> list[str]:
    """One Postfix-style line per recipient."""
    tls = result.tls.version if result.tls else "none"
    return [
        f"to=<{r.recipient}>, relay={result.relay}, tls={tls}, dsn={r.dsn}, "
        f"status={r.status} ({r.reply})"
        for r in result.recipients
    ]


def exit_status_for(result: SendResult) -> int:
    refused = result.refused
    if any(r.is_permanent for r in refused):
        return EX_UNAVAILABLE
    return EX_TEMPFAIL if refused else EX_OK


def exit_status_for_error(error: SMTPError) -> int:
    if isinstance(error, ConfigurationError):
        return EX_CONFIG
    if isinstance(error, InvalidAddress | InvalidArgument):
        return EX_USAGE
    return EX_TEMPFAIL if error.is_transient else EX_UNAVAILABLE


def _transcript_printer(stream: TextIO) -> Transcript:
    def show(direction: str, line: bytes) -> None:
        arrow = "->" if direction == "C" else "<-"
        stream.write(f"{arrow} {line.decode('utf-8', 'backslashreplace')}\n")

    return show


async def run_send(
    reactor: IReactorTime, options: argparse.Namespace, stdout: TextIO, stderr: TextIO
) -> int:
    try:
        upstream = build_upstream(reactor, options)
        message = _read_message(options.message)
    except UsageError as error:
        stderr.write(f"txstarttls: {error}\n")
        return EX_USAGE
    except SMTPError as error:
        stderr.write(f"txstarttls: {error}\n")
        return exit_status_for_error(error)
    return await _send(reactor, upstream, options, message, stdout, stderr)


async def _send(
    reactor: IReactorTime,
    upstream: Upstream,
    options: argparse.Namespace,
    message: bytes,
    stdout: TextIO,
    stderr: TextIO,
) -> int:
    try:
        envelope = Envelope(options.sender, tuple(options.recipients))
    except SMTPError as error:
        stderr.write(f"txstarttls: {error}\n")
        return exit_status_for_error(error)
    transcript = (
        _transcript_printer(getattr(options, "transcript_stream", stderr))
        if options.verbose
        else None
    )
    try:
        result = await deliver(
            reactor, upstream, envelope, message, transcript=transcript
        )
    except SMTPError as error:
        stderr.write(f"txstarttls: {error}\n")
        for refused in getattr(error, "recipients", ()):
            stdout.write(
                f"to=<{refused.recipient}>, dsn={refused.dsn}, "
                f"status={refused.status} ({refused.reply})\n"
            )
        return exit_status_for_error(error)
    for line in format_result_lines(result):
        stdout.write(line + "\n")
    return exit_status_for(result)


def _read_message(path: str | None) -> bytes:
    if path is None or path == "-":
        return sys.stdin.buffer.read()
    try:
        return Path(path).read_bytes()
    except OSError as error:
        raise UsageError(f"cannot read message file {path}: {error.strerror}") from None


def main(argv: Sequence[str] | None = None) -> NoReturn:
    """Console entry point: the only place that uses the global reactor."""
    options = build_parser().parse_args(argv)
    if options.command in SYNCHRONOUS_COMMANDS:
        raise SystemExit(run_command(options))
    from twisted.internet.task import react

    async def run(reactor: IReactorTime) -> None:
        if options.command == "config-reference":
            sys.stdout.write(reference_markdown())
            return
        if options.command == "demo":
            status = await run_demo(
                reactor,
                options.sender,
                options.recipients or ["admin@example.net"],
                sys.stdout,
                None if options.quiet else _transcript_printer(sys.stdout),
            )
        elif options.command in REACTOR_COMMANDS:
            status = await run_change_command(reactor, options)
        else:
            status = await run_send(reactor, options, sys.stdout, sys.stderr)
        if status != EX_OK:
            raise SystemExit(status)

    react(lambda reactor: ensureDeferred(run(reactor)))
    raise AssertionError("react() always exits")
