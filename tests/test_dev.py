"""`gallery dev`, what `make run` starts: everything up, a real upload, Ctrl-C, a restart."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from gallery.embedded import free_port
from gallery.settings import ENV_NAMES
from tests.support import TEST_PASSWORD, make_jpeg

START_TIMEOUT_SECONDS = 90


def _processes() -> Iterator[tuple[int, str, str]]:
    """Yield the pid, command line and environment of every running process."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            environ = (entry / "environ").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        yield int(entry.name), command, environ


def _processes_using(path: Path) -> list[str]:
    """Return the command lines of running processes that name a path or run with it."""
    return [
        command
        for _, command, environ in _processes()
        if str(path) in command or f"GALLERY_DATA_DIR={path} " in environ
    ]


def _worker_pids(data_dir: Path) -> list[int]:
    return [
        pid
        for pid, command, environ in _processes()
        if "gallery.cli worker" in command and f"GALLERY_DATA_DIR={data_dir} " in environ
    ]


def _wait_until_ready(http: httpx.Client, upload_id: str) -> str:
    """Poll an upload's tile until it shows a thumbnail, and return the tile."""
    deadline = time.monotonic() + 60
    while "<img" not in (
        tile := http.get(f"/images/{upload_id}/tile", headers={"HX-Request": "true"}).text
    ):
        assert time.monotonic() < deadline, tile
        time.sleep(0.3)
    return tile


@contextmanager
def running_dev(data_dir: Path, port: int) -> Iterator[str]:
    """Run `gallery dev` on embedded services until the block ends, then press Ctrl-C."""
    environ = {key: value for key, value in os.environ.items() if key not in ENV_NAMES.values()}
    environ |= {"GALLERY_DATA_DIR": str(data_dir), "GALLERY_PORT": str(port)}
    log = (data_dir.parent / f"dev-{port}.log").open("ab")
    process = subprocess.Popen(
        [sys.executable, "-m", "gallery.cli", "dev"], env=environ, stdout=log, stderr=log
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + START_TIMEOUT_SECONDS
        while True:
            assert process.poll() is None, f"gallery dev exited; see {log.name}"
            try:
                if httpx.get(f"{url}/signin").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, f"gallery dev did not serve; see {log.name}"
            time.sleep(0.2)
        yield url
    finally:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            raise
        finally:
            log.close()


def _sign_up_or_in(http: httpx.Client, action: str, username: str) -> httpx.Response:
    http.get(f"/{action}")
    return http.post(
        f"/{action}",
        data={"username": username, "password": TEST_PASSWORD},
        headers={"x-csrftoken": http.cookies["csrftoken"]},
    )


def _upload(http: httpx.Client, data: bytes, filename: str = "first.jpg") -> str:
    csrf = {"x-csrftoken": http.cookies["csrftoken"]}
    body = {"filename": filename, "content_type": "image/jpeg", "size": len(data)}
    form = http.post("/uploads", json=body, headers=csrf).json()
    posted = httpx.post(form["url"], data=form["fields"], files={"file": ("f", data)})
    assert posted.status_code == 201, posted.text
    http.post(form["complete_url"], headers={**csrf, "HX-Request": "true"})
    return form["id"]


def test_dev_serves_processes_and_stops_everything(tmp_path):
    data_dir = tmp_path / "gallery-data"
    port = free_port()

    with running_dev(data_dir, port) as url, httpx.Client(base_url=url) as http:
        signed_up = _sign_up_or_in(http, "signup", "firstuser")
        assert signed_up.status_code == 303
        assert signed_up.headers["location"] == "/images"
        first_tile = _wait_until_ready(http, _upload(http, make_jpeg(640, 480)))

        # A worker that dies is replaced, and the next upload is still processed.
        [worker_pid] = _worker_pids(data_dir)
        os.kill(worker_pid, signal.SIGKILL)
        _wait_until_ready(http, _upload(http, make_jpeg(320, 240), "second.jpg"))
        assert _worker_pids(data_dir) != [worker_pid]

    assert _processes_using(data_dir) == []
    with pytest.raises(httpx.TransportError):
        httpx.get(f"{url}/signin")

    # The same folder after a restart: the account and its image are still there.
    with running_dev(data_dir, port) as url, httpx.Client(base_url=url) as http:
        assert _sign_up_or_in(http, "signin", "firstuser").status_code == 303
        page = http.get("/images")
        assert "2 images" in page.text
        assert "first.jpg" in page.text
        # The embedded S3 keeps its port, so pages opened before the restart still work.
        assert _s3_origin(page.text) == _s3_origin(first_tile)

    assert _processes_using(data_dir) == []
    assert oct((data_dir / "secrets.json").stat().st_mode & 0o777) == "0o600"
    assert oct((data_dir / "redis" / "valkey.conf").stat().st_mode & 0o777) == "0o600"
    assert "requirepass " in (data_dir / "redis" / "valkey.conf").read_text()


def _s3_origin(html: str) -> str:
    return re.search(r'src="(http://127\.0\.0\.1:\d+)/', html).group(1)


def test_second_dev_on_same_folder_stops_with_message(tmp_path):
    data_dir = tmp_path / "gallery-data"
    environ = {key: value for key, value in os.environ.items() if key not in ENV_NAMES.values()}
    environ |= {"GALLERY_DATA_DIR": str(data_dir), "GALLERY_PORT": str(free_port())}

    with running_dev(data_dir, free_port()) as url:
        second = subprocess.run(
            [sys.executable, "-m", "gallery.cli", "dev"],
            env=environ,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        still_serving = httpx.get(f"{url}/signin").status_code

    assert second.returncode == 1
    assert "another `gallery dev` (process " in second.stderr
    assert f"is running on {data_dir}" in second.stderr
    assert "Traceback" not in second.stderr
    assert still_serving == 200
