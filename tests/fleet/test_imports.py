"""The single-process server never imports Ray (nor the fleet): `make run` works without the
fleet extra, and starts as fast as it did."""

from __future__ import annotations

import subprocess
import sys

CHECK = """
import sys
import earshot.main, earshot.cli, earshot.ps
earshot.main.create_app  # the factory itself is importable without Ray
loaded = sorted(m for m in sys.modules if m == "ray" or m.startswith("ray.") or m.startswith("earshot.fleet"))
print(",".join(loaded))
"""


def test_main_and_cli_do_not_import_ray() -> None:
    done = subprocess.run(
        [sys.executable, "-c", CHECK], capture_output=True, text=True, timeout=120, check=True
    )
    assert done.stdout.strip() == "", done.stdout
