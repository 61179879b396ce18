"""What ``mailq``, ``mailq --json`` and ``show`` print."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Sequence

from txstarttls.operator.listing import QueuedMessage
from txstarttls.terminal import printable


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
