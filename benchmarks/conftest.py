"""Fixtures of the pytest-benchmark suites (``pytest benchmarks --benchmark-only``; see README.md here).

The plain ``pytest`` of the repository never collects this folder (pytest.ini: testpaths = tests).
Nothing here sets TRITON_INTERPRET: the Triton interpreter is never timed, so on CPU only the eager
(torch) backend runs and the Triton / torch.compile benchmarks skip with their reason.

Smoke mode: ``pytest benchmarks --benchmark-disable`` runs every benchmark body once, untimed, and
measures the in-run baselines with a single call (proves the suites run; numbers are not recorded).
"""

from __future__ import annotations

import pytest
import torch

from benchmarks import _common as common

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
ON_CUDA = DEVICE.type == "cuda"
CPU_THREADS = 1
MODEL_DTYPE = torch.bfloat16 if ON_CUDA else torch.float32  # of the step and sampling benchmarks


def pytest_benchmark_update_machine_info(config, machine_info):
    # Goes into the JSON's machine_info; --benchmark-compare warns when it differs between runs.
    env = common.environment(DEVICE, None if ON_CUDA else CPU_THREADS)
    machine_info["eoc"] = {key: env[key] for key in ("device", "device_type", "torch", "triton", "cuda")}


def backend_skip_reason(backend: str) -> str | None:
    """Why a backend is not timed on this machine (None: it is)."""
    if backend == "torch":
        return None
    if not ON_CUDA:
        return (f"{backend} is timed on CUDA only (no GPU here; the Triton interpreter is never timed)"
                if backend == "triton" else "torch.compile is timed on CUDA only (no GPU here)")
    if backend == "triton":
        import eoc_kernels

        if "triton" not in eoc_kernels.available_backends(DEVICE):
            return "the triton backend is not available on this CUDA device"
        from eoc_kernels.triton import INTERPRETED

        if INTERPRETED:
            return "TRITON_INTERPRET is set: the Triton interpreter is never timed"
    return None


@pytest.fixture(scope="session", autouse=True)
def cpu_threads():
    """One intra-op thread on CPU: on a shared 2-core CPU a second thread spins against the other
    jobs and makes timings slower and noisier (the thread count is part of the recorded device)."""
    if ON_CUDA:
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(CPU_THREADS)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def device():
    return DEVICE


@pytest.fixture(scope="session")
def smoke(request) -> bool:
    """True under --benchmark-disable: run each body once, measure nothing for real."""
    return bool(request.config.getoption("benchmark_disable")) and not request.config.getoption("benchmark_enable")


@pytest.fixture(scope="session")
def env_record(cpu_threads):
    return common.environment(DEVICE)  # after cpu_threads: records the thread count in use


@pytest.fixture(scope="session")
def copy_bandwidth(smoke):
    """Measured copy bandwidth of the device in bytes/s (read + write), once per session."""
    return common.copy_bandwidth(DEVICE, repeats=1 if smoke else 10)


class Baselines:
    """In-run baselines, one per key and session. A baseline benchmark that ran earlier in the session
    records its pytest-benchmark median (``record``); otherwise (e.g. under ``-k``) the first benchmark
    that needs it times it with the synchronizing manual timer (median of a few calls)."""

    def __init__(self, smoke: bool):
        self.smoke = smoke
        self._seconds = {}

    def time(self, fn, *, repeats: int = 5, inner: int = 1) -> float:
        if self.smoke:
            return common.time_call(fn, DEVICE, repeats=1, warmup=0)
        return common.time_call(fn, DEVICE, repeats=repeats, warmup=1, inner=inner)

    def record(self, key, seconds) -> None:
        if seconds is not None:
            self._seconds[key] = seconds

    def get(self, key, compute):
        """The recorded seconds of key, or compute() -> seconds (then kept for the session)."""
        if key not in self._seconds:
            self._seconds[key] = compute()
        return self._seconds[key]

    def seconds(self, key, fn, **options) -> float:
        return self.get(key, lambda: self.time(fn, **options))


@pytest.fixture(scope="session")
def baselines(smoke):
    return Baselines(smoke)


@pytest.fixture(scope="session")
def dit():
    """(model, description): the DiT of the step and sampling benchmarks (common.sampling_model)."""
    return common.sampling_model(DEVICE, MODEL_DTYPE)


@pytest.fixture
def measure(benchmark, smoke, env_record):
    """measure(fn, **extra_info) -> median seconds per call (None in smoke mode).

    Times fn with pytest-benchmark; on CUDA every timed call ends with torch.cuda.synchronize().
    One untimed warm-up call first (Triton / torch.compile compile there). extra_info gets the
    environment record and the given fields."""
    def run(fn, **extra_info):
        benchmark.extra_info.update(env_record)
        benchmark.extra_info.update(extra_info)
        timed = common.inject_slowdown(common.synchronized(fn, DEVICE))
        if not smoke:
            timed()
        benchmark(timed)
        return None if benchmark.stats is None else benchmark.stats.stats.median

    return run
