"""The application factory: `uvicorn --factory earshot.main:create_app`, or `earshot serve`.

The one place that wires an app: settings -> catalog, backends, observability, cache, inference
service -> the API's routes (including /metrics and /api/events, which serve observability's
registry and event log). One process owns the cache (DESIGN §1): run one uvicorn worker.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from litestar import Litestar
from litestar.datastructures import State
from litestar.di import Provide
from litestar.openapi import OpenAPIConfig
from prometheus_client import generate_latest

from earshot import __version__
from earshot.api.audio import AudioController
from earshot.api.auth import api_key_guard
from earshot.api.errors import EXCEPTION_HANDLERS
from earshot.api.events import KEEPALIVE_SECONDS, events_router
from earshot.api.limits import RequestLimits, speech_body_limit
from earshot.api.metrics import metrics_handler
from earshot.api.models import ModelsController, PsController
from earshot.api.services import Services
from earshot.api.system import config, health, ready
from earshot.audio.pool import DecodePool
from earshot.cache.events import Observer
from earshot.cache.manager import ModelCache
from earshot.cache.memory import tune_allocator
from earshot.cache.protocol import Backend, Task
from earshot.cache.state import CacheConfig
from earshot.inference.local import LocalInference
from earshot.inference.protocol import Inference, RemoteInference
from earshot.inference.workers import Workers
from earshot.models.catalog import Catalog, build_catalog
from earshot.models.resolver import HubResolver, resolve_preload
from earshot.observability import Observability
from earshot.observability.collector import render
from earshot.observability.realtime import realtime_observers
from earshot.realtime import RealtimeLimits, RealtimeSessions, realtime_handler
from earshot.settings import Settings, load_settings
from earshot.ui.routes import ui_router

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

log = logging.getLogger("earshot")

# Multipart overhead (boundaries, the other form fields) allowed on top of max_upload_bytes.
FORM_OVERHEAD_BYTES = 256 * 1024


def cache_config(settings: Settings) -> CacheConfig:
    return CacheConfig(
        idle_timeout=settings.model_idle_timeout,
        max_models=settings.max_models,
        memory_budget_bytes=None
        if settings.memory_budget_bytes is None
        else int(settings.memory_budget_bytes),
        load_timeout=settings.model_load_timeout,
        download_timeout=settings.model_download_timeout,
        thrash_window=settings.thrash_window_seconds,
        max_waiting=settings.max_waiting_requests,
        pin_preloaded=settings.pin_preloaded,
        shutdown_grace=settings.shutdown_grace_seconds,
    )


@dataclass
class LocalModels:
    """The models of one process: backends, worker threads, the cache and the inference service on
    them. `create_app` builds one for the single server; each fleet worker builds one of its own."""

    backends: Mapping[str, Backend]
    workers: Workers
    cache: ModelCache
    inference: LocalInference


def build_local_models(
    settings: Settings,
    catalog: Catalog,
    obs: Observability,
    *,
    backends: Mapping[str, Backend] | None = None,
    observers: Sequence[Observer] = (),
    config: CacheConfig | None = None,
    record: Callable[..., None] | None = None,
) -> LocalModels:
    """Backends (default: faster-whisper and Kokoro per `settings`), the cache with every rule of
    DESIGN §2 (`config`, default from `settings`) observed by `obs` and `observers`, and the
    `LocalInference` on it. Binds `obs` to the cache (its state gauges) and the catalog.
    `record`: called with each inference's figures too (after `obs.record_inference`)."""
    tuned = tune_allocator()  # before the worker threads: each would get an arena of its own
    if tuned:
        log.info("glibc malloc set: %s", ", ".join(f"{k}={v}" for k, v in tuned.items()))
    if backends is None:
        from earshot.backends import default_backends

        backends = default_backends(settings.device, settings.compute_type, cpu_threads=settings.cpu_threads)
    workers = Workers(settings.inference_concurrency)
    cache = ModelCache(
        catalog.resolve,
        backends,
        config or cache_config(settings),
        observers=[*obs.observers, *observers],
        memory_probe=obs.memory_probe,
        runner=workers.load_runner,
    )
    obs.bind(cache, catalog)
    recorder = obs.record_inference
    if record is not None:
        also = record

        def recorder(**figures: Any) -> None:
            obs.record_inference(**figures)
            also(**figures)

    inference = LocalInference(cache, catalog.resolve, backends, workers, tracer=obs.tracer, record=recorder)
    return LocalModels(backends, workers, cache, inference)


def build_catalog_for(settings: Settings) -> Catalog:
    return build_catalog(
        models_dir=settings.models_dir,
        entries=settings.models,
        aliases_file=settings.model_aliases_file,
        builtin_hub_models=settings.builtin_hub_models,
    )


def create_app(
    settings: Settings | None = None,
    *,
    backends: Mapping[str, Backend] | None = None,
    observers: Sequence[Observer] = (),
    registry: CollectorRegistry | None = None,
    sse_keepalive: float = KEEPALIVE_SECONDS,
    inference: RemoteInference | None = None,
) -> Litestar:
    """Build the app. With no settings, they are read now from the environment, `.env` and the
    config file named by EARSHOT_CONFIG (the uvicorn factory path).

    inference: run the models there (the fleet's gateway) instead of in a cache of this process;
    `backends` and `observers` are then unused, and /metrics has no cache gauges of its own."""
    settings = settings or load_settings()
    catalog = build_catalog_for(settings)
    resolver = HubResolver(catalog, enabled=settings.allow_hub_models, max_models=settings.max_catalog_models)
    obs = Observability.create(settings, registry=registry)
    local: LocalModels | None = None
    service: Inference
    if inference is None:
        local = build_local_models(settings, catalog, obs, backends=backends, observers=observers)
        workers, service = local.workers, local.inference
    else:
        workers, service = Workers(settings.inference_concurrency), inference
    decoder = DecodePool(
        settings.decode_workers, memory_bytes=int(settings.decode_memory_bytes), registry=obs.registry
    )
    services = Services(
        settings=settings,
        catalog=catalog,
        inference=service,
        workers=workers,
        resolver=resolver,
        decoder=decoder,
    )
    realtime_sessions = RealtimeSessions(
        settings.max_realtime_sessions,
        realtime_observers(obs.registry, obs.events, catalog.ids(Task.TRANSCRIPTION)),
    )
    realtime = realtime_handler(
        sessions=realtime_sessions,
        inference=service,
        resolve=catalog.resolve,
        limits=RealtimeLimits(
            max_buffer_seconds=settings.realtime_max_buffer_seconds,
            idle_timeout=settings.realtime_idle_timeout,
            api_key=settings.api_key.get_secret_value() if settings.api_key is not None else None,
        ),
    )

    @asynccontextmanager
    async def lifespan(_: Litestar) -> AsyncIterator[None]:
        obs.start()
        preload = await resolve_preload(resolver, settings.preload_models)  # hub ids too
        await decoder.warm()
        if local is None:
            assert inference is not None
            await inference.start(preload=preload, publish=obs.events.publish)
            try:
                yield
            finally:
                await inference.close()
                decoder.close()
                obs.stop()
            return
        preloading = local.cache.start_preload(preload)
        try:
            yield
        finally:
            preloading.cancel()
            await asyncio.gather(preloading, return_exceptions=True)
            await local.cache.close()
            decoder.close()
            obs.stop()

    if local is not None:
        metrics = metrics_handler(
            local.cache.snapshot, functools.partial(render, obs.registry), workers.run_work
        )
    else:  # the fleet's cache state is the workers' (their own metrics); here: HTTP, process, fleet
        metrics = metrics_handler(lambda: obs.registry, generate_latest, workers.run_work)

    upload_limit = int(settings.max_upload_bytes) + FORM_OVERHEAD_BYTES
    limits = RequestLimits(
        body_limits={
            "/v1/audio/speech": speech_body_limit(settings.max_input_chars),
            "/v1/audio/transcriptions": upload_limit,
            "/v1/audio/translations": upload_limit,
        }
    )
    guards: list[Any] = []
    if settings.api_key is not None:
        guards.append(api_key_guard(settings.api_key.get_secret_value()))

    return Litestar(
        route_handlers=[
            AudioController,
            ModelsController,
            PsController,
            health,
            ready,
            config,
            metrics,
            events_router(obs.events, keepalive=sse_keepalive),
            ui_router(api_key_required=settings.api_key is not None),
            realtime,
        ],
        dependencies={"services": Provide(lambda: services, use_cache=True, sync_to_thread=False)},
        exception_handlers=EXCEPTION_HANDLERS,
        guards=guards,
        lifespan=[lifespan],
        middleware=[*obs.middleware, limits.middleware],
        plugins=list(obs.plugins),
        request_max_body_size=upload_limit,
        openapi_config=OpenAPIConfig(title="earshot", version=__version__, path="/docs"),
        state=State(
            {
                "services": services,
                "observability": obs,
                "cache": local.cache if local is not None else None,
                "realtime_sessions": realtime_sessions,
                "limits": limits,
            }
        ),
        debug=False,
    )
