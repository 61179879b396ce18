"""Shared fixtures: certificates, a private Postfix, the runner's log, the CI guard.

pytest-twisted runs tests on Twisted's default reactor, which is what we
want, so nothing here selects one.
"""

from __future__ import annotations

from collections.abc import Generator, Iterator

import pytest
from twisted.logger import ILogObserver, LogEvent, formatEvent, globalLogPublisher
from zope.interface import provider

from tests.support.postfix import PostfixInstance
from tests.support.requirements import (
    REQUIRE_INTEROP_ENV,
    interop_required,
    require_binary,
    require_root,
)
from tests.support.tls import TLSFiles, write_tls_files
from txstarttls.testing import CertificateAuthority


@pytest.fixture(scope="session")
def certificate_authority() -> CertificateAuthority:
    """One throwaway CA per session: cheap, but every certificate must share it."""
    return CertificateAuthority()


@pytest.fixture(scope="session")
def tls_files(
    certificate_authority: CertificateAuthority,
    tmp_path_factory: pytest.TempPathFactory,
) -> TLSFiles:
    """The CA file plus good and deliberately bad server certificates, on disk."""
    return write_tls_files(tmp_path_factory.mktemp("tls"), certificate_authority)


@pytest.fixture(scope="session")
def postfix(tls_files: TLSFiles) -> Iterator[PostfixInstance]:
    """A private Postfix (STARTTLS, AUTH after TLS) shared by the session.

    Starting one takes a couple of seconds; tests keep apart by using their
    own recipient address.
    """
    require_root()
    for name in ("postfix", "postconf", "saslpasswd2"):
        require_binary(name)
    with PostfixInstance(
        cert_file=tls_files.good.cert,
        key_file=tls_files.good.key,
        ca_file=tls_files.ca_file,
    ) as instance:
        yield instance


@pytest.fixture
def logged() -> Iterator[list[str]]:
    """Every line the queue runner logs, formatted as an operator reads it."""
    lines: list[str] = []

    @provider(ILogObserver)
    def observe(event: LogEvent) -> None:
        if event.get("log_namespace") == "txstarttls.delivery":
            lines.append(formatEvent(event))

    globalLogPublisher.addObserver(observe)
    yield lines
    globalLogPublisher.removeObserver(observe)


def pytest_report_header() -> str:
    """Say whether interop tests may skip, so a green CI run can be trusted."""
    mode = "must run" if interop_required() else "may skip"
    return f"interop tests: {mode} ({REQUIRE_INTEROP_ENV}={interop_required():d})"


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """Under TXSTARTTLS_REQUIRE_INTEROP=1 a skipped interop test is a failure.

    ``require_binary`` already fails instead of skipping in that mode; this
    catches every other way to skip (a skipif, an importorskip) so CI cannot
    go green without having talked to the real mail software.
    """
    report = yield
    if (
        report.skipped
        and interop_required()
        and item.get_closest_marker("interop") is not None
        and not hasattr(report, "wasxfail")
    ):
        reason = report.longrepr
        if isinstance(reason, tuple):  # (path, line, "Skipped: why")
            reason = reason[2]
        report.outcome = "failed"
        report.longrepr = (
            f"interop test skipped although {REQUIRE_INTEROP_ENV}=1: {reason}"
        )
    return report
