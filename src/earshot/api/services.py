"""What the route handlers work with: settings, the catalog, and the inference service."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from earshot.inference import Inference
from earshot.inference.workers import Workers
from earshot.models.catalog import Catalog
from earshot.settings import Settings
from earshot.types import ModelSpec, Task


@dataclass
class Services:
    settings: Settings
    catalog: Catalog
    inference: Inference
    workers: Workers
    started_at: float = field(default_factory=time.time)

    def spec_for(self, name: str, task: Task | None = None, *, param: str = "model") -> ModelSpec:
        """The catalog model a request names (checked for the task when one is given); APIError
        404/400 otherwise."""
        from earshot.api.errors import bad_request, model_not_found

        spec = self.catalog.resolve(name)
        if spec is None:
            raise model_not_found(name, self.catalog.close_matches(name))
        if task is not None and spec.task != task:
            route = "/v1/audio/speech" if spec.task == Task.SPEECH else "/v1/audio/transcriptions"
            raise bad_request(
                f"The model {spec.id!r} is a {spec.task.value} model and cannot do {task.value}; use it with {route}.",
                param=param,
                code="wrong_model_task",
            )
        return spec
