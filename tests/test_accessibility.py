"""axe-core in Chromium on every page the gallery shows: no serious or critical violation.

axe-core comes bundled in axe-playwright-python and is injected into each page in its
current state, after the step that shows what is checked. The served app, worker and
browser come from test_browser.py's fixtures, started again for this module. Screenshots
of each checked page go to `test-artifacts/` in the repository root.
"""

from __future__ import annotations

import asyncio
import re
import subprocess
from contextlib import suppress
from pathlib import Path

import pytest
from axe_playwright_python.async_playwright import Axe
from playwright.async_api import Browser, BrowserContext, Error, Page, Route, expect

from gallery.settings import Settings
from tests import test_browser
from tests.support import make_jpeg
from tests.test_browser import (
    ALL_THUMBNAILS_LOADED,
    DESKTOP_VIEWPORT,
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
set_expect_timeout = test_browser._set_expect_timeout

pytestmark = pytest.mark.browser

# axe-core's impact levels that fail the test. "minor" and "moderate" are printed only.
FAILING_IMPACTS = ("serious", "critical")
# axe-core's default rules, plus its experimental check that a control's visible text is
# part of its accessible name (WCAG 2.5.3, Label in Name).
AXE_OPTIONS = {
    "resultTypes": ["violations"],
    "rules": {"label-content-name-mismatch": {"enabled": True}},
}

axe = Axe()

# Where focus is: "dialog" inside the viewer overlay, "browser" past the page's last
# element (Tab then goes to the browser's own controls), else the element's start tag.
FOCUSED_ELEMENT = """
() => {
  const element = document.activeElement;
  if (element.closest("#viewer-frame")) return "dialog";
  if (element === document.body) return "browser";
  return element.outerHTML.slice(0, 120);
}
"""


@pytest.fixture
async def context(browser: Browser) -> BrowserContext:
    """Hand over a fresh browser context, so that no cookie carries over.

    No `bypass_csp`: Playwright's evaluate injects axe-core through the DevTools protocol,
    which the pages' Content-Security-Policy does not restrict (checked with Debian's
    chromium 156), so each page is checked under the policy it is served with.
    """
    context = await browser.new_context(viewport=DESKTOP_VIEWPORT)
    context.set_default_timeout(TIMEOUT_MS)
    yield context
    await context.close()


@pytest.fixture
async def page(context: BrowserContext) -> Page:
    return await context.new_page()


@pytest.fixture
def findings() -> list[str]:
    """Hand over the list of serious and critical violations that `check` fills."""
    return []


async def check(page: Page, name: str, findings: list[str]) -> None:
    """Run axe-core on the page in its current state and add one line per failing element."""
    await save_screenshot(page, f"a11y-{name}")
    results = await axe.run(page, options=AXE_OPTIONS)
    for violation in results.response["violations"]:
        impact = violation["impact"]
        for node in violation["nodes"]:
            target = " ".join(str(part) for part in node["target"])
            line = f"{name}: {violation['id']} ({impact}) at {target}: {node['html'][:200]}"
            if impact in FAILING_IMPACTS:
                findings.append(line)
            else:
                print(line)


async def test_signed_out_pages_pass_axe(page: Page, base_url: str, findings: list[str]) -> None:
    await page.goto(f"{base_url}/signin")
    await check(page, "signin", findings)

    await page.get_by_label("Username").fill("nobody")
    await page.get_by_label("Password").fill("wrong password")
    await page.get_by_role("button", name="Sign in").click()
    await expect(page.get_by_text("Wrong username or password.")).to_be_visible()
    await check(page, "signin-error", findings)

    await page.goto(f"{base_url}/signup")
    await check(page, "signup", findings)

    response = await page.goto(f"{base_url}/s/{'x' * 43}")
    assert response is not None
    assert response.status == 404
    await check(page, "share-not-found", findings)

    assert findings == [], "\n".join(findings)


async def test_owner_and_shared_pages_pass_axe(
    page: Page,
    context: BrowserContext,
    browser: Browser,
    base_url: str,
    settings: Settings,
    worker: subprocess.Popen[bytes],
    corpus_dir: Path,
    findings: list[str],
) -> None:
    await sign_up(page, base_url)
    await check(page, "gallery-empty", findings)

    await page.locator("#file-input").set_input_files([corpus_dir / photo for photo in PHOTOS])
    await page.wait_for_function(ALL_THUMBNAILS_LOADED, arg=len(PHOTOS))
    text_file = {"name": "notes.txt", "mimeType": "text/plain", "buffer": b"not a photo"}
    await page.locator("#file-input").set_input_files([text_file])
    await expect(page.locator(".upload-row[data-state=rejected]")).to_have_count(1)
    await _check_with_upload_in_progress(page, settings, findings)

    await page.locator(".tile a.frame").first.click()
    await expect(page.locator(".overlay")).to_be_visible()
    await check(page, "viewer-overlay", findings)
    await _check_overlay_keeps_focus(page)
    viewer_url = page.url

    await page.goto(viewer_url)
    await expect(page.locator(".viewer-page")).to_be_visible()
    await check(page, "viewer-page", findings)

    await page.get_by_role("button", name="Delete").click()
    await expect(page.get_by_role("button", name=re.compile("^Undo"))).to_be_visible()
    await check(page, "gallery-undo", findings)
    await page.goto(f"{base_url}/trash")
    await expect(page.locator(".tile")).to_have_count(1)
    await check(page, "trash", findings)

    link = await _check_share_pages(page, base_url, findings)
    visitor_context = await browser.new_context(viewport=DESKTOP_VIEWPORT)
    visitor_context.set_default_timeout(TIMEOUT_MS)
    visitor = await visitor_context.new_page()
    await visitor.goto(link)
    await check(visitor, "shared-page", findings)
    await visitor.locator(".tile a.frame").first.click()
    await expect(visitor.locator("img.display")).to_be_visible()
    await check(visitor, "shared-viewer", findings)
    await visitor_context.close()
    await _check_revoked_share(page, base_url, findings)

    await _check_plain_upload_pages(page, base_url, findings)
    await _check_error_pages(page, base_url, findings)

    assert findings == [], "\n".join(findings)


async def _check_with_upload_in_progress(
    page: Page, settings: Settings, findings: list[str]
) -> None:
    """Hold one upload's POST to S3, so that the rows show in progress, ready and rejected."""
    upload_paused = asyncio.Event()
    released = asyncio.Event()

    async def hold_post(route: Route) -> None:
        if route.request.method != "POST":
            await route.continue_()
            return
        upload_paused.set()
        await released.wait()
        with suppress(Error):
            await route.abort()

    await page.route(f"{settings.s3_endpoint_url}/**", hold_post)
    photo = {"name": "held.jpg", "mimeType": "image/jpeg", "buffer": make_jpeg()}
    await page.locator("#file-input").set_input_files([photo])
    await asyncio.wait_for(upload_paused.wait(), TIMEOUT_MS / 1000)
    await expect(page.locator(".upload-row[data-state=uploading]")).to_have_count(1)
    await expect(page.locator(".upload-row[data-state=ready]")).to_have_count(len(PHOTOS))
    await check(page, "gallery-upload-rows", findings)
    await page.set_viewport_size(PHONE_VIEWPORT)
    await check(page, "gallery-upload-rows-phone", findings)
    await page.set_viewport_size(DESKTOP_VIEWPORT)

    await page.get_by_role("button", name="Cancel the upload of held.jpg").click()
    released.set()
    await page.unroute(f"{settings.s3_endpoint_url}/**")


async def _check_overlay_keeps_focus(page: Page) -> None:
    """Check that focus starts in the viewer overlay, Tab stays there, and Escape returns it."""
    frame = page.locator("#viewer-frame")
    await expect(frame).to_be_focused()
    focused = []
    for _ in range(8):
        await page.keyboard.press("Tab")
        focused.append(await page.evaluate(FOCUSED_ELEMENT))
    image_id = await frame.get_attribute("data-image-id")

    await page.keyboard.press("Escape")

    outside = [element for element in focused if element not in ("dialog", "browser")]
    assert outside == []
    assert focused.count("dialog") >= 6
    await expect(page.locator(f"#tile-{image_id} a.frame")).to_be_focused()
    await expect(page.locator("header.bar")).not_to_have_attribute("inert", "")
    await page.locator(f"#tile-{image_id} a.frame").click()
    await expect(page.locator(".overlay")).to_be_visible()


async def _check_share_pages(page: Page, base_url: str, findings: list[str]) -> str:
    """Make a share link of the first photo, checking each page on the way; return it."""
    await page.goto(f"{base_url}/images")
    await page.locator(".tile").first.get_by_label("Select").check()
    await page.get_by_role("button", name="Share selected").click()
    await expect(page.get_by_role("heading", name=re.compile("^Share"))).to_be_visible()
    await check(page, "share-new", findings)

    await page.get_by_role("button", name="Create link").click()
    await expect(page.locator("#share-link")).to_be_visible()
    await check(page, "share-created", findings)
    link = await page.locator("#share-link").input_value()

    await page.goto(f"{base_url}/shares")
    await check(page, "shares", findings)
    return link


async def _check_revoked_share(page: Page, base_url: str, findings: list[str]) -> None:
    await page.goto(f"{base_url}/shares")
    await page.get_by_role("button", name="Revoke").first.click()
    await expect(page.locator(".share-status").first).to_contain_text("Revoked")
    await check(page, "shares-revoked", findings)


async def _check_plain_upload_pages(page: Page, base_url: str, findings: list[str]) -> None:
    """Check the form for uploads without JavaScript, and the status page it leads to.

    The pages are the same with JavaScript on, which axe-core needs. With it off, axe-core's
    run did not finish within 30 s in Debian's chromium 156, although evaluate itself works.
    """
    await page.goto(f"{base_url}/uploads/new")
    await check(page, "plain-upload-form", findings)

    await page.get_by_label("Photo").set_input_files(
        {"name": "notes.jpg", "mimeType": "image/jpeg", "buffer": b"not a photo"}
    )
    await page.get_by_role("button", name="Upload").click()
    # The status page reloads itself every 2 s until the worker has rejected the file.
    await expect(page.get_by_text(re.compile("^Rejected: "))).to_be_visible()
    await check(page, "plain-upload-rejected", findings)


async def _check_error_pages(page: Page, base_url: str, findings: list[str]) -> None:
    response = await page.goto(f"{base_url}/images/0190abcd0190abcd0190abcd/view")
    assert response is not None
    assert response.status == 404
    await check(page, "error-404", findings)

    # A POST without the CSRF token, as a forged form would send it.
    async def post_instead(route: Route) -> None:
        await route.continue_(method="POST")

    await page.route(f"{base_url}/uploads", post_instead)
    response = await page.goto(f"{base_url}/uploads")
    await page.unroute(f"{base_url}/uploads")
    assert response is not None
    assert response.status == 403
    await check(page, "error-403", findings)

    response = await page.goto(f"{base_url}/signout")
    assert response is not None
    assert response.status == 405
    await check(page, "error-405", findings)
