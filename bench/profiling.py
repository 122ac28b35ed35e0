"""Profiles for `--profile NAME`: pyinstrument, written as HTML and text next to the results."""

from __future__ import annotations

from pathlib import Path
from typing import Any

# A server's loop thread is idle most of the time: keep frames down to 0.02 % of the recording, so
# the request handling (small next to the idle wait) is not filtered out of the text tree.
_TEXT_OPTIONS = {"filter_threshold": 0.0002}


def write_profile(profiler: Any, base: Path) -> list[str]:
    """Write a stopped pyinstrument Profiler's session to `<base>.html` (interactive) and
    `<base>.txt` (the call tree, then the functions by self time)."""
    base.parent.mkdir(parents=True, exist_ok=True)
    html = base.with_suffix(".html")
    text = base.with_suffix(".txt")
    html.write_text(profiler.output_html(), encoding="utf-8")
    tree = profiler.output_text(unicode=True, color=False, processor_options=_TEXT_OPTIONS)
    flat = profiler.output_text(unicode=True, color=False, flat=True, processor_options=_TEXT_OPTIONS)
    text.write_text(f"{tree}\n\nBy self time:\n{flat}", encoding="utf-8")
    return [str(html), str(text)]
