"""Start-up recovery: after a crash, keep what was acknowledged, nothing else.

No log is needed, because the envelope is renamed into ``messages/`` last:
an ``.eml`` without its ``.json`` was never acknowledged and goes, anything
in ``tmp/`` goes, and whatever does not decode exactly is moved to
``corrupt/`` for a human. Then ``incoming/`` is adopted.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Callable

from twisted.logger import Logger

from txstarttls.queue.entry import QueueEntry
from txstarttls.queue.errors import CorruptEntry, StoreError, disk
from txstarttls.queue.files import Layout, fsync_directory
from txstarttls.queue.ids import valid_queue_id
from txstarttls.queue.incoming import Adopt
from txstarttls.queue.interface import RecoveryReport
from txstarttls.queue.writer import BatchWriter

# The spool logs as one component, whichever of its modules speaks.
log = Logger(namespace="txstarttls.queue")


def recover(
    layout: Layout,
    writer: BatchWriter,
    *,
    durable: bool,
    read_entry: Callable[[str], QueueEntry],
) -> RecoveryReport:
    """Make the spool consistent again after a crash, before serving.

    The writer must not run a batch meanwhile; ``read_entry`` is the store's
    own envelope read, so recovery keeps exactly what the store can read.
    """
    with writer.io_lock:
        removed_tmp = clear_tmp(layout, durable=durable)
        kept, unacknowledged, quarantined = check_messages(
            layout, durable=durable, read_entry=read_entry
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
        quarantined=tuple(quarantined),
        adopted=adopted,
    )
    log.info(
        "queue: recovered {directory}: {kept} messages kept, "
        "{temporary} temporary files and {unacknowledged} unacknowledged "
        "messages removed, {quarantined} quarantined, {adopted} adopted",
        directory=str(layout.root),
        kept=len(report.kept),
        temporary=report.temporary_removed,
        unacknowledged=len(report.unacknowledged_removed),
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
    layout: Layout, *, durable: bool, read_entry: Callable[[str], QueueEntry]
) -> tuple[list[str], list[str], list[str]]:
    """Keep complete messages; drop unacknowledged ones; quarantine the rest."""
    with disk("list", layout.messages):
        names = os.listdir(layout.messages)
    found: dict[str, set[str]] = {}
    strangers = []
    for name in names:
        stem, dot, suffix = name.partition(".")
        if dot and suffix in ("eml", "json") and valid_queue_id(stem):
            found.setdefault(stem, set()).add(suffix)
        else:
            strangers.append(name)
    kept: list[str] = []
    unacknowledged: list[str] = []
    quarantined: list[str] = []
    for queue_id in sorted(found):
        suffixes = found[queue_id]
        if suffixes == {"eml"}:
            with disk("remove", layout.content(queue_id)):
                os.unlink(layout.content(queue_id))
            unacknowledged.append(queue_id)
            continue
        reason = (
            _problem(layout, queue_id, read_entry)
            if "eml" in suffixes
            else "no content"
        )
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
    if (unacknowledged or quarantined) and durable:
        for directory in (layout.messages, layout.corrupt):
            with disk("fsync", directory):
                fsync_directory(directory)
    return kept, unacknowledged, quarantined


def _problem(
    layout: Layout, queue_id: str, read_entry: Callable[[str], QueueEntry]
) -> str | None:
    """Why a message with both files cannot be kept, or None."""
    try:
        entry = read_entry(queue_id)
        content = os.lstat(layout.content(queue_id))
    except CorruptEntry as exc:
        return str(exc)
    except StoreError as exc:
        return str(exc)
    if not stat.S_ISREG(content.st_mode):
        return "content is not a regular file"
    if content.st_size != entry.size:
        return f"content has {content.st_size} octets, envelope says {entry.size}"
    return None
