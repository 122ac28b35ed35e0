"""The open realtime sessions: admission (max_realtime_sessions), counts per model for `/api/ps`,
and the fan-out of session events to observers (metrics, log lines, /api/events)."""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterable

from earshot.session_events import SessionEvent, SessionObserver

log = logging.getLogger("earshot.realtime")


class RealtimeSessions:
    """Sessions by id with their current model. Loop thread only."""

    def __init__(self, max_sessions: int, observers: Iterable[SessionObserver] = ()) -> None:
        self.max_sessions = max_sessions
        self._observers = list(observers)
        self._models: dict[str, str] = {}  # session id -> catalog id of its model

    def add_observer(self, observer: SessionObserver) -> None:
        self._observers.append(observer)

    def publish(self, event: SessionEvent) -> None:
        for observer in self._observers:
            try:
                observer(event)
            except Exception:  # an observer never breaks a session
                log.exception("realtime observer %r failed on %s", observer, event.kind)

    @property
    def open(self) -> int:
        return len(self._models)

    def try_open(self, session_id: str, model: str) -> bool:
        """Admit a session (False: max_realtime_sessions are open)."""
        if len(self._models) >= self.max_sessions:
            return False
        self._models[session_id] = model
        return True

    def set_model(self, session_id: str, model: str) -> None:
        if session_id in self._models:
            self._models[session_id] = model

    def close(self, session_id: str) -> None:
        self._models.pop(session_id, None)

    def open_by_model(self) -> dict[str, int]:
        """Open sessions per catalog id (what `/api/ps` shows as `sessions`)."""
        return dict(Counter(self._models.values()))
