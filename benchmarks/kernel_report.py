"""Kernel report: resources, steady-state loops and a modelled H100 time for each kernel variant.

    python benchmarks/kernel_report.py                        # every dtype x grid, sm_80 and sm_90
    python benchmarks/kernel_report.py --dtypes bf16 --grids uniform \\
        --config forward:bf16:64,64,64,4,2 --config backward:bf16:64,64,64,4,3   # compare candidates

No GPU is needed. Each variant (kernel x dtype x grid kind x configuration) is launched by the
real launchers (`forward.ecf_forward`, `backward.ecf_backward`) at the paper workload's sizes,
N = 8192 rows, D = 512 features, S = 8192 slices (T = 17 points, or 129 for the "uniform_long"
grid), on CPU tensors with the kernels recorded instead of run (benchmarks/kernel_build.py): the
forward aims at config.PROGRAMS_PER_SM (8) programs per SM on 132 SMs (`program_count_target`),
its grid (slice tiles, row splits, chunks of grid points: `config.grid_chunk`, 17 -> one chunk of
17, 129 -> 9 chunks of 15), and the backward cuts its slices in DP_CHUNK_BYTES chunks (1 GiB: one
chunk at the paper sizes), so grids and program counts are the launchers' own. Each recorded
launch is specialised as Triton's JIT specialises it and compiled for sm_80 and sm_90; the report
reads registers and spills from the ptxas log, shared memory from Triton's metadata, and the
instructions from the SASS (cuobjdump) and the PTX. Configurations come from
`lejepa_kernels.kernels.config` (FORWARD_CANDIDATES, BACKWARD_CANDIDATES: the first is the
default, the others what tuning may choose); `--config
KERNEL:DTYPE:BLOCK_N,BLOCK_S,BLOCK_D,NUM_WARPS,NUM_STAGES` adds candidates.

Resident blocks per SM: the least of what registers, shared memory and warps allow, and 32.
Both sm_80 (A100) and sm_90 (H100) have 65,536 32-bit registers per SM in 4 sub-partitions of
16,384, at most 64 warps and 32 blocks per SM; registers are allocated per warp in units of 256
(the per-thread count rounded up to a multiple of 8), and a warp's registers sit in one
sub-partition, so registers allow 4 * floor(16384 / per-warp registers) warps. Shared memory per
SM: 164 KiB on sm_80, 228 KiB on sm_90, with 1 KiB reserved per block and allocations rounded to
128 bytes.

Loops: the SASS is one instruction stream that every warp runs. A branch to a lower address
closes a loop spanning [target, branch]; loops nest by containment, and each instruction belongs
to the innermost loop holding it (the PTX is read the same way, by `bra` to an earlier label).
The loop whose own body holds the tensor-core instructions is the D loop (the projection tile's
walk over features); a loop around it is the forward's row-block loop (one projection tile per
trip); of the other loops, one that holds another is the backward's chunk loop (one trip per
chunk of grid points) and an innermost one is a point loop ("grid"). A "tile" is one projection
tile: in the forward one (slice tile, chunk, row block), so a program with R row blocks runs the
row loop R times; in the backward one program. Per tile the point loop runs CHUNK_T times in the
forward (direct grid; on the uniform grid `tl.static_range` unrolls the chunk's points into the
row loop's body, so there is no point loop) and T times in all in the backward (its outer
runtime loop over chunks, inner over the chunk's points). Restarts on the long grid sit where the
code puts them and are counted at their region's rate: the forward's chunk start (direct trig of
each element, once per chunk) in the row loop's body, the backward's in the chunk loop's body.
Per iteration the report counts barriers (BAR.SYNC; PTX bar.sync), global loads (LDG, LDGSTS:
cp.async; PTX ld.global, cp.async), stores (STG; st.global) and atomics (ATOM, RED;
atom/red.global). The D loop's trips are solved from the tensor-core work, which must total 2
BLOCK_S BLOCK_N D flops per tile times the passes one BLOCK_D step takes (1 for 16-bit dots;
fp32's 3xTF32 takes 3 HMMA passes on sm_80 and 5 HGMMA on sm_90 here), so a pipeliner's peeled
prologue and epilogue are accounted for; the report says whether that came out a whole number
("d_trips_exact"), else it uses cdiv(D, BLOCK_D).

Forward per row block ("row_block"): what one trip of the row loop issues per warp, its own body
plus the D loop's trips plus the point loop's CHUNK_T trips: barriers, global loads, stores and
atomics. Its barriers are split into the D loop's, "pipeline" ones (in the row loop's own body:
before the D loop, its pipeline's prologue; after it, at most 64 instructions after a DEPBAR,
the wait for cp.async copies, with no barrier between: the drain, which ptxas may schedule into
the trig that follows) and "other" (the rest: e.g. cross-warp row sums through shared memory,
when the warps split the rows of the tile). No global store or atomic per row block means no
global read-modify-write of the sums.

Time model (sm_90 SASS, at the paper workload on an H100 SXM: 132 SMs at 1.83 GHz). Each
instruction of a region is issued once per warp per execution of the region, and the region runs
(top level: programs; row loop: tiles; D loop: tiles x D trips; chunk loop: tiles x chunks; point
loop: tiles x CHUNK_T in the forward, tiles x T in the backward); every instruction counts
whether its predicate is on or not, and what a forward branch jumps over counts at its region's
rate (the loop bodies' only forward branches here skip a D loop of one trip or leave a loop). The
warp instructions of each class, summed over the launch, are divided by the class's per-SM rate
and the SM count:
  tensor cores   the flops of each HMMA (m16n8k16: 4,096 per warp) or HGMMA (m x n x k per warp
                 group: a quarter per warp) at 990 TFLOP/s dense for bf16/fp16, 495 for TF32
  FP32           FFMA, FADD, FMUL: 128 lanes per clock per SM (4 warp instructions)
  MUFU           MUFU.*: 16 lanes per clock per SM (none here: `sincos` is polynomial)
  conversion     F2F, F2FP, F2I, I2F, FRND: 16 lanes per clock per SM
  integer/ALU    integer, address, compare, select, logic and move: 64 lanes per clock per SM
  memory         global, shared and local (spill) loads and stores, atomics: 32 lanes per clock
  shuffle        SHFL: 32 lanes per clock per SM
  issue          every instruction but NOP: 4 schedulers, one warp instruction each per clock
                 (barriers, branches, special-register and constant reads and the uniform
                 datapath's U* instructions count toward issue only)
and the DRAM time is the compulsory bytes (x, A in x's dtype, t and the coefficients read once,
the partial sums or dP written once: the tiles' re-reads are assumed to hit L2; the launcher's
rounding of A and the forward's sum over splits are outside) at 3.35 TB/s. The estimate
is the largest of these (a roofline per unit; its name is the "bound"); the L2-to-SM bytes the
SASS's global loads and stores move are reported beside it, not modelled. The model ignores
latency (dependent chains, memory and barrier waits), occupancy and the tail wave (it assumes
enough warps to hide latency and every SM busy), dual issue and the sharing of pipes (memory and
shuffles both go through the MIO queue; MUFU and conversions may share a pipe), register-bank and shared-memory bank
conflicts, clock throttling, and the launch overheads and work outside the kernels (the forward's
sum over splits, the backward's cuBLAS dP @ A^T, 2 N S D flops). It also treats mma.sync (HMMA)
on sm_90 as reaching the dense peak, which Hopper reaches only with HGMMA. It is meant to compare
variants and configurations, not to predict times to 5%.

Changed for the kernels of issue 12 (2026-11-28): the uniform forward's unrolled points (no point
loop; the row loop holds them), its third grid axis (chunks) and 8 programs per SM; the
backward's chunk loop; restarts counted where the code puts them (before: one point loop per
tile, with restarts every 32 points counted at their rate through forward branches); A read in
x's dtype; the forward's per-row-block table.

Writes OUT.md (tables) and OUT.json (every number), atomically; OUT defaults to
benchmarks/results/<date>-kernel-report-triton<version>. Run it with TRITON_INTERPRET unset (the
kernels are compiled, not interpreted).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import re
import sys
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch
import triton

sys.path.insert(0, str(Path(__file__).parent))

import kernel_build  # noqa: E402
from kernel_build import CAPABILITIES, GRIDS, TRITON_TYPES, Launch  # noqa: E402

from lejepa_kernels.atomic_file import atomic_write  # noqa: E402
from lejepa_kernels.kernels import backward, config  # noqa: E402

RESULTS = Path(__file__).parent / "results"
PAPER = {"N": 8192, "D": 512, "S": 8192}
"""The paper workload's sizes (T from the grid kind: 17 for "uniform" and "direct")."""
DTYPES = {name: dtype for dtype, name in TRITON_TYPES.items()}

H100 = {"sms": 132, "clock_hz": 1.83e9, "dram_bytes_per_s": 3.35e12, "issue_per_clock": 4}
"""H100 SXM: SMs, boost clock, DRAM bandwidth, warp instructions issued per clock per SM."""
TENSOR_FLOPS = {"16bit": 990e12, "tf32": 495e12}
"""Dense tensor-core peaks of the whole H100 SXM (flop/s)."""
LANES = {"fp32": 128, "mufu": 16, "conversion": 16, "alu": 64, "memory": 32, "shuffle": 32}
"""Per-SM lanes per clock of each instruction class (a warp instruction takes 32 lanes)."""
SM_LIMITS = {
    80: {"gpu": "A100", "registers": 65536, "warps": 64, "blocks": 32, "shared": 164 * 1024},
    90: {"gpu": "H100", "registers": 65536, "warps": 64, "blocks": 32, "shared": 228 * 1024},
}
"""Per-SM limits by capability (registers in 4 sub-partitions; 1 KiB of shared memory reserved
per block; registers allocated per warp in units of 256; shared memory in units of 128 bytes)."""
RESERVED_SHARED, SHARED_UNIT, REGISTER_UNIT = 1024, 128, 256

TENSOR = {"HMMA", "HGMMA", "IMMA", "BMMA", "DMMA"}
FP32 = {"FFMA", "FADD", "FMUL", "FFMA32I", "FADD32I", "FMUL32I"}
CONVERSION = {"F2F", "F2FP", "F2I", "I2F", "FRND", "I2FP", "F2IP"}
GLOBAL_LOADS = {"LDG", "LDGSTS", "UTMALDG", "LD"}
GLOBAL_STORES = {"STG", "UTMASTG", "ST"}
ATOMICS = {"ATOM", "ATOMG", "RED", "REDG"}
MEMORY = GLOBAL_LOADS | GLOBAL_STORES | ATOMICS | {"LDS", "STS", "LDSM", "STSM", "ATOMS", "LDL", "STL"}
CONTROL = {
    "BRA", "BRX", "JMP", "EXIT", "BSSY", "BSYNC", "WARPSYNC", "CALL", "RET", "YIELD", "NOP",
    "DEPBAR", "WARPGROUP", "BPT", "KILL", "ELECT", "ERRBAR", "CCTL", "FENCE", "ACQBULK", "SYNCS",
}
OTHER = {"S2R", "S2UR", "R2UR", "LDC", "CS2R", "B2R", "R2B", "VOTEU"}
"""Issue-only: special-register and constant reads, and the uniform datapath (U* opcodes)."""
WIDTHS = {"128": 16, "64": 8, "32": 4, "U16": 2, "S16": 2, "U8": 1, "S8": 1}


def sass_class(opcode: str) -> str:
    """The unit an SASS opcode (e.g. "HMMA.16816.F32.BF16") runs on, in the model's classes."""
    base = opcode.split(".")[0]
    if base in TENSOR:
        return "tensor"
    if base in FP32:
        return "fp32"
    if base == "MUFU":
        return "mufu"
    if base in CONVERSION:
        return "conversion"
    if base in MEMORY:
        return "memory"
    if base == "SHFL":
        return "shuffle"
    if base in ("BAR", "MEMBAR"):
        return "barrier"
    if base in CONTROL:
        return "control"
    if base in OTHER or base.startswith("U"):
        return "other"
    return "alu"


def tensor_flops(opcode: str) -> tuple[float, str]:
    """(flops per warp instruction, "16bit" or "tf32") of an HMMA or HGMMA opcode."""
    parts = opcode.split(".")
    kind = "tf32" if "TF32" in parts else "16bit"
    if parts[0] == "HGMMA":  # HGMMA.64x32x16.F32.BF16: one warp group's m x n x k, a quarter per warp
        m, n, k = (int(v) for v in parts[1].split("x"))
        return 2.0 * m * n * k / 4, kind
    shape = {"16816": (16, 8, 16), "1688": (16, 8, 8), "884": (8, 8, 4), "168": (16, 8, 8)}[parts[1]]
    return 2.0 * math.prod(shape), kind


@dataclass
class Instruction:
    address: int
    opcode: str  # the full opcode, e.g. LDG.E.128 (no predicate)
    target: int | None = None  # a branch's target address


def parse_sass(sass: str) -> list[Instruction]:
    """The instructions of cuobjdump -sass output (one kernel), with branch targets."""
    out = []
    for match in re.finditer(r"/\*([0-9a-f]{4,})\*/\s+([^;]*);", sass):
        text = re.sub(r"^@!?U?P\w+\s+", "", match.group(2).strip())
        opcode = text.split()[0] if text else "NOP"
        target = None
        if opcode.split(".")[0] in ("BRA", "JMP"):
            found = re.search(r"0x([0-9a-f]+)", text)
            target = int(found.group(1), 16) if found else None
        out.append(Instruction(int(match.group(1), 16), opcode, target))
    return out


def parse_ptx(ptx: str) -> list[Instruction]:
    """The PTX instructions of a kernel, numbered in order, with `bra` targets as numbers."""
    labels, pending, body = {}, [], []
    for line in ptx.splitlines():
        line = line.split("//")[0].strip()
        label = re.match(r"^(\$L__\w+):", line)
        if label:
            pending.append(label.group(1))
            continue
        if not line.endswith(";") or line.startswith("."):
            continue
        text = re.sub(r"^@!?%p\w*\s+", "", line)
        for name in pending:
            labels[name] = len(body)
        pending = []
        body.append(text)
    out = []
    for index, text in enumerate(body):
        opcode = text.split()[0].rstrip(";")
        target = None
        if opcode.startswith("bra"):
            found = re.search(r"(\$L__\w+)", text)
            target = labels.get(found.group(1)) if found else None
        out.append(Instruction(index, opcode, target))
    return out


@dataclass
class Loop:
    start: int
    end: int
    parent: int | None = None  # index of the enclosing loop
    body: list[Instruction] | None = None  # its own instructions (not those of inner loops)


def find_loops(instructions: list[Instruction]) -> tuple[list[Loop], list[Instruction]]:
    """(loops, top-level instructions): every backward branch closes a loop [target, branch]
    (back edges to one header merge); each instruction goes to the innermost loop holding it."""
    ends: dict[int, int] = {}
    for ins in instructions:
        if ins.target is not None and ins.target < ins.address:
            ends[ins.target] = max(ends.get(ins.target, ins.address), ins.address)
    loops = [Loop(start, end) for start, end in sorted(ends.items())]
    for i, loop in enumerate(loops):
        holders = [j for j, other in enumerate(loops) if j != i and other.start <= loop.start and loop.end <= other.end]
        loop.parent = min(holders, key=lambda j: loops[j].end - loops[j].start) if holders else None
        loop.body = []
    top = []
    for ins in instructions:
        holders = [j for j, loop in enumerate(loops) if loop.start <= ins.address <= loop.end]
        if holders:
            loops[min(holders, key=lambda j: loops[j].end - loops[j].start)].body.append(ins)
        else:
            top.append(ins)
    return loops, top


def memory_counts(body: list[Instruction], ptx: bool = False) -> dict[str, int]:
    """Barriers, global loads, stores and atomics among a body's instructions."""
    counts = {"barriers": 0, "global_loads": 0, "global_stores": 0, "atomics": 0}
    for ins in body:
        op = ins.opcode
        if ptx:
            key = (
                "barriers" if op.startswith(("bar.sync", "barrier.sync", "bar.", "barrier."))
                else "global_loads" if op.startswith(("ld.global", "cp.async.ca.shared.global", "cp.async.cg"))
                else "global_stores" if op.startswith("st.global")
                else "atomics" if op.startswith(("atom.global", "red.global", "atom.", "red."))
                else None
            )
        else:
            base = op.split(".")[0]
            key = (
                "barriers" if op.startswith("BAR.SYNC") or op.startswith("BAR.RED")
                else "global_loads" if base in GLOBAL_LOADS
                else "global_stores" if base in GLOBAL_STORES
                else "atomics" if base in ATOMICS
                else None
            )
        if key:
            counts[key] += 1
    return counts


def class_counts(body: list[Instruction]) -> dict[str, float]:
    """Instructions per class (issue: all but NOP), tensor flops by kind, and global bytes per lane."""
    counts: dict[str, float] = {}
    for ins in body:
        cls = sass_class(ins.opcode)
        counts[cls] = counts.get(cls, 0) + 1
        if ins.opcode != "NOP":
            counts["issue"] = counts.get("issue", 0) + 1
        if cls == "tensor":
            flops, kind = tensor_flops(ins.opcode)
            counts["flops_" + kind] = counts.get("flops_" + kind, 0) + flops
        base = ins.opcode.split(".")[0]
        if base in GLOBAL_LOADS | GLOBAL_STORES | ATOMICS:
            width = next((WIDTHS[p] for p in ins.opcode.split(".")[1:] if p in WIDTHS), 4)
            counts["l2_bytes_per_lane"] = counts.get("l2_bytes_per_lane", 0) + width
    return counts


def blocks_per_sm(registers: int, shared: int, warps: int, capability: int) -> dict:
    """Resident blocks per SM allowed by registers, shared memory and warps, and the least."""
    limits = SM_LIMITS[capability]
    per_warp = math.ceil(registers * 32 / REGISTER_UNIT) * REGISTER_UNIT
    by_registers = 4 * ((limits["registers"] // 4) // per_warp) // warps
    by_shared = limits["shared"] // (math.ceil(shared / SHARED_UNIT) * SHARED_UNIT + RESERVED_SHARED)
    by_warps = limits["warps"] // warps
    least = min(by_registers, by_shared, by_warps, limits["blocks"])
    names = {"registers": by_registers, "shared": by_shared, "warps": by_warps, "blocks": limits["blocks"]}
    return {
        "blocks_per_sm": least,
        "blocks_by": names,
        "limited_by": [n for n, v in names.items() if v == least],
        "warps_per_sm": least * warps,
    }


def workload(launches: list[Launch], kernel: str, cfg: config.KernelConfig, T: int) -> dict:
    """Programs, tiles (projection tiles: row-loop trips in the forward) and grid points of a
    kernel's launches at the paper workload."""
    values = dict(launches[0].values)
    N, D, S = values["N"], values["D"], values["S"]
    programs = sum(math.prod(launch.grid) for launch in launches)
    chunk_t = config.grid_chunk(T)
    chunks = math.ceil(T / chunk_t)
    out = {"N": N, "D": D, "S": S, "T": T, "chunk_t": chunk_t, "chunks": chunks, "launches": len(launches),
           "programs": programs, "grids": [list(launch.grid) for launch in launches]}
    if kernel == "forward":
        (launch,) = launches
        slice_tiles, splits, grid_chunks = launch.grid
        assert grid_chunks == chunks, (launch.grid, chunks)
        per_split = values["rows_per_split"]
        row_blocks = [math.ceil(min(per_split, N - j * per_split) / cfg.block_n) for j in range(splits)]
        out.update(splits=splits, row_blocks_per_program=max(row_blocks),
                   tiles=slice_tiles * chunks * sum(row_blocks), points_per_tile=chunk_t)
    else:
        out.update(tiles=programs, points_per_tile=T)
    return out


def dram_bytes(kernel: str, dtype: str, T: int, work: dict, launches: list[Launch]) -> int:
    """Compulsory DRAM bytes: inputs read once (x and A in x's dtype), outputs written once."""
    N, D, S = work["N"], work["D"], work["S"]
    itemsize = DTYPES[dtype].itemsize
    read = N * D * itemsize + D * S * itemsize + T * 4
    if kernel == "forward":
        splits = launches[0].grid[1]
        return read + splits * 2 * T * S * 4
    dp_itemsize = 2 if dtype == "bf16" else 4
    return read + 2 * T * S * 4 + N * S * dp_itemsize


def loop_roles(loops: list[Loop], tensor_test) -> list[str]:
    """Each loop's role: "d" (its own body holds the tensor-core instructions; one such loop),
    "row" (holds the D loop), "chunk" (holds another loop) or "grid" (a loop over points)."""
    d = [i for i, loop in enumerate(loops) if any(tensor_test(ins.opcode) for ins in loop.body)]
    d_index = d[0] if len(d) == 1 else None
    roles = []
    for i, loop in enumerate(loops):
        if i == d_index:
            roles.append("d")
        elif d_index is not None and _encloses(loops, i, d_index):
            roles.append("row")
        elif any(_encloses(loops, i, j) for j in range(len(loops)) if j != i):
            roles.append("chunk")
        else:
            roles.append("grid")
    return roles


def row_block(loops: list[Loop], roles: list[str], d_trips: int, points: int) -> dict | None:
    """Per warp, what one trip of the forward's row loop issues: its own body, the D loop's
    trips and the point loop's `points` trips (barriers split into the D loop's, the pipeline's
    and others, as the docstring says; "after_d": those of the row body after the D loop, with
    their distance in instructions from its end)."""
    rows = [i for i, role in enumerate(roles) if role == "row"]
    if len(rows) != 1:
        return None
    row = loops[rows[0]]
    body = row.body
    d_loop = next((loops[i] for i, role in enumerate(roles) if role == "d"), None)
    grid = [loops[i] for i, role in enumerate(roles) if role == "grid" and _encloses(loops, rows[0], i)]
    totals = memory_counts(body)
    for loop, trips in [(d_loop, d_trips)] * (d_loop is not None) + [(g, points) for g in grid]:
        for key, value in memory_counts(loop.body).items():
            totals[key] += value * trips
    pipeline = other = 0
    after_d = []
    is_barrier = [ins.opcode.startswith(("BAR.SYNC", "BAR.RED")) for ins in body]
    for index, ins in enumerate(body):
        if not is_barrier[index]:
            continue
        # before the D loop: its pipeline's prologue; after it, a cp.async wait (DEPBAR, not
        # LDGDEPBAR or WARPGROUP.DEPBAR) since the last barrier marks the pipeline's drain
        waited = d_loop is not None and ins.address < d_loop.start
        for prior in range(index - 1, max(-1, index - 65), -1):
            if waited or is_barrier[prior]:
                break
            if body[prior].opcode.split(".")[0] == "DEPBAR":
                waited = True
                break
        if waited:
            pipeline += 1
        else:
            other += 1
        if d_loop is not None and ins.address > d_loop.end:
            after_d.append(sum(1 for x in body if d_loop.end < x.address < ins.address))
    d_barriers = memory_counts(d_loop.body)["barriers"] * d_trips if d_loop is not None else 0
    grid_barriers = sum(memory_counts(g.body)["barriers"] for g in grid) * points
    return {
        **totals,
        "d_loop_barriers": d_barriers,
        "pipeline_barriers": pipeline,
        "other_barriers": other + grid_barriers,
        "after_d": after_d,
        "after_d_instructions": sum(1 for x in body if d_loop is not None and x.address > d_loop.end),
        "point_loop": bool(grid),
    }


def analyse(build: dict, kernel: str, dtype: str, T: int, cfg: config.KernelConfig, work: dict) -> dict:
    """Loops, per-iteration counts and (on sm_90) the modelled H100 time of one compiled variant."""
    sass_loops, sass_top = find_loops(parse_sass(build["sass"]))
    ptx_loops, _ = find_loops(parse_ptx(build["ptx"]))
    warps = build["num_warps"]

    sass_roles = loop_roles(sass_loops, lambda op: op.split(".")[0] in TENSOR)
    ptx_roles = loop_roles(ptx_loops, lambda op: op.startswith(("mma", "wgmma.mma_async")))

    # executions of each region over the whole launch
    tiles, programs = work["tiles"], work["programs"]
    step_flops = 2.0 * cfg.block_s * cfg.block_n * cfg.block_d  # one BLOCK_D step of the tile, once

    def flops(body):
        c = class_counts(body)
        return (c.get("flops_16bit", 0) + c.get("flops_tf32", 0)) * warps

    d_loops = [i for i, r in enumerate(sass_roles) if r == "d"]
    d_trips, exact, passes = math.ceil(work["D"] / cfg.block_d), False, None
    if len(d_loops) == 1:
        d = d_loops[0]
        parent = sass_loops[d].parent
        outside = flops(sass_top if parent is None else sass_loops[parent].body)
        per_trip = flops(sass_loops[d].body)
        passes = max(1, round(per_trip / step_flops))  # 1 for 16-bit dots; 3xTF32 takes 3 or more
        solved = (passes * step_flops * work["D"] / cfg.block_d - outside) / per_trip
        if abs(solved - round(solved)) < 1e-6 and round(solved) >= 0:
            d_trips, exact = round(solved), True
    per_role = {"d": tiles * d_trips, "row": tiles, "chunk": tiles * work["chunks"],
                "grid": tiles * work["points_per_tile"]}
    executions = [per_role[role] for role in sass_roles]
    regions = [(sass_top, programs)] + [(loop.body, n) for loop, n in zip(sass_loops, executions)]

    totals: dict[str, float] = {}
    for body, runs in regions:
        for key, value in class_counts(body).items():
            totals[key] = totals.get(key, 0.0) + value * runs * warps
    sms, clock = H100["sms"], H100["clock_hz"]
    times = {
        "tensor": 1e3 * (totals.get("flops_16bit", 0) / TENSOR_FLOPS["16bit"] + totals.get("flops_tf32", 0)
                         / TENSOR_FLOPS["tf32"]),
        **{cls: 1e3 * totals.get(cls, 0) * 32 / (lanes * sms * clock) for cls, lanes in LANES.items()},
        "issue": 1e3 * totals.get("issue", 0) / (H100["issue_per_clock"] * sms * clock),
    }
    return {
        "sass_loops": [
            _loop_summary(loop, role, n, False) for loop, role, n in zip(sass_loops, sass_roles, executions)
        ],
        "ptx_loops": [_loop_summary(loop, role, None, True) for loop, role in zip(ptx_loops, ptx_roles)],
        "row_block": row_block(sass_loops, sass_roles, d_trips, work["points_per_tile"]) if kernel == "forward"
        else None,
        "d_trips": d_trips,
        "d_trips_exact": exact,
        "tensor_passes": passes,
        "warp_instructions": {k: v for k, v in totals.items() if not k.startswith(("flops", "l2"))},
        "tensor_flops": totals.get("flops_16bit", 0) + totals.get("flops_tf32", 0),
        "l2_bytes": totals.get("l2_bytes_per_lane", 0) * 32,
        "unit_ms": times,
    }


def _encloses(loops: list[Loop], outer: int, inner: int) -> bool:
    parent = loops[inner].parent
    while parent is not None:
        if parent == outer:
            return True
        parent = loops[parent].parent
    return False


def _loop_summary(loop: Loop, role: str, executions: float | None, ptx: bool) -> dict:
    out = {"role": role, "start": loop.start, "end": loop.end, "instructions": len(loop.body),
           **memory_counts(loop.body, ptx)}
    if not ptx:
        classes: dict[str, int] = {}
        for ins in loop.body:
            cls = sass_class(ins.opcode)
            classes[cls] = classes.get(cls, 0) + 1
        out["classes"] = classes
        out["executions"] = executions
    return out


# -- variants, compilation and the report ----


@dataclass(frozen=True)
class Variant:
    kernel: str
    dtype: str
    grid: str
    config: config.KernelConfig
    source: str  # "default" (config.py) or "candidate" (--config)

    def label(self) -> str:
        c = self.config
        return f"{c.block_n},{c.block_s},{c.block_d},{c.num_warps},{c.num_stages}"


def paper_launches(variant: Variant, sms: int = H100["sms"]) -> list[Launch]:
    """The variant's launches at the paper sizes, with the launchers' grid logic on an H100."""
    dtype = DTYPES[variant.dtype]
    key = "forward_config" if variant.kernel == "forward" else "backward_config"
    launches = kernel_build.record_launches(
        dtype, variant.grid, PAPER["N"], PAPER["D"], PAPER["S"],
        case=(variant.dtype, variant.grid, "paper"), programs=config.PROGRAMS_PER_SM * sms,
        dp_chunk_bytes=backward.DP_CHUNK_BYTES, kernels=(variant.kernel,), **{key: variant.config},
    )
    keys = {launch.key() for launch in launches}
    assert len(keys) == 1, f"{variant}: the launches compile to {len(keys)} binaries"
    return launches


def report_one(job: tuple[Variant, int]) -> dict:
    variant, capability = job
    launches = paper_launches(variant)
    build = kernel_build.build(launches[0], capability, asm=True)
    T = GRIDS[variant.grid]
    work = workload(launches, variant.kernel, variant.config, T)
    result = {
        "kernel": variant.kernel, "dtype": variant.dtype, "grid": variant.grid, "T": T,
        "config": variant.label(), "source": variant.source, "capability": capability,
        "gpu": SM_LIMITS[capability]["gpu"], "triton": triton.__version__,
        **{k: build[k] for k in ("registers", "spill_bytes", "stack", "shared", "num_warps", "specialisation",
                                 "jit_agrees")},
        **blocks_per_sm(build["registers"], build["shared"], build["num_warps"], capability),
        "workload": work,
    }
    result["waves"] = work["programs"] / (max(result["blocks_per_sm"], 1) * H100["sms"]) / work["launches"]
    analysis = analyse(build, variant.kernel, variant.dtype, T, variant.config, work)
    result.update(analysis)
    result["dram_bytes"] = dram_bytes(variant.kernel, variant.dtype, T, work, launches)
    if capability == 90:
        times = dict(result["unit_ms"])
        times["dram"] = 1e3 * result["dram_bytes"] / H100["dram_bytes_per_s"]
        result["unit_ms"] = times
        bound = max(times, key=times.get)
        result["estimate_ms"], result["bound"] = times[bound], bound
    else:
        result.pop("unit_ms")
    return result


def parse_config(text: str) -> Variant:
    """KERNEL:DTYPE:BLOCK_N,BLOCK_S,BLOCK_D,NUM_WARPS,NUM_STAGES -> a candidate (grid set later)."""
    try:
        kernel, dtype, numbers = text.split(":")
        values = [int(v) for v in numbers.split(",")]
        assert kernel in ("forward", "backward") and dtype in DTYPES and len(values) == 5
    except (ValueError, AssertionError):
        raise argparse.ArgumentTypeError(
            f"--config takes KERNEL:DTYPE:BLOCK_N,BLOCK_S,BLOCK_D,NUM_WARPS,NUM_STAGES "
            f"(forward|backward, {'|'.join(DTYPES)}), got {text!r}"
        ) from None
    return Variant(kernel, dtype, "", config.KernelConfig(*values), "candidate")


def variants(args) -> list[Variant]:
    out = []
    if not args.only_candidates:
        for kernel in args.kernels:
            table = config.FORWARD_CANDIDATES if kernel == "forward" else config.BACKWARD_CANDIDATES
            for dtype in args.dtypes:
                for grid in args.grids:
                    for index, candidate in enumerate(table[DTYPES[dtype]]):
                        label = "default" if index == 0 else f"candidate {index}"
                        out.append(Variant(kernel, dtype, grid, candidate, label))
    for candidate in args.config:
        for grid in args.grids:
            v = Variant(candidate.kernel, candidate.dtype, grid, candidate.config, "candidate")
            if not any(o.kernel == v.kernel and o.dtype == v.dtype and o.grid == grid and o.config == v.config
                       for o in out):
                out.append(v)
    return out


def markdown(results: list[dict], header: dict) -> str:
    def fmt(x, digits=3):
        return f"{x:.{digits}f}"

    def name(r):
        star = "*" if r["source"] == "candidate" else ""
        return f"{r['kernel']} | {r['dtype']} | {r['grid']} | {r['config']}{star}"

    def counts(loop):
        if loop is None:
            return "-"
        return f"{loop['instructions']} / {loop['barriers']} / {loop['global_loads']} / " \
               f"{loop['global_stores']} / {loop['atomics']}"

    def find(loops, role):
        found = [loop for loop in loops if loop["role"] == role]
        return found[0] if len(found) == 1 else None if not found else {
            k: sum(loop[k] for loop in found)
            for k in ("instructions", "barriers", "global_loads", "global_stores", "atomics")}

    lines = [
        f"# Kernel report: triton {header['triton']}, torch {header['torch']}, {header['date']}",
        "",
        "Compiled on the CPU (no GPU) for sm_80 and sm_90 at the paper workload's sizes, N = "
        f"{PAPER['N']}, D = {PAPER['D']}, S = {PAPER['S']} (T = 17; 129 for uniform_long), with the "
        f"launchers' grids (forward: {config.PROGRAMS_PER_SM} programs per SM on 132 SMs, one program "
        "per slice tile x row split x chunk of grid points; backward: DP_CHUNK_BYTES chunks of slices). "
        "Chunks of grid points (`config.grid_chunk`): T = 17 is one chunk; T = 129 is 9 chunks of 15, "
        "the recurrence restarting from direct trig at each. Config: block_n, block_s, block_d, "
        "num_warps, num_stages; `default` is the first of config.py's candidates. Model and method: "
        "the docstring of benchmarks/kernel_report.py.",
        "",
        "## Resources and occupancy",
        "",
        "Blocks/SM: resident blocks per SM from registers, shared memory and warps (the limits: "
        "65,536 registers, 64 warps, 32 blocks per SM; shared memory 164 KiB on sm_80 / A100, "
        "228 KiB on sm_90 / H100, 1 KiB reserved per block). Waves: programs per launch over "
        "(blocks/SM x 132 SMs).",
        "",
        "| kernel | dtype | grid | config | sm | registers | spill B | shared B | blocks/SM (limit) "
        "| warps/SM | programs | waves |",
        "| --- | --- | --- | --- | --- | ---: | ---: | ---: | --- | ---: | ---: | ---: |",
    ]
    for r in results:
        lines.append(
            f"| {name(r)} | {r['capability']} | {r['registers']} | {r['spill_bytes']} | {r['shared']} "
            f"| {r['blocks_per_sm']} ({', '.join(r['limited_by'])}) | {r['warps_per_sm']} "
            f"| {r['workload']['programs']} | {fmt(r['waves'], 2)} |"
        )
    lines += [
        "",
        "## Steady-state loops",
        "",
        "Per iteration of each loop, per warp: SASS instructions / BAR.SYNC / global loads (LDG, "
        "LDGSTS) / global stores (STG) / atomics, then the PTX's bar.sync / ld.global+cp.async / "
        "st.global / atom+red. D loop: the projection tile's walk over features (its trips per "
        "tile solved from the tensor-core work; `~`: not exact, cdiv(D, block_d) used); point loop: "
        "the grid points (forward, direct grid: CHUNK_T per row block; backward: T per tile in all); "
        "chunk loop (backward, T = 129): one trip per chunk, around the point loop; row loop "
        "(forward): one row block (tile) per trip, its own instructions only (on the uniform grid "
        "they include the chunk's unrolled points). `-`: no such loop (unrolled or absent).",
        "",
        "| kernel | dtype | grid | config | sm | D trips | D loop SASS | D loop PTX | point loop SASS "
        "| point loop PTX | chunk loop SASS | chunk loop PTX | row loop SASS | row loop PTX |",
        "| --- | --- | --- | --- | --- | ---: | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]

    def ptx_counts(loop):
        if loop is None:
            return "-"
        return f"{loop['barriers']} / {loop['global_loads']} / {loop['global_stores']} / {loop['atomics']}"

    for r in results:
        cells = []
        for role in ("d", "grid", "chunk", "row"):
            cells += [counts(find(r["sass_loops"], role)), ptx_counts(find(r["ptx_loops"], role))]
        lines.append(
            f"| {name(r)} | {r['capability']} | {r['d_trips']}{'' if r['d_trips_exact'] else '~'} | "
            + " | ".join(cells) + " |"
        )
    lines += [
        "",
        "## Forward: per row block",
        "",
        "Per warp, one trip of the row loop (one projection tile of BLOCK_N rows x BLOCK_S slices at "
        "one chunk of grid points), its own body plus the D loop's trips plus the point loop's: "
        "barriers in all = in the D loop (per trip x trips) + pipeline (cp.async waits outside the "
        "D loop: its prologue and drain) + other (e.g. cross-warp row sums through shared memory); "
        "then global loads (LDG, LDGSTS) / stores (STG) / atomics. After D: the row body's "
        "barriers after the D loop, at their distance in instructions from the loop's end, of the "
        "row body's instructions after it (where the per-point work is). Row blocks: per program "
        "(the most).",
        "",
        "| kernel | dtype | grid | config | sm | row blocks | barriers | D loop | pipeline | other "
        "| after D | global ld / st / atom |",
        "| --- | --- | --- | --- | --- | ---: | ---: | ---: | ---: | ---: | --- | --- |",
    ]
    for r in results:
        b = r.get("row_block")
        if r["kernel"] != "forward" or not b:
            continue
        positions = b["after_d"]
        after = (
            "none" if not positions
            else ", ".join(f"+{n}" for n in positions) if len(positions) <= 3
            else f"{len(positions)}: +{positions[0]} to +{positions[-1]}"
        )
        lines.append(
            f"| {name(r)} | {r['capability']} | {r['workload']['row_blocks_per_program']} | {b['barriers']} "
            f"| {b['d_loop_barriers']} | {b['pipeline_barriers']} | {b['other_barriers']} "
            f"| {after} (of {b['after_d_instructions']}) "
            f"| {b['global_loads']} / {b['global_stores']} / {b['atomics']} |"
        )
    units = ["tensor", "fp32", "mufu", "conversion", "alu", "memory", "shuffle", "issue", "dram"]
    lines += [
        "",
        "## Modelled H100 SXM time at the paper workload (sm_90 SASS)",
        "",
        "Milliseconds each unit needs for the whole kernel (all its launches), the estimate being "
        "the largest (bound). Latency, occupancy, dual issue and the work outside the kernels are "
        "ignored (docstring). L2 GB: bytes moved by the SASS's global loads and stores.",
        "",
        "| kernel | dtype | grid | config | " + " | ".join(units) + " | L2 GB | estimate ms | bound |",
        "| --- | --- | --- | --- | " + " | ".join("---:" for _ in units) + " | ---: | ---: | --- |",
    ]
    timed = [r for r in results if r["capability"] == 90]
    for r in sorted(timed, key=lambda r: (r["kernel"], r["dtype"], r["grid"], r["source"] != "default",
                                          r["estimate_ms"])):
        lines.append(
            f"| {name(r)} | " + " | ".join(fmt(r["unit_ms"][u]) for u in units)
            + f" | {fmt(r['l2_bytes'] / 1e9, 2)} | **{fmt(r['estimate_ms'])}** | {r['bound']} |"
        )
    lines += ["", "`*`: a candidate given with --config (not in kernels/config.py).", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=None,
                        help="output path stem (writes STEM.md and STEM.json); default "
                             "benchmarks/results/<date>-kernel-report-triton<version>")
    parser.add_argument("--config", type=parse_config, action="append", default=[],
                        help="a candidate KERNEL:DTYPE:BLOCK_N,BLOCK_S,BLOCK_D,NUM_WARPS,NUM_STAGES (repeatable)")
    parser.add_argument("--only-candidates", action="store_true", help="skip config.py's configurations")
    parser.add_argument("--kernels", default="forward,backward", type=lambda s: s.split(","))
    parser.add_argument("--dtypes", default=",".join(DTYPES), type=lambda s: s.split(","))
    parser.add_argument("--grids", default=",".join(GRIDS), type=lambda s: s.split(","))
    parser.add_argument("--capabilities", default=",".join(map(str, CAPABILITIES)),
                        type=lambda s: [int(v) for v in s.split(",")])
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args(argv)
    if config.interpreting():
        sys.exit("unset TRITON_INTERPRET: interpreted kernels cannot be compiled")
    choices = (
        ("--kernels", args.kernels, ("forward", "backward")), ("--dtypes", args.dtypes, DTYPES),
        ("--grids", args.grids, GRIDS), ("--capabilities", args.capabilities, SM_LIMITS),
    )
    for option, given, allowed in choices:
        bad = [v for v in given if v not in allowed]
        if bad:
            parser.error(f"{option}: unknown {bad}; choose from {list(allowed)}")
    jobs = [(v, cap) for v in variants(args) for cap in args.capabilities]
    with kernel_build.ptxas_logging_cache():
        if args.workers > 1 and len(jobs) > 1:
            with ProcessPoolExecutor(max_workers=args.workers) as pool:
                results = list(pool.map(report_one, jobs))
        else:
            results = [report_one(job) for job in jobs]
    date = datetime.date.today().isoformat()
    header = {"date": date, "triton": triton.__version__, "torch": torch.__version__, "paper": PAPER,
              "h100": H100, "tensor_flops": TENSOR_FLOPS, "lanes_per_sm_clock": LANES, "sm_limits": SM_LIMITS}
    stem = args.out or RESULTS / f"{date}-kernel-report-triton{triton.__version__}"
    stem = stem.with_suffix("") if stem.suffix in (".md", ".json") else stem
    stem.parent.mkdir(parents=True, exist_ok=True)
    text = markdown(results, header)
    payload = json.dumps({**header, "variants": results}, indent=1)
    atomic_write(Path(f"{stem}.json"), lambda f: f.write(payload.encode()))
    atomic_write(Path(f"{stem}.md"), lambda f: f.write(text.encode()))
    print(text)
    print(f"wrote {stem}.md and {stem}.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
