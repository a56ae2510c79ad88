"""The gallery's upload, tile, grid and delete handlers, on SeaweedFS and a real worker."""

from __future__ import annotations

import html
import io
import re
import time
from dataclasses import replace

import httpx
import pytest
from markupsafe import escape
from PIL import ExifTags, Image

from gallery import index, storage
from gallery.imaging import make_renditions
from gallery.index import State
from tests.support import HTMX, make_jpeg, post_to_s3, seed_grid
from worker.jobs import verify_upload
from worker.sweep import sweep_uploads


async def fetch(url: str) -> httpx.Response:
    async with httpx.AsyncClient(timeout=30) as http:
        return await http.get(url)


async def test_upload_becomes_ready_tile_with_thumbnail(client, run_worker, store, redis):
    data = make_jpeg(800, 600)

    upload_id = await client.upload(data, "holiday.jpg")
    processing = await client.tile(upload_id)
    await run_worker()
    ready = await client.tile(upload_id)

    assert 'hx-trigger="load delay:1s"' in processing.text
    assert "Processing" in processing.text
    assert "hx-trigger" not in ready.text
    assert "<img" in ready.text
    user_id = (await index.get_upload(redis, upload_id)).user_id
    assert await store.head(storage.incoming_key(user_id, upload_id)) is None
    original = await store.head(storage.original_key(user_id, upload_id))
    assert original.content_type == "image/jpeg"
    assert original.size == len(data)
    thumbnail = await store.head(storage.thumbnail_key(user_id, upload_id))
    assert thumbnail.content_type == "image/webp"


async def test_thumbnail_url_serves_webp_within_box(client, run_worker):
    upload_id = await client.upload(make_jpeg(1000, 500))
    await run_worker()

    tile = await client.tile(upload_id)
    url = html.unescape(tile.text.split('<img src="')[1].split('"')[0])
    response = await fetch(url)

    assert response.status_code == 200
    assert response.headers["content-type"] == "image/webp"
    assert response.headers["content-disposition"] == "inline"
    with Image.open(io.BytesIO(response.content)) as thumbnail:
        assert thumbnail.format == "WEBP"
        assert thumbnail.size == (256, 128)


@pytest.mark.parametrize("filename", ["a+b.jpg", "a b.jpg", "100%.jpg", "x?y#z.jpg", "ü.jpg"])
async def test_awkward_name_keeps_bytes_and_name(client, run_worker, filename):
    data = make_jpeg(color=(len(filename) * 20, 90, 30))

    upload_id = await client.upload(data, filename)
    await run_worker()
    download = await client.http.get(f"/images/{upload_id}/original", follow_redirects=False)
    original = await fetch(download.headers["location"])
    page = await client.http.get("/images")

    assert original.status_code == 200
    assert original.content == data
    assert str(escape(filename)) in page.text
    assert "filename*=UTF-8''" in original.headers["content-disposition"]


async def test_five_awkward_names_are_five_images(client, run_worker, redis):
    names = ["a+b.jpg", "a b.jpg", "100%.jpg", "x?y#z.jpg", "ü.jpg"]
    contents = [make_jpeg(color=(40 * i, 200 - 30 * i, 90)) for i in range(len(names))]

    ids = [await client.upload(data, name) for name, data in zip(names, contents, strict=True)]
    await run_worker()

    assert len(set(ids)) == 5
    for upload_id, name, data in zip(ids, names, contents, strict=True):
        download = await client.http.get(f"/images/{upload_id}/original", follow_redirects=False)
        original = await fetch(download.headers["location"])
        assert original.content == data, name
        assert (await index.get_upload(redis, upload_id)).filename == name


async def test_filename_with_markup_is_escaped(client, run_worker):
    name = '<img src=x onerror="alert(1)">.jpg'

    upload_id = await client.upload(make_jpeg(), name)
    await run_worker()
    page = await client.http.get("/images")
    tile = await client.tile(upload_id)

    assert name not in page.text
    assert name not in tile.text
    assert str(escape(name)) in page.text


async def test_non_image_is_rejected_and_deleted(client, run_worker, store, redis):
    data = b"<svg xmlns='http://www.w3.org/2000/svg'><script>alert(1)</script></svg>"

    upload_id = await client.upload(data, "drawing.png", "image/png")
    await run_worker()
    tile = await client.tile(upload_id)

    assert "Rejected: not an image" in tile.text
    assert "hx-trigger" not in tile.text
    upload = await index.get_upload(redis, upload_id)
    assert upload.state == State.REJECTED
    for key in storage.image_keys(upload.user_id, upload_id):
        assert await store.head(key) is None


async def test_png_signed_as_jpeg_is_rejected(client, run_worker):
    buffer = io.BytesIO()
    Image.new("RGB", (20, 20)).save(buffer, "PNG")

    upload_id = await client.upload(buffer.getvalue(), "fake.jpg", "image/jpeg")
    await run_worker()

    assert "Rejected: the file is a PNG image, not a JPEG" in (await client.tile(upload_id)).text


async def test_jpeg_signed_as_png_names_both_types(client, run_worker):
    upload_id = await client.upload(make_jpeg(), "photo.png", "image/png")
    await run_worker()

    assert "Rejected: the file is a JPEG image, not a PNG" in (await client.tile(upload_id)).text


async def test_truncated_jpeg_is_rejected(client, run_worker):
    data = make_jpeg(400, 300)

    upload_id = await client.upload(data[: len(data) // 2], "cut.jpg")
    await run_worker()

    assert "Rejected: corrupt or incomplete" in (await client.tile(upload_id)).text


@pytest.mark.parametrize(
    ("content_type", "size", "message"),
    [
        ("image/svg+xml", 100, "Only JPEG, PNG, WebP, GIF, HEIC and TIFF"),
        ("text/html", 100, "Only JPEG, PNG, WebP, GIF, HEIC and TIFF"),
        ("image/jpeg", 0, "between 1 byte and"),
        ("image/jpeg", 6 * 1024 * 1024, "between 1 byte and"),
    ],
)
async def test_form_request_outside_policy_gets_message(client, content_type, size, message):
    response = await client.request_form("x.jpg", content_type, size)

    assert response.status_code == 400
    assert message in response.json()["error"]


async def test_verify_twice_keeps_one_image(client, run_worker, store, redis, settings):
    upload_id = await client.upload(make_jpeg())
    await run_worker()
    upload = await index.get_upload(redis, upload_id)
    await redis.hset(f"gallery:upload:{upload_id}", "state", State.UPLOADED)
    ctx = {"redis": redis, "store": store, "settings": settings, "job_try": 1, "pool": None}

    outcome = await verify_upload(ctx, upload_id)

    assert outcome == "ready"
    assert await index.count_grid(redis, upload.user_id) == 1
    keys = [key async for key in store.list_keys(f"u/{upload.user_id}/")]
    assert [key async for key in store.list_keys(f"incoming/{upload.user_id}/")] == []
    assert sorted(keys) == sorted(storage.image_keys(upload.user_id, upload_id)[1:])


async def test_complete_twice_queues_one_job(client, redis):
    data = make_jpeg()
    response = await client.request_form("x.jpg", "image/jpeg", len(data))
    form = response.json()
    await post_to_s3(form, data)

    first = await client.complete(form["id"])
    second = await client.complete(form["id"])

    assert first.status_code == 200
    assert second.status_code == 200
    user_id = (await index.get_upload(redis, form["id"])).user_id
    assert await index.count_grid(redis, user_id) == 1


async def test_delete_removes_objects_and_second_delete_404(client, run_worker, store, redis):
    upload_id = await client.upload(make_jpeg())
    await run_worker()
    user_id = (await index.get_upload(redis, upload_id)).user_id
    await client.http.post(f"/images/{upload_id}/trash", headers={**client.csrf, **HTMX})

    first = await client.delete(upload_id)
    second = await client.delete(upload_id)

    assert first.status_code == 200
    assert "Deleted photo.jpg forever." in first.text
    assert second.status_code == 404
    for key in storage.image_keys(user_id, upload_id):
        assert await store.head(key) is None
    assert await index.get_upload(redis, upload_id) is None


async def test_delete_of_other_users_image_returns_404(make_client, run_worker, store, redis):
    alice = await make_client()
    bob = await make_client()
    upload_id = await alice.upload(make_jpeg())
    await run_worker()
    user_id = (await index.get_upload(redis, upload_id)).user_id

    response = await bob.delete(upload_id)
    tile = await bob.tile(upload_id)

    assert response.status_code == 404
    assert tile.status_code == 404
    assert await store.head(storage.original_key(user_id, upload_id)) is not None
    assert await store.head(storage.thumbnail_key(user_id, upload_id)) is not None
    assert (await index.get_upload(redis, upload_id)).state == State.READY


async def test_get_on_delete_url_returns_405(client, run_worker):
    upload_id = await client.upload(make_jpeg())
    await run_worker()

    response = await client.http.get(f"/images/{upload_id}")

    assert response.status_code == 405
    assert (await client.tile(upload_id)).status_code == 200


async def test_delete_without_csrf_token_returns_403(client, run_worker):
    upload_id = await client.upload(make_jpeg())
    await run_worker()

    response = await client.http.delete(f"/images/{upload_id}", headers=HTMX)

    assert response.status_code == 403
    assert (await client.tile(upload_id)).status_code == 200


async def test_grid_pages_newest_first_past_1000(client, redis, settings):
    user_id = await _user_id(client, redis)
    created = await seed_grid(redis, user_id, 1100)

    seen: list[str] = []
    before = None
    while True:
        uploads, before = await index.list_grid(redis, user_id, before=before, limit=60)
        seen.extend(upload.id for upload in uploads)
        if before is None:
            break

    assert seen == sorted(created, reverse=True)
    assert len(seen) == 1100


async def test_grid_fragment_with_and_without_htmx(client, redis, settings):
    await seed_grid(redis, await _user_id(client, redis), settings.page_size + 5)
    first_page = await client.http.get("/images")
    cursor = first_page.text.split("?before=")[1].split('"')[0]

    fragment = await client.http.get(f"/images?before={cursor}", headers=HTMX)
    full_page = await client.http.get(f"/images?before={cursor}")

    assert first_page.text.count('class="tile ') == settings.page_size
    assert "<html" not in fragment.text
    assert fragment.text.count('class="tile ') == 5
    assert "<html" in full_page.text
    assert full_page.text.count('class="tile ') == 5


async def test_tile_without_htmx_redirects_to_gallery(client, run_worker):
    upload_id = await client.upload(make_jpeg())

    response = await client.http.get(f"/images/{upload_id}/tile", follow_redirects=False)

    assert response.status_code in (302, 303)
    assert response.headers["location"] == "/images"


async def test_sweep_purges_abandoned_upload_once_per_tick(client, store, redis, settings):
    response = await client.request_form("gone.jpg", "image/jpeg", 100)
    form = response.json()
    expired = time.time() - 3600
    await redis.hset(f"gallery:upload:{form['id']}", "form_expires_at", expired)
    await redis.zadd(index.PENDING_KEY, {form["id"]: expired})
    upload = await index.get_upload(redis, form["id"])
    # A tick of its own, an hour ago, which no running worker can have claimed.
    tick_ms = int(expired * 1000) // 60_000 * 60_000
    ctx = {
        "redis": redis,
        "store": store,
        "settings": replace(settings, purge_grace_seconds=60),
        "job_id": f"cron:sweep_uploads:{tick_ms}",
    }

    first = await sweep_uploads(ctx)
    second = await sweep_uploads(ctx)

    assert first >= 1
    assert second == 0
    assert await index.get_upload(redis, upload.id) is None
    assert await redis.zscore(index.PENDING_KEY, upload.id) is None


async def _user_id(client, redis) -> str:
    raw = await redis.get(f"gallery:username:{client.username.lower()}")
    return raw.decode()


async def test_form_accepts_no_more_than_reported_size(client, store):
    data = make_jpeg(400, 300)
    response = await client.request_form("small.jpg", "image/jpeg", len(data) - 1)
    form = response.json()

    posted = await post_to_s3(form, data)

    assert posted.status_code == 400
    assert "EntityTooLarge" in posted.text
    assert await store.head(form["fields"]["key"]) is None


async def test_control_characters_leave_the_filename(client, redis):
    response = await client.request_form("bad\x00name\r\nSet-Cookie: x.jpg", "image/jpeg", 100)
    only_controls = await client.request_form("\x00\x1f\x7f", "image/jpeg", 100)

    upload = await index.get_upload(redis, response.json()["id"])
    assert upload.filename == "badnameSet-Cookie: x.jpg"
    assert only_controls.status_code == 400
    assert only_controls.json()["error"] == "The file has no name."


async def test_long_filename_keeps_its_extension(client, redis):
    long_name = "beach" * 60 + ".jpeg"
    response = await client.request_form(long_name, "image/jpeg", 100)
    no_extension = await client.request_form("x" * 300, "image/jpeg", 100)
    long_extension = await client.request_form("a." + "b" * 300, "image/jpeg", 100)

    shortened = (await index.get_upload(redis, response.json()["id"])).filename
    plain = (await index.get_upload(redis, no_extension.json()["id"])).filename
    odd = (await index.get_upload(redis, long_extension.json()["id"])).filename
    assert shortened == ("beach" * 60)[:250] + ".jpeg"
    assert plain == "x" * 255
    assert odd == ("a." + "b" * 300)[:255]


def jpeg_taken_at(value: str) -> bytes:
    """Return a small JPEG whose EXIF DateTimeOriginal is `value`."""
    exif = Image.Exif()
    exif.get_ifd(ExifTags.IFD.Exif)[ExifTags.Base.DateTimeOriginal] = value
    buffer = io.BytesIO()
    Image.new("RGB", (64, 48), (90, 120, 160)).save(buffer, "JPEG", exif=exif)
    return buffer.getvalue()


async def test_viewer_shows_date_taken_from_exif(client, run_worker, redis):
    upload_id = await client.upload(jpeg_taken_at("2021:07:04 09:30:15"), "fireworks.jpg")
    await run_worker()

    view = await client.http.get(f"/images/{upload_id}/view")

    assert (await index.get_upload(redis, upload_id)).taken_at == "2021-07-04 09:30"
    assert "taken 2021-07-04 09:30" in view.text


@pytest.mark.parametrize("value", ["0000:00:00 00:00:00", "    :  :     :  :  ", "yesterday"])
def test_invalid_exif_date_is_left_out(value):
    processed = make_renditions(jpeg_taken_at(value), "image/jpeg", max_pixels=10**6)

    assert processed.taken_at == ""


async def test_direction_characters_leave_the_filename(client, redis):
    response = await client.request_form("\u202egpj.exe", "image/jpeg", 100)
    joined = await client.request_form(
        "\u0645\u06cc\u200c\u062e\u0648\u0627\u0647\u0645.jpg", "image/jpeg", 100
    )

    spoofed = await index.get_upload(redis, response.json()["id"])
    persian = await index.get_upload(redis, joined.json()["id"])
    assert spoofed.filename == "gpj.exe"
    assert "\u200c" in persian.filename


def element_text(page: str, element_id: str) -> str:
    """Return the text of the element with this id, with its whitespace collapsed."""
    match = re.search(rf'<p [^>]*id="{element_id}"[^>]*>(.*?)</p>', page, re.DOTALL)
    assert match, f"no element {element_id!r} in the page"
    return " ".join(match[1].split())


async def test_image_count_leaves_out_processing_and_rejected(client, run_worker):
    for number in range(2):
        await client.upload(make_jpeg(), f"good-{number}.jpg")
    await client.upload(make_jpeg(), "bad.png", "image/png")

    while_processing = (await client.http.get("/images")).text
    await run_worker()
    checked = (await client.http.get("/images")).text
    summary = await client.http.get("/images/summary", headers=HTMX)

    assert element_text(while_processing, "count") == "3 processing"
    assert element_text(checked, "count") == "2 images"
    assert element_text(summary.text, "count") == "2 images"
    assert "tile-rejected" in checked


async def test_image_count_names_processing_next_to_ready(client, run_worker):
    await client.upload(make_jpeg(), "first.jpg")
    await run_worker()
    await client.upload(make_jpeg(), "second.jpg")

    page = (await client.http.get("/images")).text

    assert element_text(page, "count") == "1 image, 1 processing"
    assert 'id="empty"' in page
    assert re.search(r'id="empty"[^>]*hidden', page)


async def test_summary_fragment_only_for_htmx(client):
    fragment = await client.http.get("/images/summary", headers=HTMX)
    page = await client.http.get("/images/summary", follow_redirects=False)

    assert fragment.status_code == 200
    assert "<html" not in fragment.text
    for element_id in ("count", "empty", "quota"):
        assert re.search(rf'id="{element_id}"[^>]*hx-swap-oob="true"', fragment.text)
    assert element_text(fragment.text, "quota").startswith("You use 0 bytes of 10.0 GiB")
    assert page.status_code in (302, 303)
    assert page.headers["location"] == "/images"


async def test_quota_line_follows_upload_trash_and_delete(client, run_worker):
    async def quota_line() -> str:
        fragment = await client.http.get("/images/summary", headers=HTMX)
        return element_text(fragment.text, "quota")

    empty = await quota_line()
    upload_id = await client.upload(make_jpeg(), "beach.jpg")
    in_progress = await quota_line()
    await run_worker()
    stored = await quota_line()
    await client.http.post(f"/images/{upload_id}/trash", headers={**client.csrf, **HTMX})
    trashed = await quota_line()
    await client.delete(upload_id)
    deleted = await quota_line()

    assert "0 bytes" in empty
    assert "0 of 100000 images" in empty
    assert "plus 1 upload in progress" in in_progress
    assert "1 of 100000 images" in stored
    assert "0 bytes" not in stored
    assert "in progress" not in stored
    assert trashed.endswith("That includes 1 image in the trash.")
    assert deleted == empty


async def test_grid_changes_send_gallery_changed_event(client, run_worker):
    ready_id = await client.upload(make_jpeg(), "good.jpg")
    rejected_id = await client.upload(make_jpeg(), "bad.png", "image/png")
    processing_tile = await client.tile(ready_id)
    await run_worker()

    ready_tile = await client.tile(ready_id)
    rejected_tile = await client.tile(rejected_id)
    dismissed = await client.delete(rejected_id)

    assert "hx-trigger" not in processing_tile.headers
    assert ready_tile.headers["hx-trigger"] == "galleryChanged"
    assert rejected_tile.headers["hx-trigger"] == "galleryChanged"
    assert dismissed.headers["hx-trigger"] == "galleryChanged"
