"""The client's address behind trusted reverse proxies, taken from X-Forwarded-For."""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Iterable, Sequence

from litestar.types import ASGIApp, Receive, Scope, Send

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Address = ipaddress.IPv4Address | ipaddress.IPv6Address


def _parse_address(text: str) -> Address | None:
    """Return the address in `text`, with an IPv4-mapped IPv6 address as IPv4, or None."""
    try:
        address = ipaddress.ip_address(text.strip())
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
        return address.ipv4_mapped
    return address


def _is_trusted(address: Address, networks: Sequence[Network]) -> bool:
    return any(address in network for network in networks)


def client_address(peer: str, forwarded_for: Iterable[str], networks: Sequence[Network]) -> str:
    """Return the client's address for a request from `peer` with these X-Forwarded-For values.

    Each proxy appends the address it received the request from, so the entries left of a
    trusted proxy's own entry are whatever the client sent. Walking from the right, the
    first entry that is not a trusted proxy is the client. When `peer` is not trusted the
    header is ignored, and an entry that is not an IP address ends the walk at the last
    trusted hop, because nothing after it can be believed.
    """
    peer_address = _parse_address(peer)
    if peer_address is None or not _is_trusted(peer_address, networks):
        return peer
    entries = [entry for value in forwarded_for for entry in value.split(",") if entry.strip()]
    client = peer_address
    for entry in reversed(entries):
        address = _parse_address(entry)
        if address is None:
            break
        client = address
        if not _is_trusted(address, networks):
            break
    return str(client)


def trusted_proxies_middleware(networks: Sequence[Network]) -> Callable[[ASGIApp], ASGIApp]:
    """Make a middleware that puts the client's address in the scope for later readers.

    The per-address limits (`request.client`) and the request log read `scope["client"]`,
    so this middleware must run before both. The port of a forwarded client is unknown
    and set to 0.
    """

    def wrap(app: ASGIApp) -> ASGIApp:
        async def set_client(scope: Scope, receive: Receive, send: Send) -> None:
            peer = scope.get("client")
            if networks and scope["type"] in ("http", "websocket") and peer:
                forwarded_for = [
                    value.decode("latin-1")
                    for name, value in scope["headers"]
                    if name == b"x-forwarded-for"
                ]
                client = client_address(peer[0], forwarded_for, networks)
                if client != peer[0]:
                    scope["client"] = (client, 0)
            await app(scope, receive, send)

        return set_client

    return wrap
