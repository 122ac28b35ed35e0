"""Realtime session metrics, log lines and `/api/events` records (DESIGN §9): observers of the
session events of `earshot.session_events`, in the style of `metrics.py` and `logging.py`.

- `RealtimeMetrics`: `earshot_realtime_sessions_open` (gauge, model: open now; DESIGN §9 names
  it `earshot_realtime_sessions`, but prometheus_client, like OpenMetrics, names a counter's family
  without its `_total`, so the gauge and `earshot_realtime_sessions_total` would be one name twice),
  `earshot_realtime_sessions_total` (model, ended=client/idle/error/shutdown/refused: at the end),
  `earshot_realtime_turns_total` (model), `earshot_realtime_audio_seconds_total` (model: audio
  received), `earshot_realtime_transcript_latency_seconds` (histogram, model: end of speech, i.e.
  VAD stop or commit, to the `completed` event sent). `model` values come only from the catalog,
  as in `CacheMetrics`: an event of a model outside it is dropped, not labelled.
- `RealtimeEventLogger`: one line at session start and one at its end with its figures
  (duration, turns, audio seconds, how it ended); refusals at warning level; turns at debug.
- `RealtimeEventRecorder`: session start, end, refusal, model change and failed turns become
  `/api/events` records (turns and audio are not: a long captioning session would flush the
  cache's events out of the ring buffer).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

import structlog
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from earshot.observability.events import EventLog
from earshot.session_events import (
    AudioReceived,
    SessionEnd,
    SessionEnded,
    SessionEvent,
    SessionModelChanged,
    SessionObserver,
    SessionRefused,
    SessionStarted,
    TurnCompleted,
    TurnFailed,
)

log = logging.getLogger("earshot.observability")
REALTIME_LOGGER = "earshot.realtime.events"

# End of speech to the transcript: tens of milliseconds (a short turn on a small model) to seconds.
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 1.5, 2.5, 5.0, 10.0, 30.0)


class RealtimeMetrics:
    """Counters, gauge and histogram of realtime sessions, on `registry`; a session observer."""

    def __init__(self, registry: CollectorRegistry, models: Iterable[str]) -> None:
        self._models = frozenset(models)  # the catalog's transcription ids
        self.sessions = Gauge(
            "earshot_realtime_sessions_open",
            "Realtime transcription sessions open now, by the model they hold.",
            ["model"],
            registry=registry,
        )
        self.sessions_total = Counter(
            "earshot_realtime_sessions_total",
            "Realtime transcription sessions by how they ended (client, idle, error, shutdown, refused).",
            ["model", "ended"],
            registry=registry,
        )
        self.turns = Counter(
            "earshot_realtime_turns_total",
            "Turns of realtime sessions transcribed (completed events sent).",
            ["model"],
            registry=registry,
        )
        self.audio_seconds = Counter(
            "earshot_realtime_audio_seconds_total",
            "Seconds of audio received by realtime sessions.",
            ["model"],
            registry=registry,
        )
        self.latency = Histogram(
            "earshot_realtime_transcript_latency_seconds",
            "End of speech (VAD stop or commit) to the completed transcript sent.",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        for model in self._models:  # the gauge reads 0, not absent, before the first session
            self.sessions.labels(model)

    def __call__(self, event: SessionEvent) -> None:
        model = event.model
        if model not in self._models:
            log.debug("realtime metrics: dropped %s for a model outside the catalog", event.kind)
            return
        if isinstance(event, AudioReceived):
            self.audio_seconds.labels(model).inc(max(0.0, event.seconds))
        elif isinstance(event, TurnCompleted):
            self.turns.labels(model).inc()
            self.latency.labels(model).observe(max(0.0, event.latency_s))
        elif isinstance(event, SessionStarted):
            self.sessions.labels(model).inc()
        elif isinstance(event, SessionModelChanged):
            if event.previous in self._models:
                self.sessions.labels(event.previous).dec()
            self.sessions.labels(model).inc()
        elif isinstance(event, SessionEnded):
            self.sessions.labels(model).dec()
            self.sessions_total.labels(model, event.ended.value).inc()
        elif isinstance(event, SessionRefused):
            self.sessions_total.labels(model, SessionEnd.REFUSED.value).inc()


def _r(seconds: float) -> float:
    return round(seconds, 3)


class RealtimeEventLogger:
    """One log line at the start and at the end of each session (`event=<kind>`)."""

    def __init__(self) -> None:
        self._log = structlog.get_logger(REALTIME_LOGGER)
        self._stdlib = logging.getLogger(REALTIME_LOGGER)

    def __call__(self, event: SessionEvent) -> None:
        log = self._log
        base = {"model": event.model, "session_id": event.session_id}
        if isinstance(event, SessionStarted):
            log.info(event.kind, **base)
        elif isinstance(event, SessionEnded):
            log.info(
                event.kind,
                **base,
                ended=event.ended.value,
                close_code=event.close_code,
                duration_s=_r(event.duration_s),
                turns=event.turns,
                audio_s=_r(event.audio_s),
            )
        elif isinstance(event, SessionRefused):
            log.warning(event.kind, **base, open_sessions=event.open_sessions)
        elif isinstance(event, SessionModelChanged):
            log.info(event.kind, **base, previous=event.previous)
        elif isinstance(event, TurnFailed):
            log.warning(event.kind, **base, item_id=event.item_id, error=event.error)
        elif isinstance(event, TurnCompleted) and self._stdlib.isEnabledFor(logging.DEBUG):
            log.debug(
                event.kind,
                **base,
                item_id=event.item_id,
                audio_s=_r(event.audio_s),
                inference_s=_r(event.inference_s),
                latency_s=_r(event.latency_s),
            )


RECORDED = (SessionStarted, SessionEnded, SessionRefused, SessionModelChanged, TurnFailed)


class RealtimeEventRecorder:
    """Session events worth a record, into the `/api/events` log."""

    def __init__(self, events: EventLog) -> None:
        self._events = events

    def __call__(self, event: SessionEvent) -> None:
        if isinstance(event, RECORDED):
            self._events(event)


def realtime_observers(
    registry: CollectorRegistry, events: EventLog, transcription_models: Iterable[str]
) -> list[SessionObserver]:
    """Metrics, log lines and event records of realtime sessions, for `RealtimeSessions`."""
    observers: list[SessionObserver] = [
        RealtimeMetrics(registry, transcription_models),
        RealtimeEventLogger(),
        RealtimeEventRecorder(events),
    ]
    return observers
