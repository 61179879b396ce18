"""MAIL and RCPT arguments and their ESMTP parameters, checked for the server.

Pure: no Twisted, no I/O, so every rule can be tested on its own. Each
function returns what the session keeps, or raises :class:`Refusal` with
the reply the client gets. What the relay keeps of the parameters (BODY,
SMTPUTF8 and the RFC 3461 DSN ones) travels with the message.
"""

from __future__ import annotations

import re

from txstarttls.address import needs_smtputf8, validate_address
from txstarttls.errors import InvalidAddress
from txstarttls.policy import strip_source_route

__all__ = [
    "Refusal",
    "mail_parameters",
    "mail_path",
    "parse_parameters",
    "rcpt_parameters",
    "rcpt_path",
    "recipient_address",
    "sender_address",
    "valid_orcpt",
]

_MAX_ENVID = 100
_MAX_ORCPT = 500

_MAIL_ARGUMENT = re.compile(r"FROM:[ ]*<([^<>]*)>(.*)", re.IGNORECASE | re.DOTALL)
_RCPT_ARGUMENT = re.compile(r"TO:[ ]*<([^<>]*)>(.*)", re.IGNORECASE | re.DOTALL)
_KEYWORD = re.compile(r"[A-Za-z0-9][A-Za-z0-9-]*")
# RFC 3461 section 4: xtext, "+" only as the start of an uppercase hex pair.
_XTEXT = re.compile(r"(?:[\x21-\x2a\x2c-\x3c\x3e-\x7e]|\+[0-9A-F]{2})*")
_ADDR_TYPE = re.compile(r"[A-Za-z0-9][A-Za-z0-9-]*")
_NOTIFY_VALUES = frozenset({"SUCCESS", "FAILURE", "DELAY"})


class Refusal(Exception):
    """A command is refused with this reply; the session goes on."""

    def __init__(self, code: int, enhanced: str, text: str) -> None:
        super().__init__(f"{code} {enhanced} {text}")
        self.code = code
        self.enhanced = enhanced
        self.text = text


# -- the path ------------------------------------------------------------------


def mail_path(argument: str) -> tuple[str, str]:
    """``FROM:<path> PARAMETERS`` as the path and the parameter text."""
    return _split(_MAIL_ARGUMENT, argument, "Syntax: MAIL FROM:<address>")


def rcpt_path(argument: str) -> tuple[str, str]:
    """``TO:<path> PARAMETERS`` as the path and the parameter text."""
    return _split(_RCPT_ARGUMENT, argument, "Syntax: RCPT TO:<address>")


def _split(pattern: re.Pattern[str], argument: str, syntax: str) -> tuple[str, str]:
    match = pattern.fullmatch(argument)
    if match is None:
        raise Refusal(501, "5.5.4", syntax)
    path, rest = match.group(1), match.group(2)
    if rest and not rest.startswith(" "):
        raise Refusal(501, "5.5.4", syntax)
    return path, rest


def sender_address(path: str, *, smtputf8: bool) -> str:
    """The reverse-path without its source route; may be empty (``<>``)."""
    sender = strip_source_route(path)
    try:
        validate_address(sender, allow_null=True)
    except InvalidAddress:
        raise Refusal(501, "5.1.7", "Bad sender address syntax") from None
    if needs_smtputf8(sender) and not smtputf8:
        raise Refusal(553, "5.6.7", "Non-ASCII address needs MAIL SMTPUTF8")
    return sender


def recipient_address(path: str, *, smtputf8: bool) -> str:
    """The forward-path without its source route."""
    recipient = strip_source_route(path)
    try:
        validate_address(recipient)
    except InvalidAddress:
        raise Refusal(501, "5.1.3", "Bad recipient address syntax") from None
    if needs_smtputf8(recipient) and not smtputf8:
        raise Refusal(553, "5.6.7", "Non-ASCII address needs MAIL SMTPUTF8")
    return recipient


# -- the parameters ------------------------------------------------------------


def parse_parameters(text: str) -> list[tuple[str, str | None]]:
    """Split ``KEY=value KEY`` into pairs; 501 on junk or repeats."""
    pairs: list[tuple[str, str | None]] = []
    seen: set[str] = set()
    for word in text.split(" "):
        if not word:
            continue
        keyword, equals, value = word.partition("=")
        if _KEYWORD.fullmatch(keyword) is None or (equals and not value):
            raise Refusal(501, "5.5.4", "Syntax error in parameters")
        keyword = keyword.upper()
        if keyword in seen:
            raise Refusal(501, "5.5.4", f"Duplicate parameter {keyword}")
        seen.add(keyword)
        pairs.append((keyword, value if equals else None))
    return pairs


def mail_parameters(
    text: str, *, esmtp: bool, max_size: int, auth_offered: bool
) -> tuple[tuple[str, ...], bool]:
    """Check MAIL parameters; keep BODY, SMTPUTF8 and the DSN ones.

    Returns the kept parameters and whether SMTPUTF8 was asked for.
    """
    pairs = parse_parameters(text)
    if pairs and not esmtp:
        raise Refusal(555, "5.5.4", "Parameters need EHLO, not HELO")
    kept: list[str] = []
    smtputf8 = False
    for keyword, value in pairs:
        if keyword == "SIZE":
            size = _require_value(keyword, value)
            if not size.isdigit() or len(size) > 20:
                raise Refusal(501, "5.5.4", "Bad SIZE value")
            if int(size) > max_size:
                raise Refusal(552, "5.3.4", "Message size exceeds fixed maximum size")
        elif keyword == "BODY":
            body = _require_value(keyword, value).upper()
            if body not in ("7BIT", "8BITMIME"):
                raise Refusal(501, "5.5.4", "BODY must be 7BIT or 8BITMIME")
            kept.append(f"BODY={body}")
        elif keyword == "SMTPUTF8":
            if value is not None:
                raise Refusal(501, "5.5.4", "SMTPUTF8 takes no value")
            smtputf8 = True
            kept.append("SMTPUTF8")
        elif keyword == "RET":
            ret = _require_value(keyword, value).upper()
            if ret not in ("FULL", "HDRS"):
                raise Refusal(501, "5.5.4", "RET must be FULL or HDRS")
            kept.append(f"RET={ret}")
        elif keyword == "ENVID":
            envid = _require_value(keyword, value)
            if len(envid) > _MAX_ENVID or _XTEXT.fullmatch(envid) is None:
                raise Refusal(501, "5.5.4", "ENVID must be xtext (RFC 3461)")
            kept.append(f"ENVID={envid}")
        elif keyword == "AUTH" and auth_offered:
            # RFC 4954 section 5: accepted, but never passed on.
            if value is None or _XTEXT.fullmatch(value) is None:
                raise Refusal(501, "5.5.4", "AUTH must be xtext")
        else:
            raise _unsupported(keyword)
    return tuple(kept), smtputf8


def rcpt_parameters(
    text: str, *, esmtp: bool, smtputf8: bool
) -> tuple[str | None, str | None]:
    """RFC 3461 NOTIFY and ORCPT; anything else is refused."""
    pairs = parse_parameters(text)
    if pairs and not esmtp:
        raise Refusal(555, "5.5.4", "Parameters need EHLO, not HELO")
    notify: str | None = None
    orcpt: str | None = None
    for keyword, value in pairs:
        if keyword == "NOTIFY":
            words = tuple(_require_value(keyword, value).upper().split(","))
            never = words == ("NEVER",)
            if not never and (
                not set(words) <= _NOTIFY_VALUES or len(set(words)) != len(words)
            ):
                raise Refusal(501, "5.5.4", "Bad NOTIFY value")
            notify = ",".join(words)
        elif keyword == "ORCPT":
            orcpt = _require_value(keyword, value)
            if not valid_orcpt(orcpt, smtputf8):
                raise Refusal(501, "5.5.4", "Bad ORCPT value")
        else:
            raise _unsupported(keyword)
    return notify, orcpt


def valid_orcpt(value: str, smtputf8: bool) -> bool:
    """RFC 3461 section 4.2 ``addr-type ; xtext`` (RFC 6533 unitext for utf-8)."""
    if len(value) > _MAX_ORCPT:
        return False
    addr_type, semicolon, address = value.partition(";")
    if not semicolon or not address or _ADDR_TYPE.fullmatch(addr_type) is None:
        return False
    if _XTEXT.fullmatch(address) is not None:
        return True
    return (
        smtputf8
        and addr_type.lower() == "utf-8"
        and address.isprintable()
        and " " not in address
        and "=" not in address
    )


def _unsupported(keyword: str) -> Refusal:
    return Refusal(555, "5.5.4", f"Unsupported parameter {keyword}")


def _require_value(keyword: str, value: str | None) -> str:
    if value is None:
        raise Refusal(501, "5.5.4", f"{keyword} needs a value")
    return value
