"""Delivery status notifications: what a sender asks for, and what we send.

``DSNRequest`` carries the RFC 3461 parameters (RET, ENVID, NOTIFY, ORCPT)
from the submitting client to the next hop. ``build_report`` is RFC 3464:
pure code that turns what the queue knows about a message into the bytes of
a ``multipart/report`` addressed to the envelope sender. Every value that came
from a peer is already sanitised by the reply parser; this module still keeps
header values on one line, since a DSN header is a place where a hostile
server's text could otherwise forge new headers.
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import format_datetime, formatdate

from txstarttls.errors import InvalidArgument

_HEADER_END = re.compile(rb"\r?\n\r?\n")
_NOTIFY_WORDS = frozenset({"SUCCESS", "FAILURE", "DELAY"})
_UNSAFE = re.compile(r"[\x00-\x1f\x7f]")
MAX_HEADER_OCTETS = 64 * 1024


def xtext(value: str) -> str:
    """RFC 3461 4: "+", "=" and octets outside 33-126 as +HH."""
    return "".join(
        f"+{octet:02X}"
        if octet < 33 or octet > 126 or octet in (43, 61)
        else chr(octet)
        for octet in value.encode("utf-8")
    )


_XTEXT_HEX = re.compile(r"\+([0-9A-F]{2})")


def xtext_decode(value: str) -> str:
    """Undo :func:`xtext` (as received in ENVID= or ORCPT=)."""
    raw = _XTEXT_HEX.sub(lambda m: chr(int(m.group(1), 16)), value)
    return raw.encode("latin-1").decode("utf-8", errors="replace")


def parse_orcpt(value: str) -> str | None:
    """The address in an ORCPT value ``rfc822;xtext``; None for other types."""
    kind, separator, encoded = value.partition(";")
    if not separator or kind.strip().lower() != "rfc822":
        return None
    return xtext_decode(encoded)


@dataclass(frozen=True, slots=True)
class DSNRequest:
    """RFC 3461 parameters, passed on when the next hop offers DSN."""

    ret: str | None = None
    """``FULL`` or ``HDRS``: how much of the message a bounce returns."""
    envid: str | None = None
    notify: tuple[tuple[str, str], ...] = ()
    """(recipient, ``NEVER`` or a comma list of SUCCESS, FAILURE, DELAY)."""
    orcpt: tuple[tuple[str, str], ...] = ()
    """(recipient, original recipient address)."""

    def __post_init__(self) -> None:
        if self.ret is not None and self.ret.upper() not in ("FULL", "HDRS"):
            raise InvalidArgument(f"DSN RET must be FULL or HDRS, not {self.ret!r}")
        for _, value in self.notify:
            words = {word.strip().upper() for word in value.split(",")}
            if words != {"NEVER"} and not words <= _NOTIFY_WORDS:
                raise InvalidArgument(
                    "DSN NOTIFY must be NEVER or a list of SUCCESS, FAILURE, DELAY,"
                    f" not {value!r}"
                )

    def mail_parameters(self) -> list[str]:
        parameters = []
        if self.ret is not None:
            parameters.append(f"RET={self.ret.upper()}")
        if self.envid is not None:
            parameters.append(f"ENVID={xtext(self.envid)}")
        return parameters

    def rcpt_parameters(self, recipient: str) -> list[str]:
        parameters = [
            f"NOTIFY={value.upper().replace(' ', '')}"
            for address, value in self.notify
            if address == recipient
        ]
        parameters += [
            f"ORCPT=rfc822;{xtext(original)}"
            for address, original in self.orcpt
            if address == recipient
        ]
        return parameters


@dataclass(frozen=True, slots=True)
class RecipientReport:
    """One recipient's line in the report."""

    address: str
    action: str
    """``failed`` for a bounce, ``delayed`` for a warning (RFC 3464 2.3.3)."""
    status: str
    """The enhanced status code, e.g. ``5.1.1``."""
    diagnostic: str | None = None
    """The remote server's reply, e.g. ``550 5.1.1 No such user``."""
    remote_mta: str | None = None
    orcpt: str | None = None


@dataclass(frozen=True, slots=True)
class ReportedMessage:
    """What the report says about the original message."""

    queue_id: str
    sender: str
    arrival_time: float
    headers: bytes
    """The original header section, for the text/rfc822-headers part."""


def original_headers(content: bytes) -> bytes:
    """The header section of a message, bounded in size."""
    match = _HEADER_END.search(content, 0, MAX_HEADER_OCTETS)
    headers = content[: match.start()] if match else content[:MAX_HEADER_OCTETS]
    return headers.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n") + b"\r\n"


def _one_line(value: str) -> str:
    return _UNSAFE.sub(" ", value).strip()


def _when(timestamp: float) -> str:
    return format_datetime(datetime.fromtimestamp(timestamp, UTC))


def build_report(
    message: ReportedMessage,
    recipients: Sequence[RecipientReport],
    *,
    reporting_mta: str,
    postmaster: str,
    now: float,
    delayed_until: float | None = None,
) -> bytes:
    """The complete DSN message (headers and body, CRLF line ends).

    With ``delayed_until`` it is a delay warning that says when the relay
    will give up; otherwise a failure report.
    """
    if not recipients:
        raise ValueError("a delivery report needs at least one recipient")
    warning = delayed_until is not None
    boundary = f"txstarttls-{secrets.token_hex(12)}"
    mta = _one_line(reporting_mta)
    subject = (
        "Delayed Mail (still being retried)"
        if warning
        else "Undelivered Mail Returned to Sender"
    )
    lines = [
        f"From: Mail Delivery System <{_one_line(postmaster)}>",
        f"To: <{_one_line(message.sender)}>",
        f"Subject: {subject}",
        f"Date: {formatdate(now, usegmt=True)}",
        f"Message-ID: <{message.queue_id}.{secrets.token_hex(6)}@{mta}>",
        "Auto-Submitted: auto-replied",
        "MIME-Version: 1.0",
        "Content-Type: multipart/report; report-type=delivery-status;",
        f'\tboundary="{boundary}"',
        "",
        "This is a MIME-encapsulated delivery status notification.",
        "",
        f"--{boundary}",
        "Content-Description: Notification",
        "Content-Type: text/plain; charset=utf-8",
        "",
        *_explanation(message, recipients, mta, delayed_until),
        "",
        f"--{boundary}",
        "Content-Description: Delivery report",
        "Content-Type: message/delivery-status",
        "",
        f"Reporting-MTA: dns; {mta}",
        f"X-Txstarttls-Queue-ID: {message.queue_id}",
        f"Arrival-Date: {_when(message.arrival_time)}",
    ]
    for recipient in recipients:
        lines.extend(_recipient_fields(recipient, delayed_until))
    lines += [
        "",
        f"--{boundary}",
        "Content-Description: Undelivered Message Headers",
        "Content-Type: text/rfc822-headers",
        "",
    ]
    text = "\r\n".join(lines).encode("utf-8") + b"\r\n"
    return text + message.headers + f"\r\n--{boundary}--\r\n".encode()


def _explanation(
    message: ReportedMessage,
    recipients: Sequence[RecipientReport],
    mta: str,
    delayed_until: float | None,
) -> list[str]:
    if delayed_until is not None:
        intro = [
            f"This is the mail system at host {mta}.",
            "",
            "Your message could not be delivered yet. It is still in the",
            f"queue and will be retried until {_when(delayed_until)}.",
            "You do not need to resend it.",
        ]
    else:
        intro = [
            f"This is the mail system at host {mta}.",
            "",
            "I'm sorry to have to inform you that your message could not",
            "be delivered to one or more recipients.",
        ]
    details = [
        f"<{_one_line(r.address)}>: {_one_line(r.diagnostic or r.status)}"
        for r in recipients
    ]
    return [*intro, "", *details]


def _recipient_fields(
    recipient: RecipientReport, delayed_until: float | None
) -> list[str]:
    fields = [""]
    if recipient.orcpt:
        fields.append(f"Original-Recipient: {_one_line(recipient.orcpt)}")
    fields += [
        f"Final-Recipient: rfc822; {_one_line(recipient.address)}",
        f"Action: {recipient.action}",
        f"Status: {recipient.status}",
    ]
    if recipient.remote_mta:
        fields.append(f"Remote-MTA: dns; {_one_line(recipient.remote_mta)}")
    if recipient.diagnostic:
        fields.append(f"Diagnostic-Code: smtp; {_one_line(recipient.diagnostic)}")
    if delayed_until is not None:
        fields.append(f"Will-Retry-Until: {_when(delayed_until)}")
    return fields
