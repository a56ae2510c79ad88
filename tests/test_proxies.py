"""Client addresses behind trusted proxies: X-Forwarded-For is believed only from them."""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import replace
from pathlib import Path

import httpx
import pytest

from gallery.embedded import free_port
from gallery.proxies import client_address
from gallery.settings import Settings, SettingsError
from tests.support import gallery_process

PROXY = "10.0.0.5"
NETWORKS = Settings(trusted_proxies="10.0.0.5,192.168.1.0/24,fd00::/8").trusted_proxy_networks


@pytest.mark.parametrize(
    ("peer", "forwarded_for", "expected"),
    [
        # A client that reaches the app directly cannot choose its address.
        ("203.0.113.9", ["198.51.100.1"], "203.0.113.9"),
        ("203.0.113.9", [], "203.0.113.9"),
        # One trusted proxy: its entry is the client it received the request from.
        (PROXY, ["198.51.100.1"], "198.51.100.1"),
        # Entries left of the proxy's own are the client's, and may be forged.
        (PROXY, ["6.6.6.6, 198.51.100.1"], "198.51.100.1"),
        # Two trusted proxies in a chain are both skipped.
        (PROXY, ["6.6.6.6, 198.51.100.1, 192.168.1.20"], "198.51.100.1"),
        # Two header lines count as one list, in order.
        (PROXY, ["6.6.6.6", "198.51.100.1"], "198.51.100.1"),
        # A trusted proxy that sent no header is the client.
        (PROXY, [], PROXY),
        # Every entry a trusted proxy: the leftmost is as far as the chain goes.
        (PROXY, ["192.168.1.7, 192.168.1.20"], "192.168.1.7"),
        # An entry that is not an address ends the walk at the last trusted hop.
        (PROXY, ["198.51.100.1, unknown"], PROXY),
        (PROXY, ["198.51.100.1, unknown, 192.168.1.20"], "192.168.1.20"),
        # IPv6, and an IPv4 peer seen on a dual-stack socket.
        ("fd00::1", ["2001:db8::7"], "2001:db8::7"),
        ("::ffff:10.0.0.5", ["198.51.100.1"], "198.51.100.1"),
        # The peer of Litestar's test client is not an address at all.
        ("testclient", ["198.51.100.1"], "testclient"),
    ],
)
def test_client_address(peer, forwarded_for, expected):
    assert client_address(peer, forwarded_for, NETWORKS) == expected


def test_no_trusted_proxies_ignores_header():
    assert client_address("127.0.0.1", ["198.51.100.1"], ()) == "127.0.0.1"


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("proxy.example", "'proxy.example' does not appear to be an IPv4 or IPv6 network"),
        ("10.0.0.5/24", "10.0.0.5/24 has host bits set"),
        ("10.0.0.5,*", "'*' does not appear"),
    ],
)
def test_invalid_trusted_proxies_fail_at_start(value, message):
    with pytest.raises(SettingsError) as error:
        Settings.from_env({"GALLERY_TRUSTED_PROXIES": value})

    assert str(error.value).startswith(f"GALLERY_TRUSTED_PROXIES={value!r} is invalid")
    assert message in str(error.value)


def test_trusted_proxies_accept_addresses_and_networks():
    settings = Settings.from_env({"GALLERY_TRUSTED_PROXIES": " 10.0.0.5, 192.168.1.0/24,,::1 "})

    assert [str(network) for network in settings.trusted_proxy_networks] == [
        "10.0.0.5/32",
        "192.168.1.0/24",
        "::1/128",
    ]


@pytest.fixture
def serve(settings, tmp_path) -> Iterator[Callable[[str], httpx.Client]]:
    """Hand over a factory that runs `gallery serve` with these trusted proxies.

    Requests reach uvicorn from 127.0.0.1, as from a proxy on the same machine. The sign-in
    limit per address is 3, and the counts that earlier tests left are cleared first.
    """
    stack = ExitStack()

    def start(trusted_proxies: str) -> httpx.Client:
        port = free_port()
        app_settings = replace(
            settings,
            port=port,
            signin_failures_per_address=3,
            trusted_proxies=trusted_proxies,
            log_format="json",
        )
        log_path = tmp_path / f"serve-{port}.log"
        stack.enter_context(gallery_process("serve", app_settings, log_path))
        client = stack.enter_context(httpx.Client(base_url=f"http://127.0.0.1:{port}"))
        _wait_until_up(client, log_path)
        return client

    with stack:
        yield start


def _wait_until_up(client: httpx.Client, log_path: Path) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            client.get("/healthz")
            return
        except httpx.TransportError:
            time.sleep(0.2)
    raise AssertionError(f"gallery serve did not start:\n{log_path.read_text()}")


@pytest.fixture
async def clear_signin_counts(redis):
    for key in await redis.keys("gallery:limit:signin:*"):
        await redis.delete(key)


def _fail_sign_in(client: httpx.Client, forwarded_for: str) -> int:
    client.get("/signin")
    response = client.post(
        "/signin",
        data={"username": f"nobody{secrets.token_hex(4)}", "password": "wrong password"},
        headers={"x-csrftoken": client.cookies["csrftoken"], "x-forwarded-for": forwarded_for},
    )
    return response.status_code


def _request_log_clients(log_path: Path) -> list[str]:
    lines = [json.loads(line) for line in log_path.read_text().splitlines() if line[:1] == "{"]
    return [line["client"] for line in lines if line["logger"] == "gallery.requests"]


@pytest.mark.usefixtures("clear_signin_counts")
async def test_spoofed_header_from_untrusted_peer_changes_nothing(serve, tmp_path):
    client = serve("")

    statuses = [_fail_sign_in(client, f"198.51.100.{n}") for n in range(4)]

    assert statuses == [400, 400, 400, 429]
    clients = _request_log_clients(next(tmp_path.glob("serve-*.log")))
    assert set(clients) == {"127.0.0.1"}


@pytest.mark.usefixtures("clear_signin_counts")
async def test_trusted_proxy_limits_each_real_client(serve, tmp_path):
    client = serve("127.0.0.1")

    first = [_fail_sign_in(client, "6.6.6.6, 198.51.100.1") for _ in range(4)]
    second = _fail_sign_in(client, "198.51.100.2")

    assert first == [400, 400, 400, 429]
    assert second == 400
    clients = _request_log_clients(next(tmp_path.glob("serve-*.log")))
    assert "198.51.100.1" in clients
    assert "198.51.100.2" in clients
    assert "6.6.6.6" not in clients
