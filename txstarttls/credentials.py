"""Where smarthost secrets come from: files, commands, environment.

Secrets are read at the last moment and never logged; a command's output
is the secret, so its error text (not its output) goes into error messages.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.utils import getProcessOutputAndValue

from txstarttls.errors import ConfigurationError


def read_password_file(path: str) -> str:
    """The password in ``path``; one trailing newline is how editors save it."""
    try:
        text = Path(path).read_text()
    except OSError as error:
        raise ConfigurationError(
            f"cannot read password file {path}: {error.strerror}"
        ) from None
    return text[:-1] if text.endswith("\n") else text


def password_from_command(command: str) -> str:
    """Run ``command`` once (at start) through the shell; its output, stripped."""
    try:
        completed = subprocess.run(
            ["/bin/sh", "-c", command], capture_output=True, timeout=60, check=False
        )
    except subprocess.TimeoutExpired:
        raise ConfigurationError("password command took over 60 s") from None
    if completed.returncode != 0:
        detail = completed.stderr.decode(errors="replace").strip()[:200]
        raise ConfigurationError(
            f"password command exited with status {completed.returncode}: {detail}"
        )
    password = completed.stdout.decode().strip()
    if not password:
        raise ConfigurationError("password command printed nothing")
    return password


def token_command(reactor: object, command: str) -> Deferred[str]:
    """Run ``command`` without blocking the reactor; its output is the token."""

    async def run() -> str:
        output: tuple[bytes, bytes, int] = await getProcessOutputAndValue(  # type: ignore[no-untyped-call]
            "/bin/sh", ["-c", command], env=dict(os.environ), reactor=reactor
        )
        out, err, code = output
        if code != 0:
            raise ConfigurationError(
                f"token command exited with status {code}: "
                f"{err.decode(errors='replace').strip()[:200]}"
            )
        token: str = out.decode().strip()
        if not token:
            raise ConfigurationError("token command printed nothing")
        return token

    return ensureDeferred(run())
