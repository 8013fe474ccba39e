"""Headless Chromium for the dashboard test: Debian's `chromium` and `chromedriver` (packages chromium,
chromium-driver; `make test` installs them when it may run apt-get), driven through Selenium. Nothing is
downloaded: the browser and the driver are named by path, so Selenium Manager never runs."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
MISSING = (
    "Debian's chromium and chromium-driver are not installed "
    "(`apt-get install chromium chromium-driver` as root; `make test` does it when it may)"
)
WAIT_S = 90  # bound on what a page must show (the machine may be loaded)
WINDOW = (1500, 1000)


def available() -> bool:
    """Both the browser and its driver are on this machine."""
    return all(os.access(p, os.X_OK) for p in (CHROMIUM, CHROMEDRIVER))


class Page:
    """One browser tab: open a URL, wait until text or elements are shown, read what a person sees."""

    def __init__(self, driver) -> None:
        self.driver = driver

    def open(self, url: str) -> None:
        self.driver.get(url)

    def wait(self, what: str, until: Callable[[], object]) -> object:
        """`until()`'s first truthy value, polled for at most WAIT_S; on timeout an assertion that names
        what was awaited and shows the page's visible text."""
        from selenium.common.exceptions import WebDriverException
        from selenium.webdriver.support.ui import WebDriverWait

        def attempt(_):
            try:
                return until()
            except WebDriverException:  # an element replaced while the SPA renders: try again
                return None

        try:
            return WebDriverWait(self.driver, WAIT_S, poll_frequency=0.5).until(attempt)
        except Exception as e:
            raise AssertionError(
                f"{self.driver.current_url}: never showed {what}; it shows:\n{self.text()[:3000]}"
            ) from e

    def text(self) -> str:
        """The page's visible text."""
        from selenium.webdriver.common.by import By

        return self.driver.find_element(By.TAG_NAME, "body").text

    def wait_text(self, *needles: str) -> str:
        """Wait until every needle is in the visible text; return that text."""

        def shown() -> str | None:
            text = self.text()
            return text if all(n in text for n in needles) else None

        return self.wait(", ".join(repr(n) for n in needles), shown)

    def elements(self, css: str) -> list:
        from selenium.webdriver.common.by import By

        return self.driver.find_elements(By.CSS_SELECTOR, css)

    def shown_images(self, css: str = "img") -> list[tuple[str, int]]:
        """(src prefix, natural width) of each image that decoded (natural width > 0)."""
        shown = []
        for img in self.elements(css):
            width = self.driver.execute_script("return arguments[0].complete ? arguments[0].naturalWidth : 0", img)
            if width:
                shown.append(((img.get_attribute("src") or "")[:40], int(width)))
        return shown

    def scroll_to(self, element) -> None:
        """Bring an element to the top of its scrolling container (for a screenshot of it)."""
        self.driver.execute_script("arguments[0].scrollIntoView({block: 'start'})", element)

    def screenshot(self, path: Path) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        assert self.driver.save_screenshot(str(path)), path
        return path


@contextmanager
def chromium() -> Iterator[Page]:
    """A headless Chromium tab, closed (driver and browser processes) on exit."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--lang=en-US"):
        options.add_argument(arg)
    options.add_argument(f"--window-size={WINDOW[0]},{WINDOW[1]}")
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        yield Page(driver)
    finally:
        driver.quit()
