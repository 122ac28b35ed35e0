"""Model listing and management: /v1/models (OpenAI shape, plus `task` and `loaded`) and /api/ps.

`POST /v1/models/{id}` is the Speaches guide's preload call; `DELETE` unloads. Model ids may
contain `/` (`Systran/faster-whisper-base`); they are only ever looked up in the catalog.
"""

from __future__ import annotations

from typing import Annotated, Any

import msgspec
from litestar import Controller, Response, delete, get, post
from litestar.datastructures import State
from litestar.params import Body, Parameter
from litestar.status_codes import HTTP_200_OK, HTTP_202_ACCEPTED, HTTP_404_NOT_FOUND

from earshot.api.errors import ERROR_RESPONSES, APIError
from earshot.api.services import Services
from earshot.inference import ModelStatus
from earshot.observability.events import iso_utc
from earshot.options import check_keep_alive
from earshot.types import ModelSpec

OWNER = "earshot"


def _model_id(raw: str) -> str:
    """Litestar's `:path` parameters keep their leading slash."""
    return raw[1:] if raw.startswith("/") else raw


class LoadRequest(msgspec.Struct, kw_only=True):
    """Optional body of POST /api/ps/{id} and POST /v1/models/{id}."""

    keep_alive: float | None = None
    pin: bool | None = None


async def _statuses(services: Services) -> dict[str, ModelStatus]:
    return {m.id: m for m in await services.inference.status()}


def model_object(services: Services, spec: ModelSpec, state: ModelStatus | None) -> dict[str, Any]:
    aliases = sorted(a for a, target in services.catalog.aliases.items() if target == spec.id)
    return {
        "id": spec.id,
        "object": "model",
        "created": int(services.started_at),
        "owned_by": OWNER,
        "task": spec.task.value,
        "source": spec.source,
        "loaded": bool(state and state.loaded),
        "aliases": aliases,
    }


def ps_entry(state: ModelStatus) -> dict[str, Any]:
    return {
        "model": state.id,
        "task": state.task,
        "size_bytes": state.size_bytes,
        "memory": dict(state.memory),
        "size_measured": state.size_measured,
        "loaded": state.loaded,
        "loading": state.loading,
        "phase": state.phase,
        "loaded_at": iso_utc(state.loaded_at),
        "last_used_at": iso_utc(state.last_used_at),
        "idle_seconds": None if state.idle_seconds is None else round(state.idle_seconds, 3),
        "expires_at": iso_utc(state.expires_at),
        "keep_alive": state.keep_alive,
        "in_use": state.in_use,
        "pinned": state.pinned,
        "waiting": state.waiting,
        **({"worker": state.worker} if state.worker is not None else {}),
    }


def _check_load_body(body: LoadRequest | None) -> LoadRequest:
    body = body or LoadRequest()
    check_keep_alive(body.keep_alive)
    return body


async def _load(services: Services, name: str, body: LoadRequest | None) -> ModelSpec:
    spec = await services.ensure(name)
    body = _check_load_body(body)
    await services.inference.load(spec.id, keep_alive=body.keep_alive, pin=body.pin)
    return spec


async def _unload(services: Services, name: str) -> Response[dict[str, Any]]:
    spec = services.known(name)  # never a hub lookup: what is not in the catalog is not loaded
    result = await services.inference.unload(spec.id)
    if result == "not_loaded":
        raise APIError(
            HTTP_404_NOT_FOUND,
            f"The model {spec.id!r} is not loaded.",
            param="model",
            code="model_not_loaded",
        )
    status = HTTP_200_OK if result == "unloaded" else HTTP_202_ACCEPTED
    return Response(
        {"id": spec.id, "object": "model", "deleted": result == "unloaded", "status": result},
        status_code=status,
    )


ModelPath = Annotated[str, Parameter(description="Model id or alias; may contain '/'", max_length=512)]
OptionalLoad = Annotated[LoadRequest | None, Body(description="Optional keep_alive (seconds, -1, 0) and pin")]


class ModelsController(Controller):
    path = "/v1/models"
    tags = ["models"]  # noqa: RUF012

    @get("/", responses=ERROR_RESPONSES, summary="List models (OpenAI shape, plus task and loaded)")
    async def list_models(self, services: Services) -> dict[str, Any]:
        states = await _statuses(services)
        data = [model_object(services, spec, states.get(spec.id)) for spec in services.catalog.specs.values()]
        data.sort(key=lambda m: m["id"])
        return {"object": "list", "data": data}

    @get("/{model_id:path}", responses=ERROR_RESPONSES, summary="Describe a model")
    async def get_model(self, services: Services, model_id: ModelPath) -> dict[str, Any]:
        spec = await services.ensure(_model_id(model_id))
        return model_object(services, spec, (await _statuses(services)).get(spec.id))

    @post(
        "/{model_id:path}",
        status_code=HTTP_200_OK,
        responses=ERROR_RESPONSES,
        summary="Load a model (answers once it is loaded)",
    )
    async def load_model(
        self, services: Services, model_id: ModelPath, data: OptionalLoad = None
    ) -> dict[str, Any]:
        spec = await _load(services, _model_id(model_id), data)
        return model_object(services, spec, (await _statuses(services)).get(spec.id))

    @delete("/{model_id:path}", status_code=HTTP_200_OK, responses=ERROR_RESPONSES, summary="Unload a model")
    async def unload_model(self, services: Services, model_id: ModelPath) -> Response[dict[str, Any]]:
        return await _unload(services, _model_id(model_id))


class PsController(Controller):
    path = "/api/ps"
    tags = ["cache"]  # noqa: RUF012

    @get("/", responses=ERROR_RESPONSES, summary="Loaded (and loading) models with their cache state")
    async def ps(self, services: Services, state: State) -> dict[str, Any]:
        inference = services.inference
        realtime = state.get("realtime_sessions")  # earshot.realtime.registry.RealtimeSessions
        sessions: dict[str, int] = realtime.open_by_model() if realtime is not None else {}
        return {
            "models": [{**ps_entry(m), "sessions": sessions.get(m.id, 0)} for m in await inference.status()],
            "waiting_requests": inference.waiting_requests(),
            **inference.describe(),
        }

    @post(
        "/{model_id:path}",
        status_code=HTTP_200_OK,
        responses=ERROR_RESPONSES,
        summary="Load a model, optionally with keep_alive / pin",
    )
    async def load(
        self, services: Services, model_id: ModelPath, data: OptionalLoad = None
    ) -> dict[str, Any]:
        spec = await _load(services, _model_id(model_id), data)
        state = (await _statuses(services)).get(spec.id)
        return ps_entry(state) if state else {"model": spec.id, "loaded": False}

    @delete("/{model_id:path}", status_code=HTTP_200_OK, responses=ERROR_RESPONSES, summary="Unload a model")
    async def unload(self, services: Services, model_id: ModelPath) -> Response[dict[str, Any]]:
        return await _unload(services, _model_id(model_id))
