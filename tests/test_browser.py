"""Chromium against the served app and a worker process: sign-up, uploads, grid and delete.

A second app process serves presigned URLs that expire after 2 seconds, for the thumbnail
refresh tests.

Screenshots and the processes' logs go to `test-artifacts/` in the repository root.
"""

from __future__ import annotations

import asyncio
import base64
import io
import os
import re
import secrets
import subprocess
import time
from collections.abc import AsyncIterator
from contextlib import suppress
from dataclasses import replace
from pathlib import Path

import httpx
import pytest
from arq.connections import ArqRedis
from PIL import Image
from playwright.async_api import (
    Browser,
    ConsoleMessage,
    Error,
    Locator,
    Page,
    Request,
    Response,
    Route,
    async_playwright,
    expect,
)

from gallery import storage
from gallery.embedded import free_port
from gallery.errors import ERROR_TEXTS
from gallery.settings import Settings
from gallery.storage import Storage
from tests.support import TEST_PASSWORD, gallery_process, make_jpeg, seed_grid

pytestmark = pytest.mark.browser

REPO_ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS_DIR = REPO_ROOT / "test-artifacts"

CHROMIUM_PATH = Path("/usr/bin/chromium")
# The background-networking, component-update and sync switches keep chromium from
# contacting Google's servers during the test.
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]

# Timeout of every Playwright wait, in milliseconds. It covers an upload, its job and its thumbnail.
TIMEOUT_MS = 30_000
STARTUP_SECONDS = 30

DESKTOP_VIEWPORT = {"width": 1280, "height": 800}
PHONE_VIEWPORT = {"width": 360, "height": 780}

PHOTOS = ("cameras/Canon_40D.jpg", "gps/DSCN0010.jpg", "orientation/Portrait_6.jpg")

# Lifetime of the presigned URLs that the second app process signs, in seconds.
SHORT_URL_EXPIRY_SECONDS = 2

# The path of a 1x or 2x thumbnail in a presigned S3 URL (storage.thumbnail_key).
THUMBNAIL_URL = re.compile(r"/u/\w+/t2?/\w+\.webp")
TILE_URL = re.compile(r"/images/\w+/tile$")

# The body of the app's 503 to an htmx request while Redis or S3 is unreachable.
UNAVAILABLE_TEXT = f"{ERROR_TEXTS[503].problem} {ERROR_TEXTS[503].next_step}"

# Pixels of page width that do not fit the viewport and need horizontal scrolling.
HORIZONTAL_OVERFLOW = "document.documentElement.scrollWidth - document.documentElement.clientWidth"

# True once `count` tiles show a thumbnail that the browser has fetched and decoded.
ALL_THUMBNAILS_LOADED = """
(count) => {
  const images = Array.from(document.querySelectorAll(".tile img.thumbnail"));
  return images.length === count && images.every((image) => image.complete && image.naturalWidth > 0);
}
"""


@pytest.fixture(scope="session")
def chromium_path() -> Path:
    """Hand over Debian's chromium, or skip where it is missing. In CI a missing one fails."""
    if CHROMIUM_PATH.is_file():
        return CHROMIUM_PATH
    message = f"chromium not found at {CHROMIUM_PATH}. Install Debian's chromium package."
    if os.environ.get("CI") == "true":
        pytest.fail(message)
    pytest.skip(message)


@pytest.fixture(scope="module")
async def served_settings(settings: Settings, store: Storage) -> Settings:
    """Hand over the session's settings on a free port, with the bucket's CORS rules for it.

    The session's own origin stays in the rules, so other tests see the bucket unchanged.
    """
    served = replace(settings, port=free_port())
    await store.ensure_bucket([settings.app_url, served.app_url])
    return served


@pytest.fixture(scope="module")
async def base_url(served_settings: Settings) -> AsyncIterator[str]:
    """Hand over the URL of `gallery serve` running in a child process for this module."""
    log_path = ARTIFACTS_DIR / "browser-app.log"
    with gallery_process("serve", served_settings, log_path) as process:
        await _wait_until_serving(process, served_settings.app_url, log_path)
        yield served_settings.app_url


@pytest.fixture(scope="module")
async def short_expiry_url(
    settings: Settings, served_settings: Settings, store: Storage
) -> AsyncIterator[str]:
    """Hand over the URL of a second `gallery serve` whose presigned URLs expire in 2 s.

    The bucket's CORS rules gain its origin, so the browser can upload from its pages.
    """
    # URLs are signed at the start of a 1 s window, so each one expires 1 to 2 s after it
    # is handed out.
    short_expiry = replace(
        served_settings,
        port=free_port(),
        url_expiry_seconds=SHORT_URL_EXPIRY_SECONDS,
        url_window_seconds=1,
    )
    await store.ensure_bucket([settings.app_url, served_settings.app_url, short_expiry.app_url])
    log_path = ARTIFACTS_DIR / "browser-app-short-expiry.log"
    with gallery_process("serve", short_expiry, log_path) as process:
        await _wait_until_serving(process, short_expiry.app_url, log_path)
        yield short_expiry.app_url


@pytest.fixture(scope="module")
async def worker(served_settings: Settings) -> AsyncIterator[subprocess.Popen[bytes]]:
    """Hand over a `gallery worker` child process, started and stopped with this module."""
    log_path = ARTIFACTS_DIR / "browser-worker.log"
    with gallery_process("worker", served_settings, log_path) as process:
        await _wait_for_log_line(process, log_path, "worker started")
        yield process


@pytest.fixture(scope="module")
async def browser(chromium_path: Path) -> AsyncIterator[Browser]:
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(
            executable_path=chromium_path, args=CHROMIUM_ARGS
        )
        yield browser
        await browser.close()


@pytest.fixture
def console_errors() -> list[str]:
    """Hand over the list that the `page` fixture fills with console errors and page errors."""
    return []


@pytest.fixture
async def page(browser: Browser, console_errors: list[str]) -> AsyncIterator[Page]:
    """Hand over a page in a fresh browser context, so that no cookie carries over."""
    context = await browser.new_context(viewport=DESKTOP_VIEWPORT)
    context.set_default_timeout(TIMEOUT_MS)
    page = await context.new_page()

    def record_console(message: ConsoleMessage) -> None:
        if message.type == "error":
            console_errors.append(f"console: {message.text} at {message.location}")

    def record_page_error(error: Error) -> None:
        console_errors.append(f"page error: {error.message}")

    page.on("console", record_console)
    page.on("pageerror", record_page_error)
    yield page
    await context.close()


@pytest.fixture(autouse=True)
def _set_expect_timeout() -> None:
    expect.set_options(timeout=TIMEOUT_MS)


async def test_upload_three_photos_then_delete_one(
    page: Page,
    base_url: str,
    worker: subprocess.Popen[bytes],
    served_settings: Settings,
    store: Storage,
    corpus_dir: Path,
    console_errors: list[str],
) -> None:
    cors_origins = [
        origin
        for rule in await store.bucket_cors_rules()
        for origin in rule.get("AllowedOrigins", [])
    ]
    assert served_settings.app_url in cors_origins

    await page.goto(f"{base_url}/signup")
    await expect(page.get_by_role("heading", name="Sign up")).to_be_visible()
    await save_screenshot(page, "1-signup")
    username = await sign_up(page, base_url)

    await expect(page.locator(".who")).to_have_text(username)
    await expect(page.locator("#empty")).to_contain_text("No photos yet")
    await expect(page.locator("#empty")).to_be_visible()
    await expect(page.locator("#count")).to_be_hidden()
    await save_screenshot(page, "2-empty-gallery")

    await page.locator("#file-input").set_input_files([corpus_dir / photo for photo in PHOTOS])
    await expect(page.locator(".upload-row")).to_have_count(len(PHOTOS))
    await save_screenshot(page, "3-uploading")

    rows = page.locator(".upload-row")
    for index in range(len(PHOTOS)):
        # The text first, because on failure it carries the error that upload.js caught.
        await expect(rows.nth(index).locator(".upload-state")).to_have_text("ready")
        await expect(rows.nth(index)).to_have_attribute("data-state", "ready")
    await expect(page.locator(".tile")).to_have_count(len(PHOTOS))
    await page.wait_for_function(ALL_THUMBNAILS_LOADED, arg=len(PHOTOS))
    await expect(page.locator("#empty")).to_be_hidden()
    await expect(page.locator("#count")).to_have_text("3 images")
    portrait = await thumbnail_size(page, "Portrait_6.jpg")
    await save_screenshot(page, "4-three-thumbnails")
    await page.set_viewport_size(PHONE_VIEWPORT)
    phone_overflow = await page.evaluate(HORIZONTAL_OVERFLOW)
    await save_screenshot(page, "4-three-thumbnails-phone")
    await page.set_viewport_size(DESKTOP_VIEWPORT)

    deleted_tile = page.locator(".tile", has=page.get_by_alt_text("DSCN0010.jpg"))
    await deleted_tile.get_by_role("button", name="Delete").click()
    await expect(page.locator("#messages")).to_contain_text("Moved DSCN0010.jpg to the trash.")
    await expect(page.locator(".tile")).to_have_count(len(PHOTOS) - 1)
    await expect(page.locator("#count")).to_have_text("2 images")

    await page.reload()
    await expect(page.locator(".tile")).to_have_count(len(PHOTOS) - 1)
    await page.wait_for_function(ALL_THUMBNAILS_LOADED, arg=len(PHOTOS) - 1)
    await expect(page.get_by_alt_text("DSCN0010.jpg")).to_have_count(0)
    await expect(page.locator("#count")).to_have_text("2 images")
    await save_screenshot(page, "5-after-delete")

    assert portrait["height"] > portrait["width"], portrait
    assert phone_overflow == 0
    assert console_errors == []


async def test_page_rejects_files_before_upload(
    page: Page, base_url: str, settings: Settings, console_errors: list[str]
) -> None:
    upload_requests: list[str] = []

    def record_upload_request(request: Request) -> None:
        if "/uploads" in request.url or request.url.startswith(settings.s3_endpoint_url):
            upload_requests.append(request.url)

    page.on("request", record_upload_request)
    await sign_up(page, base_url)
    files = [
        {"name": "notes.txt", "mimeType": "text/plain", "buffer": b"shopping list\n"},
        {"name": "drawing.svg", "mimeType": "image/svg+xml", "buffer": b"<svg></svg>"},
        {"name": "huge.jpg", "mimeType": "image/jpeg", "buffer": b"\xff\xd8" + bytes(40_000_000)},
        {"name": "empty.jpg", "mimeType": "image/jpeg", "buffer": b""},
    ]

    await page.locator("#file-input").set_input_files(files)

    rows = page.locator(".upload-row")
    await expect(rows).to_have_count(len(files))
    for index in range(len(files)):
        await expect(rows.nth(index)).to_have_attribute("data-state", "rejected")
    wrong_type = "rejected: only JPEG, PNG, WebP, GIF, HEIC and TIFF images can be uploaded"
    await expect(rows.nth(0)).to_contain_text(wrong_type)
    await expect(rows.nth(1)).to_contain_text(wrong_type)
    await expect(rows.nth(2)).to_contain_text("rejected: larger than the 5 MiB limit")
    await expect(rows.nth(3)).to_contain_text("rejected: the file is empty")
    await expect(page.locator("#empty")).to_be_visible()
    await save_screenshot(page, "6-rejected-in-page")
    await page.set_viewport_size(PHONE_VIEWPORT)
    phone_overflow = await page.evaluate(HORIZONTAL_OVERFLOW)
    await save_screenshot(page, "6-rejected-in-page-phone")

    assert upload_requests == []
    assert phone_overflow == 0
    assert await page.locator(".tile").count() == 0
    assert console_errors == []


async def test_text_file_named_jpg_is_rejected_by_worker(
    page: Page, base_url: str, worker: subprocess.Popen[bytes], console_errors: list[str]
) -> None:
    await sign_up(page, base_url)
    # A browser takes the type from the extension, so this passes the page's check.
    fake = {"name": "notes.jpg", "mimeType": "image/jpeg", "buffer": b"shopping list\n" * 20}

    await page.locator("#file-input").set_input_files([fake])

    tile = page.locator(".tile")
    await expect(tile).to_have_count(1)
    await expect(tile.locator(".reason")).to_have_text("Rejected: not an image")
    await save_screenshot(page, "7-rejected-by-worker")
    page.on("dialog", lambda dialog: dialog.accept())
    await tile.get_by_role("button", name="Dismiss").click()
    await expect(tile).to_have_count(0)
    await page.reload()
    await expect(page.locator("#empty")).to_be_visible()

    assert console_errors == []


async def test_upload_waits_while_too_many_are_pending(
    page: Page,
    base_url: str,
    worker: subprocess.Popen[bytes],
    served_settings: Settings,
    redis: ArqRedis,
    corpus_dir: Path,
    console_errors: list[str],
) -> None:
    username = await sign_up(page, base_url)
    user_id = (await redis.get(f"gallery:username:{username.lower()}")).decode()
    pending_key = f"gallery:user-pending:{user_id}"
    placeholders = [f"placeholder{number}" for number in range(served_settings.max_pending_uploads)]
    await redis.zadd(pending_key, dict.fromkeys(placeholders, float("inf")))

    await page.locator("#file-input").set_input_files([corpus_dir / PHOTOS[0]])
    row = page.locator(".upload-row")
    await expect(row.locator(".upload-state")).to_have_text(
        "waiting for earlier uploads to be checked"
    )
    await save_screenshot(page, "8-waiting-for-pending-uploads")
    await redis.zrem(pending_key, *placeholders)

    await expect(row.locator(".upload-state")).to_have_text("ready")
    await page.wait_for_function(ALL_THUMBNAILS_LOADED, arg=1)
    # Chromium logs every 429 response as a console error, and nothing else may appear.
    assert console_errors
    assert all("429" in error for error in console_errors), console_errors


async def test_tile_opens_viewer_with_display_image(
    page: Page,
    base_url: str,
    worker: subprocess.Popen[bytes],
    corpus_dir: Path,
    console_errors: list[str],
) -> None:
    await sign_up(page, base_url)
    await page.locator("#file-input").set_input_files([corpus_dir / "orientation/Portrait_6.jpg"])
    await page.wait_for_function(ALL_THUMBNAILS_LOADED, arg=1)

    await page.locator(".tile a.frame").click()
    await expect(page).to_have_url(re.compile(rf"{re.escape(base_url)}/images/\w+/view"))
    await expect(page.locator(".overlay")).to_be_visible()
    await page.wait_for_function("() => document.querySelector('img.display').naturalWidth > 0")
    size = await page.locator("img.display").evaluate(
        "(image) => ({width: image.naturalWidth, height: image.naturalHeight})"
    )
    await expect(page.locator(".viewer-info")).to_contain_text("Portrait_6.jpg")
    await expect(page.locator(".viewer-info")).to_contain_text("1200 × 1800 px")
    await save_screenshot(page, "9-viewer")

    await page.reload()
    await expect(page.locator(".overlay")).to_have_count(0)
    await expect(page.locator(".viewer-page img.display")).to_be_visible()
    await page.get_by_role("link", name="Close and go back to all photos").click()
    await expect(page).to_have_url(f"{base_url}/images")

    assert size == {"width": 1067, "height": 1600}
    assert console_errors == []


async def test_upload_after_signout_elsewhere_opens_signin(
    page: Page, base_url: str, console_errors: list[str]
) -> None:
    await sign_up(page, base_url)
    other_tab = await page.context.new_page()
    await other_tab.goto(f"{base_url}/images")
    await other_tab.get_by_role("button", name="Sign out").click()
    await expect(other_tab).to_have_url(f"{base_url}/signin")
    form_statuses: list[int] = []

    def record_form_response(response: Response) -> None:
        if response.url == f"{base_url}/uploads":
            form_statuses.append(response.status)

    page.on("response", record_form_response)
    photo = {"name": "photo.jpg", "mimeType": "image/jpeg", "buffer": make_jpeg()}

    await page.locator("#file-input").set_input_files([photo])

    await expect(page).to_have_url(f"{base_url}/signin")
    await expect(page.get_by_role("heading", name="Sign in")).to_be_visible()
    await save_screenshot(page, "10-upload-after-signout")
    assert form_statuses == [401]
    # Chromium logs the 401 response as a console error; nothing else may appear.
    assert all("401" in error for error in console_errors), console_errors


async def test_delete_in_two_tabs_removes_stale_tile(
    page: Page, base_url: str, worker: subprocess.Popen[bytes], console_errors: list[str]
) -> None:
    await sign_up(page, base_url)
    photos = [
        {"name": "red.jpg", "mimeType": "image/jpeg", "buffer": make_jpeg(color=(200, 40, 40))},
        {"name": "blue.jpg", "mimeType": "image/jpeg", "buffer": make_jpeg(color=(40, 40, 200))},
    ]
    await page.locator("#file-input").set_input_files(photos)
    await page.wait_for_function(ALL_THUMBNAILS_LOADED, arg=len(photos))
    other_tab = await page.context.new_page()
    await other_tab.goto(f"{base_url}/images")
    await other_tab.wait_for_function(ALL_THUMBNAILS_LOADED, arg=len(photos))
    delete_statuses: list[int] = []

    def record_delete_response(response: Response) -> None:
        if response.url.endswith("/trash"):
            delete_statuses.append(response.status)

    page.on("response", record_delete_response)
    other_tab.on("response", record_delete_response)
    red_tile_elsewhere = other_tab.locator(".tile", has=other_tab.get_by_alt_text("red.jpg"))
    await red_tile_elsewhere.get_by_role("button", name="Delete").click()
    await expect(other_tab.locator("#count")).to_have_text("1 image")

    red_tile = page.locator(".tile", has=page.get_by_alt_text("red.jpg"))
    await red_tile.get_by_role("button", name="Delete").click()

    await expect(page.locator("#messages")).to_have_text("That image was already deleted.")
    await expect(page.locator(".tile")).to_have_count(1)
    await expect(page.locator("#count")).to_have_text("1 image")
    await save_screenshot(page, "11-deleted-in-other-tab")
    await expect(page.locator("#messages")).to_be_empty()
    await page.reload()
    await expect(page.locator(".tile")).to_have_count(1)
    await expect(page.get_by_alt_text("blue.jpg")).to_be_visible()
    assert delete_statuses == [200, 404]
    # Chromium logs the 404 response as a console error; nothing else may appear.
    assert all("404" in error for error in console_errors), console_errors


async def test_expired_thumbnail_url_is_refreshed(
    page: Page,
    short_expiry_url: str,
    worker: subprocess.Popen[bytes],
    console_errors: list[str],
) -> None:
    await sign_up(page, short_expiry_url)
    photo = {"name": "photo.jpg", "mimeType": "image/jpeg", "buffer": make_jpeg()}
    await page.locator("#file-input").set_input_files([photo])
    await page.wait_for_function(ALL_THUMBNAILS_LOADED, arg=1)
    # The HTTP status of each thumbnail response, or the error of a failed request.
    thumbnail_outcomes: list[str] = []
    tile_requests: list[str] = []
    held_requests: list[str] = []

    # The first thumbnail request reaches S3 only after its URL has expired, as it does
    # when a lazily loaded thumbnail scrolls into view on a page left open.
    async def hold_first_request(route: Route) -> None:
        if not held_requests:
            held_requests.append(route.request.url)
            await asyncio.sleep(SHORT_URL_EXPIRY_SECONDS + 1.5)
        await route.continue_()

    def record_response(response: Response) -> None:
        if THUMBNAIL_URL.search(response.url):
            thumbnail_outcomes.append(str(response.status))
        if TILE_URL.search(response.url):
            tile_requests.append(response.url)

    def record_failure(request: Request) -> None:
        if THUMBNAIL_URL.search(request.url):
            thumbnail_outcomes.append(request.failure or "failed")

    page.on("response", record_response)
    page.on("requestfailed", record_failure)
    # Routing also turns off Playwright's HTTP cache, so the thumbnail is fetched again.
    await page.route(THUMBNAIL_URL, hold_first_request)

    await page.reload()

    await page.wait_for_function(ALL_THUMBNAILS_LOADED, arg=1)
    await save_screenshot(page, "12-thumbnail-refreshed")
    assert len(thumbnail_outcomes) == 2, thumbnail_outcomes
    # S3 rejects the expired URL with 403 and an XML body, which chromium's Opaque Response
    # Blocking turns into a failed request.
    assert thumbnail_outcomes[0] in ("403", "net::ERR_BLOCKED_BY_ORB")
    assert thumbnail_outcomes[1] == "200"
    assert len(tile_requests) == 1
    assert console_errors == []


async def test_failing_thumbnail_refreshes_tile_once(
    page: Page,
    short_expiry_url: str,
    worker: subprocess.Popen[bytes],
    console_errors: list[str],
) -> None:
    await sign_up(page, short_expiry_url)
    photo = {"name": "photo.jpg", "mimeType": "image/jpeg", "buffer": make_jpeg()}
    await page.locator("#file-input").set_input_files([photo])
    await page.wait_for_function(ALL_THUMBNAILS_LOADED, arg=1)
    thumbnail_requests: list[str] = []
    tile_requests: list[str] = []

    def record_tile_request(request: Request) -> None:
        if TILE_URL.search(request.url):
            tile_requests.append(request.url)

    async def reject(route: Route) -> None:
        thumbnail_requests.append(route.request.url)
        await route.fulfill(status=403, body="expired")

    page.on("request", record_tile_request)
    await page.route(THUMBNAIL_URL, reject)

    await page.reload()

    await wait_for_length(tile_requests, 1)
    # Time for a second refresh, which must not come.
    await asyncio.sleep(2)
    await expect(page.locator(".tile")).to_have_count(1)
    assert len(tile_requests) == 1
    # The refreshed tile fetches its thumbnail again only when its URL window has moved on,
    # because Chromium reuses the failed image for an identical URL.
    assert len(thumbnail_requests) in (1, 2)
    assert all("403" in error for error in console_errors), console_errors


async def test_opening_signout_shows_error_page(
    page: Page, base_url: str, console_errors: list[str]
) -> None:
    await sign_up(page, base_url)

    response = await page.goto(f"{base_url}/signout")

    assert response is not None
    assert response.status == 405
    await expect(page.get_by_role("heading", level=1)).to_have_text(
        "This address cannot be opened that way."
    )
    await expect(page.get_by_text("Error 405: Method Not Allowed")).to_be_visible()
    await save_screenshot(page, "13-error-page")
    await page.get_by_role("link", name="Back to your gallery").click()
    await expect(page).to_have_url(f"{base_url}/images")
    # Chromium logs the 405 response as a console error; nothing else may appear.
    assert all("405" in error for error in console_errors), console_errors


DROPPED_PHOTOS = (
    "cameras/Canon_40D.jpg",
    "cameras/Nikon_D70.jpg",
    "cameras/Pentax_K10D.jpg",
    "cameras/Reconyx_HC500_Hyperfire.jpg",
    "cameras/Samsung_Digimax_i50_MP3.jpg",
    "gps/DSCN0010.jpg",
    "gps/DSCN0021.jpg",
    "mobile/jolla.jpg",
    "mobile/HMD_Nokia_8.3_5G.jpg",
    "tiff/BSG1.tiff",
)

# Builds a DataTransfer of files from base64 data in the page, as a drag from the desktop has.
MAKE_DATA_TRANSFER = """
(files) => {
  const transfer = new DataTransfer();
  for (const file of files) {
    const bytes = Uint8Array.from(atob(file.data), (char) => char.charCodeAt(0));
    transfer.items.add(new File([bytes], file.name, { type: file.type }));
  }
  return transfer;
}
"""


async def test_dropping_ten_photos_shows_ten_ready_rows(
    page: Page,
    base_url: str,
    worker: subprocess.Popen[bytes],
    corpus_dir: Path,
    console_errors: list[str],
) -> None:
    await sign_up(page, base_url)
    await save_screenshot(page, "empty-gallery", docs=True)
    files = [
        {
            "name": Path(photo).name,
            "type": "image/tiff" if photo.endswith(".tiff") else "image/jpeg",
            "data": base64.b64encode((corpus_dir / photo).read_bytes()).decode(),
        }
        for photo in DROPPED_PHOTOS
    ]
    transfer = await page.evaluate_handle(MAKE_DATA_TRANSFER, files)

    await page.dispatch_event("main", "drop", {"dataTransfer": transfer})

    rows = page.locator(".upload-row")
    await expect(rows).to_have_count(len(DROPPED_PHOTOS))
    await expect(rows.locator("progress").first).to_be_visible()
    await save_screenshot(page, "upload-in-progress", docs=True)
    for index in range(len(DROPPED_PHOTOS)):
        await expect(rows.nth(index).locator(".upload-state")).to_have_text("ready")
    await expect(page.locator(".tile")).to_have_count(len(DROPPED_PHOTOS))
    await page.wait_for_function(ALL_THUMBNAILS_LOADED, arg=len(DROPPED_PHOTOS))
    await expect(page.locator("#count")).to_have_text("10 images")
    await expect(page.locator("#quota")).to_contain_text(" and 10 of ")
    await expect(page.locator("#quota")).not_to_contain_text("in progress")
    names = await page.locator(".upload-row .upload-name").all_text_contents()
    await page.locator("#upload-list").evaluate("(list) => list.replaceChildren()")
    await save_screenshot(page, "grid", docs=True)
    await page.set_viewport_size(PHONE_VIEWPORT)
    phone_overflow = await page.evaluate(HORIZONTAL_OVERFLOW)
    await save_screenshot(page, "grid-phone", docs=True, full_page=False)

    await page.locator(".tile a.frame").nth(1).click()
    await expect(page.locator(".overlay")).to_be_visible()
    await page.wait_for_function("() => document.querySelector('img.display').naturalWidth > 0")
    await save_screenshot(page, "viewer-phone", docs=True, full_page=False)
    await page.set_viewport_size(DESKTOP_VIEWPORT)
    await save_screenshot(page, "viewer", docs=True, full_page=False)

    assert sorted(names) == sorted(Path(photo).name for photo in DROPPED_PHOTOS)
    assert phone_overflow == 0
    assert console_errors == []


async def test_count_and_quota_line_follow_changes_without_reload(
    page: Page,
    base_url: str,
    worker: subprocess.Popen[bytes],
    console_errors: list[str],
) -> None:
    await sign_up(page, base_url)
    quota = page.locator("#quota")
    await expect(quota).to_contain_text("You use 0 bytes")
    # A full reload would drop this mark, so the checks below see htmx's swaps only.
    await page.evaluate("() => { window.notReloaded = true; }")
    photo = {"name": "beach.jpg", "mimeType": "image/jpeg", "buffer": make_jpeg(800, 600)}
    bad = {"name": "notes.jpg", "mimeType": "image/jpeg", "buffer": b"plain text, not a photo"}

    await page.locator("#file-input").set_input_files([photo, bad])
    await expect(page.locator(".upload-row .upload-state").first).to_have_text("ready")
    await expect(page.locator(".tile-rejected")).to_have_count(1)
    await expect(quota).not_to_contain_text("0 bytes")
    await expect(quota).to_contain_text(" and 1 of ")
    await expect(quota).not_to_contain_text("in progress")
    await expect(page.locator("#count")).to_have_text("1 image")
    used_text = await quota.text_content()
    await save_screenshot(page, "quota-after-upload")

    ready_tile = page.locator(".tile", has=page.get_by_alt_text("beach.jpg"))
    await ready_tile.get_by_role("button", name="Delete beach.jpg").click()
    await expect(page.locator("#count")).to_be_hidden()
    await expect(quota).to_contain_text("That includes 1 image in the trash.")
    await page.get_by_role("button", name="Dismiss notes.jpg").click()
    await expect(page.locator(".tile")).to_have_count(0)
    await expect(page.locator("#empty")).to_be_visible()

    assert await page.evaluate("() => window.notReloaded === true")
    assert "You use 0 bytes" not in used_text
    assert console_errors == []


@pytest.fixture(scope="module")
async def short_form_url(
    settings: Settings, served_settings: Settings, store: Storage
) -> AsyncIterator[str]:
    """Hand over the URL of a `gallery serve` whose upload forms expire after 3 s."""
    # Long enough for the second form's post to reach S3 in time on a loaded machine.
    short_form = replace(served_settings, port=free_port(), upload_form_seconds=3)
    await store.ensure_bucket([settings.app_url, served_settings.app_url, short_form.app_url])
    log_path = ARTIFACTS_DIR / "browser-app-short-form.log"
    with gallery_process("serve", short_form, log_path) as process:
        await _wait_until_serving(process, short_form.app_url, log_path)
        yield short_form.app_url


async def test_expired_form_is_fetched_again_once(
    page: Page,
    short_form_url: str,
    worker: subprocess.Popen[bytes],
    settings: Settings,
    redis: ArqRedis,
    console_errors: list[str],
) -> None:
    username = await sign_up(page, short_form_url)
    user_id = (await redis.get(f"gallery:username:{username.lower()}")).decode()
    s3_statuses: list[int] = []
    form_ids: list[str] = []
    cancel_statuses: list[int] = []

    # The first post reaches S3 4 s after its form was signed, 1 s after the form expired.
    async def hold_first_post(route: Route) -> None:
        if route.request.method == "POST" and not s3_statuses:
            s3_statuses.append(0)
            await asyncio.sleep(4)
        await route.continue_()

    async def record(response: Response) -> None:
        if response.url.startswith(settings.s3_endpoint_url) and response.request.method == "POST":
            s3_statuses.append(response.status)
        elif response.url == f"{short_form_url}/uploads":
            form_ids.append((await response.json())["id"])
        elif response.request.method == "DELETE":
            cancel_statuses.append(response.status)

    page.on("response", record)
    await page.route(f"{settings.s3_endpoint_url}/**", hold_first_post)
    photo = {"name": "late.jpg", "mimeType": "image/jpeg", "buffer": make_jpeg()}

    await page.locator("#file-input").set_input_files([photo])

    await expect(page.locator(".upload-row .upload-state")).to_have_text("ready")
    await page.wait_for_function(ALL_THUMBNAILS_LOADED, arg=1)
    assert s3_statuses[1:] == [403, 201]
    assert len(form_ids) == 2
    assert cancel_statuses == [200]
    assert await redis.exists(f"gallery:upload:{form_ids[0]}") == 0
    assert await redis.zscore("gallery:pending", form_ids[0]) is None
    assert await redis.zcard(f"gallery:user-pending:{user_id}") == 0
    assert (await redis.hget(f"gallery:upload:{form_ids[1]}", "state")) == b"ready"
    # Chromium logs the 403 from S3 as a console error; nothing else may appear.
    assert all("403" in error for error in console_errors), console_errors


@pytest.mark.parametrize("status", [422, 500])
async def test_failed_completion_shows_message_quickly(
    page: Page, base_url: str, status: int, console_errors: list[str]
) -> None:
    await sign_up(page, base_url)
    grid_before = await page.locator("#grid").inner_html()
    completions: list[float] = []

    async def fail(route: Route) -> None:
        completions.append(time.monotonic())
        await route.fulfill(
            status=status, content_type="text/plain", body="The check could not be queued."
        )

    await page.route(re.compile(r"/uploads/\w+/complete$"), fail)
    photo = {"name": "photo.jpg", "mimeType": "image/jpeg", "buffer": make_jpeg()}

    await page.locator("#file-input").set_input_files([photo])

    await wait_for_length(completions, 1)
    row = page.locator(".upload-row")
    await expect(row.locator(".upload-state")).to_have_text(
        "failed: The check could not be queued.", timeout=2000
    )
    shown_after = time.monotonic() - completions[0]
    await expect(row.get_by_role("button", name="Retry the upload of photo.jpg")).to_be_visible()
    await save_screenshot(page, f"completion-{status}")
    assert shown_after < 2
    assert await page.locator("#grid").inner_html() == grid_before
    assert await page.locator(".tile").count() == 0
    await expect(page.locator("#empty")).to_be_visible()
    assert all(str(status) in error for error in console_errors), console_errors


async def test_no_javascript_upload_view_delete_restore(
    browser: Browser, base_url: str, worker: subprocess.Popen[bytes], corpus_dir: Path
) -> None:
    context = await browser.new_context(viewport=DESKTOP_VIEWPORT, java_script_enabled=False)
    context.set_default_timeout(TIMEOUT_MS)
    page = await context.new_page()
    await sign_up(page, base_url, javascript=False)

    await page.get_by_role("link", name="Add a photo").click()
    await page.get_by_label("Photo").set_input_files(corpus_dir / "cameras/Canon_40D.jpg")
    await save_screenshot(page, "no-js-upload-form")
    await page.get_by_role("button", name="Upload").click()
    await expect(page).to_have_url(re.compile(rf"{re.escape(base_url)}/images/\w+/view"))
    # The status page reloads itself every 2 s until the worker has made the renditions.
    await expect(page.locator(".viewer-page img.display")).to_be_visible()
    await page.wait_for_function("() => document.querySelector('img.display').naturalWidth > 0")
    name = (await page.locator(".viewer-info .name").text_content()).strip()
    await page.get_by_role("link", name="Close and go back to all photos").click()
    await expect(page.locator(".tile")).to_have_count(1)
    await page.locator(".tile a.frame").click()
    await expect(page.locator(".viewer-page img.display")).to_be_visible()

    await page.get_by_role("button", name=f"Delete {name}").click()
    await expect(page.locator("#messages")).to_contain_text(f"Moved {name} to the trash.")
    await expect(page.locator(".tile")).to_have_count(0)
    await page.get_by_role("button", name=f"Undo: restore {name}").click()
    await expect(page).to_have_url(f"{base_url}/images")
    await expect(page.locator(".tile")).to_have_count(1)

    await page.get_by_role("button", name=f"Delete {name}").click()
    await page.get_by_role("link", name="Open the trash").click()
    await expect(page.locator(".tile")).to_have_count(1)
    await page.get_by_role("button", name=f"Restore {name}").click()
    await expect(page.locator("#messages")).to_contain_text(f"Restored {name}.")
    await expect(page.locator(".tile")).to_have_count(0)
    await page.get_by_role("link", name="See it in your gallery").click()
    await expect(page.locator(".tile")).to_have_count(1)
    await context.close()

    assert name.startswith("Photo ")
    assert name.endswith(".jpg")


async def test_empty_gallery_names_what_page_offers(
    browser: Browser, page: Page, base_url: str, console_errors: list[str]
) -> None:
    context = await browser.new_context(viewport=DESKTOP_VIEWPORT, java_script_enabled=False)
    context.set_default_timeout(TIMEOUT_MS)
    plain_page = await context.new_page()
    await sign_up(plain_page, base_url, javascript=False)
    await save_screenshot(plain_page, "no-js-empty-gallery")
    plain_text = await plain_page.locator("#empty").inner_text()
    await context.close()

    await sign_up(page, base_url)

    await expect(page.locator("#empty")).to_have_text(
        "No photos yet. Choose “Add photos”, or drop photos on this page, to upload your first ones."
    )
    assert plain_text == "No photos yet. Choose “Add a photo” to upload your first one."
    assert console_errors == []


async def test_unreachable_gallery_shows_plain_failure(
    page: Page, base_url: str, console_errors: list[str]
) -> None:
    await sign_up(page, base_url)
    await page.route(re.compile(r"/uploads$"), lambda route: route.abort("connectionrefused"))
    photo = {"name": "offline.jpg", "mimeType": "image/jpeg", "buffer": make_jpeg()}

    await page.locator("#file-input").set_input_files([photo])

    await expect(page.locator(".upload-row .upload-state")).to_have_text(
        "failed: the gallery could not be reached. Check the connection, then choose Retry."
    )
    await save_screenshot(page, "upload-unreachable")
    assert all("ERR_CONNECTION_REFUSED" in error for error in console_errors), console_errors


async def test_ended_session_signs_in_back_to_trash(
    page: Page, base_url: str, redis: ArqRedis, console_errors: list[str]
) -> None:
    username = await sign_up(page, base_url)
    await page.goto(f"{base_url}/trash")
    cookies = await page.context.cookies()
    session_id = next(cookie["value"] for cookie in cookies if cookie["name"] == "session")
    await redis.delete(f"gallery:sessions:{session_id}")

    await page.reload()

    await expect(page.locator(".account .note")).to_have_text(
        "Your session ended. Sign in again to go back to the page you had open."
    )
    await save_screenshot(page, "signin-session-ended")
    await page.get_by_label("Username").fill(username)
    await page.get_by_label("Password").fill(TEST_PASSWORD)
    await page.get_by_role("button", name="Sign in").click()
    await expect(page).to_have_url(f"{base_url}/trash")
    assert console_errors == []


async def test_scrolling_loads_150_images_in_order(
    page: Page, base_url: str, served_settings: Settings, store: Storage, redis: ArqRedis
) -> None:
    username = await sign_up(page, base_url)
    user_id = (await redis.get(f"gallery:username:{username.lower()}")).decode()
    seeded = await seed_grid(redis, user_id, 150, ready=True)
    thumbnail = webp_thumbnail()
    keys = [
        key
        for image_id in seeded
        for key in (
            storage.thumbnail_key(user_id, image_id),
            storage.thumbnail_2x_key(user_id, image_id),
        )
    ]
    for start in range(0, len(keys), 25):
        await asyncio.gather(
            *(
                store.write(key, thumbnail, content_type="image/webp", metadata={"owner": user_id})
                for key in keys[start : start + 25]
            )
        )

    await page.reload()
    tiles = page.locator(".tile")
    await expect(tiles).to_have_count(served_settings.page_size)
    while await page.locator(".older").count():
        shown = await tiles.count()
        await page.locator(".older").scroll_into_view_if_needed()
        await expect(tiles).not_to_have_count(shown)

    tile_ids = await tiles.evaluate_all("(tiles) => tiles.map((tile) => tile.id)")
    assert len(tile_ids) == 150
    assert len(set(tile_ids)) == 150
    # Ids sort by creation time, so the grid shows them in descending order.
    assert tile_ids == [f"tile-{image_id}" for image_id in sorted(seeded, reverse=True)]
    await expect(page.locator("#count")).to_have_text("150 images")


async def test_viewer_follows_arrow_keys_and_escape(
    page: Page, base_url: str, worker: subprocess.Popen[bytes], console_errors: list[str]
) -> None:
    await sign_up(page, base_url)
    colors = {"red.jpg": (200, 40, 40), "green.jpg": (40, 160, 40), "blue.jpg": (40, 40, 200)}
    for name, color in colors.items():
        photo = {"name": name, "mimeType": "image/jpeg", "buffer": make_jpeg(color=color)}
        await page.locator("#file-input").set_input_files([photo])
        await page.wait_for_function(
            ALL_THUMBNAILS_LOADED, arg=len(await page.locator(".tile").all())
        )
        await expect(page.locator(".upload-row .upload-state").last).to_have_text("ready")
    await expect(page.locator(".tile")).to_have_count(3)
    ids = await page.locator(".tile").evaluate_all(
        "(tiles) => tiles.map((tile) => tile.id.slice(5))"
    )
    name = page.locator(".overlay .viewer-info .name")

    await page.locator(".tile a.frame").first.click()
    await expect(name).to_have_text("blue.jpg")
    await expect(page).to_have_url(f"{base_url}/images/{ids[0]}/view")
    await page.keyboard.press("ArrowRight")
    await expect(name).to_have_text("green.jpg")
    await expect(page).to_have_url(f"{base_url}/images/{ids[1]}/view")
    await page.keyboard.press("ArrowRight")
    await expect(name).to_have_text("red.jpg")
    await expect(page.locator(".overlay a.viewer-next")).to_have_count(0)
    await page.keyboard.press("ArrowLeft")
    await expect(name).to_have_text("green.jpg")
    await expect(page).to_have_url(f"{base_url}/images/{ids[1]}/view")
    await page.keyboard.press("Escape")
    await expect(page.locator(".overlay")).to_have_count(0)
    await expect(page).to_have_url(f"{base_url}/images")
    await expect(page.locator(".tile a.frame").nth(1)).to_be_focused()
    # Back and Forward after Escape: the page follows the URL each way.
    await page.go_back()
    await expect(page).to_have_url(f"{base_url}/images/{ids[1]}/view")
    await expect(page.locator("#viewer-frame .name")).to_have_text("green.jpg")
    await page.go_forward()
    await expect(page).to_have_url(f"{base_url}/images")
    await expect(page.locator("#viewer-frame")).to_have_count(0)
    await expect(page.locator(".tile")).to_have_count(3)

    await page.goto(f"{base_url}/images/{ids[1]}/view")
    await page.keyboard.press("ArrowRight")
    await expect(page).to_have_url(f"{base_url}/images/{ids[2]}/view")
    await expect(page.locator(".viewer-page .name")).to_have_text("red.jpg")
    await page.keyboard.press("Escape")
    await expect(page).to_have_url(f"{base_url}/images")
    assert console_errors == []


async def test_trash_undo_restore_and_delete_forever(
    page: Page,
    base_url: str,
    worker: subprocess.Popen[bytes],
    store: Storage,
    redis: ArqRedis,
    console_errors: list[str],
) -> None:
    await sign_up(page, base_url)
    photos = [
        {"name": "older.jpg", "mimeType": "image/jpeg", "buffer": make_jpeg(color=(40, 40, 200))},
        {"name": "newer.jpg", "mimeType": "image/jpeg", "buffer": make_jpeg(color=(200, 40, 40))},
    ]
    for photo in photos:
        await page.locator("#file-input").set_input_files([photo])
        await expect(page.locator(".upload-row .upload-state").last).to_have_text("ready")
    await page.wait_for_function(ALL_THUMBNAILS_LOADED, arg=2)
    older_tile = page.locator(".tile", has=page.get_by_alt_text("older.jpg"))
    image_id = (await older_tile.get_attribute("id")).removeprefix("tile-")
    user_id = (await redis.hget(f"gallery:upload:{image_id}", "user_id")).decode()

    async def fail(route: Route) -> None:
        await route.fulfill(
            status=500, content_type="text/plain", body="Something went wrong on our side."
        )

    await page.route(re.compile(r"/images/\w+/trash$"), fail)
    await older_tile.get_by_role("button", name="Delete older.jpg").click()
    await expect(page.locator("#messages .error")).to_have_text("Something went wrong on our side.")
    await expect(page.locator(".tile")).to_have_count(2)
    await page.unroute(re.compile(r"/images/\w+/trash$"))

    await older_tile.get_by_role("button", name="Delete older.jpg").click()
    await expect(page.locator("#messages")).to_contain_text("Moved older.jpg to the trash.")
    await expect(page.locator(".tile")).to_have_count(1)
    await expect(page.locator("#count")).to_have_text("1 image")
    await page.get_by_role("button", name="Undo: restore older.jpg").click()
    await expect(page.locator(".tile")).to_have_count(2)
    await expect(page.locator(".tile").nth(1)).to_have_id(f"tile-{image_id}")
    await expect(page.locator("#count")).to_have_text("2 images")

    await older_tile.get_by_role("button", name="Delete older.jpg").click()
    await expect(page.locator(".tile")).to_have_count(1)
    await page.get_by_role("link", name="Trash", exact=True).click()
    await expect(page.locator(".tile")).to_have_count(1)
    await page.wait_for_function(ALL_THUMBNAILS_LOADED, arg=1)
    await expect(page.locator("#count")).to_have_text("1 photo in the trash")
    await save_screenshot(page, "trash", docs=True, full_page=False)
    await page.get_by_role("button", name="Restore older.jpg").click()
    await expect(page.locator("#messages")).to_contain_text("Restored older.jpg.")
    await expect(page.locator(".tile")).to_have_count(0)
    await expect(page.locator("#empty")).to_be_visible()

    await page.get_by_role("link", name="See it in your gallery").click()
    await expect(page.locator(".tile")).to_have_count(2)
    await (
        page.locator(".tile", has=page.get_by_alt_text("older.jpg"))
        .get_by_role("button", name="Delete older.jpg")
        .click()
    )
    await expect(page.locator(".tile")).to_have_count(1)
    await page.goto(f"{base_url}/trash")
    page.on("dialog", lambda dialog: dialog.accept())
    await page.get_by_role("button", name="Delete forever older.jpg").click()
    await expect(page.locator(".tile")).to_have_count(0)
    await expect(page.locator("#empty")).to_have_text("The trash is empty.")

    assert await redis.exists(f"gallery:upload:{image_id}") == 0
    for key in storage.image_keys(user_id, image_id):
        assert await store.head(key) is None
    # Chromium logs the routed 500 as a console error; nothing else may appear.
    assert all("500" in error for error in console_errors), console_errors


async def test_keyboard_focus_follows_delete_and_undo(
    page: Page, base_url: str, worker: subprocess.Popen[bytes], console_errors: list[str]
) -> None:
    await sign_up(page, base_url)
    tile = await upload_ready_photo(page, "keys.jpg")

    # htmx takes over a swapped-in form once the swap has settled; before that, Enter
    # sends the form without JavaScript.
    settling = page.locator(".htmx-added, .htmx-settling, .htmx-swapping")
    await expect(settling).to_have_count(0)
    await tile.get_by_role("button", name="Delete keys.jpg").focus()
    await page.keyboard.press("Enter")
    undo = page.get_by_role("button", name="Undo: restore keys.jpg")
    await expect(undo).to_be_focused()
    await expect(settling).to_have_count(0)
    await page.keyboard.press("Enter")

    await expect(page.locator(".tile a.frame")).to_be_focused()
    assert console_errors == []


async def test_undo_replaces_notice_with_passing_note(
    page: Page, base_url: str, worker: subprocess.Popen[bytes], console_errors: list[str]
) -> None:
    await sign_up(page, base_url)
    tile = await upload_ready_photo(page, "undone.jpg")

    await tile.get_by_role("button", name="Delete undone.jpg").click()
    await expect(page.locator("#messages")).to_contain_text("Moved undone.jpg to the trash.")
    await page.get_by_role("button", name="Undo: restore undone.jpg").click()

    await expect(page.locator(".tile")).to_have_count(1)
    await expect(page.locator("#messages .note")).to_have_text("Restored undone.jpg.")
    await expect(page.locator("#messages button")).to_have_count(0)
    await save_screenshot(page, "undo-restored")
    # The note goes away by itself, as gallery.js's other notes do.
    await expect(page.locator("#messages .note")).to_have_count(0)
    assert console_errors == []


async def test_stale_trash_tab_cannot_delete_restored_photo(
    page: Page,
    base_url: str,
    worker: subprocess.Popen[bytes],
    redis: ArqRedis,
    console_errors: list[str],
) -> None:
    await sign_up(page, base_url)
    for name in ("kept.jpg", "gone.jpg"):
        await upload_ready_photo(page, name)
    for name in ("kept.jpg", "gone.jpg"):
        tile = page.locator(".tile", has=page.get_by_alt_text(name))
        await tile.get_by_role("button", name=f"Delete {name}").click()
        await expect(tile).to_have_count(0)
    await page.goto(f"{base_url}/trash")
    await expect(page.locator("#count")).to_have_text("2 photos in the trash")
    kept_tile = page.locator(".tile", has=page.get_by_alt_text("kept.jpg"))
    kept_id = (await kept_tile.get_attribute("id")).removeprefix("tile-")
    other_tab = await page.context.new_page()
    await other_tab.goto(f"{base_url}/trash")
    await other_tab.get_by_role("button", name="Restore kept.jpg").click()
    await expect(other_tab.locator("#messages")).to_contain_text("Restored kept.jpg.")
    page.on("dialog", lambda dialog: dialog.accept())

    await kept_tile.get_by_role("button", name="Delete forever kept.jpg").click()

    await expect(page.locator("#messages .error")).to_have_text(
        "kept.jpg is in your gallery, not in the trash, so it was not deleted."
    )
    await expect(kept_tile).to_have_count(0)
    await expect(page.locator("#count")).to_have_text("1 photo in the trash")
    await save_screenshot(page, "trash-stale-delete")
    assert (await redis.hget(f"gallery:upload:{kept_id}", "state")) == b"ready"

    await page.get_by_role("button", name="Delete forever gone.jpg").click()

    await expect(page.locator("#messages .note")).to_have_text("Deleted gone.jpg forever.")
    await expect(page.locator("#empty")).to_have_text("The trash is empty.")
    await expect(page.locator("#count")).to_be_hidden()
    await save_screenshot(page, "trash-deleted-forever")
    # Chromium logs the 409 as a failed resource load; nothing else may appear.
    assert all("409" in error for error in console_errors), console_errors


async def test_network_error_offers_retry_that_succeeds(
    page: Page,
    base_url: str,
    worker: subprocess.Popen[bytes],
    settings: Settings,
    console_errors: list[str],
) -> None:
    await sign_up(page, base_url)
    aborted: list[str] = []

    async def drop_first_post(route: Route) -> None:
        if route.request.method == "POST" and not aborted:
            aborted.append(route.request.url)
            await route.abort("connectionreset")
            return
        await route.continue_()

    await page.route(f"{settings.s3_endpoint_url}/**", drop_first_post)
    photo = {"name": "flaky.jpg", "mimeType": "image/jpeg", "buffer": make_jpeg()}

    await page.locator("#file-input").set_input_files([photo])

    row = page.locator(".upload-row")
    await expect(row.locator(".upload-state")).to_have_text("failed: network error")
    await expect(page.locator(".tile")).to_have_count(0)
    await row.get_by_role("button", name="Retry the upload of flaky.jpg").click()
    await expect(row.locator(".upload-state")).to_have_text("ready")
    await expect(page.locator(".tile")).to_have_count(1)
    assert len(aborted) == 1
    assert all("ERR_CONNECTION_RESET" in error for error in console_errors), console_errors


async def test_tile_polling_survives_outage(
    page: Page,
    base_url: str,
    worker: subprocess.Popen[bytes],
    console_errors: list[str],
) -> None:
    await sign_up(page, base_url)
    failed_polls: list[str] = []

    async def fail_first_two_polls(route: Route) -> None:
        if not failed_polls:
            failed_polls.append("503")
            await route.fulfill(
                status=503,
                headers={"Retry-After": "1"},
                content_type="text/plain",
                body=UNAVAILABLE_TEXT,
            )
        elif len(failed_polls) == 1:
            failed_polls.append("connection refused")
            await route.abort("connectionrefused")
        else:
            await route.continue_()

    await page.route(TILE_URL, fail_first_two_polls)
    photo = {"name": "outage.jpg", "mimeType": "image/jpeg", "buffer": make_jpeg()}

    await page.locator("#file-input").set_input_files([photo])

    await wait_for_length(failed_polls, 2)
    await expect(page.locator("#messages .error")).to_be_visible()
    await save_screenshot(page, "tile-poll-failed")
    row = page.locator(".upload-row")
    await expect(row.locator(".upload-state")).to_have_text("ready")
    await expect(page.locator(".tile")).to_have_attribute("data-state", "ready")
    await expect(page.locator(".tile")).to_have_count(1)
    await expect(page.locator("#messages .error")).to_have_count(0)
    await save_screenshot(page, "tile-poll-recovered")
    # htmx logs its afterRequest and sendError events for a request that got no response.
    expected_errors = ("503", "ERR_CONNECTION_REFUSED", "htmx:afterRequest", "htmx:sendError")
    unexpected = [
        error for error in console_errors if not any(text in error for text in expected_errors)
    ]
    assert unexpected == [], unexpected


async def test_done_retry_sends_no_second_copy(
    page: Page,
    base_url: str,
    worker: subprocess.Popen[bytes],
    settings: Settings,
    console_errors: list[str],
) -> None:
    await sign_up(page, base_url)
    s3_posts: list[str] = []
    completions: list[str] = []

    def record_s3_post(request: Request) -> None:
        if request.method == "POST" and request.url.startswith(settings.s3_endpoint_url):
            s3_posts.append(request.url)

    async def fail_first_done(route: Route) -> None:
        completions.append(route.request.url)
        if len(completions) > 1:
            await route.continue_()
            return
        await route.fulfill(
            status=503,
            headers={"Retry-After": "30"},
            content_type="text/plain",
            body=UNAVAILABLE_TEXT,
        )

    page.on("request", record_s3_post)
    await page.route(re.compile(r"/uploads/\w+/complete$"), fail_first_done)
    photo = {"name": "stored.jpg", "mimeType": "image/jpeg", "buffer": make_jpeg()}

    await page.locator("#file-input").set_input_files([photo])

    row = page.locator(".upload-row")
    await expect(row.locator(".upload-state")).to_have_text(
        "failed: the gallery cannot reach its database or file storage right now."
        " Wait 30 seconds, then choose Retry."
    )
    await expect(row.get_by_role("button", name="Retry the upload of stored.jpg")).to_be_visible()
    await save_screenshot(page, "done-503-failed-row")
    await row.get_by_role("button", name="Retry the upload of stored.jpg").click()
    await expect(row.locator(".upload-state")).to_have_text("ready")
    await expect(page.locator(".tile")).to_have_count(1)
    await expect(page.locator(".tile")).to_have_attribute("data-state", "ready")
    await save_screenshot(page, "done-503-retried")
    assert len(s3_posts) == 1, s3_posts
    assert len(completions) == 2, completions
    assert completions[0] == completions[1]
    # The gallery page queues uploads whose file is in S3 but was never reported done.
    # The retried upload was reported done, so a reload must not add it a second time.
    await page.reload()
    await expect(page.locator(".tile")).to_have_count(1)
    await expect(page.get_by_alt_text("stored.jpg")).to_have_count(1)
    assert all("503" in error for error in console_errors), console_errors


async def test_cancel_stops_upload_and_frees_its_slot(
    page: Page, base_url: str, settings: Settings, redis: ArqRedis
) -> None:
    username = await sign_up(page, base_url)
    user_id = (await redis.get(f"gallery:username:{username.lower()}")).decode()
    held = asyncio.Event()
    released = asyncio.Event()
    cancel_statuses: list[int] = []

    async def hold_post(route: Route) -> None:
        if route.request.method != "POST":
            await route.continue_()
            return
        held.set()
        await released.wait()
        # The page's own abort may have ended the request already.
        with suppress(Error):
            await route.abort()

    def record_cancel(response: Response) -> None:
        if response.request.method == "DELETE":
            cancel_statuses.append(response.status)

    page.on("response", record_cancel)
    await page.route(f"{settings.s3_endpoint_url}/**", hold_post)
    photo = {"name": "stopped.jpg", "mimeType": "image/jpeg", "buffer": make_jpeg()}
    await page.locator("#file-input").set_input_files([photo])
    async with asyncio.timeout(TIMEOUT_MS / 1000):
        await held.wait()

    await page.get_by_role("button", name="Cancel the upload of stopped.jpg").click()
    released.set()

    await expect(page.locator(".upload-row .upload-state")).to_have_text("cancelled")
    await wait_for_length(cancel_statuses, 1)
    assert cancel_statuses == [200]
    assert await redis.zcard(f"gallery:user-pending:{user_id}") == 0
    await page.reload()
    await expect(page.locator("#empty")).to_be_visible()
    assert await page.locator(".tile").count() == 0


def webp_thumbnail() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (64, 48), (90, 120, 160)).save(buffer, "WEBP")
    return buffer.getvalue()


async def sign_up(page: Page, base_url: str, *, javascript: bool = True) -> str:
    """Sign up as a new user through the form and return the username."""
    username = f"browser{secrets.token_hex(4)}"
    if not page.url.endswith("/signup"):
        await page.goto(f"{base_url}/signup")
    await page.get_by_label("Username").fill(username)
    await page.get_by_label("Password").fill(TEST_PASSWORD)
    await page.get_by_role("button", name="Sign up").click()
    await expect(page).to_have_url(f"{base_url}/images")
    # upload.js shows the picker once it listens for files, so files chosen now are seen.
    if javascript:
        await expect(page.locator("#picker-row")).to_be_visible()
    return username


async def wait_for_length(items: list[str], length: int) -> None:
    """Wait until event handlers have appended `length` items to `items`."""
    async with asyncio.timeout(TIMEOUT_MS / 1000):
        while len(items) < length:
            await asyncio.sleep(0.05)


async def thumbnail_size(page: Page, filename: str) -> dict[str, int]:
    """Return the pixel size of the thumbnail file that the tile of `filename` shows."""
    return await page.get_by_alt_text(filename).evaluate(
        "(image) => ({width: image.naturalWidth, height: image.naturalHeight})"
    )


async def upload_ready_photo(page: Page, name: str) -> Locator:
    """Upload a JPEG named `name`, wait for its row to show "ready", and return its tile."""
    photo = {"name": name, "mimeType": "image/jpeg", "buffer": make_jpeg()}
    await page.locator("#file-input").set_input_files([photo])
    await expect(page.locator(".upload-row .upload-state").last).to_have_text("ready")
    return page.locator(".tile", has=page.get_by_alt_text(name))


async def save_screenshot(
    page: Page, name: str, *, docs: bool = False, full_page: bool = True
) -> None:
    """Save a screenshot in test-artifacts; `docs` marks one meant for docs/screenshots."""
    ARTIFACTS_DIR.mkdir(exist_ok=True)
    prefix = "docs" if docs else "browser"
    await page.screenshot(path=ARTIFACTS_DIR / f"{prefix}-{name}.png", full_page=full_page)


async def _wait_until_serving(process: subprocess.Popen[bytes], url: str, log_path: Path) -> None:
    deadline = time.monotonic() + STARTUP_SECONDS
    async with httpx.AsyncClient(timeout=2) as http:
        while True:
            _check_running(process, log_path)
            try:
                response = await http.get(f"{url}/signin")
                if response.status_code == 200:
                    return
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"{url}/signin did not return 200 within {STARTUP_SECONDS} s, see {log_path}"
                )
            await asyncio.sleep(0.1)


async def _wait_for_log_line(process: subprocess.Popen[bytes], log_path: Path, line: str) -> None:
    deadline = time.monotonic() + STARTUP_SECONDS
    while line not in log_path.read_text(errors="replace"):
        _check_running(process, log_path)
        if time.monotonic() > deadline:
            raise TimeoutError(
                f"timed out after {STARTUP_SECONDS} s waiting for {line!r} in {log_path}"
            )
        await asyncio.sleep(0.1)


def _check_running(process: subprocess.Popen[bytes], log_path: Path) -> None:
    if process.poll() is not None:
        tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-20:])
        raise RuntimeError(f"{process.args} exited with code {process.returncode}:\n{tail}")
