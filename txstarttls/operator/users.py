"""``passwd``: editing the relay's users file without ever leaving it half-written."""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TextIO

from txstarttls.operator.errors import (
    EX_CANTCREAT,
    EX_CONFIG,
    EX_DATAERR,
    EX_NOINPUT,
    EX_NOUSER,
    EX_USAGE,
    OperatorError,
    os_error,
)
from txstarttls.operator.files import CREATE_FLAGS
from txstarttls.terminal import printable
from txstarttls.userdb import UsersFileError, hash_password, load_users


def check_user_name(name: str) -> str:
    """A name the users file can hold on one ``name:hash`` line."""
    if not name:
        raise OperatorError("user name is empty", EX_USAGE)
    if not name.isprintable() or any(c.isspace() for c in name):
        raise OperatorError(
            f"user name {printable(name)!r} contains whitespace or control characters",
            EX_USAGE,
        )
    if ":" in name or name.startswith("#"):
        raise OperatorError(
            f"user name {name!r} must not contain ':' or start with '#'", EX_USAGE
        )
    return name


def _line_user(line: str) -> str | None:
    text = line.strip()
    if not text or text.startswith("#"):
        return None
    return text.partition(":")[0]


@contextlib.contextmanager
def _locked_directory(path: Path) -> Iterator[None]:
    """Serialise editors of one users file (the file itself is replaced)."""
    try:
        fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise OperatorError(
            f"cannot write {path}: directory {path.parent} does not exist",
            EX_CANTCREAT,
        ) from None
    except OSError as error:
        raise os_error("open directory", path.parent, error) from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _read_users(path: Path) -> list[str] | None:
    """The file's lines after checking it loads; None when it does not exist."""
    if not path.exists():
        return None
    try:
        load_users(path)
    except UsersFileError as error:
        raise OperatorError(f"{error}; fix it first", EX_CONFIG) from None
    return path.read_text(encoding="utf-8").splitlines()


def _write_private(path: Path, text: str) -> None:
    """Replace ``path`` atomically by a 0600 file, keeping the old owner."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        old = path.stat() if path.exists() else None
        fd = os.open(temporary, CREATE_FLAGS, 0o600)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as file:
                os.fchmod(file.fileno(), 0o600)
                if old is not None and (old.st_uid, old.st_gid) != (
                    os.getuid(),
                    os.getgid(),
                ):
                    # root editing the relay user's file must not take it away
                    with contextlib.suppress(PermissionError):
                        os.fchown(file.fileno(), old.st_uid, old.st_gid)
                file.write(text)
                file.flush()
                os.fsync(file.fileno())
            os.replace(temporary, path)
        finally:
            temporary.unlink(missing_ok=True)
        directory = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)
    except OSError as error:
        raise os_error("write", path, error) from None


def set_password(path: Path, user: str, password: str) -> bool:
    """Add ``user`` or change its password; True when the user is new."""
    check_user_name(user)
    if not password:
        raise OperatorError("the password is empty; nothing changed", EX_DATAERR)
    path = Path(os.path.realpath(path))
    with _locked_directory(path):
        lines = _read_users(path) or []
        line = f"{user}:{hash_password(password)}"
        added = True
        for index, existing in enumerate(lines):
            if _line_user(existing) == user:
                lines[index] = line
                added = False
        if added:
            lines.append(line)
        _write_private(path, "\n".join(lines) + "\n")
    return added


def delete_user(path: Path, user: str) -> None:
    check_user_name(user)
    path = Path(os.path.realpath(path))
    with _locked_directory(path):
        lines = _read_users(path)
        if lines is None:
            raise OperatorError(f"users file {path} does not exist", EX_NOINPUT)
        kept = [line for line in lines if _line_user(line) != user]
        if len(kept) == len(lines):
            raise OperatorError(f"no user {user!r} in {path}", EX_NOUSER)
        _write_private(path, "".join(line + "\n" for line in kept))


def read_new_password(
    user: str, from_stdin: bool, stdin: TextIO, ask: Callable[[str], str]
) -> str:
    if from_stdin:
        return stdin.readline().rstrip("\r\n")
    password = ask(f"New password for {user}: ")
    if ask("Retype the password: ") != password:
        raise OperatorError("the passwords do not match; nothing changed", EX_DATAERR)
    return password
