"""GPU telemetry without a GPU (a fed reader stands in for NVML), the step's phases under torch.profiler,
and the trainer's gpu/* metrics; one test reads a real GPU."""

from __future__ import annotations

import json
import logging
import queue
import threading
import time

import pytest
import torch
from helpers import make_image_folder, tiny_overrides
from test_train import compose_cfg

import fastreg.run_log
from fastreg.config import to_config
from fastreg.monitor import PHASES, GPUMonitor, nvml_handle, phase
from fastreg.train import train
from fastreg.trainer import Trainer

THREAD = "fastreg-gpu-monitor"


def sampler_running() -> bool:
    return any(t.name == THREAD and t.is_alive() for t in threading.enumerate())


def wait_for(condition, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.001)


class FedMonitor(GPUMonitor):
    """Reads the samples a test puts in `feed`, in order; an exception put there is raised by that read."""

    def __init__(self, *samples):
        super().__init__(torch.device("cuda", 0), interval_s=0.001)
        self.feed = queue.Queue()
        for s in samples:
            self.feed.put(s)

    def _open(self) -> None:
        pass  # no NVML

    def _read(self):
        item = self.feed.get(timeout=10)
        if isinstance(item, Exception):
            raise item
        return item

    def stop(self) -> None:
        self.feed.put(EOFError("stopped"))  # wakes a read waiting on the feed
        super().stop()


# (sm_util_pct, mem_used_mib, power_w, sm_clock_mhz)
S1, S2, S3, S4 = (10, 100, 50, 1000), (30, 300, 150, 1400), (20, 200, 100, 1200), (40, 400, 200, 1600)


def test_cpu_device_is_unavailable_with_a_reason_and_no_thread():
    with GPUMonitor(torch.device("cpu")) as mon:
        assert not sampler_running()
    assert mon.summary() == {"available": False, "reason": "device cpu"}
    assert mon.window() == {}


def test_mean_and_peak_over_the_run_and_per_window():
    with FedMonitor(S1, S2, S3) as mon:  # start() reads S1, the thread S2 and S3
        wait_for(lambda: mon.summary()["samples"] == 3)
        assert mon.summary() == {
            "available": True,
            "samples": 3,
            "sm_util_pct": {"mean": 20, "peak": 30},
            "mem_used_mib": {"mean": 200, "peak": 300},
            "power_w": {"mean": 100, "peak": 150},
            "sm_clock_mhz": {"mean": 1200, "peak": 1400},
        }
        assert mon.window() == {
            "gpu/sm_util_pct_mean": 20,
            "gpu/sm_util_pct_peak": 30,
            "gpu/mem_used_mib_mean": 200,
            "gpu/mem_used_mib_peak": 300,
            "gpu/power_w_mean": 100,
            "gpu/power_w_peak": 150,
            "gpu/sm_clock_mhz_mean": 1200,
            "gpu/sm_clock_mhz_peak": 1400,
        }
        assert mon.window() == {}  # reset: no sample since
        mon.feed.put(S4)
        wait_for(lambda: mon.summary()["samples"] == 4)
        assert mon.window() == {
            "gpu/sm_util_pct_mean": 40,
            "gpu/sm_util_pct_peak": 40,
            "gpu/mem_used_mib_mean": 400,
            "gpu/mem_used_mib_peak": 400,
            "gpu/power_w_mean": 200,
            "gpu/power_w_peak": 200,
            "gpu/sm_clock_mhz_mean": 1600,
            "gpu/sm_clock_mhz_peak": 1600,
        }
        assert mon.summary()["sm_util_pct"] == {"mean": 25, "peak": 40}
        assert mon.summary()["power_w"] == {"mean": 125, "peak": 200}
    assert not sampler_running()


@pytest.mark.filterwarnings("error::pytest.PytestUnhandledThreadExceptionWarning")
def test_a_read_failing_mid_run_stops_sampling_and_keeps_the_samples():
    with FedMonitor(S1, S2, RuntimeError("GPU is lost"), S3) as mon:
        wait_for(lambda: "reason" in mon.summary())
        wait_for(lambda: not sampler_running())
        summary = mon.summary()
        assert summary["available"] and summary["samples"] == 2
        assert summary["reason"] == "sampling stopped after 2 samples: RuntimeError: GPU is lost"
        assert summary["sm_util_pct"] == {"mean": 20, "peak": 30}
        assert mon.window()["gpu/power_w_mean"] == 100
        assert mon.window() == {}


def test_a_failure_at_start_makes_it_unavailable():
    with FedMonitor(OSError("NVML: Driver Not Loaded")) as mon:
        assert not sampler_running()
    assert mon.summary() == {"available": False, "reason": "OSError: NVML: Driver Not Loaded"}
    assert mon.window() == {}


def test_phase_names_are_checked():
    with pytest.raises(ValueError, match="student_forward"):
        with phase("forward"):
            pass


def one_step_trainer(tmp_path, *extra):
    data = make_image_folder(tmp_path / "data", per_class=4)  # 8 images: one batch of 8
    return Trainer(to_config(compose_cfg(tiny_overrides(data, tmp_path / "run") + ["trainer.epochs=1", *extra])))


def test_a_training_step_marks_every_phase_for_the_profiler(tmp_path):
    trainer = one_step_trainer(tmp_path)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        trainer.train_epoch(0)
    assert trainer.step == 1
    names = {e.key for e in prof.key_averages()}
    assert set(PHASES) <= names, set(PHASES) - names


def test_cpu_training_with_the_monitor_logs_why_and_writes_no_gpu_metrics(tmp_path, caplog):
    data = make_image_folder(tmp_path / "data")
    with caplog.at_level(logging.INFO, logger="fastreg"):
        train(compose_cfg(tiny_overrides(data, tmp_path / "run") + ["trainer.epochs=1", "trainer.monitor=true"]))
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(lines) == 4 and all("loss" in m for m in lines)
    assert not [k for m in lines for k in m if k.startswith("gpu/")]
    assert "GPU telemetry unavailable (device cpu)" in caplog.text
    assert not sampler_running()


class ConstantMonitor(FedMonitor):
    def __init__(self, device):
        super().__init__()

    def _read(self):
        return S4


def test_the_trainer_writes_each_windows_gpu_metrics_and_stops_the_monitor(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(fastreg.run_log, "GPUMonitor", ConstantMonitor)
    trainer = one_step_trainer(tmp_path, "data.batch_size=2")  # 4 steps, each logged
    with caplog.at_level(logging.INFO, logger="fastreg"):
        trainer.fit()
    assert not sampler_running()
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    gpu = [{k: v for k, v in m.items() if k.startswith("gpu/")} for m in lines]
    assert len(lines) == 4 and any(gpu)
    assert all(g == {} or g["gpu/power_w_mean"] == g["gpu/power_w_peak"] == 200 and len(g) == 8 for g in gpu)
    assert "GPU telemetry over the run" in caplog.text


def test_the_monitor_stops_when_training_raises(tmp_path, monkeypatch):
    monkeypatch.setattr(fastreg.run_log, "GPUMonitor", ConstantMonitor)
    trainer = one_step_trainer(tmp_path)
    monkeypatch.setattr(trainer, "train_step", lambda images: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        trainer.fit()
    assert not sampler_running()


@pytest.mark.gpu
def test_a_busy_gpu_reads_plausibly():
    import pynvml

    device = torch.device("cuda", 0)
    a = torch.randn(4096, 4096, device=device)
    c = torch.empty_like(a)
    with GPUMonitor(device, interval_s=0.05) as mon:
        deadline = time.monotonic() + 1.5
        while time.monotonic() < deadline:
            torch.mm(a, a, out=c)
            torch.cuda.synchronize()
    s = mon.summary()
    assert s["available"] and s["samples"] > 5 and "reason" not in s, s
    assert 0 <= s["sm_util_pct"]["mean"] <= s["sm_util_pct"]["peak"] <= 100 and s["sm_util_pct"]["peak"] > 0, s
    assert s["power_w"]["mean"] > 0 and s["sm_clock_mhz"]["mean"] > 0 and s["mem_used_mib"]["peak"] >= 128, s
    pynvml.nvmlInit()  # the PCI match finds the GPU that torch's UUID names
    try:
        uuid = pynvml.nvmlDeviceGetUUID(nvml_handle(pynvml, device))
        assert uuid.removeprefix("GPU-") == str(torch.cuda.get_device_properties(device).uuid).removeprefix("GPU-")
    finally:
        pynvml.nvmlShutdown()
