"""Chromium shares photos from the grid, opens the link elsewhere, then finds it revoked.

The served app, worker and browser come from test_browser.py's fixtures, started again
for this module. Screenshots go to `test-artifacts/` in the repository root.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
from playwright.async_api import Browser, Page, expect

from tests import test_browser
from tests.support import make_jpeg
from tests.test_browser import (
    ALL_THUMBNAILS_LOADED,
    DESKTOP_VIEWPORT,
    HORIZONTAL_OVERFLOW,
    PHONE_VIEWPORT,
    PHOTOS,
    TIMEOUT_MS,
    save_screenshot,
    sign_up,
)

# pytest finds fixtures by name in the test's module, so these make test_browser.py's
# fixtures available here, each started again for this module.
chromium_path = test_browser.chromium_path
served_settings = test_browser.served_settings
base_url = test_browser.base_url
worker = test_browser.worker
browser = test_browser.browser
console_errors = test_browser.console_errors
page = test_browser.page
set_expect_timeout = test_browser._set_expect_timeout

pytestmark = pytest.mark.browser

# True once every image on a shared page has been fetched and decoded.
ALL_IMAGES_LOADED = """
(count) => {
  const images = Array.from(document.querySelectorAll("img.thumbnail, img.display"));
  return images.length === count && images.every((image) => image.complete && image.naturalWidth > 0);
}
"""


async def test_share_from_grid_then_revoke(
    page: Page,
    browser: Browser,
    base_url: str,
    worker: subprocess.Popen[bytes],
    corpus_dir: Path,
    console_errors: list[str],
) -> None:
    await sign_up(page, base_url)
    await page.locator("#file-input").set_input_files([corpus_dir / photo for photo in PHOTOS])
    await page.wait_for_function(ALL_THUMBNAILS_LOADED, arg=len(PHOTOS))
    for name in ("Canon_40D.jpg", "Portrait_6.jpg"):
        tile = page.locator(".tile", has=page.get_by_alt_text(name))
        await tile.get_by_label("Select").check()

    await save_screenshot(page, "share-0-selected")
    await page.get_by_role("button", name="Share selected").click()
    await expect(page.get_by_role("heading", name="Share 2 photos")).to_be_visible()
    await page.get_by_label("Title").fill("Summer at the lake")
    await page.get_by_label("The link expires in").select_option(label="3 days")
    await page.get_by_label("Allow downloading the original files").check()
    await save_screenshot(page, "share-1-new")
    await page.get_by_role("button", name="Create link").click()
    await expect(
        page.get_by_role("heading", name="Link created: Summer at the lake")
    ).to_be_visible()
    link = await page.locator("#share-link").input_value()
    await expect(page.locator(".who")).to_be_visible()
    await save_screenshot(page, "share-2-created")

    # A visitor without an account, and with JavaScript off, opens the link.
    visitor_context = await browser.new_context(
        viewport=DESKTOP_VIEWPORT, java_script_enabled=False
    )
    visitor_context.set_default_timeout(TIMEOUT_MS)
    visitor = await visitor_context.new_page()
    await visitor.goto(link)
    await expect(visitor.get_by_role("heading", name="Summer at the lake")).to_be_visible()
    await expect(visitor.locator(".tile")).to_have_count(2)
    await visitor.wait_for_function(ALL_IMAGES_LOADED, arg=2)
    await expect(visitor.get_by_alt_text("DSCN0010.jpg")).to_have_count(0)
    shared_text = await visitor.locator("main").inner_text()
    await save_screenshot(visitor, "share-3-shared-page")
    await visitor.set_viewport_size(PHONE_VIEWPORT)
    phone_overflow = await visitor.evaluate(HORIZONTAL_OVERFLOW)
    await save_screenshot(visitor, "share-3-shared-page-phone")
    await visitor.set_viewport_size(DESKTOP_VIEWPORT)
    await (
        visitor.locator(".tile", has=visitor.get_by_alt_text("Portrait_6.jpg"))
        .locator("a.frame")
        .click()
    )
    await expect(visitor).to_have_url(re.compile(re.escape(link) + r"/\w+$"))
    await visitor.wait_for_function(ALL_IMAGES_LOADED, arg=1)
    display = await visitor.locator("img.display").evaluate(
        "(image) => ({width: image.naturalWidth, height: image.naturalHeight})"
    )
    await expect(visitor.get_by_role("link", name="Download original")).to_be_visible()
    await save_screenshot(visitor, "share-4-shared-viewer")

    # The owner manages the link with JavaScript off too, in a context with the same session.
    owner_context = await browser.new_context(
        viewport=DESKTOP_VIEWPORT,
        java_script_enabled=False,
        storage_state=await page.context.storage_state(),
    )
    owner_context.set_default_timeout(TIMEOUT_MS)
    owner = await owner_context.new_page()
    await owner.goto(f"{base_url}/shares")
    row = owner.locator(".share-row", has_text="Summer at the lake")
    await expect(row.locator(".share-status")).to_contain_text("(in 3 days) · 2 photos")
    await expect(row.locator(".share-status")).to_contain_text("1 view, last")
    await expect(row.locator(".share-thumbnails img")).to_have_count(2)
    await save_screenshot(owner, "share-5-manage")
    await row.get_by_label("Extend by").select_option(label="1 day")
    await row.get_by_role("button", name="Extend").click()
    await expect(row.locator(".share-status")).to_contain_text("(in 4 days)")
    await row.get_by_role("button", name="Revoke").click()
    await expect(row.locator(".share-status")).to_contain_text("Revoked")
    await save_screenshot(owner, "share-6-revoked")
    owner_url = owner.url
    await owner_context.close()

    response = await visitor.reload()
    await save_screenshot(visitor, "share-7-revoked-link")
    assert response is not None
    assert response.status == 404
    await expect(
        visitor.get_by_text("This link does not exist, has expired or was revoked.")
    ).to_be_visible()
    # The visitor has no account, so the page links nowhere into the app.
    await expect(visitor.get_by_role("link", name="Back to your gallery")).to_have_count(0)
    await expect(visitor.locator("a[href^='/']")).to_have_count(0)
    await visitor_context.close()

    assert owner_url == f"{base_url}/shares"
    assert display == {"width": 1067, "height": 1600}
    assert phone_overflow == 0
    assert "expires" in shared_text
    assert "Shared by" not in shared_text
    assert console_errors == []


async def test_share_pages_long_title_and_limits(
    page: Page, base_url: str, worker: subprocess.Popen[bytes], console_errors: list[str]
) -> None:
    await sign_up(page, base_url)
    photo = {"name": "card.jpg", "mimeType": "image/jpeg", "buffer": make_jpeg()}
    await page.locator("#file-input").set_input_files([photo])
    await page.wait_for_function(ALL_THUMBNAILS_LOADED, arg=1)
    await expect(page.locator("#share-limit")).to_have_text("Up to 100 photos per link")

    await page.get_by_role("button", name="Share selected").click()

    await expect(page.locator("#messages .error")).to_have_text(
        "Select at least one photo, then choose “Share selected”."
    )
    await expect(page).to_have_url(f"{base_url}/images")
    await save_screenshot(page, "share-none-selected")
    # Without JavaScript the form reaches the server, whose page shows the same message.
    await page.goto(f"{base_url}/shares/new")
    await expect(page.get_by_role("heading", name="No photos selected")).to_be_visible()
    await save_screenshot(page, "share-none-selected-server")
    await page.go_back()

    await page.get_by_label("Select").check()
    await page.get_by_role("button", name="Share selected").click()
    title = "x" * 100
    await page.get_by_label("Title").fill(title)
    await page.get_by_label("The link expires in").select_option(label="30 days")
    await page.get_by_role("button", name="Create link").click()
    await expect(page.locator("#share-link")).to_be_visible()
    await page.goto(f"{base_url}/shares")
    card = page.locator(".share-row")
    await expect(card.locator("h2")).to_have_text(title)
    card_box = await card.bounding_box()
    title_box = await card.locator("h2").bounding_box()
    title_overflow = await card.locator("h2").evaluate("(h2) => h2.scrollWidth - h2.clientWidth")
    page_overflow = await page.evaluate(HORIZONTAL_OVERFLOW)
    await save_screenshot(page, "share-long-title")
    await page.set_viewport_size(PHONE_VIEWPORT)
    phone_overflow = await page.evaluate(HORIZONTAL_OVERFLOW)
    await save_screenshot(page, "share-long-title-phone")
    await page.set_viewport_size(DESKTOP_VIEWPORT)

    await card.get_by_role("button", name="Extend").click()

    await expect(page.locator("#messages .note")).to_contain_text(
        f"A link lasts at most 30 days, so “{title}” now expires"
    )
    await save_screenshot(page, "share-extend-capped")
    assert title_box["x"] + title_box["width"] <= card_box["x"] + card_box["width"]
    assert title_overflow == 0
    assert page_overflow == 0
    assert phone_overflow == 0
    # Chromium logs the 400 of the page without a selection; nothing else may appear.
    assert all("400 (Bad Request)" in error for error in console_errors), console_errors
