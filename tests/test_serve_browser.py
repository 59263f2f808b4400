"""The page of `unicom serve` in a real browser: headless Chromium driven by Selenium.

Upload an altered copy of a collection image and see its original first, thumbnail loaded; click
a result and see a new grid; open the duplicates view; go back; paste and drop an image.
Screenshots go to ``$UNICOM_SCREENSHOTS`` (``docs`` to refresh the README's pictures) or else to
the test's temporary folder.

Without Chromium the test is skipped, except in CI (``CI`` set), where it fails: ``.ci/run``
installs Debian's ``chromium`` and ``chromium-driver``.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from serve_server import ROOT, TOKEN

CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")


@pytest.fixture(scope="module")
def browser():
    if not (CHROMIUM.exists() and CHROMEDRIVER.exists()):
        reason = f"needs {CHROMIUM} and {CHROMEDRIVER} (apt-get install chromium chromium-driver)"
        if os.environ.get("CI"):
            pytest.fail(f"CI must run the browser test: it {reason}")
        pytest.skip(f"the browser test {reason}")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                     "--window-size=1280,860", "--hide-scrollbars", "--force-device-scale-factor=1"):
        options.add_argument(argument)
    driver = webdriver.Chrome(options=options, service=Service(str(CHROMEDRIVER)))
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


def screenshots(tmp_path: Path) -> Path:
    folder = os.environ.get("UNICOM_SCREENSHOTS")
    folder = (ROOT / folder if not os.path.isabs(folder) else Path(folder)) if folder else tmp_path
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def wait_for(driver, condition, what: str, timeout: float = 60):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout, poll_frequency=0.1).until(
        lambda d: condition(d), message=f"the page never showed {what}")


def grid(driver) -> list[tuple[int, bool]]:
    """(id, thumbnail loaded) of each result card, in order."""
    return driver.execute_script("""
        return Array.from(document.querySelectorAll('#results .result')).map(card => {
            const img = card.querySelector('img');
            return [Number(card.dataset.id), img.complete && img.naturalWidth > 0];
        });""")


def thumbnails_loaded(driver, selector: str) -> bool:
    return driver.execute_script(
        f"const imgs = Array.from(document.querySelectorAll('{selector} img'));"
        "return imgs.length > 0 && imgs.every(img => img.complete && img.naturalWidth > 0);")


def test_search_click_and_duplicates_in_chromium(browser, served_collection, tmp_path):
    from selenium.webdriver.common.by import By

    small, server = served_collection
    original = small.ids["img_0005.png"]
    browser.get(server.url(f"/?token={TOKEN}"))  # the server wants a token: once, then a cookie
    assert browser.current_url == server.url("/")
    wait_for(browser, lambda d: "images" in d.find_element(By.ID, "info").text, "the collection's info")
    assert f"{len(small.ids)} images" in browser.find_element(By.ID, "info").text

    browser.find_element(By.ID, "file-input").send_keys(str(small.queries[5]))  # an altered copy of img_0005
    wait_for(browser, lambda d: grid(d) and grid(d)[0] == [original, True],
             "the original first with its thumbnail loaded")
    wait_for(browser, lambda d: thumbnails_loaded(d, "#results"), "every thumbnail of the grid")
    assert "results in" in browser.find_element(By.ID, "status").text
    first_grid = [card_id for card_id, _ in grid(browser)]
    assert len(first_grid) == min(20, len(small.ids))
    browser.save_screenshot(str(screenshots(tmp_path) / "serve.png"))

    clicked = first_grid[1]
    browser.find_elements(By.CSS_SELECTOR, "#results .result")[1].click()
    wait_for(browser, lambda d: d.execute_script("return location.hash") == f"#id={clicked}", "the clicked item's id")
    wait_for(browser, lambda d: grid(d) and grid(d)[0] == [clicked, True], "a new grid led by the clicked item")
    assert [card_id for card_id, _ in grid(browser)] != first_grid

    browser.find_element(By.ID, "tab-duplicates").click()
    wait_for(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "#duplicates .cluster"), "duplicate clusters")
    wait_for(browser, lambda d: thumbnails_loaded(d, "#duplicates"), "the clusters' thumbnails")
    clusters = browser.find_elements(By.CSS_SELECTOR, "#duplicates .cluster")
    assert len(clusters) >= 2 and not browser.find_element(By.ID, "search-view").is_displayed()
    for cluster in clusters:
        assert len(cluster.find_elements(By.CSS_SELECTOR, ".card.keep")) == 1
        assert len(cluster.find_elements(By.CSS_SELECTOR, ".card")) >= 2
    browser.save_screenshot(str(screenshots(tmp_path) / "serve-duplicates.png"))

    browser.back()  # the address follows the view: back returns to the search from the clicked item
    wait_for(browser, lambda d: d.find_element(By.ID, "search-view").is_displayed(), "the search view again")
    wait_for(browser, lambda d: grid(d) and grid(d)[0][0] == clicked, "the clicked item's grid again")

    for event, item in (("paste", small.ids["img_0016.png"]), ("drop", small.ids["img_0011.png"])):
        browser.execute_script(DISPATCH, event, item)  # an image pasted (Ctrl+V) or dropped on the page
        wait_for(browser, lambda d: grid(d) and grid(d)[0] == [item, True], f"the {event}d image's original first")


# A File made of an item's bytes, handed to the page as a paste on the document or a drop on the drop zone.
DISPATCH = """
const [event, id] = arguments;
fetch(`/image/${id}`).then(r => r.blob()).then(blob => {
    const data = new DataTransfer();
    data.items.add(new File([blob], `item${id}.png`, {type: blob.type}));
    if (event === "paste") {
        document.dispatchEvent(new ClipboardEvent("paste", {clipboardData: data, bubbles: true}));
    } else {
        document.getElementById("drop").dispatchEvent(new DragEvent("drop", {dataTransfer: data, bubbles: true,
                                                                             cancelable: true}));
    }
});
"""
