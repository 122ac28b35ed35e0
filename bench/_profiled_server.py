"""`earshot serve` under pyinstrument: `python -m bench._profiled_server OUT_BASE`.

Started by bench.common.earshot_server for `--profile NAME`. Profiles the main thread (the event
loop: HTTP parsing, multipart, routing, middleware, the cache, response encoding). Work the server
hands to worker threads (audio decode, inference, model loads) is not sampled; its share shows as
time the loop spends awaiting. On SIGTERM uvicorn shuts down, restores our handler and re-raises
the signal; the handler turns it into SystemExit, so the profile is written on the way out.
"""

from __future__ import annotations

import signal
import sys
from pathlib import Path
from types import FrameType


def _exit(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(0)


def main() -> int:
    from pyinstrument import Profiler

    from bench.profiling import write_profile

    base = Path(sys.argv[1])
    signal.signal(signal.SIGTERM, _exit)
    profiler = Profiler(interval=0.001, async_mode="disabled")
    profiler.start()
    code = 0
    try:
        from earshot.cli import main as earshot_main

        code = earshot_main(["serve"])
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 0
    finally:
        profiler.stop()
        for path in write_profile(profiler, base):
            print(f"profile written: {path}", flush=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
