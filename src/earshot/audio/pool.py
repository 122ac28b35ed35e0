"""Decode untrusted audio in a few worker processes, so that no input can take the server down.

FFmpeg is native code fed with client bytes: a crash (a SIGSEGV), a runaway allocation or a decode
that never ends would otherwise kill or stall the server and every request in it. `DecodePool`
keeps `workers` single-process `concurrent.futures.ProcessPoolExecutor`s (started with
`forkserver`, so a worker never inherits the server's threads or models). A request takes one free
executor, sends it the upload's bytes and gets float32 PCM back; at most `workers` decodes run at
once (more wait, up to `max_waiting`, then get `DecodeBusy`), so decodes cannot crowd out inference
and loads. Each worker runs under limits set at its start:

- `RLIMIT_AS`: its address space at start-up plus `memory_bytes`, so an allocation past that fails
  in the worker (MemoryError, or ENOMEM inside FFmpeg) instead of growing the server;
- `RLIMIT_CPU` (soft, renewed before each decode): `cpu_seconds` of CPU per decode; past it the
  kernel ends the worker (SIGXCPU).

A worker also ends as soon as the server process does, however it ends. The workers are children
of the fork server, not of the server, and each holds both ends of its executor's call pipe, so
nothing else tells them: a server killed by a signal (SIGKILL, the OOM killer, or uvicorn's own
re-raise of SIGTERM once it has shut down, which skips the interpreter's exit and with it the
executors' last sentinels) would otherwise leave idle workers, the fork server and the resource
tracker behind for good. Each worker watches the server with a pidfd (`_exit_with`).

One executor per worker, not one executor of `workers` processes: a dead process breaks its whole
`ProcessPoolExecutor` (every future of it fails with `BrokenProcessPool`), which would fail the
innocent decodes running beside the culprit. Here only the request whose worker died gets
`AudioDecodeError` (400 `invalid_audio`); that executor is replaced, the failure is counted
(`earshot_audio_decode_failures_total{reason}`) and logged, and the server goes on.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import multiprocessing
import os
import resource
import select
import threading
import time
from collections.abc import Callable
from concurrent.futures.process import BrokenProcessPool
from typing import Any, BinaryIO, Literal, Protocol

import numpy as np
import numpy.typing as npt

from earshot.audio.decode import decode_audio
from earshot.audio.errors import AudioDecodeError, AudioTooLong

__all__ = ["DecodeBusy", "DecodePool", "Decoder", "FailureReason", "InProcessDecoder"]

log = logging.getLogger("earshot.audio")

#: `reason` label values of earshot_audio_decode_failures_total (a fixed set).
FailureReason = Literal["invalid", "too_long", "out_of_memory", "crashed", "timeout"]
FAILURE_REASONS: tuple[FailureReason, ...] = ("invalid", "too_long", "out_of_memory", "crashed", "timeout")

Source = BinaryIO | bytes | bytearray | memoryview


class Decoder(Protocol):
    """What the API decodes uploads with: `DecodePool`, or `InProcessDecoder`."""

    async def decode(
        self, source: Source, *, sample_rate: int = 16000, max_seconds: float | None = None
    ) -> npt.NDArray[np.float32]: ...


class DecodeBusy(Exception):
    """Too many requests are already waiting for a decode worker (API: 503, Retry-After)."""

    def __init__(self, waiting: int) -> None:
        super().__init__(f"{waiting} requests are already waiting to decode audio; retry shortly")
        self.message = str(self)


def _vm_size() -> int:
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    return 0  # pragma: no cover - not Linux


def _wait_for_exit(pid: int) -> None:
    """Return once process `pid` has ended (at once if it has already)."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    except (AttributeError, OSError):  # pragma: no cover - no pidfd (Linux before 5.3)
        while True:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return
            time.sleep(1.0)
    try:
        select.select([fd], [], [])  # a pidfd turns readable when its process ends
    finally:
        os.close(fd)


def _exit_with(server_pid: int) -> None:
    """In the worker: a daemon thread that ends this process once the server has ended."""

    def watch() -> None:
        _wait_for_exit(server_pid)
        os._exit(0)

    threading.Thread(target=watch, name="earshot-decode-exit-with-server", daemon=True).start()


def _init_worker(memory_bytes: int | None, server_pid: int) -> None:
    """Runs once in each new worker process."""
    _exit_with(server_pid)  # its stack counts in the address space measured below
    # The worker decodes one input at a time: no BLAS thread pools reserving address space.
    for name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[name] = "1"
    import av  # noqa: F401 - loaded before the address space is measured

    if memory_bytes is not None:
        limit = _vm_size() + memory_bytes
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))


def _cpu_used() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


Outcome = tuple[str, Any]


def _decode_in_worker(
    data: bytes,
    sample_rate: int,
    max_seconds: float | None,
    cpu_seconds: float | None,
    hook: Callable[[bytes], None] | None,
) -> Outcome:
    """The worker's task: a tagged outcome (exceptions with custom constructors pickle badly)."""
    if cpu_seconds is not None:
        soft = int(_cpu_used() + cpu_seconds) + 1
        _, hard = resource.getrlimit(resource.RLIMIT_CPU)
        resource.setrlimit(resource.RLIMIT_CPU, (soft, hard))
    try:
        if hook is not None:
            hook(data)
        return "ok", decode_audio(data, sample_rate=sample_rate, max_seconds=max_seconds)
    except AudioTooLong as exc:
        return "too_long", exc.max_seconds
    except AudioDecodeError as exc:
        return "invalid", exc.reason
    except MemoryError:
        return "out_of_memory", None


def _read(source: Source) -> bytes:
    if isinstance(source, bytes):
        return source
    if isinstance(source, bytearray | memoryview):
        return bytes(source)
    return source.read()


class InProcessDecoder:
    """`decode_audio` in a worker thread of this process: no isolation (tests, benchmarks)."""

    async def decode(
        self, source: Source, *, sample_rate: int = 16000, max_seconds: float | None = None
    ) -> npt.NDArray[np.float32]:
        return await asyncio.to_thread(decode_audio, source, sample_rate=sample_rate, max_seconds=max_seconds)

    def start(self) -> None:
        return None

    def close(self) -> None:
        return None


class DecodePool:
    """`workers` decode processes, each under a memory and CPU limit, replaced when one dies."""

    def __init__(
        self,
        workers: int = 2,
        *,
        memory_bytes: int | None = 2 * 2**30,
        cpu_seconds: float | None = 300.0,
        max_waiting: int = 64,
        registry: Any = None,
        hook: Callable[[bytes], None] | None = None,
    ) -> None:
        if workers < 1:
            raise ValueError("workers must be at least 1")
        self.workers = workers
        self.memory_bytes = memory_bytes
        self.cpu_seconds = cpu_seconds
        self.max_waiting = max_waiting
        self.hook = hook
        self._context = multiprocessing.get_context("forkserver")
        # The fork server imports PyAV and numpy once; each worker is a fork of it.
        self._context.set_forkserver_preload(["earshot.audio.decode"])
        self._free: asyncio.Queue[concurrent.futures.ProcessPoolExecutor] | None = None
        self._all: set[concurrent.futures.ProcessPoolExecutor] = set()
        self._waiting = 0
        self._failures: Any = None
        if registry is not None:
            from prometheus_client import Counter

            self._failures = Counter(
                "earshot_audio_decode_failures_total",
                "Audio decodes that failed, by reason: invalid (not decodable audio), too_long "
                "(over max_audio_seconds), out_of_memory (over the worker's memory limit), crashed "
                "(the decode worker died), timeout (over the worker's CPU limit).",
                ["reason"],
                registry=registry,
            )
            for reason in FAILURE_REASONS:
                self._failures.labels(reason=reason)

    def _executor(self) -> concurrent.futures.ProcessPoolExecutor:
        executor = concurrent.futures.ProcessPoolExecutor(
            max_workers=1,
            mp_context=self._context,
            initializer=_init_worker,
            initargs=(self.memory_bytes, os.getpid()),
        )
        self._all.add(executor)
        return executor

    def start(self) -> None:
        """Create the executors (their processes start on first use, or now with `warm`)."""
        if self._free is not None:
            return
        self._free = asyncio.Queue()
        for _ in range(self.workers):
            self._free.put_nowait(self._executor())

    async def warm(self) -> None:
        """Start every worker process now (the first decode then pays nothing for it)."""
        self.start()
        assert self._free is not None
        executors = [await self._free.get() for _ in range(self.workers)]
        try:
            loop = asyncio.get_running_loop()
            await asyncio.gather(*(loop.run_in_executor(e, _cpu_used) for e in executors))
        finally:
            for e in executors:
                self._free.put_nowait(e)

    def close(self) -> None:
        for executor in self._all:
            executor.shutdown(wait=False, cancel_futures=True)
        self._all.clear()
        self._free = None

    def _give_back(self, executor: concurrent.futures.ProcessPoolExecutor, *, broken: bool = False) -> None:
        """A decode is over: its executor (a fresh one if its process died) is free again."""
        if self._free is None or executor not in self._all:  # closed meanwhile
            executor.shutdown(wait=False, cancel_futures=True)
            return
        if broken:
            executor.shutdown(wait=False, cancel_futures=True)
            self._all.discard(executor)
            executor = self._executor()
        self._free.put_nowait(executor)

    def _count(self, reason: FailureReason) -> None:
        if self._failures is not None:
            self._failures.labels(reason=reason).inc()

    async def decode(
        self, source: Source, *, sample_rate: int = 16000, max_seconds: float | None = None
    ) -> npt.NDArray[np.float32]:
        """Decode `source` (bytes or a binary file object) to float32 mono PCM at `sample_rate`.
        Raises `AudioDecodeError` (the input is not decodable audio, or its worker died or ran out
        of memory or CPU time), `AudioTooLong`, or `DecodeBusy`."""
        if self._free is None:
            self.start()
        assert self._free is not None
        if self._waiting >= self.max_waiting:
            raise DecodeBusy(self._waiting)
        data = await asyncio.to_thread(_read, source)
        if not data:
            self._count("invalid")
            raise AudioDecodeError("the input is empty")
        self._waiting += 1
        try:
            executor = await self._free.get()
        finally:
            self._waiting -= 1
        loop = asyncio.get_running_loop()
        started = loop.time()
        future = executor.submit(
            _decode_in_worker, data, sample_rate, max_seconds, self.cpu_seconds, self.hook
        )
        del data
        try:
            # A cancelled request (client gone, shutdown) stops waiting at once; the worker finishes
            # that decode on its own and its executor goes back to the pool then.
            kind, value = await asyncio.shield(asyncio.wrap_future(future))
        except asyncio.CancelledError:

            def done(f: concurrent.futures.Future[Outcome]) -> None:
                broken = not f.cancelled() and isinstance(f.exception(), BrokenProcessPool)
                loop.call_soon_threadsafe(lambda: self._give_back(executor, broken=broken))

            future.add_done_callback(done)
            raise
        except BrokenProcessPool:
            self._give_back(executor, broken=True)
            elapsed = loop.time() - started
            timeout = self.cpu_seconds is not None and elapsed >= self.cpu_seconds
            reason: FailureReason = "timeout" if timeout else "crashed"
            self._count(reason)
            log.warning(
                "audio decode worker died (%s); replaced", reason, extra={"event": "decode_worker_died"}
            )
            raise AudioDecodeError(
                "the decoder ran out of time on this input"
                if timeout
                else "the decoder failed on this input (its worker process died)"
            ) from None
        self._give_back(executor)
        if kind == "ok":
            return value  # type: ignore[no-any-return]
        if kind == "too_long":
            self._count("too_long")
            raise AudioTooLong(value)
        if kind == "out_of_memory":
            self._count("out_of_memory")
            log.warning("audio decode over its memory limit", extra={"event": "decode_out_of_memory"})
            raise AudioDecodeError("decoding this input needs more memory than a decode may use")
        self._count("invalid")
        raise AudioDecodeError(str(value))
