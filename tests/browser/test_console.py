"""The console at /ui in a real browser (Debian's Chromium) against real servers and models."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import DEMO_MODELS, words
from tests.support.server import Server, run_server

pytestmark = pytest.mark.slow

TINY = "faster-whisper-tiny.en"
BASE = "faster-whisper-base"
KOKORO = "kokoro-82m-v1.0-int8"
JFK_WORDS = words("ask not what your country can do for you")
MAX_TIMELINE_ROWS = 200  # src/earshot/ui/static/js/events.js MAX_ROWS
API_KEY = "browser-test-key-7f3a"


def row(model: str) -> str:
    return f"#models tr[data-model='{model}']"


def contains_run(haystack: list[str], needle: list[str]) -> bool:
    n = len(needle)
    return any(haystack[i : i + n] == needle for i in range(len(haystack) - n + 1))


@pytest.fixture(scope="module")
def server(models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    with run_server(models_dir, tmp_path_factory.mktemp("ui-server")) as srv:
        yield srv


@pytest.fixture(scope="module")
def capacity_server(models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    with run_server(models_dir, tmp_path_factory.mktemp("ui-capacity"), max_models=1) as srv:
        yield srv


@pytest.fixture(scope="module")
def key_server(models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    with run_server(models_dir, tmp_path_factory.mktemp("ui-key"), api_key=API_KEY) as srv:
        yield srv


@pytest.fixture(scope="module")
def big_catalog_server(models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """The demo models plus 50 config.yaml `models:` entries (tiny.en's directory under other ids),
    and one whose model.bin is cut short (its loads fail)."""
    entries = [{"id": f"tiny-copy-{i:02d}", "path": str(models_dir / TINY)} for i in range(50)]
    broken = tmp_path_factory.mktemp("broken-tiny")
    for f in (models_dir / TINY).iterdir():
        if f.is_file() and f.name != "model.bin":
            (broken / f.name).write_bytes(f.read_bytes())
    with (models_dir / TINY / "model.bin").open("rb") as whole:
        (broken / "model.bin").write_bytes(whole.read(1 << 20))
    entries.append({"id": "broken-tiny", "path": str(broken)})
    with run_server(models_dir, tmp_path_factory.mktemp("ui-big"), models=entries) as srv:
        yield srv


# ---------------------------------------------------------------------- serving


def test_page_is_public_and_sent_with_a_strict_csp(key_server: Server) -> None:
    root = httpx.get(key_server.url + "/", follow_redirects=False)
    assert root.status_code in (301, 302, 307, 308)
    assert root.headers["location"] == "/ui/"
    for path in ("/ui", "/ui/", "/ui/js/app.js", "/ui/console.css", "/ui/auth.json"):
        response = httpx.get(key_server.url + path)  # no key: the page must load to ask for it
        assert response.status_code == 200, path
        csp = response.headers["content-security-policy"]
        assert "default-src 'none'" in csp
        assert "script-src 'self'" in csp
        assert "unsafe-inline" not in csp
        assert "unsafe-eval" not in csp
        assert response.headers["x-content-type-options"] == "nosniff"
    assert httpx.get(key_server.url + "/ui/auth.json").json() == {"api_key_required": True}
    assert httpx.get(key_server.url + "/v1/models").status_code == 401  # the API stays behind the key
    assert httpx.get(key_server.url + "/ui/../v1/models").status_code == 401
    assert httpx.get(key_server.url + "/ui/nothing-here.js").status_code == 404


# ---------------------------------------------------------------------- models panel


def test_lists_the_demo_models_and_loads_on_click(open_tab: Any, server: Server) -> None:
    tab = open_tab(server.url + "/")
    page = tab.page
    assert page.url.endswith("/ui/")
    for model in DEMO_MODELS:
        assert page.locator(row(model)).count() == 1
        assert page.locator(row(model)).get_attribute("data-state") == "not-loaded"
    assert page.locator(row(TINY) + " td").nth(1).inner_text() == "transcription"
    assert page.locator(row(KOKORO) + " td").nth(1).inner_text() == "speech"

    page.evaluate("window.__sameDocument = true")
    page.click(row(TINY) + " button.load")
    page.wait_for_selector(row(TINY) + "[data-state=loaded]", timeout=5_000)
    assert page.evaluate("window.__sameDocument === true")  # no reload
    page.wait_for_function(
        f"() => document.querySelector(\"{row(TINY)} .size\").textContent.includes('MiB')", timeout=5_000
    )
    assert page.locator("#timeline li[data-event=model_loaded]").count() >= 1
    ps = server.client().get("/api/ps").json()
    assert [m["model"] for m in ps["models"] if m["loaded"]] == [TINY]

    # Pin from the page: /api/ps says pinned, the row says so and never expires.
    page.click(row(TINY) + " button.pin")
    page.wait_for_function(
        f"() => document.querySelector(\"{row(TINY)} td.pinned\").textContent === 'yes'", timeout=5_000
    )
    assert server.client().get("/api/ps").json()["models"][0]["pinned"] is True
    assert page.locator(row(TINY) + " td.expires").inner_text() == "never"
    page.click(row(TINY) + " button.pin")  # unpin: the idle countdown is back
    page.wait_for_function(
        f"() => document.querySelector(\"{row(TINY)} td.pinned\").textContent === 'no'", timeout=5_000
    )
    assert server.client().get("/api/ps").json()["models"][0]["pinned"] is False


def test_unload_from_outside_shows_within_2s(open_tab: Any, server: Server) -> None:
    client = server.client()
    client.post(f"/api/ps/{TINY}", json={}).raise_for_status()
    tab = open_tab(server.url + "/ui")
    page = tab.page
    page.wait_for_selector(row(TINY) + "[data-state=loaded]", timeout=5_000)
    assert client.delete(f"/api/ps/{TINY}").status_code == 200
    page.wait_for_selector(row(TINY) + "[data-state=not-loaded]", timeout=2_000)
    evicted = page.locator("#timeline li[data-event=model_evicted]").first
    assert evicted.get_attribute("data-reason") == "manual"
    assert "manual" in evicted.inner_text()
    # ... and a load from outside too
    client.post(f"/api/ps/{TINY}", json={}).raise_for_status()
    page.wait_for_selector(row(TINY) + "[data-state=loaded]", timeout=2_000)


def test_reconnect_replays_missed_events_with_last_event_id(open_tab: Any, server: Server) -> None:
    """The first event stream ends at once; a load happens before the page reconnects; the
    reconnect sends Last-Event-ID and the replayed events fill the timeline."""
    client = server.client()
    if any(m["model"] == BASE for m in client.get("/api/ps").json()["models"]):
        client.delete(f"/api/ps/{BASE}")
    seen: list[str | None] = []

    def handle(route: Any) -> None:
        seen.append(route.request.headers.get("last-event-id"))
        if len(seen) == 1:
            client.post(f"/api/ps/{BASE}", json={}).raise_for_status()  # while the page is away
            route.fulfill(status=200, headers={"Content-Type": "text/event-stream"}, body=": bye\n\n")
        else:
            route.continue_()

    events_before = client.get("/api/events").json()["events"]
    last_before = events_before[-1]["id"] if events_before else 0
    page = open_tab(
        server.url + "/ui", before=lambda p: p.route(re.compile(r"/api/events\?stream=true"), handle)
    ).page
    page.wait_for_selector(f"#timeline li[data-event=model_loaded]:has-text('{BASE}')", timeout=20_000)
    page.wait_for_selector("#conn[data-state=live]", timeout=20_000)
    assert len(seen) == 2, seen
    assert seen[0] is not None
    assert int(seen[0]) == last_before  # from the JSON read before it
    assert seen[1] is not None
    assert int(seen[1]) >= last_before
    page.wait_for_selector(row(BASE) + "[data-state=loaded]", timeout=5_000)


# ---------------------------------------------------------------------- playground


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
def test_upload_jfk_shows_the_sentence(open_tab: Any, server: Server, jfk_flac: Path, stream: bool) -> None:
    page = open_tab(server.url + "/ui").page
    page.click("#tabs button[data-tab=playground]")
    page.set_input_files("#stt-file", str(jfk_flac))
    page.select_option("#stt-model", TINY)
    if stream:
        page.check("#stt-stream")
    page.click("#stt-submit")
    page.wait_for_selector("#stt-output[data-done=true]", timeout=120_000)
    if stream:
        assert page.locator("#stt-output .segment").count() >= 1
        text = page.locator("#stt-output .final").inner_text()
    else:
        text = page.locator("#stt-output").inner_text()
    assert contains_run(words(text), JFK_WORDS), text


def test_record_from_the_microphone_and_transcribe(open_tab: Any, server: Server) -> None:
    """Chromium's fake microphone (a tone): the recording is uploaded as WebM/Opus and transcribed
    without an error (what Whisper hears in a tone is its own business)."""
    page = open_tab(server.url + "/ui").page
    page.click("#tabs button[data-tab=playground]")
    page.click("#stt-record")
    page.wait_for_selector("#stt-record:has-text('Stop')", timeout=10_000)
    page.wait_for_timeout(1500)
    page.click("#stt-record")
    page.wait_for_function(
        "() => document.getElementById('stt-recorded').textContent.startsWith('recorded')", timeout=10_000
    )
    page.select_option("#stt-model", TINY)
    page.click("#stt-submit")
    page.wait_for_selector("#stt-output[data-done=true]", timeout=120_000)
    assert page.locator("#stt-status").inner_text().startswith("done in")


def test_speech_plays(open_tab: Any, server: Server) -> None:
    page = open_tab(server.url + "/ui").page
    page.click("#tabs button[data-tab=playground]")
    page.select_option("#tts-model", KOKORO)
    page.fill("#tts-input", "The console can speak as well as listen.")
    page.click("#tts-voice")  # lists the model's voices (loads it)
    page.wait_for_function(
        "() => document.querySelectorAll('#tts-voices option').length > 0", timeout=120_000
    )
    voices = page.eval_on_selector_all("#tts-voices option", "os => os.map(o => o.value)")
    page.fill("#tts-voice", voices[0])
    page.click("#tts-submit")
    page.wait_for_function(
        "() => { const a = document.getElementById('tts-audio'); return a.src && a.duration > 0; }",
        timeout=120_000,
    )
    duration = page.evaluate("document.getElementById('tts-audio').duration")
    assert 0.5 < duration < 30, duration
    page.wait_for_function("() => document.getElementById('tts-audio').currentTime > 0", timeout=20_000)


# ---------------------------------------------------------------------- events panel


def test_capacity_evictions_and_thrashing_in_the_timeline(open_tab: Any, capacity_server: Server) -> None:
    page = open_tab(capacity_server.url + "/ui").page
    for model in (TINY, BASE, TINY):  # max_models=1: each load evicts the other
        page.click(row(model) + " button.load")
        page.wait_for_selector(row(model) + "[data-state=loaded]", timeout=120_000)
    capacity = "#timeline li[data-event=model_evicted][data-reason=capacity]"
    page.wait_for_function(f'() => document.querySelectorAll("{capacity}").length >= 2', timeout=5_000)
    assert "capacity" in page.locator(capacity).first.inner_text()
    assert page.locator("#timeline li[data-event=model_load_started][data-reload]").count() >= 1
    assert page.locator(row(BASE)).get_attribute("data-state") == "not-loaded"
    assert page.locator("#thrash").is_hidden()  # 2 evictions and 1 reload: not a storm yet

    # The EarshotEvictionStorm terms: more than 3 reloads/min and 3 capacity evictions/min over 2 min.
    client = capacity_server.client()
    for model in (BASE, TINY) * 3:
        client.post(f"/api/ps/{model}", json={}).raise_for_status()
    page.wait_for_selector("#thrash:not([hidden])", timeout=10_000)
    assert page.locator("#thrash-detail").get_attribute("data-thrashing") == "true"
    assert "EarshotEvictionStorm" in page.locator("#thrash-detail").inner_text()
    assert int(page.locator("#event-counts [data-count='evicted: capacity'] dd").inner_text()) >= 8

    page.click("#tabs button[data-tab=settings]")
    setting = page.locator("#settings tr[data-setting=max_models]")
    assert setting.locator("td.value").inner_text() == "1"
    assert "EARSHOT_MAX_MODELS" in setting.locator("td.source").inner_text()
    page.click("#tabs button[data-tab=cache]")


def test_a_failed_load_shows_with_its_reason(open_tab: Any, big_catalog_server: Server) -> None:
    page = open_tab(big_catalog_server.url + "/ui").page
    response = big_catalog_server.client().post("/api/ps/broken-tiny", json={})  # from outside
    assert response.status_code >= 500
    page.wait_for_selector(row("broken-tiny") + "[data-state=failed]", timeout=10_000)
    failed = page.locator("#timeline li[data-event=model_load_failed]").first
    assert "broken-tiny" in failed.inner_text()
    assert "failure" in failed.inner_text()
    assert page.locator(row("broken-tiny") + " .state").get_attribute("title")  # the message
    # the counters are redrawn after the row: wait for them rather than read them at once
    page.wait_for_function(
        "() => document.querySelector(\"#event-counts [data-count='failed loads'] dd\").textContent === '1'",
        timeout=10_000,
    )
    assert page.locator(row("broken-tiny") + " button.load").is_visible()  # can be retried


def test_many_models_and_1000_events_keep_the_page_bounded(open_tab: Any, big_catalog_server: Server) -> None:
    page = open_tab(big_catalog_server.url + "/ui").page
    assert page.locator("#models tbody tr").count() == 54
    page.check("#show-requests")
    before = page.evaluate("document.getElementsByTagName('*').length")
    client = big_catalog_server.client()
    for _ in range(1000):  # a hit each, after the first (a miss and a load)
        client.post(f"/api/ps/{KOKORO}").raise_for_status()
    # hits are streamed live to the page (it follows ?hits=true), not kept in the server's buffer
    page.wait_for_function(
        "() => Number(document.querySelector('#event-counts [data-count=hits] dd').textContent) >= 999",
        timeout=30_000,
    )
    rows = page.locator("#timeline li").count()
    after = page.evaluate("document.getElementsByTagName('*').length")
    assert rows == MAX_TIMELINE_ROWS
    assert after - before <= MAX_TIMELINE_ROWS * 5 + 50, (before, after)
    assert int(page.locator("#event-counts [data-count=hits] dd").inner_text()) >= 999
    # still usable: a click loads a model and the row says so
    page.click(row("tiny-copy-42") + " button.load")
    page.wait_for_selector(row("tiny-copy-42") + "[data-state=loaded]", timeout=30_000)


# ---------------------------------------------------------------------- api key


def test_api_key_prompt_wrong_key_then_right_key(open_tab: Any, key_server: Server) -> None:
    tab = open_tab(key_server.url + "/ui", wait_ready=False)
    page = tab.page
    page.wait_for_selector("#auth:not([hidden])", timeout=30_000)
    assert page.locator("#app").is_hidden()
    assert tab.console.errors == []  # asked for the key without trying the API first

    tab.console.expect(r"status of 401")  # the refused key's answer, which Chromium logs
    page.fill("#auth-key", "not-the-key")
    page.click("#auth-form button[type=submit]")
    page.wait_for_function(
        "() => document.getElementById('auth-message').textContent.includes('refused')", timeout=10_000
    )
    assert "refused this API key" in page.locator("#auth-message").inner_text()
    assert page.evaluate("sessionStorage.getItem('earshot.apiKey')") is None

    page.fill("#auth-key", API_KEY)
    page.click("#auth-form button[type=submit]")
    page.wait_for_selector("body[data-ready=true]", timeout=30_000)
    assert page.locator("#auth").is_hidden()
    assert page.locator(row(TINY)).count() == 1
    assert page.evaluate("sessionStorage.getItem('earshot.apiKey')") == API_KEY
    assert page.evaluate("localStorage.length") == 0  # for the tab only, never kept on disk
    # The event stream carries the key too: a load from outside shows up.
    key_server.client().post(f"/api/ps/{TINY}", json={}).raise_for_status()
    page.wait_for_selector(row(TINY) + "[data-state=loaded]", timeout=5_000)
    # Kept for the tab: a reload does not ask again; another tab does.
    page.reload()
    page.wait_for_selector("body[data-ready=true]", timeout=30_000)
    other = open_tab(key_server.url + "/ui", wait_ready=False)
    other.page.wait_for_selector("#auth:not([hidden])", timeout=30_000)


# ---------------------------------------------------------------------- weight and first render


def test_page_weight_and_first_render(browser: Any, server: Server, tmp_path: Path) -> None:
    """What the first load of the page costs (printed, and kept under a budget that a bundled
    JavaScript framework would break)."""
    context = browser.new_context(viewport={"width": 1480, "height": 860})
    page = context.new_page()
    client = page.context.new_cdp_session(page)
    client.send("Network.enable")
    transferred: dict[str, int] = {}
    client.on(
        "Network.loadingFinished",
        lambda e: transferred.__setitem__(e["requestId"], int(e["encodedDataLength"])),
    )
    urls: dict[str, str] = {}
    client.on("Network.requestWillBeSent", lambda e: urls.__setitem__(e["requestId"], e["request"]["url"]))
    started = time.perf_counter()
    page.goto(server.url + "/ui")
    page.wait_for_selector("body[data-ready=true]", timeout=30_000)
    ready_s = time.perf_counter() - started
    paint = page.evaluate(
        "Object.fromEntries(performance.getEntriesByType('paint').map(e => [e.name, e.startTime]))"
    )
    context.close()
    own = {urls[r]: n for r, n in transferred.items() if "/ui" in urls.get(r, "")}
    total = sum(transferred.values())
    report = {
        "bytes_transferred_total": total,
        "bytes_transferred_page_files": sum(own.values()),
        "files": own,
        "first_contentful_paint_ms": paint.get("first-contentful-paint"),
        "ready_with_data_s": round(ready_s, 3),
    }
    print(json.dumps(report, indent=2))
    (tmp_path / "page-weight.json").write_text(json.dumps(report, indent=2))
    assert sum(own.values()) < 150_000, own
    assert all(u.startswith(server.url) for u in urls.values()), urls  # nothing from elsewhere
