"""Tests for txstarttls.address: nothing unsafe reaches a command line."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from txstarttls.address import (
    MAX_DOMAIN,
    MAX_LOCAL_PART,
    MAX_PATH,
    format_path,
    needs_smtputf8,
    validate_address,
    validate_hostname_argument,
    validate_parameter,
    validate_text_argument,
)
from txstarttls.errors import InvalidAddress, InvalidArgument, LocalError, Phase

# --- command injection (SECURITY-CASES 14) --------------------------------------------

INJECTIONS = [
    "a@x.example\r\nRCPT TO:<evil@y.example>",
    "b@y.example>\nDATA",
    "a@x.example\nRCPT TO:evil@y.example",
    "a@x.example\rRSET",
    "a\r\n@x.example",
    "a@x.example\x00",
    "a@x.ex\x00ample",
    "a@x.example\x1b[2J",
    "a@x.example\x7f",
    "a@x.example\t",
    "a@x.example\x0b",
    "a@x.example\x85",
    "a@x.example\u2028RSET",
    '"a\r\nRSET"@x.example',
    '"a\nb"@x.example',
    "a@[1.2.3.4\r\nRSET]",
]


@pytest.mark.parametrize("address", INJECTIONS)
def test_command_injection_through_address_is_refused(address: str) -> None:
    with pytest.raises(InvalidAddress) as info:
        validate_address(address)
    message = str(info.value)
    assert "\r" not in message
    assert "\n" not in message
    assert "\x00" not in message
    assert isinstance(info.value, LocalError)
    assert info.value.phase is Phase.LOCAL
    assert info.value.is_permanent


def test_injection_message_shows_the_value_escaped() -> None:
    with pytest.raises(InvalidAddress) as info:
        validate_address("a@x.example\r\nRCPT TO:<evil@y.example>")
    message = str(info.value)
    assert "a@x.example\\r\\nRCPT TO:<evil@y.example>" in message
    assert "control character \\r" in message


def test_command_injection_through_format_path_is_refused() -> None:
    with pytest.raises(InvalidAddress):
        format_path("a@x.example\r\nRCPT TO:<evil@y.example>")
    with pytest.raises(InvalidAddress):
        format_path("b@y.example>\nDATA")


@pytest.mark.parametrize(
    "address",
    [
        "b@y.example>",
        "<b@y.example>",
        "b<c@y.example",
        "b@y.ex<ample",
        '"a>b"@x.example',
    ],
)
def test_angle_brackets_are_refused_anywhere(address: str) -> None:
    with pytest.raises(InvalidAddress, match="< or >"):
        validate_address(address)


@given(
    st.text(max_size=10),
    st.sampled_from("\r\n\x00\x01\x1f\x7f"),
    st.text(max_size=10),
)
@settings(max_examples=200)
def test_control_character_anywhere_is_refused(
    before: str, control: str, after: str
) -> None:
    for address in (
        f"{before}{control}{after}@x.example",
        f"user@x.example{before}{control}{after}",
        f'"{before}{control}{after}"@x.example',
    ):
        with pytest.raises(InvalidAddress):
            validate_address(address)


# --- shape ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("address", "reason"),
    [
        ("", "empty"),
        ("user", "missing @"),
        ("user.example.com", "missing @"),
        ("@x.example", "source route"),
        ("@a:b@c.example", "source route"),
        ("@a,@b:c@d.example", "source route"),
        ("user@", "empty domain"),
        ("a b@x.example", "whitespace"),
        ("ab@x .example", "whitespace"),
        ("ab @x.example", "whitespace"),
        (" ab@x.example", "whitespace"),
        ("ab@x.example ", "whitespace"),
        ("a\u00a0b@x.example", "non-printable"),
        ("a\u200bb@x.example", "non-printable"),
        ("a\udc80b@x.example", "non-printable"),
        (".a@x.example", "malformed local part"),
        ("a.@x.example", "malformed local part"),
        ("a..b@x.example", "malformed local part"),
        ("a(b)@x.example", "malformed local part"),
        ("a,b@x.example", "malformed local part"),
        ("a:b@x.example", "malformed local part"),
        ("a@b@x.example", "malformed local part"),
        ("a\\b@x.example", "malformed local part"),
        ('"unclosed@x.example', "malformed local part"),
        ('"a"b@x.example', "malformed local part"),
        ('"a\\"@x.example', "malformed local part"),
        ('"a"b"@x.example', "malformed local part"),
        ("a@x..example", "malformed domain"),
        ("a@.x.example", "malformed domain"),
        ("a@x.example.", "malformed domain"),
        ("a@-x.example", "malformed domain"),
        ("a@x-.example", "malformed domain"),
        ("a@x_y.example", "malformed domain"),
        ("a@x.example:25", "malformed domain"),
        ("a@x/y.example", "malformed domain"),
        ("a@x%y.example", "malformed domain"),
        ("a@[1.2.3.4", "malformed address literal"),
        ("a@[1.2.3.256]", "IPv4"),
        ("a@[01.2.3.4]", "IPv4"),
        ("a@[1.2.3]", "address literal"),
        ("a@[1.2.3.4.5]", "address literal"),
        ("a@[]", "address literal"),
        ("a@[x.example]", "address literal"),
        ("a@[IPv6:1:2:3]", "IPv6"),
        ("a@[IPv6:fe80::1%eth0]", "IPv6"),
        ("a@[IPv6:::g]", "IPv6"),
        ("a@[IPv6:1.2.3.4]", "IPv6"),
        ("a@[::1]", "address literal"),
        ("a@[tag:content]", "address literal"),
        ("a@[1.2.3.4]x", "address literal"),
    ],
)
def test_malformed_address_is_refused(address: str, reason: str) -> None:
    with pytest.raises(InvalidAddress, match=reason):
        validate_address(address)


@pytest.mark.parametrize(
    "address",
    [
        "user@example.com",
        "first.last@sub.example.co.uk",
        "a@b",
        "x@localhost",
        "user+tag@example.com",
        "!#$%&'*+-/=?^_`{|}~@example.com",
        "x%external.example@relay.example",
        "1@123.example",
        "a@xn--bcher-kva.example",
        "a@a-b--c.example",
        '"john doe"@example.com',
        '"a@b"@example.com',
        '"with \\" quote"@example.com',
        '"back\\\\slash"@example.com',
        '"a.."@example.com',
        '""@example.com',
        '"a()<"@example.com'.replace("<", ":"),
        "a@[192.0.2.1]",
        "a@[IPv6:2001:db8::1]",
        "a@[IPv6:::1]",
        "a@[ipv6:2001:DB8::1]",
        "a@[IPv6:::ffff:192.0.2.1]",
        "a@[IPv6:2001:db8:0:0:0:0:0:1]",
        "jörg@bücher.example",
        "用户@例子.广告",
        "δοκιμή@παράδειγμα.δοκιμή",
    ],
)
def test_valid_address_is_returned_unchanged(address: str) -> None:
    assert validate_address(address) is address


def test_null_sender_only_when_allowed() -> None:
    with pytest.raises(InvalidAddress, match="empty"):
        validate_address("")
    assert validate_address("", allow_null=True) == ""


def test_quoted_local_part_may_contain_at_and_split_is_at_last_at() -> None:
    assert validate_address('"a@b.example"@c.example') == '"a@b.example"@c.example'
    with pytest.raises(InvalidAddress):
        validate_address('"a"@b.example@c.example')


# --- lengths in UTF-8 octets (RFC 5321 section 4.5.3.1) -------------------------------


def test_local_part_limit_is_64_octets() -> None:
    assert validate_address("a" * MAX_LOCAL_PART + "@x.example")
    with pytest.raises(InvalidAddress, match="65 octets"):
        validate_address("a" * (MAX_LOCAL_PART + 1) + "@x.example")


def test_local_part_limit_counts_utf8_octets_not_characters() -> None:
    assert validate_address("é" * 32 + "@x.example")
    with pytest.raises(InvalidAddress, match="66 octets"):
        validate_address("é" * 33 + "@x.example")  # 33 characters, 66 octets


def _domain(octets: int, label_char: str = "a") -> str:
    """A domain of exactly ``octets`` octets made of labels of at most 63."""
    width = len(label_char.encode())
    labels = []
    remaining = octets
    while remaining > 0:
        size = min(61, remaining - 2) if remaining > 63 else remaining
        labels.append(label_char * (size // width))
        remaining -= size + 1
    domain = ".".join(labels)
    assert len(domain.encode()) == octets
    return domain


def test_domain_limit_is_255_octets() -> None:
    # A 255-octet domain never fits in a 256-octet path; the longest that
    # does is 252 octets, with a one-octet local part.
    assert validate_address("a@" + _domain(MAX_PATH - 4))
    with pytest.raises(InvalidAddress, match="domain is 256 octets"):
        validate_address("a@" + _domain(MAX_DOMAIN + 1))


def test_path_limit_is_256_octets_including_brackets() -> None:
    local = "a" * 64
    domain = _domain(MAX_PATH - 2 - 1 - 64)  # 189 octets: path is exactly 256
    address = f"{local}@{domain}"
    assert validate_address(address) is address
    assert len(format_path(address)) == MAX_PATH
    with pytest.raises(InvalidAddress, match="path"):
        validate_address(f"{local}@a{domain}")


def test_label_limit_is_63_octets() -> None:
    assert validate_address("a@" + "b" * 63 + ".example")
    with pytest.raises(InvalidAddress, match="label"):
        validate_address("a@" + "b" * 64 + ".example")


def test_label_limit_counts_utf8_octets() -> None:
    assert validate_address("a@" + "ü" * 31 + ".example")
    with pytest.raises(InvalidAddress, match="label"):
        validate_address("a@" + "ü" * 32 + ".example")  # 64 octets


def test_long_address_is_refused_never_truncated() -> None:
    address = "a" * 300 + "@x.example"
    with pytest.raises(InvalidAddress) as info:
        validate_address(address)
    assert len(str(info.value)) < 250


# --- SMTPUTF8 and the wire form -------------------------------------------------------


@pytest.mark.parametrize(
    ("address", "needed"),
    [
        ("user@example.com", False),
        ("", False),
        ("jörg@example.com", True),
        ("user@bücher.example", True),
        ('"ü"@example.com', True),
    ],
)
def test_needs_smtputf8(address: str, needed: bool) -> None:
    assert needs_smtputf8(address) is needed


def test_format_path() -> None:
    assert format_path("user@example.com") == b"<user@example.com>"
    assert format_path("") == b"<>"
    assert format_path("jörg@bücher.example") == "<jörg@bücher.example>".encode()
    assert format_path('"a b"@x.example') == b'<"a b"@x.example>'


# --- ESMTP parameters -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("keyword", "value", "expected"),
    [
        ("SIZE", "1000", "SIZE=1000"),
        ("BODY", "8BITMIME", "BODY=8BITMIME"),
        ("SMTPUTF8", None, "SMTPUTF8"),
        ("AUTH", "<>", "AUTH=<>"),
        ("ORCPT", "rfc822;a+2Bb@x.example", "ORCPT=rfc822;a+2Bb@x.example"),
        ("NOTIFY", "SUCCESS,FAILURE", "NOTIFY=SUCCESS,FAILURE"),
        ("X-Custom-1", "!~", "X-Custom-1=!~"),
        ("8", "x", "8=x"),
    ],
)
def test_valid_parameter(keyword: str, value: str | None, expected: str) -> None:
    assert validate_parameter(keyword, value) == expected


@pytest.mark.parametrize(
    ("keyword", "value"),
    [
        ("SIZE\r\nRSET", None),
        ("SIZE", "1000\r\nRSET"),
        ("SIZE", "1000\nDATA"),
        ("SIZE", "1 000"),
        ("SIZE", "a=b"),
        ("SIZE", ""),
        ("SIZE", "\x00"),
        ("SIZE", "\x7f"),
        ("ENVID", "é"),
        ("", None),
        ("-SIZE", None),
        ("SI ZE", None),
        ("SI=ZE", None),
        ("SIZE_X", None),
        ("ÉX", None),
        ("SIZE\n", None),
    ],
)
def test_parameter_injection_is_refused(keyword: str, value: str | None) -> None:
    with pytest.raises(InvalidArgument) as info:
        validate_parameter(keyword, value)
    assert "\n" not in str(info.value)
    assert "\r" not in str(info.value)


# --- EHLO/HELO argument ---------------------------------------------------------------


@pytest.mark.parametrize(
    "name",
    [
        "client.example.net",
        "localhost",
        "xn--bcher-kva.example",
        "[192.0.2.1]",
        "[IPv6:2001:db8::1]",
    ],
)
def test_valid_hostname_argument(name: str) -> None:
    assert validate_hostname_argument(name) is name


@pytest.mark.parametrize(
    "name",
    [
        "",
        "client.example\r\nMAIL FROM:<a@b.example>",
        "client\n",
        "client\x00",
        "client example",
        "client.example.",
        "bücher.example",
        "-client",
        "client_1",
        "[1.2.3.4",
        "[1.2.3.999]",
        "[IPv6:zz]",
        "a" * 64,
        ".".join(["a" * 63] * 4) + ".ab",
    ],
)
def test_invalid_hostname_argument_is_refused(name: str) -> None:
    with pytest.raises(InvalidArgument) as info:
        validate_hostname_argument(name)
    assert "\n" not in str(info.value)


# --- free text arguments (user names) -------------------------------------------------


def test_command_injection_through_username_is_refused() -> None:
    with pytest.raises(InvalidArgument) as info:
        validate_text_argument("u\r\nMAIL FROM:<m@z.example>", "user name")
    message = str(info.value)
    assert "user name" in message
    assert "\\r" in message
    assert "position 1" in message


def test_text_argument_error_never_shows_the_value() -> None:
    secret = "hunter2\x00more-secret"
    with pytest.raises(InvalidArgument) as info:
        validate_text_argument(secret, "password")
    assert "hunter2" not in str(info.value)
    assert "secret" not in str(info.value)


@pytest.mark.parametrize(
    "char",
    [
        "\r",
        "\n",
        "\x00",
        "\x01",
        "\x1b",
        "\x1f",
        "\t",
        "\x7f",
        "\x85",
        "\u2028",
        "\udc80",
    ],
)
def test_text_argument_refuses_controls(char: str) -> None:
    with pytest.raises(InvalidArgument):
        validate_text_argument(f"user{char}name", "user name")


@pytest.mark.parametrize("value", ["user", "user@example.com", "jörg", "a b", "", "☃"])
def test_text_argument_accepts_printable_text(value: str) -> None:
    assert validate_text_argument(value, "user name") is value
