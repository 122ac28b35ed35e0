"""A model's footprint as one stable figure: the median of its last measured loads, per device.

Each load measures what it added (process RSS, and NVML process memory on a GPU, read around
`backend.load` with freed memory given back before each reading: `workers.load_measured`). One
reading is noisy under traffic: memory that other threads allocate or free while the load runs
lands in the delta (over 16 loads of tiny.en in a `max_models=1` storm, 20 to 59 MiB for a model
that reads 52 MiB on a quiet server). Budgets, `/api/ps` and the dashboard's memory panel rest on
the figure, so it is the median of the model's last `HISTORY` readings (per device, the lower
median: always a real reading), not the last one. The first reading stands alone until more come.
Pure and synchronous: the cache calls it on the event loop.
"""

from __future__ import annotations

import statistics
from collections import deque
from collections.abc import Mapping
from types import MappingProxyType

HISTORY = 9


class Footprints:
    """The last `history` measured readings of each model id, and the figure they give."""

    __slots__ = ("_history", "_readings")

    def __init__(self, history: int = HISTORY) -> None:
        if history < 1:
            raise ValueError("history must be at least 1")
        self._history = history
        self._readings: dict[str, deque[Mapping[str, int]]] = {}

    def record(self, model_id: str, reading: Mapping[str, int]) -> Mapping[str, int]:
        """Add one load's reading (bytes per device, all positive) and return the figure now in force."""
        readings = self._readings.setdefault(model_id, deque(maxlen=self._history))
        readings.append(dict(reading))
        return self.figure(model_id)

    def figure(self, model_id: str) -> Mapping[str, int]:
        """Per device, the lower median of the readings that have that device; {} if none."""
        readings = self._readings.get(model_id, ())
        devices = sorted({device for r in readings for device in r})
        return MappingProxyType(
            {
                device: statistics.median_low([r[device] for r in readings if device in r])
                for device in devices
            }
        )

    def readings(self, model_id: str) -> int:
        return len(self._readings.get(model_id, ()))
