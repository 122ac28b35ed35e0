"""Hub ids on demand: the file rules shared by discovery and hub repos, the repo-id check, and the
resolver's bounds (single flight, max_catalog_models, allow_hub_models), with the Hub lookup replaced
by a function returning file lists (no network, no model: nothing here loads anything); and the
metric series a model added at run time gets (and a refused one does not)."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from earshot.cache.protocol import ModelSpec, Task
from earshot.cache.state import CacheConfig, CacheSnapshot
from earshot.models.catalog import Catalog, detect_task
from earshot.models.errors import (
    CatalogFull,
    HubModelNotFound,
    HubModelsDisabled,
    HubUnreachable,
    NotAHubId,
    NotServable,
)
from earshot.models.files import download_patterns, hub_options, needed_files, task_from_files
from earshot.models.hub import KNOWN_HUB_MODELS, KNOWN_HUB_OPTIONS, RepoListing, check_hub_id
from earshot.models.resolver import HubResolver, resolve_preload, spec_from_listing
from earshot.observability.collector import CacheStateCollector
from earshot.observability.metrics import CacheMetrics

WHISPER_REPO = ("config.json", "model.bin", "tokenizer.json", "vocabulary.txt", "README.md", ".gitattributes")
# onnx-community/Kokoro-82M-v1.0-ONNX, abridged
KOKORO_EXPORT = (
    "config.json",
    "onnx/model.onnx",
    "onnx/model_fp16.onnx",
    "onnx/model_quantized.onnx",
    "onnx/model_q4.onnx",
    "voices/af_heart.bin",
    "voices/am_adam.bin",
    "tokenizer.json",
)
KOKORO_FLAT = ("kokoro-v1.0.onnx", "voices-v1.0.bin")


# ---------------------------------------------------------------------------------------- file rules


@pytest.mark.parametrize(
    ("files", "task"),
    [
        (WHISPER_REPO, Task.TRANSCRIPTION),
        (KOKORO_EXPORT, Task.SPEECH),
        (KOKORO_FLAT, Task.SPEECH),
        (("model.onnx", "voices.npz"), Task.SPEECH),
        (("model.bin",), None),  # no config.json
        (("onnx/model.onnx", "tokenizer.json"), None),  # no voices
        (("voices/af.bin", "config.json"), None),  # no model
        (("pytorch_model.bin", "config.json", "README.md"), None),  # transformers weights
        (("sub/model.bin", "sub/config.json"), None),  # not at the top level
        (("deep/onnx/model.onnx", "voices.bin"), None),
    ],
)
def test_task_from_files(files: tuple[str, ...], task: Task | None) -> None:
    assert task_from_files(files) == task


def test_a_local_directory_follows_the_same_rules(tmp_path: Path) -> None:
    for rel in KOKORO_EXPORT:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"x")
    assert detect_task(tmp_path) == Task.SPEECH


def test_only_the_needed_files_are_downloaded() -> None:
    options = hub_options(Task.SPEECH, KOKORO_EXPORT)
    assert options == {"onnx_file": "onnx/model.onnx"}
    assert sorted(needed_files(Task.SPEECH, KOKORO_EXPORT, options)) == [
        "config.json",
        "onnx/model.onnx",
        "voices/af_heart.bin",
        "voices/am_adam.bin",
    ]
    assert sorted(needed_files(Task.TRANSCRIPTION, WHISPER_REPO, {})) == [
        "config.json",
        "model.bin",
        "tokenizer.json",
        "vocabulary.txt",
    ]
    assert hub_options(Task.SPEECH, KOKORO_FLAT) == {}
    assert "*.onnx" in download_patterns(Task.SPEECH, {})


def test_known_hub_models_have_tasks_and_the_guide_model() -> None:
    assert KNOWN_HUB_MODELS["Systran/faster-distil-whisper-large-v3"] == Task.TRANSCRIPTION
    assert KNOWN_HUB_MODELS["deepdml/faster-whisper-large-v3-turbo-ct2"] == Task.TRANSCRIPTION
    assert KNOWN_HUB_MODELS["onnx-community/Kokoro-82M-v1.0-ONNX"] == Task.SPEECH
    for repo in KNOWN_HUB_OPTIONS:
        assert repo in KNOWN_HUB_MODELS
        check_hub_id(repo)


@pytest.mark.parametrize(
    "name",
    [
        "../x",
        "a/b/c",
        "%2F",
        "x" * 10_240,
        "..",
        "owner/..",
        "a--b/c",
        "owner/name.git",
        "/abs",
        "name",
        "a/b\0",
    ],
)
def test_not_hub_ids(name: str) -> None:
    with pytest.raises(NotAHubId):
        check_hub_id(name)


def test_hub_ids() -> None:
    for name in ("Systran/faster-distil-whisper-large-v3", "onnx-community/Kokoro-82M-v1.0-ONNX", "a/b"):
        assert check_hub_id(name) == name


def test_not_servable_says_what_was_found_and_what_is_served() -> None:
    listing = RepoListing("o/weights", ("pytorch_model.bin", "README.md"))
    with pytest.raises(NotServable) as info:
        spec_from_listing(listing)
    assert "pytorch_model.bin" in info.value.message
    assert "model.bin + config.json" in info.value.message


def test_size_estimate_counts_only_needed_files() -> None:
    listing = RepoListing(
        "o/k",
        KOKORO_EXPORT,
        sizes={"onnx/model.onnx": 300, "onnx/model_fp16.onnx": 150, "voices/af_heart.bin": 5},
    )
    spec = spec_from_listing(listing)
    assert spec.size_bytes == 305
    assert spec.source == "hf"
    assert spec.repo_id == "o/k"


# ------------------------------------------------------------------------------------------ resolver


class Lookups:
    """Answers lookups from a table of file lists; counts calls; can hold them until released."""

    def __init__(self, repos: dict[str, tuple[str, ...]]) -> None:
        self.repos = repos
        self.calls: list[str] = []
        self.gate = threading.Event()
        self.gate.set()

    def __call__(self, repo_id: str) -> RepoListing:
        self.calls.append(repo_id)
        self.gate.wait(10)
        if repo_id == "o/offline":
            raise HubUnreachable("unreachable", model=repo_id)
        if repo_id not in self.repos:
            raise HubModelNotFound("no such repo", model=repo_id)
        return RepoListing(repo_id, self.repos[repo_id])


def base_catalog() -> Catalog:
    return Catalog({"local-stt": ModelSpec(id="local-stt", task=Task.TRANSCRIPTION, source="local")})


async def test_catalog_ids_need_no_lookup() -> None:
    lookups = Lookups({})
    resolver = HubResolver(base_catalog(), lookup=lookups)
    assert (await resolver.ensure("local-stt")).id == "local-stt"
    assert lookups.calls == []


async def test_concurrent_requests_for_one_id_share_one_lookup() -> None:
    lookups = Lookups({"o/w": WHISPER_REPO})
    lookups.gate.clear()
    catalog = base_catalog()
    resolver = HubResolver(catalog, lookup=lookups)
    tasks = [asyncio.create_task(resolver.ensure("o/w")) for _ in range(8)]
    await asyncio.sleep(0.1)
    lookups.gate.set()
    specs = await asyncio.gather(*tasks)
    assert {s.id for s in specs} == {"o/w"}
    assert lookups.calls == ["o/w"]
    assert catalog.resolve("o/w") is not None
    assert catalog.specs["o/w"].task == Task.TRANSCRIPTION


async def test_a_requester_that_leaves_does_not_fail_the_others() -> None:
    lookups = Lookups({"o/w": WHISPER_REPO})
    lookups.gate.clear()
    resolver = HubResolver(base_catalog(), lookup=lookups)
    first = asyncio.create_task(resolver.ensure("o/w"))
    second = asyncio.create_task(resolver.ensure("o/w"))
    await asyncio.sleep(0.1)
    first.cancel()
    await asyncio.sleep(0)
    lookups.gate.set()
    assert (await second).id == "o/w"
    assert first.cancelled()
    assert lookups.calls == ["o/w"]


async def test_cap_counts_added_ids_only_and_refuses_the_next() -> None:
    repos = {f"o/w{i}": WHISPER_REPO for i in range(4)}
    lookups = Lookups(repos)
    catalog = base_catalog()
    resolver = HubResolver(catalog, max_models=2, lookup=lookups)
    for bad in ("o/missing", "o/offline"):
        with pytest.raises((HubModelNotFound, HubUnreachable)):
            await resolver.ensure(bad)
    await resolver.ensure("o/w0")
    await resolver.ensure("o/w1")
    with pytest.raises(CatalogFull) as info:
        await resolver.ensure("o/w2")
    assert "max_catalog_models" in info.value.message
    assert "o/w2" not in lookups.calls  # refused before any lookup
    assert (await resolver.ensure("o/w0")).id == "o/w0"  # added ids keep working
    assert catalog.added == ["o/w0", "o/w1"]


async def test_lookups_in_flight_hold_slots() -> None:
    lookups = Lookups({"o/a": WHISPER_REPO, "o/b": WHISPER_REPO})
    lookups.gate.clear()
    resolver = HubResolver(base_catalog(), max_models=1, lookup=lookups)
    first = asyncio.create_task(resolver.ensure("o/a"))
    await asyncio.sleep(0.1)
    with pytest.raises(CatalogFull):
        await resolver.ensure("o/b")
    lookups.gate.set()
    assert (await first).id == "o/a"


async def test_a_bad_answer_is_remembered_a_while() -> None:
    lookups = Lookups({"o/readme": ("README.md",)})
    resolver = HubResolver(base_catalog(), lookup=lookups)
    for _ in range(3):
        with pytest.raises(HubModelNotFound):
            await resolver.ensure("o/missing")
        with pytest.raises(NotServable):
            await resolver.ensure("o/readme")
    assert lookups.calls == ["o/missing", "o/readme"]
    for _ in range(2):  # "unreachable" is not remembered: the next request tries again
        with pytest.raises(HubUnreachable):
            await resolver.ensure("o/offline")
    assert lookups.calls.count("o/offline") == 2


async def test_switch_off_refuses_hub_ids_with_a_clear_message() -> None:
    lookups = Lookups({"o/w": WHISPER_REPO})
    resolver = HubResolver(base_catalog(), enabled=False, lookup=lookups)
    with pytest.raises(HubModelsDisabled) as info:
        await resolver.ensure("o/w")
    assert "allow_hub_models=false" in info.value.message
    assert lookups.calls == []


async def test_not_a_hub_id_is_never_looked_up() -> None:
    lookups = Lookups({})
    resolver = HubResolver(base_catalog(), lookup=lookups)
    for name in ("../x", "a/b/c", "x" * 10_240, "unknown-local"):
        with pytest.raises(NotAHubId):
            await resolver.ensure(name)
    assert lookups.calls == []


async def test_preload_resolves_hub_ids_and_skips_the_rest(caplog: pytest.LogCaptureFixture) -> None:
    lookups = Lookups({"o/w": WHISPER_REPO, "o/readme": ("README.md",)})
    resolver = HubResolver(base_catalog(), lookup=lookups)
    ids = await resolve_preload(resolver, ["local-stt", "o/w", "o/missing", "o/readme", "nope", "o/w"])
    assert ids == ["local-stt", "o/w"]
    skipped = caplog.text
    assert "o/missing" in skipped
    assert "o/readme" in skipped
    assert "nope" in skipped


# ------------------------------------------------------------------------------------------- series


class EmptyCache:
    def snapshot(self) -> CacheSnapshot:
        return CacheSnapshot(at=0.0, models=(), waiting_requests=0, config=CacheConfig())


async def test_a_model_added_at_run_time_gets_its_series_and_a_refused_one_none() -> None:
    registry = CollectorRegistry()
    catalog = base_catalog()
    metrics = CacheMetrics(registry)
    metrics.bind(catalog)
    registry.register(CacheStateCollector(EmptyCache(), catalog))
    resolver = HubResolver(catalog, max_models=1, lookup=Lookups({"o/w": WHISPER_REPO, "o/x": WHISPER_REPO}))
    text = generate_latest(registry).decode()
    assert 'model="o/w"' not in text
    await resolver.ensure("o/w")
    with pytest.raises(CatalogFull):
        await resolver.ensure("o/x")
    text = generate_latest(registry).decode()
    assert 'earshot_model_loaded{model="o/w",task="transcription"} 0.0' in text
    assert 'earshot_model_loads_total{model="o/w",outcome="failure",task="transcription"} 0.0' in text
    assert 'model="o/x"' not in text
    assert metrics.task_of("o/w") == "transcription"
    assert metrics.task_of("o/x") is None
