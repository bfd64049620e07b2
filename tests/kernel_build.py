"""Compile every Triton kernel variant the launchers can choose for sm_80 and sm_90, on the CPU.

Run as a script (TRITON_INTERPRET unset: interpreted kernels cannot be compiled); prints one JSON
object per line: kernel, dtype, uniform, capability, registers, spill bytes, and counts of
tensor-core (HMMA/HGMMA) instructions in the SASS.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from lejepa_kernels.kernels.config import BACKWARD_CONFIGS, FORWARD_CONFIGS, input_precision
from lejepa_kernels.kernels.backward import ecf_backward_kernel
from lejepa_kernels.kernels.forward import ecf_forward_kernel

CAPABILITIES = (80, 90)
TRITON_TYPES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
BIN = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")


def signature(kernel_name: str, dtype: torch.dtype) -> dict[str, str]:
    x = "*" + TRITON_TYPES[dtype]
    if kernel_name == "forward":
        names = ["N", "D", "S", "stride_xn", "stride_xd", "rows_per_split"]
        pointers = {"x_ptr": x, "a_ptr": "*fp32", "t_ptr": "*fp32", "partial_ptr": "*fp32"}
    else:
        names = ["N", "D", "S", "chunk_start", "chunk_size", "stride_xn", "stride_xd"]
        dp = "*bf16" if dtype == torch.bfloat16 else "*fp32"
        pointers = {"x_ptr": x, "a_ptr": "*fp32", "t_ptr": "*fp32", "coef_ptr": "*fp32", "dp_ptr": dp}
    return {**pointers, **{name: "i32" for name in names}, "dt": "fp32"}


def build(kernel_name: str, dtype: torch.dtype, uniform: bool, capability: int) -> dict:
    kernel, config = {
        "forward": (ecf_forward_kernel, FORWARD_CONFIGS[dtype]),
        "backward": (ecf_backward_kernel, BACKWARD_CONFIGS[dtype]),
    }[kernel_name]
    constants = {
        "T": 17,
        "UNIFORM": uniform,
        "BLOCK_N": config.block_n,
        "BLOCK_S": config.block_s,
        "BLOCK_D": config.block_d,
        "INPUT_PRECISION": input_precision(dtype),
        "UPCAST_BF16": False,
    }
    sig = {**signature(kernel_name, dtype), **{name: "constexpr" for name in constants}}
    compiled = triton.compile(
        ASTSource(kernel, sig, constants),
        target=GPUTarget("cuda", capability, 32),
        options={"num_warps": config.num_warps, "num_stages": config.num_stages},
    )
    with tempfile.TemporaryDirectory() as tmp:
        ptx, cubin = os.path.join(tmp, "k.ptx"), os.path.join(tmp, "k.cubin")
        with open(ptx, "w") as f:
            f.write(compiled.asm["ptx"])
        with open(cubin, "wb") as f:
            f.write(compiled.asm["cubin"])
        arch = "sm_90a" if capability == 90 else f"sm_{capability}"
        ptxas = subprocess.run(
            [os.path.join(BIN, "ptxas"), f"-arch={arch}", "-v", ptx, "-o", os.path.join(tmp, "k.o")],
            capture_output=True, text=True, check=True,
        ).stderr
        usage = subprocess.run(
            [os.path.join(BIN, "cuobjdump"), "--dump-resource-usage", cubin],
            capture_output=True, text=True, check=True,
        ).stdout
        sass = subprocess.run(
            [os.path.join(BIN, "cuobjdump"), "-sass", cubin], capture_output=True, text=True, check=True
        ).stdout
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", ptxas)
    return {
        "kernel": kernel_name,
        "dtype": TRITON_TYPES[dtype],
        "uniform": uniform,
        "capability": capability,
        "registers": int(re.search(r"REG:(\d+)", usage).group(1)),
        "stack": int(re.search(r"STACK:(\d+)", usage).group(1)),
        "spill_bytes": int(spills.group(1)) + int(spills.group(2)),
        "tensor_core_ops": len(re.findall(r"\b(?:HMMA|HGMMA)\.", sass)),
    }


def variants() -> list[tuple[str, torch.dtype, bool, int]]:
    return [
        (kernel, dtype, uniform, capability)
        for kernel in ("forward", "backward")
        for dtype in TRITON_TYPES
        for uniform in (True, False)
        for capability in CAPABILITIES
    ]


def _build_star(args: tuple) -> dict:
    return build(*args)


if __name__ == "__main__":
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        sys.exit("unset TRITON_INTERPRET: interpreted kernels cannot be compiled")
    with ProcessPoolExecutor(max_workers=os.cpu_count()) as pool:
        for result in pool.map(_build_star, variants()):
            print(json.dumps(result), flush=True)
