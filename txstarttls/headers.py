"""Pure: the header section of a message that a local program hands to sendmail.

Line ends, header fields, RFC 5322 address lists and display names, parsed
strictly enough that nothing is dropped silently and no header is injected.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from email.header import Header
from email.utils import quote
from typing import Final

from txstarttls.address import validate_address
from txstarttls.errors import InvalidAddress
from txstarttls.terminal import printable

__all__ = [
    "DataError",
    "check_full_name",
    "field_name",
    "field_value",
    "format_mailbox",
    "normalise_line_ends",
    "parse_addresses",
    "split_address_list",
    "split_header",
]

_HEADER_NAME: Final = re.compile(rb"[\x21-\x39\x3b-\x7e]+:")
_SPECIALS: Final = re.compile(r'[][\\()<>@,:;".]')
_MAX_FULL_NAME: Final = 256


class DataError(Exception):
    """A bad address, name or message: exit 65."""


def normalise_line_ends(data: bytes) -> bytes:
    """Every LF, CR and CRLF becomes CRLF; a missing final line end is added."""
    data = data.replace(b"\r\n", b"\n").replace(b"\r", b"\n").replace(b"\n", b"\r\n")
    return data if not data or data.endswith(b"\r\n") else data + b"\r\n"


def split_header(data: bytes) -> tuple[list[bytes], bytes]:
    """Header fields (folded lines kept, CRLF included) and the body.

    The header section ends at the empty line, or at the first line that is
    no header field: that line starts the body, as Postfix treats it.
    """
    if data.startswith(b"From "):  # an mbox separator, not a header field
        data = data.partition(b"\r\n")[2]
    fields: list[bytes] = []
    position = 0
    while position < len(data):
        end = data.index(b"\r\n", position) + 2
        line = data[position:end]
        if line == b"\r\n":
            return fields, data[end:]
        if line[:1] in (b" ", b"\t") and fields:
            fields[-1] += line
        elif _HEADER_NAME.match(line):
            fields.append(line)
        else:
            break
        position = end
    return fields, data[position:]


def field_name(header_field: bytes) -> bytes:
    """The field's name in lower case, for comparing."""
    return header_field.partition(b":")[0].lower()


def field_value(header_field: bytes) -> str:
    """The unfolded field body, as text (UTF-8 headers are allowed)."""
    text = header_field.partition(b":")[2].decode("utf-8", "surrogateescape")
    return " ".join(text.split())


def split_address_list(value: str) -> list[str]:
    """The addresses in an RFC 5322 address list, nothing dropped silently.

    Splits at top-level commas and semicolons, drops comments and group
    names (``undisclosed-recipients:;``), takes what is inside ``<...>``
    when a display name is given. Unlike ``email.utils.getaddresses``, which
    turns ``bob@`` into nothing, every piece comes back for validation.
    """
    items: list[str] = []
    current: list[str] = []
    quoted = escaped = False
    angle = bracket = comment = 0
    for char in value:
        if escaped:
            escaped = False
            if not comment:
                current.append(char)
            continue
        if char == "\\" and (quoted or comment):
            escaped = True
            if quoted:
                current.append(char)
            continue
        if comment:
            comment += {"(": 1, ")": -1}.get(char, 0)
            continue
        if quoted:
            quoted = char != '"'
            current.append(char)
            continue
        if char == "(":
            comment = 1
            continue
        if char == '"':
            quoted = True
        elif char in "<>":
            angle += 1 if char == "<" else -1
        elif char in "[]":
            bracket += 1 if char == "[" else -1
        elif not angle and not bracket and char in ",;:":
            if char == ":":
                current = []  # what came before was a group's display name
            else:
                items.append("".join(current))
                current = []
            continue
        if angle < 0 or bracket < 0:
            raise DataError(f"unbalanced <> or [] in {printable(value)!r}")
        current.append(char)
    if quoted or escaped or angle or bracket or comment:
        raise DataError(
            f"unbalanced quotes, brackets or comments in {printable(value)!r}"
        )
    items.append("".join(current))
    addresses = []
    for item in (item.strip() for item in items):
        if item.endswith(">") and "<" in item:
            item = item[item.rindex("<") + 1 : -1].strip()
        if item:
            addresses.append(item)
    return addresses


def parse_addresses(values: Iterable[str], where: str) -> list[str]:
    """Addresses from address lists (``a@b, Name <c@d>``), each validated."""
    found = []
    for value in values:
        if not value.isprintable():
            bad = next(c for c in value if not c.isprintable())
            raise DataError(
                f"{where} {printable(value)!r} contains control character "
                f"{printable(repr(bad))}"
            )
        for address in split_address_list(value):
            try:
                found.append(validate_address(address))
            except InvalidAddress as error:
                raise DataError(f"{where}: {error}") from None
    return found


def check_full_name(name: str) -> str:
    """The ``-F`` name, refused when it could break the From: line it goes in."""
    if len(name) > _MAX_FULL_NAME:
        raise DataError(f"full name (-F) is over {_MAX_FULL_NAME} characters")
    if not name.isprintable():
        raise DataError(
            f"full name (-F) {printable(name)!r} contains control characters "
            "(header injection refused)"
        )
    return name


def format_mailbox(name: str | None, address: str) -> str:
    """``Name <address>``, the name quoted or RFC 2047 encoded as needed."""
    if not name:
        return address
    if not name.isascii():
        display = Header(name, "utf-8").encode()
    elif _SPECIALS.search(name):
        display = f'"{quote(name)}"'
    else:
        display = name
    return f"{display} <{address}>"
