"""Browser tests: Playwright from PyPI driving Debian's Chromium (/usr/bin/chromium, installed by
scripts/install-system-deps.sh; never `playwright install`), headless and kept off the network,
against real earshot servers on 127.0.0.1.

Outside CI the tests skip when /usr/bin/chromium is absent; under CI=true they run (and fail
without it). Every page fails its test on any console error or uncaught exception, unless the
test names the message it expects. Each test saves a screenshot of its page(s) at the end, into
$EARSHOT_SCREENSHOTS when set, else into the test's temporary directory; with
EARSHOT_README_SCREENSHOTS=1 three of them also replace the README's (docs/screenshots/).
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    # The synthesized speech starts playing when it arrives (a click started it, but the fetch
    # in between can outlast the click's user activation).
    "--autoplay-policy=no-user-gesture-required",
    # A fake microphone (a generated tone) that needs no permission prompt: the record button.
    "--use-fake-device-for-media-stream",
    "--use-fake-ui-for-media-stream",
]
VIEWPORT = {"width": 1480, "height": 860}
REPO = Path(__file__).resolve().parents[2]
# The README's pictures: the last view of these tests' first tab. Refresh them with
# `EARSHOT_README_SCREENSHOTS=1 .venv/bin/pytest tests/browser` (then commit docs/screenshots/).
README_SHOTS = {
    "test_capacity_evictions_and_thrashing_in_the_timeline": "console-cache.png",
    "test_upload_jfk_shows_the_sentence[stream]": "console-playground.png",
    "test_many_models_and_1000_events_keep_the_page_bounded": "console-54-models.png",
}


@pytest.fixture(scope="package")
def browser() -> Iterator[Any]:
    """Package scope, not session: while sync Playwright runs, an event loop runs in this thread,
    and the async tests collected after this package could not start theirs."""
    if not CHROMIUM.exists():
        if os.environ.get("CI") == "true":
            pytest.fail(f"{CHROMIUM} is missing: scripts/install-system-deps.sh installs Debian's chromium")
        pytest.skip(f"{CHROMIUM} is absent (Debian package chromium: scripts/install-system-deps.sh)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()


@dataclass
class Console:
    """Console errors and uncaught exceptions of one page."""

    errors: list[str] = field(default_factory=list)
    expected: list[re.Pattern[str]] = field(default_factory=list)

    def expect(self, pattern: str) -> None:
        """`pattern` (a regex) is an error this test causes on purpose (e.g. a refused key's 401)."""
        self.expected.append(re.compile(pattern))

    def unexpected(self) -> list[str]:
        return [e for e in self.errors if not any(p.search(e) for p in self.expected)]


@dataclass
class Tab:
    page: Any
    console: Console


def screenshot_dir(tmp_path: Path) -> Path:
    target = os.environ.get("EARSHOT_SCREENSHOTS")
    path = Path(target) if target else tmp_path / "screenshots"
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture
def open_tab(browser: Any, request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Callable[..., Tab]]:
    """open_tab(url, wait_ready=True, before=None) -> Tab: a fresh browser context (its own
    sessionStorage) at `url`; `before(page)` runs before the page is opened."""
    tabs: list[tuple[Any, Tab]] = []

    def open_(url: str, *, wait_ready: bool = True, before: Callable[[Any], None] | None = None) -> Tab:
        context = browser.new_context(viewport=VIEWPORT)
        page = context.new_page()
        console = Console()
        page.on("console", lambda m: console.errors.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: console.errors.append(f"uncaught: {e}"))
        tab = Tab(page, console)
        tabs.append((context, tab))
        if before is not None:
            before(page)  # e.g. page.route(...) for the page's first requests
        page.goto(url)
        if wait_ready:
            page.wait_for_selector("body[data-ready=true]", timeout=30_000)
        return tab

    yield open_
    shots = screenshot_dir(tmp_path)
    name = request.node.name
    for i, (context, tab) in enumerate(tabs):
        suffix = "" if i == 0 else f"-{i + 1}"
        try:
            tab.page.screenshot(path=str(shots / f"{name}{suffix}.png"))
            if i == 0 and name in README_SHOTS and os.environ.get("EARSHOT_README_SCREENSHOTS") == "1":
                tab.page.screenshot(path=str(REPO / "docs" / "screenshots" / README_SHOTS[name]))
        finally:
            context.close()
    problems = [e for _, tab in tabs for e in tab.console.unexpected()]
    assert not problems, f"console errors in the page: {problems}"
