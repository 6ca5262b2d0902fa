"""GPU telemetry (NVML, sampled in a background thread) and named phases of the training step.

    with GPUMonitor(device) as mon:        # samples SM activity, memory, power, SM clock every 0.1 s
        for images in data_phase(batches):  # each fetch is the "data" phase
            with phase("teacher"): ...      # a torch.profiler range and an NVTX range (nsys)
            metrics.update(mon.window())   # {"gpu/power_w_mean": ..., ...} since the last call
    mon.summary()                          # {"available": True, "samples": n, "power_w": {"mean", "peak"}, ...}

Telemetry never raises: without a GPU or NVML, or when NVML fails, the summary says why and the window is empty.
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import torch

log = logging.getLogger(__name__)

# The training step's phases, in order; profiles and NVTX timelines are read by these names.
# In the order a step runs them; "guard" is the NaN guard's copy before the forward and its restore after the
# optimizer step (fastreg.nonfinite)
PHASES = ("data", "guard", "student_forward", "teacher", "loss", "student_backward", "optimizer")


@contextmanager
def phase(name: str) -> Iterator[None]:
    """Mark a range `name` (one of PHASES) for torch.profiler and, on an initialized CUDA, for NVTX (nsys).
    No sync: the range spans the host's launches; the profiler and nsys tie the GPU's kernels to it."""
    if name not in PHASES:
        raise ValueError(f"phase {name!r} is not one of {', '.join(PHASES)}")
    nvtx = torch.cuda.is_available() and torch.cuda.is_initialized()  # NVTX needs CUDA; CPU runs skip it
    with torch.profiler.record_function(name):
        if nvtx:
            torch.cuda.nvtx.range_push(name)
        try:
            yield
        finally:
            if nvtx:
                torch.cuda.nvtx.range_pop()


def data_phase(batches: Iterable) -> Iterator:
    """The items of `batches`, each fetch (the loader's next()) marked as the "data" phase."""
    it, end = iter(batches), object()
    while True:
        with phase("data"):
            batch = next(it, end)
        if batch is end:
            return
        yield batch


# What one sample holds, in this order.
METRICS = ("sm_util_pct", "mem_used_mib", "power_w", "sm_clock_mhz")


class Unavailable(Exception):
    """Telemetry cannot run here; the message is the reason the summary gives."""


class Stats:
    """Running mean and peak of each of METRICS."""

    def __init__(self):
        self.n = 0
        self.sums = [0.0] * len(METRICS)
        self.peaks = [-math.inf] * len(METRICS)

    def add(self, sample: tuple[float, ...]) -> None:
        self.n += 1
        for i, v in enumerate(sample):
            self.sums[i] += v
            self.peaks[i] = max(self.peaks[i], v)

    def nested(self) -> dict[str, dict[str, float]]:
        return {m: {"mean": s / self.n, "peak": p} for m, s, p in zip(METRICS, self.sums, self.peaks)}

    def flat(self, prefix: str) -> dict[str, float]:
        return {f"{prefix}{m}_{k}": v for m, d in self.nested().items() for k, v in d.items()}


class GPUMonitor:
    """Samples one CUDA device through NVML every `interval_s` in a daemon thread, from start() (or `with`)
    to stop(). One use per instance. summary() covers the whole run, window() the time since its last call.

    sm_util_pct is NVML's "GPU utilization": the share of time any kernel ran, not how busy the SMs were
    (one small kernel at a time reads 100%). mem_used_mib counts every process on the GPU.
    """

    def __init__(self, device: torch.device, interval_s: float = 0.1):
        self.device, self.interval_s = torch.device(device), interval_s
        self._available, self._reason = False, "not started"
        self._total, self._window = Stats(), Stats()
        self._lock = threading.Lock()  # the sampler thread adds, the caller reads and resets
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._nvml = self._handle = None

    def __enter__(self) -> GPUMonitor:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> None:
        """Open NVML and take the first sample here, so a failure shows now as the reason; then sample on."""
        try:
            self._open()
            sample = self._read()
        except Exception as e:  # telemetry must never stop a run: any failure only makes it unavailable
            self._reason = str(e) if isinstance(e, Unavailable) else describe(e)
            self._close()
            return
        self._available, self._reason = True, None
        self._add(sample)
        self._thread = threading.Thread(target=self._sample, name="fastreg-gpu-monitor", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        self._close()

    def summary(self) -> dict:
        """JSON-able: {"available", "samples", <metric>: {"mean", "peak"}}, and "reason" when sampling stopped
        early; {"available": False, "reason"} when it never ran."""
        with self._lock:
            if not self._available:
                return {"available": False, "reason": self._reason}
            out = {"available": True, "samples": self._total.n, **self._total.nested()}
            if self._reason:
                out["reason"] = self._reason
            return out

    def window(self) -> dict[str, float]:
        """{"gpu/<metric>_mean", "gpu/<metric>_peak"} over the samples since the last call, and a new window;
        {} when there were none (unavailable, stopped, or called again within interval_s)."""
        with self._lock:
            stats, self._window = self._window, Stats()
        return stats.flat("gpu/") if stats.n else {}

    # ---- sampling ----

    def _sample(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                sample = self._read()
            except Exception as e:  # keep what was sampled, say why it ended, never raise in this thread
                with self._lock:
                    self._reason = f"sampling stopped after {self._total.n} samples: {describe(e)}"
                log.warning("GPU telemetry: %s", self._reason)
                return
            self._add(sample)

    def _add(self, sample: tuple[float, ...]) -> None:
        with self._lock:
            self._total.add(sample)
            self._window.add(sample)

    def _open(self) -> None:
        if self.device.type != "cuda":
            raise Unavailable(f"device {self.device}")
        try:
            import pynvml
        except ImportError as e:
            raise Unavailable(f"pynvml (nvidia-ml-py) is not importable: {e}") from e
        pynvml.nvmlInit()  # reference-counted: every monitor inits and shuts down its own
        self._nvml = pynvml
        self._handle = nvml_handle(pynvml, self.device)

    def _read(self) -> tuple[float, float, float, float]:
        """One sample, in METRICS' order."""
        nv, h = self._nvml, self._handle
        return (
            float(nv.nvmlDeviceGetUtilizationRates(h).gpu),
            nv.nvmlDeviceGetMemoryInfo(h).used / 2**20,
            nv.nvmlDeviceGetPowerUsage(h) / 1000,
            float(nv.nvmlDeviceGetClockInfo(h, nv.NVML_CLOCK_SM)),
        )

    def _close(self) -> None:
        if self._nvml is not None:
            self._nvml.nvmlShutdown()
            self._nvml = self._handle = None


def describe(e: Exception) -> str:
    return f"{type(e).__name__}: {e}"  # e.g. "NVMLError_LibraryNotFound: NVML Shared Library Not Found"


def nvml_handle(pynvml, device: torch.device):
    """NVML's handle of torch's `device`. torch's cuda:i is the i-th GPU that CUDA_VISIBLE_DEVICES lists (in
    CUDA's order), while NVML numbers every GPU of the machine in PCI order: with CUDA_VISIBLE_DEVICES=2,3,
    cuda:0 is NVML's 2. So match the GPU itself: by PCI address where this torch reports it, else by UUID;
    by index only when torch gives neither (right only when every GPU is visible, in PCI order)."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    props = torch.cuda.get_device_properties(index)
    pci = tuple(getattr(props, k, None) for k in ("pci_domain_id", "pci_bus_id", "pci_device_id"))
    if None not in pci:
        for i in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(i)
            info = pynvml.nvmlDeviceGetPciInfo(handle)
            if (info.domain, info.bus, info.device) == pci:
                return handle
        raise Unavailable(f"no NVML device at torch's {device} PCI address {pci[0]:04x}:{pci[1]:02x}:{pci[2]:02x}")
    uuid = str(getattr(props, "uuid", ""))
    if uuid:
        return pynvml.nvmlDeviceGetHandleByUUID(uuid if uuid.startswith(("GPU-", "MIG-")) else f"GPU-{uuid}")
    return pynvml.nvmlDeviceGetHandleByIndex(index)
