"""Tests for txstarttls.policy: who may relay, routing tricks, safe listeners."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given
from hypothesis import strategies as st

from txstarttls.policy import (
    DEFAULT_ALLOWED_NETWORKS,
    UnsafeListener,
    check_listener_safety,
    client_allowed,
    find_routing_trick,
    listener_interface,
    parse_networks,
    relay_decision,
    strip_source_route,
)

LABEL = st.from_regex(r"[a-z0-9]([a-z0-9-]{0,10}[a-z0-9])?", fullmatch=True)
DOMAIN = st.lists(LABEL, min_size=1, max_size=4).map(".".join)
LOCAL = st.from_regex(r"[A-Za-z0-9_+=-]{1,20}", fullmatch=True)
ADDRESS = st.tuples(LOCAL, DOMAIN).map("@".join)


# -- networks ------------------------------------------------------------------------


def test_parse_networks() -> None:
    assert parse_networks(["10.0.0.0/8", " ::1/128 ", "192.0.2.7"]) == (
        ipaddress.IPv4Network("10.0.0.0/8"),
        ipaddress.IPv6Network("::1/128"),
        ipaddress.IPv4Network("192.0.2.7/32"),
    )


@pytest.mark.parametrize("text", ["10.0.0.1/8", "localhost", "10.0.0.0/33", ""])
def test_parse_networks_refuses_junk_and_host_bits(text: str) -> None:
    with pytest.raises(ValueError, match="invalid allowed network"):
        parse_networks([text])


@pytest.mark.parametrize(
    ("address", "allowed"),
    [
        ("127.0.0.1", True),
        ("127.255.0.9", True),
        ("::1", True),
        ("::ffff:127.0.0.1", True),
        ("::ffff:192.0.2.1", False),
        ("192.0.2.1", False),
        ("::2", False),
        ("fe80::1%eth0", False),
        ("not an address", False),
        ("", False),
        (None, True),
    ],
)
def test_client_allowed_default_networks(address: str | None, allowed: bool) -> None:
    assert client_allowed(address, DEFAULT_ALLOWED_NETWORKS) is allowed


def test_client_allowed_custom_networks_and_zone_ids() -> None:
    networks = parse_networks(["192.0.2.0/24", "fe80::/10"])
    assert client_allowed("192.0.2.200", networks)
    assert client_allowed("fe80::1%eth0", networks)
    assert not client_allowed("127.0.0.1", networks)
    assert not client_allowed("192.0.2.1", ())


@given(st.ip_addresses())
def test_nothing_is_allowed_by_an_empty_list(address: object) -> None:
    assert not client_allowed(str(address), ())


# -- routing tricks ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "stripped"),
    [
        ("@relay.example:x@external.example", "x@external.example"),
        ("@a.example,@b.example:x@c.example", "x@c.example"),
        ("@[192.0.2.1]:x@c.example", "x@c.example"),
        ("x@c.example", "x@c.example"),
        ("@relay.example", "@relay.example"),
        ("@:x@c.example", "@:x@c.example"),
        ("@a.example,b.example:x@c.example", "@a.example,b.example:x@c.example"),
    ],
)
def test_strip_source_route(path: str, stripped: str) -> None:
    assert strip_source_route(path) == stripped


@given(st.lists(DOMAIN, min_size=1, max_size=4), ADDRESS)
def test_strip_source_route_removes_any_route(hops: list[str], address: str) -> None:
    route = ",".join(f"@{hop}" for hop in hops) + ":"
    assert strip_source_route(route + address) == address


@given(ADDRESS)
def test_plain_addresses_are_left_alone(address: str) -> None:
    assert strip_source_route(address) == address
    assert find_routing_trick(address) is None


@pytest.mark.parametrize(
    ("address", "trick"),
    [
        ("x%external.example@relay.example", "percent hack"),
        ("external.example!x@relay.example", "bang path"),
        ("x%y", "percent hack"),
        ("@relay.example:x@external.example", "source route"),
        ('"x@external.example"@relay.example', "quoted local part containing @"),
        ('"x%external.example"@relay.example', "quoted local part containing %"),
        ('"a!b"@relay.example', "quoted local part containing !"),
        ('"plain"@relay.example', None),
        ("x@external.example", None),
        ('"unterminated@x', None),
    ],
)
def test_find_routing_trick(address: str, trick: str | None) -> None:
    assert find_routing_trick(address) == trick


@given(st.text(max_size=80))
def test_untrusted_clients_never_relay_whatever_the_recipient(recipient: str) -> None:
    decision = relay_decision(
        client_trusted=False, authenticated=False, recipient=recipient
    )
    assert not decision.allowed
    assert decision.reason.startswith("relay access denied")


@given(st.text(max_size=80), st.booleans())
def test_trusted_or_authenticated_clients_relay(
    recipient: str, authenticated: bool
) -> None:
    decision = relay_decision(
        client_trusted=not authenticated,
        authenticated=authenticated,
        recipient=recipient,
    )
    assert decision.allowed


def test_denial_reason_names_the_trick() -> None:
    decision = relay_decision(
        client_trusted=False,
        authenticated=False,
        recipient="x%external.example@relay.example",
    )
    assert decision.reason == "relay access denied (percent hack)"


# -- listener safety -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("description", "interface"),
    [
        ("tcp:2525:interface=127.0.0.1", "127.0.0.1"),
        ("tcp:2525", "0.0.0.0"),
        ("tcp:port=2525:interface=192.0.2.1", "192.0.2.1"),
        ("tcp6:2525", "::"),
        (r"tcp6:2525:interface=\:\:1", "::1"),
        ("ssl:465:interface=127.0.0.1:privateKey=/k.pem", "127.0.0.1"),
        ("ssl:465:privateKey=/etc/a\\:b.pem", "0.0.0.0"),
        ("unix:/run/relay.sock", None),
        ("UNIX:/run/relay.sock:mode=600", None),
        ("systemd:domain=INET:index=0", "*"),
        ("2525", "0.0.0.0"),
    ],
)
def test_listener_interface(description: str, interface: str | None) -> None:
    assert listener_interface(description) == interface


@pytest.mark.parametrize(
    "listeners",
    [
        ["tcp:2525:interface=127.0.0.1"],
        ["tcp:2525:interface=127.0.0.2", r"tcp6:2525:interface=\:\:1"],
        ["unix:/run/relay.sock"],
        ["tcp:2525:interface=localhost"],
        [],
    ],
)
def test_loopback_listeners_are_safe_by_default(listeners: list[str]) -> None:
    check_listener_safety(listeners, DEFAULT_ALLOWED_NETWORKS, False)


@pytest.mark.parametrize(
    "listener",
    [
        "tcp:2525",
        "tcp:2525:interface=0.0.0.0",
        "tcp6:2525",
        "tcp:2525:interface=192.0.2.1",
        "ssl:465",
        "systemd:domain=INET:index=0",
        "tcp:2525:interface=mail.example",
    ],
)
def test_public_listener_without_auth_or_networks_is_refused(listener: str) -> None:
    with pytest.raises(UnsafeListener, match="neither AUTH"):
        check_listener_safety(
            ["tcp:2525:interface=127.0.0.1", listener], DEFAULT_ALLOWED_NETWORKS, False
        )


def test_unsafe_listener_is_a_value_error() -> None:
    assert issubclass(UnsafeListener, ValueError)


def test_public_listener_with_auth_or_a_network_is_allowed() -> None:
    check_listener_safety(["tcp:2525"], DEFAULT_ALLOWED_NETWORKS, True)
    check_listener_safety(
        ["tcp:2525"],
        (*DEFAULT_ALLOWED_NETWORKS, *parse_networks(["10.0.0.0/8"])),
        False,
    )


@pytest.mark.parametrize("network", ["0.0.0.0/0", "::/0"])
def test_whole_internet_as_allowed_network_is_refused(network: str) -> None:
    with pytest.raises(UnsafeListener, match="open relay"):
        check_listener_safety(
            ["tcp:2525:interface=127.0.0.1"], parse_networks([network]), True
        )


def test_loopback_only_networks_do_not_count_as_a_decision() -> None:
    networks = parse_networks(["127.0.0.0/8", "::1/128", "127.1.0.0/16"])
    with pytest.raises(UnsafeListener):
        check_listener_safety(["tcp:2525"], networks, False)
