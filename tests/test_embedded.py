"""Tests for the embedded SeaweedFS S3 and Valkey servers, run against the real binaries."""

import ipaddress
import os
import secrets
import socket
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis
from botocore.exceptions import ClientError

from gallery.embedded import EmbeddedRedis, EmbeddedS3, EmbeddedServerError

# The ports weed mini 4.48 opens when no flag sets them (HTTP ports and HTTP + 10000 gRPC).
WEED_DEFAULT_PORTS = {
    6060, 7333, 8181, 8333, 8888, 9101, 9333, 9340,
    18333, 18888, 19333, 19340, 23646, 33646,
}  # fmt: skip

APP_ORIGIN = "http://127.0.0.1:8000"


def _server_pids(root: Path) -> list[int]:
    """Return the ids of running processes whose working directory is `root`."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            working_directory = Path(os.readlink(entry / "cwd"))
        except OSError:
            continue
        if working_directory == root.resolve():
            pids.append(int(entry.name))
    return pids


def _server_pid(root: Path) -> int:
    pids = _server_pids(root)
    assert len(pids) == 1, f"expected one server process in {root}, found {pids}"
    return pids[0]


def _decode_proc_address(hex_address: str) -> tuple[str, int]:
    # /proc/net/tcp{,6} write the address as 32-bit words in host (little-endian) order.
    hex_host, hex_port = hex_address.split(":")
    raw = bytes.fromhex(hex_host)
    host_bytes = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
    return str(ipaddress.ip_address(host_bytes)), int(hex_port, 16)


def _listening_addresses(pid: int) -> set[tuple[str, int]]:
    """Return the (host, port) of each listening TCP socket of process `pid`."""
    socket_inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            socket_inodes.add(target.removeprefix("socket:[").removesuffix("]"))

    addresses = set()
    for table in ("tcp", "tcp6"):
        for line in Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]:
            fields = line.split()
            local_address, state, inode = fields[1], fields[3], fields[9]
            if state == "0A" and inode in socket_inodes:
                addresses.add(_decode_proc_address(local_address))
    return addresses


def _leftover_sockets(ports: dict[str, int]) -> list[Path]:
    return [
        path for port in ports.values() for path in Path("/tmp").glob(f"seaweedfs-*-{port}.sock")
    ]


def _new_s3(root: Path, **options: object) -> EmbeddedS3:
    return EmbeddedS3(
        root,
        access_key=secrets.token_hex(10).upper(),
        secret_key=secrets.token_urlsafe(30),
        **options,  # type: ignore[arg-type]  # keyword options of EmbeddedS3 only
    )


@pytest.fixture(scope="module")
def other_s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedS3]:
    """Hand over a second S3 server, which allows cross-origin requests from APP_ORIGIN only."""
    server = _new_s3(
        tmp_path_factory.mktemp("other-s3"),
        buckets=["photos"],
        allowed_origins=[APP_ORIGIN],
    )
    with server:
        yield server


def test_s3_signed_put_and_get_round_trip(s3_server: EmbeddedS3) -> None:
    client = s3_server.client()
    client.create_bucket(Bucket="round-trip")

    client.put_object(Bucket="round-trip", Key="a/b.jpg", Body=b"jpeg bytes")
    body = client.get_object(Bucket="round-trip", Key="a/b.jpg")["Body"].read()
    listing = client.list_objects_v2(Bucket="round-trip", Prefix="a/")

    assert body == b"jpeg bytes"
    assert [item["Key"] for item in listing["Contents"]] == ["a/b.jpg"]


def test_s3_anonymous_put_is_rejected(s3_server: EmbeddedS3) -> None:
    client = s3_server.client()
    client.create_bucket(Bucket="anonymous")

    response = httpx.put(f"{s3_server.endpoint_url}/anonymous/note.txt", content=b"hello")

    assert response.status_code == 403
    assert b"AccessDenied" in response.content
    with pytest.raises(ClientError) as raised:
        client.head_object(Bucket="anonymous", Key="note.txt")
    assert raised.value.response["Error"]["Code"] == "404"


def test_s3_anonymous_get_is_rejected(s3_server: EmbeddedS3) -> None:
    client = s3_server.client()
    client.create_bucket(Bucket="private")
    client.put_object(Bucket="private", Key="secret.jpg", Body=b"private bytes")

    response = httpx.get(f"{s3_server.endpoint_url}/private/secret.jpg")

    assert response.status_code == 403
    assert b"private bytes" not in response.content


def test_s3_presigned_post_upload_is_accepted(s3_server: EmbeddedS3) -> None:
    client = s3_server.client()
    client.create_bucket(Bucket="uploads")
    form = client.generate_presigned_post(
        "uploads", "new/1.jpg", Conditions=[["content-length-range", 1, 1000]], ExpiresIn=60
    )

    response = httpx.post(form["url"], data=form["fields"], files={"file": ("1.jpg", b"jpeg")})
    too_large = httpx.post(form["url"], data=form["fields"], files={"file": ("2.jpg", b"x" * 1001)})

    assert response.status_code == 204
    assert client.get_object(Bucket="uploads", Key="new/1.jpg")["Body"].read() == b"jpeg"
    assert too_large.status_code == 400
    assert b"EntityTooLarge" in too_large.content


def test_s3_listens_only_on_loopback_and_chosen_ports(s3_server: EmbeddedS3) -> None:
    addresses = _listening_addresses(_server_pid(s3_server.root))
    hosts = {host for host, _ in addresses}
    ports = {port for _, port in addresses}

    assert ("127.0.0.1", s3_server.ports["s3.port"]) in addresses
    assert hosts == {"127.0.0.1"}
    assert ports <= set(s3_server.ports.values())
    assert not ports & WEED_DEFAULT_PORTS


def test_s3_creates_requested_buckets_before_ready(other_s3_server: EmbeddedS3) -> None:
    buckets = other_s3_server.client().list_buckets()["Buckets"]

    assert [bucket["Name"] for bucket in buckets] == ["photos"]


def test_two_s3_servers_run_side_by_side(
    s3_server: EmbeddedS3, other_s3_server: EmbeddedS3
) -> None:
    first, second = s3_server.client(), other_s3_server.client()
    first.create_bucket(Bucket="side-by-side")
    second.create_bucket(Bucket="side-by-side")

    first.put_object(Bucket="side-by-side", Key="k", Body=b"first")
    second.put_object(Bucket="side-by-side", Key="k", Body=b"second")

    assert not set(s3_server.ports.values()) & set(other_s3_server.ports.values())
    assert first.get_object(Bucket="side-by-side", Key="k")["Body"].read() == b"first"
    assert second.get_object(Bucket="side-by-side", Key="k")["Body"].read() == b"second"


def test_s3_cors_allows_only_listed_origins(other_s3_server: EmbeddedS3) -> None:
    url = f"{other_s3_server.endpoint_url}/photos/new.jpg"
    preflight = {"Access-Control-Request-Method": "POST"}

    allowed = httpx.options(url, headers={**preflight, "Origin": APP_ORIGIN})
    other = httpx.options(url, headers={**preflight, "Origin": "http://localhost:9999"})

    assert allowed.status_code == 200
    assert allowed.headers["Access-Control-Allow-Origin"] == APP_ORIGIN
    assert other.status_code == 403
    assert "Access-Control-Allow-Origin" not in other.headers


def test_s3_restart_keeps_buckets_and_objects(tmp_path: Path) -> None:
    first = _new_s3(tmp_path, buckets=["photos"])
    with first:
        first.client().put_object(Bucket="photos", Key="kept.jpg", Body=b"kept")
    # A new server on the same root picks new ports, as a second `gallery dev` run does.
    second = EmbeddedS3(tmp_path, first.access_key, first.secret_key)

    with second:
        client = second.client()
        buckets = [bucket["Name"] for bucket in client.list_buckets()["Buckets"]]
        body = client.get_object(Bucket="photos", Key="kept.jpg")["Body"].read()

    assert second.endpoint_url != first.endpoint_url
    assert buckets == ["photos"]
    assert body == b"kept"


def test_s3_stop_ends_process_and_removes_sockets(tmp_path: Path) -> None:
    server = _new_s3(tmp_path)
    server.start()

    server.stop()
    server.stop()

    assert _server_pids(tmp_path) == []
    assert _leftover_sockets(server.ports) == []


def test_s3_start_timeout_names_server_log_and_error(tmp_path: Path) -> None:
    # S3 rejects this bucket name, so the server never becomes ready.
    server = _new_s3(tmp_path, buckets=["Not_A_Valid_Bucket"])

    with pytest.raises(EmbeddedServerError) as raised:
        server.start(timeout=2)

    message = str(raised.value)
    assert "SeaweedFS S3" in message
    assert "was not ready" in message
    assert "InvalidBucketName" in message
    assert str(tmp_path / "logs" / "weed-mini.log") in message
    assert _server_pids(tmp_path) == []
    assert _leftover_sockets(server.ports) == []


def test_redis_restart_keeps_keys(tmp_path: Path) -> None:
    with EmbeddedRedis(tmp_path) as first, redis.Redis.from_url(first.url) as client:
        client.set("kept", "value")
    second = EmbeddedRedis(tmp_path)

    with second, redis.Redis.from_url(second.url) as client:
        value = client.get("kept")

    assert second.url != first.url
    assert value == b"value"


def test_redis_listens_only_on_loopback(tmp_path: Path) -> None:
    with EmbeddedRedis(tmp_path) as server:
        addresses = _listening_addresses(_server_pid(tmp_path))

    assert addresses == {("127.0.0.1", server.port)}


def test_redis_stop_is_idempotent(tmp_path: Path) -> None:
    server = EmbeddedRedis(tmp_path)
    server.start()

    server.stop()
    server.stop()

    assert _server_pids(tmp_path) == []


def test_redis_port_in_use_names_server_and_log(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        server = EmbeddedRedis(tmp_path, port=busy.getsockname()[1])

        with pytest.raises(EmbeddedServerError) as raised:
            server.start(timeout=30)

    message = str(raised.value)
    assert "Valkey" in message
    assert "exited with code 1" in message
    assert str(tmp_path / "valkey.log") in message
    assert "Address already in use" in message
    assert _server_pids(tmp_path) == []


def test_redis_url_fixture_serves_commands(redis_url: str) -> None:
    with redis.Redis.from_url(redis_url) as client:
        client.set("embedded-fixture", "ok")

        assert client.get("embedded-fixture") == b"ok"
