"""Hub ids on demand: a requested `owner/name` that the catalog does not list is looked up on the
Hugging Face Hub (its file list; the local HF cache offline), and joins the catalog once its files
are a model earshot serves.

Bounded: at most `max_catalog_models` ids are added this way (an id counts once it resolves; one
being resolved holds a slot meanwhile), at most `MAX_CONCURRENT_LOOKUPS` lookups run at once, and
concurrent requests for one id share one lookup (single flight). A client therefore cannot grow
the catalog, its metric series or the downloads without bound. `Catalog.resolve` stays a pure,
sync read: this is the one async step in front of it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable

from earshot.models.catalog import Catalog
from earshot.models.errors import (
    CatalogFull,
    HubModelNotFound,
    HubModelsDisabled,
    ModelResolutionError,
    NotAHubId,
    NotServable,
    shown,
)
from earshot.models.files import SERVABLE, describe, hub_options, needed_files, task_from_files
from earshot.models.hub import RepoListing, cached_repo_sizes, check_hub_id, from_cache, is_hub_id, lookup
from earshot.types import ModelSpec

log = logging.getLogger("earshot.models")

MAX_CONCURRENT_LOOKUPS = 4
# Answers "no such repo" / "not a model" are remembered a while, so repeating a bad id costs no
# lookup each time (a bounded table: the oldest answers go first).
MISS_TTL_S = 60.0
MAX_MISSES = 256


def spec_from_listing(listing: RepoListing) -> ModelSpec:
    """The catalog entry for a looked-up repo, or NotServable saying what was found."""
    task = task_from_files(listing.files)
    if task is None:
        where = "in the local Hugging Face cache" if listing.source == "cache" else "on the Hub"
        raise NotServable(
            f"The model {listing.repo_id!r} {where} holds {describe(listing.files)}; earshot serves "
            f"{SERVABLE}.",
            model=listing.repo_id,
        )
    options = hub_options(task, listing.files)
    size = sum(listing.sizes.get(f, 0) for f in needed_files(task, listing.files, options))
    return ModelSpec(
        id=listing.repo_id,
        task=task,
        source="hf",
        repo_id=listing.repo_id,
        options=options,
        size_bytes=size,
    )


class HubResolver:
    """`await resolver.ensure(name)`: the catalog's spec for `name`, resolving a hub id on demand."""

    def __init__(
        self,
        catalog: Catalog,
        *,
        enabled: bool = True,
        max_models: int = 32,
        lookup: Callable[[str], RepoListing] = lookup,
    ) -> None:
        self.catalog = catalog
        self.enabled = enabled
        self.max_models = max_models
        self._lookup = lookup
        self._inflight: dict[str, asyncio.Task[ModelSpec]] = {}
        self._slots: asyncio.Semaphore | None = None
        self._misses: OrderedDict[str, tuple[float, ModelResolutionError]] = OrderedDict()

    @property
    def added(self) -> int:
        return len(self.catalog.added)

    async def ensure(self, name: str) -> ModelSpec:
        """The spec of `name`: from the catalog, or a hub repo resolved now (and added).

        Raises NotAHubId (neither listed nor an owner/name repo id), HubModelsDisabled, CatalogFull,
        HubModelNotFound, NotServable, HubUnreachable."""
        spec = self.catalog.resolve(name)
        if spec is not None:
            return spec
        check_hub_id(name)
        if not self.enabled:
            raise HubModelsDisabled(
                f"The model {shown(name)!r} is not in the catalog, and models from the Hugging Face Hub "
                "on demand are turned off on this server (allow_hub_models=false). GET /v1/models lists "
                "the models.",
                model=name,
            )
        miss = self._misses.get(name)
        if miss is not None:
            if time.monotonic() - miss[0] < MISS_TTL_S:
                raise miss[1]
            del self._misses[name]
        task = self._inflight.get(name)
        if task is None:
            resolving = sum(1 for t in self._inflight.values() if not t.done())
            if self.added + resolving >= self.max_models:
                raise CatalogFull(
                    f"The model {shown(name)!r} is not in the catalog, and this server has added its limit "
                    f"of {self.max_models} models from the Hugging Face Hub (max_catalog_models). "
                    "GET /v1/models lists the models.",
                    model=name,
                )
            # A task of its own: a requester that goes away does not fail the others waiting on it.
            task = asyncio.get_running_loop().create_task(self._resolve(name), name=f"resolve {name}")
            self._inflight[name] = task
            task.add_done_callback(self._done)
        return await asyncio.shield(task)

    def _done(self, task: asyncio.Task[ModelSpec]) -> None:
        for name, pending in list(self._inflight.items()):
            if pending is task:
                del self._inflight[name]
        if task.cancelled():
            return
        exc = task.exception()  # retrieved here: no "never retrieved" warning when every waiter left
        if isinstance(exc, HubModelNotFound | NotServable):
            self._misses[exc.model] = (time.monotonic(), exc)
            while len(self._misses) > MAX_MISSES:
                self._misses.popitem(last=False)

    async def _resolve(self, name: str) -> ModelSpec:
        if self._slots is None:
            self._slots = asyncio.Semaphore(MAX_CONCURRENT_LOOKUPS)
        async with self._slots:
            listing = await asyncio.to_thread(self._lookup, name)
        spec = self.catalog.add(spec_from_listing(listing))
        log.info(
            "model %s added to the catalog from %s (%s, about %d MB)",
            spec.id,
            "the Hugging Face Hub" if listing.source == "hub" else "the local Hugging Face cache",
            spec.task.value,
            spec.size_bytes // 1_000_000,
        )
        return spec


async def resolve_preload(resolver: HubResolver, names: Iterable[str]) -> list[str]:
    """The catalog ids of `preload_models`, resolving hub ids the catalog does not list yet; one that
    cannot be resolved is logged and skipped (the server still starts)."""
    ids: list[str] = []
    for name in names:
        try:
            spec = await resolver.ensure(name)
        except NotAHubId:
            log.warning("preload_models: %s is not in the catalog, skipped", shown(name))
            continue
        except ModelResolutionError as exc:
            log.warning("preload_models: %s skipped: %s", shown(name), exc.message)
            continue
        if spec.id not in ids:
            ids.append(spec.id)
    return ids


def cached_hub_models(catalog: Catalog, *, limit: int) -> list[ModelSpec]:
    """Models in the local HF cache that the catalog does not list and that a request would resolve
    to (for `earshot models list`). Never touches the network."""

    out: list[ModelSpec] = []
    for repo in sorted(cached_repo_sizes()):
        if len(out) >= limit:
            break
        if repo in catalog or not is_hub_id(repo):
            continue
        listing = from_cache(repo, None)
        if listing is None:
            continue
        try:
            out.append(spec_from_listing(listing))
        except NotServable:
            continue
    return out
