"""`lejepa-kernels check`: verify this install on this machine (see DESCRIPTION)."""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import sys
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch

from .. import cpu_backend
from ..atomic_file import atomic_write
from .accuracy import run_case
from .bench import format_row, header, run_bench
from .cases import CUDA_LARGE_CASES, Case, small_cases
from .environment import describe, summary_lines
from .interpreter import start_interpreted

BACKENDS = ("torch", "cpu", "triton")
DESCRIPTION = """\
Verify this install. Prints the environment; checks every backend that runs here against an
fp64 oracle (one line per check as it completes, ending in PASS or FAIL): the PyTorch path and
the native kernel on the CPU, the Triton kernels on CUDA (small shapes, then every launch path
at full size) or, without CUDA, in Triton's CPU interpreter (small shapes, in a child process);
then a short speed and memory table. The exit status is 1 when a check fails."""
ACCURACY_HEADER = (
    "accuracy against the fp64 oracle, each error against its bound\n"
    "  (err: max |cos_sums - exact| / N (sin_sums alike), or the loss's relative error; "
    "grad: max |dx - dx*| / max |dx*|)"
)


def _backend_list(text: str) -> tuple[str, ...]:
    names = tuple(name.strip() for name in text.split(",") if name.strip())
    unknown = [name for name in names if name not in BACKENDS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"expected a comma-separated subset of {','.join(BACKENDS)}, got {text!r}")
    return names


def add_parser(commands: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register the `check` subcommand on an argparse subparsers object."""
    parser = commands.add_parser(
        "check",
        help="verify this install: every backend against an fp64 oracle, then speed and memory",
        description=DESCRIPTION,
    )
    parser.add_argument("--quick", action="store_true", help="small shapes everywhere (seconds)")
    parser.add_argument("--no-bench", action="store_true", help="skip the speed and memory table")
    parser.add_argument("--json", type=Path, metavar="PATH", help="write every figure to PATH (JSON)")
    parser.add_argument(
        "--backends",
        type=_backend_list,
        default=BACKENDS,
        metavar="LIST",
        help="comma-separated backends to check, of torch,cpu,triton (default: all that run here)",
    )
    parser.set_defaults(run=run)
    return parser


def _cpu_kernel_unavailable() -> str | None:
    """Why the native CPU kernel cannot run here (its first line), or None when it can."""
    reason = cpu_backend.unavailable()
    return reason.splitlines()[0] if reason else None


def check_plan(backends: Iterable[str], quick: bool) -> list[tuple[str, str, list[Case] | str]]:
    """(backend, device, cases or the reason it is skipped) for every backend asked for.
    device: "cuda", "cpu" or "interpreter" (Triton on the CPU, run in a child process). The
    Triton kernels on CUDA come after the PyTorch path there: a device fault in their largest
    shapes would leave no CUDA context for the checks that follow."""
    cuda = torch.cuda.is_available()
    has_triton = importlib.util.find_spec("triton") is not None
    plan: list[tuple[str, str, list[Case] | str]] = []
    if "torch" in backends and cuda:
        plan.append(("torch", "cuda", small_cases("torch", "cuda", quick)))
    if "triton" in backends and cuda:
        cases = small_cases("triton", "cuda", quick) + ([] if quick else CUDA_LARGE_CASES)
        plan.append(("triton", "cuda", cases if has_triton else "triton is not installed"))
    if "torch" in backends:
        plan.append(("torch", "cpu", small_cases("torch", "cpu", quick)))
    if "cpu" in backends:
        plan.append(("cpu", "cpu", _cpu_kernel_unavailable() or small_cases("cpu", "cpu", quick)))
    if "triton" in backends and not cuda:
        cases = small_cases("triton", "interpreter", quick)
        plan.append(("triton", "interpreter", cases if has_triton else "triton is not installed"))
    return plan


def format_result(result: dict[str, Any]) -> str:
    """One line per check: where, what, the errors against their bounds, PASS or FAIL."""
    head = f"{result['backend'] + '/' + result['device']:<19} {result['description']}"
    verdict = "PASS" if result["passed"] else "FAIL"
    if "error" in result:
        return f"{head}: {result['error'].strip().splitlines()[0][:300]}  {verdict}"

    def versus(name: str, error: float, bound: float) -> str:
        return f"{name} {error:.1e} {'<=' if error <= bound else '>'} {bound:.1e}"

    return (
        f"{head}: {versus('err', result['forward_error'], result['forward_tolerance'])}, "
        f"{versus('grad', result['gradient_error'], result['gradient_tolerance'])}, "
        f"{'deterministic' if result['deterministic'] else 'NOT deterministic'}, "
        f"{result['seconds']:.1f}s  {verdict}"
    )


def _cuda_context_lost(result: dict[str, Any]) -> bool:
    """Whether a failed check left the CUDA context unusable (a device-side fault)."""
    error = result.get("error", "")
    return result["device"] == "cuda" and ("CUDA error" in error or "illegal" in error.lower())


def _run_checks(plan, quick: bool) -> Iterator[dict[str, Any]]:
    """Each check's result as it completes. The interpreter's child process starts first, so
    that it works while this process runs the other checks."""
    interpreted = {
        (backend, device): start_interpreted(quick)
        for backend, device, cases in plan
        if device == "interpreter" and not isinstance(cases, str)
    }
    cuda_lost = False
    for backend, device, cases in plan:
        if isinstance(cases, str):
            yield dict(backend=backend, device=device, skipped=cases)
        elif device == "interpreter":
            yield from interpreted[backend, device]
        else:
            for case in cases:
                if device == "cuda" and cuda_lost:
                    yield dict(backend=backend, device=device, description=case.describe(),
                               skipped="not run: an earlier check broke the CUDA context")
                    continue
                result = run_case(case, backend, device)
                cuda_lost = cuda_lost or _cuda_context_lost(result)
                yield result


def _finite(value: Any) -> Any:
    """value with non-finite floats as strings ("nan", "inf"), so that the JSON is strict."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(item) for item in value]
    return value


def write_json(path: Path, data: Any) -> None:
    """Write data to path as strict JSON, atomically (`atomic_write`)."""
    text = json.dumps(_finite(data), indent=2, allow_nan=False, default=str) + "\n"
    atomic_write(path, lambda file: file.write(text.encode()))


def _say(line: str) -> None:
    print(line, flush=True)


def _bench(quick: bool, cuda_lost: bool) -> list[dict[str, Any]]:
    """The speed and memory table, printed row by row (on CUDA when there is a device)."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and cuda_lost:
        _say("speed and memory: not measured, a check broke the CUDA context")
        return []
    _say(header(device))
    rows = []
    for row in run_bench(device, quick):
        rows.append(row)
        _say(f"  {format_row(row)}")
    return rows


def run(args: argparse.Namespace) -> int:
    """Run the check; returns the exit status (1 when a check failed, 2 for a bad --json)."""
    if args.json is not None and not args.json.resolve().parent.is_dir():
        print(f"lejepa-kernels check: --json: no directory {args.json.resolve().parent}", file=sys.stderr)
        return 2
    started = time.perf_counter()
    environment = describe()
    _say(f"lejepa-kernels {environment['lejepa_kernels']} check" + (" (quick)" if args.quick else ""))
    for line in summary_lines(environment):
        _say(f"  {line}")
    _say(ACCURACY_HEADER)
    checks = []
    for result in _run_checks(check_plan(args.backends, args.quick), args.quick):
        checks.append(result)
        if "skipped" in result:
            what = result.get("description", "all checks")
            _say(f"  {result['backend'] + '/' + result['device']:<19} {what}: {result['skipped']}  SKIP")
        else:
            _say(f"  {format_result(result)}")
    rows = [] if args.no_bench else _bench(args.quick, any(_cuda_context_lost(r) for r in checks))
    failed = sum(1 for r in checks if r.get("passed") is False)
    failed += sum(1 for r in rows if r["provider"] == "lejepa-kernels" and "error" in r)
    passed = sum(1 for r in checks if r.get("passed") is True)
    skipped = sum(1 for r in checks if "skipped" in r)
    seconds = time.perf_counter() - started
    _say(
        f"{'FAIL' if failed else 'PASS'}: {passed} checks passed, {failed} failed"
        + (f", {skipped} skipped" if skipped else "")
        + f" ({seconds:.0f} s)"
    )
    if args.json is not None:
        write_json(args.json, dict(
            ok=not failed, passed=passed, failed=failed, skipped=skipped, seconds=seconds,
            quick=args.quick, backends=list(args.backends), environment=environment,
            checks=checks, benchmarks=rows,
        ))
    return 1 if failed else 0
