"""Where the cache's blocking work runs: footprint estimates, downloads, loads, unloads.

The cache takes any `BlockingRunner` (cache.protocol). The app passes one with a limiter of its
own for the "loads" role; without one the cache runs its work on a small pool of its own
(`own_pool`, threads named `earshot-load-N`), never the event loop's default executor, which
inference shares: long streams cannot starve a load while its `load_timeout` runs.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import Executor, ThreadPoolExecutor
from typing import Any, TypeVar

T = TypeVar("T")

LOAD_THREADS = 4  # a load, unloads for its room and an estimate can run side by side
THREAD_PREFIX = "earshot-load"


class ExecutorRunner:
    """A BlockingRunner over a `concurrent.futures` executor (None: the loop's default executor)."""

    def __init__(self, executor: Executor | None) -> None:
        self.executor = executor

    async def run(self, fn: Callable[..., T], /, *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)


def own_pool(threads: int = LOAD_THREADS) -> ThreadPoolExecutor:
    """The cache's default pool: `threads` workers named earshot-load-N."""
    return ThreadPoolExecutor(max_workers=threads, thread_name_prefix=THREAD_PREFIX)
