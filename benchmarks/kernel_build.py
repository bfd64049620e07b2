"""Compile the Triton kernels as real launches specialise them, for sm_80 and sm_90, on the CPU.

The launchers run on small CPU inputs of each launch case (dtype x grid x shape class) with
their kernels replaced by recorders. Each recorded launch is specialised as Triton's JIT does
(`specialisation`: an integer equal to 1 becomes a constant, integers and pointers divisible by
16 get the `tt.divisibility` attribute, floats are fp32), checked against what the installed
Triton's own JIT derives from the same arguments (`jit_specialisation`), and every distinct
specialisation is compiled for each capability. Registers and spills come from the ptxas log of
that very compilation (TRITON_DUMP_PTXAS_LOG, in a fresh cache), tensor-core instruction counts
from the SASS of its cubin.

Run as a script (TRITON_INTERPRET unset: interpreted kernels cannot be compiled); prints one JSON
object per compiled variant. tests/test_compile_targets.py runs it; benchmarks/kernel_report.py
imports it (`record_launches` at any shape and configuration, `build(..., asm=True)`).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from typing import Iterator
from unittest import mock

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.compiler.compiler import make_backend
from triton.runtime.jit import create_function_from_signature

from lejepa_kernels.kernels import backward, config, forward
from lejepa_kernels.reference import quadrature, random_directions

CAPABILITIES = (80, 90)
TRITON_TYPES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
GRIDS = {"uniform": 17, "direct": 17, "uniform_long": 129}
"""Grid kinds and their lengths: the recurrence, direct trig, the recurrence with restarts."""
SHAPES = {"aligned": (256, 64, 128), "ragged": (37, 24, 19)}
"""Shape classes (N, D, S): every size a multiple of 16 (the workloads), none (odd batches)."""
KERNELS = {"forward": forward._ecf_forward_kernel, "backward": backward._ecf_backward_kernel}
BIN = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")


@dataclass(frozen=True)
class Launch:
    """One kernel launch as the JIT compiles it: signature, constants, attributes, options."""

    kernel: str
    case: tuple[str, str, str]  # dtype, grid, shape class
    signature: tuple[tuple[str, str], ...]
    constants: tuple[tuple[str, object], ...]
    divisible: tuple[str, ...]  # arguments with tt.divisibility 16
    options: tuple[tuple[str, int], ...]
    jit_agrees: bool  # the installed Triton's JIT derives the same signature, constants, attributes
    grid: tuple[int, ...] = field(default=(), compare=False)  # the launch grid (programs per axis)
    values: tuple[tuple[str, object], ...] = field(default=(), compare=False)  # runtime scalars

    def key(self) -> tuple:
        """Equal for launches that run the same binary (whatever their case)."""
        return self.kernel, self.signature, self.constants, self.divisible, self.options, self.jit_agrees

    def config(self) -> str:
        """The launch's configuration, "BLOCK_N,BLOCK_S,BLOCK_D,num_warps,num_stages"."""
        constants, options = dict(self.constants), dict(self.options)
        return ",".join(
            str(v) for v in (*(constants[k] for k in ("BLOCK_N", "BLOCK_S", "BLOCK_D")),
                             options["num_warps"], options["num_stages"])
        )

    def describe(self) -> str:
        """The runtime arguments' specialisation, e.g. "N:i32/16 stride_xn=1"."""
        constants = dict(self.constants)
        parts = []
        for name, kind in self.signature:
            if kind == "constexpr" and name in constants and name.upper() != name:
                parts.append(f"{name}={constants[name]}")
            elif kind != "constexpr" and not kind.startswith("*"):
                parts.append(f"{name}:{kind}" + ("/16" if name in self.divisible else ""))
        return " ".join(parts)


def specialisation(value: object) -> tuple[str, object | None, bool]:
    """(type, constant or None, divisible by 16) of a runtime argument, as Triton's JIT (3.6 to
    3.8) specialises it: 1 becomes a constant; other integers are i32/i64 by range, pointers
    take their element type; both are marked when divisible by 16 (a pointer's address)."""
    if isinstance(value, torch.Tensor):
        return "*" + TRITON_TYPES[value.dtype], None, value.data_ptr() % 16 == 0
    if isinstance(value, bool):
        return "u1", None, False
    if isinstance(value, int):
        if value == 1:
            return "constexpr", 1, False
        kind = "i32" if -(2**31) <= value < 2**31 else "i64"
        return kind, None, value % 16 == 0
    if isinstance(value, float):
        return "fp32", None, False
    raise TypeError(f"no specialisation rule for a {type(value).__name__} argument")


def jit_specialisation(kernel, args: tuple, kwargs: dict) -> tuple[dict, dict, set]:
    """(signature, constants, divisible argument names) that the installed Triton's JIT derives
    for kernel[grid](*args, **kwargs): its own binder and argument packing, as `JITFunction.run`
    calls them (private API of Triton 3.6 to 3.8). Its attributes list, per argument path, the
    specialisation's attributes: 3.8 lists every runtime argument (most with none), 3.6 only
    those with a specialisation string; both read the same here."""
    backend = make_backend(GPUTarget("cuda", CAPABILITIES[-1], 32))
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound, specialization, options = binder(*args, **kwargs)
    _, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound, specialization, options)
    names = kernel.arg_names
    constants = {names[path[0]]: value for path, value in constexprs.items()}
    divisible = {names[path[0]] for path, specs in attrs.items() if ["tt.divisibility", 16] in specs}
    return signature, constants, divisible


def record(kernel_name: str, case: tuple[str, str, str], args: tuple, kwargs: dict, grid: tuple = ()) -> Launch:
    """The Launch of kernel(*args, **kwargs): runtime arguments come positionally, constants
    (the kernel's constexpr parameters) and options (num_warps, num_stages) by keyword."""
    names = KERNELS[kernel_name].arg_names
    signature, constants, divisible = [], {}, []
    for name, value in zip(names, args):
        kind, constant, aligned = specialisation(value)
        signature.append((name, kind))
        if constant is not None:
            constants[name] = constant
        if aligned:
            divisible.append(name)
    for name in names[len(args):]:
        signature.append((name, "constexpr"))
        constants[name] = kwargs[name]
    options = {k: v for k, v in kwargs.items() if k not in names}
    jit = jit_specialisation(KERNELS[kernel_name], args, kwargs)
    return Launch(
        kernel_name, case, tuple(signature), tuple(constants.items()), tuple(divisible),
        tuple(sorted(options.items())), jit == (dict(signature), constants, set(divisible)),
        tuple(grid), tuple((n, v) for n, v in zip(names, args) if isinstance(v, (int, float))),
    )


class _Recorder:
    """Stands in for a JIT kernel: `kernel[grid](*args, **kwargs)` appends a Launch."""

    def __init__(self, kernel_name: str, case: tuple[str, str, str], out: list[Launch]):
        self.kernel_name, self.case, self.out = kernel_name, case, out

    def __getitem__(self, grid):
        grid = tuple(grid) if isinstance(grid, (tuple, list)) else (grid,)
        return lambda *args, **kwargs: self.out.append(record(self.kernel_name, self.case, args, kwargs, grid))


def case_launches(dtype: torch.dtype, grid: str, shape: str, candidate: int = 0) -> list[Launch]:
    """The launches the forward and backward launchers make for one case (CPU inputs, the
    kernels recorded instead of run, the device check skipped), with the forward's rows split
    over programs and the backward's slices in chunks of one tile, as on a large GPU; each
    kernel at its candidate configuration of that index (the last one past its list's end)."""
    N, D, S = SHAPES[shape]
    forward_candidates = config.FORWARD_CANDIDATES[dtype]
    backward_candidates = config.BACKWARD_CANDIDATES[dtype]
    if candidate == 0:  # the launchers' own defaults (the long grid's forward has its own)
        return record_launches(dtype, grid, N, D, S, case=(TRITON_TYPES[dtype], grid, shape))
    return record_launches(
        dtype, grid, N, D, S, case=(TRITON_TYPES[dtype], grid, shape),
        forward_config=forward_candidates[min(candidate, len(forward_candidates) - 1)],
        backward_config=backward_candidates[min(candidate, len(backward_candidates) - 1)],
    )


def record_launches(
    dtype: torch.dtype,
    grid: str,
    N: int,
    D: int,
    S: int,
    *,
    case: tuple[str, str, str],
    forward_config: config.KernelConfig | None = None,
    backward_config: config.KernelConfig | None = None,
    programs: int = 64,
    dp_chunk_bytes: int = 1,
    kernels: tuple[str, ...] = ("forward", "backward"),
) -> list[Launch]:
    """The launches `forward.ecf_forward` and `backward.ecf_backward` make for x [N, D] of dtype
    and S slices on the grid kind `grid`, with the given configurations (None: the defaults),
    the forward aiming at `programs` programs (`program_count_target`) and the backward's dP
    chunks at most `dp_chunk_bytes` (`DP_CHUNK_BYTES`; 1: one tile of slices per chunk). The
    launchers run on CPU inputs with their kernels recorded instead of run and the device check
    skipped, so the grids are those their own logic computes."""
    T = GRIDS[grid]
    x = torch.zeros(N, D, dtype=dtype)
    A, t = torch.zeros(D, S), quadrature(3.0, T)[0]
    if N * D * S <= 1 << 24:
        x, A = torch.randn(N, D).to(dtype), random_directions(D, S, 0)
    step = 0.0 if grid == "direct" else 3.0 / (T - 1)
    grad = torch.zeros(S, T)
    out: list[Launch] = []
    patches = {
        (config, "launch_device_check"): lambda *tensors: None,
        (forward, "program_count_target"): lambda device: programs,
        (backward, "DP_CHUNK_BYTES"): dp_chunk_bytes,
        (backward, "add_product"): lambda *args: None,
        (forward, "_ecf_forward_kernel"): _Recorder("forward", case, out),
        (backward, "_ecf_backward_kernel"): _Recorder("backward", case, out),
    }
    saved = {target: getattr(*target) for target in patches}
    try:
        for (module, name), value in patches.items():
            setattr(module, name, value)
        if "forward" in kernels:
            forward.ecf_forward(x, A, t, step, forward_config)
        if "backward" in kernels:
            backward.ecf_backward(x, A, t, grad, grad, step, backward_config)
    finally:
        for (module, name), value in saved.items():
            setattr(module, name, value)
    return out


def launches() -> list[Launch]:
    """Every distinct launch of every case, in a fixed order: the default configuration of
    every case, and every other candidate that tuning may choose on the workloads' case (bf16,
    the uniform grid, the aligned shape). The report (benchmarks/kernel_report.py) compiles every
    candidate of every case; the tests keep to these, which take a CI run a few minutes."""
    distinct: dict[tuple, Launch] = {}
    candidates = max(map(len, (*config.FORWARD_CANDIDATES.values(), *config.BACKWARD_CANDIDATES.values())))
    for dtype in TRITON_TYPES:
        for grid in GRIDS:
            for shape in SHAPES:
                workload = (dtype, grid, shape) == (torch.bfloat16, "uniform", "aligned")
                for candidate in range(candidates if workload else 1):
                    for launch in case_launches(dtype, grid, shape, candidate):
                        distinct.setdefault(launch.key(), launch)
    return list(distinct.values())


def variants() -> list[tuple[Launch, int]]:
    """What the tests compile: each distinct launch for each capability."""
    return [(launch, capability) for launch in launches() for capability in CAPABILITIES]


def build(launch: Launch, capability: int, asm: bool = False) -> dict:
    """Compile one launch for sm_<capability>; its registers, spills, shared memory (bytes,
    Triton's allocation) and tensor-core ops; with asm, also its "ptx" and "sass" text. The
    ptxas log is read from stdout: call it inside ptxas_logging_cache()."""
    constants = dict(launch.constants)
    attrs = {
        (index,): [["tt.divisibility", 16]]
        for index, (name, _) in enumerate(launch.signature)
        if name in launch.divisible
    }
    log = io.StringIO()
    with contextlib.redirect_stdout(log):
        compiled = triton.compile(
            ASTSource(KERNELS[launch.kernel], dict(launch.signature), constants, attrs),
            target=GPUTarget("cuda", capability, 32),
            options=dict(launch.options),
        )
    ptxas = log.getvalue()
    with tempfile.TemporaryDirectory() as tmp:
        cubin = os.path.join(tmp, "k.cubin")
        with open(cubin, "wb") as f:
            f.write(compiled.asm["cubin"])
        sass = subprocess.run(
            [os.path.join(BIN, "cuobjdump"), "-sass", cubin], capture_output=True, text=True, check=True
        ).stdout
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", ptxas)
    dtype, grid, shape = launch.case
    return {
        "kernel": launch.kernel,
        "dtype": dtype,
        "grid": grid,
        "shape": shape,
        "capability": capability,
        "triton": triton.__version__,
        "registers": int(re.search(r"Used (\d+) registers", ptxas).group(1)),
        "stack": int(re.search(r"(\d+) bytes stack frame", ptxas).group(1)),
        "spill_bytes": int(spills.group(1)) + int(spills.group(2)),
        "tensor_core_ops": len(re.findall(r"\b(?:HMMA|HGMMA)\.", sass)),
        "shared": int(compiled.metadata.shared),
        "num_warps": int(compiled.metadata.num_warps),
        "specialisation": launch.describe(),
        "config": launch.config(),
        "jit_agrees": launch.jit_agrees,
        **({"ptx": compiled.asm["ptx"], "sass": sass} if asm else {}),
    }


def _build_star(args: tuple) -> dict:
    return build(*args)


@contextlib.contextmanager
def ptxas_logging_cache() -> Iterator[None]:
    """Inside the block (and in processes started there), Triton compiles into a fresh private
    cache, removed afterwards, so that every variant goes through ptxas, which prints its log."""
    with tempfile.TemporaryDirectory(prefix="triton-cache-") as cache:
        with mock.patch.dict(os.environ, TRITON_CACHE_DIR=cache, TRITON_DUMP_PTXAS_LOG="1"):
            yield


if __name__ == "__main__":
    if config.interpreting():
        sys.exit("unset TRITON_INTERPRET: interpreted kernels cannot be compiled")
    with ptxas_logging_cache(), ProcessPoolExecutor(max_workers=os.cpu_count()) as pool:
        for result in pool.map(_build_star, variants()):
            print(json.dumps(result), flush=True)
