"""twistd plugin: ``twistd -n starttls-relay``. Imports nothing heavy until used."""

from twisted.application.service import ServiceMaker

starttls_relay = ServiceMaker(  # type: ignore[no-untyped-call]
    "txstarttls relay",
    "txstarttls.tap",
    "SMTP relay: queue locally, deliver over verified STARTTLS with AUTH",
    "starttls-relay",
)
