"""Every kernel variant the launchers can choose compiles for sm_80 and sm_90, without spills.

The Triton interpreter accepts code the compiler rejects, so the kernels are also compiled to
PTX and cubin here (no GPU needed), in a subprocess without TRITON_INTERPRET.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

HERE = Path(__file__).parent


@pytest.fixture(scope="module")
def builds() -> list[dict]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run(
        [sys.executable, str(HERE / "kernel_build.py")], env=env, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return [json.loads(line) for line in result.stdout.splitlines()]


def test_every_variant_compiles(builds):
    sys.path.insert(0, str(HERE))
    from kernel_build import variants

    assert len(builds) == len(variants()) == 24


def test_no_register_spills(builds):
    spilling = [b for b in builds if b["spill_bytes"] > 0]
    assert not spilling, spilling


def test_matmul_runs_on_tensor_cores(builds):
    assert all(b["tensor_core_ops"] > 0 for b in builds), builds
