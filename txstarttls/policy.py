"""Who may relay through the listener, and whether a listener is safe to open.

Pure code (no Twisted, no I/O). The relay has no local domains: a client in
the allowed networks, or an authenticated one, may send anywhere; anyone else
may send nowhere. Routing tricks (``%``, ``!``, source routes, quoted local
parts holding ``@``) therefore never help an untrusted client: they are
refused like any other recipient (SECURITY-CASES 22). They are still
recognised, so the refusal can say why and a trusted client's source route
can be dropped (RFC 5321 sections 3.6.1 and 4.1.1.3).
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable
from dataclasses import dataclass

__all__ = [
    "DEFAULT_ALLOWED_NETWORKS",
    "Network",
    "RelayDecision",
    "UnsafeListener",
    "check_listener_safety",
    "client_allowed",
    "find_routing_trick",
    "listener_interface",
    "parse_networks",
    "relay_decision",
    "strip_source_route",
]

Network = ipaddress.IPv4Network | ipaddress.IPv6Network

DEFAULT_ALLOWED_NETWORKS: tuple[Network, ...] = (
    ipaddress.IPv4Network("127.0.0.0/8"),
    ipaddress.IPv6Network("::1/128"),
)

# RFC 5321 section 4.1.2: A-d-l = At-domain *( "," At-domain ), then ":".
_SOURCE_ROUTE = re.compile(r"@[^,:@\s]+(?:,@[^,:@\s]+)*:")
# Twisted endpoint description fields: "\" escapes the next character.
_FIELD_SEPARATOR = re.compile(r"(?<!\\)(?:\\\\)*:")


class UnsafeListener(ValueError):
    """A listener would make the relay an open relay; refuse to start."""


@dataclass(frozen=True, slots=True)
class RelayDecision:
    """Whether one recipient may be relayed, and why (for the log)."""

    allowed: bool
    reason: str


def parse_networks(texts: Iterable[str]) -> tuple[Network, ...]:
    """Parse ``127.0.0.0/8``-style networks; a one-line ValueError on junk.

    Host bits must be zero (``10.0.0.1/8`` is refused): a typo there usually
    means the prefix length is wrong, and guessing widens the relay.
    """
    networks: list[Network] = []
    for text in texts:
        try:
            networks.append(ipaddress.ip_network(text.strip(), strict=True))
        except ValueError as error:
            raise ValueError(f"invalid allowed network {text!r}: {error}") from None
    return tuple(networks)


def _ip(address: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """Parse a peer address; IPv4-mapped IPv6 becomes IPv4, zones are dropped."""
    try:
        ip = ipaddress.ip_address(address.partition("%")[0])
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def client_allowed(address: str | None, networks: Iterable[Network]) -> bool:
    """Whether a client may relay without AUTH.

    ``None`` stands for a UNIX socket peer: only local processes that the
    socket's file permissions admit can connect, so they count as local.
    Anything that is not an IP address is refused.
    """
    if address is None:
        return True
    ip = _ip(address)
    if ip is None:
        return False
    return any(ip.version == network.version and ip in network for network in networks)


def strip_source_route(path: str) -> str:
    """Drop an RFC 5321 source route (``@a,@b:user@c`` -> ``user@c``).

    RFC 5321 section 4.1.1.3: servers SHOULD ignore source routes. Anything
    that is not a well-formed route is returned unchanged, so that address
    validation refuses it.
    """
    match = _SOURCE_ROUTE.match(path)
    if match is None:
        return path
    return path[match.end() :]


def find_routing_trick(address: str) -> str | None:
    """Name the routing trick in a recipient path, or None for a plain one.

    These forms ask the next hop to relay onward (the percent hack, UUCP bang
    paths, source routes) or hide a second address in a quoted local part.
    """
    if address.startswith("@"):
        return "source route"
    local, at, _ = address.rpartition("@")
    if not at:
        local = address
    if local.startswith('"'):
        inner = local[1:-1] if local.endswith('"') and len(local) > 1 else local[1:]
        for char, name in (("@", "@"), ("%", "%"), ("!", "!")):
            if char in inner:
                return f"quoted local part containing {name}"
        return None
    if "%" in local:
        return "percent hack"
    if "!" in local:
        return "bang path"
    return None


def relay_decision(
    *, client_trusted: bool, authenticated: bool, recipient: str
) -> RelayDecision:
    """Decide one RCPT: trusted or authenticated clients relay, nobody else.

    The recipient never widens the decision; it only makes the reason more
    precise for the log.
    """
    if authenticated:
        return RelayDecision(True, "authenticated")
    if client_trusted:
        return RelayDecision(True, "allowed network")
    trick = find_routing_trick(recipient)
    if trick is not None:
        return RelayDecision(False, f"relay access denied ({trick})")
    return RelayDecision(False, "relay access denied")


def _split_description(description: str) -> list[str]:
    fields = []
    start = 0
    for match in _FIELD_SEPARATOR.finditer(description):
        fields.append(description[start : match.end() - 1])
        start = match.end()
    fields.append(description[start:])
    return [re.sub(r"\\(.)", r"\1", field) for field in fields]


def listener_interface(description: str) -> str | None:
    """The address a Twisted endpoint description binds; None for a UNIX socket.

    ``tcp:2525`` binds every IPv4 interface (``0.0.0.0``) and ``tcp6:2525``
    every IPv6 one (``::``), as Twisted does. Endpoint types we do not know
    (systemd sockets, plugins) return ``"*"``: they count as public.
    """
    fields = _split_description(description.strip())
    kind = fields[0].lower() if len(fields) > 1 else "tcp"
    if kind == "unix":
        return None
    defaults = {"tcp": "0.0.0.0", "ssl": "0.0.0.0", "tcp6": "::"}
    if kind not in defaults:
        return "*"
    interface = defaults[kind]
    for field in fields[1:]:
        key, equals, value = field.partition("=")
        if equals and key == "interface":
            interface = value
    return interface


def _is_loopback(interface: str) -> bool:
    if interface.lower() == "localhost":
        return True
    ip = _ip(interface)
    return ip is not None and ip.is_loopback


def check_listener_safety(
    listen_addresses: Iterable[str],
    allowed_networks: Iterable[Network],
    auth_configured: bool,
) -> None:
    """Raise UnsafeListener rather than start an open relay by accident.

    A listener on anything but loopback (or a UNIX socket) needs either AUTH
    or an allowed network beyond loopback, i.e. a deliberate decision about
    who may relay. A network covering the whole address space (``0.0.0.0/0``
    or ``::/0``) is an open relay and is refused whatever else is set.
    """
    networks = tuple(allowed_networks)
    for network in networks:
        if network.prefixlen == 0:
            raise UnsafeListener(
                f"allowed network {network} admits every host on the Internet "
                "(an open relay); list the networks of your own clients"
            )
    beyond_loopback = any(not network.is_loopback for network in networks)
    if auth_configured or beyond_loopback:
        return
    for description in listen_addresses:
        interface = listener_interface(description)
        if interface is None or _is_loopback(interface):
            continue
        shown = "all interfaces" if interface in ("0.0.0.0", "::") else interface
        raise UnsafeListener(
            f"listener {description!r} binds {shown}, but neither AUTH (a users "
            "file) nor an allowed network beyond loopback is configured; bind "
            "127.0.0.1, or say who may relay"
        )
