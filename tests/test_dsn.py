"""Bounces and delay warnings parse as RFC 3464 reports and cannot be forged."""

from __future__ import annotations

import email
import email.policy
from email.message import EmailMessage, Message

import pytest

from txstarttls.dsn import (
    RecipientReport,
    ReportedMessage,
    build_report,
    original_headers,
)

ORIGINAL = (
    b"From: cron <cron@legacy.example>\r\nTo: a@example.net\r\n"
    b"Subject: nightly\r\n\r\nbody that must not be returned\r\n"
)


def report(**kwargs: object) -> EmailMessage:
    message = ReportedMessage(
        queue_id="18A2B3C4D5E6F",
        sender="cron@legacy.example",
        arrival_time=1_700_000_000.0,
        headers=original_headers(ORIGINAL),
    )
    recipients = [
        RecipientReport(
            "a@example.net",
            "failed",
            "5.1.1",
            diagnostic="550 5.1.1 No such user",
            remote_mta="smtp.example.net",
            orcpt="rfc822;a@example.net",
        ),
        RecipientReport("b@example.net", "failed", "5.0.0"),
    ]
    raw = build_report(
        message,
        recipients,
        reporting_mta="relay.legacy.example",
        postmaster="MAILER-DAEMON@relay.legacy.example",
        now=1_700_000_100.0,
        **kwargs,  # type: ignore[arg-type]
    )
    assert b"\r\n" in raw and b"\n" not in raw.replace(b"\r\n", b"")
    parsed = email.message_from_bytes(raw, policy=email.policy.default)
    assert isinstance(parsed, EmailMessage)
    return parsed


def status_blocks(parsed: EmailMessage) -> list[Message]:
    """The header blocks of the message/delivery-status part."""
    blocks = list(parsed.iter_parts())[1].get_payload()
    assert isinstance(blocks, list)
    return [block for block in blocks if isinstance(block, Message)]


def test_bounce_is_a_multipart_report_to_the_envelope_sender() -> None:
    parsed = report()
    assert parsed["To"].addresses[0].addr_spec == "cron@legacy.example"
    assert parsed.get_content_type() == "multipart/report"
    assert parsed.get_param("report-type") == "delivery-status"
    assert parsed["Auto-Submitted"] == "auto-replied"
    parts = list(parsed.iter_parts())
    assert [p.get_content_type() for p in parts] == [
        "text/plain",
        "message/delivery-status",
        "text/rfc822-headers",
    ]


def test_per_recipient_status_and_diagnostic() -> None:
    per_message, first, second = status_blocks(report())
    assert per_message["Reporting-MTA"] == "dns; relay.legacy.example"
    assert first["Final-Recipient"] == "rfc822; a@example.net"
    assert first["Action"] == "failed"
    assert first["Status"] == "5.1.1"
    assert first["Diagnostic-Code"] == "smtp; 550 5.1.1 No such user"
    assert first["Original-Recipient"] == "rfc822;a@example.net"
    assert second["Status"] == "5.0.0"


def test_original_headers_are_returned_but_not_the_body() -> None:
    headers_part = list(report().iter_parts())[2]
    text = headers_part.get_payload()
    assert isinstance(text, str)
    assert "Subject: nightly" in text
    assert "must not be returned" not in text


def test_delay_warning_says_delayed_and_until_when() -> None:
    parsed = report(delayed_until=1_700_432_000.0)
    assert "Delayed" in str(parsed["Subject"])
    assert "Will-Retry-Until" in status_blocks(parsed)[1]


def test_header_forging_through_a_hostile_diagnostic_is_impossible() -> None:
    message = ReportedMessage("Q1", "s@x.example", 0.0, b"Subject: x\r\n")
    evil = RecipientReport(
        "a@example.net",
        "failed",
        "5.0.0",
        diagnostic="550 no\r\nBcc: victim@example.org\r\n\r\nforged",
    )
    raw = build_report(
        message, [evil], reporting_mta="r.example", postmaster="p@r.example", now=0.0
    )
    assert b"\r\nBcc:" not in raw
    assert b"\r\nforged" not in raw


def test_a_report_needs_a_recipient() -> None:
    message = ReportedMessage("Q1", "s@x.example", 0.0, b"")
    with pytest.raises(ValueError, match="at least one recipient"):
        build_report(message, [], reporting_mta="r", postmaster="p@r", now=0.0)


def test_original_headers_of_a_message_without_body_or_with_bare_lf() -> None:
    assert original_headers(b"Subject: a\nX: b\n\nbody") == b"Subject: a\r\nX: b\r\n"
    assert original_headers(b"Subject: only") == b"Subject: only\r\n"
