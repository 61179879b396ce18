"""Client SASL mechanisms for SMTP AUTH (RFC 4954).

A mechanism turns credentials into the responses AUTH exchanges; the client
protocol does the base64 and the waiting. Nothing here logs or formats a
secret: ``repr`` of credentials never shows the password or token.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Collection, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from txstarttls.address import validate_text_argument
from txstarttls.errors import AuthenticationUnavailable, InvalidArgument

TokenSource = Callable[[], "str | Awaitable[str]"]
"""Returns a fresh OAuth 2.0 access token, synchronously or not."""

PASSWORD_MECHANISMS = ("PLAIN", "LOGIN")
TOKEN_MECHANISMS = ("XOAUTH2", "OAUTHBEARER")


@dataclass(frozen=True, slots=True)
class Credentials:
    """A user name with a password or a token source, and the mechanisms to try.

    ``mechanisms`` is the order of preference; by default PLAIN then LOGIN for
    a password, XOAUTH2 then OAUTHBEARER for a token.
    """

    username: str
    password: str | None = field(default=None, repr=False)
    token: TokenSource | None = field(default=None, repr=False)
    mechanisms: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        validate_text_argument(self.username, "user name")
        if self.password is not None:
            validate_text_argument(self.password, "password")
        if (self.password is None) == (self.token is None):
            raise InvalidArgument("credentials need exactly one of password or token")
        if self.mechanisms is not None:
            unknown = {m.upper() for m in self.mechanisms} - set(
                PASSWORD_MECHANISMS + TOKEN_MECHANISMS
            )
            if unknown:
                raise InvalidArgument(
                    f"unsupported SASL mechanism {sorted(unknown)[0]}: "
                    "use PLAIN, LOGIN, XOAUTH2 or OAUTHBEARER"
                )

    @property
    def preference(self) -> tuple[str, ...]:
        if self.mechanisms is not None:
            usable = (
                PASSWORD_MECHANISMS if self.password is not None else TOKEN_MECHANISMS
            )
            return tuple(m.upper() for m in self.mechanisms if m.upper() in usable)
        return PASSWORD_MECHANISMS if self.password is not None else TOKEN_MECHANISMS


class Mechanism(Protocol):
    """One SASL exchange, client side."""

    name: str

    def initial_response(self) -> bytes | None:
        """Bytes to send with the AUTH command, or None to wait for a 334."""

    def respond(self, challenge: bytes) -> bytes:
        """The answer to one decoded 334 challenge."""


class Plain:
    """RFC 4616: authorisation id (empty), user name and password in one go."""

    name = "PLAIN"

    def __init__(self, username: str, password: str) -> None:
        self._message = b"\0" + username.encode() + b"\0" + password.encode()

    def initial_response(self) -> bytes | None:
        return self._message

    def respond(self, challenge: bytes) -> bytes:
        return self._message


class Login:
    """The de-facto LOGIN mechanism: user name, then password, on request."""

    name = "LOGIN"

    def __init__(self, username: str, password: str) -> None:
        self._answers = [username.encode(), password.encode()]

    def initial_response(self) -> bytes | None:
        return None

    def respond(self, challenge: bytes) -> bytes:
        # Servers word the prompts differently; the order is what counts.
        return self._answers.pop(0) if self._answers else b""


class XOAuth2:
    """Google's and Microsoft's XOAUTH2: a bearer token for a user."""

    name = "XOAUTH2"

    def __init__(self, username: str, token: str) -> None:
        self._message = f"user={username}\x01auth=Bearer {token}\x01\x01".encode()

    def initial_response(self) -> bytes | None:
        return self._message

    def respond(self, challenge: bytes) -> bytes:
        # A challenge after the token is a JSON error; an empty answer makes
        # the server conclude with its 5xx.
        return b""


class OAuthBearer:
    """RFC 7628 OAUTHBEARER with a GS2 header naming the user."""

    name = "OAUTHBEARER"

    def __init__(self, username: str, token: str, host: str, port: int) -> None:
        self._message = (
            f"n,a={_gs2_escape(username)},\x01host={host}\x01port={port}\x01"
            f"auth=Bearer {token}\x01\x01"
        ).encode()

    def initial_response(self) -> bytes | None:
        return self._message

    def respond(self, challenge: bytes) -> bytes:
        # RFC 7628 3.2.3: after an error challenge the client sends %x01.
        return b"\x01"


def _gs2_escape(name: str) -> str:
    return name.replace("=", "=3D").replace(",", "=2C")


def choose_mechanism(
    offered: Collection[str],
    credentials: Credentials,
    *,
    token: str | None = None,
    host: str = "",
    port: int = 0,
) -> Mechanism:
    """The first of the user's preferred mechanisms the server offers.

    ``offered`` must come from the EHLO reply after TLS, never before it.
    """
    offered_upper = {name.upper() for name in offered}
    for name in credentials.preference:
        if name not in offered_upper:
            continue
        if credentials.password is not None:
            if name == "PLAIN":
                return Plain(credentials.username, credentials.password)
            if name == "LOGIN":
                return Login(credentials.username, credentials.password)
        elif token is not None:
            validate_text_argument(token, "OAuth token")
            if name == "XOAUTH2":
                return XOAuth2(credentials.username, token)
            if name == "OAUTHBEARER":
                return OAuthBearer(credentials.username, token, host, port)
    raise AuthenticationUnavailable(
        "server offers no usable AUTH mechanism: it offers "
        f"{_describe(offered_upper)}, we can use {', '.join(credentials.preference)}"
    )


def _describe(names: Sequence[str] | set[str]) -> str:
    return ", ".join(sorted(names)) if names else "none"
