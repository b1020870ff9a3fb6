"""Debian's headless Chromium, driven by Playwright for Python (its own browser downloads are never used)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from playwright.sync_api import Browser, sync_playwright

from tests.support.real_servers import require_binary

CHROMIUM_BINARY = "/usr/bin/chromium"
CHROMIUM_PACKAGE = "chromium"


@contextlib.contextmanager
def run_chromium() -> Iterator[Browser]:
    """A headless Chromium for the test to open pages in; skipped locally (failed under CI) without the package."""
    binary = require_binary(CHROMIUM_BINARY, CHROMIUM_PACKAGE)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=binary, headless=True)
        try:
            yield browser
        finally:
            browser.close()
