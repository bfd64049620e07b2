"""benchmarks/kernel_report.py: its SASS loop finding, and one real variant end to end (compiled for
sm_90 on the CPU, in a subprocess without TRITON_INTERPRET; about 20 s)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

BENCHMARKS = Path(__file__).parent.parent / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

SASS = """
        /*0000*/                   S2R R0, SR_TID.X ;
        /*0010*/                   MOV R1, RZ ;
        /*0020*/                   HMMA.16816.F32.BF16 R4, R8, R12, R4 ;
        /*0030*/                   LDG.E.128 R8, desc[UR4][R2.64] ;
        /*0040*/               @P0 BRA 0x20 ;
        /*0050*/                   FFMA R5, R6, R7, R5 ;
        /*0060*/                   BAR.SYNC.DEFER_BLOCKING 0x0 ;
        /*0070*/                   STG.E [R2.64], R5 ;
        /*0080*/              @!P1 BRA 0x50 ;
        /*0090*/                   BRA 0x10 ;
        /*00a0*/                   EXIT ;
        /*00b0*/                   BRA 0xb0;
"""


def test_loops_nest_by_backward_branches():
    from kernel_report import class_counts, find_loops, memory_counts, parse_sass

    loops, top = find_loops(parse_sass(SASS))
    assert [(loop.start, loop.end) for loop in loops] == [(0x10, 0x90), (0x20, 0x40), (0x50, 0x80)]
    assert [loop.parent for loop in loops] == [None, 0, 0]
    assert [ins.opcode for ins in loops[1].body] == ["HMMA.16816.F32.BF16", "LDG.E.128", "BRA"]
    assert memory_counts(loops[2].body) == {"barriers": 1, "global_loads": 0, "global_stores": 1, "atomics": 0}
    counts = class_counts(loops[1].body)
    assert counts["flops_16bit"] == 4096 and counts["l2_bytes_per_lane"] == 16 and counts["issue"] == 3
    assert [ins.address for ins in top] == [0x0, 0xa0, 0xb0]  # the self-branch closes no loop


# The backward's shape on a long grid: the D loop at the top level, then a loop over chunks (its
# restart in its own body) around a loop over the chunk's points.
BACKWARD_SASS = """
        /*0000*/                   S2R R0, SR_TID.X ;
        /*0010*/                   HMMA.16816.F32.BF16 R4, R8, R12, R4 ;
        /*0020*/               @P0 BRA 0x10 ;
        /*0030*/                   FRND.FLOOR R5, R6 ;
        /*0040*/                   LDG.E R9, desc[UR4][R2.64] ;
        /*0050*/                   FFMA R5, R6, R9, R5 ;
        /*0060*/               @P1 BRA 0x40 ;
        /*0070*/               @P2 BRA 0x30 ;
        /*0080*/                   STG.E [R2.64], R5 ;
        /*0090*/                   EXIT ;
"""


def test_loop_roles():
    """The loop holding the tensor-core work is the D loop; one around it the forward's row loop;
    one around another loop the backward's chunk loop; an innermost one a point loop."""
    from kernel_report import TENSOR, find_loops, loop_roles, parse_sass, row_block

    def tensor(op):
        return op.split(".")[0] in TENSOR

    loops, _ = find_loops(parse_sass(SASS))
    roles = loop_roles(loops, tensor)
    assert roles == ["row", "d", "grid"]
    block = row_block(loops, roles, d_trips=16, points=17)
    # per row block: the row body's BRA, 16 D trips of one LDG, 17 point trips of a barrier and a store
    assert (block["global_loads"], block["global_stores"], block["barriers"]) == (16, 17, 17)
    assert block["other_barriers"] == 17 and block["point_loop"]
    loops, _ = find_loops(parse_sass(BACKWARD_SASS))
    assert [(loop.start, loop.end) for loop in loops] == [(0x10, 0x20), (0x30, 0x70), (0x40, 0x60)]
    assert loop_roles(loops, tensor) == ["d", "chunk", "grid"]


def test_report_runs_on_one_variant(tmp_path):
    """The bf16 forward's default on the uniform grid, sm_90: the chunk's points unrolled into the
    row loop (no point loop), no global store or atomic per row block and no barrier there but
    the D loop's and its pipeline's."""
    import torch

    from lejepa_kernels.kernels import config

    c = config.FORWARD_CANDIDATES[torch.bfloat16][0]
    default = f"forward:bf16:{c.block_n},{c.block_s},{c.block_d},{c.num_warps},{c.num_stages}"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    command = [
        sys.executable, str(BENCHMARKS / "kernel_report.py"), "--only-candidates", "--config", default,
        "--grids", "uniform", "--capabilities", "90", "--workers", "1", "--out", str(tmp_path / "report"),
    ]
    temp = tmp_path / "temp"
    temp.mkdir()
    result = subprocess.run(command, env={**env, "TMPDIR": str(temp)}, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-4000:]
    assert list(temp.iterdir()) == []  # its private Triton cache is gone
    assert "| forward | bf16 | uniform |" in (tmp_path / "report.md").read_text()
    (r,) = json.loads((tmp_path / "report.json").read_text())["variants"]
    assert r["registers"] > 0 and r["spill_bytes"] == 0 and r["blocks_per_sm"] >= 1
    assert r["workload"]["programs"] >= config.PROGRAMS_PER_SM * 132
    assert r["workload"]["tiles"] == (8192 // c.block_n) * (8192 // c.block_s)
    roles = sorted(loop["role"] for loop in r["sass_loops"])
    assert roles == ["d", "row"], roles
    block = r["row_block"]
    assert block["global_stores"] == block["atomics"] == 0 and block["other_barriers"] == 0, block
    assert block["barriers"] == block["d_loop_barriers"] + block["pipeline_barriers"], block
    assert r["d_trips_exact"] and r["d_trips"] > 0
    assert r["unit_ms"]["tensor"] > 0 and r["unit_ms"]["issue"] > 0 and r["unit_ms"]["dram"] > 0
    assert r["estimate_ms"] == max(r["unit_ms"].values()) > 0
