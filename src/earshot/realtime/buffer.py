"""The input audio buffer of a session: 16 kHz samples on the session's timeline, as chunks.

Positions are sample indexes since the session started (`start` is the first sample still held,
`end` one past the last). Appending is O(1) (no copy of what is held); `take` joins the samples of
a range once, when a turn is committed; `drop_before` frees what no turn can need any more.
"""

from __future__ import annotations

from collections import deque

import numpy as np
import numpy.typing as npt

PCM = npt.NDArray[np.float32]


class AudioBuffer:
    def __init__(self) -> None:
        self._chunks: deque[PCM] = deque()
        self.start = 0
        self.end = 0

    def __len__(self) -> int:
        return self.end - self.start

    def append(self, samples: PCM) -> None:
        if len(samples):
            self._chunks.append(samples)
            self.end += len(samples)

    def take(self, begin: int, stop: int) -> PCM:
        """The samples of [begin, stop) that are held (a copy)."""
        begin, stop = max(begin, self.start), min(stop, self.end)
        if stop <= begin:
            return np.zeros(0, np.float32)
        out = np.empty(stop - begin, np.float32)
        pos, filled = self.start, 0
        for chunk in self._chunks:
            c0, c1 = pos, pos + len(chunk)
            pos = c1
            if c1 <= begin:
                continue
            if c0 >= stop:
                break
            a, b = max(begin, c0) - c0, min(stop, c1) - c0
            out[filled : filled + b - a] = chunk[a:b]
            filled += b - a
        return out

    def drop_before(self, position: int) -> None:
        """Forget the samples before `position` (whole chunks; at most one chunk more is kept)."""
        position = min(position, self.end)
        while self._chunks and self.start + len(self._chunks[0]) <= position:
            self.start += len(self._chunks.popleft())
        if not self._chunks:
            self.start = self.end

    def clear(self) -> None:
        self._chunks.clear()
        self.start = self.end
