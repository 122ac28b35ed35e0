"""The gateway: earshot's own Litestar app (same routes, validation, errors, OpenAPI) run as a
Serve deployment behind Serve's HTTP proxy, whose inference service is `FleetInference`.

`FleetInference` implements `earshot.inference.protocol.RemoteInference`: every call goes to the
worker deployment through a `DeploymentHandle` with `multiplexed_model_id` = the catalog id, so
Ray routes it to a worker holding the model. The gateway decodes and encodes audio; workers get
PCM and options and return transcripts and PCM. Streams are Serve streaming calls whose first item
is the stream's header (language and duration, or the sample rate): errors before it are errors
of the call, as in the single server.

Errors: a worker's earshot error arrives as `Remote` and is raised again as the error class the
API maps (same status, code, message). A worker that dies under a call (Ray's actor errors) gets
the call retried once (a stream only if nothing of it was sent yet); after that the client gets
`WorkerLost`: 503 + Retry-After.

The fleet view: `/api/ps` reads the board (every live worker's models, each with its `worker`);
`/api/events` is fed from the board's events (each with its `worker`, plus `worker_started` /
`worker_lost` / `worker_stopped`); `/metrics` adds `earshot_fleet_workers` (live workers),
`earshot_fleet_worker_starts_total` and `earshot_fleet_worker_losses_total`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from contextlib import asynccontextmanager
from typing import Any, Literal

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from earshot.fleet.errors import Remote, WorkerLost
from earshot.inference.errors import CacheBusy
from earshot.inference.protocol import PCM, LoadResult, ModelStatus, Speech
from earshot.options import SpeechOptions, TranscribeOptions
from earshot.settings import Settings
from earshot.types import Segment, Transcript

log = logging.getLogger("earshot.fleet")

GATEWAY_DEPLOYMENT = "earshot-gateway"
EVENTS_POLL_SECONDS = 2.0


def _remote(exc: BaseException) -> Remote | None:
    if isinstance(exc, Remote):
        return exc
    cause = getattr(exc, "cause", None)
    return cause if isinstance(cause, Remote) else None


def _worker_gone(exc: BaseException) -> bool:
    """True for Ray's ways of saying the worker under a call went away."""
    from ray import exceptions as rex

    gone: tuple[type[BaseException], ...] = (rex.RayActorError, rex.ActorUnavailableError)
    for name in ("ActorDiedError", "WorkerCrashedError", "NodeDiedError", "ObjectLostError"):
        cls = getattr(rex, name, None)
        if isinstance(cls, type):
            gone = (*gone, cls)
    return isinstance(exc, gone)


def _busy(exc: BaseException, model_id: str) -> CacheBusy | None:
    """Ray's handle queue in front of the workers is full (max_queued_requests): 503 busy."""
    from ray.serve.exceptions import BackPressureError

    if isinstance(exc, BackPressureError):
        return CacheBusy(
            f"too many requests wait for the fleet's workers (model {model_id}); retry", model=model_id
        )
    return None


def _lost(model_id: str) -> WorkerLost:
    return WorkerLost(
        f"the fleet worker serving model {model_id} went away during the request; retry",
        model=model_id,
    )


class _RemoteStream:
    def __init__(self, gen: Any, first: Any) -> None:
        self._gen = gen
        self._model = ""
        self._first = first

    async def _items(self) -> AsyncIterator[Any]:
        try:
            async for item in self._gen:
                yield item
        except Exception as exc:
            remote = _remote(exc)
            if remote is not None:
                raise remote.rebuild() from None
            if _worker_gone(exc):
                raise _lost(self._model) from None
            raise

    async def aclose(self) -> None:
        with contextlib.suppress(Exception):
            self._gen.cancel()


class _TranscriptStream(_RemoteStream):
    def __init__(self, gen: Any, first: dict[str, Any], model_id: str) -> None:
        super().__init__(gen, first)
        self._model = model_id
        self.language: str = first["language"]
        self.duration: float = first["duration"]

    def __aiter__(self) -> AsyncIterator[Segment]:
        return self._items()


class _SpeechStream(_RemoteStream):
    def __init__(self, gen: Any, first: int, model_id: str) -> None:
        super().__init__(gen, first)
        self._model = model_id
        self.sample_rate = int(first)

    def __aiter__(self) -> AsyncIterator[PCM]:
        return self._items()


class FleetInference:
    """The `Inference` of the gateway: the fleet's workers, through Ray Serve."""

    def __init__(self, settings: Settings, workers: Any, board: Any) -> None:
        self._settings = settings
        self._handle = workers
        self._board = board
        self._waiting = 0
        self._fleet: dict[str, Any] = {"workers": [], "starts": 0, "losses": 0}
        self._relay: asyncio.Task[None] | None = None
        self._preloading = 0

    # ------------------------------------------------------------------ calls

    def _for(self, model_id: str, *, stream: bool = False) -> Any:
        return self._handle.options(multiplexed_model_id=model_id, stream=stream)

    async def _call(self, model_id: str | None, method: str, *args: Any) -> Any:
        handle = self._handle if model_id is None else self._for(model_id)
        for attempt in (1, 2):
            try:
                return await getattr(handle, method).remote(*args)
            except Exception as exc:
                remote = _remote(exc)
                if remote is not None:
                    raise remote.rebuild() from None
                busy = _busy(exc, model_id or "-")
                if busy is not None:
                    raise busy from None
                if not _worker_gone(exc):
                    raise
                log.warning("fleet: a worker went away under %s (attempt %d)", method, attempt)
                if attempt == 2:
                    raise _lost(model_id or "-") from None
        raise AssertionError("unreachable")

    async def _start_stream(self, model_id: str, method: str, *args: Any) -> tuple[Any, Any]:
        for attempt in (1, 2):
            gen = getattr(self._for(model_id, stream=True), method).remote(*args)
            try:
                first = await gen.__anext__()
                return gen, first
            except Exception as exc:
                remote = _remote(exc)
                if remote is not None:
                    raise remote.rebuild() from None
                busy = _busy(exc, model_id)
                if busy is not None:
                    raise busy from None
                if not _worker_gone(exc):
                    raise
                log.warning("fleet: a worker went away starting %s (attempt %d)", method, attempt)
                if attempt == 2:
                    raise _lost(model_id) from None
        raise AssertionError("unreachable")

    async def transcribe(self, model_id: str, audio: PCM, options: TranscribeOptions) -> Transcript:
        result: Transcript = await self._call(model_id, "transcribe", model_id, audio, options)
        return result

    async def transcribe_stream(
        self, model_id: str, audio: PCM, options: TranscribeOptions
    ) -> _TranscriptStream:
        gen, first = await self._start_stream(model_id, "transcribe_stream", model_id, audio, options)
        return _TranscriptStream(gen, first, model_id)

    async def synthesize(self, model_id: str, text: str, options: SpeechOptions) -> Speech:
        result: Speech = await self._call(model_id, "synthesize", model_id, text, options)
        return result

    async def synthesize_stream(self, model_id: str, text: str, options: SpeechOptions) -> _SpeechStream:
        gen, first = await self._start_stream(model_id, "synthesize_stream", model_id, text, options)
        return _SpeechStream(gen, first, model_id)

    async def voices(self, model_id: str) -> Sequence[str]:
        result: Sequence[str] = await self._call(None, "voices", model_id)
        return result

    @asynccontextmanager
    async def hold(self, model_id: str, keep_alive: float | None = None) -> AsyncIterator[None]:
        gen, _ = await self._start_stream(model_id, "hold", model_id, keep_alive)
        try:
            yield
        finally:
            with contextlib.suppress(Exception):
                gen.cancel()

    async def load(
        self, model_id: str, *, keep_alive: float | None = None, pin: bool | None = None
    ) -> LoadResult:
        result: LoadResult = await self._call(model_id, "load", model_id, keep_alive, pin)
        return result

    async def unload(self, model_id: str) -> Literal["unloaded", "scheduled", "not_loaded"]:
        """Unload it on every worker holding it (Ray routes each call to a holder; a worker that
        unloads it stops being one)."""
        outcomes: list[str] = []
        holders = {m.worker for m in await self.status() if m.id == model_id}
        for _ in range(max(1, len(holders))):
            outcomes.append(await self._call(model_id, "unload", model_id))
            if not {m.worker for m in await self.status() if m.id == model_id}:
                break
        if "unloaded" in outcomes:
            return "unloaded"
        if "scheduled" in outcomes:
            return "scheduled"
        return "not_loaded"

    # ------------------------------------------------------------------ the fleet view

    async def status(self) -> Sequence[ModelStatus]:
        fleet = await self._board.status.remote()
        self._note(fleet)
        models: list[ModelStatus] = list(fleet["models"])
        models.sort(key=lambda m: m.last_used_at or m.loading_since or 0.0, reverse=True)
        return models

    def _note(self, fleet: dict[str, Any]) -> None:
        self._waiting = int(fleet["waiting"])
        self._fleet = fleet

    def waiting_requests(self) -> int:
        return self._waiting

    @property
    def ready(self) -> bool:
        return self._preloading == 0 and bool(self._fleet["workers"])

    def describe(self) -> dict[str, Any]:
        s = self._settings
        return {
            "max_models": s.fleet_models_per_worker,
            "memory_budget_bytes": None if s.memory_budget_bytes is None else int(s.memory_budget_bytes),
            "idle_timeout": s.model_idle_timeout,
            "workers": list(self._fleet["workers"]),
        }

    @property
    def fleet(self) -> dict[str, Any]:
        """The board's last answer (workers, starts, losses)."""
        return self._fleet

    # ------------------------------------------------------------------ lifecycle

    async def start(self, *, preload: Sequence[str], publish: Callable[[dict[str, Any]], None]) -> None:
        self._note(await self._board.status.remote())
        self._relay = asyncio.get_running_loop().create_task(self._relay_events(publish))
        if preload:
            self._preloading = len(preload)
            asyncio.get_running_loop().create_task(self._preload(list(preload)))

    async def _preload(self, ids: list[str]) -> None:
        pin = True if self._settings.pin_preloaded else None
        for model_id in ids:
            try:
                await self.load(model_id, pin=pin)
            except Exception:
                log.warning("fleet: preloading %s failed", model_id, exc_info=True)
            finally:
                self._preloading -= 1

    async def _relay_events(self, publish: Callable[[dict[str, Any]], None]) -> None:
        after = 0
        while True:
            try:
                records = await self._board.wait_events.remote(after, EVENTS_POLL_SECONDS)
                for record in records:
                    after = max(after, int(record["id"]))
                    publish({k: v for k, v in record.items() if k != "id"})
                self._note(await self._board.status.remote())
            except asyncio.CancelledError:
                raise
            except Exception:
                log.warning("fleet: reading the board failed", exc_info=True)
                await asyncio.sleep(1.0)

    async def close(self) -> None:
        if self._relay is not None:
            self._relay.cancel()
            await asyncio.gather(self._relay, return_exceptions=True)


class FleetCollector(Collector):
    """The fleet's own series, from the board's last answer (a scrape never calls the board)."""

    def __init__(self, inference: FleetInference) -> None:
        self._inference = inference

    def collect(self) -> Iterable[Metric]:
        fleet = self._inference.fleet
        live = GaugeMetricFamily("earshot_fleet_workers", "Fleet workers registered with the board and alive")
        live.add_metric([], len(fleet["workers"]))
        starts = CounterMetricFamily(
            "earshot_fleet_worker_starts",
            "Fleet workers started (a replacement for a dead worker counts; it starts with an empty cache)",
        )
        starts.add_metric([], int(fleet["starts"]))
        losses = CounterMetricFamily(
            "earshot_fleet_worker_losses",
            "Fleet workers lost: their heartbeat stopped (killed, out of memory, node gone)",
        )
        losses.add_metric([], int(fleet["losses"]))
        return [live, starts, losses]


class GatewayBase:
    """The gateway replica: builds earshot's app on a `FleetInference` (Serve runs its lifespan)."""

    def __init__(self, settings: Settings, workers: Any, board: Any) -> None:
        import os

        os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
        self.settings = settings
        self.inference = FleetInference(settings, workers, board)

    def __serve_build_asgi_app__(self) -> Any:
        from earshot.main import create_app
        from earshot.observability import default_registry

        registry: CollectorRegistry = default_registry()
        registry.register(FleetCollector(self.inference))
        return create_app(self.settings, inference=self.inference, registry=registry)


def gateway_deployment(settings: Settings) -> Any:
    from ray import serve

    return serve.deployment(
        name=GATEWAY_DEPLOYMENT,
        num_replicas=1,
        ray_actor_options={"num_cpus": 0},
        max_ongoing_requests=max(64, settings.max_waiting_requests),
        graceful_shutdown_timeout_s=settings.shutdown_grace_seconds + 5,
    )(serve.ingress()(GatewayBase))
