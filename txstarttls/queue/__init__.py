"""The relay's durable spool: a message is acknowledged only once it is on disk.

One message is two files in ``messages/``: ``ID.eml`` (the content) and
``ID.json`` (the envelope: strict JSON, never pickle). The envelope is renamed
in last, so its presence is the commit point and recovery after a crash
needs no log: an ``.eml`` without its ``.json`` was never acknowledged.

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
``operations``  add, update and remove, as phases of a batch
``incoming``    the ``incoming/`` drop and its adoption
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
    "valid_queue_id",
]
