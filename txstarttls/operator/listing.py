"""Reading the queue, without its lock: what ``mailq`` and ``show`` see.

Message files and envelopes are renamed into place whole, so a reader sees
each one complete or not at all. ``messages/`` holds ``ID.msg`` files (with
``ID.json`` beside once updated), or ``ID.eml`` and ``ID.json`` for messages
an older relay queued; ``incoming/`` holds ``ID.eml`` and ``ID.json``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from txstarttls.operator.errors import (
    EX_DATAERR,
    EX_UNAVAILABLE,
    EX_USAGE,
    OperatorError,
    os_error,
)
from txstarttls.operator.files import READ_FLAGS, read_small
from txstarttls.queue import (
    CorruptEntry,
    MessageNotFound,
    QueueEntry,
    open_queued_content,
    read_queued_entry,
    valid_queue_id,
)
from txstarttls.terminal import printable

MAX_ENVELOPE_BYTES: Final = 16 * 1024 * 1024


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


def _read_entry(path: Path, queue_id: str) -> QueueEntry:
    entry = QueueEntry.from_json(read_small(path, MAX_ENVELOPE_BYTES))
    if entry.queue_id != queue_id:
        raise CorruptEntry(f"envelope {path} names message {entry.queue_id}")
    return entry


def _listing(directory: Path) -> list[str]:
    try:
        return os.listdir(directory)
    except FileNotFoundError:
        return []
    except OSError as error:
        raise os_error("list", directory, error) from None


def _message_ids(location: str, names: list[str]) -> list[str]:
    """The ids of the complete messages among ``names`` in ``location``."""
    suffixes = (".msg", ".json") if location == "messages" else (".json",)
    ids = {name.rsplit(".", 1)[0] for name in names if name.endswith(suffixes)}
    return sorted(queue_id for queue_id in ids if valid_queue_id(queue_id))


def _read(directory: Path, location: str, queue_id: str) -> QueueEntry:
    """The message's envelope; FileNotFoundError once it is gone."""
    if location == "messages":
        try:
            return read_queued_entry(directory, queue_id)
        except MessageNotFound:
            raise FileNotFoundError(queue_id) from None
    return _read_entry(directory / location / f"{queue_id}.json", queue_id)


def list_queue(directory: Path) -> tuple[list[QueuedMessage], list[str]]:
    """Every complete message, oldest first, and one line per unreadable one.

    A message that leaves while we look (delivered, adopted) is skipped or
    seen once: ``messages/`` wins over ``incoming/``.
    """
    found: dict[str, QueuedMessage] = {}
    problems: list[str] = []
    for location in ("incoming", "messages"):
        folder = directory / location
        for queue_id in _message_ids(location, _listing(folder)):
            try:
                entry = _read(directory, location, queue_id)
            except FileNotFoundError:
                continue
            except CorruptEntry as error:
                problems.append(
                    f"message {queue_id} in {location}/ is corrupt: {error}"
                )
                continue
            except OSError as error:
                raise os_error("read", _where(error, folder), error) from None
            found[queue_id] = QueuedMessage(entry, location)
    return [found[key] for key in sorted(found)], problems


def _where(error: OSError, folder: Path) -> Path:
    return Path(error.filename) if error.filename else folder


def find_message(directory: Path, queue_id: str) -> QueuedMessage:
    """The message ``queue_id``; a malformed id is 64, an unknown one 69."""
    if not valid_queue_id(queue_id):
        raise OperatorError(
            f"invalid queue id {printable(queue_id)!r}: expected 18 upper-case hex "
            "digits, as mailq shows them",
            EX_USAGE,
        )
    for location in ("messages", "incoming"):
        try:
            return QueuedMessage(_read(directory, location, queue_id), location)
        except FileNotFoundError:
            continue
        except CorruptEntry as error:
            raise OperatorError(
                f"message {queue_id} is corrupt: {error}", EX_DATAERR
            ) from None
        except OSError as error:
            raise os_error("read", _where(error, directory / location), error) from None
    raise OperatorError(
        f"no message {queue_id} in the queue {directory}", EX_UNAVAILABLE
    )


def read_content(directory: Path, message: QueuedMessage) -> bytes:
    path = directory / message.location / f"{message.queue_id}.eml"
    try:
        if message.location == "messages":
            with open_queued_content(directory, message.queue_id) as file:
                return file.read()
        with open(os.open(path, READ_FLAGS), "rb") as file:
            return file.read()
    except (FileNotFoundError, MessageNotFound):
        raise OperatorError(
            f"message {message.queue_id} left the queue meanwhile", EX_UNAVAILABLE
        ) from None
    except CorruptEntry as error:
        raise OperatorError(
            f"message {message.queue_id} is corrupt: {error}", EX_DATAERR
        ) from None
    except OSError as error:
        raise os_error("read", _where(error, path), error) from None
