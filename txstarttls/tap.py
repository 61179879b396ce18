"""``twistd starttls-relay``: options and makeService.

The options are generated from ``txstarttls.config.OPTIONS``, so the command
line, the TOML file and the documentation cannot drift apart. Every setting
is checked in ``postOptions``: a mistake is one line and a non-zero exit
before anything listens.
"""

from __future__ import annotations

from typing import Any

from twisted.application.service import IService
from twisted.python import usage

from txstarttls.config import OPTIONS, Option, RelayConfig, build_config, load_toml
from txstarttls.errors import ConfigurationError


class Options(usage.Options):
    synopsis = "[options]"
    longdesc = (
        "An SMTP relay for local and legacy programs: it queues each message "
        "durably and delivers it to the smarthost(s) over verified STARTTLS with "
        "AUTH. Without --smarthost it delivers to a built-in local test upstream."
    )
    optParameters = [
        [
            "config",
            None,
            None,
            "TOML file with the same settings (the command line wins)",
        ],
    ]

    def __init__(self) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.given: dict[str, Any] = {}
        self.config: RelayConfig | None = None

    def postOptions(self) -> None:
        try:
            file_settings = load_toml(self["config"]) if self["config"] else None
            self.config = build_config(self.given, file_settings)
            from twisted.internet import reactor

            from txstarttls.service import build_relay_service

            self.service = build_relay_service(reactor, self.config)
        except ConfigurationError as error:
            raise usage.UsageError(str(error)) from None


def _handler(option: Option) -> Any:
    if option.repeatable:

        def add(self: Options, value: str) -> None:
            self.given.setdefault(option.name, []).append(value)

        handler = add
    else:

        def set_value(self: Options, value: str) -> None:
            self.given[option.name] = value

        handler = set_value
    default = option.default
    shown = ", ".join(map(str, default)) if isinstance(default, tuple) else default
    suffix = f" [default: {shown}]" if shown not in (None, "", ()) else ""
    handler.__doc__ = option.help + suffix
    return handler


for _option in OPTIONS:
    setattr(Options, "opt_" + _option.name.replace("-", "_"), _handler(_option))


def makeService(options: Options) -> IService:
    """twistd's entry point: the service built (and checked) in postOptions."""
    service: IService = options.service
    return service
