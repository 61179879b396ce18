"""Queue operations for operators: mailq, show, flush, delete, requeue, passwd.

They work whether the relay runs or not. Reading never takes the queue's
lock: envelopes are renamed into place whole, so a reader sees each one
complete or not at all. Changing does: with the lock free, the command opens
the :class:`~txstarttls.queue.FilesystemStore` itself (holding the lock for
the few milliseconds it takes); while a relay holds it, the command drops a
request file in ``DIR/requests/`` that the relay applies with
:func:`apply_requests`, and waits to see it done. Nothing but the lock
holder ever writes ``messages/``.

Exit statuses follow sysexits(3): 64 bad command line or queue id, 65 bad
input data, 66 no such queue directory (or not a queue), 67 no such user,
69 no such message, 73 cannot create a file, 75 try again (disk error, relay
busy), 77 permission denied, 78 broken configuration (users file).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import errno
import fcntl
import getpass
import json
import math
import os
import re
import secrets
import stat
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final, Protocol, TextIO

from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.interfaces import IReactorFromThreads, IReactorTime
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.python.failure import Failure

from txstarttls.config import DEFAULT_QUEUE
from txstarttls.queue import (
    CorruptEntry,
    FilesystemStore,
    IMessageStore,
    MessageNotFound,
    QueueEntry,
    StoreError,
    StoreLocked,
    valid_queue_id,
)
from txstarttls.userdb import UsersFileError, hash_password, load_users

__all__ = [
    "ACTIONS",
    "DEFAULT_WAIT",
    "FLUSH_REQUEST",
    "QUEUE_ENVIRONMENT",
    "REACTOR_COMMANDS",
    "REQUESTS_DIRECTORY",
    "SYNCHRONOUS_COMMANDS",
    "OperatorError",
    "QueueRequest",
    "QueuedMessage",
    "RelayStatus",
    "RequestError",
    "RequestRunner",
    "apply_requests",
    "change_queue",
    "check_queue",
    "check_user_name",
    "delete_user",
    "find_message",
    "flush_command",
    "format_mailq",
    "format_message",
    "list_queue",
    "mailq_command",
    "mailq_json",
    "pending_requests",
    "printable",
    "read_content",
    "read_request",
    "relay_status",
    "request_flush",
    "resolve_queue",
    "run_change_command",
    "run_command",
    "set_password",
    "write_request",
]

log = Logger(namespace="txstarttls.operator")

EX_OK: Final = 0
EX_USAGE: Final = 64
EX_DATAERR: Final = 65
EX_NOINPUT: Final = 66
EX_NOUSER: Final = 67
EX_UNAVAILABLE: Final = 69
EX_CANTCREAT: Final = 73
EX_TEMPFAIL: Final = 75
EX_NOPERM: Final = 77
EX_CONFIG: Final = 78

QUEUE_ENVIRONMENT: Final = "TXSTARTTLS_QUEUE"
"""Names the queue directory when ``--queue`` is not given."""
FLUSH_REQUEST: Final = "flush"
"""Same name as ``txstarttls.service.FLUSH_REQUEST`` (the relay polls it)."""
REQUESTS_DIRECTORY: Final = "requests"
ACTIONS: Final = frozenset({"delete", "requeue"})
REQUEST_VERSION: Final = 1
REQUEST_LIFETIME: Final = 3600.0
"""An unapplied request older than this is dropped, never applied late."""
MAX_REQUEST_BYTES: Final = 16 * 1024 * 1024
MAX_ENVELOPE_BYTES: Final = 16 * 1024 * 1024
POLL_INTERVAL: Final = 0.1
DEFAULT_WAIT: Final = 10.0

_REQUEST_NAME: Final = re.compile(r"[0-9]{19}\.[0-9]{1,10}\.[0-9a-f]{8}\.json")
_READ_FLAGS: Final = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC
_CREATE_FLAGS: Final = (
    os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
)
# Everything a terminal could take as a command, except tab and newline.
_UNSAFE_TEXT: Final = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\u2028\u2029]")


class OperatorError(Exception):
    """A one-line message for the operator and the sysexits status to exit with."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


def _os_error(action: str, path: Path | str, error: OSError) -> OperatorError:
    """Permission problems are 77; a missing directory 66; the rest try-again."""
    reason = error.strerror or str(error)
    if error.errno in (errno.EACCES, errno.EPERM):
        return OperatorError(
            f"cannot {action} {path}: {reason} (run as the relay's user)", EX_NOPERM
        )
    if error.errno == errno.EROFS:
        return OperatorError(f"cannot {action} {path}: {reason}", EX_CANTCREAT)
    return OperatorError(f"cannot {action} {path}: {reason}", EX_TEMPFAIL)


def _store_error(error: StoreError) -> OperatorError:
    if error.errno in (errno.EACCES, errno.EPERM):
        return OperatorError(f"{error} (run as the relay's user)", EX_NOPERM)
    return OperatorError(str(error), EX_TEMPFAIL)


def printable(text: str) -> str:
    """``text`` with control characters escaped: mail and replies come from
    strangers, and an escape sequence must not reach the operator's terminal."""
    return _UNSAFE_TEXT.sub(lambda m: repr(m.group())[1:-1], text)


# -- the queue directory ------------------------------------------------------


def resolve_queue(given: str | None, environ: Mapping[str, str] | None = None) -> Path:
    """``--queue``, else ``$TXSTARTTLS_QUEUE``, else the relay's default."""
    environment = os.environ if environ is None else environ
    return Path(given or environment.get(QUEUE_ENVIRONMENT) or DEFAULT_QUEUE)


def check_queue(directory: Path) -> Path:
    """Refuse a path that is not a queue before anything is read or created.

    A relay makes ``messages/`` at its first start, ``txstarttls-sendmail``
    makes ``incoming/``; a directory with neither is a typo, and opening a
    store there would litter it.
    """
    hint = f"give --queue DIR or set {QUEUE_ENVIRONMENT}"
    try:
        info = directory.stat()
    except FileNotFoundError:
        raise OperatorError(
            f"queue directory {directory} does not exist ({hint})", EX_NOINPUT
        ) from None
    except OSError as error:
        raise _os_error("read queue directory", directory, error) from None
    if not stat.S_ISDIR(info.st_mode):
        raise OperatorError(
            f"queue directory {directory} is not a directory", EX_NOINPUT
        )
    if not os.access(directory, os.R_OK | os.X_OK):
        raise OperatorError(
            f"cannot read queue directory {directory}: permission denied "
            "(run as the relay's user)",
            EX_NOPERM,
        )
    if not any((directory / name).is_dir() for name in ("messages", "incoming")):
        raise OperatorError(
            f"{directory} is not a txstarttls queue directory (no messages/ or "
            f"incoming/ in it; {hint})",
            EX_NOINPUT,
        )
    return directory


@dataclass(frozen=True, slots=True)
class RelayStatus:
    """Whether a relay holds the queue's lock, and its pid as it wrote it."""

    running: bool
    pid: int | None = None

    def describe(self, directory: Path) -> str:
        owner = f" (pid {self.pid})" if self.pid is not None else ""
        return f"the relay on {directory}{owner}"


def relay_status(directory: Path) -> RelayStatus:
    """Probe ``DIR/lock`` with a shared, non-blocking flock.

    The probe holds the lock for microseconds; it is never used for reads,
    which need no lock at all.
    """
    path = directory / "lock"
    try:
        fd = os.open(path, _READ_FLAGS)
    except FileNotFoundError:
        return RelayStatus(running=False)
    except OSError as error:
        raise _os_error("open", path, error) from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
            return RelayStatus(running=True, pid=int(text) if text.isdigit() else None)
        except OSError as error:
            raise _os_error("lock", path, error) from None
        fcntl.flock(fd, fcntl.LOCK_UN)
        return RelayStatus(running=False)
    finally:
        os.close(fd)


# -- reading the queue --------------------------------------------------------


@dataclass(frozen=True, slots=True)
class QueuedMessage:
    """One message as ``mailq`` sees it: its envelope and where it waits."""

    entry: QueueEntry
    location: str
    """``messages`` (the relay's) or ``incoming`` (dropped by sendmail)."""

    @property
    def queue_id(self) -> str:
        return self.entry.queue_id

    @property
    def state(self) -> str:
        """incoming (not yet picked up), queued (never tried) or deferred."""
        if self.location == "incoming":
            return "incoming"
        return "deferred" if self.entry.attempts else "queued"


def _read_small(path: Path, limit: int) -> bytes:
    fd = os.open(path, _READ_FLAGS)
    with os.fdopen(fd, "rb") as file:
        if not stat.S_ISREG(os.fstat(file.fileno()).st_mode):
            raise CorruptEntry(f"{path} is not a regular file")
        data = file.read(limit + 1)
    if len(data) > limit:
        raise CorruptEntry(f"{path} is larger than {limit} octets")
    return data


def _read_entry(path: Path, queue_id: str) -> QueueEntry:
    entry = QueueEntry.from_json(_read_small(path, MAX_ENVELOPE_BYTES))
    if entry.queue_id != queue_id:
        raise CorruptEntry(f"envelope {path} names message {entry.queue_id}")
    return entry


def _listing(directory: Path) -> list[str]:
    try:
        return os.listdir(directory)
    except FileNotFoundError:
        return []
    except OSError as error:
        raise _os_error("list", directory, error) from None


def list_queue(directory: Path) -> tuple[list[QueuedMessage], list[str]]:
    """Every complete message, oldest first, and one line per unreadable one.

    A message that leaves while we look (delivered, adopted) is skipped or
    seen once: ``messages/`` wins over ``incoming/``.
    """
    found: dict[str, QueuedMessage] = {}
    problems: list[str] = []
    for location in ("incoming", "messages"):
        folder = directory / location
        for name in sorted(_listing(folder)):
            queue_id = name.removesuffix(".json")
            if not name.endswith(".json") or not valid_queue_id(queue_id):
                continue
            try:
                entry = _read_entry(folder / name, queue_id)
            except FileNotFoundError:
                continue
            except CorruptEntry as error:
                problems.append(
                    f"message {queue_id} in {location}/ is corrupt: {error}"
                )
                continue
            except OSError as error:
                raise _os_error("read", folder / name, error) from None
            found[queue_id] = QueuedMessage(entry, location)
    return [found[key] for key in sorted(found)], problems


def find_message(directory: Path, queue_id: str) -> QueuedMessage:
    """The message ``queue_id``; a malformed id is 64, an unknown one 69."""
    if not valid_queue_id(queue_id):
        raise OperatorError(
            f"invalid queue id {printable(queue_id)!r}: expected 18 upper-case hex "
            "digits, as mailq shows them",
            EX_USAGE,
        )
    for location in ("messages", "incoming"):
        path = directory / location / f"{queue_id}.json"
        try:
            return QueuedMessage(_read_entry(path, queue_id), location)
        except FileNotFoundError:
            continue
        except CorruptEntry as error:
            raise OperatorError(
                f"message {queue_id} is corrupt: {error}", EX_DATAERR
            ) from None
        except OSError as error:
            raise _os_error("read", path, error) from None
    raise OperatorError(
        f"no message {queue_id} in the queue {directory}", EX_UNAVAILABLE
    )


def read_content(directory: Path, message: QueuedMessage) -> bytes:
    path = directory / message.location / f"{message.queue_id}.eml"
    try:
        with open(os.open(path, _READ_FLAGS), "rb") as file:
            return file.read()
    except FileNotFoundError:
        raise OperatorError(
            f"message {message.queue_id} left the queue meanwhile", EX_UNAVAILABLE
        ) from None
    except OSError as error:
        raise _os_error("read", path, error) from None


# -- formatting ---------------------------------------------------------------


def _clock_time(timestamp: float) -> str:
    """Postfix's mailq arrival column, in local time."""
    return time.strftime("%a %b %d %H:%M:%S", time.localtime(timestamp))


def _full_time(timestamp: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S %z", time.localtime(timestamp))


def _path(address: str) -> str:
    return printable(address) if address else "<>"


def _next_attempt(
    message: QueuedMessage, now: float, when: Callable[[float], str]
) -> str:
    if message.state == "incoming":
        return "when the relay picks it up"
    next_attempt = message.entry.next_attempt
    return "now" if next_attempt <= now else when(next_attempt)


def _progress(message: QueuedMessage, now: float) -> str:
    if message.state == "incoming":
        return "waiting in incoming/ for the relay to pick it up"
    attempts = message.entry.attempts
    done = f"deferred after {_attempts(attempts)}" if attempts else "not tried yet"
    return f"{done}; next attempt {_next_attempt(message, now, _clock_time)}"


def _attempts(count: int) -> str:
    return "1 attempt" if count == 1 else f"{count} attempts"


def format_mailq(messages: Sequence[QueuedMessage], now: float) -> list[str]:
    """Postfix mailq's layout, with every recipient's state and last reply."""
    if not messages:
        return ["Mail queue is empty"]
    lines = [
        f"{'-Queue ID-':-<18} {'--Size--':>8} {'----Arrival Time----':20}  "
        "-Sender/Recipient-------"
    ]
    indent = " " * (18 + 1 + 8 + 1 + 20 + 2)
    total = 0
    for message in messages:
        entry = message.entry
        total += entry.size
        arrival = _clock_time(entry.arrival_time)
        lines.append(
            f"{entry.queue_id:18} {entry.size:>8} {arrival:20}  {_path(entry.sender)}"
        )
        lines.append(f"{indent}({_progress(message, now)})")
        for recipient in entry.recipients:
            if recipient.last_reply:
                lines.append(f"{indent}({printable(recipient.last_reply)})")
            lines.append(f"{indent}{printable(recipient.address)} [{recipient.status}]")
        lines.append("")
    requests = "1 Request" if len(messages) == 1 else f"{len(messages)} Requests"
    lines.append(f"-- {math.ceil(total / 1024)} Kbytes in {requests}.")
    return lines


def mailq_json(messages: Sequence[QueuedMessage]) -> list[str]:
    """One JSON object per message and line, in the manner of ``postqueue -j``."""
    lines = []
    for message in messages:
        entry = message.entry
        document = {
            "queue_name": message.state,
            "queue_id": entry.queue_id,
            "arrival_time": entry.arrival_time,
            "message_size": entry.size,
            "sender": entry.sender,
            "attempts": entry.attempts,
            "next_attempt": entry.next_attempt,
            "last_error": entry.last_error,
            "is_bounce": entry.is_bounce,
            "recipients": [
                {
                    "address": recipient.address,
                    "status": recipient.status,
                    "delay_reason": recipient.last_reply,
                    "dsn": recipient.dsn,
                    "attempts": recipient.attempts,
                }
                for recipient in entry.recipients
            ],
        }
        lines.append(json.dumps(document, ensure_ascii=True, sort_keys=True))
    return lines


def _split_content(content: bytes) -> tuple[str, str]:
    """Header section and body as text with LF line ends."""
    text = content.decode("utf-8", "backslashreplace").replace("\r\n", "\n")
    header, separator, body = text.partition("\n\n")
    return header + ("\n" if separator else ""), body


def format_message(
    message: QueuedMessage, content: bytes, now: float, *, body: bool = False
) -> str:
    """``txstarttls show``: the envelope in words, then the header section."""
    entry = message.entry
    rows = [
        ("Queue ID", f"{entry.queue_id} ({message.state} in {message.location}/)"),
        ("Arrival", _full_time(entry.arrival_time)),
        ("Size", f"{entry.size} octets"),
        ("Sender", f"<{printable(entry.sender)}>"),
    ]
    if entry.client_address or entry.client_helo:
        client = entry.client_address or "unknown"
        if entry.client_helo:
            client += f" (HELO {entry.client_helo})"
        rows.append(("Client", printable(client)))
    if entry.authenticated_as:
        rows.append(("Authenticated", printable(entry.authenticated_as)))
    if entry.mail_parameters:
        rows.append(("Parameters", printable(" ".join(entry.mail_parameters))))
    if entry.is_bounce:
        rows.append(("Bounce", "yes (a delivery status notification)"))
    rows.append(("Attempts", str(entry.attempts)))
    rows.append(("Next attempt", _next_attempt(message, now, _full_time)))
    if entry.last_error:
        rows.append(("Last error", printable(entry.last_error)))
    lines = [f"{label + ':':14}{value}" for label, value in rows]
    lines.append("Recipients:")
    for recipient in entry.recipients:
        details = [recipient.status, _attempts(recipient.attempts)]
        if recipient.notify:
            details.append(f"NOTIFY={recipient.notify}")
        if recipient.dsn:
            details.append(f"dsn={recipient.dsn}")
        lines.append(f"  <{printable(recipient.address)}> {', '.join(details)}")
        if recipient.last_reply:
            lines.append(f"      last reply: {printable(recipient.last_reply)}")
    header, text = _split_content(content)
    output = "\n".join(lines) + "\n\n" + printable(header)
    if body:
        output += "\n" + printable(text)
    return output


# -- requests to a running relay ----------------------------------------------


class RequestError(ValueError):
    """A request file that does not decode exactly; it is dropped, never guessed."""


@dataclass(frozen=True, slots=True)
class QueueRequest:
    """What ``delete`` or ``requeue`` asks a running relay to do."""

    action: str
    queue_ids: tuple[str, ...]
    created: float

    def __post_init__(self) -> None:
        if self.action not in ACTIONS:
            raise RequestError(f"unknown action {self.action!r}")
        for queue_id in self.queue_ids:
            if not valid_queue_id(queue_id):
                raise RequestError(f"invalid queue id {queue_id!r}")
        if not math.isfinite(self.created) or self.created < 0:
            raise RequestError("created must be a finite time >= 0")

    def to_json(self) -> bytes:
        document = {"version": REQUEST_VERSION, **dataclasses.asdict(self)}
        return json.dumps(document, sort_keys=True).encode("ascii") + b"\n"

    @classmethod
    def from_json(cls, data: bytes) -> QueueRequest:
        try:
            document = json.loads(data.decode("utf-8"))
        except (ValueError, RecursionError) as error:
            raise RequestError(f"not valid JSON: {error}") from None
        if not isinstance(document, dict):
            raise RequestError("not a JSON object")
        expected = {"version", "action", "queue_ids", "created"}
        if set(document) != expected:
            raise RequestError(f"keys must be exactly {sorted(expected)}")
        if document["version"] != REQUEST_VERSION:
            raise RequestError(f"unsupported version {document['version']!r}")
        action, ids, created = (
            document["action"],
            document["queue_ids"],
            document["created"],
        )
        if not isinstance(action, str):
            raise RequestError("action must be a string")
        if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
            raise RequestError("queue_ids must be a list of strings")
        if not isinstance(created, int | float) or isinstance(created, bool):
            raise RequestError("created must be a number")
        return cls(action, tuple(ids), float(created))


def write_request(directory: Path, request: QueueRequest) -> Path:
    """Put ``request`` in ``DIR/requests/`` whole (hidden temporary, then rename)."""
    folder = directory / REQUESTS_DIRECTORY
    name = f"{time.time_ns():019d}.{os.getpid()}.{secrets.token_hex(4)}.json"
    path = folder / name
    temporary = folder / f".{name}.tmp"
    try:
        with contextlib.suppress(FileExistsError):
            folder.mkdir(mode=0o700)
        fd = os.open(temporary, _CREATE_FLAGS, 0o600)
        try:
            with os.fdopen(fd, "wb") as file:
                file.write(request.to_json())
                file.flush()
                os.fsync(file.fileno())
            os.rename(temporary, path)
        finally:
            temporary.unlink(missing_ok=True)
    except OSError as error:
        raise _os_error("write a request in", folder, error) from None
    return path


def read_request(path: Path) -> QueueRequest:
    try:
        data = _read_small(path, MAX_REQUEST_BYTES)
    except CorruptEntry as error:
        raise RequestError(str(error)) from None
    return QueueRequest.from_json(data)


def pending_requests(directory: Path) -> list[Path]:
    """Request files not yet taken by the relay, oldest first."""
    folder = directory / REQUESTS_DIRECTORY
    try:
        names = os.listdir(folder)
    except FileNotFoundError:
        return []
    return [folder / name for name in sorted(names) if _REQUEST_NAME.fullmatch(name)]


def _claimed(path: Path) -> Path:
    """The name a request has while the relay applies it."""
    return path.with_name("." + path.name)


class RequestRunner(Protocol):
    """What :func:`apply_requests` needs of the relay: QueueRunner fits."""

    @property
    def store(self) -> IMessageStore: ...

    def notify_queued(self, queue_id: str) -> None: ...


def apply_requests(directory: Path | str, runner: RequestRunner) -> Deferred[int]:
    """In the relay: apply every pending ``delete``/``requeue`` request.

    Call it from the relay's one-second poll (``FlushWatcher``); it fires
    with the number of requests applied and never fails, so the poll goes
    on. Each request is claimed by renaming it (the waiting command can then
    no longer withdraw it) and removed once applied; a delete is done when
    the store has removed the files. A requeue only reschedules the message
    in the runner: rewriting its envelope here could undo an attempt that is
    just finishing, and the runner writes ``next_attempt`` after it anyway.
    """
    return ensureDeferred(_apply_all(Path(directory), runner)).addErrback(_apply_failed)


def _apply_failed(failure: Failure) -> int:
    log.failure("applying operator requests failed", failure)
    return 0


async def _apply_all(directory: Path, runner: RequestRunner) -> int:
    folder = directory / REQUESTS_DIRECTORY
    try:
        names = sorted(os.listdir(folder))
    except FileNotFoundError:
        return 0
    except OSError as error:
        log.error("cannot list {folder}: {error}", folder=str(folder), error=str(error))
        return 0
    applied = 0
    for name in names:
        path = folder / name
        if name.startswith("."):
            # A temporary of a crashed command or a claim of a crashed relay.
            if _older_than(path, REQUEST_LIFETIME):
                path.unlink(missing_ok=True)
            continue
        if not _REQUEST_NAME.fullmatch(name):
            continue
        claimed = _claimed(path)
        try:
            os.rename(path, claimed)
        except FileNotFoundError:
            continue  # withdrawn by the command that wrote it
        try:
            request = read_request(claimed)
        except (RequestError, OSError) as error:
            log.error(
                "operator request {name} dropped: {error}", name=name, error=str(error)
            )
            claimed.unlink(missing_ok=True)
            continue
        if time.time() - request.created > REQUEST_LIFETIME:
            log.warn("operator request {name} dropped: too old", name=name)
        else:
            await _apply(request, runner)
            applied += 1
        claimed.unlink(missing_ok=True)
    return applied


def _older_than(path: Path, seconds: float) -> bool:
    try:
        return time.time() - path.lstat().st_mtime > seconds
    except FileNotFoundError:
        return False


async def _apply(request: QueueRequest, runner: RequestRunner) -> None:
    store = runner.store
    for queue_id in request.queue_ids:
        try:
            if request.action == "delete":
                await store.remove(queue_id)
                log.info("{queue_id}: deleted by the operator", queue_id=queue_id)
            else:
                store.get(queue_id)
                runner.notify_queued(queue_id)
                log.info("{queue_id}: requeued by the operator", queue_id=queue_id)
        except MessageNotFound:
            log.info("{queue_id}: not in the queue any more", queue_id=queue_id)
        except (StoreError, CorruptEntry) as error:
            log.error(
                "{queue_id}: operator {action} failed: {error}",
                queue_id=queue_id,
                action=request.action,
                error=str(error),
            )


async def _wait_for_relay(clock: IReactorTime, path: Path, wait: float) -> str:
    """``done``, ``withdrawn`` (never taken; removed again) or ``busy``."""
    claimed = _claimed(path)
    for _ in range(2):
        deadline = clock.seconds() + wait
        while True:
            if not path.exists() and not claimed.exists():
                return "done"
            if clock.seconds() >= deadline:
                break
            await deferLater(clock, POLL_INTERVAL, lambda: None)
        try:
            path.unlink()
        except FileNotFoundError:
            continue  # taken: give it as long again to finish
        return "withdrawn"
    return "busy"


# -- delete and requeue -------------------------------------------------------


def _remove_incoming(directory: Path, queue_id: str) -> None:
    """Delete a message the relay has not adopted yet: envelope first.

    Its adoption links the envelope before unlinking it, so either the
    message is in ``messages/`` afterwards (the caller then deletes it there)
    or it never gets there.
    """
    folder = directory / "incoming"
    for suffix in (".json", ".eml"):
        try:
            (folder / f"{queue_id}{suffix}").unlink()
        except FileNotFoundError:
            pass
        except OSError as error:
            raise _os_error("remove", folder / f"{queue_id}{suffix}", error) from None


def _in_messages(directory: Path, queue_id: str) -> bool:
    return (directory / "messages" / f"{queue_id}.json").exists()


async def change_queue(
    reactor: IReactorTime,
    directory: Path,
    action: str,
    queue_ids: Sequence[str],
    stdout: TextIO,
    stderr: TextIO,
    *,
    all_messages: bool = False,
    wait: float = DEFAULT_WAIT,
) -> int:
    """``txstarttls delete`` / ``requeue``: directly, or through the running relay.

    Unknown ids are reported (69) and the known ones still handled; a
    malformed id stops everything (64) before anything changes.
    """
    check_queue(directory)
    for queue_id in queue_ids:
        if not valid_queue_id(queue_id):
            find_message(directory, queue_id)  # raises the one-line usage error
    listed, _ = list_queue(directory)
    status = EX_OK
    if all_messages:
        targets = listed
    else:
        present = {message.queue_id: message for message in listed}
        targets = []
        for queue_id in dict.fromkeys(queue_ids):
            if queue_id in present:
                targets.append(present[queue_id])
            else:
                stderr.write(
                    f"txstarttls: no message {queue_id} in the queue {directory}\n"
                )
                status = EX_UNAVAILABLE
    if all_messages and not targets:
        stdout.write(f"Mail queue is empty; nothing to {action}\n")
        return status
    spooled = [m.queue_id for m in targets if m.location == "messages"]
    for message in targets:
        if message.location != "incoming":
            continue
        if action == "delete":
            _remove_incoming(directory, message.queue_id)
            if _in_messages(directory, message.queue_id):
                spooled.append(message.queue_id)  # adopted meanwhile
                continue
            stdout.write(f"{message.queue_id}: deleted\n")
        else:
            stdout.write(
                f"{message.queue_id}: requeued (still in incoming/; tried as soon as "
                "the relay picks it up)\n"
            )
    if spooled:
        result = await _change_spooled(
            reactor, directory, action, spooled, stdout, stderr, wait
        )
        status = result or status
    return status


async def _change_spooled(
    reactor: IReactorTime,
    directory: Path,
    action: str,
    queue_ids: list[str],
    stdout: TextIO,
    stderr: TextIO,
    wait: float,
) -> int:
    try:
        store = FilesystemStore(directory, IReactorFromThreads(reactor))
    except StoreLocked:
        return await _through_relay(
            reactor, directory, action, queue_ids, stdout, stderr, wait
        )
    except StoreError as error:
        raise _store_error(error) from None
    status = EX_OK
    try:
        for queue_id in queue_ids:
            if action == "delete":
                await store.remove(queue_id)
            else:
                try:
                    entry = store.get(queue_id)
                except MessageNotFound:
                    stderr.write(
                        f"txstarttls: no message {queue_id} in the queue {directory}\n"
                    )
                    status = EX_UNAVAILABLE
                    continue
                await store.update(dataclasses.replace(entry, next_attempt=0.0))
            stdout.write(f"{queue_id}: {action}d\n")
    except StoreError as error:
        raise _store_error(error) from None
    except CorruptEntry as error:
        raise OperatorError(f"cannot {action}: {error}", EX_DATAERR) from None
    finally:
        await store.close()
    return status


async def _through_relay(
    reactor: IReactorTime,
    directory: Path,
    action: str,
    queue_ids: list[str],
    stdout: TextIO,
    stderr: TextIO,
    wait: float,
) -> int:
    relay = relay_status(directory).describe(directory)
    path = write_request(directory, QueueRequest(action, tuple(queue_ids), time.time()))
    if wait <= 0:
        stdout.write(
            f"{action} requested from {relay}; it applies it within a second\n"
        )
        return EX_OK
    outcome = await _wait_for_relay(reactor, path, wait)
    if outcome == "withdrawn":
        stderr.write(
            f"txstarttls: {relay} did not take the {action} request within "
            f"{wait:g} s; nothing was changed (is it stuck or too old to take "
            "requests?)\n"
        )
        return EX_TEMPFAIL
    if outcome == "busy":
        stderr.write(
            f"txstarttls: {relay} is still applying the {action} request; check "
            "with mailq\n"
        )
        return EX_TEMPFAIL
    status = EX_OK
    for queue_id in queue_ids:
        if action == "delete" and _in_messages(directory, queue_id):
            stderr.write(
                f"txstarttls: {queue_id}: {relay} could not delete it; see its log\n"
            )
            status = EX_TEMPFAIL
        else:
            stdout.write(f"{queue_id}: {action}d\n")
    return status


# -- flush --------------------------------------------------------------------


def request_flush(directory: Path) -> RelayStatus:
    """Create ``DIR/flush``; a relay retries every deferred message when it sees it.

    Left in place when no relay runs, so the next one flushes once started.
    """
    check_queue(directory)
    status = relay_status(directory)
    path = directory / FLUSH_REQUEST
    try:
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW, 0o600))
    except OSError as error:
        raise _os_error("create", path, error) from None
    return status


# -- passwd -------------------------------------------------------------------


def check_user_name(name: str) -> str:
    """A name the users file can hold on one ``name:hash`` line."""
    if not name:
        raise OperatorError("user name is empty", EX_USAGE)
    if not name.isprintable() or any(c.isspace() for c in name):
        raise OperatorError(
            f"user name {printable(name)!r} contains whitespace or control characters",
            EX_USAGE,
        )
    if ":" in name or name.startswith("#"):
        raise OperatorError(
            f"user name {name!r} must not contain ':' or start with '#'", EX_USAGE
        )
    return name


def _line_user(line: str) -> str | None:
    text = line.strip()
    if not text or text.startswith("#"):
        return None
    return text.partition(":")[0]


@contextlib.contextmanager
def _locked_directory(path: Path) -> Iterator[None]:
    """Serialise editors of one users file (the file itself is replaced)."""
    try:
        fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise OperatorError(
            f"cannot write {path}: directory {path.parent} does not exist",
            EX_CANTCREAT,
        ) from None
    except OSError as error:
        raise _os_error("open directory", path.parent, error) from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _read_users(path: Path) -> list[str] | None:
    """The file's lines after checking it loads; None when it does not exist."""
    if not path.exists():
        return None
    try:
        load_users(path)
    except UsersFileError as error:
        raise OperatorError(f"{error}; fix it first", EX_CONFIG) from None
    return path.read_text(encoding="utf-8").splitlines()


def _write_private(path: Path, text: str) -> None:
    """Replace ``path`` atomically by a 0600 file, keeping the old owner."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        old = path.stat() if path.exists() else None
        fd = os.open(temporary, _CREATE_FLAGS, 0o600)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as file:
                os.fchmod(file.fileno(), 0o600)
                if old is not None and (old.st_uid, old.st_gid) != (
                    os.getuid(),
                    os.getgid(),
                ):
                    # root editing the relay user's file must not take it away
                    with contextlib.suppress(PermissionError):
                        os.fchown(file.fileno(), old.st_uid, old.st_gid)
                file.write(text)
                file.flush()
                os.fsync(file.fileno())
            os.replace(temporary, path)
        finally:
            temporary.unlink(missing_ok=True)
        directory = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)
    except OSError as error:
        raise _os_error("write", path, error) from None


def set_password(path: Path, user: str, password: str) -> bool:
    """Add ``user`` or change its password; True when the user is new."""
    check_user_name(user)
    if not password:
        raise OperatorError("the password is empty; nothing changed", EX_DATAERR)
    path = Path(os.path.realpath(path))
    with _locked_directory(path):
        lines = _read_users(path) or []
        line = f"{user}:{hash_password(password)}"
        added = True
        for index, existing in enumerate(lines):
            if _line_user(existing) == user:
                lines[index] = line
                added = False
        if added:
            lines.append(line)
        _write_private(path, "\n".join(lines) + "\n")
    return added


def delete_user(path: Path, user: str) -> None:
    check_user_name(user)
    path = Path(os.path.realpath(path))
    with _locked_directory(path):
        lines = _read_users(path)
        if lines is None:
            raise OperatorError(f"users file {path} does not exist", EX_NOINPUT)
        kept = [line for line in lines if _line_user(line) != user]
        if len(kept) == len(lines):
            raise OperatorError(f"no user {user!r} in {path}", EX_NOUSER)
        _write_private(path, "".join(line + "\n" for line in kept))


def _read_new_password(
    user: str, from_stdin: bool, stdin: TextIO, ask: Callable[[str], str]
) -> str:
    if from_stdin:
        return stdin.readline().rstrip("\r\n")
    password = ask(f"New password for {user}: ")
    if ask("Retype the password: ") != password:
        raise OperatorError("the passwords do not match; nothing changed", EX_DATAERR)
    return password


# -- the commands -------------------------------------------------------------


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
        password = _read_new_password(user, options.stdin, stdin, ask)
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
