"""Server-side AUTH: a users file of scrypt hashes, checked through twisted.cred.

The file holds one ``name:hash`` per line, ``#`` comments and blank lines
allowed, with ``hash`` = ``scrypt$N$r$p$salt$digest`` (base64). scrypt is
deliberately slow, so it runs in the reactor's thread pool; unknown users
get the same amount of work against a dummy hash, so timing does not tell
an attacker which user names exist.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
import secrets
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.credentials import IUsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.cred.portal import IRealm, Portal
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorThreads
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from zope.interface import Interface, implementer

__all__ = [
    "IRelayUser",
    "PasswordHash",
    "RelayRealm",
    "UsersFileChecker",
    "UsersFileError",
    "hash_password",
    "load_users",
    "make_portal",
]

log = Logger()

DEFAULT_N = 2**15
DEFAULT_R = 8
DEFAULT_P = 1
_SALT_OCTETS = 16
_DIGEST_OCTETS = 32
_MIN_SALT_OCTETS = 8
_MAX_N = 2**20
_MAX_R = 32
_MAX_P = 16
# 128 * N * r octets of memory per verification; keep one below 1 GiB.
_MAX_MEMORY = 2**30


class UsersFileError(ValueError):
    """The users file cannot be used; the message names the file and line."""


@dataclass(frozen=True, slots=True)
class PasswordHash:
    """One parsed ``scrypt$N$r$p$salt$digest`` value."""

    n: int
    r: int
    p: int
    salt: bytes
    digest: bytes = field(repr=False)

    @classmethod
    def parse(cls, text: str) -> PasswordHash:
        """Parse and bound-check a stored hash; ValueError says what is wrong."""
        parts = text.split("$")
        if len(parts) != 6 or parts[0] != "scrypt":
            raise ValueError("hash must look like scrypt$N$r$p$salt$digest")
        try:
            n, r, p = (int(part, 10) for part in parts[1:4])
        except ValueError:
            raise ValueError("scrypt N, r and p must be decimal integers") from None
        if n < 2 or n > _MAX_N or n & (n - 1):
            raise ValueError(f"scrypt N must be a power of two from 2 to {_MAX_N}")
        if not 1 <= r <= _MAX_R or not 1 <= p <= _MAX_P:
            raise ValueError(f"scrypt r must be 1-{_MAX_R} and p 1-{_MAX_P}")
        if 128 * n * r > _MAX_MEMORY:
            raise ValueError("scrypt N * r needs more than 1 GiB of memory")
        try:
            salt = base64.b64decode(parts[4], validate=True)
            digest = base64.b64decode(parts[5], validate=True)
        except binascii.Error:
            raise ValueError("salt and digest must be base64") from None
        if len(salt) < _MIN_SALT_OCTETS:
            raise ValueError(f"salt must be at least {_MIN_SALT_OCTETS} octets")
        if not 16 <= len(digest) <= 64:
            raise ValueError("digest must be 16 to 64 octets")
        return cls(n, r, p, salt, digest)

    def encode(self) -> str:
        salt = base64.b64encode(self.salt).decode("ascii")
        digest = base64.b64encode(self.digest).decode("ascii")
        return f"scrypt${self.n}${self.r}${self.p}${salt}${digest}"

    def compute(self, password: bytes) -> bytes:
        """scrypt of ``password`` with these parameters (slow on purpose)."""
        return hashlib.scrypt(
            password,
            salt=self.salt,
            n=self.n,
            r=self.r,
            p=self.p,
            maxmem=min(2**31 - 1, 128 * self.r * (self.n + self.p + 2) + 2**20),
            dklen=len(self.digest),
        )

    def verify(self, password: bytes) -> bool:
        return hmac.compare_digest(self.compute(password), self.digest)


def hash_password(
    password: str, *, n: int = DEFAULT_N, r: int = DEFAULT_R, p: int = DEFAULT_P
) -> str:
    """A new ``scrypt$...`` value for ``password`` (UTF-8), with a random salt."""
    template = PasswordHash(n, r, p, secrets.token_bytes(_SALT_OCTETS), b"\0" * 32)
    # Round-trip through parse so that out-of-range parameters are refused.
    PasswordHash.parse(template.encode())
    digest = template.compute(password.encode("utf-8"))
    return PasswordHash(n, r, p, template.salt, digest).encode()


def _parse_line(line: str) -> tuple[str, PasswordHash] | None:
    text = line.strip()
    if not text or text.startswith("#"):
        return None
    name, colon, hashed = text.partition(":")
    if not colon:
        raise ValueError("expected name:hash")
    if not name or name != name.strip() or any(c.isspace() for c in name):
        raise ValueError("user name is empty or contains whitespace")
    if not name.isprintable():
        raise ValueError("user name contains control characters")
    return name, PasswordHash.parse(hashed.strip())


def load_users(path: str | os.PathLike[str]) -> dict[str, PasswordHash]:
    """Read a users file; UsersFileError names the file and line of any problem.

    Never echoes a line back: it may hold a password pasted by mistake.
    """
    users: dict[str, PasswordHash] = {}
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise UsersFileError(f"cannot read users file {path}: {error}") from None
    for number, line in enumerate(text.splitlines(), start=1):
        try:
            entry = _parse_line(line)
        except ValueError as error:
            raise UsersFileError(f"{path} line {number}: {error}") from None
        if entry is None:
            continue
        name, hashed = entry
        if name in users:
            raise UsersFileError(f"{path} line {number}: user {name!r} listed twice")
        users[name] = hashed
    return users


def _as_bytes(value: str | bytes) -> bytes:
    return value.encode("utf-8") if isinstance(value, str) else value


def _file_stamp(path: Path) -> tuple[int, int, int]:
    status = path.stat()
    return status.st_ino, status.st_size, status.st_mtime_ns


@implementer(ICredentialsChecker)
class UsersFileChecker:
    """Checks user name and password against a users file, off the reactor.

    The file is read at construction (a bad file stops start-up) and again
    whenever it changes; a broken edit keeps the last good table and is
    logged.
    """

    credentialInterfaces = (IUsernamePassword,)

    def __init__(self, path: str | os.PathLike[str], reactor: IReactorThreads) -> None:
        self._path = Path(path)
        self._reactor = reactor
        self._lock = threading.Lock()
        self._stamp = _file_stamp(self._path)
        self._users = load_users(self._path)
        self._dummy = self._make_dummy()

    def _make_dummy(self) -> PasswordHash:
        """A hash nobody's password matches, as costly as the real ones."""
        like = next(iter(self._users.values()), None)
        n, r, p = (like.n, like.r, like.p) if like else (DEFAULT_N, DEFAULT_R, 1)
        return PasswordHash(
            n, r, p, secrets.token_bytes(_SALT_OCTETS), secrets.token_bytes(32)
        )

    @property
    def user_names(self) -> frozenset[str]:
        return frozenset(self._users)

    def requestAvatarId(
        self, credentials: IUsernamePassword
    ) -> Deferred[bytes | tuple[()]]:
        """Fires with the UTF-8 user name, or fails with UnauthorizedLogin."""
        username = _as_bytes(credentials.username)
        password = _as_bytes(credentials.password)
        pool = self._reactor.getThreadPool()
        verified: Deferred[bytes | None] = deferToThreadPool(
            self._reactor, pool, self._verify, username, password
        )
        return verified.addCallback(_require_user)

    def _reload_if_changed(self) -> None:
        with self._lock:
            try:
                stamp = _file_stamp(self._path)
            except OSError as error:
                log.warn(
                    "users file {path} unreadable: {error}; keeping the previous users",
                    path=str(self._path),
                    error=str(error),
                )
                return
            if stamp == self._stamp:
                return
            try:
                users = load_users(self._path)
            except UsersFileError as error:
                log.warn("{error}; keeping the previous users", error=str(error))
                return
            self._stamp = stamp
            self._users = users
            self._dummy = self._make_dummy()
            log.info(
                "users file {path} reloaded: {count} users",
                path=str(self._path),
                count=len(users),
            )

    def _verify(self, username: bytes, password: bytes) -> bytes | None:
        """Runs in a worker thread: the user name if the password matches."""
        self._reload_if_changed()
        try:
            name: str | None = username.decode("utf-8")
        except UnicodeDecodeError:
            name = None
        stored = self._users.get(name) if name is not None else None
        if stored is None:
            self._dummy.verify(password)
            return None
        return username if stored.verify(password) else None


def _require_user(name: bytes | None) -> bytes | tuple[()]:
    if name is None:
        raise UnauthorizedLogin("bad user name or password")
    return name


class IRelayUser(Interface):
    """The avatar interface of a relay user: the avatar is the user name."""


@implementer(IRealm)
class RelayRealm:
    """Hands out the user name itself: the relay needs nothing else."""

    def requestAvatar(
        self, avatarId: bytes | tuple[()], mind: object, *interfaces: type[Interface]
    ) -> tuple[type[Interface], str, Callable[[], None]]:
        if IRelayUser not in interfaces:
            raise NotImplementedError("RelayRealm only provides IRelayUser")
        if not isinstance(avatarId, bytes):
            raise NotImplementedError("anonymous users may not relay")
        return IRelayUser, avatarId.decode("utf-8"), _no_logout


def _no_logout() -> None:
    return None


def make_portal(checker: ICredentialsChecker) -> Portal:
    """A Portal whose logins yield the user name (interface IRelayUser)."""
    return Portal(RelayRealm(), [checker])
