"""What this install runs on: versions, CUDA device, CPU, and the backend "auto" picks."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import shutil
import subprocess
import sys
from typing import Any

import torch

from ..backends import BACKEND_ENV, choose
from .accuracy import DTYPE_NAMES


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def cpu_name() -> str:
    """The CPU's model name (from /proc/cpuinfo on Linux), else what platform knows."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _driver_version() -> str | None:
    """The NVIDIA driver's version, as nvidia-smi reports it (None without nvidia-smi)."""
    if not shutil.which("nvidia-smi"):
        return None
    try:
        done = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=30,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    lines = done.stdout.strip().splitlines()
    return lines[0].strip() if done.returncode == 0 and lines else None


def auto_backends(device: str) -> dict[str, str]:
    """{dtype name: the backend "auto" picks for an [N, D] tensor of it on `device`} (a bad
    $LEJEPA_KERNELS_BACKEND gives its error message instead)."""
    picks = {}
    for dtype, name in DTYPE_NAMES.items():
        try:
            picks[name] = choose("auto", torch.empty(2, 2, dtype=dtype, device=device), 17, 3.0 / 16)
        except ValueError as error:
            picks[name] = f"error: {error}"
    return picks


def describe() -> dict[str, Any]:
    """Versions, where lejepa_kernels is imported from, CUDA device (or None), CPU, threads and the
    "auto" choices, as plain data."""
    from .. import __version__

    info: dict[str, Any] = dict(
        lejepa_kernels=__version__,
        lejepa_kernels_path=os.path.dirname(os.path.dirname(__file__)),  # the package's directory
        python=platform.python_version(),
        torch=torch.__version__,
        triton=_version("triton"),
        numpy=_version("numpy"),
        torch_cuda_build=torch.version.cuda,
        cpu=cpu_name(),
        machine=platform.machine(),
        cpu_count=os.cpu_count(),
        torch_threads=torch.get_num_threads(),
        backend_env=os.environ.get(BACKEND_ENV),
        triton_interpret=os.environ.get("TRITON_INTERPRET"),
        cuda=None,
        auto={"cpu": auto_backends("cpu")},
    )
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info["cuda"] = dict(
            version=torch.version.cuda,
            device=props.name,
            capability=f"{props.major}.{props.minor}",
            memory_gib=round(props.total_memory / 2**30, 1),
            multiprocessors=props.multi_processor_count,
            driver=_driver_version(),
            devices=torch.cuda.device_count(),
        )
        info["auto"]["cuda"] = auto_backends("cuda")
    return info


def summary_lines(info: dict[str, Any]) -> list[str]:
    """The environment as a few human-readable lines."""
    lines = [
        f"lejepa_kernels from {info['lejepa_kernels_path']}",
        f"python {info['python']} ({sys.implementation.name}), torch {info['torch']}, "
        f"triton {info['triton'] or 'not installed'}, numpy {info['numpy'] or 'not installed'}"
    ]
    cuda = info["cuda"]
    if cuda is None:
        build = info["torch_cuda_build"]
        lines.append("cuda: no device" + (f" (torch built for CUDA {build})" if build else ""))
    else:
        lines.append(
            f"cuda {cuda['version']}: {cuda['device']} (compute capability {cuda['capability']}, "
            f"{cuda['memory_gib']} GiB, {cuda['multiprocessors']} SMs), driver {cuda['driver'] or 'unknown'}"
            + (f", {cuda['devices']} devices (checks use the first)" if cuda["devices"] > 1 else "")
        )
    lines.append(
        f"cpu: {info['cpu']} ({info['machine']}), {info['cpu_count']} logical cores, "
        f"torch threads {info['torch_threads']}"
    )
    for device, picks in info["auto"].items():
        lines.append(f'"auto" on {device}: ' + ", ".join(f"{d} {b}" for d, b in picks.items()))
    if info["backend_env"]:
        lines.append(f"${BACKEND_ENV}={info['backend_env']} overrides \"auto\"")
    if info["triton_interpret"]:
        lines.append(f"$TRITON_INTERPRET={info['triton_interpret']}: Triton runs in its CPU interpreter")
    return lines
