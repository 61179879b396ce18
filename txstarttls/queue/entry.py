"""The envelope of a queued message, and its one on-disk encoding.

Strict JSON, never pickle: :meth:`QueueEntry.from_json` accepts exactly what
:meth:`QueueEntry.to_json` writes, and anything else is a
:class:`CorruptEntry` to quarantine, never a guess.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
from dataclasses import dataclass
from typing import Any, Final, TypedDict, Unpack

from txstarttls.queue.errors import CorruptEntry, brief
from txstarttls.queue.ids import checked_id

STATUSES: Final = frozenset({"pending", "delivered", "bounced", "expired"})
"""Recipient states; everything but ``pending`` is final."""

FORMAT_VERSION: Final = 1


class RecipientChanges(TypedDict, total=False):
    """Fields :meth:`QueueEntry.with_recipient` may change."""

    status: str
    notify: str | None
    orcpt: str | None
    last_reply: str | None
    dsn: str | None
    attempts: int


@dataclass(frozen=True, slots=True)
class RecipientState:
    """One recipient and how far its delivery got."""

    address: str
    status: str = "pending"
    notify: str | None = None
    orcpt: str | None = None
    last_reply: str | None = None
    dsn: str | None = None
    attempts: int = 0

    def __post_init__(self) -> None:
        if self.status not in STATUSES:
            raise ValueError(
                f"recipient status must be one of {sorted(STATUSES)}, "
                f"not {brief(self.status)}"
            )
        if self.attempts < 0:
            raise ValueError(f"recipient attempts must be >= 0, not {self.attempts}")


@dataclass(frozen=True, slots=True)
class QueueEntry:
    """The envelope of one queued message: everything but the content."""

    queue_id: str
    sender: str
    recipients: tuple[RecipientState, ...]
    arrival_time: float
    size: int
    mail_parameters: tuple[str, ...] = ()
    client_address: str | None = None
    client_helo: str | None = None
    authenticated_as: str | None = None
    attempts: int = 0
    next_attempt: float = 0.0
    last_error: str | None = None
    is_bounce: bool = False
    delay_warned: bool = False

    def __post_init__(self) -> None:
        checked_id(self.queue_id)
        if not self.recipients:
            raise ValueError("a queue entry needs at least one recipient")
        for name in ("arrival_time", "next_attempt"):
            value = getattr(self, name)
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"{name} must be a finite time >= 0, not {value}")
        for name in ("size", "attempts"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, not {getattr(self, name)}")

    @property
    def pending_recipients(self) -> tuple[RecipientState, ...]:
        return tuple(r for r in self.recipients if r.status == "pending")

    @property
    def is_finished(self) -> bool:
        """No recipient is pending: the message can leave the queue."""
        return not any(r.status == "pending" for r in self.recipients)

    def with_recipient(
        self, address: str, **changes: Unpack[RecipientChanges]
    ) -> QueueEntry:
        """A copy with ``changes`` applied to the recipient(s) ``address``."""
        found = False
        recipients = []
        for recipient in self.recipients:
            if recipient.address == address:
                recipient = dataclasses.replace(recipient, **changes)
                found = True
            recipients.append(recipient)
        if not found:
            raise KeyError(f"no recipient {address!r} in message {self.queue_id}")
        return dataclasses.replace(self, recipients=tuple(recipients))

    def to_json(self) -> bytes:
        # A shallow walk, not dataclasses.asdict: every field is a plain
        # value but the recipients, and asdict's deep copies cost more than
        # the JSON encoding itself on the listener's hot path.
        document: dict[str, object] = {
            name: getattr(self, name) for name in _field_names(QueueEntry)
        }
        names = _field_names(RecipientState)
        document["recipients"] = [
            {name: getattr(recipient, name) for name in names}
            for recipient in self.recipients
        ]
        document["version"] = FORMAT_VERSION
        text = json.dumps(
            document,
            ensure_ascii=True,
            allow_nan=False,
            sort_keys=True,
            separators=(",", ":"),
        )
        return text.encode("ascii") + b"\n"

    @classmethod
    def from_json(cls, data: bytes) -> QueueEntry:
        """Decode exactly what :meth:`to_json` writes; anything else is corrupt."""
        try:
            document = json.loads(
                data.decode("utf-8"),
                object_pairs_hook=_unique_keys,
                parse_constant=_reject_constant,
            )
        except CorruptEntry:
            raise
        except (ValueError, RecursionError) as exc:
            reason = " ".join(str(exc).split())
            raise CorruptEntry(f"envelope is not valid JSON: {reason}") from None
        return _decode_entry(document)


@functools.cache
def _field_names(cls: type) -> tuple[str, ...]:
    return tuple(field.name for field in dataclasses.fields(cls))


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    document = dict(pairs)
    if len(document) != len(pairs):
        raise CorruptEntry("envelope repeats a key")
    return document


def _reject_constant(name: str) -> None:
    raise CorruptEntry(f"envelope contains {name}, which is not JSON")


def _object(value: object, where: str) -> dict[str, object]:
    if not isinstance(value, dict):
        raise CorruptEntry(f"{where} must be a JSON object, not {_kind(value)}")
    return value


def _kind(value: object) -> str:
    return "null" if value is None else type(value).__name__


def _check_keys(document: dict[str, object], cls: type, where: str) -> None:
    expected = set(_field_names(cls))
    unknown = sorted(document.keys() - expected)
    if unknown:
        raise CorruptEntry(f"unknown key {brief(unknown[0])} in {where}")
    missing = sorted(expected - document.keys())
    if missing:
        raise CorruptEntry(f"missing key {missing[0]!r} in {where}")


def _string(document: dict[str, object], key: str, where: str) -> str:
    value = document[key]
    if not isinstance(value, str):
        raise CorruptEntry(f"{where}.{key} must be a string, not {_kind(value)}")
    return value


def _optional_string(document: dict[str, object], key: str, where: str) -> str | None:
    return None if document[key] is None else _string(document, key, where)


def _integer(document: dict[str, object], key: str, where: str) -> int:
    value = document[key]
    if not isinstance(value, int) or isinstance(value, bool):
        raise CorruptEntry(f"{where}.{key} must be an integer, not {_kind(value)}")
    return value


def _number(document: dict[str, object], key: str, where: str) -> float:
    value = document[key]
    if not isinstance(value, int | float) or isinstance(value, bool):
        raise CorruptEntry(f"{where}.{key} must be a number, not {_kind(value)}")
    return float(value)


def _boolean(document: dict[str, object], key: str, where: str) -> bool:
    value = document[key]
    if not isinstance(value, bool):
        raise CorruptEntry(f"{where}.{key} must be true or false, not {_kind(value)}")
    return value


def _list(document: dict[str, object], key: str, where: str) -> list[object]:
    value = document[key]
    if not isinstance(value, list):
        raise CorruptEntry(f"{where}.{key} must be a list, not {_kind(value)}")
    return value


def _decode_recipient(value: object, where: str) -> RecipientState:
    document = _object(value, where)
    _check_keys(document, RecipientState, where)
    return RecipientState(
        address=_string(document, "address", where),
        status=_string(document, "status", where),
        notify=_optional_string(document, "notify", where),
        orcpt=_optional_string(document, "orcpt", where),
        last_reply=_optional_string(document, "last_reply", where),
        dsn=_optional_string(document, "dsn", where),
        attempts=_integer(document, "attempts", where),
    )


def _decode_entry(value: object) -> QueueEntry:
    where = "envelope"
    document = dict(_object(value, where))
    version = document.pop("version", None)
    if version != FORMAT_VERSION or isinstance(version, bool):
        raise CorruptEntry(f"unsupported envelope version {brief(version)}")
    _check_keys(document, QueueEntry, where)
    parameters = _list(document, "mail_parameters", where)
    for parameter in parameters:
        if not isinstance(parameter, str):
            raise CorruptEntry(f"{where}.mail_parameters must hold strings only")
    try:
        return QueueEntry(
            queue_id=_string(document, "queue_id", where),
            sender=_string(document, "sender", where),
            recipients=tuple(
                _decode_recipient(item, f"{where}.recipients[{index}]")
                for index, item in enumerate(_list(document, "recipients", where))
            ),
            arrival_time=_number(document, "arrival_time", where),
            size=_integer(document, "size", where),
            mail_parameters=tuple(str(p) for p in parameters),
            client_address=_optional_string(document, "client_address", where),
            client_helo=_optional_string(document, "client_helo", where),
            authenticated_as=_optional_string(document, "authenticated_as", where),
            attempts=_integer(document, "attempts", where),
            next_attempt=_number(document, "next_attempt", where),
            last_error=_optional_string(document, "last_error", where),
            is_bounce=_boolean(document, "is_bounce", where),
            delay_warned=_boolean(document, "delay_warned", where),
        )
    except CorruptEntry:
        raise
    except ValueError as exc:
        raise CorruptEntry(f"{where} is invalid: {exc}") from None


def check_size(entry: QueueEntry, content: bytes) -> None:
    """Refuse content whose length is not the size the envelope records."""
    if entry.size != len(content):
        raise ValueError(
            f"entry {entry.queue_id} says {entry.size} octets "
            f"but the content has {len(content)}"
        )
