"""The one seam between the API and everything that runs a model (DESIGN §1).

Handlers parse, validate (building `TranscribeOptions` / `SpeechOptions`), decode, call an
`Inference`, and encode. `LocalInference` (local.py) runs models in this process on the model
cache; the fleet adds a second implementation whose models run on remote workers, and the API does
not change for it.
"""

from __future__ import annotations

from earshot.inference.protocol import (
    Inference,
    LoadResult,
    ModelStatus,
    Speech,
    SpeechStream,
    TranscriptStream,
)

__all__ = ["Inference", "LoadResult", "ModelStatus", "Speech", "SpeechStream", "TranscriptStream"]
