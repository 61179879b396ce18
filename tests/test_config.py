"""Relay configuration: merging, checking, one-line errors naming the option."""

from __future__ import annotations

from pathlib import Path

import pytest

from txstarttls.config import (
    DEFAULT_LISTEN,
    OPTIONS,
    build_config,
    load_toml,
    reference_markdown,
)
from txstarttls.errors import ConfigurationError
from txstarttls.tls import TLSMode


def test_defaults() -> None:
    config = build_config({})
    assert config["listen"] == DEFAULT_LISTEN
    assert config["tls"] is TLSMode.REQUIRED
    assert config["allow"] == ("127.0.0.0/8", "::1/128")
    assert config["max-size"] == 10 * 1024 * 1024
    assert config["minimal-backoff"] == 300.0
    assert config["maximal-lifetime"] == 5 * 86400.0
    assert config["smarthost"] == ()


def test_command_line_wins_over_the_file(tmp_path: Path) -> None:
    path = tmp_path / "relay.toml"
    path.write_text(
        'listen = ["tcp:2526:interface=127.0.0.1"]\n'
        'smarthost = ["smtp.example.net:587"]\n'
        'max-size = "20M"\n'
        'tls = "opportunistic"\n'
    )
    config = build_config({"max-size": "1k", "listen": []}, load_toml(str(path)))
    assert config["listen"] == ("tcp:2526:interface=127.0.0.1",)
    assert config["smarthost"] == ("smtp.example.net:587",)
    assert config["max-size"] == 1024
    assert config["tls"] is TLSMode.OPPORTUNISTIC


@pytest.mark.parametrize(
    ("given", "message"),
    [
        ({"max-size": "lots"}, "--max-size: must be a positive integer"),
        ({"max-size": "0"}, "--max-size: must be a positive integer"),
        ({"tls": "sometimes"}, "--tls: unknown TLS mode"),
        ({"fingerprint": "abc"}, "--fingerprint: fingerprint must be"),
        ({"allow": ["10.0.0.0/33"]}, "--allow: not a network"),
        ({"minimal-backoff": "-1"}, "--minimal-backoff: must be >= 0"),
        ({"minimal-backoff": "5000"}, "--minimal-backoff must not exceed"),
        ({"bare-lf": "allow"}, "--bare-lf: must be one of reject, normalize"),
        ({"ca-file": "/nonexistent.pem"}, "--ca-file: no such file"),
        ({"inbound-cert": __file__}, "--inbound-cert and --inbound-key go together"),
        ({"username": "u"}, "--username needs --password-file"),
        ({"password-command": "echo x"}, "--password-command needs --username"),
        ({"max-concurrent": "2.5"}, "--max-concurrent: must be a positive integer"),
    ],
)
def test_bad_values_are_one_line_errors_naming_the_option(
    given: dict[str, object], message: str
) -> None:
    with pytest.raises(ConfigurationError) as raised:
        build_config(given)
    assert message in str(raised.value)
    assert "\n" not in str(raised.value)


def test_unknown_toml_keys_are_errors(tmp_path: Path) -> None:
    path = tmp_path / "relay.toml"
    path.write_text('smarthosts = ["typo.example"]\n')
    with pytest.raises(ConfigurationError, match="unknown setting 'smarthosts'"):
        load_toml(str(path))


def test_broken_toml_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "relay.toml"
    path.write_text("listen = [\n")
    with pytest.raises(ConfigurationError, match="not valid TOML"):
        load_toml(str(path))


def test_bad_value_types_in_toml(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match="--listen"):
        build_config({}, {"listen": [5]})
    with pytest.raises(ConfigurationError, match="--queue"):
        build_config({}, {"queue": ["a", "b"]})


def test_every_option_has_help_and_a_metavar() -> None:
    for option in OPTIONS:
        assert option.help and option.metavar


def test_configuration_reference_in_docs_matches_the_options() -> None:
    """docs/configuration.md is generated; regenerate it when options change:
    ``txstarttls config-reference > docs/configuration.md``."""
    docs = Path(__file__).resolve().parent.parent / "docs" / "configuration.md"
    assert docs.read_text() == reference_markdown()


BAD_VALUE_BY_PARSER = {
    "_text": "",
    "_optional_text": "",
    "_seconds": "soon",
    "_optional_seconds": "soon",
    "_positive": "0",
    "_size": "lots",
    "_count": "-1",
    "parse": "bogus",  # _choice(...) returns a closure named parse
    "_tls_mode": "bogus",
    "_fingerprint": "abc",
    "_readable_file": "/nonexistent/file",
    "_network": "300.1.1.1/8",
}


@pytest.mark.parametrize("option", OPTIONS, ids=lambda option: option.name)
def test_every_option_rejects_a_bad_value_in_one_line_naming_it(option: object) -> None:
    from txstarttls.config import Option

    assert isinstance(option, Option)
    bad = BAD_VALUE_BY_PARSER[option.parse.__name__]
    given = [bad] if option.repeatable else bad
    for source in ("command line", "file"):
        with pytest.raises(ConfigurationError) as raised:
            if source == "file":
                build_config({}, {option.name: given})
            else:
                build_config({option.name: given})
        message = str(raised.value)
        assert message.startswith(f"--{option.name}"), message
        assert "\n" not in message


@pytest.mark.parametrize("value", ["0", "1", "64"])
def test_listener_processes_takes_a_count_from_0_to_64(value: str) -> None:
    assert build_config({"listener-processes": value})["listener-processes"] == int(
        value
    )


@pytest.mark.parametrize("value", ["65", "two", "1.5", ""])
def test_listener_processes_out_of_range_is_one_line(value: str) -> None:
    with pytest.raises(ConfigurationError, match=r"^--listener-processes: must be"):
        build_config({"listener-processes": value})
