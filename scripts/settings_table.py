"""Print the README's settings table from the Settings model, so the docs never drift from the code.

.venv/bin/python scripts/settings_table.py      # print it
tests/unit/test_readme.py                       # fails when README.md's copy is stale
"""

from __future__ import annotations

import json

from pydantic_core import PydanticUndefined

from earshot.settings import ENV_PREFIX, SEED_ALIASES, SEED_PREFIX, Settings


def _default(name: str) -> str:
    field = Settings.model_fields[name]
    if field.default_factory is not None:
        value = field.default_factory()  # type: ignore[call-arg]
    elif field.default is PydanticUndefined:
        return "(required)"
    else:
        value = field.default
    if value is None:
        return "unset"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (list, dict)):
        return json.dumps(value)
    return str(value)


def settings_table() -> str:
    rows = [
        "| setting | env | seed alias | default | meaning |",
        "| --- | --- | --- | --- | --- |",
    ]
    for name, field in Settings.model_fields.items():
        if name == "models":
            continue
        seed = f"`{SEED_PREFIX}{name.upper()}`" if name in SEED_ALIASES else ""
        rows.append(
            f"| `{name}` | `{ENV_PREFIX}{name.upper()}` | {seed} | `{_default(name)}` | {field.description or ''} |"
        )
    return "\n".join(rows)


if __name__ == "__main__":
    print(settings_table())
