"""The ``Received:`` trace header the relay puts on every accepted message.

Pure code. The HELO name and the recipient come from the client, so every
value is reduced to characters that cannot end the header line, open a
comment or end the clause list early: a HELO of ``x\\r\\nBcc: ...`` or
``x (forged) by bank.example`` must never forge a header or a hop.
"""

from __future__ import annotations

import email.utils
import re
from dataclasses import dataclass

__all__ = ["TLSDetails", "received_header", "transmission_type"]

_MAX_NAME = 255
# RFC 5321 Domain / address literal characters, nothing that starts a
# comment, ends the clause list or folds the line.
_UNSAFE_NAME_CHAR = re.compile(r"[^A-Za-z0-9.\-_:\[\]]")
_UNSAFE_TOKEN_CHAR = re.compile(r"[^A-Za-z0-9.\-_/]")
# Dot-atom addresses only: a quoted local part may hold ";" or "(".
_SAFE_FOR_ADDRESS = re.compile(
    r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~.\-]+@[A-Za-z0-9.\-\[\]:]+"
)


@dataclass(frozen=True, slots=True)
class TLSDetails:
    """What the TLS layer negotiated, as OpenSSL names it."""

    version: str
    cipher: str
    bits: int | None = None


def _safe_name(value: str) -> str:
    cleaned = _UNSAFE_NAME_CHAR.sub("?", value[:_MAX_NAME])
    return cleaned or "unknown"


def _safe_token(value: str) -> str:
    return _UNSAFE_TOKEN_CHAR.sub("?", value[:_MAX_NAME]) or "unknown"


def transmission_type(*, esmtp: bool, tls: bool, authenticated: bool) -> str:
    """The ``with`` keyword of RFC 3848: ESMTP, ESMTPS, ESMTPA or ESMTPSA.

    A HELO session is plain ``SMTP``: RFC 3848 registers its S and A
    variants for ESMTP only.
    """
    if not esmtp:
        return "SMTP"
    return "ESMTP" + ("S" if tls else "") + ("A" if authenticated else "")


def _client_literal(client_address: str | None) -> str:
    if client_address is None:
        return "(unix socket)"
    text = client_address.partition("%")[0]
    if ":" in text:
        return f"([IPv6:{_safe_name(text)}])"
    return f"([{_safe_name(text)}])"


def received_header(
    *,
    helo: str,
    client_address: str | None,
    hostname: str,
    protocol: str,
    queue_id: str,
    timestamp: float,
    recipients: tuple[str, ...] = (),
    tls: TLSDetails | None = None,
) -> bytes:
    """The complete header, folded, ending in CRLF (RFC 5321 section 4.4).

    ``for <rcpt>`` appears only for a single recipient, like Postfix, so a
    copy never discloses the other (possibly Bcc) recipients.
    """
    lines = [f"Received: from {_safe_name(helo)} {_client_literal(client_address)}"]
    by = f"\tby {_safe_name(hostname)} (txstarttls) with {_safe_token(protocol)}"
    if tls is not None:
        bits = f" ({tls.bits} bits)" if tls.bits else ""
        by += (
            f" (using {_safe_token(tls.version)} with cipher "
            f"{_safe_token(tls.cipher)}{bits})"
        )
    lines.append(by)
    last = f"\tid {_safe_token(queue_id)}"
    if (
        len(recipients) == 1
        and len(recipients[0]) <= _MAX_NAME
        and _SAFE_FOR_ADDRESS.fullmatch(recipients[0])
    ):
        last += f"\n\tfor <{recipients[0]}>"
    date = email.utils.formatdate(timestamp, localtime=True)
    lines.extend(f"{last}; {date}".split("\n"))
    return "\r\n".join(lines).encode("ascii") + b"\r\n"
