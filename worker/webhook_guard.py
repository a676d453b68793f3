"""The SSRF guard of completion webhooks (worker.webhooks sends them): a host may receive a webhook
only when every address it resolves to is public, unless CARCERT_WEBHOOK_ALLOWED_HOSTS lists it.

Refused: loopback, link-local (169.254.0.0/16 with the cloud metadata address, fe80::/10),
multicast, unspecified, reserved, private (RFC 1918, fc00::/7, ...) and anything else Python's
`ipaddress` does not call global (e.g. 100.64.0.0/10); an IPv4-mapped IPv6 address is judged as its
IPv4 address. Standard library only, so the API can check at submit time without loading an HTTP
client."""

from __future__ import annotations

import ipaddress
import socket
from urllib.parse import urlsplit

from core.errors import InvalidInput
from store.settings import Settings, get_settings

ADDRESS_FLAGS = ("loopback", "link_local", "multicast", "unspecified", "reserved", "private")


class WebhookRefused(InvalidInput):
    """A webhook URL whose host is not allowed (a non-public address, or it does not resolve)."""


def address_refusal(address: str) -> str | None:
    """Why `address` may not receive a webhook ('loopback', 'private', ...), None for a public one."""
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    for flag in ADDRESS_FLAGS:
        if getattr(ip, f"is_{flag}"):
            return flag.replace("_", "-")
    return None if ip.is_global else "not globally routable"


def resolve_checked(host: str, port: int, settings: Settings) -> list[str]:
    """The addresses `host` resolves to (first one first), every one of them allowed; raises
    WebhookRefused when the host does not resolve or one address is not public and the host is not
    in CARCERT_WEBHOOK_ALLOWED_HOSTS."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as exc:
        raise WebhookRefused(f"webhook host {host!r} does not resolve: {exc}") from None
    addresses = list(dict.fromkeys(str(info[4][0]).split("%", 1)[0] for info in infos))
    if not addresses:
        raise WebhookRefused(f"webhook host {host!r} does not resolve")
    if host.lower().strip("[]") not in settings.webhook_allowed():
        for address in addresses:
            reason = address_refusal(address)
            if reason is not None:
                raise WebhookRefused(
                    f"webhook host {host!r} resolves to {address} ({reason} address); only public "
                    "addresses are allowed unless the host is listed in CARCERT_WEBHOOK_ALLOWED_HOSTS"
                )
    return addresses


def check_webhook_url(url: str, settings: Settings | None = None) -> None:
    """Submit-time check of a webhook URL (WebhookRefused when refused); every send checks again."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise WebhookRefused(f"webhook URL must be http(s) with a host: {url[:200]!r}")
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError as exc:
        raise WebhookRefused(f"webhook URL has an invalid port: {exc}") from None
    resolve_checked(parts.hostname, port, settings or get_settings())
