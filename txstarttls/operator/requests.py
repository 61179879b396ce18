"""Request files: how ``delete`` and ``requeue`` reach a running relay.

Only the lock holder writes ``messages/``, so while a relay runs a command
puts a request in ``DIR/requests/`` instead. A request is strict JSON, put
in place whole; one that does not decode exactly is dropped, never guessed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import re
import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from txstarttls.operator.errors import os_error
from txstarttls.operator.files import CREATE_FLAGS, read_small
from txstarttls.queue import CorruptEntry, valid_queue_id

REQUESTS_DIRECTORY: Final = "requests"
ACTIONS: Final = frozenset({"delete", "requeue"})
REQUEST_VERSION: Final = 1
REQUEST_LIFETIME: Final = 3600.0
"""An unapplied request older than this is dropped, never applied late."""
MAX_REQUEST_BYTES: Final = 16 * 1024 * 1024
REQUEST_NAME: Final = re.compile(r"[0-9]{19}\.[0-9]{1,10}\.[0-9a-f]{8}\.json")
"""What :func:`write_request` names a request: time_ns.pid.random.json."""


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
        fd = os.open(temporary, CREATE_FLAGS, 0o600)
        try:
            with os.fdopen(fd, "wb") as file:
                file.write(request.to_json())
                file.flush()
                os.fsync(file.fileno())
            os.rename(temporary, path)
        finally:
            temporary.unlink(missing_ok=True)
    except OSError as error:
        raise os_error("write a request in", folder, error) from None
    return path


def read_request(path: Path) -> QueueRequest:
    try:
        data = read_small(path, MAX_REQUEST_BYTES)
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
    return [folder / name for name in sorted(names) if REQUEST_NAME.fullmatch(name)]


def claimed_name(path: Path) -> Path:
    """The name a request has while the relay applies it."""
    return path.with_name("." + path.name)
