"""Every kernel variant that launches produce (the defaults, and every bf16 tuning candidate)
compiles for sm_80 and sm_90, without spills.

The Triton interpreter accepts code the compiler rejects, so the kernels are also compiled to
PTX and cubin here (no GPU needed), in a subprocess without TRITON_INTERPRET, specialised as
real launches specialise them (benchmarks/kernel_build.py, shared with benchmarks/kernel_report.py).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")

HERE = Path(__file__).parent
BENCHMARKS = HERE.parent / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

from kernel_build import CAPABILITIES, GRIDS, KERNELS, SHAPES, TRITON_TYPES  # noqa: E402

from lejepa_kernels.kernels import config  # noqa: E402


@pytest.fixture(scope="module")
def build_temp(tmp_path_factory) -> Path:
    """The build's temporary directory (TMPDIR): empty before it runs."""
    return tmp_path_factory.mktemp("build-temp")


@pytest.fixture(scope="module")
def builds(build_temp) -> list[dict]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run(
        [sys.executable, str(BENCHMARKS / "kernel_build.py")], env={**env, "TMPDIR": str(build_temp)},
        capture_output=True, text=True,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return [json.loads(line) for line in result.stdout.splitlines()]


def test_build_leaves_no_temporary_files(builds, build_temp):
    """Its private Triton cache (about 100 MB) is removed when the build ends."""
    assert builds and list(build_temp.iterdir()) == []


def test_every_case_compiles_once_per_capability(builds):
    """Each (kernel, dtype, grid, shape class) at each configuration launches one binary,
    whatever its chunks or splits, compiled for each capability: the launchers' default of every
    case (the long grid's forward has its own), and every candidate that tuning may choose on the
    workloads' case (bf16, the uniform grid, the aligned shape class)."""
    candidates = {"forward": config.FORWARD_CANDIDATES, "backward": config.BACKWARD_CANDIDATES}

    def label(c):
        return f"{c.block_n},{c.block_s},{c.block_d},{c.num_warps},{c.num_stages}"

    def configurations(kernel, dtype, grid, shape):
        if (dtype, grid, shape) == (torch.bfloat16, "uniform", "aligned"):
            return candidates[kernel][dtype]
        if kernel == "forward" and grid == "uniform_long":
            return config.LONG_GRID_FORWARD_CANDIDATES[dtype][:1]
        return candidates[kernel][dtype][:1]

    expected = {
        (kernel, name, grid, shape, label(c), capability)
        for kernel in KERNELS
        for dtype, name in TRITON_TYPES.items()
        for grid in GRIDS
        for shape in SHAPES
        for c in configurations(kernel, dtype, grid, shape)
        for capability in CAPABILITIES
    }
    got = [(b["kernel"], b["dtype"], b["grid"], b["shape"], b["config"], b["capability"]) for b in builds]
    assert len(got) == len(set(got))
    assert set(got) == expected


def test_specialised_as_the_jit_specialises(builds):
    """The compiled signatures are those Triton's own JIT derives from the launch arguments:
    the aligned class's sizes and row stride all divisible by 16, none of the ragged class's
    (the counts of splits and row tiles are whatever the launch makes them)."""
    assert all(b["jit_agrees"] for b in builds), [b for b in builds if not b["jit_agrees"]]
    for b in builds:
        arguments = dict(item.split(":") for item in b["specialisation"].split() if ":" in item)
        sizes = [arguments[name] for name in ("N", "D", "S", "stride_xn")]
        assert sizes == (["i32/16"] * 4 if b["shape"] == "aligned" else ["i32"] * 4), b


def test_no_register_spills(builds):
    spilling = [b for b in builds if b["spill_bytes"] > 0]
    assert not spilling, spilling


def test_matmul_runs_on_tensor_cores(builds):
    assert all(b["tensor_core_ops"] > 0 for b in builds), builds
