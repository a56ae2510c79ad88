"""`gallery dev`: the whole gallery on one machine, with embedded S3 and Redis by default."""

from __future__ import annotations

import asyncio
import fcntl
import json
import logging
import os
import secrets
import signal
import subprocess
import sys
import threading
from contextlib import ExitStack
from dataclasses import replace
from pathlib import Path

from gallery.embedded import (
    EmbeddedRedis,
    EmbeddedS3,
    EmbeddedServerError,
    free_port,
    is_port_free,
)
from gallery.logs import configure_logging
from gallery.settings import Settings

logger = logging.getLogger(__name__)

WORKER_CHECK_SECONDS = 1
# A pause before a new worker starts, so a worker that fails at start cannot spin.
WORKER_RESTART_DELAY_SECONDS = 2


def run_dev(settings: Settings) -> None:
    """Start the servers this machine needs, one worker and the web app; stop all on Ctrl-C."""
    import uvicorn

    from gallery.app import create_app

    # uvicorn raises SIGTERM again after its shutdown. As SystemExit, the signal unwinds the
    # stack below, so the worker and the servers stop before the process ends.
    signal.signal(signal.SIGTERM, _exit_on_signal)
    with ExitStack() as stack:
        if settings.uses_embedded_services:
            settings = _start_embedded_services(settings, stack)
        settings = settings.require_services()
        # Again, so that the embedded servers' generated keys are redacted too.
        configure_logging(settings)
        asyncio.run(_prepare_bucket(settings))

        supervisor = WorkerSupervisor({**os.environ, **settings.to_env()})
        supervisor.start()
        stack.callback(supervisor.stop)

        logger.info("gallery is serving at %s", settings.app_url)
        uvicorn.run(
            create_app(settings),
            host=settings.host,
            port=settings.port,
            log_config=None,
            access_log=False,
            # GALLERY_TRUSTED_PROXIES decides whether X-Forwarded-For is read, not uvicorn.
            proxy_headers=False,
        )


def _exit_on_signal(signum: int, _: object) -> None:
    raise SystemExit(128 + signum)


def _start_embedded_services(settings: Settings, stack: ExitStack) -> Settings:
    data_dir = settings.data_dir.resolve()
    _lock_data_dir(data_dir, stack)
    secrets_ = _load_or_make_secrets(data_dir / "secrets.json")
    s3_port = int(secrets_["s3_port"])
    if not is_port_free(s3_port):
        logger.warning("port %d of the embedded S3 is taken; open pages must be reloaded", s3_port)
        s3_port = free_port()
        _write_private_json(data_dir / "secrets.json", secrets_ | {"s3_port": str(s3_port)})
    s3 = EmbeddedS3(
        data_dir / "s3",
        secrets_["s3_access_key"],
        secrets_["s3_secret_key"],
        port=s3_port,
        buckets=[settings.s3_bucket],
        allowed_origins=_app_origins(settings),
    )
    stack.enter_context(s3)
    redis = EmbeddedRedis(data_dir / "redis", password=secrets_["redis_password"])
    stack.enter_context(redis)
    logger.info(
        "embedded S3 at %s and Redis at %s, data in %s", s3.endpoint_url, redis.address, data_dir
    )
    return replace(
        settings,
        s3_endpoint_url=s3.endpoint_url,
        redis_url=redis.url,
        aws_access_key_id=secrets_["s3_access_key"],
        aws_secret_access_key=secrets_["s3_secret_key"],
        secret_key=settings.secret_key or secrets_["app_secret_key"],
    )


def _lock_data_dir(data_dir: Path, stack: ExitStack) -> None:
    """Hold a lock on the data folder while this process runs, or raise if another holds it.

    A second `gallery dev` on the same folder would start servers on the first one's data.
    The lock file names the process that holds it.
    """
    data_dir.mkdir(parents=True, exist_ok=True)
    lock = stack.enter_context((data_dir / "dev.lock").open("a+"))
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.seek(0)
        holder = lock.read().strip() or "unknown"
        raise EmbeddedServerError(
            f"another `gallery dev` (process {holder}) is running on {data_dir}. Stop it "
            "first, or set GALLERY_DATA_DIR to another folder."
        ) from None
    lock.truncate(0)
    lock.write(str(os.getpid()))
    lock.flush()


def _load_or_make_secrets(path: Path) -> dict[str, str]:
    """Return the embedded services' keys and ports, made once and kept with their data.

    A value missing from an older file is made and saved.
    """
    values = json.loads(path.read_text()) if path.exists() else {}
    missing = {
        "s3_access_key": lambda: "gallery" + secrets.token_hex(6),
        "s3_secret_key": lambda: secrets.token_urlsafe(30),
        "app_secret_key": lambda: secrets.token_urlsafe(48),
        "redis_password": lambda: secrets.token_urlsafe(30),
        # The same S3 port at every start, so a page left open keeps working after a restart.
        "s3_port": lambda: str(free_port()),
    }
    added = {name: make() for name, make in missing.items() if name not in values}
    if added:
        values |= added
        _write_private_json(path, values)
    return values


def _write_private_json(path: Path, values: dict[str, str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.unlink(missing_ok=True)
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "w") as file:
        json.dump(values, file)


async def _prepare_bucket(settings: Settings) -> None:
    from gallery.storage import Storage

    async with Storage.open(settings) as store:
        await store.ensure_bucket(_app_origins(settings))


def _app_origins(settings: Settings) -> list[str]:
    """Return the origins the gallery's pages load from, which may post to the bucket."""
    origins = {settings.app_url}
    if settings.host == "127.0.0.1" and not settings.public_url:
        origins.add(f"http://localhost:{settings.port}")
    return sorted(origins)


class WorkerSupervisor:
    """Run one `gallery worker` process and start a new one whenever it exits on its own."""

    def __init__(self, environ: dict[str, str]) -> None:
        self._environ = environ
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="worker-supervisor", daemon=True)
        self.process: subprocess.Popen[bytes] | None = None
        self.restarts = 0

    def start(self) -> None:
        self.process = self._spawn()
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        self._thread.join()
        if self.process is not None:
            _stop_process(self.process)
            _kill_group(self.process.pid)

    def _spawn(self) -> subprocess.Popen[bytes]:
        # A session of its own makes the worker and its decoding processes one process group,
        # so a worker that dies can be cleaned up with its children.
        return subprocess.Popen(
            [sys.executable, "-m", "gallery.cli", "worker"],
            env=self._environ,
            start_new_session=True,
        )

    def _watch(self) -> None:
        while not self._stopping.wait(WORKER_CHECK_SECONDS):
            if self.process is None or self.process.poll() is None:
                continue
            logger.warning(
                "worker exited with code %s; starting a new one in %d s",
                self.process.returncode,
                WORKER_RESTART_DELAY_SECONDS,
            )
            _kill_group(self.process.pid)
            if self._stopping.wait(WORKER_RESTART_DELAY_SECONDS):
                return
            self.restarts += 1
            self.process = self._spawn()


def _kill_group(group_id: int) -> None:
    """Kill what is left of a process group, such as the decoding processes of a dead worker."""
    try:
        os.killpg(group_id, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _stop_process(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
