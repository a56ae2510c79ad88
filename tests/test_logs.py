"""Logging: one line per request and per job, JSON on request, and no secret in any line."""

from __future__ import annotations

import io
import json
import logging
from dataclasses import replace

import pytest
from litestar.testing import AsyncTestClient

from gallery.app import create_app
from gallery.embedded import free_port
from gallery.logs import JsonFormatter, Redactor, configure_logging, secret_values
from gallery.settings import Settings
from tests.support import HTMX, TEST_PASSWORD, make_jpeg, post_to_s3

PRESIGNED = (
    "http://127.0.0.1:8333/bucket/u/1/t/2.webp?X-Amz-Algorithm=AWS4-HMAC-SHA256"
    "&X-Amz-Credential=AKIAEXAMPLE%2F20261204%2Fus-east-1%2Fs3%2Faws4_request"
    "&X-Amz-Date=20261204T000000Z&X-Amz-Expires=600&X-Amz-SignedHeaders=host"
    "&X-Amz-Signature=" + "ab" * 32
)


@pytest.fixture
def captured_logs(settings):
    """Hand over a factory that routes every log line to a buffer, in the given format.

    The autouse restore_logging fixture removes the handler afterwards.
    """

    def capture(log_format: str = "json", log_level: str = "DEBUG") -> io.StringIO:
        buffer = io.StringIO()
        configure_logging(replace(settings, log_format=log_format, log_level=log_level), buffer)
        return buffer

    return capture


def test_redactor_hides_presigned_url_and_secrets():
    redact = Redactor(["s3cr3t-value-123"])

    line = redact(
        f"url {PRESIGNED} auth Signature={'cd' * 32} key s3cr3t-value-123 "
        "redis redis://:pa55word-long@redis:6379/0"
    )

    assert "X-Amz-Signature" not in line
    assert "ab" * 32 not in line
    assert "cd" * 32 not in line
    assert "s3cr3t-value-123" not in line
    assert "pa55word-long" not in line
    assert "<presigned URL>" in line


def test_redactor_hides_share_token():
    token = "Xy3_-" * 8 + "abc"

    line = Redactor()(f"request 1 GET /s/{token}/0190abcd/original 302 in 1.0 ms")

    assert token not in line
    assert "/s/<token>/0190abcd/original" in line


def test_json_formatter_writes_extras():
    record = logging.makeLogRecord(
        {"name": "gallery.jobs", "msg": "job %s done", "args": ("j1",), "levelname": "INFO"}
    )
    record.job_id = "j1"
    record.duration_ms = 12.5

    line = json.loads(JsonFormatter(Redactor()).format(record))

    assert line["message"] == "job j1 done"
    assert line["job_id"] == "j1"
    assert line["duration_ms"] == 12.5
    assert line["logger"] == "gallery.jobs"


def test_secret_values_include_redis_password():
    settings = Settings(
        redis_url="redis://:valkey-password-1@127.0.0.1:6379/0",
        secret_key="k" * 32,
        aws_secret_access_key="aws-secret-value",
    )

    assert set(secret_values(settings)) == {"valkey-password-1", "k" * 32, "aws-secret-value"}


def test_text_format_is_one_line_per_record(captured_logs):
    buffer = captured_logs("text", "INFO")

    logging.getLogger("gallery.test").info("hello %s", "world")

    assert buffer.getvalue().rstrip("\n").endswith("INFO gallery.test: hello world")


async def test_requests_and_jobs_log_one_line_each_without_secrets(
    captured_logs, make_client, run_worker, settings
):
    buffer = captured_logs("json", "DEBUG")
    client = await make_client()
    data = make_jpeg(300, 200)

    form = (await client.request_form("photo.jpg", "image/jpeg", len(data))).json()
    await post_to_s3(form, data)
    await client.complete(form["id"])
    await run_worker()
    tile = await client.tile(form["id"])
    download = await client.http.get(f"/images/{form['id']}/original", follow_redirects=False)
    logging.getLogger("gallery.test").info("a presigned URL %s", download.headers["location"])

    lines = [json.loads(line) for line in buffer.getvalue().splitlines()]
    text = buffer.getvalue()
    requests = [line for line in lines if line["logger"] == "gallery.requests"]
    # Jobs that other tests left in the shared queue may run too; only this upload's counts.
    jobs = [
        line
        for line in lines
        if line["logger"] == "gallery.jobs" and f"verify_upload({form['id']})" in line["message"]
    ]
    assert "X-Amz-Signature" in tile.text
    assert [r["path"] for r in requests if r["method"] == "POST"][-2:] == [
        "/uploads",
        f"/uploads/{form['id']}/complete",
    ]
    assert all(r["request_id"] and r["duration_ms"] >= 0 for r in requests)
    assert {r["status"] for r in requests if r["path"] == f"/images/{form['id']}/tile"} == {200}
    assert [(j["function"], j["outcome"]) for j in jobs] == [("verify_upload", "ready")]
    assert jobs[0]["job_id"]
    assert jobs[0]["duration_ms"] > 0
    for secret in (
        settings.secret_key,
        settings.aws_secret_access_key,
        TEST_PASSWORD,
        form["fields"]["policy"],
        form["fields"]["x-amz-signature"],
        "X-Amz-Signature",
        "X-Amz-Credential",
    ):
        assert secret not in text


async def test_client_mistakes_log_one_line_without_traceback(captured_logs, make_client):
    buffer = captured_logs("json", "INFO")
    client = await make_client()

    missing = await client.http.get("/images/0190abcd0190abcd0190abcd/view")
    no_csrf = await client.http.post("/uploads", json={})
    client.http.cookies.clear()
    signed_out = await client.http.get("/images", follow_redirects=False)

    lines = [json.loads(line) for line in buffer.getvalue().splitlines()]
    assert (missing.status_code, no_csrf.status_code, signed_out.status_code) == (404, 403, 302)
    statuses = [line["status"] for line in lines if line["logger"] == "gallery.requests"]
    assert statuses[-3:] == [404, 403, 302]
    assert [line["message"] for line in lines if line["level"] == "ERROR"] == []
    assert "Traceback" not in buffer.getvalue()


async def test_outage_logs_one_warning_per_request(
    captured_logs, make_client, run_worker, settings
):
    client = await make_client()
    upload_id = await client.upload(make_jpeg())
    await run_worker()
    # Only an image in the trash can be deleted forever, which needs S3.
    await client.http.post(f"/images/{upload_id}/trash", headers={**client.csrf, **HTMX})
    buffer = captured_logs("json", "INFO")
    no_redis = replace(settings, redis_url=f"redis://127.0.0.1:{free_port()}/0")
    no_s3 = replace(settings, s3_endpoint_url=f"http://127.0.0.1:{free_port()}")

    async with AsyncTestClient(create_app(no_redis)) as offline:
        offline.cookies = client.http.cookies
        page = await offline.get("/images")
    async with AsyncTestClient(create_app(no_s3)) as offline:
        offline.cookies = client.http.cookies
        deleted = await offline.delete(f"/images/{upload_id}", headers=client.csrf)

    lines = [json.loads(line) for line in buffer.getvalue().splitlines()]
    unavailable = [line for line in lines if "service unavailable" in line["message"]]
    assert (page.status_code, deleted.status_code) == (503, 503)
    assert [line["level"] for line in unavailable] == ["WARNING", "WARNING"]
    statuses = [line["status"] for line in lines if line["logger"] == "gallery.requests"]
    assert statuses == [503, 503]
    assert [line["message"] for line in lines if line["level"] == "ERROR"] == []
    assert "Traceback" not in buffer.getvalue()
