"""What `ModelCache.acquire` yields."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from earshot.cache.protocol import ModelSpec


@dataclass(frozen=True, slots=True)
class Lease:
    """The loaded model's handle, valid until the `async with` block that acquired it exits.

    `outcome` says how the request was served: "hit" (loaded already), "miss" (this request started
    the load) or "coalesced" (it waited for a load another request had started).
    """

    spec: ModelSpec
    handle: Any
    outcome: str  # "hit" | "miss" | "coalesced"
