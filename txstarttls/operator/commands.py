"""The operator commands run from parsed options, each failure in one line.

mailq, show, flush and passwd run without the reactor; delete and requeue
need it, since they may open the store.
"""

from __future__ import annotations

import argparse
import getpass
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Final, TextIO

from twisted.internet.interfaces import IReactorTime

from txstarttls.operator.changes import change_queue, request_flush
from txstarttls.operator.directory import check_queue, resolve_queue
from txstarttls.operator.errors import EX_OK, EX_USAGE, OperatorError
from txstarttls.operator.formatting import format_mailq, format_message, mailq_json
from txstarttls.operator.listing import find_message, list_queue, read_content
from txstarttls.operator.requests import ACTIONS
from txstarttls.operator.users import (
    check_user_name,
    delete_user,
    read_new_password,
    set_password,
)

SYNCHRONOUS_COMMANDS: Final = frozenset({"mailq", "show", "flush", "passwd"})
"""Commands that run without the reactor (passwd reads the terminal)."""
REACTOR_COMMANDS: Final = ACTIONS
"""Commands that may open the store, whose writer reports through the reactor."""


def mailq_command(
    directory: Path, as_json: bool, stdout: TextIO, stderr: TextIO
) -> int:
    check_queue(directory)
    messages, problems = list_queue(directory)
    for problem in problems:
        stderr.write(f"txstarttls: {problem}\n")
    lines = mailq_json(messages) if as_json else format_mailq(messages, time.time())
    stdout.write("".join(line + "\n" for line in lines))
    return EX_OK


def flush_command(directory: Path, stdout: TextIO) -> int:
    status = request_flush(directory)
    if status.running:
        stdout.write(
            f"flush requested: {status.describe(directory)} retries every deferred "
            "message within a second\n"
        )
    else:
        stdout.write(
            f"no relay is running on {directory}; messages will be tried when it "
            "starts\n"
        )
    return EX_OK


def _run_synchronous(
    options: argparse.Namespace,
    stdout: TextIO,
    stderr: TextIO,
    stdin: TextIO,
    ask: Callable[[str], str],
) -> int:
    if options.command == "passwd":
        path, user = Path(options.users), str(options.user)
        if options.delete:
            delete_user(path, user)
            stdout.write(f"user {user} deleted from {path}\n")
            return EX_OK
        check_user_name(user)
        password = read_new_password(user, options.stdin, stdin, ask)
        if set_password(path, user, password):
            stdout.write(f"user {user} added to {path}\n")
        else:
            stdout.write(f"password of {user} changed in {path}\n")
        return EX_OK
    directory = resolve_queue(options.queue)
    if options.command == "mailq":
        return mailq_command(directory, options.json, stdout, stderr)
    if options.command == "flush":
        return flush_command(directory, stdout)
    if options.command == "show":
        check_queue(directory)
        message = find_message(directory, options.queue_id)
        content = read_content(directory, message)
        stdout.write(format_message(message, content, time.time(), body=options.body))
        return EX_OK
    raise OperatorError(f"unknown command {options.command!r}", EX_USAGE)


def run_command(
    options: argparse.Namespace,
    stdout: TextIO | None = None,
    stderr: TextIO | None = None,
    *,
    stdin: TextIO | None = None,
    ask: Callable[[str], str] = getpass.getpass,
) -> int:
    """mailq, show, flush and passwd from parsed options; errors in one line."""
    out = stdout or sys.stdout
    err = stderr or sys.stderr
    try:
        return _run_synchronous(options, out, err, stdin or sys.stdin, ask)
    except OperatorError as error:
        err.write(f"txstarttls: {error}\n")
        return error.status


async def run_change_command(
    reactor: IReactorTime,
    options: argparse.Namespace,
    stdout: TextIO | None = None,
    stderr: TextIO | None = None,
) -> int:
    """delete and requeue from parsed options; errors in one line."""
    out = stdout or sys.stdout
    err = stderr or sys.stderr
    ids: list[str] = list(options.queue_ids)
    if bool(ids) == bool(options.all):
        choice = "not both" if ids else "one of them"
        err.write(
            f"txstarttls: {options.command}: give queue ids or --all ({choice})\n"
        )
        return EX_USAGE
    try:
        return await change_queue(
            reactor,
            resolve_queue(options.queue),
            options.command,
            ids,
            out,
            err,
            all_messages=options.all,
            wait=options.wait,
        )
    except OperatorError as error:
        err.write(f"txstarttls: {error}\n")
        return error.status
