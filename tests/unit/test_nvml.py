"""GPU metrics: the NVML sampler with a fake pynvml module, NVML absent, and scrapes that never wait."""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from earshot.observability import Observability
from earshot.observability.nvml import GpuCollector, NvmlSampler
from earshot.settings import Settings

GIB = 1024**3
PID = os.getpid()


class FakeNVMLError(Exception):
    pass


@dataclass
class FakeGpu:
    uuid: str
    used: int
    total: int
    util_percent: int
    processes: list[tuple[int, int | None]]  # (pid, usedGpuMemory)
    util_supported: bool = True


@dataclass
class FakeNvml:
    """The part of pynvml earshot uses: two GPUs, this process on both, another process on GPU 0."""

    gpus: list[FakeGpu] = field(
        default_factory=lambda: [
            FakeGpu(
                "GPU-aaaa",
                used=10 * GIB,
                total=80 * GIB,
                util_percent=35,
                processes=[(PID, 3 * GIB), (1, GIB)],
            ),
            FakeGpu(
                "GPU-bbbb", used=2 * GIB, total=24 * GIB, util_percent=0, processes=[(PID, 512 * 1024**2)]
            ),
        ]
    )
    init_error: Exception | None = None
    calls: int = 0
    shutdowns: int = 0
    gate: threading.Event | None = None  # when set, memory reads wait on it (a wedged driver)
    entered: threading.Event = field(default_factory=threading.Event)

    NVMLError = FakeNVMLError

    def nvmlInit(self) -> None:
        if self.init_error is not None:
            raise self.init_error

    def nvmlShutdown(self) -> None:
        self.shutdowns += 1

    def nvmlDeviceGetCount(self) -> int:
        return len(self.gpus)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> FakeGpu:
        return self.gpus[index]

    def nvmlDeviceGetUUID(self, handle: FakeGpu) -> bytes:
        return handle.uuid.encode()  # older pynvml returns bytes: handled

    def nvmlDeviceGetMemoryInfo(self, handle: FakeGpu) -> Any:
        self.calls += 1
        if self.gate is not None:
            self.entered.set()
            self.gate.wait(10)
        return SimpleNamespace(used=handle.used, total=handle.total, free=handle.total - handle.used)

    def nvmlDeviceGetUtilizationRates(self, handle: FakeGpu) -> Any:
        if not handle.util_supported:
            raise FakeNVMLError("Not Supported")
        return SimpleNamespace(gpu=handle.util_percent, memory=0)

    def nvmlDeviceGetComputeRunningProcesses(self, handle: FakeGpu) -> list[Any]:
        return [SimpleNamespace(pid=pid, usedGpuMemory=used) for pid, used in handle.processes]


@pytest.fixture
def fake() -> FakeNvml:
    return FakeNvml()


@pytest.fixture
def sampler(fake: FakeNvml) -> Iterator[NvmlSampler]:
    s = NvmlSampler(60.0, nvml=fake)
    yield s
    s.stop()


def registry_for(sampler: NvmlSampler) -> CollectorRegistry:
    registry = CollectorRegistry()
    registry.register(GpuCollector(sampler))
    return registry


def test_every_gpu_metric_from_a_fake_nvml(sampler: NvmlSampler) -> None:
    registry = registry_for(sampler)
    assert registry.get_sample_value("earshot_gpu_available") == 0.0  # not started yet
    sampler.start()

    def get(name: str, gpu: str, uuid: str) -> float | None:
        return registry.get_sample_value(name, {"gpu": gpu, "uuid": uuid})

    assert registry.get_sample_value("earshot_gpu_available") == 1.0
    assert get("earshot_gpu_memory_used_bytes", "0", "GPU-aaaa") == 10 * GIB
    assert get("earshot_gpu_memory_total_bytes", "0", "GPU-aaaa") == 80 * GIB
    assert get("earshot_gpu_utilization_ratio", "0", "GPU-aaaa") == pytest.approx(0.35)
    assert get("earshot_gpu_process_memory_bytes", "0", "GPU-aaaa") == 3 * GIB  # only this pid's share
    assert get("earshot_gpu_memory_used_bytes", "1", "GPU-bbbb") == 2 * GIB
    assert get("earshot_gpu_memory_total_bytes", "1", "GPU-bbbb") == 24 * GIB
    assert get("earshot_gpu_utilization_ratio", "1", "GPU-bbbb") == 0.0
    assert get("earshot_gpu_process_memory_bytes", "1", "GPU-bbbb") == 512 * 1024**2


def test_process_memory_reads_nvml_at_call_time(fake: FakeNvml, sampler: NvmlSampler) -> None:
    sampler.start()
    assert sampler.process_memory() == {"cuda:0": 3 * GIB, "cuda:1": 512 * 1024**2}
    fake.gpus[0].processes = [(1, GIB)]  # this process let go of GPU 0
    fake.gpus[1].processes = [(PID, GIB)]
    assert sampler.process_memory() == {"cuda:0": 0, "cuda:1": GIB}  # now, not at the next sample


def test_unsupported_reading_is_left_out_and_reported_once(
    fake: FakeNvml, caplog: pytest.LogCaptureFixture
) -> None:
    fake.gpus[1].util_supported = False  # e.g. MIG or an old board
    sampler = NvmlSampler(60.0, nvml=fake)
    registry = registry_for(sampler)
    with caplog.at_level(logging.INFO, logger="earshot.observability.nvml"):
        sampler.start()
        sampler._sample()
        sampler._sample()
    try:
        warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
        assert len(warnings) == 1
        assert "utilization of GPU 1" in warnings[0].getMessage()
        labels = {"gpu": "1", "uuid": "GPU-bbbb"}
        assert registry.get_sample_value("earshot_gpu_utilization_ratio", labels) is None
        assert registry.get_sample_value("earshot_gpu_memory_used_bytes", labels) == 2 * GIB
    finally:
        sampler.stop()


@pytest.mark.parametrize(
    "broken",
    [
        pytest.param(FakeNVMLError("NVML Shared Library Not Found"), id="nvmlInit-raises"),
        pytest.param(OSError("libnvidia-ml.so.1: cannot open shared object file"), id="no-library"),
    ],
)
def test_without_nvml_gpu_available_is_0_with_one_info_line(
    fake: FakeNvml, broken: Exception, caplog: pytest.LogCaptureFixture
) -> None:
    fake.init_error = broken
    sampler = NvmlSampler(0.01, nvml=fake)
    registry = registry_for(sampler)
    with caplog.at_level(logging.DEBUG, logger="earshot.observability.nvml"):
        sampler.start()
        sampler.start()  # a second start does not log again
        time.sleep(0.05)
        assert sampler.process_memory() == {}
        sampler.stop()
    lines = [r for r in caplog.records if r.name == "earshot.observability.nvml"]
    assert [r.levelno for r in lines] == [logging.INFO]
    assert "NVML is not available" in lines[0].getMessage()
    assert registry.get_sample_value("earshot_gpu_available") == 0.0
    samples = [
        line for line in generate_latest(registry).decode().splitlines() if line and not line.startswith("#")
    ]
    assert samples == ["earshot_gpu_available 0.0"]  # no GPU series at all


def test_the_real_pynvml_on_a_machine_without_gpu(caplog: pytest.LogCaptureFixture) -> None:
    """Whatever this machine has: with a GPU, values; without, the one INFO line and no series."""
    sampler = NvmlSampler(60.0)
    registry = registry_for(sampler)
    with caplog.at_level(logging.DEBUG, logger="earshot.observability.nvml"):
        sampler.start()
    try:
        if sampler.available:
            assert registry.get_sample_value("earshot_gpu_available") == 1.0
            assert sampler.samples
        else:
            assert registry.get_sample_value("earshot_gpu_available") == 0.0
            records = [r for r in caplog.records if r.name == "earshot.observability.nvml"]
            assert len(records) == 1
            assert records[0].levelno == logging.INFO
    finally:
        sampler.stop()


def test_a_scrape_never_waits_for_a_blocked_sampler(fake: FakeNvml) -> None:
    sampler = NvmlSampler(0.01, nvml=fake)
    registry = registry_for(sampler)
    sampler.start()  # first sample taken
    fake.gate = threading.Event()  # the next NVML memory read hangs
    try:
        assert fake.entered.wait(5), "the sampler thread did not take another sample"
        started = time.perf_counter()
        used = registry.get_sample_value("earshot_gpu_memory_used_bytes", {"gpu": "0", "uuid": "GPU-aaaa"})
        elapsed = time.perf_counter() - started
        assert used == 10 * GIB  # the last sample
        assert elapsed < 0.5
    finally:
        fake.gate.set()
        sampler.stop()


def test_the_sampler_thread_samples_at_its_interval_and_stops(fake: FakeNvml) -> None:
    sampler = NvmlSampler(0.01, nvml=fake)
    registry = registry_for(sampler)
    sampler.start()
    fake.gpus[0].used = 33 * GIB
    deadline = time.monotonic() + 5
    while (
        registry.get_sample_value("earshot_gpu_memory_used_bytes", {"gpu": "0", "uuid": "GPU-aaaa"})
        != 33 * GIB
    ):
        assert time.monotonic() < deadline, "the new value was never sampled"
        time.sleep(0.01)
    sampler.stop()
    assert not any(t.name == "earshot-nvml" and t.is_alive() for t in threading.enumerate())
    assert fake.shutdowns == 1
    assert registry.get_sample_value("earshot_gpu_available") == 0.0


def test_observability_memory_probe_has_rss_and_gpu(fake: FakeNvml) -> None:
    obs = Observability.create(
        Settings(nvml_interval_seconds=60),
        registry=CollectorRegistry(),
        nvml=fake,
        set_global_tracer_provider=False,
    )
    obs.start()
    try:
        reading = obs.memory_probe()
        assert reading["cpu"] > 10 * 1024**2  # this Python process's RSS
        assert reading["cuda:0"] == 3 * GIB
        assert reading["cuda:1"] == 512 * 1024**2
        assert obs.registry.get_sample_value("earshot_gpu_available") == 1.0
    finally:
        obs.stop()
    assert set(obs.memory_probe()) == {"cpu"}
