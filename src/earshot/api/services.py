"""What the route handlers work with: settings, the catalog (and the hub resolver that grows it),
and the inference service."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from earshot.audio.pool import Decoder, InProcessDecoder
from earshot.inference import Inference
from earshot.inference.workers import Workers
from earshot.models.catalog import Catalog
from earshot.models.errors import NotAHubId
from earshot.models.resolver import HubResolver
from earshot.settings import Settings
from earshot.types import ModelSpec, Task


@dataclass
class Services:
    settings: Settings
    catalog: Catalog
    inference: Inference
    workers: Workers
    decoder: Decoder = field(default_factory=InProcessDecoder)  # untrusted media: main.py passes a DecodePool
    started_at: float = field(default_factory=time.time)
    resolver: HubResolver | None = None  # hub ids on demand; None: the catalog as built

    def known(self, name: str) -> ModelSpec:
        """The catalog model `name` means, as the catalog stands (no hub lookup); 404 otherwise."""
        from earshot.api.errors import model_not_found

        spec = self.catalog.resolve(name)
        if spec is None:
            raise model_not_found(name, self.catalog.close_matches(name))
        return spec

    async def ensure(self, name: str) -> ModelSpec:
        """The catalog model `name` means, resolving a hub id on demand (ModelResolutionError for the
        API's error mapping); 404 for a name that is neither listed nor an owner/name repo id."""
        spec = self.catalog.resolve(name)
        if spec is not None:
            return spec
        if self.resolver is not None:
            try:
                return await self.resolver.ensure(name)
            except NotAHubId:
                pass
        return self.known(name)

    async def spec_for(self, name: str, task: Task, *, param: str = "model") -> ModelSpec:
        """The catalog model a request names, checked for the task; APIError 404/400 otherwise."""
        from earshot.api.errors import bad_request

        spec = await self.ensure(name)
        if spec.task != task:
            route = "/v1/audio/speech" if spec.task == Task.SPEECH else "/v1/audio/transcriptions"
            raise bad_request(
                f"The model {spec.id!r} is a {spec.task.value} model and cannot do {task.value}; use it with {route}.",
                param=param,
                code="wrong_model_task",
            )
        return spec
