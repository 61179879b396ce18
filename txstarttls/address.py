"""Envelope addresses and command arguments, validated before any byte is sent.

Everything a caller hands us ends up inside an SMTP command line, so a CR or
LF smuggled into an address or a user name would let the caller (or whoever
fed the caller) inject whole commands (SECURITY-CASES 14). Values are checked
and either returned unchanged or refused; they are never truncated or
rewritten, because a silently altered recipient is a misdelivery.
"""

from __future__ import annotations

import ipaddress
import re

from txstarttls.errors import InvalidAddress, InvalidArgument

__all__ = [
    "MAX_DOMAIN",
    "MAX_LOCAL_PART",
    "MAX_PATH",
    "format_path",
    "needs_smtputf8",
    "validate_address",
    "validate_hostname_argument",
    "validate_parameter",
    "validate_text_argument",
]

# RFC 5321 section 4.5.3.1: sizes in octets (UTF-8 for RFC 6531 addresses).
MAX_LOCAL_PART = 64
MAX_DOMAIN = 255
MAX_PATH = 256
_MAX_LABEL = 63
_SHOWN_CHARS = 100

_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
# Controls, C1 controls, Unicode line/paragraph separators, lone surrogates.
_TEXT_FORBIDDEN = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029\ud800-\udfff]")
_NON_ASCII = r"\u0080-\U0010ffff"
# RFC 5321 section 4.1.2 atext, widened by RFC 6531 to non-ASCII UTF-8.
_ATEXT = rf"[A-Za-z0-9!#$%&'*+\-/=?^_`{{|}}~{_NON_ASCII}]"
_DOT_ATOM = re.compile(rf"{_ATEXT}+(?:\.{_ATEXT}+)*")
# qtextSMTP / quoted-pairSMTP (RFC 5321 4.1.2), plus non-ASCII (RFC 6531).
_QUOTED_STRING = re.compile(
    rf'"(?:[\x20\x21\x23-\x5b\x5d-\x7e{_NON_ASCII}]|\\[\x20-\x7e])*"'
)
_LABEL_CHAR = rf"[A-Za-z0-9{_NON_ASCII}]"
_DOMAIN = re.compile(
    rf"{_LABEL_CHAR}(?:[A-Za-z0-9\-{_NON_ASCII}]*{_LABEL_CHAR})?"
    rf"(?:\.{_LABEL_CHAR}(?:[A-Za-z0-9\-{_NON_ASCII}]*{_LABEL_CHAR})?)*"
)
_ASCII_DOMAIN = re.compile(
    r"[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?"
    r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?)*"
)
_IPV4 = re.compile(r"[0-9]{1,3}(?:\.[0-9]{1,3}){3}")
_IPV6_TEXT = re.compile(r"[0-9A-Fa-f:.]+")
_KEYWORD = re.compile(r"[A-Za-z0-9][A-Za-z0-9-]*")
# RFC 5321 section 4.1.2 esmtp-value: %d33-60 / %d62-126.
_PARAM_VALUE = re.compile(r"[\x21-\x3c\x3e-\x7e]+")


def _show(value: str) -> str:
    """The value as a one-line, escaped literal fit for an exception message."""
    if len(value) > _SHOWN_CHARS:
        return repr(value[:_SHOWN_CHARS]) + "..."
    return repr(value)


def _char_name(char: str) -> str:
    return repr(char)[1:-1]


def _refuse(address: str, reason: str) -> InvalidAddress:
    return InvalidAddress(f"invalid address {_show(address)}: {reason}")


def validate_address(address: str, *, allow_null: bool = False) -> str:
    """Return ``address`` unchanged if it may appear in MAIL FROM / RCPT TO.

    ``""`` is the null reverse-path ``<>`` and is accepted only with
    ``allow_null`` (bounces are sent from it; nobody can receive at it).
    """
    if not address:
        if allow_null:
            return address
        raise InvalidAddress(
            "invalid address: empty (the null sender is not allowed here)"
        )
    if not address.isprintable():
        # Catches CR/LF/NUL command injection and lone surrogates alike.
        bad = next(c for c in address if not c.isprintable())
        kind = "control" if _CONTROL.fullmatch(bad) else "non-printable"
        raise _refuse(address, f"contains {kind} character {_char_name(bad)}")
    if "<" in address or ">" in address:
        raise _refuse(address, "contains < or > (pass the bare address)")
    if address.startswith("@"):
        raise _refuse(address, "source routes (@host:...) are not accepted")
    local, at, domain = address.rpartition("@")
    if not at:
        raise _refuse(address, "missing @")
    if not local:
        raise _refuse(address, "empty local part")
    if not domain:
        raise _refuse(address, "empty domain")
    quoted = local.startswith('"')
    if " " in domain or (" " in local and not quoted):
        raise _refuse(address, "whitespace outside a quoted local part")
    local_octets = len(local.encode("utf-8"))
    if local_octets > MAX_LOCAL_PART:
        raise _refuse(
            address, f"local part is {local_octets} octets, over {MAX_LOCAL_PART}"
        )
    domain_octets = len(domain.encode("utf-8"))
    if domain_octets > MAX_DOMAIN:
        raise _refuse(address, f"domain is {domain_octets} octets, over {MAX_DOMAIN}")
    if local_octets + 1 + domain_octets + 2 > MAX_PATH:
        raise _refuse(address, f"path <...> is over {MAX_PATH} octets")
    pattern = _QUOTED_STRING if quoted else _DOT_ATOM
    if pattern.fullmatch(local) is None:
        raise _refuse(address, "malformed local part")
    reason = _domain_error(domain)
    if reason:
        raise _refuse(address, reason)
    return address


def _domain_error(domain: str, *, ascii_only: bool = False) -> str | None:
    """Why ``domain`` is neither a host name nor an address literal, or None."""
    if domain.startswith("["):
        return _literal_error(domain)
    pattern = _ASCII_DOMAIN if ascii_only else _DOMAIN
    if pattern.fullmatch(domain) is None:
        return "malformed domain"
    if max(len(label.encode("utf-8")) for label in domain.split(".")) > _MAX_LABEL:
        return f"a domain label is over {_MAX_LABEL} octets"
    return None


def _literal_error(literal: str) -> str | None:
    """Check an RFC 5321 section 4.1.3 address literal (IPv4 or IPv6 only)."""
    if not literal.endswith("]"):
        return "malformed address literal"
    inner = literal[1:-1]
    if inner[:5].lower() == "ipv6:":
        text = inner[5:]
        if _IPV6_TEXT.fullmatch(text) is None:
            return "malformed IPv6 address literal"
        try:
            ipaddress.IPv6Address(text)
        except ValueError:
            return "malformed IPv6 address literal"
        return None
    if _IPV4.fullmatch(inner) is None:
        return "malformed or unsupported address literal"
    try:
        ipaddress.IPv4Address(inner)
    except ValueError:
        return "malformed IPv4 address literal"
    return None


def needs_smtputf8(address: str) -> bool:
    """Non-ASCII anywhere in the address needs the SMTPUTF8 extension."""
    return not address.isascii()


def format_path(address: str) -> bytes:
    """The wire form ``<address>``; validates again so no caller can skip it."""
    validate_address(address, allow_null=True)
    return b"<" + address.encode("utf-8") + b">"


def validate_parameter(keyword: str, value: str | None = None) -> str:
    """Return ``KEYWORD=value`` (or ``KEYWORD``) for MAIL/RCPT parameters."""
    if _KEYWORD.fullmatch(keyword) is None:
        raise InvalidArgument(f"invalid ESMTP parameter keyword {_show(keyword)}")
    if value is None:
        return keyword
    if _PARAM_VALUE.fullmatch(value) is None:
        raise InvalidArgument(
            f"invalid value {_show(value)} for ESMTP parameter {keyword}: "
            "only printable ASCII without space or '=' (xtext-encode it)"
        )
    return f"{keyword}={value}"


def validate_hostname_argument(name: str) -> str:
    """Return ``name`` if it is safe as the EHLO/HELO argument.

    ASCII only: EHLO goes out before we know whether the server speaks
    SMTPUTF8, so an internationalised name must be sent as A-labels (xn--).
    """
    if not name:
        raise InvalidArgument("invalid EHLO/HELO name: empty")
    if not name.isascii() or not name.isprintable():
        raise InvalidArgument(
            f"invalid EHLO/HELO name {_show(name)}: "
            "only printable ASCII (use the xn-- form for IDN)"
        )
    if len(name) > MAX_DOMAIN:
        raise InvalidArgument(
            f"invalid EHLO/HELO name {_show(name)}: over {MAX_DOMAIN} octets"
        )
    reason = _domain_error(name, ascii_only=True)
    if reason:
        raise InvalidArgument(f"invalid EHLO/HELO name {_show(name)}: {reason}")
    return name


def validate_text_argument(value: str, what: str) -> str:
    """Return ``value`` if it cannot break out of its command line.

    The message names the offending character and its position but never
    shows the value, since the same check guards passwords and tokens.
    """
    match = _TEXT_FORBIDDEN.search(value)
    if match is not None:
        raise InvalidArgument(
            f"invalid {what}: character {_char_name(match.group())} "
            f"at position {match.start()} is not allowed"
        )
    return value
