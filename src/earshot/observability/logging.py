"""Logs: structlog through Litestar's StructlogPlugin, one JSON object per line (or console text).

Everything goes through one stdlib handler whose formatter is structlog's `ProcessorFormatter`:
earshot's structlog loggers hand their event dict to stdlib logging, and stdlib records (uvicorn,
litestar, `logging.getLogger("earshot...")`, libraries) get the same processors, so every line has
the same shape: `{"event", "level", "logger", "timestamp", ...}` plus, during a request,
`request_id`, `trace_id` and `span_id`. Formatting runs synchronously in the thread that logs, so
the request's context variables and current span are the ones read.

- `logging_plugin(settings)`: the plugin for the app (level from `log_level`, `log_format`
  json|console). Litestar's request-logging middleware is off (it would log request bodies, i.e.
  audio uploads); uvicorn's access log, routed through here, is the access line.
- `RequestContextMiddleware`: takes `X-Request-ID` from the request (when it is a sane token) or
  makes one, binds it for the request's log lines, tags the request span with it, and echoes it in
  the response headers.
- `CacheEventLogger`: the cache observer that writes one line per cache event (hits, misses and
  coalesced requests at debug level).
"""

from __future__ import annotations

import logging
import re
import sys
import uuid
from typing import IO

import structlog
from litestar.enums import ScopeType
from litestar.logging.config import LoggingConfig, StructLoggingConfig
from litestar.middleware.base import ASGIMiddleware
from litestar.plugins.structlog import StructlogConfig, StructlogPlugin
from litestar.types import ASGIApp, Message, Receive, Scope, Send
from opentelemetry import trace
from structlog.typing import EventDict, Processor, WrappedLogger

from earshot.cache.events import (
    CacheEvent,
    Coalesced,
    Downloaded,
    Evicted,
    Hit,
    Loaded,
    LoadFailed,
    LoadFailureKind,
    LoadStarted,
    Miss,
)
from earshot.settings import Settings

REQUEST_ID_HEADER = "x-request-id"
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:+=/-]{1,128}")
# Loggers that would otherwise keep handlers of their own (uvicorn's default config, Litestar's).
_ROUTED_LOGGERS = ("earshot", "litestar", "uvicorn", "uvicorn.error", "uvicorn.access")
EVENTS_LOGGER = "earshot.cache.events"


# ---------------------------------------------------------------------- processors


def add_trace_context(_: WrappedLogger, __: str, event_dict: EventDict) -> EventDict:
    """`trace_id` and `span_id` of the current OpenTelemetry span, when there is one."""
    context = trace.get_current_span().get_span_context()
    if context.is_valid:
        event_dict.setdefault("trace_id", format(context.trace_id, "032x"))
        event_dict.setdefault("span_id", format(context.span_id, "016x"))
    return event_dict


_FIRST_KEYS = ("timestamp", "level", "logger", "event")


def _key_order(_: WrappedLogger, __: str, event_dict: EventDict) -> EventDict:
    """timestamp, level, logger, event first: the line reads left to right like a log line."""
    first = {k: event_dict.pop(k) for k in _FIRST_KEYS if k in event_dict}
    return {**first, **event_dict}


def _drop_color_message(_: WrappedLogger, __: str, event_dict: EventDict) -> EventDict:
    event_dict.pop("color_message", None)  # uvicorn's duplicate of the message, with ANSI codes
    return event_dict


def shared_processors() -> list[Processor]:
    """What every line gets, structlog's or stdlib's: context, level, logger, trace, time."""
    return [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        add_trace_context,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]


# ---------------------------------------------------------------------- configuration


def structlog_config(settings: Settings, *, stream: IO[str] | None = None) -> StructLoggingConfig:
    """structlog and stdlib logging for `settings.log_level` / `settings.log_format`, to `stream`
    (default: standard output)."""
    level = settings.log_level
    as_json = settings.log_format == "json"
    out = stream if stream is not None else sys.stdout
    renderer: Processor
    if as_json:
        renderer = structlog.processors.JSONRenderer()
        final: list[Processor] = [structlog.processors.format_exc_info, _key_order, renderer]
    else:
        renderer = structlog.dev.ConsoleRenderer(colors=bool(getattr(out, "isatty", lambda: False)()))
        final = [renderer]
    formatter = {
        "()": structlog.stdlib.ProcessorFormatter,
        "processors": [structlog.stdlib.ProcessorFormatter.remove_processors_meta, *final],
        "foreign_pre_chain": [
            *shared_processors(),
            structlog.stdlib.ExtraAdder(),
            _drop_color_message,
        ],
    }
    stdlib = LoggingConfig(
        logging_module="logging",
        disable_existing_loggers=False,
        formatters={"standard": formatter},
        handlers={
            "console": {"class": "logging.StreamHandler", "formatter": "standard", "stream": out},
            # Litestar adds a queue handler under this name when it is missing; define it as a no-op.
            "queue_listener": {"class": "logging.NullHandler"},
        },
        loggers={name: {"level": level, "handlers": [], "propagate": True} for name in _ROUTED_LOGGERS},
        root={"handlers": ["console"], "level": level},
    )
    return StructLoggingConfig(
        processors=[
            *shared_processors(),
            structlog.processors.StackInfoRenderer(),
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level)),
        # Not cached: a logger picks up a later configure() (tests, a second app in one process).
        cache_logger_on_first_use=False,
        standard_lib_logging_config=stdlib,
        pretty_print_tty=False,
    )


def logging_plugin(settings: Settings, *, stream: IO[str] | None = None) -> StructlogPlugin:
    """The app's StructlogPlugin: configures structlog and stdlib logging when the app is built."""
    return StructlogPlugin(
        StructlogConfig(
            structlog_logging_config=structlog_config(settings, stream=stream),
            enable_middleware_logging=False,
        )
    )


def configure_logging(settings: Settings, *, stream: IO[str] | None = None) -> None:
    """Configure logging without an app (CLI commands, tests): what the plugin does at app init."""
    config = structlog_config(settings, stream=stream)
    config.configure()
    assert config.standard_lib_logging_config is not None
    config.standard_lib_logging_config.configure()


# ---------------------------------------------------------------------- request context


def request_id_from(value: str | None) -> str:
    """The client's request id when it is a sane token (<= 128 safe characters), else a new one."""
    if value and _REQUEST_ID.fullmatch(value):
        return value
    return uuid.uuid4().hex


class RequestContextMiddleware(ASGIMiddleware):
    """Binds `request_id` for the request's log lines and echoes it as `X-Request-ID`."""

    scopes = (ScopeType.HTTP,)

    async def handle(self, scope: Scope, receive: Receive, send: Send, next_app: ASGIApp) -> None:
        incoming = None
        for key, value in scope.get("headers", ()):
            if key.lower() == b"x-request-id":
                incoming = value.decode("latin-1")
                break
        request_id = request_id_from(incoming)
        header = (REQUEST_ID_HEADER.encode(), request_id.encode())
        span = trace.get_current_span()
        if span.is_recording():
            span.set_attribute("earshot.request_id", request_id)

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers") or ())
                if not any(k.lower() == header[0] for k, _ in headers):
                    headers.append(header)
                message = {**message, "headers": headers}
            await send(message)

        tokens = structlog.contextvars.bind_contextvars(request_id=request_id)
        try:
            await next_app(scope, receive, send_with_id)
        finally:
            structlog.contextvars.reset_contextvars(**tokens)


# ---------------------------------------------------------------------- cache events


def _ms(seconds: float) -> float:
    return round(seconds, 3)


class CacheEventLogger:
    """One log line per cache event (`event=<kind>`); a cache Observer."""

    def __init__(self) -> None:
        self._log = structlog.get_logger(EVENTS_LOGGER)
        self._stdlib = logging.getLogger(EVENTS_LOGGER)  # its level is the configured one

    def __call__(self, event: CacheEvent) -> None:
        log = self._log
        base = {"model": event.model, "task": event.task}
        if isinstance(event, Hit | Miss | Coalesced):
            if self._stdlib.isEnabledFor(logging.DEBUG):  # the per-request events: skip cheaply
                log.debug(event.kind, **base)
        elif isinstance(event, LoadStarted):
            log.info(event.kind, **base, reload=event.reload)
        elif isinstance(event, Loaded):
            log.info(
                event.kind,
                **base,
                duration_s=_ms(event.duration_s),
                footprint_bytes=event.footprint_bytes,
                footprint=dict(event.footprint),
                measured=event.measured,
                reading_bytes=event.reading_bytes,
                reload=event.reload,
            )
        elif isinstance(event, LoadFailed):
            method = log.warning if event.error_kind is LoadFailureKind.TIMEOUT else log.error
            method(
                event.kind,
                **base,
                outcome=event.error_kind.value,
                duration_s=_ms(event.duration_s),
                error=event.message,
                out_of_memory=event.out_of_memory,
                phase=event.phase,
            )
        elif isinstance(event, Downloaded):
            log.info(event.kind, **base, duration_s=_ms(event.duration_s))
        elif isinstance(event, Evicted):
            log.info(
                event.kind,
                **base,
                reason=event.reason.value,
                idle_s=_ms(event.idle_s),
                resident_s=_ms(event.resident_s),
                footprint_bytes=event.footprint_bytes,
                released_bytes=event.released_bytes,
            )
        else:
            log.info(event.kind, **base)
