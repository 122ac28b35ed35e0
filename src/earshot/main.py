"""The application factory: `uvicorn --factory earshot.main:create_app`, or `earshot serve`.

The one place that wires an app: settings -> catalog, backends, observability, cache, inference
service -> the API's routes (including /metrics and /api/events, which serve observability's
registry and event log). One process owns the cache (DESIGN §1): run one uvicorn worker.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

from litestar import Litestar
from litestar.datastructures import State
from litestar.di import Provide
from litestar.openapi import OpenAPIConfig

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
from earshot.inference.workers import Workers
from earshot.models.catalog import build_catalog
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


def create_app(
    settings: Settings | None = None,
    *,
    backends: Mapping[str, Backend] | None = None,
    observers: Sequence[Observer] = (),
    registry: CollectorRegistry | None = None,
    sse_keepalive: float = KEEPALIVE_SECONDS,
) -> Litestar:
    """Build the app. With no settings, they are read now from the environment, `.env` and the
    config file named by EARSHOT_CONFIG (the uvicorn factory path)."""
    settings = settings or load_settings()
    catalog = build_catalog(
        models_dir=settings.models_dir,
        entries=settings.models,
        aliases_file=settings.model_aliases_file,
        builtin_hub_models=settings.builtin_hub_models,
    )
    resolver = HubResolver(catalog, enabled=settings.allow_hub_models, max_models=settings.max_catalog_models)
    obs = Observability.create(settings, registry=registry)
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
        cache_config(settings),
        observers=[*obs.observers, *observers],
        memory_probe=obs.memory_probe,
        runner=workers.load_runner,
    )
    obs.bind(cache, catalog)
    inference = LocalInference(
        cache, catalog.resolve, backends, workers, tracer=obs.tracer, record=obs.record_inference
    )
    decoder = DecodePool(
        settings.decode_workers, memory_bytes=int(settings.decode_memory_bytes), registry=obs.registry
    )
    services = Services(
        settings=settings,
        catalog=catalog,
        inference=inference,
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
        inference=inference,
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
        preloading = cache.start_preload(preload)
        try:
            yield
        finally:
            preloading.cancel()
            await asyncio.gather(preloading, return_exceptions=True)
            await cache.close()
            decoder.close()
            obs.stop()

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
            metrics_handler(cache.snapshot, functools.partial(render, obs.registry), workers.run_work),
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
                "cache": cache,
                "realtime_sessions": realtime_sessions,
                "limits": limits,
            }
        ),
        debug=False,
    )
