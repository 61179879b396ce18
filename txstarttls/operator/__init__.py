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

The modules, from the bottom up:

``errors``      OperatorError, the exit statuses, OSError in one line
``files``       careful reads and creates shared by the others
``directory``   which queue directory, and whether a relay holds its lock
``listing``     reading the queue without its lock
``formatting``  what mailq and show print
``requests``    the request files a running relay applies
``apply``       applying them, in the relay
``changes``     delete, requeue and flush, directly or through the relay
``users``       passwd: editing the users file
``commands``    the commands from parsed options
"""

from txstarttls.operator.apply import RequestRunner, apply_requests
from txstarttls.operator.changes import (
    DEFAULT_WAIT,
    FLUSH_REQUEST,
    change_queue,
    request_flush,
)
from txstarttls.operator.changes import POLL_INTERVAL as POLL_INTERVAL
from txstarttls.operator.commands import (
    REACTOR_COMMANDS,
    SYNCHRONOUS_COMMANDS,
    flush_command,
    mailq_command,
    run_change_command,
    run_command,
)
from txstarttls.operator.directory import (
    QUEUE_ENVIRONMENT,
    RelayStatus,
    check_queue,
    relay_status,
    resolve_queue,
)
from txstarttls.operator.errors import EX_CANTCREAT as EX_CANTCREAT
from txstarttls.operator.errors import EX_CONFIG as EX_CONFIG
from txstarttls.operator.errors import EX_DATAERR as EX_DATAERR
from txstarttls.operator.errors import EX_NOINPUT as EX_NOINPUT
from txstarttls.operator.errors import EX_NOPERM as EX_NOPERM
from txstarttls.operator.errors import EX_NOUSER as EX_NOUSER
from txstarttls.operator.errors import EX_OK as EX_OK
from txstarttls.operator.errors import EX_TEMPFAIL as EX_TEMPFAIL
from txstarttls.operator.errors import EX_UNAVAILABLE as EX_UNAVAILABLE
from txstarttls.operator.errors import EX_USAGE as EX_USAGE
from txstarttls.operator.errors import OperatorError
from txstarttls.operator.formatting import format_mailq, format_message, mailq_json
from txstarttls.operator.listing import MAX_ENVELOPE_BYTES as MAX_ENVELOPE_BYTES
from txstarttls.operator.listing import (
    QueuedMessage,
    find_message,
    list_queue,
    read_content,
)
from txstarttls.operator.requests import (
    ACTIONS,
    REQUESTS_DIRECTORY,
    QueueRequest,
    RequestError,
    pending_requests,
    read_request,
    write_request,
)
from txstarttls.operator.requests import MAX_REQUEST_BYTES as MAX_REQUEST_BYTES
from txstarttls.operator.requests import REQUEST_LIFETIME as REQUEST_LIFETIME
from txstarttls.operator.requests import REQUEST_VERSION as REQUEST_VERSION
from txstarttls.operator.users import check_user_name, delete_user, set_password
from txstarttls.terminal import printable

# The "X as X" imports above are not public, yet importable here as before
# the split: the sendmail command and the tests use them.
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
