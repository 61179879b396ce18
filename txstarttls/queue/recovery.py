"""Start-up recovery: after a crash, keep what was acknowledged, nothing else.

No log is needed, because every commit point is one rename or unlink:
anything in ``tmp/`` goes (never acknowledged); an ``ID.msg`` is a message;
an ``ID.json`` alone is what a removal leaves when cut short after unlinking
``ID.msg``, and goes. In the older two-file layout, an ``ID.eml`` without
its ``ID.json`` was never acknowledged and goes. Whatever does not decode
exactly is moved to ``corrupt/`` for a human. Then ``incoming/`` is adopted.
"""

from __future__ import annotations

import os
import stat

from twisted.logger import Logger

from txstarttls.queue.errors import CorruptEntry, disk
from txstarttls.queue.files import Layout, fsync_directory, read_small_file
from txstarttls.queue.ids import valid_queue_id
from txstarttls.queue.incoming import Adopt
from txstarttls.queue.interface import RecoveryReport
from txstarttls.queue.messagefile import check_message, decode
from txstarttls.queue.writer import BatchWriter

# The spool logs as one component, whichever of its modules speaks.
log = Logger(namespace="txstarttls.queue")


def recover(layout: Layout, writer: BatchWriter, *, durable: bool) -> RecoveryReport:
    """Make the spool consistent again after a crash, before serving.

    The writer must not run a batch meanwhile.
    """
    with writer.io_lock:
        removed_tmp = clear_tmp(layout, durable=durable)
        kept, unacknowledged, leftovers, quarantined = check_messages(
            layout, durable=durable
        )
    adopt = Adopt(layout)
    writer.run_blocking(adopt)
    if adopt.error is not None:
        log.error("queue: adopting incoming/ failed: {error}", error=str(adopt.error))
    adopted = tuple(adopt.result) if isinstance(adopt.result, list) else ()
    report = RecoveryReport(
        kept=tuple(kept),
        temporary_removed=removed_tmp,
        unacknowledged_removed=tuple(unacknowledged),
        removal_leftovers=tuple(leftovers),
        quarantined=tuple(quarantined),
        adopted=adopted,
    )
    log.info(
        "queue: recovered {directory}: {kept} messages kept, "
        "{temporary} temporary files, {unacknowledged} unacknowledged "
        "messages and {leftovers} envelopes of removed ones removed, "
        "{quarantined} quarantined, {adopted} adopted",
        directory=str(layout.root),
        kept=len(report.kept),
        temporary=report.temporary_removed,
        unacknowledged=len(report.unacknowledged_removed),
        leftovers=len(report.removal_leftovers),
        quarantined=len(report.quarantined),
        adopted=len(report.adopted),
        report=report,
    )
    return report


def clear_tmp(layout: Layout, *, durable: bool) -> int:
    """Remove what a crash left in ``tmp/``: nothing there was acknowledged."""
    removed = 0
    with disk("list", layout.tmp):
        names = os.listdir(layout.tmp)
    for name in names:
        path = f"{layout.tmp}/{name}"
        if os.path.isdir(path) and not os.path.islink(path):
            log.warn("queue: leaving unexpected directory {path}", path=path)
            continue
        with disk("remove", path):
            os.unlink(path)
        removed += 1
    if removed and durable:
        with disk("fsync", layout.tmp):
            fsync_directory(layout.tmp)
    return removed


def check_messages(
    layout: Layout, *, durable: bool
) -> tuple[list[str], list[str], list[str], list[str]]:
    """Keep complete messages; drop unacknowledged ones and leftovers of
    removals; quarantine the rest."""
    with disk("list", layout.messages):
        names = os.listdir(layout.messages)
    found: dict[str, set[str]] = {}
    strangers = []
    for name in names:
        stem, dot, suffix = name.partition(".")
        if dot and suffix in ("msg", "eml", "json") and valid_queue_id(stem):
            found.setdefault(stem, set()).add(suffix)
        else:
            strangers.append(name)
    kept: list[str] = []
    unacknowledged: list[str] = []
    leftovers: list[str] = []
    quarantined: list[str] = []
    for queue_id in sorted(found):
        suffixes = found[queue_id]
        if "msg" in suffixes and "eml" in suffixes:
            # No writer makes both; the message file is the one acknowledged.
            strangers.append(f"{queue_id}.eml")
            suffixes.discard("eml")
        if suffixes == {"eml"}:
            _remove(layout.content(queue_id))
            unacknowledged.append(queue_id)
            continue
        if suffixes == {"json"}:
            # ID.msg is unlinked first and durably: a removal was cut short.
            log.info(
                "queue: removing the envelope {queue_id}.json an interrupted "
                "removal left",
                queue_id=queue_id,
            )
            _remove(layout.envelope(queue_id))
            leftovers.append(queue_id)
            continue
        if "msg" in suffixes:
            reason = check_message(layout, queue_id, updated="json" in suffixes)
        else:
            reason = _problem(layout, queue_id)
        if reason is None:
            kept.append(queue_id)
            continue
        log.error(
            "queue: message {queue_id} is corrupt ({reason}); moving it to corrupt/",
            queue_id=queue_id,
            reason=reason,
        )
        for suffix in sorted(suffixes):
            path = f"{layout.messages}/{queue_id}.{suffix}"
            with disk("quarantine", path):
                layout.quarantine(path)
        quarantined.append(queue_id)
    for name in sorted(strangers):
        path = f"{layout.messages}/{name}"
        log.warn("queue: moving unexpected file {path} to corrupt/", path=path)
        with disk("quarantine", path):
            layout.quarantine(path)
        quarantined.append(name)
    if (unacknowledged or leftovers or quarantined) and durable:
        for directory in (layout.messages, layout.corrupt):
            with disk("fsync", directory):
                fsync_directory(directory)
    return kept, unacknowledged, leftovers, quarantined


def _remove(path: str) -> None:
    with disk("remove", path):
        os.unlink(path)


def _problem(layout: Layout, queue_id: str) -> str | None:
    """Why a message of the two-file layout cannot be kept, or None."""
    envelope = layout.envelope(queue_id)
    try:
        entry = decode(read_small_file(envelope), envelope, queue_id)
        content = os.lstat(layout.content(queue_id))
    except CorruptEntry as exc:
        return str(exc)
    except OSError as exc:
        return f"cannot read it: {exc.strerror or exc}"
    if not stat.S_ISREG(content.st_mode):
        return "content is not a regular file"
    if content.st_size != entry.size:
        return f"content has {content.st_size} octets, envelope says {entry.size}"
    return None
