"""README.md stays true: its settings table is the one the code generates, and it names every setting
with both of its environment names."""

from __future__ import annotations

import runpy
from pathlib import Path

from earshot.settings import SEED_ALIASES, Settings

REPO = Path(__file__).resolve().parents[2]
README = (REPO / "README.md").read_text()


def test_settings_table_is_current() -> None:
    table = runpy.run_path(str(REPO / "scripts" / "settings_table.py"))["settings_table"]()
    start = README.index("<!-- settings table")
    end = README.index("<!-- end of settings table -->")
    shown = README[start:end].split("\n", 1)[1].strip()
    assert shown == table, "README's settings table is stale: run `python scripts/settings_table.py`"


def test_every_setting_with_both_env_names() -> None:
    for name in Settings.model_fields:
        if name == "models":
            assert "`models:`" in README
            continue
        assert f"`EARSHOT_{name.upper()}`" in README, name
    for name in SEED_ALIASES:
        assert f"`SPEACHES_{name.upper()}`" in README, name


def test_the_two_commands_come_first() -> None:
    first_section = README.split("\n## ", 2)[1]
    assert "make run" in first_section
    assert "make test" in first_section
