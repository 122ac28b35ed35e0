"""GPU metrics from NVML (`pynvml`, from the nvidia-ml-py package), sampled in a background thread.

`NvmlSampler` reads, every `interval` seconds, for each GPU: memory used and total, utilization
(as a 0..1 ratio) and the GPU memory of this process; a scrape (`GpuCollector`) only reads the
last sample and never waits on NVML. Without NVML (the module does not import, or `nvmlInit`
fails: no driver, no GPU) `earshot_gpu_available` reads 0, one INFO line says why, and no GPU
series exist.

`process_memory()` reads NVML directly, at call time: it backs the cache's memory probe, which
runs in worker threads around loads and unloads and needs the value now, not up to `interval` old.

Labels: `gpu` is the NVML device index (NVML ignores CUDA_VISIBLE_DEVICES, so it can differ from
the CUDA ordinal inside the process) and `uuid` the device UUID; the memory probe's devices are
named `cuda:<NVML index>` to match. This process is found in NVML's process list by its pid: in a
container with its own pid namespace NVML reports host pids, so the per-process memory reads 0
unless the container shares the host's pid namespace.

The NVML module is injectable (tests pass a fake one with the same functions and `NVMLError`).
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from prometheus_client.metrics_core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

log = logging.getLogger("earshot.observability.nvml")

GPU_LABELS = ["gpu", "uuid"]


@dataclass(frozen=True)
class GpuSample:
    """One GPU at one moment. None: NVML could not tell (not supported on this device)."""

    index: int
    uuid: str
    memory_used_bytes: int | None
    memory_total_bytes: int | None
    utilization_ratio: float | None
    process_memory_bytes: int | None


@dataclass(frozen=True)
class _Device:
    index: int
    handle: Any
    uuid: str


def _import_pynvml() -> Any:
    import pynvml

    return pynvml


def _text(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


class NvmlSampler:
    """Samples every GPU in a daemon thread; `samples` is the latest reading (a tuple, swapped whole)."""

    def __init__(self, interval: float, *, nvml: Any | None = None, pid: int | None = None) -> None:
        self.interval = interval
        self._nvml_given = nvml
        self._nvml: Any | None = None
        self._pid = os.getpid() if pid is None else pid
        self._devices: tuple[_Device, ...] = ()
        self._available = False
        self._samples: tuple[GpuSample, ...] = ()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._init_tried = False
        self._lock = threading.Lock()  # start/stop only; never taken by readers
        self._reported: set[tuple[int, str]] = set()

    @property
    def available(self) -> bool:
        return self._available

    @property
    def samples(self) -> tuple[GpuSample, ...]:
        return self._samples

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        """Initialise NVML, take a first sample, start the sampling thread. Idempotent."""
        with self._lock:
            if self._thread is not None or (self._init_tried and not self._available):
                return
            if not self._available and not self._init():
                return
            self._sample()
            self._stop.clear()
            self._thread = threading.Thread(target=self._run, name="earshot-nvml", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        """Stop the thread (waits for the sample in progress) and shut NVML down."""
        with self._lock:
            thread, self._thread = self._thread, None
            self._stop.set()
            if thread is not None:
                thread.join(timeout=self.interval + 10)
            if self._available and self._nvml is not None:
                self._available = False
                self._samples = ()
                self._init_tried = False
                try:
                    self._nvml.nvmlShutdown()
                except Exception:
                    log.debug("nvmlShutdown failed", exc_info=True)

    def _init(self) -> bool:
        self._init_tried = True
        try:
            nvml = self._nvml_given if self._nvml_given is not None else _import_pynvml()
        except Exception as exc:
            log.info("NVML is not available (pynvml does not import: %s): no GPU metrics", exc)
            return False
        try:
            nvml.nvmlInit()
        except Exception as exc:  # NVMLError (no driver, no GPU), OSError (no libnvidia-ml)
            log.info("NVML is not available (%s): no GPU metrics", exc)
            return False
        try:
            devices = []
            for index in range(int(nvml.nvmlDeviceGetCount())):
                handle = nvml.nvmlDeviceGetHandleByIndex(index)
                devices.append(_Device(index, handle, _text(nvml.nvmlDeviceGetUUID(handle))))
        except Exception as exc:
            log.info("NVML is not available (listing GPUs failed: %s): no GPU metrics", exc)
            self._shutdown_quietly(nvml)
            return False
        self._nvml = nvml
        self._devices = tuple(devices)
        self._available = True
        log.info("NVML: %d GPU(s), sampled every %gs", len(devices), self.interval)
        return True

    @staticmethod
    def _shutdown_quietly(nvml: Any) -> None:
        try:
            nvml.nvmlShutdown()
        except Exception:
            log.debug("nvmlShutdown failed", exc_info=True)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self._sample()
            except Exception:  # never let the thread die: the next interval tries again
                log.warning("NVML sampling failed", exc_info=True)

    # ------------------------------------------------------------------ reading

    def _read(self, device: _Device, what: str, fn: Any) -> Any:
        """One NVML call for one device; None (reported once per device and metric) if it fails."""
        try:
            return fn(device.handle)
        except Exception as exc:
            key = (device.index, what)
            if key not in self._reported:
                self._reported.add(key)
                log.warning("NVML: cannot read %s of GPU %d: %s", what, device.index, exc)
            return None

    def _process_bytes(self, device: _Device) -> int | None:
        nvml = self._nvml
        assert nvml is not None
        processes = self._read(device, "compute processes", nvml.nvmlDeviceGetComputeRunningProcesses)
        if processes is None:
            return None
        used = [p.usedGpuMemory for p in processes if p.pid == self._pid]
        if any(u is None for u in used):
            return None  # NVML cannot tell (e.g. WDDM)
        return int(sum(used))

    def _sample(self) -> None:
        nvml = self._nvml
        if nvml is None:
            return
        samples = []
        for device in self._devices:
            memory = self._read(device, "memory", nvml.nvmlDeviceGetMemoryInfo)
            rates = self._read(device, "utilization", nvml.nvmlDeviceGetUtilizationRates)
            samples.append(
                GpuSample(
                    index=device.index,
                    uuid=device.uuid,
                    memory_used_bytes=None if memory is None else int(memory.used),
                    memory_total_bytes=None if memory is None else int(memory.total),
                    utilization_ratio=None if rates is None else float(rates.gpu) / 100.0,
                    process_memory_bytes=self._process_bytes(device),
                )
            )
        self._samples = tuple(samples)

    def process_memory(self) -> Mapping[str, int]:
        """This process's GPU memory now, per device: {"cuda:0": bytes, ...}; {} without NVML."""
        if not self._available:
            return {}
        out: dict[str, int] = {}
        for device in self._devices:
            used = self._process_bytes(device)
            if used is not None:
                out[f"cuda:{device.index}"] = used
        return out


class DisabledSampler(NvmlSampler):
    """GPU sampling switched off: always unavailable, never touches NVML, logs nothing."""

    def start(self) -> None:
        return None

    def stop(self) -> None:
        return None


class GpuCollector(Collector):
    """earshot_gpu_* gauges from the sampler's last sample (never calls NVML)."""

    def __init__(self, sampler: NvmlSampler) -> None:
        self._sampler = sampler

    def describe(self) -> Iterable[Metric]:
        return self._families()

    def collect(self) -> Iterator[Metric]:
        families = self._families()
        available, used, total, utilization, process = families
        sampler = self._sampler
        available.add_metric([], 1.0 if sampler.available else 0.0)
        if sampler.available:
            for s in sampler.samples:
                labels = [str(s.index), s.uuid]
                if s.memory_used_bytes is not None:
                    used.add_metric(labels, float(s.memory_used_bytes))
                if s.memory_total_bytes is not None:
                    total.add_metric(labels, float(s.memory_total_bytes))
                if s.utilization_ratio is not None:
                    utilization.add_metric(labels, s.utilization_ratio)
                if s.process_memory_bytes is not None:
                    process.add_metric(labels, float(s.process_memory_bytes))
        return iter(families)

    @staticmethod
    def _families() -> list[GaugeMetricFamily]:
        return [
            GaugeMetricFamily("earshot_gpu_available", "1 when NVML reports GPUs, 0 when NVML is absent."),
            GaugeMetricFamily(
                "earshot_gpu_memory_used_bytes", "GPU memory used, all processes.", labels=GPU_LABELS
            ),
            GaugeMetricFamily("earshot_gpu_memory_total_bytes", "GPU memory in total.", labels=GPU_LABELS),
            GaugeMetricFamily(
                "earshot_gpu_utilization_ratio",
                "Fraction of the last sample period the GPU was busy (0..1).",
                labels=GPU_LABELS,
            ),
            GaugeMetricFamily(
                "earshot_gpu_process_memory_bytes",
                "GPU memory used by this earshot process.",
                labels=GPU_LABELS,
            ),
        ]
