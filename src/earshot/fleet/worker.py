"""The worker deployment: each replica is an earshot model cache with its backends.

A replica builds its models the way the single server does (`earshot.main.build_local_models`:
the same backends, worker threads, `ModelCache` with every rule of DESIGN §2, `LocalInference`),
with `max_models = fleet_models_per_worker`. Requests reach it through Ray Serve's model
multiplexing keyed by the catalog id: the gateway calls
`handle.options(multiplexed_model_id=id)`, so Ray sends a model's requests to a replica that
holds it.

Ray's multiplexer and earshot's cache agree on what a replica holds:
- the multiplexed loader (`_model`) returns a token only; the real load is earshot's (single
  flight: a model is never loaded twice on one replica), done by the request itself;
- when Ray's LRU drops a token (a model past `fleet_models_per_worker` on this replica), the model
  is unloaded from the cache (at once if idle, else when its last reference goes);
- when earshot evicts a model (idle timeout, memory budget, capacity, manual), its token is taken
  out of Ray's multiplexer too, so Ray stops routing the model here for that reason; a request
  that still comes reloads it here.

Each replica registers with the board (`earshot.fleet.board`) and pushes its events and models on
every cache event and each heartbeat. earshot's errors are sent as `earshot.fleet.errors.Remote`.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import importlib
import logging
import os
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any, Literal

from earshot.cache.events import CacheEvent, EvictionReason, Hit
from earshot.fleet.errors import to_remote
from earshot.inference.protocol import PCM, LoadResult, ModelStatus, Speech
from earshot.main import LocalModels, build_catalog_for, build_local_models, cache_config
from earshot.models.resolver import HubResolver
from earshot.observability import Observability
from earshot.observability.events import event_record
from earshot.options import SpeechOptions, TranscribeOptions
from earshot.settings import Settings
from earshot.types import Segment, Transcript

log = logging.getLogger("earshot.fleet")

WORKER_DEPLOYMENT = "earshot-worker"


def _translated(exc: BaseException) -> BaseException:
    remote = to_remote(exc)
    return exc if remote is None else remote


def _fleet_metrics(worker: str, node: str) -> Any | None:
    """`earshot.fleet.metrics.FleetMetrics(worker, node)` when that module is installed: the
    worker's cache metrics for Ray's metrics export (a separate part of the fleet)."""
    try:
        module = importlib.import_module("earshot.fleet.metrics")
    except ModuleNotFoundError:
        return None
    return module.FleetMetrics(worker=worker, node=node)


class WorkerBase:
    """The worker's methods; `worker_deployment` adds the multiplexed loader (its limit is a
    setting) and makes it a Serve deployment."""

    heartbeat_s: float = 1.0

    async def __init__(self, settings: Settings, board: Any, heartbeat_s: float = 1.0) -> None:  # type: ignore[misc]  # Serve awaits an async __init__
        os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
        import ray
        from ray import serve

        self.heartbeat_s = heartbeat_s
        self.worker_id = serve.get_replica_context().replica_tag
        self.node = str(ray.util.get_node_ip_address())  # type: ignore[no-untyped-call]
        self.board = board
        self.settings = settings
        catalog = build_catalog_for(settings)
        self.catalog = catalog
        self.resolver = HubResolver(
            catalog, enabled=settings.allow_hub_models, max_models=settings.max_catalog_models
        )
        self.obs = Observability.create(settings, set_global_tracer_provider=False)
        self.metrics = _fleet_metrics(self.worker_id, self.node)
        observers: list[Any] = [self._on_event]
        if self.metrics is not None:
            observers.append(self.metrics.observer)
        config = dataclasses.replace(cache_config(settings), max_models=settings.fleet_models_per_worker)
        self.local: LocalModels = build_local_models(
            settings,
            catalog,
            self.obs,
            observers=observers,
            config=config,
            record=None if self.metrics is None else self.metrics.record_inference,
        )
        self.inference = self.local.inference
        self._pending: list[dict[str, Any]] = []
        self._flush_task: asyncio.Task[None] | None = None
        self.obs.start()
        if self.metrics is not None:
            self.metrics.start(self.local.cache.snapshot, settings.nvml_interval_seconds)
        await board.register.remote(self.worker_id, self.node, os.getpid())
        self._heartbeat = asyncio.get_running_loop().create_task(self._beat())
        log.info("fleet worker %s started on %s (pid %d)", self.worker_id, self.node, os.getpid())

    # ------------------------------------------------------------------ the board

    def _on_event(self, event: CacheEvent) -> None:
        """A cache observer: queue the event's record and push it (with the models now) at once."""
        if isinstance(event, Hit):
            return  # hits stay countable in the metrics; the fleet's event feed skips them
        record = event_record(event, 0)
        record.pop("id")
        record["worker"] = self.worker_id
        self._pending.append(record)
        if event.kind == "evicted":
            self._forget(event.model)
        if self._flush_task is None or self._flush_task.done():
            self._flush_task = asyncio.get_running_loop().create_task(self._flush())

    async def _flush(self) -> None:
        await asyncio.sleep(0)  # the cache finishes the step that published the event
        await self._push()

    async def _push(self) -> None:
        records, self._pending = self._pending, []
        models = self.inference.status_now(self.worker_id)
        waiting = self.local.cache.snapshot().waiting_requests
        try:
            known = await self.board.push.remote(self.worker_id, records, models, waiting)
            if not known:  # the board took us for lost (a long stall): say we are here again
                await self.board.register.remote(self.worker_id, self.node, os.getpid())
                await self.board.push.remote(self.worker_id, [], models, waiting)
        except Exception:
            log.warning("fleet worker %s: pushing to the board failed", self.worker_id, exc_info=True)

    async def _beat(self) -> None:
        while True:
            await asyncio.sleep(self.heartbeat_s)
            await self._push()

    def _forget(self, model_id: str) -> None:
        """Take `model_id` out of Ray's multiplexer (earshot evicted it), without unloading."""
        wrapper = getattr(self, "__serve_multiplex_wrapper", None)
        models = getattr(wrapper, "models", None)
        if models is not None and model_id in models:
            models.pop(model_id, None)
            wrapper._push_multiplexed_replica_info = True  # type: ignore[union-attr]

    # ------------------------------------------------------------------ Ray's multiplexing

    async def _token(self, model_id: str) -> Any:
        """The multiplexed loader's body: a token standing for the model; no load (the request's
        acquire loads it, once). Ray calls the token's `__del__` when its LRU drops it."""
        await self._spec(model_id)
        token = _Token(model_id)
        token.__del__ = self._dropper(model_id)  # type: ignore[attr-defined]
        return token

    def _dropper(self, model_id: str) -> Callable[[], Any]:
        async def drop() -> None:
            with contextlib.suppress(Exception):
                await self.local.cache.unload(model_id, EvictionReason.CAPACITY)

        return drop

    async def _model(self, model_id: str) -> Any:  # replaced by the multiplexed loader
        return await self._token(model_id)

    async def _spec(self, model_id: str) -> None:
        """A hub id the gateway added on demand is added to this worker's catalog too."""
        if self.catalog.resolve(model_id) is None:
            await self.resolver.ensure(model_id)

    async def _enter(self, model_id: str) -> None:
        try:
            await self._model(model_id)
        except Exception as exc:
            raise _translated(exc) from None

    # ------------------------------------------------------------------ the methods

    async def transcribe(self, model_id: str, audio: PCM, options: TranscribeOptions) -> Transcript:
        await self._enter(model_id)
        try:
            return await self.inference.transcribe(model_id, audio, options)
        except Exception as exc:
            raise _translated(exc) from None

    async def transcribe_stream(
        self, model_id: str, audio: PCM, options: TranscribeOptions
    ) -> AsyncIterator[dict[str, Any] | Segment]:
        """First item: {"language", "duration"} (errors before it are the call's); then segments."""
        await self._enter(model_id)
        try:
            stream = await self.inference.transcribe_stream(model_id, audio, options)
        except Exception as exc:
            raise _translated(exc) from None
        try:
            yield {"language": stream.language, "duration": stream.duration}
            async for segment in stream:
                yield segment
        except Exception as exc:
            raise _translated(exc) from None
        finally:
            await stream.aclose()

    async def synthesize(self, model_id: str, text: str, options: SpeechOptions) -> Speech:
        await self._enter(model_id)
        try:
            return await self.inference.synthesize(model_id, text, options)
        except Exception as exc:
            raise _translated(exc) from None

    async def synthesize_stream(
        self, model_id: str, text: str, options: SpeechOptions
    ) -> AsyncIterator[int | PCM]:
        """First item: the sample rate (the first piece is made before it); then PCM pieces."""
        await self._enter(model_id)
        try:
            stream = await self.inference.synthesize_stream(model_id, text, options)
        except Exception as exc:
            raise _translated(exc) from None
        try:
            yield stream.sample_rate
            async for piece in stream:
                yield piece
        except Exception as exc:
            raise _translated(exc) from None
        finally:
            await stream.aclose()

    async def hold(self, model_id: str, keep_alive: float | None) -> AsyncIterator[str]:
        """Holds the model until the caller cancels the stream (a realtime session)."""
        await self._enter(model_id)
        try:
            async with self.inference.hold(model_id, keep_alive):
                yield self.worker_id
                await asyncio.Event().wait()
        except Exception as exc:
            raise _translated(exc) from None

    async def voices(self, model_id: str) -> Sequence[str]:
        try:
            await self._spec(model_id)
            return list(await self.inference.voices(model_id))
        except Exception as exc:
            raise _translated(exc) from None

    async def load(self, model_id: str, keep_alive: float | None, pin: bool | None) -> LoadResult:
        await self._enter(model_id)
        try:
            return await self.inference.load(model_id, keep_alive=keep_alive, pin=pin)
        except Exception as exc:
            raise _translated(exc) from None

    async def unload(self, model_id: str) -> Literal["unloaded", "scheduled", "not_loaded"]:
        try:
            return await self.inference.unload(model_id)
        except Exception as exc:
            raise _translated(exc) from None

    async def status(self) -> list[ModelStatus]:
        return self.inference.status_now(self.worker_id)

    async def whoami(self) -> dict[str, Any]:
        return {"worker": self.worker_id, "node": self.node, "pid": os.getpid()}

    async def __del__(self) -> None:
        """Serve's graceful stop: leave the board, close the cache (unloads every model)."""
        heartbeat = getattr(self, "_heartbeat", None)
        if heartbeat is None:
            return
        heartbeat.cancel()
        if self.metrics is not None:
            with contextlib.suppress(Exception):
                self.metrics.stop()
        with contextlib.suppress(Exception):
            await self.board.leave.remote(self.worker_id)
        await self.local.cache.close()
        self.obs.stop()


class _Token:
    """What Ray's multiplexer keeps for a model on a replica."""

    def __init__(self, model_id: str) -> None:
        self.model_id = model_id


def worker_deployment(settings: Settings) -> Any:
    """The worker as a Serve deployment (not bound): replicas, resources and the multiplexing limit
    from the settings."""
    from ray import serve

    per_worker = settings.fleet_models_per_worker

    class EarshotWorker(WorkerBase):
        @serve.multiplexed(max_num_models_per_replica=per_worker)  # type: ignore[untyped-decorator]
        async def _model(self, model_id: str) -> Any:
            return await self._token(model_id)

    options: dict[str, Any] = {
        "name": WORKER_DEPLOYMENT,
        "ray_actor_options": {
            "num_cpus": settings.fleet_cpus_per_worker,
            "num_gpus": settings.fleet_gpus_per_worker,
        },
        # Requests wait in earshot's cache (bounded by max_waiting_requests); Ray's handle queue in
        # front of the workers is bounded too (over it: 503 busy at once, as the cache's own bound).
        "max_ongoing_requests": settings.max_waiting_requests + 16,
        "max_queued_requests": settings.max_waiting_requests,
        "health_check_period_s": 2,
        "health_check_timeout_s": 30,
        "graceful_shutdown_timeout_s": settings.shutdown_grace_seconds + 5,
    }
    if settings.fleet_min_workers is not None and settings.fleet_max_workers is not None:
        options["autoscaling_config"] = {
            "min_replicas": settings.fleet_min_workers,
            "max_replicas": settings.fleet_max_workers,
            "target_ongoing_requests": 2,
        }
    else:
        options["num_replicas"] = settings.fleet_workers
    return serve.deployment(**options)(EarshotWorker)
