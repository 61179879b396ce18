"""The test server's side of SASL: PLAIN, LOGIN, XOAUTH2 and OAUTHBEARER.

Each mechanism is a generator: it yields challenges, receives the client's
decoded responses, and returns the authenticated user or None. Secrets are
compared in constant time, as a real server would.
"""

from __future__ import annotations

import hmac
from collections.abc import Generator, Mapping

SaslDialogue = Generator[bytes, bytes, str | None]

_XOAUTH2_ERROR = b'{"status":"401","schemes":"bearer","scope":"https://mail.test/"}'
_OAUTHBEARER_ERROR = b'{"status":"invalid_token","schemes":"bearer","scope":""}'


def start_dialogue(
    mechanism: str,
    initial: bytes | None,
    *,
    users: Mapping[str, str],
    tokens: Mapping[str, str],
) -> SaslDialogue:
    """The dialogue for ``mechanism``, not yet started (call ``next`` on it)."""
    if mechanism == "PLAIN":
        return _sasl_plain(initial, users)
    if mechanism == "LOGIN":
        return _sasl_login(initial, users)
    if mechanism == "XOAUTH2":
        return _sasl_xoauth2(initial, tokens)
    if mechanism == "OAUTHBEARER":
        return _sasl_oauthbearer(initial, tokens)
    raise ValueError(f"no test SASL mechanism {mechanism!r}")


def _matches(expected: str | None, given: str) -> bool:
    return expected is not None and hmac.compare_digest(
        expected.encode("utf-8"), given.encode("utf-8")
    )


def _sasl_plain(initial: bytes | None, users: Mapping[str, str]) -> SaslDialogue:
    response = initial if initial is not None else (yield b"")
    parts = response.split(b"\0")
    if len(parts) != 3:
        return None
    try:
        authzid, authcid, password = (part.decode("utf-8") for part in parts)
    except UnicodeDecodeError:
        return None
    if authzid and authzid != authcid:
        return None
    return authcid if _matches(users.get(authcid), password) else None


def _sasl_login(initial: bytes | None, users: Mapping[str, str]) -> SaslDialogue:
    username = initial if initial is not None else (yield b"Username:")
    password = yield b"Password:"
    try:
        user, secret = username.decode("utf-8"), password.decode("utf-8")
    except UnicodeDecodeError:
        return None
    return user if _matches(users.get(user), secret) else None


def _bearer_fields(payload: bytes) -> dict[str, str]:
    fields: dict[str, str] = {}
    for item in payload.decode("utf-8", "replace").split("\x01"):
        key, sep, value = item.partition("=")
        if sep:
            fields[key] = value
    return fields


def _bearer_token(fields: Mapping[str, str]) -> str | None:
    auth = fields.get("auth", "")
    scheme, _, token = auth.partition(" ")
    return token if scheme.lower() == "bearer" and token else None


def _sasl_xoauth2(initial: bytes | None, tokens: Mapping[str, str]) -> SaslDialogue:
    response = initial if initial is not None else (yield b"")
    fields = _bearer_fields(response)
    user = fields.get("user", "")
    token = _bearer_token(fields)
    if token is not None and _matches(tokens.get(user), token):
        return user
    # Google's dialogue: an error challenge, an empty response, then 535.
    yield _XOAUTH2_ERROR
    return None


def _sasl_oauthbearer(initial: bytes | None, tokens: Mapping[str, str]) -> SaslDialogue:
    response = initial if initial is not None else (yield b"")
    # RFC 7628: gs2 header "n,a=user," then \x01-separated key=value pairs.
    header, _, rest = response.partition(b"\x01")
    user = ""
    for part in header.decode("utf-8", "replace").split(","):
        if part.startswith("a="):
            user = part[2:].replace("=2C", ",").replace("=3D", "=")
    token = _bearer_token(_bearer_fields(rest))
    if token is not None:
        if not user:
            user = next((u for u, t in tokens.items() if _matches(t, token)), "")
        if _matches(tokens.get(user), token):
            return user
    yield _OAUTHBEARER_ERROR
    return None
