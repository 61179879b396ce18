"""The relay's configuration: command line and TOML file, checked in one place.

Every option has one name, used both as ``--name`` and as the TOML key; the
command line wins over the file. Every error names the option and says what
is wrong in one line, before anything listens.
"""

from __future__ import annotations

import tomllib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from txstarttls.errors import ConfigurationError
from txstarttls.tls import TLSMode, parse_fingerprint

DEFAULT_LISTEN = ("tcp:2525:interface=127.0.0.1",)
DEFAULT_QUEUE = "/var/spool/txstarttls"
MAX_LISTENER_PROCESSES = 64


@dataclass(frozen=True, slots=True)
class Option:
    """One setting: its name, how to read it, its default, its help."""

    name: str
    parse: Callable[[str, Any], Any]
    default: Any
    help: str
    repeatable: bool = False
    metavar: str = "VALUE"


def _text(name: str, value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ConfigurationError(f"--{name}: must be a non-empty string, got {value!r}")
    if any(ord(c) < 32 for c in value):
        raise ConfigurationError(f"--{name}: must not contain control characters")
    return value


def _optional_text(name: str, value: Any) -> str | None:
    return None if value is None else _text(name, value)


def _seconds(name: str, value: Any) -> float:
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        raise ConfigurationError(
            f"--{name}: must be a number of seconds, got {value!r}"
        ) from None
    if not seconds >= 0 or seconds == float("inf"):
        raise ConfigurationError(f"--{name}: must be >= 0 seconds, got {value!r}")
    return seconds


def _optional_seconds(name: str, value: Any) -> float | None:
    return None if value is None else _seconds(name, value)


def _positive(name: str, value: Any) -> int:
    try:
        number = int(str(value), 10)
    except ValueError:
        raise ConfigurationError(
            f"--{name}: must be a positive integer, got {value!r}"
        ) from None
    if number < 1:
        raise ConfigurationError(f"--{name}: must be a positive integer, got {value!r}")
    return number


def _count(name: str, value: Any) -> int:
    try:
        number = int(str(value), 10)
    except ValueError:
        number = -1
    if not 0 <= number <= MAX_LISTENER_PROCESSES:
        raise ConfigurationError(
            f"--{name}: must be a whole number from 0 to {MAX_LISTENER_PROCESSES},"
            f" got {value!r}"
        )
    return number


def _size(name: str, value: Any) -> int:
    """Octets, with an optional k/M/G suffix (powers of 1024)."""
    text = str(value).strip()
    factor = {"k": 1024, "m": 1024**2, "g": 1024**3}.get(text[-1:].lower(), 1)
    digits = text[:-1] if factor > 1 else text
    return _positive(name, digits) * factor


def _choice(*choices: str) -> Callable[[str, Any], str]:
    def parse(name: str, value: Any) -> str:
        if value not in choices:
            raise ConfigurationError(
                f"--{name}: must be one of {', '.join(choices)}, got {value!r}"
            )
        return str(value)

    return parse


def _tls_mode(name: str, value: Any) -> TLSMode:
    try:
        return TLSMode.parse(str(value))
    except ConfigurationError as error:
        raise ConfigurationError(f"--{name}: {error}") from None


def _fingerprint(name: str, value: Any) -> str | None:
    if value is None:
        return None
    try:
        return parse_fingerprint(str(value))
    except ConfigurationError as error:
        raise ConfigurationError(f"--{name}: {error}") from None


def _readable_file(name: str, value: Any) -> str | None:
    if value is None:
        return None
    path = Path(_text(name, value))
    if not path.is_file():
        raise ConfigurationError(f"--{name}: no such file: {path}")
    try:
        with path.open("rb"):
            pass
    except OSError as error:
        raise ConfigurationError(
            f"--{name}: cannot read {path}: {error.strerror}"
        ) from None
    return str(path)


def _network(name: str, value: Any) -> str:
    import ipaddress

    text = _text(name, value)
    try:
        ipaddress.ip_network(text, strict=False)
    except ValueError:
        raise ConfigurationError(
            f"--{name}: not a network like 192.0.2.0/24 or ::1, got {text!r}"
        ) from None
    return text


OPTIONS = (
    Option("listen", _text, DEFAULT_LISTEN, "where to accept SMTP (Twisted endpoint "
           "description)", repeatable=True, metavar="ENDPOINT"),
    Option("smarthost", _text, (), "upstream HOST[:PORT] or client endpoint "
           "description, in failover order (default: a built-in local test upstream)",
           repeatable=True, metavar="HOST[:PORT]"),
    Option("tls", _tls_mode, TLSMode.REQUIRED, "TLS to the smarthost: required, "
           "opportunistic, implicit or none", metavar="MODE"),
    Option("tls-hostname", _optional_text, None, "name the smarthost certificate must "
           "carry (default: the smarthost host)", metavar="NAME"),
    Option("ca-file", _readable_file, None, "CA certificates to trust for the "
           "smarthost instead of the system's", metavar="PEM"),
    Option("fingerprint", _fingerprint, None, "pin the smarthost certificate "
           "(SHA-256, 64 hex digits)", metavar="SHA256"),
    Option("username", _optional_text, None, "AUTH user name at the smarthost",
           metavar="NAME"),
    Option("password-file", _readable_file, None, "file holding the smarthost "
           "password (one trailing newline ignored)", metavar="FILE"),
    Option("password-command", _optional_text, None, "command printing the smarthost "
           "password, run at start", metavar="CMD"),
    Option("oauth2-token-command", _optional_text, None, "command printing an OAuth2 "
           "token, run for each connection (XOAUTH2/OAUTHBEARER)", metavar="CMD"),
    Option("queue", _text, DEFAULT_QUEUE, "queue directory", metavar="DIR"),
    Option("allow", _network, ("127.0.0.0/8", "::1/128"), "client network allowed to "
           "relay without AUTH; when given, replaces the loopback default",
           repeatable=True, metavar="NETWORK"),
    Option("inbound-cert", _readable_file, None, "certificate (PEM) for STARTTLS on "
           "the listeners", metavar="PEM"),
    Option("inbound-key", _readable_file, None, "private key (PEM) for --inbound-cert",
           metavar="PEM"),
    Option("users", _readable_file, None, "users file for AUTH on the listeners "
           "(txstarttls passwd)", metavar="FILE"),
    Option("hostname", _optional_text, None, "this relay's name in greetings, "
           "Received: and bounces (default: the host's name)", metavar="NAME"),
    Option("max-size", _size, 10 * 1024 * 1024, "largest message accepted, octets "
           "(k, M, G suffixes)", metavar="SIZE"),
    Option("minimal-backoff", _seconds, 300.0, "shortest wait before a retry",
           metavar="SECONDS"),
    Option("maximal-backoff", _seconds, 4000.0, "longest wait before a retry",
           metavar="SECONDS"),
    Option("maximal-lifetime", _seconds, 5 * 86400.0, "give up and bounce after this "
           "long in the queue", metavar="SECONDS"),
    Option("delay-warning", _optional_seconds, None, "warn the sender once after "
           "this long (default: never)", metavar="SECONDS"),
    Option("max-concurrent", _positive, 20, "deliveries in flight at once",
           metavar="N"),
    Option("max-connections", _positive, 8, "sessions per smarthost", metavar="N"),
    Option("rewrite-sender", _optional_text, None, "envelope sender to use instead "
           "of the client's (not for bounces)", metavar="ADDR"),
    Option("rewrite-from", _optional_text, None, "address to put in the From: "
           "header", metavar="ADDR"),
    Option("bare-lf", _choice("reject", "normalize"), "reject", "bare CR or LF in "
           "DATA: reject (550 5.5.2) or normalize to CRLF", metavar="POLICY"),
    Option("metrics", _optional_text, None, "serve Prometheus metrics here "
           "(endpoint description)", metavar="ENDPOINT"),
    Option("listener-processes", _count, 0, "accept SMTP in N child processes "
           "sharing the listening sockets and the queue, each with its own "
           "event loop and queue writer (0: in the relay process; ssl: "
           "listeners always stay in the relay process)", metavar="N"),
)  # fmt: skip

_BY_NAME = {option.name: option for option in OPTIONS}


@dataclass(frozen=True, slots=True)
class RelayConfig:
    """Every setting, parsed and checked; keyed by option name."""

    values: Mapping[str, Any] = field(default_factory=dict)

    def __getitem__(self, name: str) -> Any:
        return self.values[name]


def load_toml(path: str) -> dict[str, Any]:
    """The settings in a TOML file, keys as the option names."""
    try:
        with open(path, "rb") as file:
            document = tomllib.load(file)
    except OSError as error:
        raise ConfigurationError(
            f"--config: cannot read {path}: {error.strerror}"
        ) from None
    except tomllib.TOMLDecodeError as error:
        raise ConfigurationError(
            f"--config: {path} is not valid TOML: {error}"
        ) from None
    for key in document:
        if key not in _BY_NAME:
            raise ConfigurationError(f"--config: unknown setting {key!r} in {path}")
    return document


def build_config(
    command_line: Mapping[str, Any], file_settings: Mapping[str, Any] | None = None
) -> RelayConfig:
    """Merge file and command line (which wins), parse and check everything.

    ``command_line`` holds only what the user gave (None or absent otherwise);
    repeatable options are lists.
    """
    values: dict[str, Any] = {}
    for option in OPTIONS:
        given = command_line.get(option.name)
        if given in (None, [], ()):
            given = (file_settings or {}).get(option.name)
        values[option.name] = _parse(option, given)
    _check_together(values)
    return RelayConfig(values)


def _parse(option: Option, given: Any) -> Any:
    if given is None or (option.repeatable and given in ([], ())):
        return option.default
    if option.repeatable:
        items: Sequence[Any] = [given] if isinstance(given, str) else given
        if not isinstance(items, list | tuple):
            raise ConfigurationError(f"--{option.name}: must be a list, got {given!r}")
        return tuple(option.parse(option.name, item) for item in items)
    return option.parse(option.name, given)


def _check_together(values: Mapping[str, Any]) -> None:
    if (values["inbound-cert"] is None) != (values["inbound-key"] is None):
        raise ConfigurationError("--inbound-cert and --inbound-key go together")
    secrets = [
        name
        for name in ("password-file", "password-command", "oauth2-token-command")
        if values[name] is not None
    ]
    if len(secrets) > 1:
        raise ConfigurationError(f"--{secrets[0]} and --{secrets[1]}: give only one")
    if secrets and values["username"] is None:
        raise ConfigurationError(f"--{secrets[0]} needs --username")
    if values["username"] is not None and not secrets:
        raise ConfigurationError(
            "--username needs --password-file, --password-command or "
            "--oauth2-token-command"
        )
    if values["minimal-backoff"] > values["maximal-backoff"]:
        raise ConfigurationError("--minimal-backoff must not exceed --maximal-backoff")
    if not values["smarthost"] and values["username"] is not None:
        raise ConfigurationError("--username needs --smarthost")


def reference_markdown() -> str:
    """docs/configuration.md, generated from OPTIONS so it cannot drift."""
    lines = [
        "# Configuration reference",
        "",
        "<!-- Generated by `txstarttls config-reference`; a test keeps it in step"
        " with the code. -->",
        "",
        "Every setting of `twistd starttls-relay` is a command-line option"
        " `--NAME VALUE` and a key `NAME = VALUE` in the TOML file given with"
        " `--config FILE`; the command line wins. Repeatable options are lists"
        " in TOML. Unknown keys and bad values stop the relay at start with one"
        " line naming the option.",
        "",
        "| option | value | default | meaning |",
        "| --- | --- | --- | --- |",
    ]
    for option in OPTIONS:
        default = option.default
        if isinstance(default, tuple):
            shown = ", ".join(f"`{item}`" for item in default) or "none"
        elif isinstance(default, TLSMode):
            shown = f"`{default.value}`"
        elif default is None:
            shown = "none"
        else:
            shown = f"`{default}`"
        value = option.metavar + (" (repeatable)" if option.repeatable else "")
        lines.append(f"| `--{option.name}` | {value} | {shown} | {option.help} |")
    lines += [
        "",
        "Example `relay.toml`:",
        "",
        "```toml",
        'listen = ["tcp:2525:interface=127.0.0.1", "unix:/run/txstarttls/smtp.sock"]',
        'smarthost = ["smtp.example.net:587"]',
        'username = "relay@example.net"',
        'password-file = "/etc/txstarttls/password"',
        'queue = "/var/spool/txstarttls"',
        'rewrite-sender = "relay@example.net"',
        "```",
        "",
    ]
    return "\n".join(lines)
