"""``txstarttls-sendmail``: the sendmail command that programs (cron, PHP, mail) call.

It reads one message from standard input and drops it, durably, into the
queue directory's ``incoming/`` (:func:`~txstarttls.queue.deliver_to_incoming`),
so it works while the relay is down and the running relay picks it up within a
second. It never talks SMTP and never takes the queue's lock.

Like sendmail it adds Date: and Message-ID: (and From:) when missing, puts a
Received: line on top, always removes Bcc:, and stores the message with CRLF
line ends. Options follow sendmail's getopt letters; those that only tune
sendmail itself are accepted and ignored. ``-bp`` lists the queue and ``-q``
asks the relay to flush it, as with sendmail and Postfix. With ``-t`` the
recipients of To:/Cc:/Bcc: (Resent-* when present) are added to those named
as arguments, as Postfix does. The envelope sender defaults to
``LOGIN@localhost``, meant to be replaced by the relay's ``--rewrite-sender``;
a bare local name (``root``) is refused as a recipient, since the smarthost
could not deliver it.

Exit statuses are sendmail's: 0 queued, 64 bad usage, 65 bad address or
message, 73 cannot create the queue file, 75 try again (disk full, I/O).
"""

from __future__ import annotations

import errno
import os
import pwd
import re
import socket
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from email.utils import formatdate, make_msgid
from typing import BinaryIO, Final, NoReturn, TextIO

from txstarttls.address import needs_smtputf8, validate_address
from txstarttls.dsn import xtext
from txstarttls.errors import InvalidAddress
from txstarttls.headers import (
    DataError,
    check_full_name,
    field_name,
    field_value,
    format_mailbox,
    normalise_line_ends,
    parse_addresses,
    split_address_list,
    split_header,
)
from txstarttls.operator import (
    EX_CANTCREAT,
    EX_DATAERR,
    EX_OK,
    EX_TEMPFAIL,
    EX_USAGE,
    OperatorError,
    flush_command,
    mailq_command,
    resolve_queue,
)
from txstarttls.queue import (
    QueueEntry,
    RecipientState,
    StoreError,
    deliver_to_incoming,
    new_queue_id,
)

__all__ = [
    "SendmailOptions",
    "UsageError",
    "build_message",
    "main",
    "parse_arguments",
    "read_message",
    "run",
    "split_address_list",
]

PROGRAM: Final = "txstarttls-sendmail"
USAGE: Final = (
    f"usage: {PROGRAM} [-t] [-i] [-f ADDR] [-F NAME] [-N DSN] [-R RET] [-V ENVID] "
    "[-bp | -q] [--queue DIR] [RECIPIENT...] < message"
)

# sendmail's getopt letters: those taking a value, and plain flags. Only the
# ones named in OPTIONS below do anything; the rest are accepted and ignored.
_WITH_VALUE: Final = frozenset("BCFLNORVXbefhopr")
_FLAGS: Final = frozenset("GUimntvx")
_ATTACHED_ONLY: Final = frozenset("Adq")
_SAFE_HOSTNAME: Final = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9])?")
_NOTIFY_WORDS: Final = frozenset({"SUCCESS", "DELAY", "FAILURE"})
_MAX_ENVID: Final = 100
_CANNOT_CREATE: Final = frozenset(
    {errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOENT, errno.ENOTDIR, errno.ELOOP}
)


class UsageError(Exception):
    """A command line sendmail would refuse: exit 64."""


@dataclass(slots=True)
class SendmailOptions:
    """What the command line asked for; the defaults are sendmail's."""

    mode: str = "deliver"
    """deliver, mailq (-bp) or flush (-q)."""
    recipients: list[str] = field(default_factory=list)
    extract_recipients: bool = False
    ignore_dots: bool = False
    sender: str | None = None
    full_name: str | None = None
    notify: str | None = None
    ret: str | None = None
    envid: str | None = None
    queue: str | None = None
    verbose: bool = False


def parse_arguments(argv: Sequence[str], program: str = PROGRAM) -> SendmailOptions:
    """sendmail's options in getopt style (``-ti``, ``-fADDR``, ``-f ADDR``, ``-oi``).

    Options may follow recipients, as GNU getopt allows; ``--`` ends them.
    """
    options = SendmailOptions()
    if os.path.basename(program) == "mailq":
        options.mode = "mailq"
    arguments = list(argv)
    index = 0
    while index < len(arguments):
        argument = arguments[index]
        index += 1
        if argument == "--":
            options.recipients += arguments[index:]
            break
        if argument.startswith("--queue"):
            name, equals, value = argument.partition("=")
            if name != "--queue":
                raise UsageError(f"unknown option {argument}")
            if not equals:
                if index == len(arguments):
                    raise UsageError("option --queue needs a directory")
                value, index = arguments[index], index + 1
            options.queue = value
            continue
        if argument.startswith("--"):
            raise UsageError(f"unknown option {argument.partition('=')[0]}")
        if not argument.startswith("-") or argument == "-":
            options.recipients.append(argument)
            continue
        position = 1
        while position < len(argument):
            letter, rest = argument[position], argument[position + 1 :]
            position += 1
            if letter in _FLAGS:
                _flag(options, letter)
                continue
            if letter in _ATTACHED_ONLY:
                _option(options, letter, rest)
                break
            if letter not in _WITH_VALUE:
                raise UsageError(f"unknown option -{letter}")
            if not rest:
                if index == len(arguments):
                    raise UsageError(f"option -{letter} needs a value")
                rest, index = arguments[index], index + 1
            _option(options, letter, rest)
            break
    return options


def _flag(options: SendmailOptions, letter: str) -> None:
    if letter == "t":
        options.extract_recipients = True
    elif letter == "i":
        options.ignore_dots = True
    elif letter == "v":
        options.verbose = True


def _option(options: SendmailOptions, letter: str, value: str) -> None:
    if letter in "fr":
        options.sender = value
    elif letter == "F":
        options.full_name = value
    elif letter == "o" and value == "i":
        options.ignore_dots = True
    elif letter == "b":
        modes = {"m": "deliver", "p": "mailq"}
        if value not in modes:
            raise UsageError(f"-b{value} is not supported (only -bm and -bp)")
        options.mode = modes[value]
    elif letter == "q":
        options.mode = "flush"
    elif letter == "N":
        words = [word.strip().upper() for word in value.split(",")]
        if words != ["NEVER"] and (
            not set(words) <= _NOTIFY_WORDS or len(set(words)) != len(words)
        ):
            raise UsageError("-N takes never, or a list of success, delay, failure")
        options.notify = ",".join(words)
    elif letter == "R":
        if value.upper() not in ("FULL", "HDRS"):
            raise UsageError("-R takes full or hdrs")
        options.ret = value.upper()
    elif letter == "V":
        if not value.isascii() or not value.isprintable() or len(value) > _MAX_ENVID:
            raise UsageError(f"-V takes up to {_MAX_ENVID} printable ASCII characters")
        options.envid = value


# -- the message --------------------------------------------------------------


def read_message(stream: BinaryIO, *, ignore_dots: bool) -> bytes:
    """Standard input up to EOF, or up to a line holding one dot (without -i)."""
    lines = []
    for line in stream:
        if not ignore_dots and line.rstrip(b"\r\n") == b".":
            break
        lines.append(line)
    return b"".join(lines)


def local_hostname() -> str:
    """This host's name if it is a plain DNS name, else ``localhost``."""
    name = socket.gethostname()
    return name if _SAFE_HOSTNAME.fullmatch(name) else "localhost"


def _login() -> tuple[str, str]:
    """The real user's login name and GECOS full name, as sendmail takes them."""
    try:
        entry = pwd.getpwuid(os.getuid())
    except KeyError:
        return f"uid{os.getuid()}", ""
    gecos = entry.pw_gecos.split(",")[0].strip()
    return entry.pw_name, gecos if gecos.isprintable() else ""


def default_sender() -> str:
    """``LOGIN@localhost``: the relay's --rewrite-sender gives it a real domain."""
    return f"{_login()[0]}@localhost"


@dataclass(frozen=True, slots=True)
class BuiltMessage:
    """The content to queue and the recipients its headers named (for -t)."""

    content: bytes
    header_recipients: tuple[str, ...]


def build_message(
    raw: bytes,
    *,
    queue_id: str,
    sender: str,
    full_name: str | None,
    arrival: float,
    hostname: str,
    uid: int,
) -> BuiltMessage:
    """Normalise line ends, drop Bcc:, add the header fields a message must have."""
    fields, body = split_header(normalise_line_ends(raw))
    names = {field_name(field) for field in fields}
    resent = bool(names & {b"resent-to", b"resent-cc", b"resent-bcc"})
    wanted = (
        (b"resent-to", b"resent-cc", b"resent-bcc")
        if resent
        else (b"to", b"cc", b"bcc")
    )
    recipients = parse_addresses(
        (field_value(field) for field in fields if field_name(field) in wanted),
        "recipient header",
    )
    kept = [
        field for field in fields if field_name(field) not in (b"bcc", b"resent-bcc")
    ]
    date = formatdate(arrival, localtime=True)
    added = []
    if b"from" not in names:
        author = sender or default_sender()
        added.append(f"From: {format_mailbox(full_name, author)}")
    if b"date" not in names:
        added.append(f"Date: {date}")
    if b"message-id" not in names:
        added.append(f"Message-ID: {make_msgid(domain=hostname)}")
    received = (
        f"Received: by {hostname} ({PROGRAM}, from userid {uid})\r\n"
        f"\tid {queue_id}; {date}\r\n"
    ).encode("ascii")
    header = received + b"".join(kept)
    header += b"".join(line.encode("utf-8") + b"\r\n" for line in added)
    return BuiltMessage(header + b"\r\n" + body, tuple(recipients))


# -- the command --------------------------------------------------------------


def _unique(addresses: Iterable[str]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(addresses))


def _envelope_sender(options: SendmailOptions) -> str:
    if options.sender is None:
        sender = default_sender()
    else:
        sender = options.sender.strip()
        if sender.startswith("<") and sender.endswith(">"):
            sender = sender[1:-1]
    try:
        return validate_address(sender, allow_null=True)
    except InvalidAddress as error:
        raise DataError(f"sender: {error}") from None


def _queue_message(
    options: SendmailOptions, stdin: BinaryIO, environ: Mapping[str, str]
) -> str:
    directory = resolve_queue(options.queue, environ)
    sender = _envelope_sender(options)
    full_name = _login()[1] if options.full_name is None else options.full_name
    full_name = check_full_name(full_name)
    arguments = parse_addresses(options.recipients, "recipient")
    if not arguments and not options.extract_recipients:
        raise UsageError("no recipients given (name them, or use -t)")
    if not directory.is_dir():
        raise OperatorError(
            f"queue directory {directory} does not exist; start the relay once or "
            "give --queue DIR",
            EX_CANTCREAT,
        )
    raw = read_message(stdin, ignore_dots=options.ignore_dots)
    queue_id = new_queue_id()
    arrival = time.time()
    built = build_message(
        raw,
        queue_id=queue_id,
        sender=sender,
        full_name=full_name or None,
        arrival=arrival,
        hostname=local_hostname(),
        uid=os.getuid(),
    )
    recipients = _unique(
        [*arguments, *(built.header_recipients if options.extract_recipients else ())]
    )
    if not recipients:
        raise DataError("no recipient addresses found in the To:, Cc: or Bcc: headers")
    parameters = []
    if options.ret is not None:
        parameters.append(f"RET={options.ret}")
    if options.envid is not None:
        parameters.append(f"ENVID={xtext(options.envid)}")
    if any(needs_smtputf8(address) for address in (sender, *recipients)):
        parameters.append("SMTPUTF8")
    entry = QueueEntry(
        queue_id=queue_id,
        sender=sender,
        recipients=tuple(RecipientState(r, notify=options.notify) for r in recipients),
        arrival_time=arrival,
        size=len(built.content),
        mail_parameters=tuple(parameters),
    )
    try:
        deliver_to_incoming(directory, entry, built.content)
    except StoreError as error:
        status = EX_CANTCREAT if error.errno in _CANNOT_CREATE else EX_TEMPFAIL
        raise OperatorError(str(error), status) from None
    return queue_id


def run(
    argv: Sequence[str],
    stdin: BinaryIO,
    stdout: TextIO,
    stderr: TextIO,
    environ: Mapping[str, str] | None = None,
    *,
    program: str = PROGRAM,
) -> int:
    """The whole command, with its streams given; returns the exit status."""
    environment = os.environ if environ is None else environ
    name = os.path.basename(program)
    try:
        if "--help" in argv:
            stdout.write(USAGE + "\n")
            return EX_OK
        options = parse_arguments(argv, program)
        if options.mode == "mailq":
            directory = resolve_queue(options.queue, environment)
            return mailq_command(directory, False, stdout, stderr)
        if options.mode == "flush":
            return flush_command(resolve_queue(options.queue, environment), stdout)
        queue_id = _queue_message(options, stdin, environment)
    except UsageError as error:
        stderr.write(f"{name}: {error} (see --help)\n")
        return EX_USAGE
    except DataError as error:
        stderr.write(f"{name}: {error}\n")
        return EX_DATAERR
    except OperatorError as error:
        stderr.write(f"{name}: {error}\n")
        return error.status
    if options.verbose:
        stdout.write(f"{name}: queued as {queue_id}\n")
    return EX_OK


def main(argv: Sequence[str] | None = None) -> NoReturn:
    """Console entry point (``txstarttls-sendmail``, or linked as sendmail/mailq)."""
    arguments = sys.argv[1:] if argv is None else argv
    raise SystemExit(
        run(arguments, sys.stdin.buffer, sys.stdout, sys.stderr, program=sys.argv[0])
    )
