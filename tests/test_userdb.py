"""Tests for txstarttls.userdb: the users file and its twisted.cred checker."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import pytest
import pytest_twisted
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.cred.credentials import UsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.internet.interfaces import IReactorThreads
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import Interface

from txstarttls.userdb import (
    IRelayUser,
    PasswordHash,
    RelayRealm,
    UsersFileChecker,
    UsersFileError,
    hash_password,
    load_users,
    make_portal,
)

# Tiny scrypt parameters keep the suite fast; production uses DEFAULT_N.
FAST = {"n": 16, "r": 1, "p": 1}


class InlineThreads:
    """A reactor stand-in whose 'thread pool' runs work at once, in-line."""

    def __init__(self) -> None:
        self.jobs = 0

    def getThreadPool(self) -> InlineThreads:
        return self

    def callInThreadWithCallback(
        self,
        on_result: Callable[[bool, object], None],
        function: Callable[..., object],
        *args: object,
        **kwargs: object,
    ) -> None:
        self.jobs += 1
        try:
            result = function(*args, **kwargs)
        except Exception as error:
            on_result(False, error)
        else:
            on_result(True, result)

    def callFromThread(self, function: Callable[..., object], *args: object) -> None:
        function(*args)


def write_users(path: Path, users: dict[str, str]) -> Path:
    lines = ["# relay users", ""]
    lines += [f"{name}:{hash_password(pw, **FAST)}" for name, pw in users.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


def checker_for(path: Path, threads: InlineThreads | None = None) -> UsersFileChecker:
    return UsersFileChecker(path, cast(IReactorThreads, threads or InlineThreads()))


class Results(SynchronousTestCase):
    """Only for successResultOf / failureResultOf."""

    def runTest(self) -> None:
        """Not a test."""


RESULTS = Results()


# -- hashes --------------------------------------------------------------------------


def test_hash_format_and_verify() -> None:
    text = hash_password("correct horse", **FAST)
    parts = text.split("$")
    assert parts[:4] == ["scrypt", "16", "1", "1"]
    parsed = PasswordHash.parse(text)
    assert parsed.encode() == text
    assert parsed.verify(b"correct horse")
    assert not parsed.verify(b"correct horsE")
    assert "digest" not in repr(parsed)


def test_default_parameters_are_strong() -> None:
    parsed = PasswordHash.parse(hash_password("x"))
    assert (parsed.n, parsed.r, parsed.p) == (2**15, 8, 1)
    assert len(parsed.salt) == 16 and len(parsed.digest) == 32


def test_same_password_gets_a_new_salt() -> None:
    assert hash_password("pw", **FAST) != hash_password("pw", **FAST)


@settings(max_examples=20, deadline=None)
@given(st.text(max_size=40))
def test_any_password_round_trips(password: str) -> None:
    parsed = PasswordHash.parse(hash_password(password, **FAST))
    assert parsed.verify(password.encode("utf-8"))
    assert not parsed.verify(password.encode("utf-8") + b"x")


SALT = "c2FsdHNhbHRzYWx0"  # 12 octets
DIGEST = "ZGlnZXN0ZGlnZXN0ZGlnZXN0ZGlnZXN0"  # 24 octets


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("bcrypt$16$1$1$" + SALT + "$" + DIGEST, "look like"),
        ("scrypt$16$1$1$" + SALT, "look like"),
        ("scrypt$15$1$1$" + SALT + "$" + DIGEST, "power of two"),
        (f"scrypt${2**21}$1$1${SALT}${DIGEST}", "power of two"),
        ("scrypt$x$1$1$" + SALT + "$" + DIGEST, "decimal"),
        ("scrypt$16$0$1$" + SALT + "$" + DIGEST, "r must"),
        ("scrypt$16$1$99$" + SALT + "$" + DIGEST, "r must"),
        (f"scrypt${2**20}$32$1${SALT}${DIGEST}", "1 GiB"),
        ("scrypt$16$1$1$!!!$" + DIGEST, "base64"),
        ("scrypt$16$1$1$c2FsdA==$" + DIGEST, "salt"),
        ("scrypt$16$1$1$" + SALT + "$ZGln", "digest"),
    ],
)
def test_bad_hashes_are_refused(text: str, reason: str) -> None:
    with pytest.raises(ValueError, match=reason):
        PasswordHash.parse(text)


# -- the users file ------------------------------------------------------------------


def test_load_users_skips_comments_and_blank_lines(tmp_path: Path) -> None:
    path = write_users(tmp_path / "users", {"alice": "a", "bob@example.net": "b"})
    users = load_users(path)
    assert sorted(users) == ["alice", "bob@example.net"]
    assert users["alice"].verify(b"a")


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("alice", "line 2: expected name:hash"),
        (":scrypt$16$1$1$x$y", "line 2: user name is empty"),
        ("al ice:scrypt$16", "line 2: user name is empty or contains whitespace"),
        ("alice:hunter2", "line 2: hash must look like"),
        ("alice\x07:x", "line 2: user name contains control characters"),
    ],
)
def test_bad_lines_are_named_by_number_and_never_echoed(
    tmp_path: Path, line: str, message: str
) -> None:
    path = tmp_path / "users"
    path.write_text("# first\n" + line + "\n")
    with pytest.raises(UsersFileError) as raised:
        load_users(path)
    assert str(raised.value) == f"{path} {message}" or message in str(raised.value)
    assert "hunter2" not in str(raised.value)
    assert "\n" not in str(raised.value)


def test_duplicate_user_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "users"
    entry = "alice:" + hash_password("a", **FAST)
    path.write_text(f"{entry}\n{entry}\n")
    with pytest.raises(UsersFileError, match="line 2: user 'alice' listed twice"):
        load_users(path)


def test_missing_or_binary_file_is_one_clear_error(tmp_path: Path) -> None:
    with pytest.raises(UsersFileError, match="cannot read users file"):
        load_users(tmp_path / "absent")
    (tmp_path / "binary").write_bytes(b"\xff\xfe")
    with pytest.raises(UsersFileError, match="cannot read users file"):
        load_users(tmp_path / "binary")


# -- the checker ---------------------------------------------------------------------


def test_checker_accepts_the_right_password(tmp_path: Path) -> None:
    threads = InlineThreads()
    checker = checker_for(write_users(tmp_path / "u", {"alice": "pw"}), threads)
    result = RESULTS.successResultOf(
        checker.requestAvatarId(UsernamePassword(b"alice", b"pw"))
    )
    assert result == b"alice"
    assert threads.jobs == 1


@pytest.mark.parametrize(
    ("user", "password"),
    [(b"alice", b"wrong"), (b"mallory", b"pw"), (b"\xff\xfe", b"pw"), (b"", b"")],
)
def test_checker_refuses_wrong_or_unknown(
    tmp_path: Path, user: bytes, password: bytes
) -> None:
    checker = checker_for(write_users(tmp_path / "u", {"alice": "pw"}))
    failure = RESULTS.failureResultOf(
        checker.requestAvatarId(UsernamePassword(user, password))
    )
    assert failure.check(UnauthorizedLogin)


def test_unknown_users_cost_the_same_scrypt_work(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No user enumeration by timing: one scrypt with the same parameters."""
    checker = checker_for(write_users(tmp_path / "u", {"alice": "pw"}))
    calls: list[tuple[int, int, int]] = []
    original = PasswordHash.compute

    def spy(self: PasswordHash, password: bytes) -> bytes:
        calls.append((self.n, self.r, self.p))
        return original(self, password)

    monkeypatch.setattr(PasswordHash, "compute", spy)
    for user in (b"alice", b"nobody", b"\xff"):
        RESULTS.failureResultOf(
            checker.requestAvatarId(UsernamePassword(user, b"guess")),
            UnauthorizedLogin,
        )
    assert calls == [(16, 1, 1)] * 3


def test_comparison_is_constant_time(monkeypatch: pytest.MonkeyPatch) -> None:
    import hmac

    seen: list[tuple[bytes, bytes]] = []

    def compare(a: bytes, b: bytes) -> bool:
        seen.append((a, b))
        return a == b

    monkeypatch.setattr(hmac, "compare_digest", compare)
    assert PasswordHash.parse(hash_password("pw", **FAST)).verify(b"pw")
    assert len(seen) == 1


def test_checker_str_credentials_work_too(tmp_path: Path) -> None:
    checker = checker_for(write_users(tmp_path / "u", {"jörg": "pässword"}))
    credentials = UsernamePassword(cast(Any, "jörg"), cast(Any, "pässword"))
    assert RESULTS.successResultOf(checker.requestAvatarId(credentials)) == (
        "jörg".encode()
    )


def test_bad_file_stops_the_checker_at_construction(tmp_path: Path) -> None:
    path = tmp_path / "u"
    path.write_text("alice\n")
    with pytest.raises(UsersFileError, match="line 1"):
        checker_for(path)


def test_checker_reloads_a_changed_file_and_keeps_the_old_on_a_bad_edit(
    tmp_path: Path,
) -> None:
    path = write_users(tmp_path / "u", {"alice": "pw"})
    checker = checker_for(path)
    write_users(path, {"bob": "new"})
    os.utime(path, ns=(1, 1))
    assert RESULTS.successResultOf(
        checker.requestAvatarId(UsernamePassword(b"bob", b"new"))
    ) == (b"bob")
    assert checker.user_names == frozenset({"bob"})
    path.write_text("broken line\n")
    os.utime(path, ns=(2, 2))
    assert RESULTS.successResultOf(
        checker.requestAvatarId(UsernamePassword(b"bob", b"new"))
    ) == (b"bob")
    path.unlink()
    assert RESULTS.successResultOf(
        checker.requestAvatarId(UsernamePassword(b"bob", b"new"))
    ) == (b"bob")


@pytest_twisted.ensureDeferred
async def test_verification_runs_off_the_reactor_thread(tmp_path: Path) -> None:
    from twisted.internet import reactor

    checker = UsersFileChecker(
        write_users(tmp_path / "u", {"alice": "pw"}), cast(IReactorThreads, reactor)
    )
    threads: list[threading.Thread] = []
    original = checker._verify

    def spy(username: bytes, password: bytes) -> bytes | None:
        threads.append(threading.current_thread())
        return original(username, password)

    checker._verify = spy  # type: ignore[method-assign]
    assert await checker.requestAvatarId(UsernamePassword(b"alice", b"pw")) == b"alice"
    assert threads and threads[0] is not threading.main_thread()


# -- portal and realm ----------------------------------------------------------------


def test_portal_login_yields_the_user_name(tmp_path: Path) -> None:
    portal = make_portal(checker_for(write_users(tmp_path / "u", {"alice": "pw"})))
    interface, avatar, logout = RESULTS.successResultOf(
        portal.login(UsernamePassword(b"alice", b"pw"), None, IRelayUser)
    )
    assert (interface, avatar) == (IRelayUser, "alice")
    assert logout() is None
    failure = RESULTS.failureResultOf(
        portal.login(UsernamePassword(b"alice", b"no"), None, IRelayUser)
    )
    assert failure.check(UnauthorizedLogin)


def test_realm_serves_only_named_relay_users() -> None:
    class IOther(Interface):
        pass

    with pytest.raises(NotImplementedError):
        RelayRealm().requestAvatar(b"alice", None, IOther)
    with pytest.raises(NotImplementedError):
        RelayRealm().requestAvatar((), None, IRelayUser)
