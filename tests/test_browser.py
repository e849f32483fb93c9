"""The page at `/` in a real browser: Debian's chromium, driven by Playwright, against a uvicorn server
on a free localhost port. Without the browser this fails in CI (CI=true) and skips elsewhere."""

import os
import shutil
import threading
import time
from pathlib import Path

import pytest
import uvicorn

from tests.conftest import free_port
from vpr.api import Index
from vpr.data.datasets import load_image_set
from vpr.serve import ServeConfig, create_app

try:
    from playwright.sync_api import expect, sync_playwright
except ImportError:  # the browser fixture fails (CI) or skips
    expect = sync_playwright = None

CHROMIUM = Path(os.environ.get("VPR_CHROMIUM", "/usr/bin/chromium"))
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def _missing(reason: str) -> None:
    if IN_CI:
        pytest.fail(f"{reason}; CI must run the browser test (make test installs it)")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def browser():
    if sync_playwright is None:
        _missing("playwright is not installed: pip install -e '.[test]'")
    if not (CHROMIUM.is_file() and os.access(CHROMIUM, os.X_OK)) and not shutil.which(str(CHROMIUM)):
        _missing(f"{CHROMIUM} not found: apt-get install chromium (or make test)")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def server(places_index):
    """A uvicorn server in a thread on a free port, serving an index of the place set."""
    index = Index.load(places_index, device="cpu")
    port = free_port()
    app = create_app(ServeConfig(index=places_index, device="cpu"), index)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}", index
    server.should_exit = True
    thread.join(10)


@pytest.fixture()
def page(browser):
    page = browser.new_page(viewport={"width": 1200, "height": 900})
    outside = []
    page.on("request", lambda request: None if request.url.startswith(("http://127.0.0.1", "blob:", "data:"))
            else outside.append(request.url))
    yield page
    page.close()
    assert outside == [], f"the page reached outside the server: {outside}"


def test_upload_shows_the_matches_thumbnails_and_map(page, server, places):
    url, index = server
    query = load_image_set(places / "queries").paths[5]
    expected = index.query(query, k=3)[0]
    page.goto(url)
    expect(page.locator("[data-testid=info]")).to_contain_text("12 database images")
    page.select_option("#k", "3")
    page.set_input_files("#file", str(query))
    expect(page.locator("[data-testid=match] img[src^='blob:']")).to_have_count(3)
    cards = page.locator("[data-testid=match]")
    assert [int(cards.nth(i).get_attribute("data-id")) for i in range(3)] == [m.id for m in expected.matches]
    first = cards.nth(0).inner_text()
    assert "#1" in first and f"similarity {expected.matches[0].similarity:.3f}" in first
    assert f"distance {expected.matches[0].distance:.3f}" in first
    assert all(cards.nth(i).locator("img").evaluate("img => img.naturalWidth > 0") for i in range(3))
    assert page.locator("[data-testid=query-image]").evaluate("img => img.naturalWidth") == 64
    assert "estimated position" in page.locator("[data-testid=estimate]").inner_text()
    assert page.locator("[data-testid=map] .db circle").count() == 12
    assert page.locator("[data-testid=map-match]").count() == 3
    assert page.locator("[data-testid=map-estimate]").count() == 1
    assert page.locator("[data-testid=error]").is_hidden()


def test_a_file_that_is_no_image_shows_the_servers_reason(page, server, tmp_path):
    url, _ = server
    note = tmp_path / "notes.txt"
    note.write_text("not a photo")
    page.goto(url)
    page.set_input_files("#file", str(note))
    error = page.locator("[data-testid=error]")
    error.wait_for(state="visible")
    assert "notes.txt: not an image file" in error.inner_text()


def test_before_any_upload_the_page_shows_neither_results_nor_an_error(page, server):
    url, index = server
    page.goto(url)
    expect(page.locator("[data-testid=info]")).to_contain_text("12 database images")
    assert page.locator("#results").is_hidden() and page.locator("[data-testid=error]").is_hidden()
    assert page.locator("[data-testid=query-image]").is_hidden() and page.locator("[data-testid=match]").count() == 0
    warning = page.locator("[data-testid=warning]")
    assert warning.is_visible() == index.info()["random_init"]
    if index.info()["random_init"]:
        assert "randomly initialised" in warning.inner_text()


def test_a_bad_upload_after_a_good_one_leaves_no_old_matches(page, server, places, tmp_path):
    url, _ = server
    page.goto(url)
    page.set_input_files("#file", str(load_image_set(places / "queries").paths[2]))
    expect(page.locator("[data-testid=match]")).to_have_count(5)
    note = tmp_path / "broken.jpg"
    note.write_bytes(b"\xff\xd8\xff not really a jpeg")
    page.set_input_files("#file", str(note))
    error = page.locator("[data-testid=error]")
    error.wait_for(state="visible")
    assert "broken.jpg" in error.inner_text()
    assert page.locator("#results").is_hidden() and page.locator("[data-testid=match]").count() == 0
    assert page.locator("[data-testid=query-name]").inner_text() == ""
    assert page.locator("[data-testid=map-match]").count() == 0
