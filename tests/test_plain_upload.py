"""Uploading without JavaScript: the plain form, S3's redirect back, and cancelling uploads."""

from __future__ import annotations

import base64
import html
import json
import re
from dataclasses import replace
from urllib.parse import urlsplit

import httpx

from gallery import index, quotas, storage
from gallery.index import State
from tests.support import HTMX, make_jpeg
from worker.sweep import sweep

FIELD = re.compile(r'<input type="hidden" name="([^"]+)" value="([^"]*)">')


async def plain_form(client) -> tuple[str, dict[str, str]]:
    """Open the upload page and return its form's action URL and hidden fields."""
    page = await client.http.get("/uploads/new")
    assert page.status_code == 200, page.text
    action = html.unescape(
        re.search(r'<form class="upload-form" method="post" action="([^"]+)"', page.text)[1]
    )
    fields = {name: html.unescape(value) for name, value in FIELD.findall(page.text)}
    return action, fields


def policy_of(fields: dict[str, str]) -> dict:
    return json.loads(base64.b64decode(fields["policy"]))


def pinned_conditions(policy: dict) -> list:
    """Return the conditions that pin the bucket, key, size, owner and redirect."""
    signing = ("x-amz-algorithm", "x-amz-credential", "x-amz-date")
    return [
        condition
        for condition in policy["conditions"]
        if not (isinstance(condition, dict) and set(condition) <= set(signing))
    ]


async def post_file(
    action: str, fields: dict[str, str], data: bytes, part_type: str
) -> httpx.Response:
    async with httpx.AsyncClient(timeout=30) as http:
        return await http.post(
            action,
            data=fields,
            files={"file": ("IMG_0001.jpg", data, part_type)},
            follow_redirects=False,
        )


async def test_plain_form_upload_redirects_and_becomes_ready(client, run_worker, redis, settings):
    action, fields = await plain_form(client)
    upload_id = fields["key"].rsplit("/", 1)[1]

    posted = await post_file(action, fields, make_jpeg(), "image/jpeg")
    location = urlsplit(posted.headers["location"])
    done = await client.http.get(f"{location.path}?{location.query}", follow_redirects=False)
    status = await client.http.get(done.headers["location"])
    await run_worker()
    view = await client.http.get(done.headers["location"])

    assert posted.status_code == 303
    assert f"{location.scheme}://{location.netloc}" == settings.app_url
    assert location.path == f"/uploads/{upload_id}/done"
    assert "key=" in location.query
    assert done.status_code == 303
    assert done.headers["location"] == f"/images/{upload_id}/view"
    assert 'http-equiv="refresh"' in status.text
    assert 'http-equiv="refresh"' not in view.text
    assert 'class="display"' in view.text
    upload = await index.get_upload(redis, upload_id)
    assert upload.state == State.READY
    assert upload.content_type == "image/jpeg"
    assert upload.filename.startswith("Photo ")
    assert upload.filename.endswith(".jpg")


async def test_plain_form_pins_redirect_and_no_type(client, settings):
    _, fields = await plain_form(client)

    upload_id = fields["key"].rsplit("/", 1)[1]
    # The form is never used, so its upload is dropped rather than left for the sweep.
    await client.http.delete(f"/uploads/{upload_id}", headers={**client.csrf, **HTMX})
    assert fields["success_action_redirect"] == f"{settings.app_url}/uploads/{upload_id}/done"
    assert "Content-Type" not in fields
    assert "success_action_status" not in fields


async def test_plain_form_rejects_disallowed_posted_type(client, run_worker, store, redis):
    action, fields = await plain_form(client)
    upload_id = fields["key"].rsplit("/", 1)[1]
    await post_file(action, fields, b"<svg xmlns='http://www.w3.org/2000/svg'/>", "image/svg+xml")

    await client.http.get(f"/uploads/{upload_id}/done?bucket=x&key=y&etag=z")

    upload = await index.get_upload(redis, upload_id)
    assert upload.state == State.REJECTED
    assert "only JPEG" in upload.reason
    assert await store.head(storage.incoming_key(upload.user_id, upload_id)) is None
    assert (await quotas.get_usage(redis, upload.user_id)).reserved_images == 0


async def test_forged_redirect_changes_nothing(make_client, redis):
    alice = await make_client()
    bob = await make_client()
    _, fields = await plain_form(alice)
    upload_id = fields["key"].rsplit("/", 1)[1]

    by_other_user = await bob.http.get(f"/uploads/{upload_id}/done", follow_redirects=False)
    before_file = await alice.http.get(f"/uploads/{upload_id}/done", follow_redirects=False)

    state = (await index.get_upload(redis, upload_id)).state
    queued = await redis.exists(f"arq:job:verify:{upload_id}")
    await alice.http.delete(f"/uploads/{upload_id}", headers={**alice.csrf, **HTMX})
    assert by_other_user.status_code == 404
    assert before_file.status_code == 303
    assert state == State.ISSUED
    assert queued == 0


async def test_cancel_drops_issued_upload_and_its_object(client, store, redis):
    data = make_jpeg()
    form = (await client.request_form("photo.jpg", "image/jpeg", len(data))).json()
    async with httpx.AsyncClient(timeout=30) as http:
        await http.post(form["url"], data=form["fields"], files={"file": ("p", data, "image/jpeg")})
    user_id = (await index.get_upload(redis, form["id"])).user_id

    cancelled = await client.http.delete(form["cancel_url"], headers={**client.csrf, **HTMX})
    again = await client.http.delete(form["cancel_url"], headers={**client.csrf, **HTMX})

    assert cancelled.status_code == 200
    assert again.status_code == 404
    assert await index.get_upload(redis, form["id"]) is None
    assert await redis.zscore(index.PENDING_KEY, form["id"]) is None
    assert await redis.zcard(f"gallery:user-pending:{user_id}") == 0
    assert await store.head(storage.incoming_key(user_id, form["id"])) is None


async def test_cancel_of_finished_upload_returns_404(client, run_worker, redis):
    upload_id = await client.upload(make_jpeg())
    await run_worker()

    response = await client.http.delete(f"/uploads/{upload_id}", headers={**client.csrf, **HTMX})

    assert response.status_code == 404
    assert (await index.get_upload(redis, upload_id)).state == State.READY


async def test_reloads_of_plain_form_leave_uploads_possible(make_client, settings, redis):
    client = await make_client(app_settings=replace(settings, max_pending_uploads=10))
    first_action, first_fields = await plain_form(client)

    reloads = [await plain_form(client) for _ in range(29)]
    form_request = await client.request_form("photo.jpg", "image/jpeg", 1000)

    assert form_request.status_code == 201, form_request.text
    last_action, last_fields = reloads[-1]
    assert last_action == first_action
    assert last_fields["key"] == first_fields["key"]
    assert last_fields["x-amz-meta-owner"] == first_fields["x-amz-meta-owner"]
    assert last_fields["success_action_redirect"] == first_fields["success_action_redirect"]
    first_policy, last_policy = policy_of(first_fields), policy_of(last_fields)
    assert last_policy["expiration"] <= first_policy["expiration"]
    assert pinned_conditions(last_policy) == pinned_conditions(first_policy)
    assert ["content-length-range", 1, settings.max_upload_bytes] in pinned_conditions(last_policy)


async def test_reloaded_plain_form_still_uploads(client, run_worker, redis):
    await plain_form(client)
    action, fields = await plain_form(client)
    upload_id = fields["key"].rsplit("/", 1)[1]

    posted = await post_file(action, fields, make_jpeg(), "image/jpeg")
    location = urlsplit(posted.headers["location"])
    await client.http.get(f"{location.path}?{location.query}", follow_redirects=False)
    await run_worker()

    assert posted.status_code == 303
    assert (await index.get_upload(redis, upload_id)).state == State.READY


async def test_plain_form_after_posted_file_gets_new_key(client):
    action, fields = await plain_form(client)
    posted = await post_file(action, fields, make_jpeg(), "image/jpeg")

    _, reloaded_fields = await plain_form(client)

    assert posted.status_code == 303
    assert reloaded_fields["key"] != fields["key"]


async def test_plain_form_is_not_reused_for_another_user(make_client):
    first, second = await make_client(), await make_client()
    _, first_fields = await plain_form(first)

    _, second_fields = await plain_form(second)

    assert second_fields["key"] != first_fields["key"]
    assert second_fields["x-amz-meta-owner"] != first_fields["x-amz-meta-owner"]


async def test_gallery_page_before_redirect_takes_posted_type(client, run_worker, redis):
    # The gallery was opened in another tab before the browser followed S3's redirect.
    action, fields = await plain_form(client)
    upload_id = fields["key"].rsplit("/", 1)[1]
    posted = await post_file(action, fields, make_jpeg(), "image/jpeg")

    gallery = await client.http.get("/images")
    location = urlsplit(posted.headers["location"])
    done = await client.http.get(f"{location.path}?{location.query}", follow_redirects=False)
    await run_worker()

    upload = await index.get_upload(redis, upload_id)
    assert gallery.status_code == 200
    assert done.status_code == 303
    assert upload.state == State.READY, upload.reason
    assert upload.content_type == "image/jpeg"
    assert upload.filename.endswith(".jpg")


async def test_sweep_takes_posted_type_of_unfollowed_redirect(
    client, run_worker, store, redis, settings
):
    action, fields = await plain_form(client)
    upload_id = fields["key"].rsplit("/", 1)[1]
    assert (await post_file(action, fields, make_jpeg(), "image/jpeg")).status_code == 303
    # The browser never came back from S3, and the form has expired.
    await redis.zadd(index.PENDING_KEY, {upload_id: 0})

    counts = await sweep(
        {"redis": redis, "store": store, "settings": replace(settings, purge_grace_seconds=60)}
    )
    await run_worker()

    upload = await index.get_upload(redis, upload_id)
    assert counts.promoted >= 1
    assert upload.state == State.READY, upload.reason
    assert upload.content_type == "image/jpeg"


async def test_dismiss_without_javascript_returns_to_gallery(client, run_worker, redis):
    upload_id = await client.upload(b"not a jpeg at all" * 10, "notes.jpg")
    await run_worker()
    assert (await index.get_upload(redis, upload_id)).state == State.REJECTED

    dismissed = await client.http.post(
        f"/images/{upload_id}", headers=client.csrf, follow_redirects=False
    )

    assert dismissed.status_code == 303
    assert dismissed.headers["location"] == "/images"
    assert await index.get_upload(redis, upload_id) is None
