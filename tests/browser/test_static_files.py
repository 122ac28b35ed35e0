"""The console's files as shipped in the package (no browser needed): every file the page
references is there, nothing is fetched from elsewhere, nothing inline that the CSP would refuse."""

from __future__ import annotations

import re

from earshot.ui.routes import CONTENT_SECURITY_POLICY, static_dir

STATIC = static_dir()


def test_every_file_the_page_references_is_in_the_package() -> None:
    html = (STATIC / "index.html").read_text()
    refs = re.findall(r'(?:src|href)="(/ui/[^"]+)"', html)
    assert "/ui/js/app.js" in refs
    assert "/ui/console.css" in refs
    for ref in refs:
        assert (STATIC / ref.removeprefix("/ui/")).is_file(), ref
    for script in (STATIC / "js").glob("*.js"):
        for module in re.findall(r'from "\./([^"]+)"', script.read_text()):
            assert (STATIC / "js" / module).is_file(), f"{script.name} imports {module}"


def test_nothing_from_the_internet_and_nothing_inline() -> None:
    for path in STATIC.rglob("*"):
        if path.is_file() and path.suffix in {".html", ".js", ".css"}:
            text = path.read_text()
            assert not re.search(r"https?://", text), f"{path.name} names an outside URL"
            assert "innerHTML" not in text, f"{path.name}: build nodes with textContent"
    html = (STATIC / "index.html").read_text()
    assert not re.search(r"<script(?![^>]*\bsrc=)", html), "inline <script>"
    assert "<style" not in html, "inline style"
    assert " style=" not in html, "inline style attribute"
    assert not re.search(r"\son[a-z]+=", html), "inline event handler"
    assert "'unsafe-inline'" not in CONTENT_SECURITY_POLICY
