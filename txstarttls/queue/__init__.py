"""The relay's durable spool: a message is acknowledged only once it is on disk.

One message is one file in ``messages/``, ``ID.msg``: a header line, the
envelope (strict JSON, never pickle) and the content, fsynced and renamed in
whole, so its presence is the commit point and recovery after a crash needs
no log. An update writes ``ID.json`` beside it, which overrides the embedded
envelope. Queues written before this layout hold ``ID.eml`` and ``ID.json``
per message; the store and its readers still take them.

Every write goes through one writer thread that takes all pending operations
as a batch (group commit), and the reactor thread never waits on the disk.
Other processes (``txstarttls sendmail``) drop complete messages into
``incoming/`` with :func:`deliver_to_incoming`, without the store's lock; the
store adopts them into ``messages/``.

The modules, from the bottom up:

``errors``      how the spool fails (StoreError and friends)
``ids``         queue ids
``entry``       QueueEntry and RecipientState, and their JSON encoding
``interface``   IMessageStore, what any store promises
``files``       the directory layout and careful file calls
``messagefile`` the one-file message format, and reading either layout
``operations``  add, update and remove, as phases of a batch
``incoming``    the ``incoming/`` drop and its adoption
``segments``    segment files of appended records (groundwork, not used yet)
``writer``      the writer thread and its group commit
``recovery``    start-up recovery after a crash
``filesystem``  FilesystemStore, which ties them together
"""

from txstarttls.queue.entry import (
    STATUSES,
    QueueEntry,
    RecipientChanges,
    RecipientState,
)
from txstarttls.queue.errors import (
    CorruptEntry,
    InvalidQueueId,
    MessageNotFound,
    StoreError,
    StoreLocked,
)
from txstarttls.queue.filesystem import FilesystemStore
from txstarttls.queue.ids import new_queue_id, valid_queue_id
from txstarttls.queue.incoming import deliver_to_incoming
from txstarttls.queue.interface import IMessageStore, RecoveryReport
from txstarttls.queue.messagefile import open_queued_content, read_queued_entry
from txstarttls.queue.writer import BATCH_MAX_BYTES, BATCH_MAX_OPERATIONS

__all__ = [
    "BATCH_MAX_BYTES",
    "BATCH_MAX_OPERATIONS",
    "STATUSES",
    "CorruptEntry",
    "FilesystemStore",
    "IMessageStore",
    "InvalidQueueId",
    "MessageNotFound",
    "QueueEntry",
    "RecipientChanges",
    "RecipientState",
    "RecoveryReport",
    "StoreError",
    "StoreLocked",
    "deliver_to_incoming",
    "new_queue_id",
    "open_queued_content",
    "read_queued_entry",
    "valid_queue_id",
]
