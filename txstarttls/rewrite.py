"""Sender rewriting: smarthosts often refuse ``root@localhost``.

Pure functions on an envelope sender and a message's header section; the
body is never touched, and nothing outside the first ``From:`` field changes.
"""

from __future__ import annotations

import re
from email.utils import formataddr, getaddresses

_HEADER_END = re.compile(rb"\r\n\r\n|\n\n")
_FROM_FIELD = re.compile(
    rb"^From:[^\r\n]*(?:\r?\n[ \t][^\r\n]*)*", re.IGNORECASE | re.M
)


def rewrite_sender(sender: str, replacement: str | None) -> str:
    """The envelope sender to use; the null sender (bounces) stays null."""
    if replacement is None or sender == "":
        return sender
    return replacement


def rewrite_from_header(content: bytes, address: str) -> bytes:
    """Replace the address of the first ``From:`` field, keeping its display name.

    A message without a From: field is returned unchanged.
    """
    end = _HEADER_END.search(content)
    header_end = end.start() if end else len(content)
    match = _FROM_FIELD.search(content, 0, header_end)
    if match is None:
        return content
    value = match.group()[len(b"From:") :].decode("utf-8", errors="replace")
    parsed = getaddresses([" ".join(value.split())])
    name = parsed[0][0] if parsed else ""
    field = "From: " + formataddr((name, address))
    return content[: match.start()] + field.encode("utf-8") + content[match.end() :]
