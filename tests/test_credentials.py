"""Where smarthost secrets come from: files and commands."""

from __future__ import annotations

from pathlib import Path

import pytest
import pytest_twisted
from twisted.internet import reactor

from txstarttls.credentials import (
    password_from_command,
    read_password_file,
    token_command,
)
from txstarttls.errors import ConfigurationError


def test_password_file_loses_exactly_one_trailing_newline(tmp_path: Path) -> None:
    path = tmp_path / "password"
    path.write_text("s3cret\n\n")
    assert read_password_file(str(path)) == "s3cret\n"
    with pytest.raises(ConfigurationError, match="cannot read password file"):
        read_password_file(str(tmp_path / "missing"))


def test_password_command_output_is_the_password() -> None:
    assert password_from_command("printf '  s3cret \\n'") == "s3cret"
    with pytest.raises(ConfigurationError, match="exited with status 3: no vault"):
        password_from_command("echo no vault >&2; exit 3")
    with pytest.raises(ConfigurationError, match="printed nothing"):
        password_from_command("true")


@pytest_twisted.ensureDeferred
async def test_token_command_runs_without_blocking_and_reports_failures() -> None:
    assert await token_command(reactor, "echo tok-1") == "tok-1"
    with pytest.raises(ConfigurationError, match="exited with status 1"):
        await token_command(reactor, "exit 1")
    with pytest.raises(ConfigurationError, match="printed nothing"):
        await token_command(reactor, "true")
