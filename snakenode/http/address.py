"""The `http` setting: `HOST:PORT`, `[V6]:PORT` or `off` (pure; used by config validation and the server)."""

from __future__ import annotations

import ipaddress

OFF = ("off", "none", "")


class HttpAddressError(ValueError):
    """A malformed `http` setting; the message shows the accepted forms."""


def parse_address(value: str) -> tuple[str, int] | None:
    """(host, port) to bind, or None when the server is disabled. The host must be an IP address: a name
    could resolve to a public interface by surprise, and the server is unauthenticated."""
    text = value.strip()
    if text.lower() in OFF:
        return None
    host, sep, port_text = text.rpartition(":")
    if not sep or not host:
        raise HttpAddressError(f"http address {value!r} must be HOST:PORT (e.g. 127.0.0.1:9464), [::1]:PORT "
                               f"or off")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise HttpAddressError(f"http address {value!r}: host {host!r} is not an IP address (use 127.0.0.1 "
                               f"for this machine only, 0.0.0.0 for every interface)") from None
    if not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise HttpAddressError(f"http address {value!r}: port must be 0-65535 (0 = any free port)")
    return host, int(port_text)


def is_loopback(host: str) -> bool:
    return ipaddress.ip_address(host).is_loopback
