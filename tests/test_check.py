"""`lejepa-kernels check`: it passes on this install, fails on a broken backend, writes its JSON,
and its CUDA tables (which need a GPU to run) hold the shapes they promise."""

import argparse
import contextlib
import importlib.util
import io
import json
import math
import os
import re
import subprocess
import sys
from dataclasses import replace

import pytest
import torch
from conftest import has_c_compiler

import lejepa_kernels
from lejepa_kernels import blockwise, cpu_backend, torch_backend
from lejepa_kernels.check import add_parser, bench, cases, check_plan, interpreter, write_json
from lejepa_kernels.check.accuracy import run_case
from lejepa_kernels.check.cases import CUDA_LARGE_CASES, Case, sample_columns, sums_tolerances

HAS_TRITON = importlib.util.find_spec("triton") is not None


def parse(argv):
    """The check subcommand's namespace, as the CLI would build it."""
    parser = argparse.ArgumentParser(prog="lejepa-kernels")
    add_parser(parser.add_subparsers())
    return parser.parse_args(["check", *argv])


def run_check(argv):
    """(exit status, stdout) of `lejepa-kernels check ARGV`."""
    args = parse(argv)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        status = args.run(args)
    return status, out.getvalue()


def check_lines(output):
    return [line for line in output.splitlines() if line.endswith(("PASS", "FAIL"))]


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    path = tmp_path_factory.mktemp("check") / "check.json"
    status, output = run_check(["--quick", "--no-bench", "--json", str(path)])
    return status, output, path


def test_passes_on_this_install(quick_run):
    status, output, _ = quick_run
    lines = check_lines(output)
    assert status == 0, output
    assert lines and all(line.endswith("PASS") for line in lines)
    assert "torch/cpu" in output and output.splitlines()[-1].startswith("PASS:")
    if has_c_compiler():
        assert any(line.lstrip().startswith("cpu/cpu") for line in lines)


def test_json_holds_every_figure(quick_run):
    _, output, path = quick_run
    report = json.loads(path.read_text())
    assert report["ok"] is True and report["failed"] == 0
    assert report["passed"] == len(check_lines(output)) == len(report["checks"])
    env = report["environment"]
    assert env["torch"] == torch.__version__ and env["python"] and env["cpu"]
    assert env["auto"]["cpu"]["fp64"] == "torch"
    for check in report["checks"]:
        assert check["passed"] is True and check["deterministic"] is True
        assert 0 <= check["forward_error"] <= check["forward_tolerance"]
        assert 0 <= check["gradient_error"] <= check["gradient_tolerance"]
        assert {"backend", "device", "kind", "dtype", "n", "d", "s", "t", "seconds"} <= check.keys()
    kinds = {(c["kind"], c["dtype"], c["layout"], c["grid"]) for c in report["checks"]}
    assert {("sums", "fp16", "strided", "uniform"), ("sums", "bf16", "contiguous", "arbitrary")} <= kinds
    assert report["benchmarks"] == []
    assert not list(path.parent.glob(".*.tmp"))


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
def test_interpreter_child_runs_the_triton_kernels(quick_run):
    _, output, path = quick_run
    interpreted = [c for c in json.loads(path.read_text())["checks"] if c["device"] == "interpreter"]
    assert len(interpreted) == len(cases.small_cases("triton", "interpreter", quick=True))
    assert all(c["backend"] == "triton" and c["passed"] for c in interpreted)
    assert sum(line.lstrip().startswith("triton/interpreter") for line in check_lines(output)) == len(interpreted)


def _lost_last_row(function):
    return lambda x, *args, **kwargs: function(x[:, :-1], *args, **kwargs)  # x: [G, N, D]


def _one_sum_off(function):
    def wrong(*args, **kwargs):
        cos_sums, sin_sums = function(*args, **kwargs)
        cos_sums = cos_sums.clone()
        cos_sums[:, -1, 1] += 0.01  # [G, S, T]
        return cos_sums, sin_sums

    return wrong


def _gradient_scaled(function):
    return lambda *args, **kwargs: function(*args, **kwargs) * (1 + 1e-3)


BROKEN_BACKENDS = [
    ("torch", torch_backend),
    pytest.param("cpu", cpu_backend, marks=pytest.mark.skipif(not has_c_compiler(), reason="no C compiler here")),
]


@pytest.mark.parametrize("backend, module", BROKEN_BACKENDS)
@pytest.mark.parametrize(
    "name, breaker, failing",
    [
        ("ecf_sums", _lost_last_row, "err"),
        ("ecf_sums", _one_sum_off, "err"),
        ("ecf_sums_backward", _gradient_scaled, "grad"),
    ],
)
def test_fails_when_a_backend_is_wrong(monkeypatch, tmp_path, backend, module, name, breaker, failing):
    monkeypatch.setattr(module, name, breaker(getattr(module, name)))
    path = tmp_path / "broken.json"
    status, output = run_check(["--quick", "--no-bench", "--backends", backend, "--json", str(path)])
    assert status == 1
    failed = [line for line in check_lines(output) if line.endswith("FAIL")]
    fp32_sums = [line for line in check_lines(output) if " sums fp32 N=37 D=24 S=19 T=17:" in line]
    assert failed and fp32_sums and all(line.endswith("FAIL") for line in fp32_sums)
    assert all(re.search(rf"\b{failing} \S+ > ", line) for line in fp32_sums)
    assert output.splitlines()[-1].startswith("FAIL:")
    report = json.loads(path.read_text())
    assert report["ok"] is False and report["failed"] == len(failed)


def test_interpreter_child_failure_is_a_failed_check(monkeypatch):
    line = json.dumps({"result": {"backend": "triton", "device": "interpreter", "passed": True}})
    script = f"import sys; print({line!r}); print('Traceback: boom'); sys.exit(3)"
    monkeypatch.setattr(interpreter, "worker_command", lambda quick: [interpreter.sys.executable, "-c", script])
    results = list(interpreter.start_interpreted(quick=True))
    assert results[0]["passed"] is True
    assert results[-1]["passed"] is False
    assert "status 3" in results[-1]["error"] and "boom" in results[-1]["error"]


def test_interpreter_worker_needs_triton_interpret(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert interpreter.main([]) == 2


def test_plan_on_this_machine():
    plan = check_plan(("torch", "cpu", "triton"), quick=False)
    where = [(backend, device) for backend, device, _ in plan]
    assert ("torch", "cpu") in where and ("cpu", "cpu") in where
    if not torch.cuda.is_available():
        assert all(device != "cuda" for _, device in where)
        assert (("triton", "interpreter") in where) == HAS_TRITON
    assert [device for _, device, _ in check_plan(("torch",), quick=True)][-1] == "cpu"


def test_bad_arguments_are_refused(tmp_path, capsys):
    with pytest.raises(SystemExit):
        parse(["--backends", "cuda"])
    args = parse(["--quick", "--json", str(tmp_path / "missing" / "out.json")])
    assert args.run(args) == 2
    assert "no directory" in capsys.readouterr().err


def test_cuda_table_covers_every_launch_path():
    shapes = {(c.kind, c.dtype, c.n, c.d, c.s) for c in CUDA_LARGE_CASES}
    for kind, dtype in [("sums", torch.bfloat16), ("sums", torch.float32), ("loss", torch.bfloat16)]:
        assert (kind, dtype, 8192, 512, 8192) in shapes  # the paper workload
    assert any(c.n >= 65536 and c.s <= 256 for c in CUDA_LARGE_CASES)  # many row splits
    assert any(c.s >= 65536 and c.n >= 8192 for c in CUDA_LARGE_CASES)  # long row walk
    assert any(c.s >= 65535 * 32 and c.n <= 4 for c in CUDA_LARGE_CASES)  # 65535 backward tiles of 32
    assert any(c.s == 1 << 20 for c in CUDA_LARGE_CASES)
    assert any(c.d * c.s > 2**31 for c in CUDA_LARGE_CASES)


@pytest.mark.parametrize("case", CUDA_LARGE_CASES, ids=lambda c: c.label)
def test_cuda_cases_sample_every_tile_and_catch_a_lost_row_block(case):
    """Each 64-slice tile has a compared slice, and 64 rows missing from the sums exceed the
    forward bound (they change C[:, 0] = N by 64)."""
    if case.compares_sample:
        cols = sample_columns(case.s)
        assert cols[0] == 0 and cols[-1] == case.s - 1 and bool((cols[1:] > cols[:-1]).all())
        assert torch.unique(cols // 64).numel() == math.ceil(case.s / 64)
        assert cols.numel() <= cases.MAX_SAMPLE + 2
    forward, gradient = sums_tolerances(case)
    assert min(64, case.n) / case.n > 4 * forward
    assert gradient < 0.05


@pytest.mark.parametrize("case", CUDA_LARGE_CASES, ids=lambda c: c.label)
def test_cuda_cases_run_shrunk_on_the_cpu(case):
    """The same check functions, at CPU sizes, in the same dtypes, sampled where the full case is."""
    small = replace(case, n=min(case.n, 40), d=min(case.d, 12), s=min(case.s, 70), sampled=case.compares_sample)
    result = run_case(small, "torch", "cpu")
    assert result["passed"], result
    assert result["compared_slices"] < 70 if small.sampled else result["compared_slices"] == 70


def test_tolerances_follow_the_dtype():
    fp32, bf16 = Case("sums", torch.float32, 300, 8, 100), Case("sums", torch.bfloat16, 300, 8, 100)
    assert sums_tolerances(fp32)[0] == sums_tolerances(bf16)[0]  # the sums are fp32 for every dtype
    assert sums_tolerances(fp32)[0] == pytest.approx(2 * 16**2 * 2**-24 + 2 * math.sqrt(300) * 2**-24)
    assert sums_tolerances(bf16)[1] - sums_tolerances(fp32)[1] == pytest.approx(4 * (2**-8 - 2**-24))


def test_bench_rows():
    """In a fresh process: a resident-set peak measured inside a long test session can hide in
    memory that earlier tests left resident."""
    script = (
        "import json\n"
        "from lejepa_kernels.check import bench\n"
        "bench.SECONDS_PER_PROVIDER = 0.0\n"
        "rows = list(bench.run_bench('cpu', quick=True, providers=('seed', 'lejepa-kernels')))\n"
        "print(json.dumps(rows))\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = json.loads(done.stdout.splitlines()[-1])
    assert [r["provider"] for r in rows] == ["seed", "lejepa-kernels"]
    for row in rows:
        assert row["ms"] > 0 and row["rounds"] == bench.MIN_ROUNDS and (row["n"], row["s"]) == (256, 128)
    assert rows[1]["vs_seed"] == pytest.approx(rows[0]["ms"] / rows[1]["ms"])
    assert rows[1]["backend"] in ("cpu", "torch")
    if rows[0]["peak_mib"] is not None:  # Linux: the seed materialises [N, S, T] fp32 three times
        assert rows[0]["peak_mib"] > 2 * 256 * 128 * 17 * 4 / 2**20 > rows[1]["peak_mib"]
    assert "lejepa-kernels" in bench.format_row(rows[1]) and " ms " in bench.format_row(rows[1])


def test_json_is_written_atomically_and_strictly(tmp_path):
    path = tmp_path / "out.json"
    path.write_text("old")
    write_json(path, {"error": float("nan"), "values": [1.5, float("inf")]})
    assert json.loads(path.read_text()) == {"error": "nan", "values": [1.5, "inf"]}
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"]


def test_plan_with_a_cuda_device(monkeypatch):
    """On CUDA: the PyTorch path there first, then the Triton kernels with every large shape;
    the CPU backends after; no interpreter."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    plan = check_plan(("torch", "cpu", "triton"), quick=False)
    assert [(backend, device) for backend, device, _ in plan][:3] == [
        ("torch", "cuda"), ("triton", "cuda"), ("torch", "cpu"),
    ]
    triton_cases = plan[1][2]
    if HAS_TRITON:
        assert triton_cases[-len(CUDA_LARGE_CASES):] == CUDA_LARGE_CASES
    assert all(device != "interpreter" for _, device, _ in plan)
    quick = dict(((b, d), c) for b, d, c in check_plan(("triton",), quick=True))
    assert not HAS_TRITON or not set(quick["triton", "cuda"]) & set(CUDA_LARGE_CASES)


def test_checks_after_a_cuda_fault_are_not_run(monkeypatch, capsys):
    import lejepa_kernels.check as command

    def fake_run_case(case, backend, device):
        if device == "cuda" and case.n == 1:
            return dict(backend=backend, device=device, description="faulty", passed=False,
                        error="AcceleratorError: CUDA error: an illegal memory access was encountered")
        return dict(backend=backend, device=device, description=case.describe(), passed=True)

    monkeypatch.setattr(command, "run_case", fake_run_case)
    cases = [Case("sums", torch.float32, n, 4, 4) for n in (2, 1, 3)]
    plan = [("triton", "cuda", cases), ("torch", "cpu", cases)]
    results = list(command._run_checks(plan, quick=True))
    assert [r.get("passed") for r in results] == [True, False, None, True, True, True]
    assert "broke the CUDA context" in results[2]["skipped"]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert command._bench(quick=True, cuda_lost=True) == []
    assert "not measured" in capsys.readouterr().out


def test_environment_lines_name_the_cuda_device(monkeypatch):
    from lejepa_kernels.check import environment

    info = environment.describe()
    info["cuda"] = dict(version="12.8", device="NVIDIA H200", capability="9.0", memory_gib=139.8,
                        multiprocessors=132, driver="570.86", devices=1)
    info["auto"]["cuda"] = {"fp32": "triton", "bf16": "triton", "fp16": "triton", "fp64": "torch"}
    text = "\n".join(environment.summary_lines(info))
    assert "cuda 12.8: NVIDIA H200 (compute capability 9.0" in text and "driver 570.86" in text
    assert '"auto" on cuda: fp32 triton, bf16 triton, fp16 triton, fp64 torch' in text
    assert f"torch {torch.__version__}" in text
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index=0: "NVIDIA H200")
    assert "bf16 on cuda (NVIDIA H200)" in bench.header("cuda")


def test_command_line_runs_the_check(tmp_path):
    """`python -m lejepa_kernels check` reaches the check through the command line."""
    out = tmp_path / "check.json"
    command = [sys.executable, "-m", "lejepa_kernels", "check", "--quick", "--no-bench", "--backends", "torch",
               "--json", str(out)]
    result = subprocess.run(command, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "PASS: " in result.stdout
    lines = result.stdout.splitlines()
    package = os.path.dirname(lejepa_kernels.__file__)
    assert lines[0] == f"lejepa-kernels {lejepa_kernels.__version__} check (quick)"
    assert lines[1] == f"  lejepa_kernels from {package}"
    environment = json.loads(out.read_text())["environment"]
    assert environment["lejepa_kernels"] == lejepa_kernels.__version__
    assert environment["lejepa_kernels_path"] == package


def _first_group_everywhere(function):
    return lambda x, *args, **kwargs: function(x[:1].expand_as(x), *args, **kwargs)  # x: [G, N, D]


def _distance_scaled(function):
    return lambda *args, **kwargs: function(*args, **kwargs) * (1 + 1e-3)


@pytest.mark.parametrize(
    "case, module, name, breaker",
    [
        (Case("loss", torch.bfloat16, 37, 24, 19, groups=3), torch_backend, "ecf_sums", _first_group_everywhere),
        (Case("loss", torch.float32, 37, 16, 19, directions="blockwise"), blockwise, "ecf_distance",
         _distance_scaled),
    ],
    ids=["groups", "blockwise"],
)
def test_grouped_and_blockwise_checks_catch_their_faults(monkeypatch, case, module, name, breaker):
    """The check passes on this install and fails when the groups' sums are mixed up, or when
    the blockwise op's statistic is off by 1e-3 (the oracle draws the same directions itself)."""
    assert run_case(case, "torch", "cpu")["passed"]
    monkeypatch.setattr(module, name, breaker(getattr(module, name)))
    result = run_case(case, "torch", "cpu")
    assert not result["passed"] and "error" not in result, result


def test_groups_and_directions_only_where_a_check_takes_them():
    with pytest.raises(ValueError, match="apply to loss checks"):
        Case("sums", torch.float32, 5, 3, 2, groups=2)
    with pytest.raises(ValueError, match="made contiguous"):
        Case("loss", torch.float32, 5, 3, 2, groups=2, layout="transposed")
