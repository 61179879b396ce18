"""Skip, or fail under CI, when an interop test cannot run here.

Interop tests need Debian binaries (Postfix, swaks, msmtp, saslpasswd2) and
root. On a developer's machine their absence is a skip; with
``TXSTARTTLS_REQUIRE_INTEROP=1`` (set by ``.ci/run``) it is a failure, so CI
cannot go green by silently skipping the tests that matter most.
"""

from __future__ import annotations

import os
import shutil
from typing import NoReturn

import pytest

REQUIRE_INTEROP_ENV = "TXSTARTTLS_REQUIRE_INTEROP"

# Postfix and saslpasswd2 live in sbin, which a non-root PATH often lacks.
_EXTRA_PATH = ("/usr/sbin", "/sbin", "/usr/bin", "/bin")


def interop_required() -> bool:
    """Whether a missing interop prerequisite must fail instead of skip."""
    return os.environ.get(REQUIRE_INTEROP_ENV, "") == "1"


def unavailable(reason: str) -> NoReturn:
    """Skip the current test for ``reason``, or fail it when interop is required."""
    if interop_required():
        pytest.fail(f"{reason} (and {REQUIRE_INTEROP_ENV}=1)", pytrace=False)
    pytest.skip(reason)


def find_binary(name: str) -> str | None:
    """The path of executable ``name`` on PATH or in the sbin directories."""
    path = os.pathsep.join([os.environ.get("PATH", ""), *_EXTRA_PATH])
    return shutil.which(name, path=path)


def require_binary(name: str) -> str:
    """The path of executable ``name``; skip (or fail under CI) if missing."""
    found = find_binary(name)
    if found is None:
        unavailable(f"{name} is not installed; run scripts/test-deps.sh as root")
    return found


def require_root() -> None:
    """Skip (or fail under CI) unless running as root, as Postfix needs."""
    if os.geteuid() != 0:
        unavailable("a private Postfix instance needs root")
