"""pytest-benchmark set-up: the device, its peak rates, and command-line options.

`pytest benchmarks` runs the workloads of docs/DESIGN.md (section 6) on a GPU, a CPU-sized set otherwise. Options:
`--providers seed,fused` and `--workloads paper,wide` narrow the run; `--slice-sweep 12,14,16` adds
the slice-count sweep of test_slice_sweep.py.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

from workloads import CPU_WORKLOADS, GPU_WORKLOADS, MODES, PROVIDERS  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
WORKLOADS = GPU_WORKLOADS if DEVICE.type == "cuda" else CPU_WORKLOADS

# Dense peak rates (TFLOP/s): tensor-core bf16, and plain fp32 FMA, by device-name fragment.
PEAK_TFLOPS = {
    "H100 SXM": (989.0, 67.0),
    "H100 80GB HBM3": (989.0, 67.0),
    "H100 NVL": (835.0, 60.0),
    "H100 PCIe": (756.0, 51.0),
    "H200": (989.0, 67.0),
    "A100": (312.0, 19.5),
}


def device_name() -> str:
    if DEVICE.type == "cuda":
        return torch.cuda.get_device_name(DEVICE)
    import platform

    return f"CPU {platform.processor() or platform.machine()} ({torch.get_num_threads()} threads)"


def peak_rates() -> tuple[float, float] | None:
    """(tensor-core bf16, fp32) TFLOP/s of this GPU, or None when unknown or on CPU."""
    if DEVICE.type != "cuda":
        return None
    name = device_name()
    return next((rates for fragment, rates in PEAK_TFLOPS.items() if fragment in name), None)


def pytest_addoption(parser):
    parser.addoption("--providers", default=",".join(PROVIDERS), help="comma-separated providers")
    parser.addoption("--workloads", default="", help="comma-separated workload names (default: all)")
    parser.addoption("--slice-sweep", default="", metavar="K,K,...",
                     help="run test_slice_sweep.py at S = 2^K for each K (e.g. 12,14,16,18,20); default: skip it")


def pytest_generate_tests(metafunc):
    if "provider" in metafunc.fixturenames:
        chosen = metafunc.config.getoption("--providers").split(",")
        metafunc.parametrize("provider", [p for p in PROVIDERS if p in chosen])
    if "workload" in metafunc.fixturenames:
        names = [n for n in metafunc.config.getoption("--workloads").split(",") if n]
        chosen = [w for w in WORKLOADS if not names or w.name in names]
        metafunc.parametrize("workload", chosen, ids=[w.name for w in chosen])
    if "slices" in metafunc.fixturenames:
        powers = [int(k) for k in metafunc.config.getoption("--slice-sweep").split(",") if k]
        metafunc.parametrize("slices", [1 << k for k in powers], ids=[f"S=2^{k}" for k in powers])
    if "mode" in metafunc.fixturenames:
        metafunc.parametrize("mode", MODES)


def pytest_configure(config):
    if DEVICE.type == "cpu":
        torch.set_num_threads(2)
